"""Training in several processes on this CPU: 2 processes (torch: DistributedDataParallel with
the gloo backend under ``torchrun``; Jittor: MPI under ``mpirun``) against 1 process with the
same global batch, with a process whose shard of the first batch holds no boxes (denoising on);
a SIGTERM to one process stops both at the same step, and the run resumes exactly, with 2
processes or with 1.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from parity.tolerances import tolerance
from rtdetr_common import distributed
from rtdetr_common.pipeline.loader import DataLoader
from rtdetr_common.run_log import read_log
from rtdetr_common.train_config import TrainConfig, open_split, train_loader
from tests.test_trainer import FRAMEWORKS, LOSS_RTOL, REPO, RUN_TIMEOUT, SUFFIX, _weights

NUM_TRAIN, BATCH, EPOCHS, SIZE, PROCESSES = 12, 4, 1, 128, 2
STEPS = NUM_TRAIN // BATCH * EPOCHS
# 2 processes against 1 (see the ``process`` entries of parity/tolerances.py)
PROCESS_LOSS_RTOL = tolerance("process", "loss").rtol
PROCESS_WEIGHTS = tolerance("process", "weights").max_rel_l2


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            # OpenMPI in a container: as root, and without cross-memory attach
            "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
            "OMPI_MCA_btl_vader_single_copy_mechanism": "none"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(framework: str, processes: int, args: list[str]) -> list[str]:
    """The command line that runs ``rtdetr-parity ARGS`` in ``processes`` processes."""
    cli = ["-m", "parity.cli", *args]
    if processes == 1:
        return [sys.executable, *cli]
    if framework == "torch":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *cli]
    mpirun = shutil.which("mpirun")
    assert mpirun, "mpirun not found: scripts/setup.sh installs Debian's openmpi-bin"
    return [mpirun, "-np", str(processes), "--oversubscribe", "--bind-to", "none",
            sys.executable, *cli]


def _train_args(framework: str, data: dict, out: Path) -> list[str]:
    return ["train", "--framework", framework, "--dataset", str(data["dataset"]), "--out", str(out),
            "--size", str(SIZE), "--batch-size", str(BATCH), "--epochs", str(EPOCHS),
            "--eval-every", "0", "--ema-warmups", "10", "--threads", "1",
            "--init-weights", str(data["init"])]


def _first_batch(dataset_len: int) -> np.ndarray:
    """Dataset indices of the first global batch of the runs (the loader's order, seed 0)."""
    order = DataLoader(list(range(dataset_len)), BATCH, shuffle=True, drop_last=True, seed=0)
    return order.batch_indices(0)[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """A tiny dataset whose first global batch has no boxes in process 1's shard, and shared
    initial weights."""
    from rtdetr_common.synthetic import make_dataset

    base = tmp_path_factory.mktemp("distributed")
    dataset = make_dataset(base / "data", num_train=NUM_TRAIN, num_val=4, num_classes=3,
                           min_size=96, max_size=160)
    coco = json.loads(dataset.train_ann.read_text())
    ids = sorted(image["id"] for image in coco["images"])
    empty = {ids[i] for i in _first_batch(len(ids))[BATCH // PROCESSES:]}
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] not in empty]
    dataset.train_ann.write_text(json.dumps(coco))
    init = base / "init.safetensors"
    done = subprocess.run([sys.executable, "-m", "parity.cli", "init-weights", str(init), "--dataset",
                           str(dataset.root), "--size", str(SIZE)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"base": base, "dataset": dataset.root, "init": init, "empty": empty}


_RUNS: dict[tuple[str, int], Path] = {}


def _run(framework: str, processes: int, data: dict) -> Path:
    """Output folder of an uninterrupted run (each made once)."""
    key = (framework, processes)
    if key not in _RUNS:
        out = data["base"] / f"{framework}-{processes}"
        done = subprocess.run(launch(framework, processes, _train_args(framework, data, out)),
                              cwd=REPO, env=_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
        assert done.stdout.count("training complete") == 1  # process 0 speaks for all
        _RUNS[key] = out
    return _RUNS[key]


def _losses(out: Path) -> list[dict]:
    return [{k: v for k, v in e.items() if k != "seconds"} for e in read_log(out / "log.jsonl")]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _model_rel(found: dict, expected: dict) -> float:
    """Relative L2 of all model and EMA floats together."""
    keys = sorted(k for k in expected if k.split("/")[0] in ("model", "ema")
                  and np.issubdtype(expected[k].dtype, np.floating))
    return _rel(np.concatenate([found[k].ravel() for k in keys]),
                np.concatenate([expected[k].ravel() for k in keys]))


def test_shards_of_every_rank_make_the_global_batch(data) -> None:
    cfg = TrainConfig(dataset=str(data["dataset"]), size=SIZE, batch_size=BATCH,
                      multi_scale=[128, 160]).resolved()
    dataset = open_split(cfg, "train", True)
    whole = list(train_loader(cfg, dataset, dataset.category_map))
    shards = [list(train_loader(cfg, dataset, dataset.category_map, rank, PROCESSES))
              for rank in range(PROCESSES)]
    assert len(whole) == NUM_TRAIN // BATCH and all(len(s) == len(whole) for s in shards)
    for b, batch in enumerate(whole):
        parts = [s[b] for s in shards]
        assert np.array_equal(np.concatenate([p.images for p in parts]), batch.images)
        ids = [t["image_id"] for p in parts for t in p.targets]
        assert ids == [t["image_id"] for t in batch.targets]
    assert {t["image_id"] for t in shards[1][0].targets} == data["empty"]
    assert all(len(t["labels"]) == 0 for t in shards[1][0].targets)
    with pytest.raises(ValueError, match="multiple of world_size=2"):
        DataLoader(dataset, 3, shuffle=True, drop_last=True, rank=0, world_size=2)
    with pytest.raises(ValueError, match="rank 2 is not one of"):
        DataLoader(dataset, 4, shuffle=True, drop_last=True, rank=2, world_size=2)


def test_counts_gathered_in_rank_order() -> None:
    """gather_counts over a world of threads whose all_reduce sums through a barrier."""
    world = 3
    barrier = threading.Barrier(world)
    slots: list = [None] * world
    results: list = [None] * world

    def all_reduce_of(rank: int):
        def all_reduce(array: np.ndarray) -> np.ndarray:
            slots[rank] = np.array(array, np.float64)
            barrier.wait()
            total = np.sum(slots, axis=0)
            barrier.wait()
            return total
        return all_reduce

    local = [[2, 0], [], [5, 1, 3]]

    def work(rank: int) -> None:
        results[rank] = distributed.gather_counts(local[rank], rank, world, all_reduce_of(rank))

    threads = [threading.Thread(target=work, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [([2, 0, 5, 1, 3], 0), ([2, 0, 5, 1, 3], 2), ([2, 0, 5, 1, 3], 2)]


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_two_processes_equal_one(framework: str, data) -> None:
    one, two = _run(framework, 1, data), _run(framework, PROCESSES, data)
    log1, log2 = _losses(one), _losses(two)
    assert [(e["epoch"], e["step"]) for e in log2] == [(e["epoch"], e["step"]) for e in log1]
    assert len(log1) == STEPS and "loss_vfl_dn_0" in log1[0]  # denoising on from the first step
    for e1, e2 in zip(log1, log2):
        assert set(e1) == set(e2)
        worst = max(abs(e2[k] - e1[k]) / abs(e1["loss"]) for k in e1 if k.startswith("loss"))
        assert worst <= PROCESS_LOSS_RTOL, (e1["step"], worst)
    w1 = _weights(framework, one / f"last{SUFFIX[framework]}")
    w2 = _weights(framework, two / f"last{SUFFIX[framework]}")
    assert sorted(w1) == sorted(w2)
    assert _model_rel(w2, w1) <= PROCESS_WEIGHTS


def test_frameworks_agree_in_two_processes_like_in_one(data) -> None:
    def worst(processes: int) -> float:
        t, j = (_losses(_run(f, processes, data)) for f in FRAMEWORKS)
        return max(abs(b["loss"] - a["loss"]) / abs(a["loss"]) for a, b in zip(t, j))

    assert worst(1) <= LOSS_RTOL and worst(PROCESSES) <= LOSS_RTOL, (worst(1), worst(PROCESSES))


def _workers(launcher: int) -> list[int]:
    """The training processes below a launcher (its first descendants running parity.cli)."""
    found, frontier = [], [launcher]
    while frontier:
        pid = frontier.pop()
        children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                                  text=True).stdout.split()
        for child in map(int, children):
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"parity.cli" in cmdline and b"torch.distributed.run" not in cmdline:
                found.append(child)  # its own children (Jittor's compiler pool) are not workers
            else:
                frontier.append(child)
    return found


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_sigterm_to_one_process_then_exact_resume(framework: str, data) -> None:
    reference = _run(framework, PROCESSES, data)
    out = data["base"] / f"{framework}-stopped"
    args = _train_args(framework, data, out)
    with open(data["base"] / f"{framework}-stopped.out", "w") as log:
        proc = subprocess.Popen(launch(framework, PROCESSES, args), cwd=REPO, env=_env(),
                                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + RUN_TIMEOUT
        while not ((out / "log.jsonl").is_file() and len(read_log(out / "log.jsonl")) >= 1):
            assert proc.poll() is None, (data["base"] / f"{framework}-stopped.out").read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        workers = _workers(proc.pid)
        assert len(workers) == PROCESSES, workers
        os.kill(workers[-1], signal.SIGTERM)
        proc.wait(timeout=RUN_TIMEOUT)
    ckpt = out / f"last{SUFFIX[framework]}"
    stopped = len(read_log(out / "log.jsonl"))
    assert 1 <= stopped < STEPS, stopped
    stopped_copy = data["base"] / f"{framework}-stopped-copy"
    shutil.copytree(out, stopped_copy)

    resumed = subprocess.run(launch(framework, PROCESSES, args), cwd=REPO, env=_env(),
                             capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {ckpt}" in resumed.stdout
    expected = _weights(framework, reference / f"last{SUFFIX[framework]}")
    found = _weights(framework, ckpt)
    differing = [k for k in expected if not np.array_equal(found[k], expected[k])]
    assert not differing, f"{len(differing)} of {len(expected)} arrays differ, e.g. {differing[:5]}"
    assert _losses(out) == _losses(reference)

    # the same checkpoint resumed by one process: the one-process arithmetic from there on
    args_one = _train_args(framework, data, stopped_copy)
    alone = subprocess.run(launch(framework, 1, args_one), cwd=REPO, env=_env(),
                           capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert alone.returncode == 0, alone.stderr[-3000:]
    found = _weights(framework, stopped_copy / f"last{SUFFIX[framework]}")
    assert _model_rel(found, expected) <= PROCESS_WEIGHTS
