"""PyTorch reference RT-DETR, exact to the official ``rtdetr_pytorch`` checkpoints and numerics.

``from torch_ref import build_model``; ``build_model("r50vd", num_classes=80)``.
"""

from .build import (build_criterion, build_ema, build_matcher, build_model, build_optimizer,
                    build_port, build_postprocessor)
from .checkpoint import load_checkpoint, load_state_dict_strict, read_checkpoint

__all__ = [
    "build_model",
    "build_matcher",
    "build_criterion",
    "build_postprocessor",
    "build_optimizer",
    "build_ema",
    "build_port",
    "load_checkpoint",
    "load_state_dict_strict",
    "read_checkpoint",
]
