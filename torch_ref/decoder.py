"""RT-DETR v1 transformer decoder (the official ``RTDETRTransformer``) in PyTorch.

The decoder projects the encoder maps to ``hidden_dim`` and flattens them into one memory, scores
every memory position (the "encoder head"), keeps the ``num_queries`` best as initial queries and
anchors, and refines them through layers of self-attention, multi-scale deformable cross-attention
and an FFN, predicting boxes and logits after each. Names, shapes and numerics follow the official
``rtdetr_decoder.py``, so that official checkpoints load key for key.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.init as init

from rtdetr_common.random import SharedRandom

from .box_ops import inverse_sigmoid
from .common import get_activation
from .denoising import get_contrastive_denoising_training_group

__all__ = [
    "bias_init_with_prob",
    "MLP",
    "deformable_attention_core_func",
    "MSDeformableAttention",
    "TransformerDecoderLayer",
    "TransformerDecoder",
    "RTDETRTransformer",
]


def bias_init_with_prob(prior_prob: float = 0.01) -> float:
    """Bias that makes a sigmoid output ``prior_prob`` for a zero input: ``-log((1 - p) / p)``."""
    return float(-math.log((1 - prior_prob) / prior_prob))


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
        self.layers = nn.ModuleList([nn.Linear(n_in, n_out) for n_in, n_out in zip(in_dims, out_dims)])
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Applies the layers: ``[..., input_dim]`` -> ``[..., output_dim]``."""
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < self.num_layers - 1:
                x = self.act(x)
        return x


def deformable_attention_core_func(
    value: torch.Tensor,
    value_spatial_shapes: Sequence[Sequence[int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention with bilinear ``grid_sample`` (pure PyTorch form).

    ``value``: ``[bs, len_v, n_head, head_dim]``, levels concatenated; ``sampling_locations``: normalised
    ``(x, y)`` ``[bs, len_q, n_head, n_levels, n_points, 2]``, ``[0, 1]`` inside the map; ``attention_weights``:
    ``[bs, len_q, n_head, n_levels, n_points]``. Returns ``[bs, len_q, n_head * head_dim]``.
    """
    bs, _, n_head, c = value.shape
    _, len_q, _, n_levels, n_points, _ = sampling_locations.shape

    split_shape = [h * w for h, w in value_spatial_shapes]
    value_list = value.split(split_shape, dim=1)
    # grid_sample expects coordinates in [-1, 1].
    sampling_grids = 2 * sampling_locations - 1
    sampling_value_list = []
    for level, (h, w) in enumerate(value_spatial_shapes):
        # [bs, h*w, n_head, c] -> [bs, h*w, n_head*c] -> [bs, n_head*c, h*w] -> [bs*n_head, c, h, w]
        value_l = value_list[level].flatten(2).permute(0, 2, 1).reshape(bs * n_head, c, h, w)
        # [bs, len_q, n_head, n_points, 2] -> [bs, n_head, len_q, n_points, 2] -> [bs*n_head, len_q, n_points, 2]
        sampling_grid_l = sampling_grids[:, :, :, level].permute(0, 2, 1, 3, 4).flatten(0, 1)
        # [bs*n_head, c, len_q, n_points]
        sampling_value_l = F.grid_sample(
            value_l, sampling_grid_l, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        sampling_value_list.append(sampling_value_l)
    # [bs, len_q, n_head, n_levels, n_points] -> [bs, n_head, len_q, n_levels, n_points]
    # -> [bs*n_head, 1, len_q, n_levels*n_points]
    attention_weights = attention_weights.permute(0, 2, 1, 3, 4).reshape(bs * n_head, 1, len_q, n_levels * n_points)
    # [bs*n_head, c, len_q, n_levels, n_points] -> [bs*n_head, c, len_q, n_levels*n_points]
    sampled = torch.stack(sampling_value_list, dim=-2).flatten(-2)
    # [bs*n_head, c, len_q] -> [bs, n_head*c, len_q]
    output = (sampled * attention_weights).sum(-1).reshape(bs, n_head * c, len_q)
    # [bs, len_q, n_head*c]
    return output.permute(0, 2, 1)


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

        self.sampling_offsets = nn.Linear(embed_dim, self.total_points * 2)
        self.attention_weights = nn.Linear(embed_dim, self.total_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)

        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """Official initialisation: offsets start on a ring of directions, one per head."""
        init.constant_(self.sampling_offsets.weight, 0)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid_init = torch.stack([thetas.cos(), thetas.sin()], -1)  # [num_heads, 2]
        grid_init = grid_init / grid_init.abs().max(-1, keepdim=True).values
        # [num_heads, 2] -> [num_heads, 1, 1, 2] -> [num_heads, num_levels, num_points, 2]
        grid_init = grid_init.reshape(self.num_heads, 1, 1, 2).tile([1, self.num_levels, self.num_points, 1])
        scaling = torch.arange(1, self.num_points + 1, dtype=torch.float32).reshape(1, 1, -1, 1)
        grid_init = grid_init * scaling
        with torch.no_grad():
            # [num_heads*num_levels*num_points*2]
            self.sampling_offsets.bias.copy_(grid_init.flatten())

        init.constant_(self.attention_weights.weight, 0)
        init.constant_(self.attention_weights.bias, 0)

        init.xavier_uniform_(self.value_proj.weight)
        init.constant_(self.value_proj.bias, 0)
        init.xavier_uniform_(self.output_proj.weight)
        init.constant_(self.output_proj.bias, 0)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value: torch.Tensor,
        value_spatial_shapes: Sequence[Sequence[int]],
        value_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
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
            value = value * value_mask.to(value.dtype).unsqueeze(-1)
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
        attention_weights = F.softmax(attention_weights, dim=-1).reshape(
            bs, len_q, self.num_heads, self.num_levels, self.num_points
        )

        if reference_points.shape[-1] == 2:
            # (w, h) of every level: [1, 1, 1, num_levels, 1, 2]
            offset_normalizer = torch.tensor(value_spatial_shapes, dtype=query.dtype, device=query.device)
            offset_normalizer = offset_normalizer.flip([1]).reshape(1, 1, 1, self.num_levels, 1, 2)
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

    def sample(self, value: torch.Tensor, value_spatial_shapes: Sequence[Sequence[int]],
               sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
        """Bilinear sampling of the values and their weighted sum (the attention core).

        A method, so that a parity check can see (and, in the port, force) each layer's sampling locations.
        """
        return deformable_attention_core_func(value, value_spatial_shapes, sampling_locations, attention_weights)


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
        self.self_attn = nn.MultiheadAttention(d_model, n_head, dropout=dropout, batch_first=True)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)

        self.cross_attn = MSDeformableAttention(d_model, n_head, n_levels, n_points)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.activation = get_activation(activation)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    @staticmethod
    def with_pos_embed(tensor: torch.Tensor, pos: Optional[torch.Tensor]) -> torch.Tensor:
        """``tensor + pos``, or ``tensor`` when ``pos`` is None."""
        return tensor if pos is None else tensor + pos

    def forward_ffn(self, tgt: torch.Tensor) -> torch.Tensor:
        """Feed-forward block ``linear2(dropout3(act(linear1(tgt))))``."""
        return self.linear2(self.dropout3(self.activation(self.linear1(tgt))))

    def forward(
        self,
        tgt: torch.Tensor,
        reference_points: torch.Tensor,
        memory: torch.Tensor,
        memory_spatial_shapes: Sequence[Sequence[int]],
        memory_level_start_index: Sequence[int],
        attn_mask: Optional[torch.Tensor] = None,
        memory_mask: Optional[torch.Tensor] = None,
        query_pos_embed: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
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

    def forward(
        self,
        tgt: torch.Tensor,
        ref_points_unact: torch.Tensor,
        memory: torch.Tensor,
        memory_spatial_shapes: Sequence[Sequence[int]],
        memory_level_start_index: Sequence[int],
        bbox_head: nn.ModuleList,
        score_head: nn.ModuleList,
        query_pos_head: nn.Module,
        attn_mask: Optional[torch.Tensor] = None,
        memory_mask: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Runs the layers, refining the reference boxes (``ref_points_unact``, logits) after each.

        In training every layer predicts; the boxes of layer ``i > 0`` come from the previous layer's non-detached
        boxes, so that gradients flow through the refinement chain, while the next layer's input uses the detached
        boxes. In eval mode the loop stops after layer ``eval_idx``. Returns ``(boxes, logits)``, each
        ``[n_out, bs, len_q, ...]`` with ``n_out = num_layers`` in training and 1 in eval.
        """
        output = tgt
        dec_out_bboxes = []
        dec_out_logits = []
        ref_points_detach = F.sigmoid(ref_points_unact)
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
            inter_ref_bbox = F.sigmoid(bbox_delta + inverse_sigmoid(ref_points_detach))

            if self.training:
                dec_out_logits.append(score_head[i](output))
                if i == 0:
                    dec_out_bboxes.append(inter_ref_bbox)
                else:
                    dec_out_bboxes.append(F.sigmoid(bbox_delta + inverse_sigmoid(ref_points)))
            elif i == self.eval_idx:
                dec_out_logits.append(score_head[i](output))
                dec_out_bboxes.append(inter_ref_bbox)
                break

            ref_points = inter_ref_bbox
            ref_points_detach = inter_ref_bbox.detach() if self.training else inter_ref_bbox

        return torch.stack(dec_out_bboxes), torch.stack(dec_out_logits)


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
        self.last_topk_ind: Optional[torch.Tensor] = None
        self.forced_topk_ind: Optional[torch.Tensor] = None

        self._build_input_proj_layer(feat_channels)

        decoder_layer = TransformerDecoderLayer(
            hidden_dim, nhead, dim_feedforward, dropout, activation, num_levels, num_decoder_points
        )
        self.decoder = TransformerDecoder(hidden_dim, decoder_layer, num_decoder_layers, eval_idx)

        self.num_denoising = num_denoising
        self.label_noise_ratio = label_noise_ratio
        self.box_noise_scale = box_noise_scale
        if num_denoising > 0:
            self.denoising_class_embed = nn.Embedding(num_classes + 1, hidden_dim, padding_idx=num_classes)

        self.learnt_init_query = learnt_init_query
        if learnt_init_query:
            self.tgt_embed = nn.Embedding(num_queries, hidden_dim)
        self.query_pos_head = MLP(4, 2 * hidden_dim, hidden_dim, num_layers=2)

        self.enc_output = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.LayerNorm(hidden_dim))
        self.enc_score_head = nn.Linear(hidden_dim, num_classes)
        self.enc_bbox_head = MLP(hidden_dim, hidden_dim, 4, num_layers=3)

        self.dec_score_head = nn.ModuleList([nn.Linear(hidden_dim, num_classes) for _ in range(num_decoder_layers)])
        self.dec_bbox_head = nn.ModuleList(
            [MLP(hidden_dim, hidden_dim, 4, num_layers=3) for _ in range(num_decoder_layers)]
        )

        self.anchors: Optional[torch.Tensor] = None
        self.valid_mask: Optional[torch.Tensor] = None
        if self.eval_spatial_size:
            self.anchors, self.valid_mask = self._generate_anchors()

        self._reset_parameters()

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
                            ("conv", nn.Conv2d(in_channels, self.hidden_dim, 1, bias=False)),
                            ("norm", nn.BatchNorm2d(self.hidden_dim)),
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
                            ("conv", nn.Conv2d(in_channels, self.hidden_dim, 3, 2, padding=1, bias=False)),
                            ("norm", nn.BatchNorm2d(self.hidden_dim)),
                        ]
                    )
                )
            )
            in_channels = self.hidden_dim

    def _get_encoder_input(
        self, feats: Sequence[torch.Tensor]
    ) -> Tuple[torch.Tensor, List[List[int]], List[int]]:
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
            feat_flatten.append(feat.flatten(2).permute(0, 2, 1))
            spatial_shapes.append([h, w])
            level_start_index.append(h * w + level_start_index[-1])

        # [bs, sum(h*w), c]
        memory = torch.concat(feat_flatten, 1)
        level_start_index.pop()
        return memory, spatial_shapes, level_start_index

    def _generate_anchors(
        self,
        spatial_shapes: Optional[Sequence[Sequence[int]]] = None,
        grid_size: float = 0.05,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> Tuple[torch.Tensor, torch.Tensor]:
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
            grid_y, grid_x = torch.meshgrid(
                torch.arange(end=h, dtype=dtype), torch.arange(end=w, dtype=dtype), indexing="ij"
            )
            grid_xy = torch.stack([grid_x, grid_y], -1)  # [h, w, 2]
            valid_wh = torch.tensor([w, h]).to(dtype)
            grid_xy = (grid_xy.unsqueeze(0) + 0.5) / valid_wh  # [1, h, w, 2]
            wh = torch.ones_like(grid_xy) * grid_size * (2.0**lvl)
            # [1, h, w, 4] -> [1, h*w, 4]
            anchors.append(torch.concat([grid_xy, wh], -1).reshape(-1, h * w, 4))

        anchors = torch.concat(anchors, 1).to(device)  # [1, sum(h*w), 4]
        valid_mask = ((anchors > self.eps) * (anchors < 1 - self.eps)).all(-1, keepdim=True)  # [1, sum(h*w), 1]
        anchors = torch.log(anchors / (1 - anchors))
        anchors = torch.where(valid_mask, anchors, torch.inf)
        return anchors, valid_mask

    def _select_topk(self, enc_outputs_class: torch.Tensor) -> torch.Tensor:
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
            topk_ind = self.forced_topk_ind.to(device=enc_outputs_class.device, dtype=torch.int64)
        else:
            if len_v < self.num_queries:
                raise ValueError(f"memory has {len_v} positions, fewer than num_queries ({self.num_queries})")
            _, topk_ind = torch.topk(enc_outputs_class.max(-1).values, self.num_queries, dim=1)
        self.last_topk_ind = topk_ind.detach()
        return topk_ind

    def _get_decoder_input(
        self,
        memory: torch.Tensor,
        spatial_shapes: List[List[int]],
        denoising_class: Optional[torch.Tensor] = None,
        denoising_bbox_unact: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scores the memory, selects the top-k queries and prepends the denoising queries.

        Returns ``target [bs, n_dn + num_queries, hidden_dim]``, the detached ``reference_points_unact``
        ``[bs, n_dn + num_queries, 4]``, then ``enc_topk_bboxes`` and ``enc_topk_logits`` ``[bs, num_queries, ...]``.
        """
        bs, len_v, _ = memory.shape
        if self.training or self.eval_spatial_size is None:
            anchors, valid_mask = self._generate_anchors(spatial_shapes, device=memory.device)
        else:
            if self.anchors.shape[1] != len_v:
                raise ValueError(
                    f"eval_spatial_size {self.eval_spatial_size} gives {self.anchors.shape[1]} anchors, "
                    f"but the memory has {len_v} positions; pass inputs of that size or eval_spatial_size=None"
                )
            anchors = self.anchors.to(memory.device)
            valid_mask = self.valid_mask.to(memory.device)

        memory = valid_mask.to(memory.dtype) * memory

        output_memory = self.enc_output(memory)  # [bs, len_v, hidden_dim]
        enc_outputs_class = self.enc_score_head(output_memory)  # [bs, len_v, num_classes]
        enc_outputs_coord_unact = self.enc_bbox_head(output_memory) + anchors  # [bs, len_v, 4]

        topk_ind = self._select_topk(enc_outputs_class)  # [bs, num_queries]

        # [bs, num_queries, 4]
        reference_points_unact = enc_outputs_coord_unact.gather(
            dim=1, index=topk_ind.unsqueeze(-1).repeat(1, 1, enc_outputs_coord_unact.shape[-1])
        )
        enc_topk_bboxes = F.sigmoid(reference_points_unact)
        if denoising_bbox_unact is not None:
            # [bs, n_dn + num_queries, 4]
            reference_points_unact = torch.concat([denoising_bbox_unact, reference_points_unact], 1)

        # [bs, num_queries, num_classes]
        enc_topk_logits = enc_outputs_class.gather(
            dim=1, index=topk_ind.unsqueeze(-1).repeat(1, 1, enc_outputs_class.shape[-1])
        )

        if self.learnt_init_query:
            # [num_queries, hidden_dim] -> [bs, num_queries, hidden_dim]
            target = self.tgt_embed.weight.unsqueeze(0).tile([bs, 1, 1])
        else:
            # [bs, num_queries, hidden_dim]
            target = output_memory.gather(dim=1, index=topk_ind.unsqueeze(-1).repeat(1, 1, output_memory.shape[-1]))
            target = target.detach()

        if denoising_class is not None:
            # [bs, n_dn + num_queries, hidden_dim]
            target = torch.concat([denoising_class, target], 1)

        return target, reference_points_unact.detach(), enc_topk_bboxes, enc_topk_logits

    def forward(
        self, feats: Sequence[torch.Tensor], targets: Optional[List[Dict[str, torch.Tensor]]] = None
    ) -> Dict[str, object]:
        """Decodes the encoder feature maps into class logits and boxes.

        ``targets`` (per image ``labels`` ``[n]`` and normalised cxcywh ``boxes`` ``[n, 4]``) feed the denoising
        queries (training with ``num_denoising > 0`` only). Returns ``pred_logits`` and ``pred_boxes``; in training
        with ``aux_loss`` also ``aux_outputs`` (each decoder layer but the last, then the encoder top-k) and, with
        denoising, ``dn_aux_outputs`` and ``dn_meta``.
        """
        memory, spatial_shapes, level_start_index = self._get_encoder_input(feats)

        if self.training and self.num_denoising > 0 and targets is not None:
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
            dn_out_bboxes, out_bboxes = torch.split(out_bboxes, dn_meta["dn_num_split"], dim=2)
            dn_out_logits, out_logits = torch.split(out_logits, dn_meta["dn_num_split"], dim=2)

        out = {"pred_logits": out_logits[-1], "pred_boxes": out_bboxes[-1]}

        if self.training and self.aux_loss:
            out["aux_outputs"] = self._set_aux_loss(out_logits[:-1], out_bboxes[:-1])
            out["aux_outputs"].extend(self._set_aux_loss([enc_topk_logits], [enc_topk_bboxes]))
            if dn_meta is not None:
                out["dn_aux_outputs"] = self._set_aux_loss(dn_out_logits, dn_out_bboxes)
                out["dn_meta"] = dn_meta

        return out

    @staticmethod
    def _set_aux_loss(
        outputs_class: Sequence[torch.Tensor], outputs_coord: Sequence[torch.Tensor]
    ) -> List[Dict[str, torch.Tensor]]:
        """Pairs per-layer logits and boxes into ``pred_logits`` / ``pred_boxes`` dicts."""
        return [{"pred_logits": a, "pred_boxes": b} for a, b in zip(outputs_class, outputs_coord)]
