"""RT-DETR v1 transformer decoder (the official ``RTDETRTransformer``) in Jittor.

The decoder projects the encoder maps to ``hidden_dim`` and flattens them into one memory, scores
every memory position (the "encoder head"), keeps the ``num_queries`` best as initial queries and
anchors, and refines them through layers of self-attention, multi-scale deformable cross-attention
and an FFN, predicting boxes and logits after each. Names, shapes and numerics follow the official
``rtdetr_decoder.py``, so that official checkpoints load key for key.

Differences from torch_ref/decoder.py:
- ``forward`` is Jittor's ``execute``; ``self.training`` is ``self.is_training()``.
- ``F.grid_sample(mode='bilinear', padding_mode='zeros', align_corners=False)`` is :func:`grid_sample_bilinear` (Jittor's ``nn.grid_sample`` differs).
- :func:`deformable_attention_core_func` works channels-last, each head's channels innermost from value projection to output.
- On CPU, ``MSDeformableAttention.sample`` calls :func:`~jittor_impl._kernels.ms_deform_attn` (OpenMP kernels, same arithmetic).
- ``MSDeformableAttention.sample`` and the functions under it take the Jittor-only ``cells`` (bilinear cells a parity check forces).
- ``nn.Linear`` and ``nn.Conv2d`` are the torch-semantics ``Linear`` and ``Conv2d`` (oneDNN products on CPU).
- ``nn.MultiheadAttention``, ``nn.BatchNorm2d``, ``nn.LayerNorm`` and ``nn.Dropout`` are the torch-semantics layers (Jittor's own differ in names or statistics).
- ``nn.Embedding(..., padding_idx=...)`` is :class:`Embedding` below: Jittor's sends the padding row gradient; PyTorch's never does.
- ``anchors``, ``valid_mask``, ``last_topk_ind`` and ``forced_topk_ind`` are properties over ``_``-prefixed attributes, out of the state dict.
- ``torch.topk`` is ``jt.topk``, an argsort: exactly tied scores may come in another order; its int32 indices are cast to int64.
- ``gather`` / ``torch.split`` / ``tile`` / ``F.sigmoid`` are ``jt.gather`` / ``jt.split`` / ``repeat`` / ``jt.sigmoid``.
- The attention weights' ``F.softmax`` is :func:`~jittor_impl._kernels.softmax_last` (an OpenMP kernel on CPU).
- The memory's ``flatten(2).permute(0, 2, 1)`` is :func:`~jittor_impl._kernels.swap_last_axes` (a parallel CPU transpose).
- ``_generate_anchors`` computes the anchors with numpy, so that they equal PyTorch's bit for bit (Jittor's CPU kernels use fast math).
- ``_generate_anchors`` has no ``device`` argument and takes ``dtype`` as a Jittor dtype name.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import jittor as jt
import numpy as np
from jittor import init, nn

from rtdetr_common.random import SharedRandom

from ._kernels import ms_deform_attn, softmax_last, swap_last_axes, uses_kernel
from .box_ops import inverse_sigmoid
from .common import get_activation
from .nn import BatchNorm2d, Conv2d, Dropout, LayerNorm, Linear, MultiheadAttention
from .denoising import get_contrastive_denoising_training_group

__all__ = [
    "bias_init_with_prob",
    "Embedding",
    "MLP",
    "grid_sample_bilinear",
    "deformable_attention_core_func",
    "MSDeformableAttention",
    "TransformerDecoderLayer",
    "TransformerDecoder",
    "RTDETRTransformer",
]


def bias_init_with_prob(prior_prob: float = 0.01) -> float:
    """Bias that makes a sigmoid output ``prior_prob`` for a zero input: ``-log((1 - p) / p)``."""
    return float(-math.log((1 - prior_prob) / prior_prob))


class Embedding(nn.Module):
    """Lookup table with PyTorch's ``nn.Embedding`` semantics (Jittor-only helper).

    The weights start as ``N(0, 1)``; the ``padding_idx`` row starts at zero and never receives gradient.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: Optional[int] = None) -> None:
        super().__init__()
        if padding_idx is not None and not -num_embeddings <= padding_idx < num_embeddings:
            raise ValueError(f"padding_idx must be in [{-num_embeddings}, {num_embeddings}), got {padding_idx}")
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx % num_embeddings if padding_idx is not None else None
        self.weight = init.gauss((num_embeddings, embedding_dim), "float32")
        if self.padding_idx is not None:
            keep = np.ones((num_embeddings, 1), dtype=np.float32)
            keep[self.padding_idx] = 0.0
            self.weight.update(self.weight * jt.array(keep))

    def execute(self, x: jt.Var) -> jt.Var:
        """Looks the rows up: ``[...]`` indices -> ``[..., embedding_dim]``."""
        weight = self.weight
        if self.padding_idx is not None:
            # [num_embeddings, 1]: 0 for the padding row, read from a detached copy (no gradient)
            keep = (jt.arange(self.num_embeddings) != self.padding_idx).cast(weight.dtype).unsqueeze(1)
            weight = weight * keep + weight.detach() * (1.0 - keep)
        return weight[x]


class MLP(nn.Module):
    """Stack of ``num_layers`` linear layers with activation ``act`` between them (none after the last)."""

    def __init__(
        self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int, act: Optional[str] = "relu"
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"MLP needs num_layers >= 1, got {num_layers}")
        self.num_layers = num_layers
        hidden = [hidden_dim] * (num_layers - 1)
        in_dims = [input_dim] + hidden
        out_dims = hidden + [output_dim]
        self.layers = nn.ModuleList([Linear(n_in, n_out) for n_in, n_out in zip(in_dims, out_dims)])
        self.act = get_activation(act)

    def execute(self, x: jt.Var) -> jt.Var:
        """Applies the layers: ``[..., input_dim]`` -> ``[..., output_dim]``."""
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < self.num_layers - 1:
                x = self.act(x)
        return x


def grid_sample_bilinear(value: jt.Var, grid: jt.Var, cells: Optional[jt.Var] = None) -> jt.Var:
    """PyTorch's ``F.grid_sample(mode='bilinear', padding_mode='zeros', align_corners=False)``
    on channels-last maps: ``F.grid_sample(value.permute(0, 3, 1, 2), grid).permute(0, 2, 3, 1)``.

    Corner weights follow PyTorch's CPU kernel; corners outside the map contribute zero. One flat gather
    fetches the four corners of every point; gradients reach ``value`` and ``grid``. ``cells`` (optional
    int32 ``[n, h_out, w_out, 2]``) gives each point's top-left column and row instead of ``floor``.
    """
    if value.ndim != 4 or grid.ndim != 4 or grid.shape[-1] != 2 or grid.shape[0] != value.shape[0]:
        raise ValueError(
            f"grid_sample_bilinear expects value [n, h, w, c] and grid [n, h_out, w_out, 2], "
            f"got {tuple(value.shape)} and {tuple(grid.shape)}"
        )
    n, h, w, c = value.shape
    _, h_out, w_out, _ = grid.shape

    # Pixel coordinates (align_corners=False): [n, h_out, w_out] each.
    x = ((grid[..., 0] + 1) * w - 1) / 2
    y = ((grid[..., 1] + 1) * h - 1) / 2
    if cells is None:
        x_w = x.detach().floor()
        y_n = y.detach().floor()
    else:
        x_w = cells[..., 0].cast(x.dtype)
        y_n = cells[..., 1].cast(y.dtype)
    x_e = x_w + 1
    y_s = y_n + 1

    # Distances to the four sides, then one weight per corner (nw, ne, sw, se).
    dist_w = x - x_w
    dist_e = 1 - dist_w
    dist_n = y - y_n
    dist_s = 1 - dist_n
    weights = [dist_s * dist_e, dist_s * dist_w, dist_n * dist_e, dist_n * dist_w]

    in_x = [(x_w >= 0) & (x_w <= w - 1), (x_e >= 0) & (x_e <= w - 1)]
    in_y = [(y_n >= 0) & (y_n <= h - 1), (y_s >= 0) & (y_s <= h - 1)]
    col = [x_w.clamp(0, w - 1).int32(), x_e.clamp(0, w - 1).int32()]
    row = [y_n.clamp(0, h - 1).int32(), y_s.clamp(0, h - 1).int32()]
    # Offset of every map in the flattened rows: [n, 1, 1]
    base = (jt.arange(n).int32() * (h * w)).reshape(n, 1, 1)
    corners = [(0, 0), (0, 1), (1, 0), (1, 1)]  # (row, col) choice of nw, ne, sw, se
    # [4, n*h_out*w_out]
    index = jt.stack([(base + row[i] * w + col[j]).flatten() for i, j in corners])
    # Corner weights, zero for corners outside the map: [4, n*h_out*w_out, 1]
    corner_weights = jt.stack(
        [(weights[k] * (in_y[i] & in_x[j]).cast(value.dtype)).flatten() for k, (i, j) in enumerate(corners)]
    ).unsqueeze(-1)

    # [n, h, w, c] -> [n*h*w, c]
    rows = value.reshape(n * h * w, c)
    # [4, n*h_out*w_out, c] -> [n*h_out*w_out, c]
    output = (rows[index] * corner_weights).sum(0)
    # [n*h_out*w_out, c] -> [n, h_out, w_out, c]
    return output.reshape(n, h_out, w_out, c)


def deformable_attention_core_func(
    value: jt.Var,
    value_spatial_shapes: Sequence[Sequence[int]],
    sampling_locations: jt.Var,
    attention_weights: jt.Var,
    cells: Optional[jt.Var] = None,
) -> jt.Var:
    """Multi-scale deformable attention with bilinear ``grid_sample`` (pure Jittor form).

    ``value``: ``[bs, len_v, n_head, head_dim]``, levels concatenated; ``sampling_locations``: normalised
    ``(x, y)`` ``[bs, len_q, n_head, n_levels, n_points, 2]``, ``[0, 1]`` inside the map; ``attention_weights``:
    ``[bs, len_q, n_head, n_levels, n_points]``. Returns ``[bs, len_q, n_head * head_dim]``.
    ``cells``: optional int32 top-left corners, as in :func:`grid_sample_bilinear`.
    """
    bs, _, n_head, c = value.shape
    _, len_q, _, n_levels, n_points, _ = sampling_locations.shape

    split_shape = [h * w for h, w in value_spatial_shapes]
    value_list = jt.split(value, split_shape, dim=1)
    # grid_sample expects coordinates in [-1, 1].
    sampling_grids = 2 * sampling_locations - 1
    sampling_value_list = []
    for level, (h, w) in enumerate(value_spatial_shapes):
        # [bs, h*w, n_head, c] -> [bs, n_head, h*w, c] -> [bs*n_head, h, w, c]
        value_l = value_list[level].permute(0, 2, 1, 3).reshape(bs * n_head, h, w, c)
        # [bs, len_q, n_head, n_points, 2] -> [bs, n_head, len_q, n_points, 2] -> [bs*n_head, len_q, n_points, 2]
        sampling_grid_l = sampling_grids[:, :, :, level].permute(0, 2, 1, 3, 4).flatten(0, 1)
        # [bs*n_head, len_q, n_points, 2], as the grid
        cells_l = None if cells is None else cells[:, :, :, level].permute(0, 2, 1, 3, 4).flatten(0, 1)
        # [bs*n_head, len_q, n_points, c]
        sampling_value_list.append(grid_sample_bilinear(value_l, sampling_grid_l, cells_l))
    # [bs, len_q, n_head, n_levels, n_points] -> [bs, n_head, len_q, n_levels, n_points]
    # -> [bs*n_head, len_q, n_levels*n_points, 1]
    attention_weights = attention_weights.permute(0, 2, 1, 3, 4).reshape(bs * n_head, len_q, n_levels * n_points, 1)
    # [bs*n_head, len_q, n_levels, n_points, c] -> [bs*n_head, len_q, n_levels*n_points, c]
    sampled = jt.stack(sampling_value_list, dim=2).reshape(bs * n_head, len_q, n_levels * n_points, c)
    # [bs*n_head, len_q, c] -> [bs, n_head, len_q, c] -> [bs, len_q, n_head, c]
    output = (sampled * attention_weights).sum(2).reshape(bs, n_head, len_q, c).permute(0, 2, 1, 3)
    # [bs, len_q, n_head*c]
    return output.reshape(bs, len_q, n_head * c)


class MSDeformableAttention(nn.Module):
    """Multi-scale deformable attention (Deformable DETR) as used by the RT-DETR decoder."""

    def __init__(self, embed_dim: int = 256, num_heads: int = 8, num_levels: int = 4, num_points: int = 4) -> None:
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.total_points = num_heads * num_levels * num_points
        self.head_dim = embed_dim // num_heads

        self.sampling_offsets = Linear(embed_dim, self.total_points * 2)
        self.attention_weights = Linear(embed_dim, self.total_points)
        self.value_proj = Linear(embed_dim, embed_dim)
        self.output_proj = Linear(embed_dim, embed_dim)

        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """Official initialisation: offsets start on a ring of directions, one per head."""
        init.constant_(self.sampling_offsets.weight, 0)
        thetas = jt.arange(self.num_heads).float32() * (2.0 * math.pi / self.num_heads)
        grid_init = jt.stack([thetas.cos(), thetas.sin()], -1)  # [num_heads, 2]
        grid_init = grid_init / grid_init.abs().max(-1, keepdims=True)
        # [num_heads, 2] -> [num_heads, 1, 1, 2] -> [num_heads, num_levels, num_points, 2]
        grid_init = grid_init.reshape(self.num_heads, 1, 1, 2).repeat(1, self.num_levels, self.num_points, 1)
        scaling = jt.arange(1, self.num_points + 1).float32().reshape(1, 1, -1, 1)
        grid_init = grid_init * scaling
        # [num_heads*num_levels*num_points*2]
        self.sampling_offsets.bias.update(grid_init.flatten())

        init.constant_(self.attention_weights.weight, 0)
        init.constant_(self.attention_weights.bias, 0)

        init.xavier_uniform_(self.value_proj.weight)
        init.constant_(self.value_proj.bias, 0)
        init.xavier_uniform_(self.output_proj.weight)
        init.constant_(self.output_proj.bias, 0)

    def execute(
        self,
        query: jt.Var,
        reference_points: jt.Var,
        value: jt.Var,
        value_spatial_shapes: Sequence[Sequence[int]],
        value_mask: Optional[jt.Var] = None,
    ) -> jt.Var:
        """Samples the value maps around the reference points; returns ``[bs, len_q, embed_dim]``.

        ``reference_points``: normalised points ``[bs, len_q, num_levels, 2]`` or cxcywh boxes ``[bs, len_q, n, 4]``
        (``n`` = 1 or ``num_levels``); ``value``: ``[bs, len_v, embed_dim]``, levels concatenated; ``value_mask``:
        optional ``[bs, len_v]``, True for real positions.
        """
        bs, len_q = query.shape[:2]
        len_v = value.shape[1]

        value = self.value_proj(value)
        if value_mask is not None:
            # [bs, len_v, 1]
            value = value * value_mask.cast(value.dtype).unsqueeze(-1)
        # [bs, len_v, num_heads, head_dim]
        value = value.reshape(bs, len_v, self.num_heads, self.head_dim)

        # [bs, len_q, num_heads, num_levels, num_points, 2]
        sampling_offsets = self.sampling_offsets(query).reshape(
            bs, len_q, self.num_heads, self.num_levels, self.num_points, 2
        )
        # [bs, len_q, num_heads, num_levels*num_points]
        attention_weights = self.attention_weights(query).reshape(
            bs, len_q, self.num_heads, self.num_levels * self.num_points
        )
        # [bs, len_q, num_heads, num_levels, num_points]
        attention_weights = softmax_last(attention_weights).reshape(
            bs, len_q, self.num_heads, self.num_levels, self.num_points
        )

        if reference_points.shape[-1] == 2:
            # (w, h) of every level: [1, 1, 1, num_levels, 1, 2]
            offset_normalizer = jt.array(np.asarray(value_spatial_shapes, dtype=np.float32)).cast(query.dtype)
            offset_normalizer = offset_normalizer.flip(1).reshape(1, 1, 1, self.num_levels, 1, 2)
            # [bs, len_q, n, 2] -> [bs, len_q, 1, num_levels, 1, 2]
            ref_xy = reference_points.reshape(bs, len_q, 1, self.num_levels, 1, 2)
            sampling_locations = ref_xy + sampling_offsets / offset_normalizer
        elif reference_points.shape[-1] == 4:
            # [bs, len_q, n, 4] -> [bs, len_q, 1, n, 1, 2] for the centres and the sizes
            ref_xy = reference_points[:, :, None, :, None, :2]
            ref_wh = reference_points[:, :, None, :, None, 2:]
            sampling_locations = ref_xy + sampling_offsets / self.num_points * ref_wh * 0.5
        else:
            raise ValueError(
                f"Last dim of reference_points must be 2 or 4, got {reference_points.shape[-1]}"
            )

        output = self.sample(value, value_spatial_shapes, sampling_locations, attention_weights)
        return self.output_proj(output)

    def sample(self, value: jt.Var, value_spatial_shapes: Sequence[Sequence[int]],
               sampling_locations: jt.Var, attention_weights: jt.Var,
               cells: Optional[jt.Var] = None) -> jt.Var:
        """Bilinear sampling of the values and their weighted sum (the attention core).

        A method, so that a parity check can see and force each layer's sampling locations:
        :func:`~jittor_impl._kernels.ms_deform_attn` or :func:`deformable_attention_core_func`, as
        ``kernels.OPERATORS`` says. ``cells`` (optional int32, a column and row per point) forces
        the top-left corners, not the bilinear weights.
        """
        if not uses_kernel("ms_deform_attn"):
            return deformable_attention_core_func(value, value_spatial_shapes, sampling_locations,
                                                  attention_weights, cells)
        return ms_deform_attn(value, value_spatial_shapes, sampling_locations, attention_weights, cells)


class TransformerDecoderLayer(nn.Module):
    """Post-norm decoder layer: self-attention, deformable cross-attention, FFN."""

    def __init__(
        self,
        d_model: int = 256,
        n_head: int = 8,
        dim_feedforward: int = 1024,
        dropout: float = 0.0,
        activation: str = "relu",
        n_levels: int = 4,
        n_points: int = 4,
    ) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, n_head, dropout=dropout, batch_first=True)
        self.dropout1 = Dropout(dropout)
        self.norm1 = LayerNorm(d_model)

        self.cross_attn = MSDeformableAttention(d_model, n_head, n_levels, n_points)
        self.dropout2 = Dropout(dropout)
        self.norm2 = LayerNorm(d_model)

        self.linear1 = Linear(d_model, dim_feedforward)
        self.activation = get_activation(activation)
        self.dropout3 = Dropout(dropout)
        self.linear2 = Linear(dim_feedforward, d_model)
        self.dropout4 = Dropout(dropout)
        self.norm3 = LayerNorm(d_model)

    @staticmethod
    def with_pos_embed(tensor: jt.Var, pos: Optional[jt.Var]) -> jt.Var:
        """``tensor + pos``, or ``tensor`` when ``pos`` is None."""
        return tensor if pos is None else tensor + pos

    def forward_ffn(self, tgt: jt.Var) -> jt.Var:
        """Feed-forward block ``linear2(dropout3(act(linear1(tgt))))``."""
        return self.linear2(self.dropout3(self.activation(self.linear1(tgt))))

    def execute(
        self,
        tgt: jt.Var,
        reference_points: jt.Var,
        memory: jt.Var,
        memory_spatial_shapes: Sequence[Sequence[int]],
        memory_level_start_index: Sequence[int],
        attn_mask: Optional[jt.Var] = None,
        memory_mask: Optional[jt.Var] = None,
        query_pos_embed: Optional[jt.Var] = None,
    ) -> jt.Var:
        """Runs one decoder layer on the queries ``tgt`` ``[bs, len_q, d_model]``.

        ``reference_points`` are ``[bs, len_q, 1, 4]`` normalised cxcywh; ``attn_mask`` ``[len_q, len_q]`` is
        True where a query may not attend; ``memory_level_start_index`` is kept for the official signature.
        """
        q = k = self.with_pos_embed(tgt, query_pos_embed)
        tgt2, _ = self.self_attn(q, k, value=tgt, attn_mask=attn_mask)
        tgt = tgt + self.dropout1(tgt2)
        tgt = self.norm1(tgt)

        tgt2 = self.cross_attn(
            self.with_pos_embed(tgt, query_pos_embed), reference_points, memory, memory_spatial_shapes, memory_mask
        )
        tgt = tgt + self.dropout2(tgt2)
        tgt = self.norm2(tgt)

        tgt2 = self.forward_ffn(tgt)
        tgt = tgt + self.dropout4(tgt2)
        tgt = self.norm3(tgt)
        return tgt


class TransformerDecoder(nn.Module):
    """Stack of ``num_layers`` copies of ``decoder_layer`` with iterative box refinement.

    ``eval_idx`` is the layer whose prediction eval mode returns (negative counts from the end).
    """

    def __init__(self, hidden_dim: int, decoder_layer: TransformerDecoderLayer, num_layers: int, eval_idx: int = -1):
        super().__init__()
        if not -num_layers <= eval_idx < num_layers:
            raise ValueError(f"eval_idx must be in [{-num_layers}, {num_layers}), got {eval_idx}")
        self.layers = nn.ModuleList([copy.deepcopy(decoder_layer) for _ in range(num_layers)])
        self.hidden_dim = hidden_dim
        self.num_layers = num_layers
        self.eval_idx = eval_idx if eval_idx >= 0 else num_layers + eval_idx

    def execute(
        self,
        tgt: jt.Var,
        ref_points_unact: jt.Var,
        memory: jt.Var,
        memory_spatial_shapes: Sequence[Sequence[int]],
        memory_level_start_index: Sequence[int],
        bbox_head: nn.ModuleList,
        score_head: nn.ModuleList,
        query_pos_head: nn.Module,
        attn_mask: Optional[jt.Var] = None,
        memory_mask: Optional[jt.Var] = None,
    ) -> Tuple[jt.Var, jt.Var]:
        """Runs the layers, refining the reference boxes (``ref_points_unact``, logits) after each.

        In training every layer predicts; the boxes of layer ``i > 0`` come from the previous layer's non-detached
        boxes, so that gradients flow through the refinement chain, while the next layer's input uses the detached
        boxes. In eval mode the loop stops after layer ``eval_idx``. Returns ``(boxes, logits)``, each
        ``[n_out, bs, len_q, ...]`` with ``n_out = num_layers`` in training and 1 in eval.
        """
        output = tgt
        dec_out_bboxes = []
        dec_out_logits = []
        ref_points_detach = jt.sigmoid(ref_points_unact)
        ref_points = ref_points_detach

        for i, layer in enumerate(self.layers):
            # [bs, len_q, 4] -> [bs, len_q, 1, 4]
            ref_points_input = ref_points_detach.unsqueeze(2)
            query_pos_embed = query_pos_head(ref_points_detach)

            output = layer(
                output,
                ref_points_input,
                memory,
                memory_spatial_shapes,
                memory_level_start_index,
                attn_mask,
                memory_mask,
                query_pos_embed,
            )

            bbox_delta = bbox_head[i](output)
            inter_ref_bbox = jt.sigmoid(bbox_delta + inverse_sigmoid(ref_points_detach))

            if self.is_training():
                dec_out_logits.append(score_head[i](output))
                if i == 0:
                    dec_out_bboxes.append(inter_ref_bbox)
                else:
                    dec_out_bboxes.append(jt.sigmoid(bbox_delta + inverse_sigmoid(ref_points)))
            elif i == self.eval_idx:
                dec_out_logits.append(score_head[i](output))
                dec_out_bboxes.append(inter_ref_bbox)
                break

            ref_points = inter_ref_bbox
            ref_points_detach = inter_ref_bbox.detach() if self.is_training() else inter_ref_bbox

        return jt.stack(dec_out_bboxes), jt.stack(dec_out_logits)


class RTDETRTransformer(nn.Module):
    """The RT-DETR decoder: input projection, query selection, decoder and heads.

    ``anchors`` / ``valid_mask`` are precomputed for ``eval_spatial_size`` (eval mode only; not in the state
    dict); ``rng`` is the :class:`SharedRandom` denoising draws from; ``last_topk_ind`` holds the detached
    ``[bs, num_queries]`` indices the encoder head picked in the last forward; ``forced_topk_ind`` (None or
    such indices) replaces the top-k selection, so that a parity harness can give both implementations the
    same decision. Levels beyond ``feat_channels`` come from stride-2 3x3 convolutions.
    """

    def __init__(
        self,
        num_classes: int = 80,
        hidden_dim: int = 256,
        num_queries: int = 300,
        feat_channels: Sequence[int] = (512, 1024, 2048),
        feat_strides: Sequence[int] = (8, 16, 32),
        num_levels: int = 3,
        num_decoder_points: int = 4,
        nhead: int = 8,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 1024,
        dropout: float = 0.0,
        activation: str = "relu",
        num_denoising: int = 100,
        label_noise_ratio: float = 0.5,
        box_noise_scale: float = 1.0,
        learnt_init_query: bool = False,
        eval_spatial_size: Optional[Sequence[int]] = None,
        eval_idx: int = -1,
        eps: float = 1e-2,
        aux_loss: bool = True,
        rng: Optional[SharedRandom] = None,
    ) -> None:
        super().__init__()
        feat_channels = list(feat_channels)
        feat_strides = list(feat_strides)
        if len(feat_channels) > num_levels:
            raise ValueError(
                f"len(feat_channels) ({len(feat_channels)}) must not exceed num_levels ({num_levels})"
            )
        if len(feat_strides) != len(feat_channels):
            raise ValueError(
                f"feat_strides ({len(feat_strides)}) and feat_channels ({len(feat_channels)}) must have the same length"
            )
        for _ in range(num_levels - len(feat_strides)):
            feat_strides.append(feat_strides[-1] * 2)

        self.hidden_dim = hidden_dim
        self.nhead = nhead
        self.feat_channels = feat_channels
        self.feat_strides = feat_strides
        self.num_levels = num_levels
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.eps = eps
        self.num_decoder_layers = num_decoder_layers
        self.eval_spatial_size = list(eval_spatial_size) if eval_spatial_size else None
        self.aux_loss = aux_loss
        self.rng = rng if rng is not None else SharedRandom(0)
        self._last_topk_ind: Optional[jt.Var] = None
        self._forced_topk_ind: Optional[jt.Var] = None

        self._build_input_proj_layer(feat_channels)

        decoder_layer = TransformerDecoderLayer(
            hidden_dim, nhead, dim_feedforward, dropout, activation, num_levels, num_decoder_points
        )
        self.decoder = TransformerDecoder(hidden_dim, decoder_layer, num_decoder_layers, eval_idx)

        self.num_denoising = num_denoising
        self.label_noise_ratio = label_noise_ratio
        self.box_noise_scale = box_noise_scale
        if num_denoising > 0:
            self.denoising_class_embed = Embedding(num_classes + 1, hidden_dim, padding_idx=num_classes)

        self.learnt_init_query = learnt_init_query
        if learnt_init_query:
            self.tgt_embed = Embedding(num_queries, hidden_dim)
        self.query_pos_head = MLP(4, 2 * hidden_dim, hidden_dim, num_layers=2)

        self.enc_output = nn.Sequential(Linear(hidden_dim, hidden_dim), LayerNorm(hidden_dim))
        self.enc_score_head = Linear(hidden_dim, num_classes)
        self.enc_bbox_head = MLP(hidden_dim, hidden_dim, 4, num_layers=3)

        self.dec_score_head = nn.ModuleList([Linear(hidden_dim, num_classes) for _ in range(num_decoder_layers)])
        self.dec_bbox_head = nn.ModuleList(
            [MLP(hidden_dim, hidden_dim, 4, num_layers=3) for _ in range(num_decoder_layers)]
        )

        self._anchors: Optional[jt.Var] = None
        self._valid_mask: Optional[jt.Var] = None
        if self.eval_spatial_size:
            self._anchors, self._valid_mask = self._generate_anchors()

        self._reset_parameters()

    @property
    def anchors(self) -> Optional[jt.Var]:
        return self._anchors

    @property
    def valid_mask(self) -> Optional[jt.Var]:
        return self._valid_mask

    @property
    def last_topk_ind(self) -> Optional[jt.Var]:
        return self._last_topk_ind

    @property
    def forced_topk_ind(self) -> Optional[jt.Var]:
        return self._forced_topk_ind

    @forced_topk_ind.setter
    def forced_topk_ind(self, value: Optional[jt.Var]) -> None:
        self._forced_topk_ind = value

    def _reset_parameters(self) -> None:
        """Official initialisation of the heads and embeddings."""
        bias = bias_init_with_prob(0.01)
        init.constant_(self.enc_score_head.bias, bias)
        init.constant_(self.enc_bbox_head.layers[-1].weight, 0)
        init.constant_(self.enc_bbox_head.layers[-1].bias, 0)
        for cls_head, reg_head in zip(self.dec_score_head, self.dec_bbox_head):
            init.constant_(cls_head.bias, bias)
            init.constant_(reg_head.layers[-1].weight, 0)
            init.constant_(reg_head.layers[-1].bias, 0)

        init.xavier_uniform_(self.enc_output[0].weight)
        if self.learnt_init_query:
            init.xavier_uniform_(self.tgt_embed.weight)
        init.xavier_uniform_(self.query_pos_head.layers[0].weight)
        init.xavier_uniform_(self.query_pos_head.layers[1].weight)

    def _build_input_proj_layer(self, feat_channels: List[int]) -> None:
        """Builds ``input_proj``: a 1x1 conv + BN per input map, then 3x3 stride-2 extra levels."""
        self.input_proj = nn.ModuleList()
        for in_channels in feat_channels:
            self.input_proj.append(
                nn.Sequential(
                    OrderedDict(
                        [
                            ("conv", Conv2d(in_channels, self.hidden_dim, 1, bias=False)),
                            ("norm", BatchNorm2d(self.hidden_dim)),
                        ]
                    )
                )
            )

        in_channels = feat_channels[-1]
        for _ in range(self.num_levels - len(feat_channels)):
            self.input_proj.append(
                nn.Sequential(
                    OrderedDict(
                        [
                            ("conv", Conv2d(in_channels, self.hidden_dim, 3, 2, padding=1, bias=False)),
                            ("norm", BatchNorm2d(self.hidden_dim)),
                        ]
                    )
                )
            )
            in_channels = self.hidden_dim

    def _get_encoder_input(
        self, feats: Sequence[jt.Var]
    ) -> Tuple[jt.Var, List[List[int]], List[int]]:
        """Projects and flattens the maps (one per ``feat_channels`` entry) into one memory sequence.

        Returns ``(memory [bs, sum(h*w), hidden_dim], spatial_shapes [[h, w], ...], level_start_index)``.
        """
        if len(feats) != len(self.feat_channels):
            raise ValueError(f"expected {len(self.feat_channels)} feature maps, got {len(feats)}")
        proj_feats = [self.input_proj[i](feat) for i, feat in enumerate(feats)]
        num_srcs = len(proj_feats)
        for i in range(num_srcs, self.num_levels):
            if i == num_srcs:
                proj_feats.append(self.input_proj[i](feats[-1]))
            else:
                proj_feats.append(self.input_proj[i](proj_feats[-1]))

        feat_flatten = []
        spatial_shapes = []
        level_start_index = [0]
        for feat in proj_feats:
            _, _, h, w = feat.shape
            # [bs, c, h, w] -> [bs, c, h*w] -> [bs, h*w, c]
            feat_flatten.append(swap_last_axes(feat.flatten(2)))
            spatial_shapes.append([h, w])
            level_start_index.append(h * w + level_start_index[-1])

        # [bs, sum(h*w), c]
        memory = jt.concat(feat_flatten, 1)
        level_start_index.pop()
        return memory, spatial_shapes, level_start_index

    def _generate_anchors(
        self,
        spatial_shapes: Optional[Sequence[Sequence[int]]] = None,
        grid_size: float = 0.05,
        dtype: str = "float32",
    ) -> Tuple[jt.Var, jt.Var]:
        """Anchor boxes (as logits) at every memory position, and their validity mask.

        Each anchor is centred on its cell with size ``grid_size * 2**level``; one with a coordinate outside
        ``(eps, 1 - eps)`` is invalid, with logit ``+inf``. ``spatial_shapes`` defaults to the maps of
        ``eval_spatial_size``. Returns ``(anchors [1, sum(h*w), 4], valid_mask [1, sum(h*w), 1] bool)``.
        """
        if spatial_shapes is None:
            spatial_shapes = [
                [int(self.eval_spatial_size[0] / s), int(self.eval_spatial_size[1] / s)] for s in self.feat_strides
            ]
        anchors = []
        for lvl, (h, w) in enumerate(spatial_shapes):
            grid_y, grid_x = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
            grid_xy = np.stack([grid_x, grid_y], -1)  # [h, w, 2]
            valid_wh = np.array([w, h], dtype=np.float32)
            grid_xy = (grid_xy[None] + np.float32(0.5)) / valid_wh  # [1, h, w, 2]
            wh = np.ones_like(grid_xy) * np.float32(grid_size) * np.float32(2.0**lvl)
            # [1, h, w, 4] -> [1, h*w, 4]
            anchors.append(np.concatenate([grid_xy, wh], -1).reshape(-1, h * w, 4))

        anchors = np.concatenate(anchors, 1)  # [1, sum(h*w), 4]
        valid_mask = ((anchors > np.float32(self.eps)) & (anchors < np.float32(1 - self.eps))).all(
            -1, keepdims=True
        )  # [1, sum(h*w), 1]
        # float32 ratio as PyTorch computes it; its log rounded once from float64.
        anchors = np.log((anchors / (np.float32(1) - anchors)).astype(np.float64)).astype(np.float32)
        anchors = np.where(valid_mask, anchors, np.float32(np.inf))
        return jt.array(anchors).cast(dtype), jt.array(valid_mask)

    def _select_topk(self, enc_outputs_class: jt.Var) -> jt.Var:
        """Indices (int64 ``[bs, num_queries]``) of the memory positions with the highest class score.

        Uses ``forced_topk_ind`` instead when it is set, and records the result in ``last_topk_ind``.
        """
        bs, len_v, _ = enc_outputs_class.shape
        if self.forced_topk_ind is not None:
            if tuple(self.forced_topk_ind.shape) != (bs, self.num_queries):
                raise ValueError(
                    f"forced_topk_ind must have shape {(bs, self.num_queries)}, "
                    f"got {tuple(self.forced_topk_ind.shape)}"
                )
            topk_ind = self.forced_topk_ind.int64()
        else:
            if len_v < self.num_queries:
                raise ValueError(f"memory has {len_v} positions, fewer than num_queries ({self.num_queries})")
            _, topk_ind = jt.topk(enc_outputs_class.max(-1), self.num_queries, dim=1)
            topk_ind = topk_ind.int64()
        self._last_topk_ind = topk_ind.detach()
        return topk_ind

    def _get_decoder_input(
        self,
        memory: jt.Var,
        spatial_shapes: List[List[int]],
        denoising_class: Optional[jt.Var] = None,
        denoising_bbox_unact: Optional[jt.Var] = None,
    ) -> Tuple[jt.Var, jt.Var, jt.Var, jt.Var]:
        """Scores the memory, selects the top-k queries and prepends the denoising queries.

        Returns ``target [bs, n_dn + num_queries, hidden_dim]``, the detached ``reference_points_unact``
        ``[bs, n_dn + num_queries, 4]``, then ``enc_topk_bboxes`` and ``enc_topk_logits`` ``[bs, num_queries, ...]``.
        """
        bs, len_v, _ = memory.shape
        if self.is_training() or self.eval_spatial_size is None:
            anchors, valid_mask = self._generate_anchors(spatial_shapes)
        else:
            if self.anchors.shape[1] != len_v:
                raise ValueError(
                    f"eval_spatial_size {self.eval_spatial_size} gives {self.anchors.shape[1]} anchors, "
                    f"but the memory has {len_v} positions; pass inputs of that size or eval_spatial_size=None"
                )
            anchors = self.anchors
            valid_mask = self.valid_mask

        memory = valid_mask.cast(memory.dtype) * memory

        output_memory = self.enc_output(memory)  # [bs, len_v, hidden_dim]
        enc_outputs_class = self.enc_score_head(output_memory)  # [bs, len_v, num_classes]
        enc_outputs_coord_unact = self.enc_bbox_head(output_memory) + anchors  # [bs, len_v, 4]

        topk_ind = self._select_topk(enc_outputs_class)  # [bs, num_queries]

        # [bs, num_queries, 4]
        reference_points_unact = jt.gather(
            enc_outputs_coord_unact, 1, topk_ind.unsqueeze(-1).repeat(1, 1, enc_outputs_coord_unact.shape[-1])
        )
        enc_topk_bboxes = jt.sigmoid(reference_points_unact)
        if denoising_bbox_unact is not None:
            # [bs, n_dn + num_queries, 4]
            reference_points_unact = jt.concat([denoising_bbox_unact, reference_points_unact], 1)

        # [bs, num_queries, num_classes]
        enc_topk_logits = jt.gather(
            enc_outputs_class, 1, topk_ind.unsqueeze(-1).repeat(1, 1, enc_outputs_class.shape[-1])
        )

        if self.learnt_init_query:
            # [num_queries, hidden_dim] -> [bs, num_queries, hidden_dim]
            target = self.tgt_embed.weight.unsqueeze(0).repeat(bs, 1, 1)
        else:
            # [bs, num_queries, hidden_dim]
            target = jt.gather(output_memory, 1, topk_ind.unsqueeze(-1).repeat(1, 1, output_memory.shape[-1]))
            target = target.detach()

        if denoising_class is not None:
            # [bs, n_dn + num_queries, hidden_dim]
            target = jt.concat([denoising_class, target], 1)

        return target, reference_points_unact.detach(), enc_topk_bboxes, enc_topk_logits

    def execute(
        self, feats: Sequence[jt.Var], targets: Optional[List[Dict[str, jt.Var]]] = None
    ) -> Dict[str, object]:
        """Decodes the encoder feature maps into class logits and boxes.

        ``targets`` (per image ``labels`` ``[n]`` and normalised cxcywh ``boxes`` ``[n, 4]``) feed the denoising
        queries (training with ``num_denoising > 0`` only). Returns ``pred_logits`` and ``pred_boxes``; in training
        with ``aux_loss`` also ``aux_outputs`` (each decoder layer but the last, then the encoder top-k) and, with
        denoising, ``dn_aux_outputs`` and ``dn_meta``.
        """
        memory, spatial_shapes, level_start_index = self._get_encoder_input(feats)

        if self.is_training() and self.num_denoising > 0 and targets is not None:
            denoising_class, denoising_bbox_unact, attn_mask, dn_meta = get_contrastive_denoising_training_group(
                targets,
                self.num_classes,
                self.num_queries,
                self.denoising_class_embed,
                num_denoising=self.num_denoising,
                label_noise_ratio=self.label_noise_ratio,
                box_noise_scale=self.box_noise_scale,
                rng=self.rng,
            )
        else:
            denoising_class, denoising_bbox_unact, attn_mask, dn_meta = None, None, None, None

        target, init_ref_points_unact, enc_topk_bboxes, enc_topk_logits = self._get_decoder_input(
            memory, spatial_shapes, denoising_class, denoising_bbox_unact
        )

        # [n_out, bs, n_dn + num_queries, 4], [n_out, bs, n_dn + num_queries, num_classes]
        out_bboxes, out_logits = self.decoder(
            target,
            init_ref_points_unact,
            memory,
            spatial_shapes,
            level_start_index,
            self.dec_bbox_head,
            self.dec_score_head,
            self.query_pos_head,
            attn_mask=attn_mask,
        )

        if dn_meta is not None:
            dn_out_bboxes, out_bboxes = jt.split(out_bboxes, dn_meta["dn_num_split"], dim=2)
            dn_out_logits, out_logits = jt.split(out_logits, dn_meta["dn_num_split"], dim=2)

        out = {"pred_logits": out_logits[-1], "pred_boxes": out_bboxes[-1]}

        if self.is_training() and self.aux_loss:
            out["aux_outputs"] = self._set_aux_loss(out_logits[:-1], out_bboxes[:-1])
            out["aux_outputs"].extend(self._set_aux_loss([enc_topk_logits], [enc_topk_bboxes]))
            if dn_meta is not None:
                out["dn_aux_outputs"] = self._set_aux_loss(dn_out_logits, dn_out_bboxes)
                out["dn_meta"] = dn_meta

        return out

    @staticmethod
    def _set_aux_loss(
        outputs_class: Sequence[jt.Var], outputs_coord: Sequence[jt.Var]
    ) -> List[Dict[str, jt.Var]]:
        """Pairs per-layer logits and boxes into ``pred_logits`` / ``pred_boxes`` dicts."""
        return [{"pred_logits": a, "pred_boxes": b} for a, b in zip(outputs_class, outputs_coord)]
