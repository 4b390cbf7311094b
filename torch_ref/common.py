"""Building blocks shared by the RT-DETR backbone and hybrid encoder.

Both official PResNet and the official HybridEncoder use the same
convolution / batch-norm / activation block with attributes ``conv``,
``norm`` and ``act``; it lives here once.
"""

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
    """Builds an activation module from its name.

    The official code switches ReLU/SiLU/LeakyReLU to in-place mode; that does
    not change any value, so the modules here are created out of place.

    Args:
        act: One of ``'relu'``, ``'silu'``, ``'gelu'``, ``'leaky_relu'``,
            ``'hardsigmoid'`` (case-insensitive), or ``None`` for identity.

    Returns:
        A fresh activation module (``nn.Identity`` when ``act`` is ``None``).

    Raises:
        ValueError: If ``act`` is neither ``None`` nor a known name.
    """
    if act is None:
        return nn.Identity()
    if not isinstance(act, str):
        raise ValueError(f"activation must be a string or None, got {type(act).__name__}")
    key = act.lower()
    if key not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; expected one of {sorted(_ACTIVATIONS)} or None")
    return _ACTIVATIONS[key]()


class ConvNormLayer(nn.Module):
    """Conv2d followed by BatchNorm2d and an activation.

    Attributes:
        conv: The ``nn.Conv2d``.
        norm: The ``nn.BatchNorm2d`` over ``ch_out`` channels.
        act: The activation module (``nn.Identity`` when ``act`` is ``None``).
    """

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
        """Initialises the layer.

        Args:
            ch_in: Number of input channels.
            ch_out: Number of output channels.
            kernel_size: Square kernel size.
            stride: Convolution stride.
            padding: Zero padding; ``(kernel_size - 1) // 2`` when ``None``.
            bias: Whether the convolution has a bias term.
            act: Activation name passed to :func:`get_activation`.
        """
        super().__init__()
        if padding is None:
            padding = (kernel_size - 1) // 2
        self.conv = nn.Conv2d(ch_in, ch_out, kernel_size, stride, padding=padding, bias=bool(bias))
        self.norm = nn.BatchNorm2d(ch_out)
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Applies conv, norm and activation.

        Args:
            x: Input of shape ``[bs, ch_in, h, w]``.

        Returns:
            Tensor of shape ``[bs, ch_out, h', w']``.
        """
        return self.act(self.norm(self.conv(x)))
