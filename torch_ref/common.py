"""Conv-BN-activation block and activation lookup shared by the RT-DETR backbone and hybrid encoder."""

from typing import Optional

import torch
from torch import nn

_ACTIVATIONS = {
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "leaky_relu": nn.LeakyReLU,
    "hardsigmoid": nn.Hardsigmoid,
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
        self.conv = nn.Conv2d(ch_in, ch_out, kernel_size, stride, padding=padding, bias=bool(bias))
        self.norm = nn.BatchNorm2d(ch_out)
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))
