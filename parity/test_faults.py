"""Fault injection: the checks catch real porting bugs, and name where they are.

Two layers. The catalogue (:mod:`parity.faults`): every injected bug must be caught by the
fast tier (default test tier) and the full tier (slow tier), on a clean port that passes the
same checks first. The module check (below the catalogue tests): each test injects one bug
into the Jittor model instance and asserts :func:`parity.modules.run_module_check` names the
faulty module, with ``'own'`` isolation keeping every other module clean.
"""

from __future__ import annotations

from concurrent.futures import Future
from types import SimpleNamespace

import jittor as jt
import numpy as np
import pytest
import torch

from jittor_impl.nn import BatchNorm2d, named_modules, set_child
from parity.conftest import _RUNS, _THREADS, background_catalogue, give_threads_back
from parity.faults import (AREA_PARTS, CATALOGUE_SIZE, PARTS, Fault, FaultError, FaultResult, FaultRunner,
                           _resolve, applied, _openmp, catalogue, part_order, run_catalogue, set_threads,
                           split_faults)
from parity.models import ModelPair, build_pair
from parity.modules import ModuleReport, run_module_check
from rtdetr_common.seeded import seeded_images, seeded_targets

# The module faults below use the catalogue's size too (the same compiled kernels).
FAULT_SIZE = SIZE = CATALOGUE_SIZE
# Every area a porting bug can sit in; the catalogue covers each.
AREAS = {"forward", "geometry", "backward", "optimizer", "ema", "batchnorm", "loss", "matcher",
         "denoising", "data"}


def test_catalogue_is_well_formed() -> None:
    faults = catalogue()
    assert len(faults) >= 25
    assert len({f.id for f in faults}) == len(faults)
    assert {f.area for f in faults} == AREAS
    for fault in faults:  # every patch applies (its text occurs once) and is undone afterwards
        module, owner, name = _resolve(fault.target)
        original = vars(owner)[name]
        with applied(fault):
            assert vars(owner)[name] is not original, fault.id
        assert vars(owner)[name] is original, fault.id


def test_the_faults_command_defaults_to_the_catalogue_size() -> None:
    from parity.cli import build_parser

    args = build_parser().parse_args(["faults"])
    assert tuple(args.size) == CATALOGUE_SIZE


def test_a_fault_reaches_every_holder_of_its_target() -> None:
    """A module-level function imported by name elsewhere (``adamw_hyperparameters`` into
    the engine) is replaced there too, and restored."""
    import jittor_impl._kernels as kernels
    import jittor_impl.engine as engine
    original = kernels.adamw_hyperparameters
    assert engine.adamw_hyperparameters is original
    with applied(catalogue(["adamw-beta2"])[0]):
        assert engine.adamw_hyperparameters is kernels.adamw_hyperparameters is not original
        hypers = kernels.adamw_hyperparameters(1e-4, 0.0, (0.9, 0.999), 1e-8, 1).numpy()
        assert hypers[2] == pytest.approx(0.99)
    assert engine.adamw_hyperparameters is original


def test_a_fault_whose_text_is_absent_is_refused() -> None:
    bad = Fault("x", "forward", "absent", "ema:ModelEMA.decay_fn", "no such text", "")
    with pytest.raises(FaultError, match="occurs 0 times"):
        with applied(bad):
            pass


# (variant, size, tier): the fast tier in the default test tier; the full tier and a large
# variant at 640 in the slow tier.
RUNS = [pytest.param(("r18vd", FAULT_SIZE, "fast"), id="r18vd-fast"),
        pytest.param(("r18vd", FAULT_SIZE, "full"), id="r18vd-full", marks=pytest.mark.slow),
        pytest.param(("r50vd", (640, 480), "fast"), id="r50vd-640-fast", marks=pytest.mark.slow)]


class _Finished:
    """A catalogue run done elsewhere (the session's spawned process), read fault by fault."""

    def __init__(self, tier: str, results: list[FaultResult]) -> None:
        self.tier = tier
        self.results = {r.fault.id: r for r in results}

    def run(self, fault: Fault) -> FaultResult:
        return self.results[fault.id]


@pytest.fixture(scope="module", params=RUNS)
def runner(request) -> FaultRunner | _Finished:
    """One runner per run of the table, or the results of the session's spawned process where
    it ran this one; the clean port must pass every part first."""
    background = background_catalogue(request.config, request.param)
    if background is not None:
        baseline, results = background.result()
        runner = _Finished(request.param[2], results)
    else:
        runner = FaultRunner(*request.param)
        baseline = runner.baseline()
    dirty = {part: [f"{c.path}: {c.reason}" for c in rows[:5]]
             for part, rows in baseline.items() if rows}
    assert dirty == {}, f"the clean port fails the catalogue's checks: {dirty}"
    return runner


@pytest.mark.parametrize("fault", catalogue(), ids=lambda f: f.id)
def test_catalogue_fault_is_caught(runner: FaultRunner | _Finished, fault: Fault) -> None:
    result = runner.run(fault)
    assert not result.error, f"the patched port crashed instead of being checked: {result.error}"
    assert result.caught, f"{fault.id} ({fault.what}) went unnoticed by {result.parts_run}"
    if runner.tier == "full":
        assert result.parts_run == runner.parts


def test_the_fast_tier_runs_the_part_of_a_faults_area_first() -> None:
    fault = {f.area: f for f in catalogue()}
    assert set(fault) - set(AREA_PARTS) == {"forward", "geometry", "data"}  # start at the first part
    fast = [p for p in PARTS if p != "modules"]
    assert part_order(fault["ema"], fast, "fast") == ["step", "data", "eval", "train"]
    assert part_order(fault["matcher"], fast, "fast") == ["train", "data", "eval", "step"]
    assert part_order(fault["geometry"], fast, "fast") == fast
    assert part_order(fault["ema"], list(PARTS), "full") == list(PARTS)
    assert part_order(fault["ema"], ["data", "eval"], "fast") == ["data", "eval"]


@pytest.mark.parametrize("workers, own_share, own, others", [
    (1, None, 32, []), (2, None, 16, [16]), (2, 1 / 3, 11, [21]), (3, None, 11, [11, 10]),
    (4, 1.0, 32, [])])
def test_the_catalogue_is_split_whole_and_once(workers, own_share, own, others) -> None:
    faults = catalogue()[:32]
    mine, theirs = split_faults(faults, workers, own_share)
    assert (len(mine), [len(part) for part in theirs]) == (own, others)
    ids = [f.id for f in mine] + [f.id for part in theirs for f in part]
    assert sorted(ids) == sorted(f.id for f in faults)
    with pytest.raises(ValueError, match="own_share"):
        split_faults(faults, 2, 0.0)


def test_set_threads_sets_torch_and_jittors_openmp_and_gives_the_old_counts_back() -> None:
    """The catalogue's processes divide the cores through both runtimes: torch's threads and
    the OpenMP that Jittor's CPU kernels run on (a Jittor forward then uses one core)."""
    omp = _openmp()
    assert omp is not None, "no libgomp.so.1: Jittor's CPU kernels are built with GNU OpenMP"
    before = set_threads(1)
    try:
        assert (torch.get_num_threads(), omp.omp_get_max_threads()) == (1, 1)
    finally:
        assert set_threads(*before) == (1, 1)
    assert (torch.get_num_threads(), omp.omp_get_max_threads()) == before


def test_the_session_takes_its_threads_back_only_when_the_background_catalogue_is_done() -> None:
    """The test session runs on the cores the background catalogue leaves it, and gets its
    threads back (torch and OpenMP) once every background run has finished, not before."""
    omp = _openmp()
    original = set_threads(3)
    try:
        config = SimpleNamespace(stash=pytest.Stash())
        done, running = Future(), Future()
        done.set_result(None)
        config.stash[_RUNS] = {("r18vd", (256, 256), "fast"): done, ("r18vd", (192, 320), "fast"): running}
        config.stash[_THREADS] = set_threads(1)
        give_threads_back(config)
        assert (torch.get_num_threads(), omp.omp_get_max_threads()) == (1, 1)
        running.set_result(None)
        give_threads_back(config)
        assert (torch.get_num_threads(), omp.omp_get_max_threads()) == (3, 3)
        assert _THREADS not in config.stash
        give_threads_back(config)  # given back once only
        config.stash[_THREADS] = set_threads(1)
        config.stash[_RUNS] = {("r18vd", (256, 256), "fast"): Future()}
        give_threads_back(config, finished_only=False)  # the session's end does not wait
        assert (torch.get_num_threads(), omp.omp_get_max_threads()) == (3, 3)
    finally:
        set_threads(*original)


@pytest.mark.slow  # a spawned worker builds a second runner of its own
def test_workers_share_the_catalogue() -> None:
    """Two workers (this process and a spawned one) each run their share against a clean
    baseline; the results come back complete, in catalogue order, each fault caught."""
    ids = [f.id for f in catalogue()[:2]]
    threads = torch.get_num_threads()
    baseline, results = run_catalogue("r18vd", FAULT_SIZE, "fast", ids=ids, workers=2)
    assert torch.get_num_threads() == threads  # the cores it divided are given back
    assert not any(baseline.values())
    assert [r.fault.id for r in results] == ids
    assert all(r.caught and not r.error and r.caught_by for r in results), \
        [(r.fault.id, r.caught_by, r.error) for r in results]


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
    # At 128 x 192 this BatchNorm sees 2 x 4 x 6 values per channel: the biased update is
    # 1/48 of the batch variance short.
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
