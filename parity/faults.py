"""The fault catalogue: real porting bugs injected into the port, to prove each check can fail.

Each :class:`Fault` is a small text patch (``old`` -> ``new``, ``old`` occurring exactly once)
of one function, method or C++ kernel source of ``jittor_impl``: :func:`applied` compiles the
patched copy of that source at run time and puts it in place of the original on the Jittor
side only, for the duration of a ``with`` block (never touching a file). :class:`FaultRunner`
runs the parity checks on the patched port and reports which rows caught the fault; the clean
port must pass the same checks first, or the catalogue proves nothing.

Parts (each reused across faults; the reference side is computed once): ``eval`` (eval
outputs, the top-k and the postprocessed detections at a non-square size), ``train`` (every
loss term, gradient and forced decision of one training backward), ``step`` (one optimizer
step: updates, moments, EMA, BatchNorm buffers), ``data`` (the trainers' batch hand-off) and,
in the full tier, ``modules`` (every module isolated, eval and train).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib
import inspect
import os
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch

import jittor_impl.checkpoint as jt_checkpoint
import jittor_impl.trainer as jittor_trainer
import torch_ref.trainer as torch_trainer
from rtdetr_common.configs import spatial_size
from rtdetr_common.pipeline.loader import Batch
from rtdetr_common.seeded import seeded_images, seeded_targets

from .check import CheckResult, check_eval
from .compare import Comparison, Tolerance, compare_tree
from .arrays import to_numpy
from .models import ModelPair, build_pair
from .modules import run_module_check
from .training import gradient_rows, port_pass, port_step, reference_pass, reference_step
from .trajectory import training_batches

TIERS = ("fast", "full")
PARTS = ("data", "eval", "train", "step", "modules")
# The part where a fault of each area first shows (its forward is unchanged before it): the
# fast tier runs it first. Areas not named here start at the first part.
AREA_PARTS = {"backward": "train", "loss": "train", "matcher": "train", "denoising": "train",
              "optimizer": "step", "ema": "step", "batchnorm": "step"}


@dataclass(frozen=True)
class Fault:
    """One injected porting bug.

    Attributes:
        id: Unique name.
        area: What it breaks (``forward``, ``geometry``, ``backward``, ``optimizer``, ``ema``,
            ``batchnorm``, ``loss``, ``matcher``, ``denoising``, ``data``).
        what: The bug, in a line.
        target: ``module:qualified.name`` inside ``jittor_impl`` (a function, a method, or a
            string constant such as a kernel's C++ source).
        old: Text of the target's source that the bug replaces (exactly one occurrence).
        new: The replacement.
    """

    id: str
    area: str
    what: str
    target: str
    old: str
    new: str


class FaultError(ValueError):
    """A fault that cannot be applied (its target or its ``old`` text is not found once)."""


def _resolve(target: str) -> tuple[Any, Any, str]:
    """``(module, owner, name)`` of a fault target."""
    module_name, _, qualified = target.partition(":")
    if not qualified:
        raise FaultError(f"fault target {target!r} is not 'module:name'")
    module = importlib.import_module(f"jittor_impl.{module_name}")
    owner: Any = module
    *path, name = qualified.split(".")
    for part in path:
        owner = getattr(owner, part)
    if name not in vars(owner):
        raise FaultError(f"fault target {target!r}: {name!r} not found")
    return module, owner, name


def _undecorated(func: Any, name: str) -> Any:
    """The function a decorator (``jt.no_grad()``, ``staticmethod``) wraps: the closure cell
    holding a function of the target's own name."""
    func = getattr(func, "__func__", func)
    while func.__name__ != name:
        inner = [c.cell_contents for c in func.__closure__ or ()
                 if callable(c.cell_contents) and getattr(c.cell_contents, "__name__", "") in (name, "inner")]
        if not inner:
            raise FaultError(f"cannot find the source of {name!r} behind its decorator")
        func = inner[0]
    return func


def _patched(fault: Fault, module: Any, owner: Any, original: Any, name: str) -> Any:
    """The target with the fault's text replaced, compiled in the module's namespace (its
    decorators, part of its source, applied again)."""
    if isinstance(original, str):
        source = original
    else:
        source = textwrap.dedent(inspect.getsource(_undecorated(original, name)))
    count = source.count(fault.old)
    if count != 1:
        raise FaultError(f"fault {fault.id}: {fault.old!r} occurs {count} times in {fault.target}")
    source = source.replace(fault.old, fault.new)
    if isinstance(original, str):
        return source
    # Compiled inside a function with a __class__ cell, so that zero-argument super() works.
    code = ("def __fault__(__class__):\n" + textwrap.indent(source, "    ")
            + f"\n    return {name}\n")
    namespace = dict(vars(module))
    exec(compile(code, f"<fault {fault.id}: {fault.target}>", "exec"), namespace)
    return namespace["__fault__"](owner if isinstance(owner, type) else None)


@contextlib.contextmanager
def applied(fault: Fault) -> Iterator[None]:
    """The port with ``fault`` in place (every ``jittor_impl`` module holding the original
    under the same name gets the patched one), restored afterwards."""
    module, owner, name = _resolve(fault.target)
    original = vars(owner)[name]
    replacement = _patched(fault, module, owner, original, name)
    if isinstance(owner, type):
        holders = [owner]
    else:
        holders = [m for key, m in list(sys.modules.items())
                   if key == "jittor_impl" or key.startswith("jittor_impl.")
                   if m is not None and vars(m).get(name) is original]
    for holder in holders:
        setattr(holder, name, replacement)
    try:
        yield
    finally:
        for holder in holders:
            setattr(holder, name, original)


# The catalogue. Every entry is a bug a port of the official code could plausibly contain.
CATALOGUE: tuple[Fault, ...] = (
    # --- forward math
    Fault("relu-leaky", "forward", "ReLU with a negative slope of 0.01 (LeakyReLU's constant)",
          "nn:ReLU.execute", "return relu(x)", "return jt.nn.leaky_relu(x, 0.01)"),
    Fault("no-ffn-residual", "forward", "encoder layer drops the FFN residual",
          "encoder:TransformerEncoderLayer.execute", "src = residual + self.dropout2(src)",
          "src = self.dropout2(src)"),
    Fault("bn-eps-1e-3", "forward", "training BatchNorm eps 1e-3 (the Keras default)",
          "nn:BatchNorm2d.execute", "batch_norm_train(x, self.weight, self.bias, self.eps)",
          "batch_norm_train(x, self.weight, self.bias, 1e-3)"),
    Fault("inverse-sigmoid-eps", "forward", "inverse_sigmoid clamps at 1e-3 instead of 1e-5",
          "box_ops:inverse_sigmoid", "def inverse_sigmoid(x: jt.Var, eps: float = 1e-5)",
          "def inverse_sigmoid(x: jt.Var, eps: float = 1e-3)"),
    Fault("vfl-weight-no-target", "loss", "varifocal weight keeps alpha*p^gamma on positives",
          "criterion:SetCriterion.loss_labels_vfl",
          "self.alpha * pred_score.pow(self.gamma) * (1 - target) + target_score",
          "self.alpha * pred_score.pow(self.gamma) + target_score"),
    # --- geometry (height/width)
    Fault("pos-embed-hw-swap", "geometry", "encoder position embedding built as (h, w)",
          "encoder:HybridEncoder.execute", "w, h, self.hidden_dim, self.pe_temperature)",
          "h, w, self.hidden_dim, self.pe_temperature)"),
    Fault("anchors-hw-swap", "geometry", "decoder anchors normalised by (h, w)",
          "decoder:RTDETRTransformer._generate_anchors", "valid_wh = np.array([w, h], dtype=np.float32)",
          "valid_wh = np.array([h, w], dtype=np.float32)"),
    Fault("sampling-levels-wh", "geometry", "deformable sampling reads the level sizes as (w, h)",
          "_kernels:ms_deform_attn", "shapes = [(int(h), int(w)) for h, w in value_spatial_shapes]",
          "shapes = [(int(w), int(h)) for h, w in value_spatial_shapes]"),
    Fault("postprocess-wh-swap", "geometry", "postprocessor scales boxes by (h, w)",
          "postprocessor:RTDETRPostProcessor.execute", "scale = orig_target_sizes.repeat(1, 2)",
          "scale = orig_target_sizes.flip(1).repeat(1, 2)"),
    Fault("msda-grad-x-uses-h", "geometry", "deformable-attention backward scales dx by h",
          "_kernels:_MSDA_BACKWARD_SRC", "out1_p[lp * 2] = grad_x * aw * p.wd;",
          "out1_p[lp * 2] = grad_x * aw * p.h;"),
    # --- backward of the custom kernels
    Fault("relu-grad-at-zero", "backward", "ReLU backward passes the gradient where y >= 0",
          "_kernels:_RELU_BACKWARD_SRC", "in0_p[i] > 0.f", "in0_p[i] >= 0.f"),
    Fault("bn-grad-no-mean", "backward", "BatchNorm backward drops the mean term",
          "_kernels:_BN_BACKWARD_SRC", "(dy[i] - grad_mean - (x[i] - m) * k) * w",
          "(dy[i] - (x[i] - m) * k) * w"),
    Fault("linear-grad-bias-half", "backward", "linear backward sums the bias gradient over half the rows",
          "_kernels:_LINEAR_BACKWARD_SRC", "out2_p[j] = (float)total;", "out2_p[j] = (float)(total * 0.5);"),
    Fault("softmax-grad-no-dot", "backward", "softmax backward forgets the row dot product",
          "_kernels:_SOFTMAX_BACKWARD_SRC", "dx[i] = y[i] * (dy[i] - d);", "dx[i] = y[i] * dy[i];"),
    Fault("layernorm-grad-bias", "backward", "LayerNorm backward's bias gradient is the weight's",
          "_kernels:_LAYER_NORM_BACKWARD_SRC", "out2_p[i] = (float)db;", "out2_p[i] = (float)dw;"),
    Fault("msda-grad-weights", "backward", "deformable-attention backward drops the corner weight",
          "_kernels:_MSDA_BACKWARD_SRC", "grad_aw += dot * cw;", "grad_aw += dot;"),
    Fault("missing-detach", "backward", "decoder feeds the next layer non-detached boxes",
          "decoder:TransformerDecoder.execute",
          "ref_points_detach = inter_ref_bbox.detach() if self.is_training() else inter_ref_bbox",
          "ref_points_detach = inter_ref_bbox"),
    # --- optimizer
    Fault("adamw-eps", "optimizer", "AdamW eps 1e-6", "engine:AdamW.__init__",
          "lr: float, eps: float = 1e-8,", "lr: float, eps: float = 1e-6,"),
    Fault("adamw-no-bias-correction", "optimizer", "AdamW step size without the first bias correction",
          "_kernels:adamw_hyperparameters", '"neg_step_size": -lr / (1 - beta1 ** step)',
          '"neg_step_size": -lr'),
    Fault("adamw-beta2", "optimizer", "AdamW second moment with beta2 0.99",
          "_kernels:adamw_hyperparameters", '"beta2": beta2,\n              "one_minus_beta2": 1 - beta2,',
          '"beta2": 0.99,\n              "one_minus_beta2": 0.01,'),
    Fault("weight-decay-groups", "optimizer", "group weight decay ignored (norms decayed)",
          "build:build_optimizer", 'group["weight_decay"] = group_cfg.weight_decay', "pass"),
    # --- EMA
    Fault("ema-decay-0.999", "ema", "EMA decay 0.999 instead of the configured 0.9999",
          "ema:ModelEMA.decay_fn", "return self.decay * (1", "return 0.999 * (1"),
    Fault("ema-warmup-half", "ema", "EMA ramp with half the warm-up",
          "ema:ModelEMA.decay_fn", "-updates / self.warmups", "-updates / (self.warmups / 2)"),
    # --- BatchNorm statistics
    Fault("bn-momentum", "batchnorm", "running statistics with momentum 0.01",
          "nn:BatchNorm2d.execute", "m = self.momentum", "m = self.momentum * 0.1"),
    Fault("bn-biased-variance", "batchnorm", "running variance takes the biased batch variance",
          "nn:BatchNorm2d.execute", "unbiased = batch_var * (n / (n - 1))", "unbiased = batch_var"),
    # --- loss
    Fault("giou-loss-as-iou", "loss", "GIoU loss normalised by the image count, not the boxes",
          "criterion:SetCriterion.loss_boxes", "loss_giou.sum() / num_boxes", "loss_giou.sum() / len(targets)"),
    Fault("focal-gamma", "loss", "varifocal gamma squared",
          "criterion:SetCriterion.loss_labels_vfl", "pred_score.pow(self.gamma)", "pred_score.pow(self.gamma * 2)"),
    # --- matcher
    Fault("matcher-bbox-weight", "matcher", "matcher drops the L1 cost weight",
          "matcher:HungarianMatcher.execute", "cost = self.cost_bbox * cost_bbox +", "cost = cost_bbox +"),
    # --- denoising
    Fault("dn-box-noise-scale", "denoising", "denoising box noise uses the full width/height",
          "denoising:get_contrastive_denoising_training_group",
          "diff = (input_query_bbox[..., 2:] * 0.5)", "diff = (input_query_bbox[..., 2:] * 1.0)"),
    Fault("dn-label-noise", "denoising", "denoising label noise without the 0.5 factor",
          "denoising:get_contrastive_denoising_training_group",
          "noise_mask = u < (label_noise_ratio * 0.5)", "noise_mask = u < label_noise_ratio"),
    # --- data
    Fault("data-boxes-yx", "data", "batch hand-off swaps the box coordinates' (x, y) order",
          "trainer:to_tensors", 'jt.array(t["boxes"])', 'jt.array(t["boxes"][:, [1, 0, 3, 2]])'),
    Fault("data-images-255", "data", "batch hand-off rescales the images to [0, 255]",
          "trainer:to_tensors", "images = jt.array(batch.images)", "images = jt.array(batch.images * 255.0)"),
)


def catalogue(ids: list[str] | None = None) -> list[Fault]:
    """The catalogue, or the named faults of it.

    Raises:
        ValueError: On an unknown id.
    """
    if not ids:
        return list(CATALOGUE)
    known = {f.id: f for f in CATALOGUE}
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise ValueError(f"unknown fault ids {unknown}; known: {sorted(known)}")
    return [known[i] for i in ids]


def check_data(pair: ModelPair, size: tuple[int, int]) -> list[Comparison]:
    """The trainers' batch hand-off (``trainer.to_tensors``) on the same loader batch."""
    images = seeded_images(2, size, seed=7)
    targets = [dict(t, image_id=i, orig_size=np.array([size[1] + 13 * i, size[0] - 7 * i], np.int64))
               for i, t in enumerate(seeded_targets([3, 1], pair.cfg.num_classes, seed=8))]
    batch = Batch(images, targets)
    ref = torch_trainer.to_tensors(batch)
    out = jittor_trainer.to_tensors(batch)
    exact = Tolerance(atol=0.0)
    return compare_tree({"data": to_numpy(out)}, {"data": to_numpy(ref)}, lambda p: exact)


@dataclass
class FaultResult:
    """One fault's run: the rows that failed, per part, and where it was first caught."""

    fault: Fault
    failures: dict[str, list[Comparison]] = field(default_factory=dict)
    parts_run: list[str] = field(default_factory=list)
    error: str = ""
    seconds: float = 0.0

    @property
    def caught(self) -> bool:
        """A check row failed (a crash of the patched port is reported apart, as ``error``)."""
        return any(self.failures.values())

    @property
    def caught_by(self) -> str:
        """``part: path`` of the first failing row (or the error the port raised)."""
        for part in self.parts_run:
            if self.failures.get(part):
                return f"{part}: {self.failures[part][0].path}"
        return f"error: {self.error}" if self.error else ""

    def row(self) -> dict:
        return {"id": self.fault.id, "area": self.fault.area, "what": self.fault.what,
                "caught": self.caught, "caught_by": self.caught_by,
                "failed_rows": sum(len(v) for v in self.failures.values()),
                "parts": ",".join(self.parts_run), "seconds": round(self.seconds, 1)}


# The catalogue's input size: non-square, so that height/width swaps show; small, so that the
# fast tier fits the default test tier.
CATALOGUE_SIZE = (128, 192)


class FaultRunner:
    """Runs the checks of a tier on one model pair, the reference side computed once.

    Args:
        variant: Official variant.
        size: ``(h, w)`` of every check (non-square catches height/width swaps).
        tier: ``fast`` (the part of the fault's area first, then the others in order, stopping
            at the first part that catches it; no module check) or ``full`` (every part in
            order, the module check included).
        weights: A weight file (trained or official), or None for the seeded default.
        num_classes: The weights' class count.
    """

    def __init__(self, variant: str = "r18vd", size: tuple[int, int] = CATALOGUE_SIZE,
                 tier: str = "fast", weights: str | Path | None = None,
                 num_classes: int = 80) -> None:
        if tier not in TIERS:
            raise ValueError(f"tier must be one of {TIERS}, got {tier!r}")
        self.size, self.tier = spatial_size(size), tier
        self.parts = [p for p in PARTS if tier == "full" or p != "modules"]
        self.pair = build_pair(variant, num_classes=num_classes, size=self.size, weights=weights)
        self.start = {k: v.detach().numpy().copy() for k, v in self.pair.torch_model.state_dict().items()}
        images, targets = training_batches(self.pair.cfg.num_classes, self.size)[0]
        self.train_reference = reference_pass(self.pair, images, targets)
        self._reset()
        self.step_reference = reference_step(self.pair, images, targets)
        self._reset()

    def _reset(self) -> None:
        """Both models back to the starting state."""
        self.pair.torch_model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in self.start.items()})
        jt_checkpoint.load_state_dict_strict(self.pair.jittor_model, self.start, "fault runner start")

    def run_part(self, part: str) -> list[Comparison]:
        """The rows of one part on the port as it is now."""
        self._reset()
        if part == "eval":
            result = CheckResult(self.pair.cfg.name, self.pair.weights_source, self.size)
            check_eval(self.pair, result, self.size, batch=2)
            return [r.comparison for r in result.rows]
        if part == "train":
            return gradient_rows(port_pass(self.pair, self.train_reference))
        if part == "step":
            return port_step(self.pair, self.step_reference)
        if part == "data":
            return check_data(self.pair, self.size)
        if part == "modules":
            rows = []
            for mode in ("eval", "train"):
                targets = seeded_targets([3, 1], self.pair.cfg.num_classes, seed=2) if mode == "train" else None
                report = run_module_check(self.pair, mode=mode, images=seeded_images(2, self.size, seed=1),
                                          targets=targets, modules="coarse")
                rows += [r.comparison for r in report.failures()]
            return rows
        raise ValueError(f"unknown part {part!r}; parts: {PARTS}")

    def baseline(self) -> dict[str, list[Comparison]]:
        """The failing rows of every part on the clean port (all must be empty)."""
        return {part: [c for c in self.run_part(part) if not c.passed] for part in self.parts}

    def run(self, fault: Fault) -> FaultResult:
        """The checks on the port with ``fault`` applied."""
        result = FaultResult(fault)
        start = time.perf_counter()
        with applied(fault):
            for part in part_order(fault, self.parts, self.tier):
                result.parts_run.append(part)
                try:
                    result.failures[part] = [c for c in self.run_part(part) if not c.passed]
                except Exception as exc:  # a crash of the patched port is a catch too
                    result.error = f"{part}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                    break
                if self.tier == "fast" and result.failures[part]:
                    break
        result.seconds = time.perf_counter() - start
        return result


def part_order(fault: Fault, parts: list[str], tier: str) -> list[str]:
    """The order a tier runs ``parts`` on ``fault``: at the fast tier the part of its area
    (:data:`AREA_PARTS`) first, the rest as given."""
    first = AREA_PARTS.get(fault.area) if tier == "fast" else None
    return [first] + [p for p in parts if p != first] if first in parts else list(parts)


@functools.cache
def _openmp() -> Any:
    """The process's GNU OpenMP runtime, on which Jittor's CPU kernels run (None without one)."""
    try:
        return ctypes.CDLL("libgomp.so.1")
    except OSError:
        return None


def set_threads(count: int, openmp: int | None = None) -> tuple[int, int | None]:
    """Sets this process's torch threads to ``count`` and its OpenMP threads (Jittor's kernels)
    to ``openmp`` (``count`` if None); returns the previous two, to set them back with."""
    omp = _openmp()
    before = (torch.get_num_threads(), None if omp is None else int(omp.omp_get_max_threads()))
    torch.set_num_threads(count)
    if omp is not None:
        omp.omp_set_num_threads(count if openmp is None else openmp)
    return before


def _run_part(variant: str, size: tuple[int, int], tier: str, ids: list[str],
              weights: str | Path | None, num_classes: int
              ) -> tuple[dict[str, list[Comparison]], list[FaultResult]]:
    """The baseline and the results of the faults ``ids`` in a fresh runner (a worker's share)."""
    faults = catalogue(ids)
    runner = FaultRunner(variant, size, tier, weights, num_classes)
    return runner.baseline(), [runner.run(fault) for fault in faults]


def split_faults(faults: list[Fault], workers: int, own_share: float | None = None
                 ) -> tuple[list[Fault], list[list[Fault]]]:
    """This process's faults (every ``round(1 / own_share)``-th, from the first) and each
    other worker's (the rest, round-robin); ``own_share`` defaults to ``1 / workers``.
    Workers left without a fault are dropped."""
    workers = max(1, workers)
    share = 1.0 / workers if own_share is None else own_share
    if not 0.0 < share <= 1.0:
        raise ValueError(f"own_share must lie in (0, 1], got {share}")
    if workers == 1:
        return list(faults), []
    step = max(1, round(1.0 / share))
    rest = [f for i, f in enumerate(faults) if i % step]
    others = [rest[i::workers - 1] for i in range(workers - 1)]
    return list(faults[::step]), [part for part in others if part]


class CatalogueRun:
    """A catalogue run shared over ``workers`` processes.

    The spawned workers start at construction; this process runs its own share in
    :meth:`finish`, so that other work can run here in between (the report's check does).
    ``own_share`` is the fraction of the faults this process keeps (``1 / workers`` unless
    given; less when it has other work to do first); the rest go round-robin to the workers.
    Each process checks the clean port too (the baselines are merged). While workers run,
    the machine's cores are divided among the processes (:attr:`threads_each`, torch and
    OpenMP alike, this process included until :meth:`close`): processes that each ask for
    every core slow each other down far more than they gain.
    """

    def __init__(self, variant: str, size: tuple[int, int], tier: str, ids: list[str] | None = None,
                 weights: str | Path | None = None, num_classes: int = 80, workers: int = 1,
                 own_share: float | None = None) -> None:
        self.args = (variant, size, tier, weights, num_classes)
        self.faults = catalogue(ids)
        self.own, others = split_faults(self.faults, workers, own_share)
        others = [[f.id for f in part] for part in others]
        self.pool = None
        self.futures = []
        self.threads_each: int | None = None
        self._threads_before: tuple[int, int | None] | None = None
        if others:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self.threads_each = max(1, (os.cpu_count() or 1) // (len(others) + 1))
            self.pool = ProcessPoolExecutor(len(others), mp_context=multiprocessing.get_context("spawn"),
                                            initializer=set_threads, initargs=(self.threads_each,))
            self.futures = [self.pool.submit(_run_part, variant, size, tier, part, weights, num_classes)
                            for part in others]
            self._threads_before = set_threads(self.threads_each)

    def finish(self, progress: Any = None) -> tuple[dict[str, list[Comparison]], list[FaultResult]]:
        """Runs this process's share, then gathers the workers' (see :func:`run_catalogue`)."""
        variant, size, tier, weights, num_classes = self.args
        try:
            runner = FaultRunner(variant, size, tier, weights, num_classes)
            baseline = runner.baseline()
            results = []
            for fault in self.own:
                results.append(runner.run(fault))
                if progress is not None:
                    progress(results[-1])
            for future in self.futures:
                other, done = future.result()
                for part, rows in other.items():
                    baseline.setdefault(part, [])
                    baseline[part] += [c for c in rows
                                       if c.path not in {b.path for b in baseline[part]}]
                results += done
        finally:
            self.close()
        order = {f.id: i for i, f in enumerate(self.faults)}
        return baseline, sorted(results, key=lambda r: order[r.fault.id])

    def close(self) -> None:
        """Stops the workers (a run not finished is abandoned) and gives this process its
        threads back."""
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
            self.pool = None
        if self._threads_before is not None:
            set_threads(*self._threads_before)
            self._threads_before = None


def run_catalogue(variant: str, size: tuple[int, int], tier: str, ids: list[str] | None = None,
                  progress: Any = None, weights: str | Path | None = None,
                  num_classes: int = 80, workers: int = 1
                  ) -> tuple[dict[str, list[Comparison]], list[FaultResult]]:
    """The clean port's failing rows per part (the baseline) and every fault's result.

    With ``workers`` > 1 every ``workers``-th fault (from the second on) runs in its own
    spawned process with its own runner, beside this one (each checks the clean port too);
    the results come back in catalogue order and the baselines merged. ``progress(result)``
    is called for each of this process's results as it comes.
    """
    return CatalogueRun(variant, size, tier, ids, weights, num_classes, workers).finish(progress)


def write_table(results: list[FaultResult], path: Path) -> None:
    """The catalogue's table as CSV (pandas), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pd.DataFrame([r.row() for r in results]).to_csv(tmp, index=False)
    os.replace(tmp, path)


def cmd_faults(args: Any) -> int:
    """``rtdetr-parity faults``: runs the catalogue; non-zero when a fault goes uncaught or
    the clean port fails a check."""
    size = spatial_size(args.size)
    print(f"fault catalogue: {args.variant} at {size[0]}x{size[1]}, {args.tier} tier, "
          f"weights {args.weights or 'seeded'}")
    baseline, results = run_catalogue(
        args.variant, size, args.tier, args.only, weights=args.weights, num_classes=args.num_classes,
        workers=args.workers, progress=lambda r: print(f"  {r.fault.id:<28} "
                                 f"{'ERROR' if r.error else 'caught' if r.caught else 'MISSED'}  "
                                 f"{r.caught_by}", flush=True))
    dirty = {part: rows for part, rows in baseline.items() if rows}
    table = pd.DataFrame([r.row() for r in results])
    if args.workers > 1:
        print(f"(the faults of {args.workers - 1} other worker(s) are in the table only)")
    print(table[["id", "area", "caught", "caught_by"]].to_string(index=False, max_colwidth=90))
    if args.out:
        write_table(results, Path(args.out) / f"faults_{args.variant}_{args.tier}.csv")
    for part, rows in dirty.items():
        print(f"FAIL: the clean port fails {len(rows)} '{part}' rows, first {rows[0].path}: {rows[0].reason}")
    missed = [r.fault.id for r in results if not r.caught or r.error]
    if missed:
        print(f"FAIL: not caught by a check: {missed}")
    print(f"{sum(r.caught and not r.error for r in results)} of {len(results)} faults caught")
    return 1 if dirty or missed else 0

