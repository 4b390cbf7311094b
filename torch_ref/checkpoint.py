"""Strict loading of official-format PyTorch checkpoints.

Accepted files (``torch.load`` with ``weights_only=True``, so an untrusted file cannot run code):

- the published COCO checkpoints: ``{'ema': {'module': state_dict}}``;
- checkpoints of official training: ``model``, ``ema`` (``module``, ``updates``, ``warmups``),
  ``optimizer``, ``lr_scheduler``, ...;
- a bare state_dict.

Like the official loaders, ``ema.module`` is preferred and ``model`` is the fallback.
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
    """Reads the model weights from an official-format ``.pth`` file.

    Args:
        path: Checkpoint file.
        prefer: Which entry wins when both ``ema`` and ``model`` exist (official: ``ema``).

    Returns:
        ``(state_dict, entry)``: torch tensors, and ``"ema"`` or ``"model"`` (a bare
        state_dict counts as ``model``).

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If the file cannot be read safely or holds no state_dict.
    """
    state_dict, entry = read_weightset(path).preferred(prefer)
    return {k: torch.from_numpy(v) for k, v in state_dict.items()}, entry


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                           source: str) -> None:
    """Loads after checking keys, shapes and dtypes; on any mismatch nothing is loaded.

    Raises:
        StateDictMismatchError: Listing missing, unexpected and mismatched entries and the source.
    """
    check_state_dict(state_dict_specs(model.state_dict()), state_dict_specs(state_dict), source)
    model.load_state_dict(state_dict, strict=True)


def load_checkpoint(model: nn.Module, path: str | Path, prefer: str = "ema") -> str:
    """Reads an official-format checkpoint and loads it strictly into ``model``.

    Returns:
        The entry that was loaded (``"ema"`` or ``"model"``).
    """
    state_dict, entry = read_checkpoint(path, prefer)
    load_state_dict_strict(model, state_dict, f"{path} [{entry}]")
    return entry


def read_weightset(path: str | Path) -> WeightSet:
    """Reads a ``.pth`` into the framework-neutral :class:`WeightSet` (``model`` and/or ``ema``).

    Entries other than ``model`` and ``ema`` (optimizer, scheduler, ...) are listed in
    ``WeightSet.dropped``.
    """
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
