"""The libraries inference rests on: their versions where an export was made, here, and which differences break it.

``export`` records ``installed()``; ``predict`` logs every library whose version differs (both sides) and fails,
with the reason, only where the difference is known to break:

- a library older than the oldest this package supports (``MINIMUM``: requirements.txt's lower bounds, which a test
  keeps equal, and which CI runs predict at) or missing;
- a model's weights that do not fit the architecture as this timm builds it (timm renames parameters between
  releases): ``model_file.load_model_file`` names both timm versions.

Nothing else is version-bound: an export holds no pickle (models and SVR heads are safetensors arrays, settings
JSON and YAML), so Python, numpy, pandas and torch may differ.
"""

from __future__ import annotations

import importlib
import logging
import platform
import re

from ..store.files import ArtifactError

log = logging.getLogger("pawpular")

# name in an export's manifest -> the module whose __version__ it is
MODULES = {
    "torch": "torch",
    "timm": "timm",
    "numpy": "numpy",
    "pandas": "pandas",
    "safetensors": "safetensors",
    "pillow": "PIL",
    "opencv": "cv2",
    "pyyaml": "yaml",
    "tqdm": "tqdm",
}
# The oldest versions supported (requirements.txt's lower bounds for these): tests/test_versions.py checks the two
# agree; tests/test_predict.py::test_predict_at_the_lowest_supported_versions runs predict in an environment built
# at these (tests/lowest_env.py).
MINIMUM = {
    "torch": "2.4",
    "timm": "1.0.15",
    "numpy": "1.26",
    "pandas": "2.2",
    "safetensors": "0.4",
    "pillow": "10.3",
    "opencv": "4.9",
    "pyyaml": "6",
    "tqdm": "4.66",
}
# requirements.txt names these by their distribution name
REQUIREMENT_NAMES = {"pillow": "pillow", "opencv": "opencv-python-headless", "pyyaml": "pyyaml"}


class VersionError(ArtifactError):
    """A library here that the export cannot run with (missing, or older than pawpular supports)."""


def parse(version: str) -> tuple[int, ...]:
    """'2.14.1+cu130' -> (2, 14, 1); '1.0.15.dev0' -> (1, 0, 15): the leading numbers of each part."""
    parts = []
    for part in version.split("+")[0].split("."):
        m = re.match(r"\d+", part)
        if not m:
            break
        parts.append(int(m.group()))
    return tuple(parts)


def installed() -> dict[str, str]:
    """Python's version and each library's (``missing`` when it does not import)."""
    found = {"python": platform.python_version()}
    for name, module in MODULES.items():
        try:
            found[name] = str(importlib.import_module(module).__version__)
        except ImportError:
            found[name] = "missing"
    return found


def check(recorded: dict[str, str], here: dict[str, str] | None = None) -> list[str]:
    """Compare the export's versions with this machine's: returns one line per difference (logged); raises
    VersionError where one is known to break (a library missing or older than ``MINIMUM``)."""
    here = here or installed()
    differ = [
        f"{name} {recorded.get(name, '?')} (export) vs {here.get(name, '?')} (here)"
        for name in sorted(set(recorded) | set(here))
        if recorded.get(name) != here.get(name)
    ]
    if differ:
        log.warning(
            "predict: library versions differ from the export's: %s. Only a library older than pawpular "
            "supports, or weights timm names otherwise, break it; the rest only rounds differently",
            "; ".join(differ),
        )
    too_old = [n for n, low in MINIMUM.items() if here.get(n) == "missing" or parse(here.get(n, low)) < parse(low)]
    if too_old:
        why = [
            f"{n} is missing"
            if here[n] == "missing"
            else f"{n} {here[n]} is older than {MINIMUM[n]}, the oldest pawpular supports"
            for n in too_old
        ]
        made = ", ".join(f"{n} {recorded.get(n, '?')}" for n in too_old)
        fix = " ".join(f"'{REQUIREMENT_NAMES.get(n, n)}>={MINIMUM[n]}'" for n in too_old)
        raise VersionError(
            f"predict cannot run here: {'; '.join(why)} (the export was made with {made}): pip install {fix}"
        )
    return differ
