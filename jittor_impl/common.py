"""Conv-BN-activation block and activation lookup shared by the RT-DETR backbone and hybrid encoder (Jittor).

Differences from torch_ref/common.py:
    - Modules define ``execute`` (Jittor's name for ``forward``).
    - ``relu`` and ``hardsigmoid`` build the ReLU (multi-threaded on CPU) and Hardsigmoid (Jittor has none) of ``jittor_impl.nn``.
    - ``conv`` is :class:`~jittor_impl.nn.Conv2d`: Jittor's, with pointwise convolutions as oneDNN products in the NCHW layout on CPU.
    - ``norm`` is the torch-semantics :class:`~jittor_impl.nn.BatchNorm2d`, not Jittor's ``nn.BatchNorm`` (biased running variance, no batch counter).
    - ``norm.num_batches_tracked`` has shape ``[1]`` (torch: ``[]``; Jittor Vars cannot be 0-dim); checkpoint conversion reshapes it.
"""

from typing import Optional

import jittor as jt
from jittor import nn

from .nn import BatchNorm2d, Conv2d, Hardsigmoid, ReLU

_ACTIVATIONS = {
    "relu": ReLU,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "leaky_relu": nn.LeakyReLU,
    "hardsigmoid": Hardsigmoid,
}


def get_activation(act: Optional[str]) -> nn.Module:
    """New out-of-place activation module by case-insensitive name (``None``: identity); ValueError otherwise."""
    if act is None:
        return nn.Identity()
    if not isinstance(act, str):
        raise ValueError(f"activation must be a string or None, got {type(act).__name__}")
    key = act.lower()
    if key not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; expected one of {sorted(_ACTIVATIONS)} or None")
    return _ACTIVATIONS[key]()


class ConvNormLayer(nn.Module):
    """``conv`` (Conv2d, padding ``(kernel_size - 1) // 2`` if None), ``norm`` (BatchNorm2d), ``act``, in turn."""

    def __init__(
        self,
        ch_in: int,
        ch_out: int,
        kernel_size: int,
        stride: int,
        padding: Optional[int] = None,
        bias: bool = False,
        act: Optional[str] = None,
    ):
        super().__init__()
        if padding is None:
            padding = (kernel_size - 1) // 2
        self.conv = Conv2d(ch_in, ch_out, kernel_size, stride, padding=padding, bias=bool(bias))
        self.norm = BatchNorm2d(ch_out)
        self.act = get_activation(act)

    def execute(self, x: jt.Var) -> jt.Var:
        return self.act(self.norm(self.conv(x)))
