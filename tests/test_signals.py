"""Signal handlers owned by the process that installs them (rtdetr_common.signals).

The fork scenarios run in a fresh interpreter each: a child forked from a process that has
loaded Jittor must not catch signals at all (which is what the reset ensures)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from rtdetr_common import signals

# Installs a SIGTERM handler (``reset``: through signals.install, else signal.signal with an
# owned handler and no at-fork reset), forks a child that sleeps or blocks on a C mutex the
# parent held at fork (as a pool worker forked while another thread held a lock does), sends
# it SIGTERM and prints its exit status within WAIT seconds, or "alive" (then kills it).
_SCENARIO = textwrap.dedent("""
    import ctypes, os, signal, sys, time
    from rtdetr_common import signals
    reset, blocked, wait = sys.argv[1] == "reset", sys.argv[2] == "blocked", float(sys.argv[3])
    calls = []
    record = lambda signum, frame: calls.append(signum)
    if reset:
        signals.install(signal.SIGTERM, record)
    else:
        signal.signal(signal.SIGTERM, signals.owned_handler(record))
    libc = ctypes.CDLL(None)
    mutex = ctypes.create_string_buffer(64)  # a zeroed pthread_mutex_t: unlocked
    libc.pthread_mutex_lock(mutex)
    pid = os.fork()
    if pid == 0:
        if blocked:
            libc.pthread_mutex_lock(mutex)  # never returns: held by the parent at fork
        time.sleep(10)
        os._exit(0)
    time.sleep(0.3)
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            print(os.waitstatus_to_exitcode(status), calls)
            sys.exit(0)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    print("alive", calls)
""")


def _scenario(reset: bool, blocked: bool, wait: float) -> str:
    out = subprocess.run([sys.executable, "-c", _SCENARIO, "reset" if reset else "owned",
                          "blocked" if blocked else "idle", str(wait)],
                         capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.strip()


@pytest.mark.parametrize("blocked", [False, True], ids=["idle", "blocked-on-a-lock"])
def test_a_forked_child_ends_on_sigterm(blocked: bool) -> None:
    """Under :func:`signals.install` a forked child takes SIGTERM's default action, even while
    blocked where no Python handler could run; the parent's handler never runs."""
    assert _scenario(reset=True, blocked=blocked, wait=5.0) == f"{-signal.SIGTERM} []"


def test_the_hazard_without_the_reset() -> None:
    """What the reset cures: a child forked under an owned handler without the at-fork reset
    ends on SIGTERM while idle (its handler runs), but lives on while blocked on a lock (a
    Python handler runs only when the interpreter gets control): its parent would wait for it
    at exit."""
    assert _scenario(reset=False, blocked=False, wait=5.0) == f"{128 + signal.SIGTERM} []"
    assert _scenario(reset=False, blocked=True, wait=1.5) == "alive []"


def test_the_installing_process_still_runs_its_handler() -> None:
    calls: list[int] = []
    previous = signals.install(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert calls == [signal.SIGTERM]
