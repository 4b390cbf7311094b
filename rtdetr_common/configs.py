"""Plain-Python configurations of the five official RT-DETR variants.

Each variant is a named function returning a fresh :class:`VariantConfig`; nothing is registered
globally, so building several variants in one process is safe and configs can be edited freely.
The values equal the official merged YAML configurations (``rtdetr_*_6x_coco``); the test
``tests/test_configs.py`` asserts that field by field against ``data/official_configs.json``.

The keyword names of every section are the official constructor arguments, so
``PResNet(**cfg.backbone.kwargs())`` works the same way in torch_ref and jittor_impl.
"""

from __future__ import annotations

import dataclasses
import json
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

DATA_DIR = Path(__file__).resolve().parent / "data"
OFFICIAL_CONFIGS_JSON = DATA_DIR / "official_configs.json"
OFFICIAL_STATE_DICTS_JSON = DATA_DIR / "official_state_dicts.json"

# An input size: one int S (S x S) or an (h, w) pair.
Size = int | Sequence[int]


def spatial_size(size: Size) -> tuple[int, int]:
    """``(h, w)`` of an input size given as one int (square) or an ``(h, w)`` pair.

    Raises:
        ValueError: If it is neither a positive int nor a pair of positive ints.
    """
    pair = isinstance(size, Sequence) and not isinstance(size, str)
    values = list(size) if pair else [size]
    try:
        sides = [operator.index(v) for v in values if not isinstance(v, bool)]
    except TypeError:
        sides = []
    if len(sides) != len(values) or len(sides) != (2 if pair else 1) or min(sides) <= 0:
        raise ValueError(f"size must be a positive int or an (h, w) pair of positive ints, "
                         f"got {size!r}")
    return (sides[0], sides[-1])


def format_size(size: Size) -> str:
    """``HxW`` of an input size (``640x640`` for 640)."""
    h, w = spatial_size(size)
    return f"{h}x{w}"


class _Section:
    """Mixin: the dataclass fields as constructor keyword arguments."""

    def kwargs(self) -> dict:
        """Returns a deep copy of the fields as a dict (lists copied, safe to mutate)."""
        return dataclasses.asdict(self)


@dataclass
class BackboneConfig(_Section):
    """PResNet arguments."""

    depth: int
    variant: str = "d"
    num_stages: int = 4
    return_idx: list[int] = field(default_factory=lambda: [1, 2, 3])
    act: str = "relu"
    freeze_at: int = -1
    freeze_norm: bool = False


@dataclass
class EncoderConfig(_Section):
    """HybridEncoder arguments."""

    in_channels: list[int]
    feat_strides: list[int] = field(default_factory=lambda: [8, 16, 32])
    hidden_dim: int = 256
    nhead: int = 8
    dim_feedforward: int = 1024
    dropout: float = 0.0
    enc_act: str = "gelu"
    use_encoder_idx: list[int] = field(default_factory=lambda: [2])
    num_encoder_layers: int = 1
    pe_temperature: int = 10000
    expansion: float = 1.0
    depth_mult: float = 1
    act: str = "silu"
    eval_spatial_size: list[int] | None = field(default_factory=lambda: [640, 640])


@dataclass
class DecoderConfig(_Section):
    """RTDETRTransformer (decoder) arguments."""

    num_classes: int = 80
    hidden_dim: int = 256
    num_queries: int = 300
    feat_channels: list[int] = field(default_factory=lambda: [256, 256, 256])
    feat_strides: list[int] = field(default_factory=lambda: [8, 16, 32])
    num_levels: int = 3
    num_decoder_points: int = 4
    nhead: int = 8
    num_decoder_layers: int = 6
    dim_feedforward: int = 1024
    dropout: float = 0.0
    activation: str = "relu"
    num_denoising: int = 100
    label_noise_ratio: float = 0.5
    box_noise_scale: float = 1.0
    learnt_init_query: bool = False
    eval_spatial_size: list[int] | None = field(default_factory=lambda: [640, 640])
    eval_idx: int = -1
    eps: float = 1e-2
    aux_loss: bool = True


@dataclass
class MatcherConfig(_Section):
    """HungarianMatcher arguments."""

    weight_dict: dict[str, float] = field(
        default_factory=lambda: {"cost_class": 2, "cost_bbox": 5, "cost_giou": 2})
    use_focal_loss: bool = True
    alpha: float = 0.25
    gamma: float = 2.0


@dataclass
class CriterionConfig(_Section):
    """SetCriterion arguments (the matcher is built from its own section)."""

    weight_dict: dict[str, float] = field(
        default_factory=lambda: {"loss_vfl": 1, "loss_bbox": 5, "loss_giou": 2})
    losses: list[str] = field(default_factory=lambda: ["vfl", "boxes"])
    alpha: float = 0.75
    gamma: float = 2.0
    eos_coef: float = 1e-4
    num_classes: int = 80


@dataclass
class PostProcessorConfig(_Section):
    """RTDETRPostProcessor arguments."""

    num_classes: int = 80
    use_focal_loss: bool = True
    num_top_queries: int = 300
    remap_mscoco_category: bool = False


@dataclass
class ParamGroup:
    """One optimizer parameter group: a regex over parameter names plus overrides.

    Attributes:
        params: The official regex (``re.match`` against full parameter names; the plain
            string ``"backbone"`` is a regex too).
        lr: Learning rate override, or None for the optimizer default.
        weight_decay: Weight decay override, or None for the optimizer default.
    """

    params: str
    lr: float | None = None
    weight_decay: float | None = None


@dataclass
class OptimizerConfig(_Section):
    """AdamW with the official regex parameter groups."""

    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-4
    params: list[ParamGroup] = field(default_factory=list)


@dataclass
class ScheduleConfig(_Section):
    """Epochs, MultiStepLR and gradient clipping."""

    epochs: int = 72
    milestones: list[int] = field(default_factory=lambda: [1000])
    gamma: float = 0.1
    clip_max_norm: float = 0.1


@dataclass
class EMAConfig(_Section):
    """ModelEMA arguments."""

    decay: float = 0.9999
    warmups: int = 2000


@dataclass
class VariantConfig:
    """Everything needed to build and train one RT-DETR variant.

    Attributes:
        name: Short variant name (``r18vd`` ...).
        official_config: The official YAML file name it equals.
        num_classes: Number of object classes (80 for COCO).
        multi_scale: Training input sizes, drawn per batch.
    """

    name: str
    official_config: str
    num_classes: int
    multi_scale: list[int]
    backbone: BackboneConfig
    encoder: EncoderConfig
    decoder: DecoderConfig
    matcher: MatcherConfig
    criterion: CriterionConfig
    postprocessor: PostProcessorConfig
    optimizer: OptimizerConfig
    schedule: ScheduleConfig
    ema: EMAConfig


_MULTI_SCALE = [480, 512, 544, 576, 608, 640, 640, 640, 672, 704, 736, 768, 800]

# Parameter groups, verbatim from the official YAML files.
_GROUPS_R18 = [
    ParamGroup(r"^(?=.*backbone)(?=.*norm).*$", lr=1e-5, weight_decay=0.0),
    ParamGroup(r"^(?=.*backbone)(?!.*norm).*$", lr=1e-5),
    ParamGroup(r"^(?=.*(?:encoder|decoder))(?=.*(?:norm|bias)).*$", weight_decay=0.0),
]
_GROUPS_R34 = [
    ParamGroup(r"^(?=.*backbone)(?=.*norm|bn).*$", lr=1e-5, weight_decay=0.0),
    ParamGroup(r"^(?=.*backbone)(?!.*norm|bn).*$", lr=1e-5),
    ParamGroup(r"^(?=.*(?:encoder|decoder))(?=.*(?:norm|bn|bias)).*$", weight_decay=0.0),
]
_GROUPS_R50 = [
    ParamGroup("backbone", lr=1e-5),
    ParamGroup(r"^(?=.*encoder(?=.*bias|.*norm.*weight)).*$", weight_decay=0.0),
    ParamGroup(r"^(?=.*decoder(?=.*bias|.*norm.*weight)).*$", weight_decay=0.0),
]
_GROUPS_R101 = [ParamGroup("backbone", lr=1e-6)]


def _variant(name: str, num_classes: int, *, depth: int, decoder_layers: int,
             groups: list[ParamGroup], expansion: float = 0.5, eval_idx: int = -1,
             encoder_hidden: int = 256, encoder_ffn: int = 1024) -> VariantConfig:
    """Assembles a variant from the few values in which the official configs differ."""
    large = depth >= 50
    in_channels = [512, 1024, 2048] if large else [128, 256, 512]
    return VariantConfig(
        name=name,
        official_config=f"rtdetr_{name}_6x_coco",
        num_classes=num_classes,
        multi_scale=list(_MULTI_SCALE),
        backbone=BackboneConfig(depth=depth, freeze_at=0 if large else -1, freeze_norm=large),
        encoder=EncoderConfig(in_channels=in_channels, hidden_dim=encoder_hidden,
                              dim_feedforward=encoder_ffn, expansion=expansion),
        decoder=DecoderConfig(num_classes=num_classes, feat_channels=[encoder_hidden] * 3,
                              num_decoder_layers=decoder_layers, eval_idx=eval_idx),
        matcher=MatcherConfig(),
        criterion=CriterionConfig(num_classes=num_classes),
        postprocessor=PostProcessorConfig(num_classes=num_classes),
        optimizer=OptimizerConfig(params=[dataclasses.replace(g) for g in groups]),
        schedule=ScheduleConfig(),
        ema=EMAConfig(),
    )


def r18vd(num_classes: int = 80) -> VariantConfig:
    """RT-DETR with a ResNet-18-vd backbone (``rtdetr_r18vd_6x_coco``)."""
    return _variant("r18vd", num_classes, depth=18, decoder_layers=3, groups=_GROUPS_R18)


def r34vd(num_classes: int = 80) -> VariantConfig:
    """RT-DETR with a ResNet-34-vd backbone (``rtdetr_r34vd_6x_coco``)."""
    return _variant("r34vd", num_classes, depth=34, decoder_layers=4, groups=_GROUPS_R34)


def r50vd_m(num_classes: int = 80) -> VariantConfig:
    """RT-DETR-R50-M: ResNet-50-vd, half-width CCFM, evaluated at decoder layer 2."""
    return _variant("r50vd_m", num_classes, depth=50, decoder_layers=6, groups=_GROUPS_R50,
                    eval_idx=2)


def r50vd(num_classes: int = 80) -> VariantConfig:
    """RT-DETR with a ResNet-50-vd backbone (``rtdetr_r50vd_6x_coco``)."""
    return _variant("r50vd", num_classes, depth=50, decoder_layers=6, groups=_GROUPS_R50,
                    expansion=1.0)


def r101vd(num_classes: int = 80) -> VariantConfig:
    """RT-DETR with a ResNet-101-vd backbone and a 384-wide encoder (``rtdetr_r101vd_6x_coco``)."""
    return _variant("r101vd", num_classes, depth=101, decoder_layers=6, groups=_GROUPS_R101,
                    expansion=1.0, encoder_hidden=384, encoder_ffn=2048)


VARIANTS: dict[str, Callable[..., VariantConfig]] = {
    "r18vd": r18vd,
    "r34vd": r34vd,
    "r50vd_m": r50vd_m,
    "r50vd": r50vd,
    "r101vd": r101vd,
}


def get_variant(name: str, num_classes: int = 80) -> VariantConfig:
    """Returns a fresh config of the named variant.

    Args:
        name: One of ``r18vd``, ``r34vd``, ``r50vd_m``, ``r50vd``, ``r101vd``.
        num_classes: Number of classes the heads predict.

    Raises:
        ValueError: If the name is not an official variant or num_classes is not positive.
    """
    if name not in VARIANTS:
        raise ValueError(f"unknown RT-DETR variant {name!r}; choose one of {sorted(VARIANTS)}")
    if int(num_classes) <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    return VARIANTS[name](int(num_classes))


def variant_at_size(variant: str, num_classes: int = 80, size: Size | None = 640) -> VariantConfig:
    """The variant's config with the eval-time precomputed size set to ``size``.

    ``size`` is one int (square), an ``(h, w)`` pair, or None (position embeddings and anchors
    computed on the fly); both models take ``eval_spatial_size`` as ``[h, w]``, as officially.
    """
    cfg = get_variant(variant, num_classes)
    spatial = None if size is None else list(spatial_size(size))
    cfg.encoder = dataclasses.replace(cfg.encoder, eval_spatial_size=spatial)
    cfg.decoder = dataclasses.replace(cfg.decoder, eval_spatial_size=spatial)
    return cfg


def load_official_configs() -> dict:
    """The official merged YAML configurations, as shipped in ``data/official_configs.json``."""
    return json.loads(OFFICIAL_CONFIGS_JSON.read_text())


def load_official_manifest() -> dict:
    """The official state_dict manifest (keys, shapes, dtypes, buffer flags, parameter counts)."""
    return json.loads(OFFICIAL_STATE_DICTS_JSON.read_text())
