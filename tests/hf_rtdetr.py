"""Bridge to HuggingFace transformers' independent RT-DETR (``RTDetrForObjectDetection``).

HuggingFace re-implemented RT-DETR v1 and validated its port against the official checkpoints.
Running it next to ``torch_ref`` with the same weights is an independent numerical check. This
module builds the HF config of an official variant and renames an official-layout state_dict
to HF's layout. Nothing is downloaded: the backbone config object is built here and HF builds
its ResNet from it with random weights, which the renamed state_dict then replaces.

Differences between HF and the official code that matter for the configuration:

* ``eval_size`` is left ``None``. HF's AIFI layer uses *no* positional embedding in eval when
  ``eval_size`` is set (``pos_embed = None``), whereas the official HybridEncoder then uses the
  embedding it cached for ``eval_spatial_size``. With ``eval_size=None`` HF builds the embedding
  from the actual feature size on every call, which equals the official cached one whenever the
  input has the ``eval_spatial_size`` (the HF conversion script also leaves ``eval_size`` unset).
* HF has no ``eval_idx``: in eval it runs every decoder layer and reports the last one, while
  the official decoder stops after layer ``eval_idx``. The per-layer outputs are identical up to
  that layer, so callers compare ``intermediate_logits[:, eval_idx]`` (see :func:`hf_eval_index`).
* HF hard-codes three RepVGG blocks per CSPRepLayer (official ``round(3 * depth_mult)``).
* ``freeze_backbone_batch_norms`` follows PResNet's ``freeze_norm``: r18vd / r34vd keep plain
  BatchNorm2d (with ``num_batches_tracked``), the larger variants frozen ones, as officially.

Differences that do not change these checks: invalid anchors are ``finfo(float32).max`` in HF and
``+inf`` officially (both sigmoid to exactly 1, and the decoder only sees the sigmoid); the AIFI
sine embedding is ``[sin y | cos y | sin x | cos x]`` in HF while the official one swaps the roles
of ``h`` and ``w`` when flattening, which agrees only on square feature maps (true for every
eval size here); HF feeds every extra decoder level (``num_levels`` > feature maps) from the last
encoder map, officially the levels after the first extra one chain from the previous extra level
(no variant has extra levels).
"""

from __future__ import annotations

import re
from typing import Callable, Mapping

import torch

from transformers import RTDetrConfig, RTDetrResNetConfig

# Official PResNet block counts per stage.
_RESNET_DEPTHS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}
# Output channels per stage: BasicBlock (depth < 50) keeps the width, BottleNeck multiplies by 4.
_BASIC_WIDTHS = [64, 128, 256, 512]
_BOTTLENECK_WIDTHS = [256, 512, 1024, 2048]

# Official defaults of the keyword arguments the merged configs may leave out.
_PRESNET_DEFAULTS = {"variant": "d", "num_stages": 4, "return_idx": [0, 1, 2, 3], "act": "relu",
                     "freeze_norm": True}
_ENCODER_DEFAULTS = {"in_channels": [512, 1024, 2048], "feat_strides": [8, 16, 32], "hidden_dim": 256,
                     "nhead": 8, "dim_feedforward": 1024, "dropout": 0.0, "enc_act": "gelu",
                     "use_encoder_idx": [2], "num_encoder_layers": 1, "pe_temperature": 10000,
                     "expansion": 1.0, "depth_mult": 1.0, "act": "silu"}
_DECODER_DEFAULTS = {"hidden_dim": 256, "num_queries": 300, "feat_channels": [512, 1024, 2048],
                     "feat_strides": [8, 16, 32], "num_levels": 3, "num_decoder_points": 4, "nhead": 8,
                     "num_decoder_layers": 6, "dim_feedforward": 1024, "dropout": 0.0,
                     "activation": "relu", "num_denoising": 100, "label_noise_ratio": 0.5,
                     "box_noise_scale": 1.0, "learnt_init_query": False, "eval_spatial_size": None,
                     "eval_idx": -1}


def _section(variant_cfg: dict, name: str, defaults: dict) -> dict:
    """One module's keyword arguments from a merged official config, official defaults filled in."""
    if name not in variant_cfg or not isinstance(variant_cfg[name], dict):
        raise ValueError(f"official config has no {name!r} section")
    merged = dict(defaults)
    merged.update(variant_cfg[name])
    return merged


def hf_config_for(variant_cfg: dict) -> RTDetrConfig:
    """Builds HF's ``RTDetrConfig`` equal to an official merged config.

    Args:
        variant_cfg: One entry of ``rtdetr_common/data/official_configs.json`` (sections
            ``PResNet``, ``HybridEncoder``, ``RTDETRTransformer`` and ``num_classes``).

    Returns:
        The config, with an ``RTDetrResNetConfig`` backbone object (nothing pretrained, nothing
        downloaded), eager attention and ``eval_size=None`` (see the module docstring).

    Raises:
        ValueError: If a section is missing or the config uses something HF cannot express
            (a backbone variant other than ``d``, an unknown depth, ``depth_mult`` other than 1,
            different encoder / decoder dropout or strides, a learnt initial query).
    """
    backbone = _section(variant_cfg, "PResNet", _PRESNET_DEFAULTS)
    encoder = _section(variant_cfg, "HybridEncoder", _ENCODER_DEFAULTS)
    decoder = _section(variant_cfg, "RTDETRTransformer", _DECODER_DEFAULTS)
    if "num_classes" not in variant_cfg:
        raise ValueError("official config has no 'num_classes'")

    depth = backbone.get("depth")
    if depth not in _RESNET_DEPTHS:
        raise ValueError(f"PResNet depth must be one of {sorted(_RESNET_DEPTHS)}, got {depth!r}")
    if backbone["variant"] != "d":
        raise ValueError(f"HF's RT-DETR ResNet is the 'vd' variant only, got variant {backbone['variant']!r}")
    if backbone["num_stages"] != 4:
        raise ValueError(f"HF's RT-DETR ResNet has 4 stages, got num_stages={backbone['num_stages']}")
    if round(3 * encoder["depth_mult"]) != 3:
        raise ValueError(f"HF hard-codes 3 RepVGG blocks per CSPRepLayer; depth_mult={encoder['depth_mult']} "
                         f"gives {round(3 * encoder['depth_mult'])}")
    if encoder["dropout"] != decoder["dropout"]:
        raise ValueError(f"HF shares one dropout between encoder and decoder layers; got encoder "
                         f"{encoder['dropout']} and decoder {decoder['dropout']}")
    if decoder["learnt_init_query"]:
        raise ValueError("learnt_init_query=True is not supported: HF's RTDetrModel tiles the nn.Embedding "
                         "module itself instead of its weight")
    if encoder["feat_strides"] != decoder["feat_strides"]:
        raise ValueError(f"HF shares feat_strides between encoder and decoder; got encoder "
                         f"{encoder['feat_strides']} and decoder {decoder['feat_strides']}")

    basic = depth < 50
    widths = _BASIC_WIDTHS if basic else _BOTTLENECK_WIDTHS
    returned = [widths[idx] for idx in backbone["return_idx"]]
    if list(encoder["in_channels"]) != returned:
        # HF sizes the encoder input projections from the backbone, not from encoder_in_channels.
        raise ValueError(f"HybridEncoder in_channels {encoder['in_channels']} differ from the channels "
                         f"{returned} that PResNet-{depth} returns at return_idx {backbone['return_idx']}")
    backbone_config = RTDetrResNetConfig(
        num_channels=3,
        embedding_size=64,
        hidden_sizes=list(widths),
        depths=list(_RESNET_DEPTHS[depth]),
        layer_type="basic" if basic else "bottleneck",
        hidden_act=backbone["act"],
        downsample_in_first_stage=False,
        downsample_in_bottleneck=False,
        # HF's stage names are stem, stage1..stage4; official return_idx counts stages from 0.
        out_indices=[idx + 1 for idx in backbone["return_idx"]],
    )
    eval_spatial_size = decoder["eval_spatial_size"]
    config = RTDetrConfig(
        backbone_config=backbone_config,
        freeze_backbone_batch_norms=bool(backbone["freeze_norm"]),
        num_labels=int(variant_cfg["num_classes"]),
        # hybrid encoder
        encoder_hidden_dim=encoder["hidden_dim"],
        encoder_in_channels=list(encoder["in_channels"]),
        feat_strides=list(encoder["feat_strides"]),
        encoder_layers=encoder["num_encoder_layers"],
        encoder_ffn_dim=encoder["dim_feedforward"],
        encoder_attention_heads=encoder["nhead"],
        dropout=encoder["dropout"],
        activation_dropout=encoder["dropout"],
        encode_proj_layers=list(encoder["use_encoder_idx"]),
        positional_encoding_temperature=encoder["pe_temperature"],
        encoder_activation_function=encoder["enc_act"],
        activation_function=encoder["act"],
        eval_size=None,
        normalize_before=False,
        hidden_expansion=float(encoder["expansion"]),
        # decoder
        d_model=decoder["hidden_dim"],
        num_queries=decoder["num_queries"],
        decoder_in_channels=list(decoder["feat_channels"]),
        decoder_ffn_dim=decoder["dim_feedforward"],
        num_feature_levels=decoder["num_levels"],
        decoder_n_points=decoder["num_decoder_points"],
        decoder_layers=decoder["num_decoder_layers"],
        decoder_attention_heads=decoder["nhead"],
        decoder_activation_function=decoder["activation"],
        attention_dropout=decoder["dropout"],
        num_denoising=decoder["num_denoising"],
        label_noise_ratio=decoder["label_noise_ratio"],
        box_noise_scale=decoder["box_noise_scale"],
        learn_initial_query=False,
        anchor_image_size=list(eval_spatial_size) if eval_spatial_size else None,
        layer_norm_eps=1e-5,
        batch_norm_eps=1e-5,
        with_box_refine=True,
        disable_custom_kernels=True,
    )
    config._attn_implementation = "eager"
    return config


def hf_eval_index(variant_cfg: dict) -> int:
    """Index into HF's ``intermediate_logits`` / ``intermediate_reference_points`` that equals the
    official eval output (the official decoder stops after layer ``eval_idx``).

    Args:
        variant_cfg: One entry of ``official_configs.json``.

    Raises:
        ValueError: If ``eval_idx`` is outside the decoder's layers.
    """
    decoder = _section(variant_cfg, "RTDETRTransformer", _DECODER_DEFAULTS)
    num_layers, eval_idx = decoder["num_decoder_layers"], decoder["eval_idx"]
    index = eval_idx if eval_idx >= 0 else num_layers + eval_idx
    if not 0 <= index < num_layers:
        raise ValueError(f"eval_idx {eval_idx} is outside the {num_layers} decoder layers")
    return index


# ---------------------------------------------------------------------------------------------
# State-dict renaming. Each rule is (regex over an official key, function of the match returning
# {hf_key: slice-of-rows or None}); ``None`` copies the tensor, a slice takes those rows (the fused
# in_proj of nn.MultiheadAttention is split into HF's separate q/k/v projections).
# ---------------------------------------------------------------------------------------------

_Target = dict[str, "slice | None"]
_BRANCH_INDEX = {"a": 0, "b": 1, "c": 2}
_ENCODER_LAYER_PARTS = {"self_attn.out_proj": "self_attn.o_proj", "linear1": "mlp.fc1",
                        "linear2": "mlp.fc2", "norm1": "self_attn_layer_norm", "norm2": "final_layer_norm"}
_DECODER_LAYER_PARTS = {"self_attn.out_proj": "self_attn.o_proj", "linear1": "mlp.fc1",
                        "linear2": "mlp.fc2", "norm1": "self_attn_layer_norm",
                        "norm2": "encoder_attn_layer_norm", "norm3": "final_layer_norm"}
_BACKBONE = "model.backbone.model"


def _conv_norm(leaf: str) -> str:
    """Official ConvNormLayer leaf (``conv.weight`` / ``norm.x``) to HF's ResNet conv layer leaf."""
    module, name = leaf.split(".", 1)
    return f"{'convolution' if module == 'conv' else 'normalization'}.{name}"


def _split_in_proj(prefix: str, kind: str, rows: int) -> _Target:
    """q / k / v rows of a fused ``in_proj_{weight,bias}`` ([3*d, d] / [3*d])."""
    return {f"{prefix}.q_proj.{kind}": slice(0, rows),
            f"{prefix}.k_proj.{kind}": slice(rows, 2 * rows),
            f"{prefix}.v_proj.{kind}": slice(2 * rows, 3 * rows)}


def _copy(key: str) -> _Target:
    """A plain rename of the whole tensor to ``key``."""
    return {key: None}


_RULES: list[tuple[re.Pattern, Callable[[re.Match, torch.Tensor], _Target]]] = [
    # --- backbone: stem conv1_1..conv1_3 -> embedder.0..2
    (re.compile(r"backbone\.conv1\.conv1_(\d)\.((?:conv|norm)\.\w+)"),
     lambda m, t: _copy(f"{_BACKBONE}.embedder.embedder.{int(m[1]) - 1}.{_conv_norm(m[2])}")),
    # --- backbone: residual branches branch2a/b/c -> layer.0/1/2
    (re.compile(r"backbone\.res_layers\.(\d+)\.blocks\.(\d+)\.branch2([abc])\.((?:conv|norm)\.\w+)"),
     lambda m, t: _copy(f"{_BACKBONE}.encoder.stages.{m[1]}.layers.{m[2]}.layer."
                        f"{_BRANCH_INDEX[m[3]]}.{_conv_norm(m[4])}")),
    # --- backbone: 'd' shortcut = Sequential(pool, conv) -> shortcut.1
    (re.compile(r"backbone\.res_layers\.(\d+)\.blocks\.(\d+)\.short\.conv\.((?:conv|norm)\.\w+)"),
     lambda m, t: _copy(f"{_BACKBONE}.encoder.stages.{m[1]}.layers.{m[2]}.shortcut.1.{_conv_norm(m[3])}")),
    # --- backbone: plain 1x1 shortcut (first block of stage 0) -> shortcut
    (re.compile(r"backbone\.res_layers\.(\d+)\.blocks\.(\d+)\.short\.((?:conv|norm)\.\w+)"),
     lambda m, t: _copy(f"{_BACKBONE}.encoder.stages.{m[1]}.layers.{m[2]}.shortcut.{_conv_norm(m[3])}")),
    # --- hybrid encoder: input projections (Sequential(conv, bn)) keep their indices
    (re.compile(r"encoder\.input_proj\.(\d+)\.([01]\.\w+)"),
     lambda m, t: _copy(f"model.encoder_input_proj.{m[1]}.{m[2]}")),
    # --- hybrid encoder: AIFI transformer layer, fused attention input projection
    (re.compile(r"encoder\.encoder\.(\d+)\.layers\.(\d+)\.self_attn\.in_proj_(weight|bias)"),
     lambda m, t: _split_in_proj(f"model.encoder.aifi.{m[1]}.layers.{m[2]}.self_attn", m[3],
                                 t.shape[0] // 3)),
    # --- hybrid encoder: AIFI transformer layer, everything else
    (re.compile(r"encoder\.encoder\.(\d+)\.layers\.(\d+)\.(self_attn\.out_proj|linear1|linear2|norm1|norm2)"
                r"\.(weight|bias)"),
     lambda m, t: _copy(f"model.encoder.aifi.{m[1]}.layers.{m[2]}.{_ENCODER_LAYER_PARTS[m[3]]}.{m[4]}")),
    # --- hybrid encoder: FPN / PAN convolutions and CSP blocks share the official names
    (re.compile(r"encoder\.((?:lateral_convs|downsample_convs|fpn_blocks|pan_blocks)\.\d+\..+)"),
     lambda m, t: _copy(f"model.encoder.{m[1]}")),
    # --- decoder: input projections (Sequential(conv=, norm=)) -> Sequential(0, 1)
    (re.compile(r"decoder\.input_proj\.(\d+)\.conv\.(\w+)"),
     lambda m, t: _copy(f"model.decoder_input_proj.{m[1]}.0.{m[2]}")),
    (re.compile(r"decoder\.input_proj\.(\d+)\.norm\.(\w+)"),
     lambda m, t: _copy(f"model.decoder_input_proj.{m[1]}.1.{m[2]}")),
    # --- decoder layers: fused self-attention input projection
    (re.compile(r"decoder\.decoder\.layers\.(\d+)\.self_attn\.in_proj_(weight|bias)"),
     lambda m, t: _split_in_proj(f"model.decoder.layers.{m[1]}.self_attn", m[2], t.shape[0] // 3)),
    # --- decoder layers: deformable cross attention
    (re.compile(r"decoder\.decoder\.layers\.(\d+)\.cross_attn\."
                r"(sampling_offsets|attention_weights|value_proj|output_proj)\.(weight|bias)"),
     lambda m, t: _copy(f"model.decoder.layers.{m[1]}.encoder_attn.{m[2]}.{m[3]}")),
    # --- decoder layers: everything else
    (re.compile(r"decoder\.decoder\.layers\.(\d+)\.(self_attn\.out_proj|linear1|linear2|norm1|norm2|norm3)"
                r"\.(weight|bias)"),
     lambda m, t: _copy(f"model.decoder.layers.{m[1]}.{_DECODER_LAYER_PARTS[m[2]]}.{m[3]}")),
    # --- per-layer decoder heads
    (re.compile(r"decoder\.dec_score_head\.(\d+)\.(weight|bias)"),
     lambda m, t: _copy(f"model.decoder.class_embed.{m[1]}.{m[2]}")),
    (re.compile(r"decoder\.dec_bbox_head\.(\d+)\.(layers\.\d+\.(?:weight|bias))"),
     lambda m, t: _copy(f"model.decoder.bbox_embed.{m[1]}.{m[2]}")),
    # --- query position MLP
    (re.compile(r"decoder\.(query_pos_head\.layers\.\d+\.(?:weight|bias))"),
     lambda m, t: _copy(f"model.decoder.{m[1]}")),
    # --- encoder-output heads and the denoising embedding sit on HF's RTDetrModel
    (re.compile(r"decoder\.((?:enc_output|enc_score_head|enc_bbox_head|denoising_class_embed)\..+)"),
     lambda m, t: _copy(f"model.{m[1]}")),
]


def _targets(key: str, tensor: torch.Tensor) -> _Target | None:
    """HF keys (with row slices) of one official key, or None if no rule matches."""
    for pattern, build in _RULES:
        match = pattern.fullmatch(key)
        if match is not None:
            return build(match, tensor)
    return None


def official_to_hf(state_dict: Mapping[str, torch.Tensor],
                   hf_state_dict: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Renames an official-layout RT-DETR state_dict to HF ``RTDetrForObjectDetection`` keys.

    Args:
        state_dict: Official-layout tensors (``torch_ref`` state_dict or an official checkpoint).
        hf_state_dict: The HF model's own ``state_dict()``; when given, the result must cover
            exactly its keys with the same shapes.

    Returns:
        A new dict of HF keys to tensors (the q/k/v splits are contiguous copies).

    Raises:
        KeyError: Listing every official key no rule maps, every HF key produced twice, and (with
            ``hf_state_dict``) every HF key left uncovered or produced but unknown to HF.
        ValueError: If a mapped tensor's shape differs from HF's.
    """
    converted: dict[str, torch.Tensor] = {}
    unmapped, duplicated = [], []
    for key, tensor in state_dict.items():
        targets = _targets(key, tensor)
        if targets is None:
            unmapped.append(key)
            continue
        for hf_key, rows in targets.items():
            if hf_key in converted:
                duplicated.append(hf_key)
            converted[hf_key] = tensor if rows is None else tensor[rows].contiguous()

    missing: list[str] = []
    unknown: list[str] = []
    if hf_state_dict is not None:
        missing = sorted(set(hf_state_dict) - set(converted))
        unknown = sorted(set(converted) - set(hf_state_dict))
    if unmapped or duplicated or missing or unknown:
        raise KeyError("official -> HF renaming is not one-to-one: "
                       f"official keys without a rule {sorted(unmapped)}; "
                       f"HF keys produced twice {sorted(duplicated)}; "
                       f"HF keys not covered {missing}; produced keys HF lacks {unknown}")

    if hf_state_dict is not None:
        wrong = {k: (tuple(v.shape), tuple(hf_state_dict[k].shape)) for k, v in converted.items()
                 if tuple(v.shape) != tuple(hf_state_dict[k].shape)}
        if wrong:
            raise ValueError(f"shape mismatch after renaming (ours, HF): {wrong}")
    return converted
