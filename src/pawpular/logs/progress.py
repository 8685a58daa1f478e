"""Progress that shows wherever a long job runs: a terminal, a Jupyter cell, or a log file.

- In a terminal: a tqdm bar (stderr). In a Jupyter kernel: a notebook bar when ipywidgets is installed, else a
  text bar (no "IProgress not found" warning).
- Anywhere else (piped output: a Kaggle "save & run all" commit, ``nohup``, ``| tee log``): no bar, but a log
  line every ``PAWPULAR_PROGRESS_SECONDS`` seconds (default 30) with the count, rate, ETA and the loop's own
  numbers (loss, lr, ...), and one at the end.

    for batch in (bar := Progress(loader, "fold 0 epoch 1/5", unit="img", scale=batch_size)):
        ...
        bar.set(loss=f"{loss:.4f}")

    with Progress(total=30, desc="svr trials", unit="trial") as bar:   # manual updates
        bar.update()
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from ..store.errors import env_number
from ..store.masking import redact_url

log = logging.getLogger("pawpular")


def _masked(record: logging.LogRecord) -> bool:
    """A log record with every URL password masked (``masking.redact_url``): its message, and the traceback
    (``-v``, ``exc_info``) and stack it carries, formatted here so that no handler formats them unmasked."""
    message = record.getMessage()
    if "://" in message:
        record.msg, record.args = redact_url(message, "***"), None
    if record.exc_info and not record.exc_text:
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    if record.exc_text:
        record.exc_text = redact_url(record.exc_text, "***")
    if record.stack_info:
        record.stack_info = redact_url(record.stack_info, "***")
    return True


log.addFilter(_masked)


def _not_interrupt_noise(record: logging.LogRecord) -> bool:
    """False for a library's log line about an error that Ctrl-C caused (e.g. SQLAlchemy's "Error closing cursor"
    when the interrupt landed inside a query): the interrupt has its own line, and that traceback is no fault."""
    exc = record.exc_info[1] if record.exc_info else None
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, KeyboardInterrupt):
            return record.name.startswith("pawpular")
        exc, seen = exc.__context__ or exc.__cause__, seen + 1
    return True


def setup_logging(verbose: bool) -> None:
    """The log the user reads: time-stamped lines on stderr (debug with -v), third-party chatter at warnings only."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in ("PIL", "matplotlib", "timm", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:  # a library's own log lines (optuna, SQLAlchemy) masked too
        for check in (_not_interrupt_noise, _masked):
            if check not in handler.filters:
                handler.addFilter(check)


def in_notebook() -> bool:
    """True inside a Jupyter/IPython kernel (where stderr is not a terminal but output is seen)."""
    shell = sys.modules.get("IPython")
    try:
        ip = shell.get_ipython() if shell else None  # type: ignore[union-attr]
    except Exception:
        return False
    return ip is not None and "IPKernelApp" in getattr(ip, "config", {})


def _bar_class() -> Any:
    """tqdm's class for where we are, or None when no bar can render (plain log lines then)."""
    if os.environ.get("PAWPULAR_NO_BARS"):
        return None
    if in_notebook():
        try:
            import ipywidgets  # noqa: F401
            from tqdm.notebook import tqdm
        except ImportError:
            from tqdm.std import tqdm
        return tqdm
    if sys.stderr.isatty():
        from tqdm.std import tqdm

        return tqdm
    return None


def clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
    """Progress over ``iterable`` (or ``total`` manual updates): a bar where one renders, else log lines."""

    def __init__(
        self,
        iterable: Iterable | None = None,
        desc: str = "",
        total: int | None = None,
        unit: str = "it",
        scale: int = 1,
        every: float | None = None,
        quiet: bool = False,
    ):
        self.iterable = iterable
        self.desc = desc
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total = total
        self.unit = unit
        self.scale = scale  # units per item (images per batch)
        self.every = env_number("PAWPULAR_PROGRESS_SECONDS", 30.0, float, None) if every is None else every
        self.quiet = quiet  # under torchrun only rank 0 shows progress
        self.metrics: dict[str, Any] = {}
        self.bar: Any = None
        self.done, self.t0, self.last, self.logged = 0, 0.0, 0.0, False
        self.logged_at = -1  # the count of the last line logged: the closing line is not that line again

    def __enter__(self) -> Progress:
        self.t0 = self.last = time.time()
        bar_class = None if self.quiet else _bar_class()
        if bar_class is not None:
            self.bar = bar_class(desc=self.desc, total=self.total, leave=False, mininterval=1.0)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.logged and self.logged_at != self.done:
            log.info("%s", self.line())

    def __iter__(self) -> Iterator:
        with self:
            for item in self.iterable or ():
                yield item
                self.update()

    def set(self, **metrics: Any) -> None:
        """Numbers to show beside the count (the bar's postfix, or the log line's tail)."""
        self.metrics.update(metrics)
        if self.bar is not None:
            self.bar.set_postfix(self.metrics, refresh=False)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif not self.quiet and self.every >= 0 and time.time() - self.last >= self.every:
            log.info("%s", self.line())
            self.last, self.logged, self.logged_at = time.time(), True, self.done

    def line(self) -> str:
        elapsed = max(time.time() - self.t0, 1e-9)
        head = f"{self.desc}: {self.done}" + (
            f"/{self.total} ({100 * self.done / self.total:.0f}%)" if self.total else ""
        )
        parts = [head, f"{self.done * self.scale / elapsed:.1f} {self.unit}/s"]
        if self.total and self.done < self.total:
            parts.append(f"ETA {clock((self.total - self.done) * elapsed / max(self.done, 1))}")
        else:
            parts.append(f"took {clock(elapsed)}")
        return ", ".join(parts + [f"{k} {v}" for k, v in self.metrics.items()])


def progress(iterable: Iterable, desc: str = "", total: int | None = None, unit: str = "it") -> Progress:
    return Progress(iterable, desc, total, unit)
