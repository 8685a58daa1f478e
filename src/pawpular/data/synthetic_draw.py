"""The photo of one synthetic pet: a ``Pet`` (its flags and hidden, image-only factors) drawn procedurally.

``render`` draws the scene the flags describe (background, pets, people, fences, text, collage, blur), deterministic
in ``Pet.seed``; ``jpeg_bytes`` encodes it. data/synthetic.py samples the pets and writes the competition folder.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont


@dataclass
class Pet:
    """Everything needed to draw one photo: the flags and the hidden, image-only factors."""

    flags: dict
    warm: float  # 0 = cold dark scene, 1 = warm bright scene
    fur: float  # 0 = dark grey fur, 1 = golden
    size: float  # pet size within its Near / not-Near range
    dog: bool
    eye: float  # eye size
    width: int
    height: int
    seed: int


def _mix(a: tuple, b: tuple, t: float) -> tuple:
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b, strict=False))


def _draw_background(img: Image.Image, p: Pet, rng: np.random.Generator, plain: bool) -> None:
    w, h = img.size
    top = _mix((40, 55, 95), (250, 215, 160), p.warm)
    bottom = _mix((20, 30, 60), (215, 150, 90), p.warm)
    grad = np.linspace(0, 1, h)[:, None, None]
    arr = np.array(top)[None, None] * (1 - grad) + np.array(bottom)[None, None] * grad
    arr = arr + rng.normal(0, 6, (h, 1, 3))  # faint horizontal texture
    img.paste(Image.fromarray(np.clip(np.broadcast_to(arr, (h, w, 3)), 0, 255).astype(np.uint8)))
    if plain:
        return
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(4, 9))):  # clutter: furniture, toys, plants
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        x1, y1 = x0 + rng.integers(8, w // 2), y0 + rng.integers(8, h // 2)
        color = tuple(int(c) for c in rng.integers(30, 230, 3))
        (d.rectangle if rng.random() < 0.5 else d.ellipse)([x0, y0, x1, y1], fill=color)


def _fur_color(p: Pet) -> tuple:
    return _mix((55, 55, 60), (235, 165, 60), p.fur)


def _draw_pet(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float, p: Pet, rng: np.random.Generator) -> None:
    """A pet centred at (cx, cy) with head radius r: body, head, ears, face, eyes, collar."""
    fur = _fur_color(p)
    dark = _mix(fur, (0, 0, 0), 0.45)
    d.ellipse([cx - 1.5 * r, cy + 0.3 * r, cx + 1.5 * r, cy + 2.3 * r], fill=fur, outline=dark)  # body
    if p.dog:  # floppy ears
        d.ellipse([cx - 1.25 * r, cy - 0.6 * r, cx - 0.55 * r, cy + 0.8 * r], fill=dark)
        d.ellipse([cx + 0.55 * r, cy - 0.6 * r, cx + 1.25 * r, cy + 0.8 * r], fill=dark)
    else:  # pointed ears
        d.polygon(
            [(cx - 0.95 * r, cy - 0.3 * r), (cx - 0.75 * r, cy - 1.45 * r), (cx - 0.15 * r, cy - 0.85 * r)],
            fill=fur,
            outline=dark,
        )
        d.polygon(
            [(cx + 0.95 * r, cy - 0.3 * r), (cx + 0.75 * r, cy - 1.45 * r), (cx + 0.15 * r, cy - 0.85 * r)],
            fill=fur,
            outline=dark,
        )
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fur, outline=dark)  # head
    if p.flags["Face"]:
        d.polygon(
            [(cx - 0.15 * r, cy + 0.2 * r), (cx + 0.15 * r, cy + 0.2 * r), (cx, cy + 0.38 * r)], fill=(30, 20, 20)
        )
        d.arc(
            [cx - 0.3 * r, cy + 0.25 * r, cx + 0.3 * r, cy + 0.65 * r],
            20,
            160,
            fill=(30, 20, 20),
            width=max(1, int(r / 12)),
        )
    else:  # head turned away: a darker patch instead of a face
        d.ellipse([cx - 0.6 * r, cy - 0.5 * r, cx + 0.6 * r, cy + 0.5 * r], fill=dark)
    if p.flags["Eyes"]:
        er = r * (0.14 + 0.16 * p.eye)
        for sx in (-0.42, 0.42):
            ex, ey = cx + sx * r, cy - 0.2 * r
            d.ellipse([ex - er, ey - er, ex + er, ey + er], fill=(250, 250, 240))
            d.ellipse([ex - 0.55 * er, ey - 0.55 * er, ex + 0.55 * er, ey + 0.55 * er], fill=(20, 20, 20))
    if p.flags["Accessory"]:  # a red collar with a tag
        d.rectangle([cx - 0.8 * r, cy + 0.85 * r, cx + 0.8 * r, cy + 1.1 * r], fill=(210, 25, 35))
        d.ellipse([cx - 0.12 * r, cy + 1.05 * r, cx + 0.12 * r, cy + 1.3 * r], fill=(240, 210, 40))


def _draw_scene(w: int, h: int, p: Pet, rng: np.random.Generator) -> Image.Image:
    img = Image.new("RGB", (w, h))
    _draw_background(img, p, rng, plain=bool(p.flags["Subject Focus"]))
    f = p.flags
    scale = (0.28 + 0.14 * p.size) if f["Near"] else (0.1 + 0.08 * p.size)  # head radius / min side
    r = scale * min(w, h) * (0.7 if f["Group"] else 1.0)
    n_pets = int(rng.integers(2, 4)) if f["Group"] else 1
    layer = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    for k in range(n_pets):
        cx = w * ((k + 1) / (n_pets + 1) if n_pets > 1 else rng.uniform(0.4, 0.6))
        cy = h * rng.uniform(0.35, 0.5)
        _draw_pet(d, cx, cy, r, p, rng)
    if f["Action"]:  # mid-jump: tilted with motion lines behind
        layer = layer.rotate(float(rng.uniform(20, 35)) * (1 if rng.random() < 0.5 else -1), center=(w / 2, h / 2))
        d = ImageDraw.Draw(layer)
        for k in range(4):
            y = h * (0.3 + 0.1 * k)
            d.line([(w * 0.02, y), (w * 0.22, y)], fill=(255, 255, 255, 220), width=max(1, int(min(w, h) / 60)))
    img.paste(layer, (0, 0), layer)
    d = ImageDraw.Draw(img)
    if f["Human"]:  # a person at the side: skin-toned head, shirt, arm reaching in
        hx, hr = w * 0.86, min(w, h) * 0.09
        d.rectangle([hx - 1.4 * hr, h * 0.45, hx + 1.4 * hr, h], fill=(40, 90, 170))
        d.ellipse([hx - hr, h * 0.45 - 2.1 * hr, hx + hr, h * 0.45 - 0.1 * hr], fill=(225, 180, 150))
        d.line([(hx - 1.2 * hr, h * 0.6), (w * 0.6, h * 0.7)], fill=(225, 180, 150), width=max(2, int(hr / 2)))
    if f["Occlusion"]:  # fence bars in front of the pet
        for x in np.linspace(w * 0.1, w * 0.9, 5):
            d.rectangle([x - w * 0.025, 0, x + w * 0.025, h], fill=(120, 85, 55))
    if f["Info"]:
        size = max(10, min(w, h) // 9)
        font = ImageFont.load_default(size=size)
        text = ["ADOPT ME", "CALL 555-0199", "NAME: MILO", "AGE 2 MONTHS"][int(rng.integers(0, 4))]
        d.rectangle([0, h - size * 1.6, w, h], fill=(255, 255, 255))
        d.text((4, h - size * 1.45), text, fill=(10, 10, 10), font=font)
    return img


def render(p: Pet) -> Image.Image:
    """The photo for one pet, deterministic in ``p.seed``."""
    rng = np.random.default_rng(p.seed)
    w, h = p.width, p.height
    if p.flags["Collage"]:  # a grid of photos of the same pet
        cols, rows = (2, 2) if rng.random() < 0.5 else (2, 1)
        img = Image.new("RGB", (w, h), (245, 245, 245))
        tw, th = w // cols, h // rows
        for i in range(cols * rows):
            tile = _draw_scene(tw - 4, th - 4, p, rng)
            img.paste(tile, ((i % cols) * tw + 2, (i // cols) * th + 2))
    else:
        img = _draw_scene(w, h, p, rng)
    if p.flags["Blur"]:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(2.0, 3.5)) * min(w, h) / 160))
    return img


def jpeg_bytes(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
