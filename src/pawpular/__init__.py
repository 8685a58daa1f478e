"""pawpular: the PetFinder Pawpularity pipeline (timm fine-tuning, cached embeddings, SVR head, OOF blend).

The Python API (``api.py``) is importable from here: ``pawpular.run``, ``status``, ``export``, ``predict``,
``report``; each raises on failure and returns the path it wrote; ``runs`` returns a DataFrame of experiments.
``import pawpular`` itself stays light (it loads torch only when one of them is called).
"""

__version__ = "0.2.0"
_API = ("run", "status", "export", "predict", "report", "runs")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'pawpular' has no attribute {name!r}")
