"""Neutral weight files: bit-exact round trips, strict formats, safe reading, atomic writes."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from rtdetr_common.weights import (WeightSet, atomic_write, load_jittor_pickle, load_neutral,
                                   save_jittor_pickle, save_neutral)


def _weightset() -> WeightSet:
    gen = np.random.default_rng(0)
    model = {"a.weight": gen.standard_normal((3, 4)).astype(np.float32),
             "a.norm.num_batches_tracked": np.array(7, dtype=np.int64),
             "b.bias": np.array([np.nan, -0.0, 1e-38], dtype=np.float32)}
    ema = {k: (v * 2 if v.dtype.kind == "f" else v) for k, v in model.items()}
    return WeightSet(model=model, ema=ema, ema_updates=123, ema_warmups=2000)


def _assert_same(a: WeightSet, b: WeightSet) -> None:
    for entry in ("model", "ema"):
        sa, sb = getattr(a, entry), getattr(b, entry)
        assert list(sa) == list(sb)
        for k in sa:
            assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k
            assert sa[k].tobytes() == sb[k].tobytes(), k
    assert (a.ema_updates, a.ema_warmups) == (b.ema_updates, b.ema_warmups)


@pytest.mark.parametrize("suffix", [".safetensors", ".npz", ".pkl"])
def test_round_trip_is_bit_exact(tmp_path: Path, suffix: str) -> None:
    ws, path = _weightset(), tmp_path / f"w{suffix}"
    (save_jittor_pickle if suffix == ".pkl" else save_neutral)(ws, path)
    back = (load_jittor_pickle if suffix == ".pkl" else load_neutral)(path)
    _assert_same(ws, back)
    assert back.preferred()[1] == "ema" and back.preferred("model")[1] == "model"


def test_jittor_pickle_refuses_code(tmp_path: Path) -> None:
    class Boom:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": {"x": Boom()}}))
    with pytest.raises(ValueError, match="only numpy arrays are allowed"):
        load_jittor_pickle(path)


def test_foreign_npz_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.npz"
    np.savez(path, x=np.zeros(3))
    with pytest.raises(ValueError, match="__meta__"):
        load_neutral(path)


def test_interrupted_write_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "keep.txt"
    path.write_text("old")

    def failing(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(path, failing)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_empty_weightset_is_an_error() -> None:
    with pytest.raises(ValueError, match="model state_dict, an ema"):
        WeightSet()
