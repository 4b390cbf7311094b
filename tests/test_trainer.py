"""Trainers of both frameworks: training runs, exact resume after a real SIGTERM, loss parity of
the first steps, and the ``eval`` / ``infer`` / ``make-dataset`` commands.

Every run goes through the command line (``python -m parity.cli``, the same code as
``rtdetr-parity <command>``) in a subprocess, on a tiny synthetic dataset (8 train images,
batch 2, size 128 with the scaled multi-scale sizes 128/160, r18vd, 2 epochs = 8 iterations).
Both frameworks start from the same weights (the torch trainer's official initialisation,
written to a neutral file by ``init-weights``), so their per-step losses can be compared.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from parity.divergences import KnownDivergence
from parity.runs import compare_runs, format_comparison
from parity.tolerances import tolerance
from rtdetr_common.configs import load_official_configs
from rtdetr_common.run_log import JsonLog, read_log
from rtdetr_common.run_state import Progress
from rtdetr_common.signals import StopOnSignal
from rtdetr_common.train_config import (TrainConfig, config_differences, lr_factor, min_input_size,
                                        scaled_multi_scale, variant_config)
from rtdetr_common.weights import read_numpy_pickle

REPO = Path(__file__).resolve().parents[1]
FRAMEWORKS = ("torch", "jittor")
SUFFIX = {"torch": ".pth", "jittor": ".pkl"}
NUM_TRAIN, BATCH, EPOCHS, SIZE = 8, 2, 2, 128
STEPS = NUM_TRAIN // BATCH * EPOCHS
# Relative agreement of the two frameworks' total loss per step (the issue's target).
LOSS_RTOL = 1e-3
RUN_TIMEOUT = 1800


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "parity.cli", *args]


def _env() -> dict:
    # One thread per framework: on a shared 2-core machine, multi-threaded kernels of an
    # oversubscribed CPU spin at their barriers (measured: 16 s vs 1.9 s per torch step).
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _train_args(framework: str, dataset: Path, init: Path, out: Path, size: int = SIZE) -> list[str]:
    return ["train", "--framework", framework, "--dataset", str(dataset), "--out", str(out),
            "--size", str(size), "--batch-size", str(BATCH), "--epochs", str(EPOCHS),
            "--eval-every", "0", "--ema-warmups", "10", "--threads", "1",
            "--init-weights", str(init)]


def _loss_table(outs: dict[str, Path]) -> tuple[list[float], str]:
    """Relative difference of the total loss per step (Jittor vs torch) and a printable table."""
    comparison = compare_runs(outs["torch"], outs["jittor"])
    rel = [s["rel_diff"] for s in comparison.steps]
    return rel, format_comparison(comparison, len(rel))


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(_cli(*args), cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=RUN_TIMEOUT)


def _weights(framework: str, path: Path) -> dict[str, np.ndarray]:
    """Model, EMA and optimizer arrays of a training checkpoint, flattened by name."""
    if framework == "torch":
        import torch

        obj = torch.load(path, map_location="cpu", weights_only=True)
        flat = {f"model/{k}": v.numpy() for k, v in obj["model"].items()}
        flat.update({f"ema/{k}": v.numpy() for k, v in obj["ema"]["module"].items()})
        for index, state in obj["optimizer"]["state"].items():
            flat.update({f"optimizer/{index}/{k}": v.numpy() for k, v in state.items()})
        return flat
    obj = read_numpy_pickle(path)
    flat = {f"model/{k}": v for k, v in obj["model"].items()}
    flat.update({f"ema/{k}": v for k, v in obj["ema"]["module"].items()})
    for g, group in enumerate(obj["optimizer"]["groups"]):
        for key in ("m", "values"):
            flat.update({f"optimizer/{g}/{key}/{i}": v for i, v in enumerate(group[key])})
    return flat


def _init_weights(path: Path, dataset: Path) -> Path:
    """The torch trainer's initialisation (seed 0) as a neutral file, by ``init-weights``."""
    done = _run(["init-weights", str(path), "--dataset", str(dataset), "--size", str(SIZE)])
    assert done.returncode == 0 and "torch initialisation of r18vd (3 classes" in done.stdout, done.stderr
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """The tiny dataset and the shared initial weights."""
    from rtdetr_common.synthetic import make_dataset

    base = tmp_path_factory.mktemp("trainer")
    dataset = make_dataset(base / "data", num_train=NUM_TRAIN, num_val=4, num_classes=3,
                           min_size=96, max_size=160)
    init = _init_weights(base / "init.safetensors", dataset.root)
    return {"base": base, "dataset": dataset.root, "val_images": dataset.val_images, "init": init}


_RUNS: dict[str, Path] = {}


def _full_run(framework: str, tiny: dict[str, Path]) -> Path:
    """Output folder of an uninterrupted 2-epoch run (run once per framework)."""
    if framework not in _RUNS:
        out = tiny["base"] / f"full_{framework}"
        done = _run(_train_args(framework, tiny["dataset"], tiny["init"], out))
        assert done.returncode == 0, done.stderr[-3000:]
        assert "training complete: 8 iterations" in done.stdout
        _RUNS[framework] = out
    return _RUNS[framework]


# ------------------------------------------------------------------------------ neutral parts


def test_schedule_follows_official_multistep_and_linear_warmup():
    cfg = TrainConfig(lr_milestones=[2, 4], lr_gamma=0.5)
    assert [lr_factor(cfg, e, 0) for e in range(6)] == [1, 1, 0.5, 0.5, 0.25, 0.25]
    assert lr_factor(TrainConfig(), 71, 10**6) == 1.0  # official: milestone 1000 never fires
    warm = TrainConfig(warmup_iters=4)
    assert [lr_factor(warm, 0, s) for s in range(6)] == [0.25, 0.5, 0.75, 1, 1, 1]


def test_multi_scale_and_sizes():
    official = load_official_configs()["r18vd"]["RTDETR"]["multi_scale"]
    assert scaled_multi_scale(640) == official
    assert min_input_size("r18vd") == 128  # 16^2 + 8^2 + 4^2 = 336 >= 300 queries
    assert scaled_multi_scale(320) == [256, 256, 288, 288, 320, 320, 320, 320, 352, 352, 384, 384, 416]
    assert min(scaled_multi_scale(128)) == 128
    with pytest.raises(ValueError, match="multiple of 32 and at least 128"):
        TrainConfig(size=96).validate()
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=1).validate()


def test_variant_config_overrides():
    cfg = TrainConfig(lr=2e-4, backbone_lr=2e-4, weight_decay=0.0, ema_decay=0.99, ema_warmups=50)
    vc = variant_config(cfg, 3)
    assert vc.optimizer.lr == 2e-4 and vc.optimizer.weight_decay == 0.0
    assert [g.lr for g in vc.optimizer.params] == [2e-4, 2e-4, None]
    assert (vc.ema.decay, vc.ema.warmups, vc.decoder.num_classes) == (0.99, 50, 3)
    official = variant_config(TrainConfig(), 80)
    assert [g.lr for g in official.optimizer.params] == [1e-5, 1e-5, None]


def test_config_differences_ignore_exempt_fields():
    saved = TrainConfig(epochs=2, output_dir="a").to_dict()
    assert config_differences(saved, TrainConfig(epochs=5, output_dir="b", num_workers=3)) == []
    assert config_differences(saved, TrainConfig(lr=3e-4)) == ["lr: checkpoint 0.0001, now 0.0003"]


def test_stop_on_signal_defers_the_first_signal():
    # Python's own SIGINT handler, also where the runner started with SIGINT ignored (a
    # background job of a non-interactive shell): the test is about restoring what was there.
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with StopOnSignal() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
            assert stop.name == "SIGINT"
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.01)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, outer)


def test_log_truncated_to_resumed_progress(tmp_path):
    log = JsonLog(tmp_path / "log.jsonl")
    for step in range(5):
        log.write({"kind": "train", "epoch": step // 2, "step": step})
    log.write({"kind": "eval", "epoch": 0})
    log.write({"kind": "eval", "epoch": 1})
    log.truncate_to(Progress(epoch=1, iteration=1, global_step=3))
    assert [(e["kind"], e.get("step")) for e in read_log(log.path)] == [
        ("train", 0), ("train", 1), ("train", 2), ("eval", None)]


def test_both_trainers_run_the_one_shared_loop():
    """The loop lives once in ``rtdetr_common.trainer``: each framework's Trainer supplies
    every hook (under the same names) and overrides nothing of the loop itself."""
    import inspect

    import jittor_impl.trainer as jittor_trainer
    import torch_ref.trainer as torch_trainer
    from rtdetr_common.trainer import BaseTrainer

    hooks = {"seed", "read_weights", "load_model", "weights_of", "materialise", "place", "optimise",
             "as_tensor", "as_numpy", "no_grad", "runtime", "checkpoint_contents", "write_checkpoint",
             "read_checkpoint", "restore"}
    loop = {name for name, _ in inspect.getmembers(BaseTrainer, inspect.isfunction)} - hooks
    assert {"train", "step", "set_lr", "evaluate", "predict", "detect"} <= loop
    for module in (torch_trainer, jittor_trainer):
        trainer = module.Trainer
        assert issubclass(trainer, BaseTrainer) and trainer.FRAMEWORK == module.FRAMEWORK
        own = set(vars(trainer)) - {"__module__", "__doc__", "__qualname__", "__firstlineno__",
                                    "__static_attributes__"}
        assert own - hooks == {"FRAMEWORK", "CHECKPOINT_SUFFIX", "build", "distributed",
                               "devices"}, module.__name__
        # runtime, materialise and place: neutral no-ops unless the framework needs them
        assert hooks - {"runtime", "materialise", "place"} <= own, module.__name__
    with pytest.raises(NotImplementedError):
        BaseTrainer.optimise(None, None)


# ------------------------------------------------------------------------------ training


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_train_writes_checkpoint_and_log(framework, tiny):
    out = _full_run(framework, tiny)
    log = read_log(out / "log.jsonl")
    assert [(e["epoch"], e["iter"], e["step"]) for e in log] == [
        (s // 4, s % 4 + 1, s) for s in range(STEPS)]
    assert all(np.isfinite(e["loss"]) and e["lr"] == 1e-4 and e["backbone_lr"] == 1e-5 for e in log)
    assert {"loss_vfl", "loss_bbox", "loss_giou", "loss_vfl_dn_2", "seconds"} <= set(log[0])
    weights = _weights(framework, out / f"last{SUFFIX[framework]}")
    assert any(k.startswith("optimizer/") for k in weights)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_resume_after_sigterm_is_bit_identical(framework, tiny):
    """SIGTERM mid-epoch, resume in a new process: weights equal the uninterrupted run's."""
    reference = _full_run(framework, tiny)
    out = tiny["base"] / f"resumed_{framework}"
    out.mkdir()
    args = _train_args(framework, tiny["dataset"], tiny["init"], out)
    with open(out / "first.out", "w") as stdout, open(out / "first.err", "w") as stderr:
        proc = subprocess.Popen(_cli(*args), cwd=REPO, env=_env(), stdout=stdout, stderr=stderr)
        deadline = time.monotonic() + RUN_TIMEOUT
        while not ((out / "log.jsonl").is_file() and len(read_log(out / "log.jsonl")) >= 2):
            assert proc.poll() is None, (out / "first.err").read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=RUN_TIMEOUT) == 128 + signal.SIGTERM
    assert "stopped by SIGTERM at epoch 1" in (out / "first.out").read_text()
    ckpt = out / f"last{SUFFIX[framework]}"
    if framework == "torch":
        import torch

        state = torch.load(ckpt, map_location="cpu", weights_only=True)["train_state"]
    else:
        state = read_numpy_pickle(ckpt)["train_state"]
    stopped = state["progress"]
    assert stopped["epoch"] == 0 and 2 <= stopped["iteration"] < 4, stopped  # mid-epoch
    assert state["loader"] == {"epoch": 0, "position": stopped["iteration"]}

    resumed = _run(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {ckpt}" in resumed.stdout
    expected = _weights(framework, reference / f"last{SUFFIX[framework]}")
    found = _weights(framework, ckpt)
    assert sorted(found) == sorted(expected)
    differing = [k for k in expected if not np.array_equal(found[k], expected[k])]
    assert not differing, f"{len(differing)} of {len(expected)} arrays differ, e.g. {differing[:5]}"
    def losses(path: Path) -> list[dict]:
        return [{k: v for k, v in e.items() if k != "seconds"} for e in read_log(path)]

    assert losses(out / "log.jsonl") == losses(reference / "log.jsonl")


def test_resume_refuses_changed_config(tiny):
    out = _full_run("torch", tiny)
    args = _train_args("torch", tiny["dataset"], tiny["init"], out) + ["--lr", "3e-4"]
    done = _run(args)
    assert done.returncode == 2
    assert "refusing to resume" in done.stderr and "lr: checkpoint 0.0001, now 0.0003" in done.stderr


def test_first_steps_loss_parity(tiny):
    """Same data, seed and initial weights: total loss per step within 1e-3 relative (8 steps)."""
    rel, table = _loss_table({fw: _full_run(fw, tiny) for fw in FRAMEWORKS})
    print(table)
    assert len(rel) == STEPS
    assert max(rel) <= LOSS_RTOL, table


@pytest.mark.slow
@pytest.mark.xfail(strict=True, raises=KnownDivergence, reason=(
    "known divergence of free-running training, measured at 640 / batch 2 (8 min): steps 0-11 "
    "agree within 2.7e-4 (step 0: 1.7e-7), then a near-tie of the matching / query selection "
    "flips at step 12 (matched loss terms move 6-31% while the denoising terms, whose assignment "
    "is fixed, agree within 3e-3) and later steps differ by up to 2e-2"))
def test_twenty_steps_loss_parity_at_official_size(tmp_path):
    """The issue's 20 steps at the official 640 (multi-scale 480..800), batch 2, both trainers.

    Both trainers run freely (no decision is forced), so fp32 rounding differences grow through
    20 AdamW steps until a near-tie decision flips; ``parity.training`` checks the trajectory
    with the reference decisions forced instead.
    """
    from rtdetr_common.synthetic import make_dataset

    steps = 20
    dataset = make_dataset(tmp_path / "data", num_train=steps * BATCH // EPOCHS, num_val=1,
                           num_classes=3)
    init = _init_weights(tmp_path / "init.safetensors", dataset.root)
    outs = {}
    for fw in FRAMEWORKS:
        outs[fw] = tmp_path / fw
        done = _run(_train_args(fw, dataset.root, init, outs[fw], size=640))
        assert done.returncode == 0, done.stderr[-3000:]
    rel, table = _loss_table(outs)
    assert len(rel) == steps
    if max(rel) > LOSS_RTOL:  # the known divergence; any other failure fails the test
        raise KnownDivergence(table)


# ------------------------------------------------------------------------------ commands


def test_eval_command_same_weights_both_frameworks(tiny):
    """The Jittor run's checkpoint evaluated by both trainers: the same COCO detections."""
    weights = _full_run("jittor", tiny) / "last.pkl"
    results = {}
    for fw in FRAMEWORKS:
        out = tiny["base"] / f"eval_{fw}"
        done = _run(["eval", "--framework", fw, "--weights", str(weights), "--dataset",
                     str(tiny["dataset"]), "--out", str(out)])
        assert done.returncode == 0, done.stderr[-3000:]
        assert "AP50" in done.stdout and "Average Precision" in done.stdout
        results[fw] = json.loads((out / "results_val.json").read_text())
    torch_dets, jittor_dets = results["torch"], results["jittor"]
    assert len(torch_dets) == len(jittor_dets) == 4 * 300
    assert {"image_id", "category_id", "bbox", "score"} <= set(torch_dets[0])
    assert {r["category_id"] for r in torch_dets} <= {2, 3, 5}  # the dataset's non-contiguous ids

    for image_id in {d["image_id"] for d in torch_dets}:
        best = [sorted((d for d in dets if d["image_id"] == image_id), key=lambda d: -d["score"])[:5]
                for dets in (torch_dets, jittor_dets)]
        assert [d["category_id"] for d in best[1]] == [d["category_id"] for d in best[0]]
        np.testing.assert_allclose([d["score"] for d in best[1]], [d["score"] for d in best[0]],
                                   rtol=0, atol=tolerance("detection", "scores").atol)
        np.testing.assert_allclose([d["bbox"] for d in best[1]], [d["bbox"] for d in best[0]],
                                   rtol=0, atol=tolerance("detection", "boxes").atol)


def test_infer_command_writes_json_and_pngs(tiny):
    out = tiny["base"] / "infer_jittor"
    weights = _full_run("jittor", tiny) / "last.pkl"
    done = _run(["infer", "--framework", "jittor", "--weights", str(weights), "--images",
                 str(tiny["val_images"]), "--out", str(out), "--threshold", "0.0"])
    assert done.returncode == 0, done.stderr[-3000:]
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted(p.name for p in tiny["val_images"].glob("*.png"))
    detections = json.loads((out / "detections.json").read_text())
    assert len(detections) == 4 * 300  # threshold 0: every top-k detection of the 4 images
    index = json.loads((out / "images.json").read_text())
    assert [c["id"] for c in index["categories"]] == [2, 3, 5]
    assert {d["file_name"] for d in detections} == set(pngs)


def test_commands_report_bad_input(tiny, tmp_path):
    missing = _run(["eval", "--framework", "torch", "--weights", str(tmp_path / "none.pth"),
                    "--dataset", str(tiny["dataset"])])
    assert missing.returncode == 2 and "weights file not found" in missing.stderr
    no_data = _run(["train", "--framework", "torch", "--dataset", str(tmp_path / "nowhere"),
                    "--out", str(tmp_path / "o")])
    assert no_data.returncode == 2 and "dataset folder" in no_data.stderr
    wrong = _run(["eval", "--framework", "torch", "--weights", str(tiny["init"]), "--variant",
                  "r34vd", "--size", str(SIZE), "--dataset", str(tiny["dataset"]),
                  "--out", str(tmp_path / "e")])
    assert wrong.returncode == 2 and "does not match the model" in wrong.stderr


def test_make_dataset_command(tmp_path):
    done = _run(["make-dataset", "--root", str(tmp_path / "d"), "--num-train", "2", "--num-val",
                 "1", "--seed", "3"])
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "d" / "annotations" / "instances_train.json").is_file()
    assert len(list((tmp_path / "d" / "train").glob("*.png"))) == 2
    again = _run(["make-dataset", "--root", str(tmp_path / "d")])
    assert again.returncode != 0 and "already exists" in again.stderr


# ------------------------------------------------------------------------------ backbone weights


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    from rtdetr_common.synthetic import make_dataset

    base = tmp_path_factory.mktemp("backbone")
    return make_dataset(base / "data", num_train=2, num_val=1, num_classes=3,
                        min_size=96, max_size=128).root


def _published_backbone(path: Path, counters: bool) -> dict[str, np.ndarray]:
    """A torch r18vd backbone of its own seed, saved as the published files are: a bare
    PResNet state_dict (``torch.save``), with or without the BatchNorm step counters."""
    import torch

    from rtdetr_common.configs import get_variant
    from torch_ref import build_model

    torch.manual_seed(123)
    backbone = build_model(get_variant("r18vd", 3)).backbone
    state = {k: v for k, v in backbone.state_dict().items()
             if counters or not k.endswith("num_batches_tracked")}
    torch.save(state, path)
    return {k: v.numpy().copy() for k, v in state.items()}


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("counters", [True, False], ids=["with-counters", "without-counters"])
def test_backbone_weights_load_the_backbone_alone(framework, counters, small_data, tmp_path):
    """The published format round trip: every backbone tensor (model and EMA) is the file's,
    everything else is the trainer's own seeded initialisation."""
    from parity.commands import _trainer_module
    from parity.convert import convert_backbone

    published = _published_backbone(tmp_path / "presnet18.pth", counters)
    path = tmp_path / "presnet18.pth"
    if framework == "jittor":  # Jittor reads no .pth: the converter checks and rewrites it
        convert_backbone(path, tmp_path / "presnet18.safetensors", "r18vd")
        path = tmp_path / "presnet18.safetensors"
    module = _trainer_module(framework)
    cfg = dict(dataset=str(small_data), size=128, output_dir=str(tmp_path / "out"))
    plain = module.Trainer(TrainConfig(**cfg)).model_weights()
    trainer = module.Trainer(TrainConfig(**cfg, backbone_weights=str(path)))
    loaded = trainer.model_weights()
    assert "PResNet-18" in trainer.backbone_loaded
    assert ("step counters" in trainer.backbone_loaded) == (not counters)
    backbone = {k for k in loaded if k.startswith("backbone.")}
    assert {f"backbone.{k}" for k in published} <= backbone
    for key in backbone:
        name = key[len("backbone."):]
        want = published[name] if name in published else plain[key]
        np.testing.assert_array_equal(np.asarray(loaded[key]).reshape(np.shape(want)), want, err_msg=key)
    for key in set(loaded) - backbone:
        np.testing.assert_array_equal(loaded[key], plain[key], err_msg=key)
    ema = trainer.ema.module.state_dict()
    name = "backbone.conv1.conv1_1.conv.weight"
    np.testing.assert_array_equal(np.asarray(ema[name].numpy()), published[name[len("backbone."):]])


def test_backbone_weights_of_another_depth_are_refused_by_name(small_data, tmp_path):
    import torch

    from rtdetr_common.configs import load_official_manifest
    from torch_ref.trainer import Trainer

    specs = load_official_manifest()["r50vd"]["state_dict"]
    torch.save({k[len("backbone."):]: torch.zeros(shape, dtype=getattr(torch, dtype))
                for k, (shape, dtype, _) in specs.items() if k.startswith("backbone.")},
               tmp_path / "presnet50.pth")
    cfg = TrainConfig(dataset=str(small_data), size=128, output_dir=str(tmp_path / "out"),
                      backbone_weights=str(tmp_path / "presnet50.pth"))
    with pytest.raises(ValueError, match="holds PResNet-50; this model's backbone is PResNet-18"):
        Trainer(cfg)


def test_backbone_weights_exclude_init_weights_and_jittor_names_the_conversion(small_data, tmp_path):
    from jittor_impl.trainer import Trainer

    with pytest.raises(ValueError, match="exclude each other"):
        TrainConfig(init_weights="a.safetensors", backbone_weights="b.pth").validate()
    _published_backbone(tmp_path / "presnet18.pth", counters=True)
    cfg = TrainConfig(dataset=str(small_data), size=128, output_dir=str(tmp_path / "out"),
                      backbone_weights=str(tmp_path / "presnet18.pth"))
    with pytest.raises(ValueError, match="convert"):
        Trainer(cfg)
