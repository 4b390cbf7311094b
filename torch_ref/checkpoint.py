"""Strict loading of official-format PyTorch checkpoints, read with ``weights_only=True`` (a file cannot run code).

Accepted: the published ``{'ema': {'module': state_dict}}``, official training checkpoints (``model``, ``ema``,
``optimizer``, ...) and a bare state_dict. As in the official loaders, ``ema.module`` wins over ``model``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from torch import nn

from rtdetr_common.state_dicts import TensorSpec, check_state_dict
from rtdetr_common.weights import WeightSet, atomic_write, weightset_from_mapping


def _spec(t: torch.Tensor) -> TensorSpec:
    return TensorSpec(tuple(t.shape), str(t.dtype).replace("torch.", ""))


def state_dict_specs(state_dict: Mapping[str, torch.Tensor]) -> dict[str, TensorSpec]:
    """Shape and dtype of every entry of a torch state_dict."""
    return {k: _spec(v) for k, v in state_dict.items()}


def read_checkpoint(path: str | Path, prefer: str = "ema") -> tuple[dict, str]:
    """Reads ``(state_dict, entry)`` from a ``.pth``: torch tensors and ``"ema"`` or ``"model"`` (a bare state_dict)."""
    state_dict, entry = read_weightset(path).preferred(prefer)
    return {k: torch.from_numpy(v) for k, v in state_dict.items()}, entry


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                           source: str) -> None:
    """Loads after checking keys, shapes and dtypes; on a mismatch nothing is loaded (StateDictMismatchError)."""
    check_state_dict(state_dict_specs(model.state_dict()), state_dict_specs(state_dict), source)
    model.load_state_dict(state_dict, strict=True)


def load_checkpoint(model: nn.Module, path: str | Path, prefer: str = "ema") -> str:
    """Reads an official-format checkpoint, loads it strictly into ``model`` and returns the entry loaded."""
    state_dict, entry = read_checkpoint(path, prefer)
    load_state_dict_strict(model, state_dict, f"{path} [{entry}]")
    return entry


def read_weightset(path: str | Path) -> WeightSet:
    """Reads a ``.pth`` into a :class:`WeightSet`; entries besides ``model`` / ``ema`` are listed in ``dropped``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe pickles
        raise ValueError(f"{path}: cannot be read as a weights-only PyTorch checkpoint: {exc}") from exc
    return weightset_from_mapping(obj, str(path), lambda t: t.detach().cpu().numpy(),
                                  lambda v: isinstance(v, torch.Tensor))


def write_checkpoint(ws: WeightSet, path: str | Path) -> None:
    """Writes a WeightSet as an official-layout ``.pth`` (``model``, ``ema.module``), atomically."""
    obj: dict = {}
    if ws.model is not None:
        obj["model"] = {k: torch.from_numpy(np.array(v)) for k, v in ws.model.items()}
    if ws.ema is not None:
        obj["ema"] = {"module": {k: torch.from_numpy(np.array(v)) for k, v in ws.ema.items()},
                      "updates": int(ws.ema_updates), "warmups": int(ws.ema_warmups)}
    atomic_write(path, lambda tmp: torch.save(obj, tmp))
