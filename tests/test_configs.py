"""The plain-Python variant configs equal the official merged YAML configurations."""

from __future__ import annotations

import pytest

from rtdetr_common.configs import (VARIANTS, format_size, get_variant, load_official_configs,
                                   spatial_size, variant_at_size)

OFFICIAL = load_official_configs()


def _subset(ours: dict, official: dict, ignore: tuple[str, ...] = ()) -> None:
    for key, value in official.items():
        if key in ignore:
            continue
        assert key in ours, f"official field {key!r} missing from our config"
        assert ours[key] == value, f"{key}: ours {ours[key]!r} != official {value!r}"


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_equals_official(name: str) -> None:
    cfg, off = get_variant(name), OFFICIAL[name]
    _subset(cfg.backbone.kwargs(), off["PResNet"], ignore=("pretrained",))
    assert off["PResNet"]["pretrained"] is False
    _subset(cfg.encoder.kwargs(), off["HybridEncoder"])
    _subset(cfg.decoder.kwargs(), off["RTDETRTransformer"])
    assert cfg.num_classes == off["num_classes"]
    assert cfg.multi_scale == off["RTDETR"]["multi_scale"]
    crit = off["SetCriterion"]
    _subset(cfg.criterion.kwargs(), crit, ignore=("matcher",))
    _subset(cfg.matcher.kwargs(), crit["matcher"], ignore=("type",))
    assert cfg.matcher.use_focal_loss is off["use_focal_loss"]
    assert cfg.postprocessor.use_focal_loss is off["use_focal_loss"]
    _subset(cfg.postprocessor.kwargs(), off["RTDETRPostProcessor"])
    opt = off["optimizer"]
    assert (cfg.optimizer.lr, cfg.optimizer.betas, cfg.optimizer.weight_decay) == (
        opt["lr"], opt["betas"], opt["weight_decay"])
    assert [{k: v for k, v in vars(g).items() if v is not None} for g in cfg.optimizer.params] == opt["params"]
    sched = off["lr_scheduler"]
    assert (cfg.schedule.milestones, cfg.schedule.gamma) == (sched["milestones"], sched["gamma"])
    assert cfg.schedule.epochs == off["epoches"]
    assert cfg.schedule.clip_max_norm == off["clip_max_norm"]
    assert (cfg.ema.decay, cfg.ema.warmups) == (off["ema"]["decay"], off["ema"]["warmups"])


def test_configs_are_independent() -> None:
    a, b = get_variant("r18vd"), get_variant("r18vd")
    a.encoder.in_channels.append(1)
    a.optimizer.params[0].lr = 1.0
    assert b.encoder.in_channels == [128, 256, 512]
    assert b.optimizer.params[0].lr == 1e-5


@pytest.mark.parametrize("bad", [("r19vd", 80), ("r18vd", 0)])
def test_bad_variant_is_a_clear_error(bad: tuple) -> None:
    with pytest.raises(ValueError, match="variant|num_classes"):
        get_variant(*bad)


@pytest.mark.parametrize("size, expected", [
    (640, [640, 640]),
    ((480, 640), [480, 640]),
    ([640, 480], [640, 480]),
    (None, None),
    (0, ValueError),
    (-32, ValueError),
    ((0, 640), ValueError),
    ((480,), ValueError),
    ((480, 640, 3), ValueError),
    ((480.0, 640), ValueError),
    ("640", ValueError),
    (True, ValueError),
])
def test_variant_at_size_takes_one_side_or_height_and_width(size: object,
                                                           expected: list[int] | None | type) -> None:
    if expected is ValueError:
        with pytest.raises(ValueError, match="size must be a positive int or an \\(h, w\\) pair"):
            variant_at_size("r18vd", 80, size)
        return
    cfg = variant_at_size("r18vd", 80, size)
    # [h, w], as the official HybridEncoder and decoder read eval_spatial_size.
    assert cfg.encoder.eval_spatial_size == cfg.decoder.eval_spatial_size == expected
    if size is not None:
        assert spatial_size(size) == tuple(expected)
        assert format_size(size) == f"{expected[0]}x{expected[1]}"
