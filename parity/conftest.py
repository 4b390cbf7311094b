"""The fault catalogue's default-tier run goes to a spawned process when the session starts.

The catalogue's tests of the default tier (``test_catalogue_fault_is_caught`` at the fast
tier) are moved to the end of the session, and the faults they select are run meanwhile by a
second process, beside the other tests. The tests then read that process's results
(``background_catalogue``). While that process runs on its one thread, the session's own torch
and OpenMP threads are the remaining cores, and they are given back before the first test that
starts after it has finished. A session that selects none of them starts nothing.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import Future, ProcessPoolExecutor

import pytest

CATALOGUE_TEST = "test_catalogue_fault_is_caught"
_RUNS = pytest.StashKey[dict]()
_POOL = pytest.StashKey[ProcessPoolExecutor]()
_THREADS = pytest.StashKey[tuple]()


def _worker_setup() -> None:
    """The worker's numerics as the session's (deterministic), on one thread of its own (torch
    and the OpenMP of Jittor's kernels); the numeric warnings of the injected faults (a
    logarithm of a swapped size) stay quiet."""
    import warnings

    import torch

    from parity.faults import set_threads

    set_threads(1)
    torch.use_deterministic_algorithms(True)
    warnings.filterwarnings("ignore", category=RuntimeWarning)


def _background_run(item: pytest.Item) -> tuple | None:
    """``(variant, size, tier)`` of a default-tier catalogue test, else None."""
    if getattr(item, "originalname", None) != CATALOGUE_TEST or item.get_closest_marker("slow"):
        return None
    run = item.callspec.params.get("runner")
    return tuple(run) if run is not None and run[2] == "fast" else None


@pytest.hookimpl(trylast=True)  # after the selection by -m / -k and the fixture ordering
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    runs: dict[tuple, list[str]] = {}
    for item in items:
        run = _background_run(item)
        if run is not None:
            runs.setdefault(run, []).append(item.callspec.params["fault"].id)
    if not runs:
        return
    items[:] = ([i for i in items if _background_run(i) is None]
                + [i for i in items if _background_run(i) is not None])
    if config.option.collectonly:
        return
    from parity.faults import _run_part

    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_setup)
    config.stash[_POOL] = pool
    config.stash[_RUNS] = {run: pool.submit(_run_part, run[0], run[1], run[2], ids, None, 80)
                           for run, ids in runs.items()}
    from parity.faults import set_threads

    config.stash[_THREADS] = set_threads(max(1, (os.cpu_count() or 1) - 1))
    config.pluginmanager.register(_ThreadsBack(config), "background-catalogue-threads")


class _ThreadsBack:
    """Gives the session its threads back once the background catalogue has finished (a plugin,
    so that it sees the tests of every folder)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        give_threads_back(self.config)


def give_threads_back(config: pytest.Config, finished_only: bool = True) -> None:
    """The session's threads as they were before the background catalogue started, once every
    one of its runs is done (at once with ``finished_only=False``)."""
    before = config.stash.get(_THREADS, None)
    if before is None:
        return
    if finished_only and not all(f.done() for f in config.stash[_RUNS].values()):
        return
    from parity.faults import set_threads

    set_threads(*before)
    del config.stash[_THREADS]


def background_catalogue(config: pytest.Config, run: tuple) -> Future | None:
    """The spawned process's ``(baseline, results)`` of ``run``, if the session started it."""
    return config.stash.get(_RUNS, {}).get(tuple(run))


def pytest_sessionfinish(session: pytest.Session) -> None:
    give_threads_back(session.config, finished_only=False)
    pool = session.config.stash.get(_POOL, None)
    if pool is None:
        return
    if all(f.done() for f in session.config.stash[_RUNS].values()):
        pool.shutdown()
        return
    processes = list((pool._processes or {}).values())  # a run cut short is not waited for
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
        process.join(10)
