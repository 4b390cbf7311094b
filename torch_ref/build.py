"""Public builders: model, matcher, criterion, postprocessor, optimizer, EMA and the port parts of a variant."""

from __future__ import annotations

import torch
from torch import nn

from rtdetr_common.configs import VariantConfig, get_variant, variant_at_size
from rtdetr_common.random import SharedRandom
from rtdetr_common.state_dicts import assign_param_groups

from .backbone import PResNet
from .criterion import SetCriterion
from .decoder import RTDETRTransformer
from .ema import ModelEMA
from .encoder import HybridEncoder
from .matcher import HungarianMatcher
from .postprocessor import RTDETRPostProcessor
from .rtdetr import RTDETR


def _config(variant: str | VariantConfig, num_classes: int) -> VariantConfig:
    return variant if isinstance(variant, VariantConfig) else get_variant(variant, num_classes)


def build_model(variant: str | VariantConfig, num_classes: int = 80, *, multi_scale: bool = True,
                seed: int = 0) -> RTDETR:
    """Builds a variant (a name such as ``r18vd``, or a config), randomly initialised as officially.

    ``num_classes`` is ignored for a config; ``multi_scale`` resizes training batches to the official sizes;
    ``seed`` seeds the shared random stream (multi-scale size, denoising noise).
    """
    cfg = _config(variant, num_classes)
    rng = SharedRandom(seed)
    backbone = PResNet(**cfg.backbone.kwargs())
    encoder = HybridEncoder(**cfg.encoder.kwargs())
    decoder = RTDETRTransformer(**cfg.decoder.kwargs(), rng=rng)
    return RTDETR(backbone, encoder, decoder, cfg.multi_scale if multi_scale else None, rng)


def build_matcher(variant: str | VariantConfig, num_classes: int = 80) -> HungarianMatcher:
    """The variant's Hungarian matcher."""
    return HungarianMatcher(**_config(variant, num_classes).matcher.kwargs())


def build_criterion(variant: str | VariantConfig, num_classes: int = 80) -> SetCriterion:
    """The variant's SetCriterion with its matcher."""
    cfg = _config(variant, num_classes)
    return SetCriterion(build_matcher(cfg), **cfg.criterion.kwargs())


def build_postprocessor(variant: str | VariantConfig, num_classes: int = 80, *,
                        remap_mscoco_category: bool = False) -> RTDETRPostProcessor:
    """The variant's postprocessor; ``remap_mscoco_category`` maps labels 0..79 to COCO ids."""
    kwargs = _config(variant, num_classes).postprocessor.kwargs()
    kwargs["remap_mscoco_category"] = remap_mscoco_category
    return RTDETRPostProcessor(**kwargs)


def build_optimizer(model: nn.Module, variant: str | VariantConfig,
                    num_classes: int = 80) -> torch.optim.AdamW:
    """AdamW over the official regex parameter groups (unmatched parameters form the last group)."""
    opt = _config(variant, num_classes).optimizer
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    names = assign_param_groups(named, [g.params for g in opt.params])
    groups = []
    for group_cfg, group_names in zip(opt.params + [None], names):
        group = {"params": [named[n] for n in group_names]}
        if group_cfg is not None and group_cfg.lr is not None:
            group["lr"] = group_cfg.lr
        if group_cfg is not None and group_cfg.weight_decay is not None:
            group["weight_decay"] = group_cfg.weight_decay
        groups.append(group)
    return torch.optim.AdamW(groups, lr=opt.lr, betas=tuple(opt.betas), weight_decay=opt.weight_decay)


def build_ema(model: nn.Module, variant: str | VariantConfig, num_classes: int = 80) -> ModelEMA:
    """The variant's ModelEMA of ``model``."""
    return ModelEMA(model, **_config(variant, num_classes).ema.kwargs())


def build_port(variant: str, num_classes: int = 80, *, size: tuple[int, int] | None = None,
               seed: int = 0, config: VariantConfig | None = None) -> dict:
    """The parity harness's port factory: model (eval tables for ``size``), criterion and postprocessor.

    ``config``, when given, is built instead of ``variant`` at ``size``.
    """
    cfg = config if config is not None else variant_at_size(variant, num_classes, size)
    return {"model": build_model(cfg, multi_scale=False, seed=seed),
            "criterion": build_criterion(cfg), "postprocessor": build_postprocessor(cfg)}
