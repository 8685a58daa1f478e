"""Benchmark: the memory a photo's decode holds (bytes per decoded pixel, per image mode), and check-data's peak.

    python bench/decode_memory.py                 # 12 MP photos of every mode; check-data on 8 of them
    python bench/decode_memory.py --megapixels 4  # quicker

Writes its photos into a temporary folder and removes it; prints two tables. Each number is the peak resident
memory of a fresh process (``VmHWM`` of /proc/self/status: its own since exec; ``getrusage``'s ``ru_maxrss`` would
carry over the parent's resident size), less the same process's peak before the decode:

- per mode: ``pawpular.data.images.load_image`` of one photo (PNG of RGB, RGBA, LA, 16-bit and 8-bit grayscale, a
  palette with transparency, CMYK TIFF, RGB with an EXIF rotation), in bytes per decoded pixel. The largest is what
  ``images.PEAK_BYTES_PER_PIXEL`` rounds up.
- check-data: ``pawpular check-data`` on a competition whose 8 train photos are RGBA photos of that size, with
  ``PAWPULAR_MAX_PIXELS`` set to one photo's pixels (its 8 threads decode one at a time), two, and eight (all at
  once), less the same check on 20 small photos: each stays within ``PAWPULAR_MAX_PIXELS x PEAK_BYTES_PER_PIXEL``,
  the bound docs/data.md states.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PEAK = """
def peak_kib():  # this process's own peak resident memory since exec
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
"""
PROBE = (
    PEAK
    + """
import sys
from pawpular.data.images import load_image
base = peak_kib()
arr = load_image(sys.argv[1], min_side=64)
print((peak_kib() - base) * 1024 / (arr.shape[0] * arr.shape[1]))
"""
)
CHECK = (
    PEAK
    + """
import sys
from pawpular.cli.main import main as cli_main
import pawpular.data.tables, pawpular.data.images  # imported before the baseline is taken
base = peak_kib()
code = cli_main(["check-data", "--data", sys.argv[1]])
print(code, (peak_kib() - base) / 1024)
"""
)


def _photos(folder: Path, w: int, h: int) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 255, (h, w, 4), dtype=np.uint8)
    rotated = Image.Exif()
    rotated[0x0112] = 6
    made = {
        "RGB": (Image.fromarray(a[..., :3], "RGB"), {}),
        "RGBA": (Image.fromarray(a, "RGBA"), {}),
        "LA": (Image.fromarray(a[..., :2], "LA"), {}),
        "L": (Image.fromarray(a[..., 0], "L"), {}),
        "I;16": (Image.fromarray(a[..., 0].astype(np.uint16) * 257), {}),
        "P + transparency": (Image.fromarray(a[..., :3], "RGB").convert("P"), {"transparency": 0}),
        "RGB, EXIF rotated": (Image.fromarray(a[..., :3], "RGB"), {"exif": rotated}),
    }
    paths = {}
    for i, (name, (im, kw)) in enumerate(made.items()):
        paths[name] = folder / f"{i}.png"
        im.save(paths[name], compress_level=1, **kw)
    paths["CMYK (TIFF)"] = folder / "cmyk.tif"
    Image.fromarray(a[..., :3], "RGB").convert("CMYK").save(paths["CMYK (TIFF)"])
    return paths


def _run(code: str, *args: str, env: dict | None = None) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), **(env or {})}
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-2000:])
    return r.stdout.strip().splitlines()[-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--megapixels", type=float, default=12.0)
    args = p.parse_args()
    w = int(np.sqrt(args.megapixels * 1e6 * 4 / 3))
    h = int(args.megapixels * 1e6 / w)
    from pawpular.data.images import PEAK_BYTES_PER_PIXEL
    from pawpular.data.synthetic import make_synthetic

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        print(f"load_image of one {w}x{h} photo ({w * h / 1e6:.1f} MP), peak bytes per decoded pixel:")
        worst = 0.0
        for name, path in _photos(folder, w, h).items():
            per_pixel = float(_run(PROBE, str(path)))
            worst = max(worst, per_pixel)
            print(f"  {name:<20} {per_pixel:5.1f}")
        print(f"  {'largest':<20} {worst:5.1f}   (images.PEAK_BYTES_PER_PIXEL = {PEAK_BYTES_PER_PIXEL})")

        comp = make_synthetic(folder / "comp", n_train=20, n_test=1, seed=0)
        _, small = _run(CHECK, str(comp)).split()  # the same check on the small photos: CSVs, imports, threads
        rgba = Image.fromarray(np.random.default_rng(1).integers(0, 255, (h, w, 4), dtype=np.uint8), "RGBA")
        ids = sorted(p.stem for p in (comp / "train").iterdir())[:8]
        for i in ids:
            rgba.save(comp / "train" / f"{i}.jpg", format="PNG", compress_level=1)
        del rgba
        print(
            f"\ncheck-data, 8 train photos of {w * h / 1e6:.1f} MP RGBA (8 threads), peak MiB above the same "
            f"check with small photos ({float(small):.0f} MiB above the start):"
        )
        for n in (1, 2, 8):
            cap = n * w * h
            code, mib = _run(CHECK, str(comp), env={"PAWPULAR_MAX_PIXELS": str(cap)}).split()
            bound = cap * PEAK_BYTES_PER_PIXEL / 2**20
            print(
                f"  PAWPULAR_MAX_PIXELS = {n} photo(s) ({cap / 1e6:3.0f} MP): {float(mib) - float(small):6.0f} MiB"
                f"   (bound {bound:5.0f} MiB; exit {code})"
            )


if __name__ == "__main__":
    main()
