"""Ctrl-C, taken once: the command line's SIGINT handler marks it here before it raises KeyboardInterrupt, so that
a long loop raises it again where the first was lost. Python drops an exception raised inside a finalizer (a
database cursor's or connection's ``__del__`` run by the garbage collector, where a signal handler may run too):
such a KeyboardInterrupt would leave the command running with later presses ignored."""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator

_pending = False


def mark() -> None:
    """Ctrl-C was pressed: every later ``check`` raises KeyboardInterrupt."""
    global _pending
    _pending = True


def reset() -> None:
    """A new command (the command line's handler installed): no Ctrl-C pending."""
    global _pending
    _pending = False


def check() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed (its first KeyboardInterrupt may have been lost)."""
    if _pending:
        raise KeyboardInterrupt


def quiet_unraisable(unraisable: sys.UnraisableHookArgs) -> None:
    """``sys.unraisablehook``: a KeyboardInterrupt lost in a finalizer is no fault to print (``check`` raises it
    again); anything else is printed as Python does."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt):
        mark()
        return
    sys.__unraisablehook__(unraisable)


def on_sigint(signum: int, frame: object) -> None:
    """Ctrl-C: one KeyboardInterrupt; presses after it are ignored while the command cleans up (locks released,
    temporary files swept) and the interpreter's exit handlers run (trackers, torch), so one line is all it says."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    mark()  # if a library loses this KeyboardInterrupt, the next interrupts.check raises it again
    raise KeyboardInterrupt


@contextlib.contextmanager
def interrupt_once() -> Iterator[None]:
    """Around one command: Ctrl-C raises KeyboardInterrupt once (``on_sigint``), and one lost in a finalizer is
    neither printed nor forgotten (``quiet_unraisable``)."""
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:  # ignored (a background job), or a
        yield  # caller's own handler: left as it is
        return
    try:
        previous = signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread: nothing to install
        yield
        return
    reset()
    hook, sys.unraisablehook = sys.unraisablehook, quiet_unraisable
    try:
        yield
    finally:
        sys.unraisablehook = hook
        if signal.getsignal(signal.SIGINT) is on_sigint:  # not interrupted: as it was (an in-process caller)
            signal.signal(signal.SIGINT, previous)
