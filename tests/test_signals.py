"""Signal handlers owned by the process that installs them (rtdetr_common.signals)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from rtdetr_common.signals import owned_handler


def _forked_child_after_sigterm(handler, wait: float) -> int | None:
    """Installs ``handler`` for SIGTERM, forks a child that sleeps, sends it SIGTERM: the
    child's exit status within ``wait`` seconds, or None while it is still alive (then it is
    killed)."""
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        pid = os.fork()
        if pid == 0:  # the child: what a library's pool worker does while idle
            time.sleep(10)
            os._exit(0)
        time.sleep(0.2)
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return None
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("owned", [True, False])
def test_a_forked_child_ends_on_sigterm_instead_of_running_the_parents_handler(owned: bool) -> None:
    """The hazard and its cure: a child forked under a plain handler survives SIGTERM (its
    parent would wait for it forever at exit); under an owned one it ends at once."""
    calls: list[int] = []

    def record(signum, frame):
        calls.append(signum)
    status = _forked_child_after_sigterm(owned_handler(record) if owned else record,
                                         wait=5.0 if owned else 1.5)
    if owned:
        assert status == 128 + signal.SIGTERM
    else:
        assert status is None
    assert calls == []  # the parent itself received nothing


def test_the_installing_process_still_runs_its_handler() -> None:
    calls: list[int] = []
    previous = signal.signal(signal.SIGTERM, owned_handler(lambda signum, frame: calls.append(signum)))
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert calls == [signal.SIGTERM]
