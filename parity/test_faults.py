"""Fault injection: the module check catches real porting bugs and names the faulty module.

Each test builds a fresh pair, injects one bug into the Jittor model only (never into the
jittor_impl sources) and runs :func:`parity.modules.run_module_check`. With ``'own'``
isolation every other module is fed the reference's data, so the injected module must be the
only one whose isolated comparison fails, and :attr:`ModuleReport.first_failure` must name it.
"""

from __future__ import annotations

import jittor as jt
import numpy as np
import pytest

from jittor_impl.common import BatchNorm2d, named_modules, set_child
from parity.models import ModelPair, build_pair
from parity.modules import ModuleReport, run_module_check
from rtdetr_common.seeded import seeded_images, seeded_targets

SIZE = 256  # the size of the default tier of test_modules.py: the same compiled kernels


@pytest.fixture
def pair() -> ModelPair:
    """A fresh r18vd pair per test: the faults below are written into its Jittor model."""
    return build_pair("r18vd", size=SIZE)


def _jittor_module(pair: ModelPair, name: str):
    return dict(named_modules(pair.jittor_model))[name]


def _check(pair: ModelPair, mode: str) -> ModuleReport:
    images = seeded_images(2, SIZE, seed=1)
    targets = seeded_targets([3, 1], pair.cfg.num_classes, seed=2) if mode == "train" else None
    return run_module_check(pair, mode=mode, images=images, targets=targets)


def _assert_named(report: ModuleReport, module: str, kind: str) -> None:
    """The check failed, the first failure is ``module``, and no other module fails isolated."""
    assert not report.passed, "the injected fault went unnoticed"
    first = report.first_failure
    assert first is not None and first.module == module and first.kind == kind, (
        f"first failure {first.message() if first else None}, expected {module} [{kind}]")
    others = sorted({r.module for r in report.failures("isolated")} - {module})
    assert others == [], f"modules failing in isolation besides {module}: {others}"


def test_unmodified_pair_passes(pair: ModelPair) -> None:
    report = _check(pair, "eval")
    assert report.passed, "\n".join(r.message() for r in report.failures()[:10])
    assert report.first_failure is None


def test_wrong_activation_is_named(pair: ModelPair) -> None:
    # SiLU -> ReLU in one encoder ConvNormLayer.
    name = "encoder.lateral_convs.1.act"
    set_child(_jittor_module(pair, "encoder.lateral_convs.1"), "act", jt.nn.ReLU())
    _assert_named(_check(pair, "eval"), name, "module")


def test_transposed_weight_is_named(pair: ModelPair) -> None:
    # A square Linear of the decoder with its weight transposed.
    name = "decoder.decoder.layers.1.cross_attn.output_proj"
    linear = _jittor_module(pair, name)
    assert linear.weight.shape[0] == linear.weight.shape[1]
    # [out, in] -> [in, out], the same shape since the layer is square
    linear.weight.update(jt.array(np.ascontiguousarray(linear.weight.numpy().T)))
    _assert_named(_check(pair, "eval"), name, "module")


class _BiasedVarianceBatchNorm2d(BatchNorm2d):
    """BatchNorm2d whose running variance takes the BIASED batch variance: the injected bug.

    The normalisation itself is unchanged (it uses the biased variance, as torch does); only
    the running statistic is wrong, by a factor ``(n - 1) / n`` on its new part.
    """

    def execute(self, x: jt.Var) -> jt.Var:
        if not self.is_training():
            return super().execute(x)
        mean = x.mean(dims=(0, 2, 3), keepdims=True)  # [1, c, 1, 1]
        centered = x - mean
        var = (centered * centered).mean(dims=(0, 2, 3), keepdims=True)  # [1, c, 1, 1], biased
        with jt.no_grad():
            m = self.momentum
            batch_mean, batch_var = mean.reshape(-1), var.reshape(-1)  # [c] each
            self.running_mean.update((1.0 - m) * self.running_mean + m * batch_mean)
            self.running_var.update((1.0 - m) * self.running_var + m * batch_var)
            self.num_batches_tracked.update(self.num_batches_tracked + 1)
        scale = self.weight.reshape(1, -1, 1, 1) / jt.sqrt(var + self.eps)  # [1, c, 1, 1]
        return centered * scale + self.bias.reshape(1, -1, 1, 1)  # [bs, c, h, w]


def test_biased_batchnorm_variance_is_named(pair: ModelPair) -> None:
    # At 256 this BatchNorm sees 2 x 8 x 8 values per channel: the biased update is 1/128 of
    # the batch variance short, ~1e-4 of the running variance.
    name = "backbone.res_layers.3.blocks.1.branch2b.norm"
    norm = _jittor_module(pair, name)
    assert type(norm) is BatchNorm2d
    norm.__class__ = _BiasedVarianceBatchNorm2d
    report = _check(pair, "train")
    _assert_named(report, name, "buffer")
    assert report.first_failure.comparison.path == f"{name} -> running_var"


def test_anchor_off_by_one_is_named(pair: ModelPair) -> None:
    # Every memory position gets its neighbour's anchor; the decoder consumes the anchors.
    decoder = pair.jittor_model.decoder
    generate = decoder._generate_anchors

    def shifted(spatial_shapes=None, grid_size=0.05, dtype="float32"):
        anchors, valid_mask = generate(spatial_shapes, grid_size, dtype)
        # [1, sum(h*w), 4] and [1, sum(h*w), 1], rolled by one position
        return (jt.array(np.roll(anchors.numpy(), 1, axis=1)),
                jt.array(np.roll(valid_mask.numpy(), 1, axis=1)))

    decoder._generate_anchors = shifted
    decoder._anchors, decoder._valid_mask = shifted()
    report = _check(pair, "eval")
    _assert_named(report, "decoder", "module")
    assert any("input of decoder.decoder" in r.comparison.path for r in report.failures("isolated"))
