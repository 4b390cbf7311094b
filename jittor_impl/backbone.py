"""PResNet backbone of RT-DETR (ResNet-vd family ported from PaddleDetection), Jittor.

Module and attribute names follow the official ``rtdetr_pytorch`` PResNet so
that official checkpoints load key for key.

Differences from torch_ref/backbone.py:
    - Modules define ``execute`` (Jittor's name for ``forward``).
    - Buffers are ``stop_grad`` Vars listed in ``_buffer_names`` (the project's
      buffer convention) instead of ``register_buffer``: the four Vars of
      :class:`FrozenBatchNorm2d`.
    - :class:`FrozenBatchNorm2d` has no ``_load_from_state_dict`` hook; its
      state dict has no ``num_batches_tracked`` key, and the project's strict
      loader (``jittor_impl.checkpoint``) works on whole state dicts.
    - :class:`FrozenBatchNorm2d` scales and shifts through
      :func:`~jittor_impl._kernels.channel_affine` (an OpenMP kernel on CPU).
    - Freezing (``freeze_at``) calls ``stop_grad`` on the parameters instead of
      ``requires_grad_(False)``; they stay parameters (in the state dict and
      counted) and each owning module lists their names in ``_frozen_names``.
    - :meth:`PResNet._freeze_norm` walks and replaces children with
      :func:`~jittor_impl.nn.named_children` and
      :func:`~jittor_impl.nn.set_child`, because Jittor's ``nn.Sequential``
      keeps its children in a ``layers`` dict rather than as attributes.
    - The shortcut of variant ``'d'`` pools with
      :class:`~jittor_impl.nn.AvgPool2d` and the stem with
      :func:`~jittor_impl._kernels.max_pool2d`, torch's semantics as OpenMP
      kernels on CPU (Jittor's own pooling runs on one thread and refuses
      inputs no larger than the kernel).
"""

from collections import OrderedDict
from typing import List, Sequence

import jittor as jt
from jittor import nn

from ._kernels import channel_affine, max_pool2d
from .common import ConvNormLayer, get_activation
from .nn import AvgPool2d, BatchNorm2d, named_children, named_modules, set_child

__all__ = ["FrozenBatchNorm2d", "BasicBlock", "BottleNeck", "Blocks", "PResNet"]

RESNET_CFG = {
    18: [2, 2, 2, 2],
    34: [3, 4, 6, 3],
    50: [3, 4, 6, 3],
    101: [3, 4, 23, 3],
}

VARIANTS = ("a", "b", "c", "d")


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters.

    ``weight``, ``bias``, ``running_mean`` and ``running_var`` are buffers
    (``stop_grad`` Vars listed in ``_buffer_names``), so they are saved in the
    state dict but never trained. There is no ``num_batches_tracked``.

    Attributes:
        num_features: Number of channels.
        eps: Value added to the variance before the square root.
    """

    _buffer_names = ("weight", "bias", "running_mean", "running_var")

    def __init__(self, num_features: int, eps: float = 1e-5):
        """Initialises identity statistics.

        Args:
            num_features: Number of channels.
            eps: Value added to the variance before the square root.
        """
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.weight = jt.ones((num_features,), "float32").stop_grad()
        self.bias = jt.zeros((num_features,), "float32").stop_grad()
        self.running_mean = jt.zeros((num_features,), "float32").stop_grad()
        self.running_var = jt.ones((num_features,), "float32").stop_grad()

    def execute(self, x: jt.Var) -> jt.Var:
        """Normalises ``x`` with the stored statistics.

        Args:
            x: Input of shape ``[bs, c, h, w]``.

        Returns:
            ``x * scale + shift`` with ``scale = w / sqrt(rv + eps)`` and
            ``shift = b - rm * scale``, same shape as ``x``.
        """
        # [c] each; all four are buffers, so the kernel skips the scale and shift gradients
        scale = (self.weight / jt.sqrt(self.running_var + self.eps)).stop_grad()
        shift = (self.bias - self.running_mean * scale).stop_grad()
        return channel_affine(x, scale, shift)

    def extra_repr(self) -> str:
        """Returns the printable configuration."""
        return f"{self.num_features}, eps={self.eps}"


def _make_shortcut(ch_in: int, ch_out: int, stride: int, variant: str) -> nn.Module:
    """Builds the projection shortcut of a residual block.

    Args:
        ch_in: Input channels.
        ch_out: Output channels.
        stride: Block stride.
        variant: ResNet variant; ``'d'`` with stride 2 uses average pooling
            followed by a stride-1 1x1 conv instead of a strided 1x1 conv.

    Returns:
        The shortcut module.
    """
    if variant == "d" and stride == 2:
        return nn.Sequential(OrderedDict([
            ("pool", AvgPool2d(2, 2, 0, ceil_mode=True)),
            ("conv", ConvNormLayer(ch_in, ch_out, 1, 1)),
        ]))
    return ConvNormLayer(ch_in, ch_out, 1, stride)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34).

    Attributes:
        expansion: Output channel multiplier (1).
        shortcut: Whether the identity is used as the residual.
        short: Projection shortcut (only present when ``shortcut`` is False).
        branch2a: First 3x3 ConvNormLayer (carries the stride).
        branch2b: Second 3x3 ConvNormLayer without activation.
        act: Activation applied after the sum.
    """

    expansion = 1

    def __init__(self, ch_in: int, ch_out: int, stride: int, shortcut: bool,
                 act: str = "relu", variant: str = "b"):
        """Initialises the block.

        Args:
            ch_in: Input channels.
            ch_out: Output channels.
            stride: Stride of the first convolution and of the shortcut.
            shortcut: Use the identity as residual (True) or a projection.
            act: Activation name.
            variant: ResNet variant (``'a'``-``'d'``).
        """
        super().__init__()
        self.shortcut = shortcut
        if not shortcut:
            self.short = _make_shortcut(ch_in, ch_out, stride, variant)
        self.branch2a = ConvNormLayer(ch_in, ch_out, 3, stride, act=act)
        self.branch2b = ConvNormLayer(ch_out, ch_out, 3, 1, act=None)
        self.act = get_activation(act)

    def execute(self, x: jt.Var) -> jt.Var:
        """Runs the block.

        Args:
            x: Input of shape ``[bs, ch_in, h, w]``.

        Returns:
            Tensor of shape ``[bs, ch_out, h / stride, w / stride]``.
        """
        out = self.branch2a(x)
        out = self.branch2b(out)
        if self.shortcut:
            short = x
        else:
            short = self.short(x)
        return self.act(out + short)


class BottleNeck(nn.Module):
    """1x1 - 3x3 - 1x1 bottleneck with a residual connection (ResNet-50/101).

    Attributes:
        expansion: Output channel multiplier (4).
        branch2a: 1x1 reduction (carries the stride for variant ``'a'``).
        branch2b: 3x3 conv (carries the stride for variants ``'b'``-``'d'``).
        branch2c: 1x1 expansion without activation.
        shortcut: Whether the identity is used as the residual.
        short: Projection shortcut (only present when ``shortcut`` is False).
        act: Activation applied after the sum.
    """

    expansion = 4

    def __init__(self, ch_in: int, ch_out: int, stride: int, shortcut: bool,
                 act: str = "relu", variant: str = "b"):
        """Initialises the block.

        Args:
            ch_in: Input channels.
            ch_out: Bottleneck width; the block outputs ``ch_out * 4`` channels.
            stride: Block stride.
            shortcut: Use the identity as residual (True) or a projection.
            act: Activation name.
            variant: ResNet variant (``'a'``-``'d'``).
        """
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

    def execute(self, x: jt.Var) -> jt.Var:
        """Runs the block.

        Args:
            x: Input of shape ``[bs, ch_in, h, w]``.

        Returns:
            Tensor of shape ``[bs, ch_out * 4, h / stride, w / stride]``.
        """
        out = self.branch2a(x)
        out = self.branch2b(out)
        out = self.branch2c(out)
        if self.shortcut:
            short = x
        else:
            short = self.short(x)
        return self.act(out + short)


class Blocks(nn.Module):
    """One ResNet stage: a sequence of residual blocks.

    Attributes:
        blocks: ``nn.ModuleList`` of residual blocks.
    """

    def __init__(self, block: type, ch_in: int, ch_out: int, count: int, stage_num: int,
                 act: str = "relu", variant: str = "b"):
        """Initialises the stage.

        The first block projects its shortcut and, except in stage 2, halves
        the resolution; the others keep the identity shortcut.

        Args:
            block: ``BasicBlock`` or ``BottleNeck``.
            ch_in: Input channels of the stage.
            ch_out: ``ch_out`` argument of each block.
            count: Number of blocks.
            stage_num: Stage number (2 to 5).
            act: Activation name.
            variant: ResNet variant.
        """
        super().__init__()
        self.blocks = nn.ModuleList()
        for i in range(count):
            first = i == 0
            stride = 2 if first and stage_num != 2 else 1
            self.blocks.append(block(ch_in, ch_out, stride=stride, shortcut=not first,
                                     act=act, variant=variant))
            ch_in = ch_out * block.expansion

    def execute(self, x: jt.Var) -> jt.Var:
        """Runs the blocks in order.

        Args:
            x: Input of shape ``[bs, ch_in, h, w]``.

        Returns:
            Output of the last block.
        """
        out = x
        for block in self.blocks:
            out = block(out)
        return out


class PResNet(nn.Module):
    """ResNet backbone in the PaddlePaddle layout used by RT-DETR.

    Attributes:
        conv1: Stem, an ``nn.Sequential`` of ConvNormLayers named ``conv1_1``
            (and ``conv1_2``, ``conv1_3`` for the deep-stem variants c/d).
        res_layers: ``nn.ModuleList`` of :class:`Blocks`, one per stage.
        return_idx: Indices of the stages whose outputs are returned.
        out_channels: Channels of each returned feature map.
        out_strides: Strides of each returned feature map.
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
        """Builds the backbone.

        Args:
            depth: 18, 34, 50 or 101.
            variant: ``'a'``, ``'b'``, ``'c'`` or ``'d'``.
            num_stages: Number of residual stages to build (1 to 4).
            return_idx: Stage indices (0-based, < ``num_stages``) to return.
            act: Activation name.
            freeze_at: If >= 0, the parameters of the stem and of the first
                ``freeze_at`` stages are made ``stop_grad`` (torch:
                ``requires_grad=False``).
            freeze_norm: Replace every :class:`~jittor_impl.nn.BatchNorm2d` by
                :class:`FrozenBatchNorm2d`.
            pretrained: Must be False; weights cannot be downloaded here.

        Raises:
            ValueError: On an unsupported depth, variant, stage count or
                return index, or when ``pretrained`` is True.
        """
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
        """Makes every parameter of ``module`` and its descendants ``stop_grad``.

        Buffers (names in ``_buffer_names``) are skipped; each module that owns
        frozen parameters lists their attribute names in ``_frozen_names``.

        Args:
            module: Module whose parameters are frozen in place.
        """
        for _, sub in named_modules(module):
            buffers = getattr(sub, "_buffer_names", ())
            names = [name for name, value in vars(sub).items()
                     if isinstance(value, jt.Var) and not name.startswith("_") and name not in buffers]
            for name in names:
                getattr(sub, name).stop_grad()
            frozen = tuple(getattr(sub, "_frozen_names", ()))
            sub._frozen_names = frozen + tuple(name for name in names if name not in frozen)

    @classmethod
    def _freeze_norm(cls, module: nn.Module) -> None:
        """Recursively replaces the :class:`BatchNorm2d` children of ``module``.

        Each replacement :class:`FrozenBatchNorm2d` takes the channel count,
        eps and current statistics of the layer it replaces.

        Args:
            module: Module whose descendants are converted in place.
        """
        for name, child in named_children(module):
            if isinstance(child, BatchNorm2d):
                frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
                with jt.no_grad():
                    frozen.weight.update(child.weight.detach())
                    frozen.bias.update(child.bias.detach())
                    frozen.running_mean.update(child.running_mean.detach())
                    frozen.running_var.update(child.running_var.detach())
                set_child(module, name, frozen)
            else:
                cls._freeze_norm(child)

    def stem_pool(self, x: jt.Var) -> jt.Var:
        """The stem's max pooling (:data:`STEM_POOL`); a method, so that a parity check can
        shadow it on one model."""
        return max_pool2d(x, **self.STEM_POOL)

    def execute(self, x: jt.Var) -> List[jt.Var]:
        """Extracts multi-scale features.

        Args:
            x: Images of shape ``[bs, 3, H, W]``.

        Returns:
            List of feature maps, one per ``return_idx`` entry, each of shape
            ``[bs, out_channels[i], H / out_strides[i], W / out_strides[i]]``.
        """
        stem = self.conv1(x)
        x = self.stem_pool(stem)
        outs = []
        for idx, stage in enumerate(self.res_layers):
            x = stage(x)
            if idx in self.return_idx:
                outs.append(x)
        return outs
