"""Shadow training (:mod:`parity.shadow`): the one-step checks along a real torch run.

One tiny torch run is trained once (2 steps of batch 2 at 128x128 on four synthetic images,
from seeded weights in the official layout, one thread). The correct port must pass a shadow
point taken from the run's state after its first step (moments, counts and EMA no longer
fresh) and the re-run must follow the run exactly; the BatchNorm-momentum fault of the
catalogue must fail the first point of the command's fire drill.
"""

from __future__ import annotations

import json
import math

import jittor_impl  # noqa: F401  (prepares Jittor; before any jittor import)
import pandas as pd
import pytest
import torch

import torch_ref.checkpoint as th_checkpoint
from parity.cli import main
from parity.shadow import (checkpoint_differences, read_run, row_kind, run_shadow,
                           shadow_steps, write_outputs)
from rtdetr_common.configs import variant_at_size
from rtdetr_common.seeded import seeded_state_dict
from rtdetr_common.synthetic import make_dataset
from rtdetr_common.run_state import Progress, train_state
from rtdetr_common.train_config import TrainConfig
from rtdetr_common.weights import WeightSet, save_neutral
from torch_ref import build_model

SIZE = 128
TRAIN = ["--size", str(SIZE), "--batch-size", "2", "--epochs", "1", "--threads", "1",
         "--eval-every", "0", "--multi-scale", "off", "--warmup-iters", "0",
         "--ema-warmups", "10"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 2-step torch run (4 images, batch 2) from seeded weights."""
    root = tmp_path_factory.mktemp("shadow")
    ds = make_dataset(root / "ds", num_train=4, num_val=2, min_size=128, max_size=192,
                      max_objects=3)
    model = build_model(variant_at_size("r18vd", 5, SIZE), multi_scale=False)
    weights = seeded_state_dict(th_checkpoint.state_dict_specs(model.state_dict()), 0)
    save_neutral(WeightSet(model=weights), root / "init.safetensors")
    out = root / "run"
    assert main(["train", "--framework", "torch", "--dataset", str(ds.root), "--out", str(out),
                 "--init-weights", str(root / "init.safetensors"), *TRAIN]) == 0
    return out


def test_shadow_steps():
    assert shadow_steps(250, None) == list(range(0, 250, 25))
    assert shadow_steps(251, None) == list(range(0, 251, 26))
    assert shadow_steps(2, 1) == [0, 1]
    assert shadow_steps(2, 2) == [0]
    assert shadow_steps(3, None) == [0, 1, 2]
    with pytest.raises(ValueError, match="at least 1"):
        shadow_steps(10, 0)
    with pytest.raises(ValueError, match="nothing to shadow"):
        shadow_steps(0, None)


def test_row_kinds():
    kinds = {"train_loss.step": "loss", "grad.a.weight": "grad", "update.a.weight": "update",
             "update_same_grad.a.weight": "update", "param.a.weight": "update",
             "exp_avg.a.weight": "moment", "exp_avg_sq_same_grad.a.weight": "moment",
             "step_count.a.weight": "moment", "optimizer.group[0]": "moment",
             "ema.a.weight": "ema", "ema_delta[3].a.weight": "ema",
             "buffer.bn.running_mean": "buffer",
             "buffer_delta.bn.running_var": "buffer", "train.relu_gate.x": "decision"}
    assert {path: row_kind(path) for path in kinds} == kinds


def test_read_run_refuses(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_run(tmp_path / "missing")
    (tmp_path / "last.pkl").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="Jittor"):
        read_run(tmp_path)
    cfg = TrainConfig(epochs=2)
    state = train_state(cfg, Progress(epoch=1, iteration=0, global_step=5), {}, {}, "torch", [])
    torch.save({"train_state": state}, tmp_path / "last.pth")
    with pytest.raises(ValueError, match="epoch 2 of 2.*finish it"):
        read_run(tmp_path)
    state["framework"] = "jittor"
    torch.save({"train_state": state}, tmp_path / "last.pth")
    with pytest.raises(ValueError, match="jittor trainer"):
        read_run(tmp_path)


def test_checkpoint_differences():
    w = torch.arange(6, dtype=torch.float32)
    run = {"model": {"w": w}, "train_state": {"config": {"output_dir": "a", "lr": 1e-4}}}
    same = {"model": {"w": w.clone()}, "train_state": {"config": {"output_dir": "b", "lr": 1e-4}}}
    assert checkpoint_differences(same, run) == []
    moved = {"model": {"w": w + 1e-6}, "train_state": {"config": {"output_dir": "b", "lr": 2e-4}}}
    problems = checkpoint_differences(moved, run)
    assert len(problems) == 2
    assert problems[0].startswith("model.w: differs") and "lr" in problems[1]
    assert checkpoint_differences({"model": {}}, run)[0] == "model.w: only in the run"


def test_clean_port_passes_from_the_runs_state(run, tmp_path):
    result = run_shadow(run, steps=[1])
    # The re-run followed the run: its final checkpoint is the run's, bit for bit, and every
    # step's loss is the logged one.
    assert result.rerun_problems == [] and result.loss_mismatches == []
    (point,) = result.points
    assert point.step == 1 and point.ema_updates == 1 and point.size == (SIZE, SIZE)
    assert point.torch_loss == point.rerun_loss == point.logged_loss
    failures = [(c.path, c.reason) for c in point.rows if not c.passed]
    assert failures == [] and result.passed and result.first_failing_step is None
    # Real rows: every quantity is compared, with non-zero errors against non-zero floors.
    table = result.table().set_index("kind")
    assert set(table.index) == {"loss", "grad", "update", "moment", "ema", "buffer", "decision"}
    assert table.loc["grad", "rows"] > 300 and table.loc["update", "rows"] > 900
    for kind in ("loss", "grad", "update", "moment", "ema", "buffer"):
        assert 0 < table.loc[kind, "error"] and 0 < table.loc[kind, "floor"], kind
        assert 0 < table.loc[kind, "ratio"] < 50, kind
    # A step from the run's state: AdamW counts continue from the first step (torch's step 2
    # on both sides; a fresh optimizer would count 1).
    counts = [c for c in point.rows if c.path.startswith("step_count.")]
    assert counts and all(c.passed for c in counts)
    written = write_outputs(result, tmp_path / "out", ["test"])
    assert [p.name for p in written] == ["shadow.csv", "shadow_failures.csv", "shadow_losses.csv",
                                         "summary.json", "shadow.png"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["passed"] and summary["first_failing_step"] is None and summary["steps"] == [1]
    rerun = summary["rerun"]
    assert rerun["matches_run"] and rerun["shadow_reference_loss_equals_rerun"]
    assert math.isfinite(summary["worst_ratio"]["grad"]["ratio"])
    assert len(pd.read_csv(tmp_path / "out" / "shadow.csv")) == 7
    assert pd.read_csv(tmp_path / "out" / "shadow_failures.csv").empty
    assert (tmp_path / "out" / "shadow.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fault_drill_flags_bn_momentum(run, tmp_path):
    out = tmp_path / "drill"
    code = main(["shadow", str(run), "--every", "2", "--fault", "bn-momentum", "--out", str(out)])
    assert code == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["fault"] == "bn-momentum" and summary["steps"] == [0]
    assert summary["first_failing_step"] == 0
    assert summary["first_failing_row"]["kind"] == "buffer"
    assert summary["rerun"]["matches_run"]  # the drill patches the port only
    failures = pd.read_csv(out / "shadow_failures.csv")
    assert set(failures["kind"]) == {"buffer", "ema"}  # running statistics and their average
    assert failures["path"].str.contains("running_mean").any()
    table = pd.read_csv(out / "shadow.csv").set_index("kind")
    assert not table.loc["buffer", "passed"] and table.loc["grad", "passed"]
    assert table.loc["buffer", "ratio"] > 1e3
