"""Devices: ``--device cpu|cuda`` of train, eval, infer, check and bench in both frameworks.

On a machine without CUDA the ``cuda`` tests are skipped with the reason each framework gave;
the errors a user meets there (an unknown name, CUDA asked for where there is none, a check
part that runs on the host only) are tested everywhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rtdetr_common.devices import DeviceUnavailableError, check_device
from rtdetr_common.train_config import TrainConfig

REPO = Path(__file__).resolve().parents[1]


def _availability() -> dict[str, tuple[bool, str]]:
    import jittor_impl.devices as jittor_devices  # imports Jittor through its environment set-up
    import torch_ref.devices as torch_devices

    return {"torch": torch_devices.available(), "Jittor": jittor_devices.available()}


def _no_cuda_reason() -> str:
    missing = {k: why for k, (ok, why) in _availability().items() if not ok}
    return "; ".join(f"{k}: {why}" for k, why in missing.items())


cuda = pytest.mark.cuda


@pytest.fixture(scope="module")
def on_cuda() -> None:
    reason = _no_cuda_reason()
    if reason:
        pytest.skip(f"no CUDA ({reason})")


def _cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "parity.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_an_unknown_device_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="unknown device 'tpu'; choose one of cpu, cuda"):
        check_device("tpu")
    with pytest.raises(ValueError, match="device must be one of"):
        TrainConfig(device="tpu").validate()
    done = _cli("bench", "--device", "tpu", timeout=120)
    assert done.returncode == 2 and "invalid choice: 'tpu'" in done.stderr


def test_cuda_where_a_framework_has_none_is_a_clear_error() -> None:
    """Each framework names itself and what it found; nothing falls back to the CPU."""
    import jittor_impl.devices as jittor_devices
    import torch_ref.devices as torch_devices

    for name, module in (("torch", torch_devices), ("Jittor", jittor_devices)):
        ok, found = module.available()
        if ok:
            continue
        with pytest.raises(DeviceUnavailableError, match=f"--device cuda: {name} cannot use CUDA here"):
            module.use("cuda")
        assert module.use("cpu") is not None
    if _no_cuda_reason():
        done = _cli("train", "--framework", "torch", "--device", "cuda", "--epochs", "1",
                    "--out", "runs/never-written", timeout=300)
        assert done.returncode != 0 and "--device cuda:" in done.stderr, done.stderr[-2000:]
        assert not (REPO / "runs/never-written").exists()


def test_check_on_cuda_names_the_parts_that_run_on_the_host_only() -> None:
    from parity.cli import build_parser, measure_check

    args = build_parser().parse_args(["check", "--device", "cuda"])
    with pytest.raises(ValueError, match="modules, training part.* run on the CPU only.*--parts outputs"):
        measure_check(args)


@cuda
def test_check_on_cuda_compares_torch_and_jittor_there(on_cuda, tmp_path) -> None:
    done = _cli("check", "--variant", "r18vd", "--device", "cuda", "--parts", "outputs",
                "--size", "256", "320", "--train-size", "256", "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "check_r18vd.json").read_text())
    assert result["device"] == "cuda" and result["passed"]
    assert {row["device"] for row in result["rows"]} == {"cuda"}


@cuda
def test_both_trainers_train_and_evaluate_on_cuda_from_one_start(on_cuda, tmp_path) -> None:
    """Two iterations per framework on CUDA from the same weights: the first step's losses
    agree as on the CPU, and evaluation writes detections."""
    from rtdetr_common.run_log import read_log
    from rtdetr_common.synthetic import make_dataset

    data = make_dataset(tmp_path / "data", num_train=4, num_val=2, num_classes=3,
                        min_size=96, max_size=160)
    init = tmp_path / "init.safetensors"
    assert _cli("init-weights", str(init), "--dataset", str(data.root), "--size", "128").returncode == 0
    first = {}
    for framework in ("torch", "jittor"):
        out = tmp_path / framework
        done = _cli("train", "--framework", framework, "--device", "cuda", "--dataset", str(data.root),
                    "--out", str(out), "--size", "128", "--batch-size", "2", "--epochs", "1",
                    "--ema-warmups", "10", "--init-weights", str(init))
        assert done.returncode == 0, done.stderr[-3000:]
        assert "val: AP" in done.stdout
        first[framework] = read_log(out / "log.jsonl")[0]["loss"]
    assert first["jittor"] == pytest.approx(first["torch"], rel=1e-3)


@cuda
def test_bench_times_both_frameworks_on_cuda(on_cuda) -> None:
    from parity.bench import BenchSpec, run_bench

    [row] = run_bench([BenchSpec("eval", "r18vd", 1, 256)], warmup=1, reps=2, device="cuda")
    assert row["device"] == "cuda"
    assert np.isfinite(row["time_ratio"]) and row["torch_s"] > 0 and row["jittor_s"] > 0
