"""The project's own trained r18vd checkpoint (:mod:`parity.trained`): written atomically,
cached, loadable by both frameworks, and (slow tier) passing the training checks."""

from __future__ import annotations

import dataclasses
import json

import jittor_impl  # noqa: F401  (prepares Jittor; before any jittor import)
import numpy as np
import pytest

import parity.trained as trained
from parity.cli import main
from parity.convert import expected_specs
from parity.models import build_pair
from rtdetr_common.synthetic import make_dataset
from rtdetr_common.weights import load_neutral

# A tiny recipe: 2 iterations at 128 on 8 small images.
TINY = {"steps": 2, "size": 128}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny dataset and the tiny recipe's checkpoint, trained once (``_train`` calls counted)."""
    root = tmp_path_factory.mktemp("trained")
    ds = make_dataset(root / "ds", num_train=8, num_val=2, min_size=128, max_size=192,
                      max_objects=3)
    calls = []
    original = trained._train

    def counting(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trained, "_train", counting)
        path = trained.trained_checkpoint(root / "w.safetensors", dataset=ds.root, **TINY)
        yield root, ds, path, calls


def test_written_with_record_and_nothing_else(tiny):
    root, ds, path, calls = tiny
    assert len(calls) == 1
    assert path == root / "w.safetensors" and path.is_file()
    record = json.loads(trained.recipe_path(path).read_text())
    assert record["steps"] == 2 and record["num_classes"] == 5 and record["entry"] == "ema"
    assert record["config"]["size"] == 128 and record["config"]["variant"] == "r18vd"
    assert len(record["losses"]) == 2 and all(np.isfinite(record["losses"]))
    cfg = trained.recipe_config(dataset=ds.root, **TINY)
    assert record["recipe_hash"] == trained.recipe_hash(cfg, TINY["steps"])
    # No temporary file or run folder is left beside the outputs.
    assert sorted(p.name for p in root.iterdir()) == ["ds", "w.json", "w.safetensors"]


def test_cached(tiny):
    root, ds, path, calls = tiny
    before = path.stat().st_mtime_ns
    again = trained.trained_checkpoint(path, dataset=ds.root, **TINY)
    assert again == path and len(calls) == 1 and path.stat().st_mtime_ns == before
    # The CLI reuses it too and prints the path.
    assert main(["make-trained", "--out", str(path), "--steps", "2", "--size", "128",
                 "--dataset", str(ds.root)]) == 0
    assert len(calls) == 1 and path.stat().st_mtime_ns == before
    # Another recipe does not silently reuse a file made with this one.
    with pytest.raises(ValueError, match="force"):
        trained.trained_checkpoint(path, dataset=ds.root, steps=3, size=128)


def test_default_path_names_the_recipe():
    a = trained.recipe_hash(trained.recipe_config(steps=120), 120)
    b = trained.recipe_hash(trained.recipe_config(steps=121), 121)
    assert a != b and len(a) == 12
    assert trained.default_trained_dir().name == "trained"


def test_official_keys_loaded_strictly_and_trained(tiny, tmp_path):
    root, ds, path, _ = tiny
    ws = load_neutral(path)
    assert ws.model is None and ws.ema is not None and ws.ema_updates == TINY["steps"]
    expected = expected_specs("r18vd", 5)
    assert sorted(ws.ema) == sorted(expected)
    pair = build_pair("r18vd", num_classes=5, size=128, weights=path)
    assert pair.entry == "ema" and pair.weights_source == str(path)

    from torch_ref.trainer import Trainer

    cfg = dataclasses.replace(trained.recipe_config(dataset=ds.root, **TINY),
                              output_dir=str(tmp_path))
    init = Trainer(cfg).model_weights()
    floats = [k for k, v in init.items() if v.dtype.kind == "f"]
    changed = [k for k in floats if not np.array_equal(init[k], ws.ema[k])]
    assert len(changed) > 0.9 * len(floats), f"only {len(changed)} of {len(floats)} tensors moved"


def test_failed_training_leaves_nothing(tmp_path, monkeypatch):
    ds = make_dataset(tmp_path / "ds", num_train=4, num_val=1, min_size=128, max_size=160,
                      max_objects=2)

    def fail(self, batch):
        raise RuntimeError("interrupted")

    monkeypatch.setattr("torch_ref.trainer.Trainer.step", fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        trained.trained_checkpoint(tmp_path / "w.safetensors", dataset=ds.root, **TINY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


@pytest.mark.slow
def test_training_checks_pass_on_trained_weights():
    from parity.trajectory import run_training_checks

    pair = build_pair("r18vd", num_classes=5, size=None, weights=trained.trained_checkpoint())
    result, _ = run_training_checks(pair, size=(128, 192), steps=3)
    failing = [f"{r.comparison.path}: {r.comparison.reason}" for r in result.rows if not r.passed]
    assert not failing, f"{len(failing)} of {len(result.rows)} rows fail:\n" + "\n".join(failing)
