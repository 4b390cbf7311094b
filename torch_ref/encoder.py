"""Hybrid encoder of RT-DETR: intra-scale attention (AIFI) plus CNN-based cross-scale fusion (CCFM).

Module and attribute names follow the official ``rtdetr_pytorch`` HybridEncoder, so official
checkpoints load key for key.
"""

import copy
from typing import List, Optional, Sequence

import torch
from torch import nn
import torch.nn.functional as F

from .common import ConvNormLayer, get_activation

__all__ = [
    "RepVggBlock",
    "CSPRepLayer",
    "TransformerEncoderLayer",
    "TransformerEncoder",
    "HybridEncoder",
]


class RepVggBlock(nn.Module):
    """RepVGG block: parallel 3x3 and 1x1 conv-BN branches, summed, then ``act``; ``conv`` once fused."""

    def __init__(self, ch_in: int, ch_out: int, act: Optional[str] = "relu"):
        super().__init__()
        self.ch_in = ch_in
        self.ch_out = ch_out
        self.conv1 = ConvNormLayer(ch_in, ch_out, 3, 1, padding=1, act=None)
        self.conv2 = ConvNormLayer(ch_in, ch_out, 1, 1, padding=0, act=None)
        self.act = get_activation(act)
        self.conv = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[bs, ch_in, h, w]`` -> ``[bs, ch_out, h, w]``."""
        if self.conv is not None:
            y = self.conv(x)
        else:
            y = self.conv1(x) + self.conv2(x)
        return self.act(y)

    def convert_to_deploy(self) -> None:
        """Fuses both branches into one 3x3 ``conv`` with bias, equal to them in eval mode.

        The branch modules are kept, as in the official code, so the state dict gains ``conv.*``.
        """
        kernel, bias = self.get_equivalent_kernel_bias()
        if self.conv is None:
            self.conv = nn.Conv2d(self.ch_in, self.ch_out, 3, 1, padding=1,
                                  device=kernel.device, dtype=kernel.dtype)
        with torch.no_grad():
            self.conv.weight.copy_(kernel)
            self.conv.bias.copy_(bias)

    def get_equivalent_kernel_bias(self):
        """The 3x3 ``(kernel, bias)`` equivalent to both branches."""
        with torch.no_grad():
            kernel3x3, bias3x3 = self._fuse_bn_tensor(self.conv1)
            kernel1x1, bias1x1 = self._fuse_bn_tensor(self.conv2)
            kernel1x1_padded = F.pad(kernel1x1, [1, 1, 1, 1])  # [ch_out, ch_in, 3, 3]
        return kernel3x3 + kernel1x1_padded, bias3x3 + bias1x1

    @staticmethod
    def _fuse_bn_tensor(branch: ConvNormLayer):
        """A branch's ``(kernel, bias)`` with its BatchNorm folded into its bias-free conv."""
        kernel = branch.conv.weight
        running_mean = branch.norm.running_mean
        running_var = branch.norm.running_var
        gamma = branch.norm.weight
        beta = branch.norm.bias
        std = (running_var + branch.norm.eps).sqrt()
        t = (gamma / std).reshape(-1, 1, 1, 1)  # [ch_out, 1, 1, 1]
        return kernel * t, beta - running_mean * gamma / std


class CSPRepLayer(nn.Module):
    """CSP layer with a stack of RepVGG blocks (the fusion block of CCFM).

    The hidden width is ``int(out_channels * expansion)``; ``conv3`` maps it to ``out_channels``
    (an Identity when equal).
    """

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int = 3,
                 expansion: float = 1.0, bias: bool = False, act: Optional[str] = "silu"):
        super().__init__()
        hidden_channels = int(out_channels * expansion)
        self.conv1 = ConvNormLayer(in_channels, hidden_channels, 1, 1, bias=bias, act=act)
        self.conv2 = ConvNormLayer(in_channels, hidden_channels, 1, 1, bias=bias, act=act)
        self.bottlenecks = nn.Sequential(*[
            RepVggBlock(hidden_channels, hidden_channels, act=act) for _ in range(num_blocks)
        ])
        if hidden_channels != out_channels:
            self.conv3 = ConvNormLayer(hidden_channels, out_channels, 1, 1, bias=bias, act=act)
        else:
            self.conv3 = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[bs, in_channels, h, w]`` -> ``[bs, out_channels, h, w]``."""
        x_1 = self.bottlenecks(self.conv1(x))
        x_2 = self.conv2(x)
        return self.conv3(x_1 + x_2)


class TransformerEncoderLayer(nn.Module):
    """Transformer encoder layer: self-attention then feed-forward.

    Post-norm unless ``normalize_before``; the position embedding goes into queries and keys only.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048,
                 dropout: float = 0.1, activation: str = "relu", normalize_before: bool = False):
        super().__init__()
        if d_model % nhead != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by nhead ({nhead})")
        self.normalize_before = normalize_before
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = get_activation(activation)

    @staticmethod
    def with_pos_embed(tensor: torch.Tensor, pos_embed: Optional[torch.Tensor]) -> torch.Tensor:
        """Adds ``pos_embed`` to ``tensor`` when it is given."""
        if pos_embed is None:
            return tensor
        return tensor + pos_embed

    def forward(self, src: torch.Tensor, src_mask: Optional[torch.Tensor] = None,
                pos_embed: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``src`` ``[bs, n, d_model]`` -> same shape; ``src_mask`` goes to ``self_attn``."""
        residual = src
        if self.normalize_before:
            src = self.norm1(src)
        q = k = self.with_pos_embed(src, pos_embed)
        src, _ = self.self_attn(q, k, value=src, attn_mask=src_mask)
        src = residual + self.dropout1(src)
        if not self.normalize_before:
            src = self.norm1(src)

        residual = src
        if self.normalize_before:
            src = self.norm2(src)
        src = self.linear2(self.dropout(self.activation(self.linear1(src))))
        src = residual + self.dropout2(src)
        if not self.normalize_before:
            src = self.norm2(src)
        return src


class TransformerEncoder(nn.Module):
    """Stack of ``num_layers`` deep copies of ``encoder_layer``, then the optional ``norm``."""

    def __init__(self, encoder_layer: nn.Module, num_layers: int, norm: Optional[nn.Module] = None):
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(encoder_layer) for _ in range(num_layers)])
        self.num_layers = num_layers
        self.norm = norm

    def forward(self, src: torch.Tensor, src_mask: Optional[torch.Tensor] = None,
                pos_embed: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Runs the layers in order, then ``norm``; ``[bs, n, d]`` -> same shape."""
        output = src
        for layer in self.layers:
            output = layer(output, src_mask=src_mask, pos_embed=pos_embed)
        if self.norm is not None:
            output = self.norm(output)
        return output


class HybridEncoder(nn.Module):
    """RT-DETR hybrid encoder.

    Projects each backbone level to ``hidden_dim``, runs a transformer encoder on the levels in
    ``use_encoder_idx`` (AIFI; ``num_encoder_layers=0`` skips it), then fuses the levels with a top-down
    FPN and a bottom-up PAN of :class:`CSPRepLayer` blocks of ``round(3 * depth_mult)`` RepVGG blocks
    (CCFM). With ``eval_spatial_size`` (``[H, W]``) eval mode uses position embeddings precomputed into
    plain ``pos_embed{idx}`` attributes, outside the state dict.
    """

    def __init__(
        self,
        in_channels: Sequence[int] = (512, 1024, 2048),
        feat_strides: Sequence[int] = (8, 16, 32),
        hidden_dim: int = 256,
        nhead: int = 8,
        dim_feedforward: int = 1024,
        dropout: float = 0.0,
        enc_act: str = "gelu",
        use_encoder_idx: Sequence[int] = (2,),
        num_encoder_layers: int = 1,
        pe_temperature: float = 10000,
        expansion: float = 1.0,
        depth_mult: float = 1.0,
        act: str = "silu",
        eval_spatial_size: Optional[Sequence[int]] = None,
    ):
        super().__init__()
        in_channels = list(in_channels)
        feat_strides = list(feat_strides)
        use_encoder_idx = list(use_encoder_idx)
        if len(in_channels) < 1:
            raise ValueError("in_channels must list at least one level")
        if len(feat_strides) != len(in_channels):
            raise ValueError(f"feat_strides has {len(feat_strides)} entries but in_channels has "
                             f"{len(in_channels)}")
        for idx in use_encoder_idx:
            if not 0 <= idx < len(in_channels):
                raise ValueError(f"use_encoder_idx entry {idx} is outside [0, {len(in_channels)})")
        if eval_spatial_size is not None:
            eval_spatial_size = list(eval_spatial_size)
            if len(eval_spatial_size) != 2:
                raise ValueError(f"eval_spatial_size must be [H, W], got {eval_spatial_size}")

        self.in_channels = in_channels
        self.feat_strides = feat_strides
        self.hidden_dim = hidden_dim
        self.use_encoder_idx = use_encoder_idx
        self.num_encoder_layers = num_encoder_layers
        self.pe_temperature = pe_temperature
        self.eval_spatial_size = eval_spatial_size
        self.out_channels = [hidden_dim for _ in in_channels]
        self.out_strides = list(feat_strides)

        self.input_proj = nn.ModuleList()
        for in_channel in in_channels:
            self.input_proj.append(nn.Sequential(
                nn.Conv2d(in_channel, hidden_dim, kernel_size=1, bias=False),
                nn.BatchNorm2d(hidden_dim),
            ))

        encoder_layer = TransformerEncoderLayer(hidden_dim, nhead=nhead, dim_feedforward=dim_feedforward,
                                                dropout=dropout, activation=enc_act)
        self.encoder = nn.ModuleList([
            TransformerEncoder(copy.deepcopy(encoder_layer), num_encoder_layers) for _ in use_encoder_idx
        ])

        num_blocks = round(3 * depth_mult)
        self.lateral_convs = nn.ModuleList()
        self.fpn_blocks = nn.ModuleList()
        for _ in range(len(in_channels) - 1):
            self.lateral_convs.append(ConvNormLayer(hidden_dim, hidden_dim, 1, 1, act=act))
            self.fpn_blocks.append(CSPRepLayer(hidden_dim * 2, hidden_dim, num_blocks,
                                               expansion=expansion, act=act))

        self.downsample_convs = nn.ModuleList()
        self.pan_blocks = nn.ModuleList()
        for _ in range(len(in_channels) - 1):
            self.downsample_convs.append(ConvNormLayer(hidden_dim, hidden_dim, 3, 2, act=act))
            self.pan_blocks.append(CSPRepLayer(hidden_dim * 2, hidden_dim, num_blocks,
                                               expansion=expansion, act=act))

        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """Precomputes ``pos_embed{idx}`` for ``eval_spatial_size``."""
        if self.eval_spatial_size is None:
            return
        for idx in self.use_encoder_idx:
            stride = self.feat_strides[idx]
            pos_embed = self.build_2d_sincos_position_embedding(
                self.eval_spatial_size[1] // stride, self.eval_spatial_size[0] // stride,
                self.hidden_dim, self.pe_temperature)
            setattr(self, f"pos_embed{idx}", pos_embed)

    @staticmethod
    def build_2d_sincos_position_embedding(w: int, h: int, embed_dim: int = 256,
                                           temperature: float = 10000.0) -> torch.Tensor:
        """Official 2D sin-cos position embedding, ``[1, w*h, embed_dim]`` float32.

        Channels are ``[sin(w), cos(w), sin(h), cos(h)]``; positions in w-major order, as officially.
        """
        if embed_dim % 4 != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by 4 for the 2D sin-cos "
                             f"position embedding")
        grid_w = torch.arange(int(w), dtype=torch.float32)
        grid_h = torch.arange(int(h), dtype=torch.float32)
        grid_w, grid_h = torch.meshgrid(grid_w, grid_h, indexing="ij")  # each [w, h]
        pos_dim = embed_dim // 4
        omega = torch.arange(pos_dim, dtype=torch.float32) / pos_dim
        omega = 1.0 / (temperature ** omega)  # [pos_dim]
        out_w = grid_w.flatten()[:, None] @ omega[None, :]  # [w*h, pos_dim]
        out_h = grid_h.flatten()[:, None] @ omega[None, :]  # [w*h, pos_dim]
        embed = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)  # [w*h, embed_dim]
        return embed[None, :, :]  # [1, w*h, embed_dim]

    def forward(self, feats: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Encodes and fuses one ``[bs, in_channels[i], h_i, w_i]`` map per level to ``hidden_dim`` maps.

        Raises ValueError on a wrong level count, an eval size other than ``eval_spatial_size`` or levels
        that are not exactly a factor 2 apart.
        """
        if len(feats) != len(self.in_channels):
            raise ValueError(f"expected {len(self.in_channels)} feature levels, got {len(feats)}")
        proj_feats = [self.input_proj[i](feat) for i, feat in enumerate(feats)]

        if self.num_encoder_layers > 0:
            for i, enc_ind in enumerate(self.use_encoder_idx):
                h, w = proj_feats[enc_ind].shape[2:]
                src_flatten = proj_feats[enc_ind].flatten(2).permute(0, 2, 1)  # [bs, h*w, c]
                if self.training or self.eval_spatial_size is None:
                    pos_embed = self.build_2d_sincos_position_embedding(
                        w, h, self.hidden_dim, self.pe_temperature).to(src_flatten.device)
                else:
                    pos_embed = getattr(self, f"pos_embed{enc_ind}").to(src_flatten.device)
                    if pos_embed.shape[1] != h * w:
                        raise ValueError(
                            f"level {enc_ind} is {h}x{w} in eval mode but eval_spatial_size "
                            f"{self.eval_spatial_size} precomputed {pos_embed.shape[1]} positions; "
                            f"feed images of that size or build with eval_spatial_size=None")
                memory = self.encoder[i](src_flatten, pos_embed=pos_embed)  # [bs, h*w, c]
                memory = memory.permute(0, 2, 1)  # [bs, c, h*w]
                proj_feats[enc_ind] = memory.reshape(-1, self.hidden_dim, h, w).contiguous()  # [bs, c, h, w]

        num_levels = len(self.in_channels)
        inner_outs = [proj_feats[-1]]
        for idx in range(num_levels - 1, 0, -1):
            feat_high = inner_outs[0]
            feat_low = proj_feats[idx - 1]
            feat_high = self.lateral_convs[num_levels - 1 - idx](feat_high)
            inner_outs[0] = feat_high
            upsample_feat = F.interpolate(feat_high, scale_factor=2.0, mode="nearest")
            if upsample_feat.shape[2:] != feat_low.shape[2:]:
                raise ValueError(
                    f"level {idx} ({tuple(feat_high.shape[2:])}) upsampled x2 does not match level "
                    f"{idx - 1} ({tuple(feat_low.shape[2:])}); image sides must be multiples of the "
                    f"largest stride")
            fused = torch.cat([upsample_feat, feat_low], dim=1)  # [bs, 2*c, h_low, w_low]
            inner_outs.insert(0, self.fpn_blocks[num_levels - 1 - idx](fused))

        outs = [inner_outs[0]]
        for idx in range(num_levels - 1):
            feat_low = outs[-1]
            feat_high = inner_outs[idx + 1]
            downsample_feat = self.downsample_convs[idx](feat_low)
            fused = torch.cat([downsample_feat, feat_high], dim=1)  # [bs, 2*c, h_high, w_high]
            outs.append(self.pan_blocks[idx](fused))
        return outs
