"""Strict loading and saving of RT-DETR weights on the Jittor side.

Differences from torch_ref/checkpoint.py:
- Jittor reads no ``.pth`` (that needs PyTorch) but its ``.pkl`` (numpy-only unpickling) and neutral ``.safetensors`` / ``.npz``; ``rtdetr-parity convert`` makes them.
- Jittor has no 0-dim Vars: ``num_batches_tracked`` lives in a shape [1] Var; :func:`state_dict_specs` and the loaders translate to the official ``()`` int64.
- Values are written into the existing Vars with ``Var.update`` (nothing replaced), so optimizers and EMA copies holding them keep seeing them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import jittor as jt
import numpy as np
from jittor import nn

from rtdetr_common.state_dicts import TensorSpec, check_state_dict
from rtdetr_common.weights import (JITTOR_SUFFIXES, NEUTRAL_SUFFIXES, WeightSet, load_jittor_pickle,
                                   load_neutral, save_jittor_pickle)

SCALAR_SUFFIX = "num_batches_tracked"


def _official_array(key: str, value: jt.Var | np.ndarray) -> np.ndarray:
    """A state_dict value in the official layout (scalars 0-dim)."""
    arr = value.numpy() if isinstance(value, jt.Var) else np.asarray(value)
    if key.endswith(SCALAR_SUFFIX):
        if arr.size != 1:
            raise ValueError(f"{key}: expected a single count, found shape {arr.shape}")
        arr = arr.reshape(()).astype(np.int64)
    return arr


def state_dict_specs(state_dict: Mapping[str, object]) -> dict[str, TensorSpec]:
    """Shape and dtype of every entry, in the official layout (0-dim int64 counters)."""
    specs = {}
    for k, v in state_dict.items():
        shape = tuple(v.shape)
        dtype = str(v.dtype)
        if k.endswith(SCALAR_SUFFIX) and isinstance(v, jt.Var):
            shape, dtype = (), "int64"
        specs[k] = TensorSpec(shape, dtype)
    return specs


def model_state_dict(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's state_dict as numpy arrays in the official layout."""
    return {k: _official_array(k, v) for k, v in model.state_dict().items()}


def read_weightset(path: str | Path) -> WeightSet:
    """Reads a Jittor ``.pkl`` or a neutral ``.safetensors`` / ``.npz`` file (ValueError for a ``.pth``)."""
    path = Path(path)
    if path.suffix in JITTOR_SUFFIXES:
        return load_jittor_pickle(path)
    if path.suffix in NEUTRAL_SUFFIXES:
        return load_neutral(path)
    raise ValueError(f"{path}: Jittor reads {JITTOR_SUFFIXES + NEUTRAL_SUFFIXES}; convert a .pth "
                     f"first with `rtdetr-parity convert {path} weights.safetensors --variant ...`")


def read_checkpoint(path: str | Path, prefer: str = "ema") -> tuple[dict, str]:
    """Reads ``(state_dict, entry)`` from a weight file: numpy arrays and ``"ema"`` (preferred) or ``"model"``."""
    return read_weightset(path).preferred(prefer)


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, np.ndarray],
                           source: str) -> None:
    """Loads after checking keys, shapes and dtypes; on a mismatch nothing is loaded (StateDictMismatchError)."""
    own = model.state_dict()
    check_state_dict(state_dict_specs(own), state_dict_specs(state_dict), source)
    for key, var in own.items():
        value = np.asarray(state_dict[key]).reshape(var.shape)
        var.update(jt.array(value).cast(var.dtype))
    jt.sync(list(own.values()))


def load_checkpoint(model: nn.Module, path: str | Path, prefer: str = "ema") -> str:
    """Reads a weight file, loads it strictly into ``model`` and returns the entry loaded."""
    state_dict, entry = read_checkpoint(path, prefer)
    load_state_dict_strict(model, state_dict, f"{path} [{entry}]")
    return entry


def write_checkpoint(ws: WeightSet, path: str | Path) -> None:
    """Writes a WeightSet as a Jittor checkpoint (``.pkl``, readable by ``jittor.load``), atomically."""
    save_jittor_pickle(ws, path)
