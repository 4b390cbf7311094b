"""PResNet backbone of RT-DETR (ResNet-vd family ported from PaddleDetection).

Module and attribute names follow the official ``rtdetr_pytorch`` PResNet, so that official
checkpoints load key for key.
"""

from collections import OrderedDict
from typing import List, Sequence

import torch
from torch import nn
from torch.nn.functional import max_pool2d

from .common import ConvNormLayer, get_activation

__all__ = ["FrozenBatchNorm2d", "BasicBlock", "BottleNeck", "Blocks", "PResNet"]

RESNET_CFG = {
    18: [2, 2, 2, 2],
    34: [3, 4, 6, 3],
    50: [3, 4, 6, 3],
    101: [3, 4, 23, 3],
}

VARIANTS = ("a", "b", "c", "d")


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters, all buffers (no ``num_batches_tracked``)."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        """Drops a ``num_batches_tracked`` entry before the default loading."""
        tracked_key = prefix + "num_batches_tracked"
        if tracked_key in state_dict:
            del state_dict[tracked_key]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns ``x * scale + shift``, ``scale = weight / sqrt(running_var + eps)``,
        ``shift = bias - running_mean * scale``."""
        w = self.weight.reshape(1, -1, 1, 1)  # [1, c, 1, 1], as b, rv and rm
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * torch.rsqrt(rv + self.eps)
        shift = b - rm * scale
        return x * scale + shift

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def _make_shortcut(ch_in: int, ch_out: int, stride: int, variant: str) -> nn.Module:
    """Projection shortcut: a strided 1x1 ConvNormLayer, or for variant ``'d'`` at stride 2 an
    average pooling followed by a stride-1 one."""
    if variant == "d" and stride == 2:
        return nn.Sequential(OrderedDict([
            ("pool", nn.AvgPool2d(2, 2, 0, ceil_mode=True)),
            ("conv", ConvNormLayer(ch_in, ch_out, 1, 1)),
        ]))
    return ConvNormLayer(ch_in, ch_out, 1, stride)


class BasicBlock(nn.Module):
    """Two 3x3 ConvNormLayers with a residual connection (ResNet-18/34).

    ``branch2a`` carries the stride; ``shortcut`` adds the input itself, otherwise its projection ``short``.
    """

    expansion = 1

    def __init__(self, ch_in: int, ch_out: int, stride: int, shortcut: bool,
                 act: str = "relu", variant: str = "b"):
        super().__init__()
        self.shortcut = shortcut
        if not shortcut:
            self.short = _make_shortcut(ch_in, ch_out, stride, variant)
        self.branch2a = ConvNormLayer(ch_in, ch_out, 3, stride, act=act)
        self.branch2b = ConvNormLayer(ch_out, ch_out, 3, 1, act=None)
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[bs, ch_in, h, w]`` -> ``[bs, ch_out, h / stride, w / stride]``."""
        out = self.branch2a(x)
        out = self.branch2b(out)
        if self.shortcut:
            short = x
        else:
            short = self.short(x)
        return self.act(out + short)


class BottleNeck(nn.Module):
    """1x1 - 3x3 - 1x1 bottleneck with a residual connection (ResNet-50/101), ``ch_out * 4`` channels out.

    The stride is on ``branch2a`` for variant ``'a'``, on ``branch2b`` otherwise; ``shortcut`` as in BasicBlock.
    """

    expansion = 4

    def __init__(self, ch_in: int, ch_out: int, stride: int, shortcut: bool,
                 act: str = "relu", variant: str = "b"):
        super().__init__()
        if variant == "a":
            stride1, stride2 = stride, 1
        else:
            stride1, stride2 = 1, stride
        width = ch_out
        self.branch2a = ConvNormLayer(ch_in, width, 1, stride1, act=act)
        self.branch2b = ConvNormLayer(width, width, 3, stride2, act=act)
        self.branch2c = ConvNormLayer(width, ch_out * self.expansion, 1, 1)
        self.shortcut = shortcut
        if not shortcut:
            self.short = _make_shortcut(ch_in, ch_out * self.expansion, stride, variant)
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[bs, ch_in, h, w]`` -> ``[bs, ch_out * 4, h / stride, w / stride]``."""
        out = self.branch2a(x)
        out = self.branch2b(out)
        out = self.branch2c(out)
        if self.shortcut:
            short = x
        else:
            short = self.short(x)
        return self.act(out + short)


class Blocks(nn.Module):
    """One ResNet stage (``stage_num`` 2 to 5) of ``count`` blocks.

    The first block projects its shortcut and, except in stage 2, halves the resolution.
    """

    def __init__(self, block: type, ch_in: int, ch_out: int, count: int, stage_num: int,
                 act: str = "relu", variant: str = "b"):
        super().__init__()
        self.blocks = nn.ModuleList()
        for i in range(count):
            first = i == 0
            stride = 2 if first and stage_num != 2 else 1
            self.blocks.append(block(ch_in, ch_out, stride=stride, shortcut=not first,
                                     act=act, variant=variant))
            ch_in = ch_out * block.expansion

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for block in self.blocks:
            out = block(out)
        return out


class PResNet(nn.Module):
    """ResNet backbone in the PaddlePaddle layout used by RT-DETR.

    Returns the outputs of the stages in ``return_idx`` (``out_channels`` / ``out_strides`` describe them).
    ``conv1`` is the stem (``conv1_1``, plus ``conv1_2`` and ``conv1_3`` for variants c/d), ``res_layers``
    the stages. ``freeze_at >= 0`` freezes the stem and the first ``freeze_at`` stages; ``freeze_norm``
    replaces every BatchNorm2d by :class:`FrozenBatchNorm2d`; ``pretrained`` must be False.
    """

    # The max pooling after the stem.
    STEM_POOL = {"kernel_size": 3, "stride": 2, "padding": 1}

    def __init__(
        self,
        depth: int,
        variant: str = "d",
        num_stages: int = 4,
        return_idx: Sequence[int] = (0, 1, 2, 3),
        act: str = "relu",
        freeze_at: int = -1,
        freeze_norm: bool = True,
        pretrained: bool = False,
    ):
        super().__init__()
        if depth not in RESNET_CFG:
            raise ValueError(f"unsupported PResNet depth {depth}; expected one of {sorted(RESNET_CFG)}")
        if variant not in VARIANTS:
            raise ValueError(f"unsupported PResNet variant {variant!r}; expected one of {VARIANTS}")
        if not 1 <= num_stages <= 4:
            raise ValueError(f"num_stages must be between 1 and 4, got {num_stages}")
        return_idx = list(return_idx)
        for idx in return_idx:
            if not 0 <= idx < num_stages:
                raise ValueError(f"return_idx entry {idx} is outside [0, {num_stages})")
        if pretrained:
            raise ValueError("pretrained=True is not supported: backbone weights cannot be downloaded; "
                             "load a checkpoint instead")

        block_nums = RESNET_CFG[depth]
        ch_in = 64
        if variant in ("c", "d"):
            stem_def = [
                (3, ch_in // 2, 3, 2, "conv1_1"),
                (ch_in // 2, ch_in // 2, 3, 1, "conv1_2"),
                (ch_in // 2, ch_in, 3, 1, "conv1_3"),
            ]
        else:
            stem_def = [(3, ch_in, 7, 2, "conv1_1")]
        self.conv1 = nn.Sequential(OrderedDict([
            (name, ConvNormLayer(c_in, c_out, k, s, act=act)) for c_in, c_out, k, s, name in stem_def
        ]))

        ch_out_list = [64, 128, 256, 512]
        block = BottleNeck if depth >= 50 else BasicBlock
        all_out_channels = [block.expansion * v for v in ch_out_list]
        all_out_strides = [4, 8, 16, 32]

        self.res_layers = nn.ModuleList()
        for i in range(num_stages):
            self.res_layers.append(Blocks(block, ch_in, ch_out_list[i], block_nums[i], i + 2,
                                          act=act, variant=variant))
            ch_in = all_out_channels[i]

        self.return_idx = return_idx
        self.out_channels = [all_out_channels[i] for i in return_idx]
        self.out_strides = [all_out_strides[i] for i in return_idx]

        if freeze_at >= 0:
            self._freeze_parameters(self.conv1)
            for i in range(min(freeze_at, num_stages)):
                self._freeze_parameters(self.res_layers[i])
        if freeze_norm:
            self._freeze_norm(self)

    @staticmethod
    def _freeze_parameters(module: nn.Module) -> None:
        """Sets ``requires_grad=False`` on every parameter of ``module``."""
        for p in module.parameters():
            p.requires_grad_(False)

    @classmethod
    def _freeze_norm(cls, module: nn.Module) -> None:
        """Recursively replaces BatchNorm2d descendants by FrozenBatchNorm2d copies (same eps, statistics)."""
        for name, child in module.named_children():
            if isinstance(child, nn.BatchNorm2d):
                frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
                with torch.no_grad():
                    frozen.weight.copy_(child.weight)
                    frozen.bias.copy_(child.bias)
                    frozen.running_mean.copy_(child.running_mean)
                    frozen.running_var.copy_(child.running_var)
                setattr(module, name, frozen)
            else:
                cls._freeze_norm(child)

    def stem_pool(self, x: torch.Tensor) -> torch.Tensor:
        """The stem's max pooling; a method, so that a parity check can shadow it on one model."""
        return max_pool2d(x, **self.STEM_POOL)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Returns one ``[bs, out_channels[i], H / out_strides[i], W / out_strides[i]]`` map per stage."""
        stem = self.conv1(x)
        x = self.stem_pool(stem)
        outs = []
        for idx, stage in enumerate(self.res_layers):
            x = stage(x)
            if idx in self.return_idx:
                outs.append(x)
        return outs
