"""Signal handlers owned by the process that installs them (rtdetr_common.signals)."""

from __future__ import annotations

import ctypes
import os
import signal
import time

import pytest

from rtdetr_common import signals

_LIBC = ctypes.CDLL(None, use_errno=True)


def _child_status_after_sigterm(install, blocked: bool, wait: float) -> int | None:
    """Installs a recording SIGTERM handler with ``install``, forks a child that either sleeps
    or blocks on a C mutex the parent held at fork (as a pool worker forked while another
    thread held a lock does), sends the child SIGTERM and returns its exit status within
    ``wait`` seconds, or None while it is still alive (then it is killed). The parent's own
    handler must not have run."""
    calls: list[int] = []
    previous = install(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    mutex = ctypes.create_string_buffer(64)  # a pthread_mutex_t, zeroed: unlocked, default kind
    try:
        _LIBC.pthread_mutex_lock(mutex)
        pid = os.fork()
        if pid == 0:
            if blocked:
                _LIBC.pthread_mutex_lock(mutex)  # never returns: held by the parent at fork
            time.sleep(10)
            os._exit(0)
        time.sleep(0.3)
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
        _LIBC.pthread_mutex_unlock(mutex)
        signal.signal(signal.SIGTERM, previous)
        assert calls == []


def _plain(signum, handler):
    return signal.signal(signum, handler)


def _owned_only(signum, handler):
    return signal.signal(signum, signals.owned_handler(handler))


@pytest.mark.parametrize("blocked", [False, True], ids=["idle", "blocked-on-a-lock"])
def test_a_forked_child_ends_on_sigterm(blocked: bool) -> None:
    """Under :func:`signals.install` a forked child takes SIGTERM's default action, even while
    blocked where no Python handler could run."""
    status = _child_status_after_sigterm(signals.install, blocked, wait=5.0)
    assert status == -signal.SIGTERM


@pytest.mark.parametrize("install, blocked", [(_plain, False), (_owned_only, True)],
                         ids=["plain-handler", "owned-handler-blocked"])
def test_the_hazard_without_the_reset(install, blocked: bool) -> None:
    """What the reset cures: a child forked under a plain handler runs it and lives on; one
    under an owned handler but without the at-fork reset lives on while blocked on a lock (its
    handler never gets to run). Its parent would wait for either at exit."""
    signals._OWNED.discard(signal.SIGTERM)
    assert _child_status_after_sigterm(install, blocked, wait=1.5) is None


def test_an_idle_child_under_an_owned_handler_ends_too() -> None:
    signals._OWNED.discard(signal.SIGTERM)
    assert _child_status_after_sigterm(_owned_only, False, wait=5.0) == 128 + signal.SIGTERM


def test_the_installing_process_still_runs_its_handler() -> None:
    calls: list[int] = []
    previous = signals.install(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert calls == [signal.SIGTERM]
