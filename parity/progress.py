"""Phases of a long command on the screen, and everything else in a log file.

A :class:`Progress` announces a fixed list of phases. Each phase gets one line on the screen,
``[i/N] what ... done in X s``, with a tqdm bar while it runs where it has countable steps
(:meth:`Progress.advance`, or :meth:`Progress.update` as a ``(done, total)`` callback) and an
estimate of the time left, taken from the phase times of the last run with the same key.

Quiet mode (a log file and not ``verbose``) points the process's file descriptors 1 and 2 at
the log for the whole command: Jittor's compiler writes its ``[i ...]``/``[w ...]`` lines and
its "Compiling Operators" progress from C++ straight to those descriptors (its ``log_silent``
switch drops warnings instead of keeping them and leaves the compile progress on stderr), so
only descriptor-level redirection keeps them, child processes' output and Python's own
prints off the screen. The phase lines go to a duplicate of the original descriptor 1. If the
command fails, the phase is marked failed and the log's last lines are shown.

    with Progress(["build models", "compare"], log=log_file("check")) as progress:
        progress.phase("build models")
        ...
        progress.phase("compare", total=len(items))
        for item in items:
            ...
            progress.advance()
    print(summary)  # after the block: back on the terminal
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

from rtdetr_common.weights import atomic_write


def default_log_dir() -> Path:
    """``<repo>/runs/logs`` in a source checkout, else ``runs/logs`` in the working folder."""
    repo = Path(__file__).resolve().parents[1]
    if (repo / "pyproject.toml").is_file():
        return repo / "runs" / "logs"
    return Path("runs") / "logs"


def log_file(command: str, folder: Path | None = None, keep: int = 20) -> Path:
    """A new log path ``<folder>/<command>-<UTC timestamp>.log`` (folder: :func:`default_log_dir`).

    The command's older logs beyond the newest ``keep - 1`` are deleted.
    """
    folder = folder or default_log_dir()
    old = sorted(folder.glob(f"{command}-*.log"))
    for path in old[:max(len(old) - (keep - 1), 0)]:
        path.unlink(missing_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    return folder / f"{command}-{stamp}.log"


def format_seconds(seconds: float) -> str:
    """``41.2 s``, ``3 min 05 s`` or ``1 h 02 min``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _real_fd(stream: TextIO) -> int | None:
    """The file descriptor behind a stream, or None for in-memory streams (pytest's capsys)."""
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None


class Progress:
    """The phases of one command: their screen lines, bars, time estimates and quiet log.

    Args:
        phases: The names of the phases, in the order they run.
        log: Log file for everything the command prints besides the phase lines (its folder
            is created; appended to). None: nothing is redirected.
        verbose: Leave everything on the screen and write no log (phase lines still printed,
            one at the start and one at the end of each phase, no bars).
        history: JSON file of the phase times of earlier runs, keyed by ``key``; read for the
            estimate of the time left and updated after a successful run. None: no estimate
            beyond a running phase's own bar.
        key: Which earlier runs are comparable (e.g. the command line without output paths).
        screen: Where the phase lines go. None: a duplicate of descriptor 1 when ``sys.stdout``
            writes to it, else ``sys.stdout`` itself.

    Raises:
        ValueError: On an empty or duplicated phase list.
    """

    def __init__(self, phases: list[str], log: Path | None = None, verbose: bool = False,
                 history: Path | None = None, key: str = "", screen: TextIO | None = None) -> None:
        if not phases or len(set(phases)) != len(phases):
            raise ValueError(f"phases must be distinct names, got {phases!r}")
        self.phases = list(phases)
        self.log = None if log is None else Path(log)
        self.quiet = self.log is not None and not verbose
        self.verbose = verbose
        self.history = None if history is None else Path(history)
        self.key = key
        self.seconds: dict[str, float] = {}
        self._screen_arg = screen
        self.screen: TextIO = screen or sys.stdout
        self._owned_screen = False
        self._saved: tuple[int, int] | None = None
        self._log_fd: int | None = None
        self._current: str | None = None
        self._phase_start = 0.0
        self._bar: tqdm | None = None
        self._start = 0.0
        self._estimates = self._read_history()

    # --- the command as a whole ---------------------------------------------------------------
    def __enter__(self) -> Progress:
        self._start = time.perf_counter()
        if self.quiet:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            self._log_fd = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if self._screen_arg is None and self.quiet and _real_fd(sys.stdout) == 1:
            self.screen = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8",
                                    errors="replace")
            self._owned_screen = True
        if self.quiet:
            sys.stdout.flush()
            sys.stderr.flush()
            self._saved = (os.dup(1), os.dup(2))
            os.dup2(self._log_fd, 1)
            os.dup2(self._log_fd, 2)
        if self._log_fd is not None:
            os.write(self._log_fd, f"=== {' '.join(sys.argv)}\n=== started "
                     f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC\n".encode())
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        failed = exc_type is not None and not issubclass(exc_type, SystemExit)
        try:
            if self._current is not None:
                self._close_phase(failed)
        finally:
            self._restore()
        if failed and self.quiet and self.log is not None:
            self._write(f"the last lines of the log {self.log}:\n{self.tail()}\n")
        if not failed and len(self.seconds) == len(self.phases):
            self._write_history()
        if self._owned_screen:
            self.screen.close()
            self.screen = sys.stdout
            self._owned_screen = False
        return False

    @property
    def elapsed(self) -> float:
        """Seconds since the command started."""
        return time.perf_counter() - self._start

    def tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of the log (empty without a log)."""
        if self.log is None or not self.log.is_file():
            return ""
        text = self.log.read_bytes()[-64 * 1024:].decode("utf-8", errors="replace")
        return "\n".join(text.replace("\r", "\n").splitlines()[-lines:])

    # --- phases --------------------------------------------------------------------------------
    def phase(self, what: str, total: int | None = None) -> Progress:
        """Ends the running phase (its ``done in`` line) and starts ``what``.

        Args:
            what: One of the announced phase names, after the running one.
            total: Countable steps of the phase (a bar), or None.

        Raises:
            ValueError: On a name not announced, or one that already ran.
        """
        if what not in self.phases:
            raise ValueError(f"unknown phase {what!r}; announced: {self.phases}")
        if what in self.seconds or what == self._current:
            raise ValueError(f"phase {what!r} already ran")
        if self._current is not None:
            self._close_phase(False)
        self._current, self._phase_start = what, time.perf_counter()
        label = self._label(what)
        left = self._left()
        note = f" (about {format_seconds(left)} left)" if left is not None else ""
        self._log_line(f"{label} ...{note}")
        if self.verbose:
            self._write(f"{label} ...{note}\n")
        elif self._bars():
            self._write(f"{label} ...{note}")
            if total is not None:
                self._open_bar(label, total)
        else:
            self._write(f"{label} ...")
            if total is not None:
                self._open_bar(label, total)
        return self

    def advance(self, steps: int = 1) -> None:
        """Counts ``steps`` more steps of the running phase."""
        if self._bar is not None:
            self._bar.update(steps)

    def update(self, done: int, total: int) -> None:
        """Sets the running phase's count (a ``(done, total)`` progress callback)."""
        if self._current is None:
            return
        if self._bar is None:
            self._open_bar(self._label(self._current), total)
        if self._bar is None:
            return
        if self._bar.total != total:
            self._bar.total = total
        self._bar.n = done
        self._bar.refresh()

    def _label(self, what: str) -> str:
        return f"[{self.phases.index(what) + 1}/{len(self.phases)}] {what}"

    def _bars(self) -> bool:
        isatty = getattr(self.screen, "isatty", None)
        return not self.verbose and bool(isatty and isatty())

    def _open_bar(self, label: str, total: int) -> None:
        if not self._bars():
            return
        self._bar = tqdm(total=total, desc=label, file=self.screen, leave=False,
                         dynamic_ncols=True, unit="step",
                         bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                                    "[{elapsed}<{remaining}]")

    def _close_phase(self, failed: bool) -> None:
        what, took = self._current, time.perf_counter() - self._phase_start
        self._current = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if not failed:
            self.seconds[what] = took
        status = f"FAILED after {format_seconds(took)}" if failed else f"done in {format_seconds(took)}"
        left = None if failed else self._left()
        note = f" (about {format_seconds(left)} left)" if left is not None else ""
        line = f"{self._label(what)} ... {status}{note}"
        self._log_line(line)
        if self._bars():
            self._write(f"\r\x1b[K{line}\n")
        elif self.verbose:
            self._write(f"{line}\n")
        else:
            self._write(f" {status}{note}\n")

    def _left(self) -> float | None:
        """Estimated seconds left: the earlier run's times of the phases not yet done."""
        todo = [p for p in self.phases if p not in self.seconds]
        if not todo or any(p not in self._estimates for p in todo):
            return None
        return sum(self._estimates[p] for p in todo)

    # --- output --------------------------------------------------------------------------------
    def _write(self, text: str) -> None:
        self.screen.write(text)
        self.screen.flush()

    def _log_line(self, text: str) -> None:
        if self._log_fd is not None:
            os.write(self._log_fd, f"\n=== {text}\n".encode())

    def _restore(self) -> None:
        if self._saved is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(self._saved[0], 1)
            os.dup2(self._saved[1], 2)
            os.close(self._saved[0])
            os.close(self._saved[1])
            self._saved = None
        if self._log_fd is not None:
            os.close(self._log_fd)
            self._log_fd = None

    # --- history -------------------------------------------------------------------------------
    def _read_history(self) -> dict[str, float]:
        if self.history is None or not self.history.is_file():
            return {}
        try:
            return dict(json.loads(self.history.read_text()).get(self.key, {}))
        except (ValueError, AttributeError, TypeError):
            return {}  # an unreadable history only costs the estimate

    def _write_history(self) -> None:
        if self.history is None:
            return
        try:
            data = json.loads(self.history.read_text()) if self.history.is_file() else {}
            if not isinstance(data, dict):
                data = {}
        except ValueError:
            data = {}
        data[self.key] = {p: round(s, 3) for p, s in self.seconds.items()}
        self.history.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.history, lambda tmp: tmp.write_text(json.dumps(data, indent=1)))
