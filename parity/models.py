"""One set of weights in both frameworks: building, loading and feeding a model pair.

The embedded default needs no download: weights in the official layout drawn from a seeded
stream (:mod:`rtdetr_common.seeded`), images and targets drawn from another. A user's own
weights (``.pth``, ``.pkl``, ``.safetensors``, ``.npz``) replace the seeded ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jittor as jt
import numpy as np
import torch

import jittor_impl.checkpoint as jt_ckpt
import torch_ref.checkpoint as th_ckpt
from jittor_impl import devices as jittor_devices
from rtdetr_common.configs import Size, VariantConfig, spatial_size, variant_at_size
from rtdetr_common.seeded import seeded_state_dict
from torch_ref import build_model as build_torch
from torch_ref import devices as torch_devices

from .convert import check_weightset, read_any
from .ports import KeyFindings, Port, PortParts, key_findings, load_port, load_port_weights


@dataclass
class ModelPair:
    """The reference and the port, holding identical weights.

    Attributes:
        cfg: The variant config both were built from.
        torch_model: torch_ref RTDETR.
        jittor_model: The port's model (jittor_impl's RTDETR by default).
        weights_source: Where the weights came from (a path or ``seeded:<seed>``).
        entry: Which state_dict of the source was loaded (``ema``/``model``/``seeded``).
        device: Where both compute (``cpu`` / ``cuda``, see :mod:`rtdetr_common.devices`).
        torch_device: The torch model's device.
        port: The port under test (:mod:`parity.ports`); jittor_impl by default.
        port_parts: What the port's factory built (criterion, postprocessor, output options).
        findings: The port's state-dict names against the official layout (external ports).
    """

    cfg: VariantConfig
    torch_model: torch.nn.Module
    jittor_model: Any
    weights_source: str
    entry: str
    device: str = "cpu"
    torch_device: torch.device = torch.device("cpu")
    port: Port | None = None
    port_parts: PortParts | None = None
    findings: KeyFindings | None = None

    @property
    def external(self) -> bool:
        """Whether the port under test is another than jittor_impl (its hooks are then absent)."""
        return self.port is not None and not self.port.is_default

    def eval(self) -> "ModelPair":
        """Both models to eval mode."""
        self.torch_model.eval()
        self.jittor_model.eval()
        return self

    def train(self) -> "ModelPair":
        """Both models to train mode."""
        self.torch_model.train()
        self.jittor_model.train()
        return self


def build_pair(variant: str, *, num_classes: int = 80, size: Size | None = 640,
               weights: str | Path | None = None, seed: int = 0, prefer: str = "ema",
               device: str = "cpu", port: Port | None = None) -> ModelPair:
    """Builds both models and loads one set of weights into both, strictly.

    Args:
        variant: Official variant name.
        num_classes: Class count (must match the weights when a file is given).
        size: Eval-time spatial size for precomputed anchors and position embeddings: one
            int (square), an ``(h, w)`` pair, or None (computed on the fly).
        weights: A weight file, or None for the seeded embedded default.
        seed: Seed of the default weights and of both models' shared random streams.
        prefer: Which entry of a checkpoint to load (``ema`` first, as officially).
        device: ``cpu`` or ``cuda``: both frameworks compute there.
        port: The Jittor port (default jittor_impl, loaded strictly). Another port is loaded
            through its key map with every tensor that has a same-shaped place, and the
            findings on its names are kept in :attr:`ModelPair.findings`.

    Raises:
        DeviceUnavailableError: If a framework cannot use ``device``.
        PortError: If the port's factory fails.
    """
    torch_device = torch_devices.use(device)
    jittor_devices.use(device)
    cfg = variant_at_size(variant, num_classes, size)
    torch_model = build_torch(cfg, multi_scale=False, seed=seed)
    port = port or load_port()
    parts = port.build(variant, num_classes, None if size is None else spatial_size(size), seed,
                       config=cfg)
    jittor_model = parts.model
    if weights is None:
        state_dict = seeded_state_dict(th_ckpt.state_dict_specs(torch_model.state_dict()), seed)
        source, entry = f"seeded:{seed}", "seeded"
    else:
        ws = read_any(weights)
        check_weightset(ws, variant, str(weights), num_classes)
        state_dict, entry = ws.preferred(prefer)
        source = str(weights)
    th_ckpt.load_state_dict_strict(
        torch_model, {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, source)
    findings = None
    if port.is_default:
        jt_ckpt.load_state_dict_strict(jittor_model, state_dict, source)
    else:
        findings = key_findings(
            {k: tuple(v.shape) for k, v in torch_model.state_dict().items()},
            {k: tuple(v.shape) for k, v in jittor_model.state_dict().items()}, port.key_map,
            {k for k, _ in torch_model.named_buffers()})
        findings.loaded = load_port_weights(jittor_model, state_dict, port.key_map)
    torch_model.to(torch_device)
    return ModelPair(cfg, torch_model, jittor_model, source, entry, device, torch_device, port,
                     parts, findings)


def to_torch(tree: Any, device: torch.device | None = None) -> Any:
    """numpy leaves -> torch tensors (nested dicts/lists), on ``device`` when given."""
    if isinstance(tree, dict):
        return {k: to_torch(v, device) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_torch(v, device) for v in tree)
    tensor = torch.from_numpy(np.array(tree))
    return tensor if device is None else tensor.to(device)


def to_jittor(tree: Any) -> Any:
    """numpy leaves -> Jittor Vars (nested dicts/lists), dtypes kept (int64 stays int64)."""
    if isinstance(tree, dict):
        return {k: to_jittor(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_jittor(v) for v in tree)
    arr = np.array(tree)
    var = jt.array(arr)
    return var.int64() if arr.dtype == np.int64 else var
