"""Signal handlers that belong to the process that installs them."""

from __future__ import annotations

import os
import signal
from typing import Any, Callable

Handler = Callable[[int, Any], Any]

# The signals this process installed owned handlers for; a forked child resets them.
_OWNED: set[int] = set()


def _defaults_in_child() -> None:
    """In a process just forked (a library's worker pool: Jittor compiles in one), the signals
    this module handles take their default actions again. A Python handler runs only when the
    interpreter gets control, so a worker blocked on a lock it inherited held would ignore the
    SIGTERM its pool stops it with, and its parent would wait for it at exit."""
    for signum in _OWNED:
        try:
            signal.signal(signum, signal.SIG_DFL)
        except ValueError:  # forked from a thread other than the main one
            pass


os.register_at_fork(after_in_child=_defaults_in_child)


def owned_handler(handler: Handler) -> Handler:
    """``handler`` for the calling process only: a process forked from it ends at once on the
    signal, as the default action would, instead of running the parent's handler."""
    owner = os.getpid()

    def handle(signum: int, frame: Any) -> Any:
        if os.getpid() != owner:
            os._exit(128 + signum)
        return handler(signum, frame)
    return handle


def install(signum: int, handler: Handler) -> Any:
    """Installs ``handler`` for ``signum`` in this process only (:func:`owned_handler`; a
    forked child takes the default action from its first instruction on); returns the
    previous handler, for :func:`signal.signal` to restore.

    System calls the signal interrupts are restarted (``siginterrupt(signum, False)``): a
    library's blocking call (Jittor waiting on its compile lock) then does not fail with EINTR;
    the handler runs all the same.
    """
    _OWNED.add(signum)
    previous = signal.signal(signum, owned_handler(handler))
    signal.siginterrupt(signum, False)
    return previous


class StopOnSignal:
    """Turns SIGTERM / SIGINT into a request to stop after the current step.

    Inside the ``with`` block the first SIGTERM or SIGINT only records itself in
    :attr:`signum`; the training loop checks it after each step, writes a checkpoint and
    returns. A second SIGINT raises ``KeyboardInterrupt`` at once. The previous handlers come
    back on exit. Outside the main thread (where Python cannot install handlers) it does nothing.

    Attributes:
        signum: The signal received, or None.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: object) -> None:
        if signum == signal.SIGINT and self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    @property
    def name(self) -> str:
        """Name of the received signal (empty when none)."""
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def __enter__(self) -> "StopOnSignal":
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = install(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
