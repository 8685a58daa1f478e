"""A virtual environment at the lower bounds of requirements.txt, for what ``pawpular predict`` imports.

    python tests/lowest_env.py [FOLDER]      # builds (or reuses) FOLDER, prints its python

The oldest numpy, pandas, pyarrow, timm, pillow, safetensors, opencv, pyyaml and tqdm the project claims to support
(each ``name>=X`` of requirements.txt installed as ``name==X``), no scikit-learn, no albumentations, no Optuna;
torch and torchvision (and their own dependencies) are this interpreter's, linked in, not installed again: a
Kaggle image brings its own torch, and a 5 GB CUDA build per test run is no test of our bounds.

The default folder is in the user's cache (``~/.cache/pawpular/venv-lowest-<digest>``, as pip keeps its wheels
there), named by the digest of requirements.txt, this file and the Python version: a fresh clone reuses it instead
of installing again (22 s of the suite on 2 cores), and a change to either file builds a new one. Its links to torch
are made again on every use, to this interpreter's torch (another clone's may be gone); a lock keeps two test runs
from building it at once.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# What predict imports (distribution names as requirements.txt writes them); installed at their lower bounds.
AT_LOWER_BOUND = ("numpy", "pandas", "pyarrow", "pillow", "safetensors", "opencv-python-headless", "pyyaml", "tqdm")
NO_DEPS = ("timm",)  # its torch / torchvision requirement is met by the linked ones
LINKED = ("torch", "torchvision")  # with their requirements, less what is installed at a lower bound
NEVER = ("scikit-learn", "albumentations", "optuna", "scipy")


def lower_bounds(requirements: Path = REPO / "requirements.txt") -> dict[str, str]:
    """{distribution: X} for every ``name>=X`` line (comments and upper bounds ignored)."""
    found = {}
    for line in requirements.read_text().splitlines():
        m = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)", line.split("#", 1)[0])
        if m:
            found[m.group(1).lower()] = m.group(2)
    return found


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version.split("+")[0])[:4])


def lowest_release(python: Path, name: str, bound: str) -> str:
    """The oldest release of ``name`` that ``>= bound`` admits and this interpreter can install (``pip index``):
    ``opencv-python-headless>=4.9`` is 4.9.0.80, ``numpy>=1.26`` is 1.26.0."""
    listed = subprocess.run(
        [str(python), "-m", "pip", "index", "versions", name, "--disable-pip-version-check"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    versions = re.search(r"Available versions: (.*)", listed).group(1).split(", ")
    return min((v for v in versions if _release(v) >= _release(bound)), key=_release)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _link_closure(site: Path, skip: set[str]) -> None:
    """Symlink the installed files of LINKED and their requirements (less ``skip``) into ``site`` (a link to
    another install replaced; one already right left alone: a test run using it meanwhile is not disturbed)."""
    seen, todo = set(), list(LINKED)
    while todo:
        name = todo.pop()
        if _norm(name) in seen or _norm(name) in skip:
            continue
        seen.add(_norm(name))
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:  # a requirement for another Python (its marker does not hold here)
            continue
        todo += [re.match(r"[A-Za-z0-9_.\-]+", r).group(0) for r in dist.requires or [] if "extra ==" not in r]
        for top in {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            src, dst = Path(dist.locate_file(top)), site / top
            if not src.exists() or top.endswith(".pth") or top == "__pycache__":
                continue
            if dst.is_symlink() and dst.readlink() != src:
                dst.unlink()
            if not dst.exists() and not dst.is_symlink():
                dst.symlink_to(src)


def _stamp() -> str:
    found = (REPO / "requirements.txt").read_bytes() + Path(__file__).read_bytes() + sys.version.encode()
    return hashlib.sha256(found).hexdigest()


def default_folder() -> Path:
    """Where the environment lives: the user's cache, named by what it is built from."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "pawpular" / f"venv-lowest-{_stamp()[:16]}"


def _site(python: Path) -> Path:
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    return Path(subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout.strip())


def _relink(site: Path) -> None:
    """The links to LINKED (and their requirements) made to this interpreter's installs; broken ones removed."""
    for p in site.iterdir():
        if p.is_symlink() and not p.exists():
            p.unlink()
    installed = {_norm(p.name.split("-")[0]) for p in site.glob("*.dist-info")}  # what pip put there stays
    _link_closure(site, installed | {_norm(n) for n in AT_LOWER_BOUND})


def build(folder: Path | None = None) -> Path:
    """The environment's python: built if its stamp is not current, its torch links made again either way."""
    folder = Path(folder or default_folder())
    folder.parent.mkdir(parents=True, exist_ok=True)
    stamp, python = _stamp(), folder / "bin" / "python"
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test run building or relinking the same folder waits
        if not (python.is_file() and (folder / ".stamp").is_file() and (folder / ".stamp").read_text() == stamp):
            _install(folder, python)
        _relink(_site(python))
        (folder / ".stamp").write_text(stamp)
    return python


def _install(folder: Path, python: Path) -> None:
    bounds = lower_bounds()
    shutil.rmtree(folder, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    pins = [f"{name}=={lowest_release(python, name, bounds[name])}" for name in (*AT_LOWER_BOUND, *NO_DEPS)]
    constraints = folder / "constraints.txt"
    constraints.write_text("\n".join(pins[: len(AT_LOWER_BOUND)]) + "\n")
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "-c", str(constraints), *AT_LOWER_BOUND, "huggingface_hub"], check=True)
    subprocess.run([*pip, "--no-deps", *pins[len(AT_LOWER_BOUND) :]], check=True)


if __name__ == "__main__":
    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
