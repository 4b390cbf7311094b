"""Module-by-module parity: where, inside the network, the port first departs from the reference.

:func:`run_module_check` runs both models end to end with every selected module recorded
(:mod:`parity.capture`) and compares each call of each module in two ways:

- **accumulated** (``module.accumulated`` rows): the Jittor module's output in the end-to-end
  Jittor run against the torch module's output in the end-to-end torch run. Its error
  includes everything upstream; it is reported, with a bound measured on the five variants.
- **isolated** (``module`` rows): the Jittor module called again on exactly the inputs the
  torch module received (tensors converted with their dtypes, int64 kept, nested
  lists/dicts/ints/None passed through, modules passed as arguments mapped by name) against
  the torch module's output. With the default ``isolation='own'`` the recorded calls nested
  inside it are answered with the torch children's outputs, and the inputs the module hands
  to them are compared with those torch handed (``P -> input of C: args[1]`` rows). Each
  isolated row then holds one module's own error, whatever its size: the whole model's glue
  code as much as a single convolution. ``isolation='subtree'`` runs the children for real.

:attr:`ModuleReport.first_failure` is the module to look at: among the calls whose isolated
comparison fails, the first to *return* (an enclosing call returns after the calls inside it).

Training mode: both models draw denoising noise from identically seeded shared streams; each
isolated call starts the Jittor stream at the state the torch stream had when the torch call
started. The torch model's top-k query selection is forced into the Jittor decoder for the
end-to-end run, so that comparisons continue downstream of a near-tie; the decoder's own
isolated call runs unforced first and reports its decision (``decision`` row, ties allowed
as in :mod:`parity.check`). Isolated calls update BatchNorm running statistics: each module
with buffers is given the torch module's buffers from before the torch call, its own buffers
are compared with the torch ones after it (``buffer`` rows: a wrong running-variance update
is named here) and the Jittor buffers are restored. ``buffer.accumulated`` rows compare the
buffers after the two end-to-end runs. The check leaves both models as it found them
(buffers, random streams, no forced top-k).

Structure: module names must be equal on both sides (``names`` rows) and each module called
as often (``calls`` rows), with one documented exception: torch's ``nn.MultiheadAttention``
uses its ``out_proj`` weights functionally without calling the module, while the port calls
it.

Granularity: every module by default; ``modules='coarse'`` (:func:`coarse_filter`), a
:class:`~parity.capture.ModuleFilter` (names, prefixes, maximum depth) or a list of names
restrict it.
"""

from __future__ import annotations

import dataclasses
import math
import resource
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import jittor as jt
import numpy as np
import torch

from jittor_impl.nn import named_modules as jittor_named_modules

from .arrays import to_numpy
from .capture import (NOT_RECORDED, Call, JittorCapture, ModuleFilter, ModuleRef, TorchCapture,
                      held_bytes, torch_to_jittor_tree)
from .check import ScoreCapture, decision_comparison
from .compare import Comparison, Tolerance, compare_arrays, iter_leaves
from .models import ModelPair, to_jittor, to_torch
from .ports import ModulePairing, pair_modules, record_calls
from .tolerances import tolerance

__all__ = ["ModuleRow", "ModuleReport", "run_module_check", "coarse_filter", "compare_outputs",
           "module_name_rows", "ISOLATED_KINDS", "ACCUMULATED_KINDS"]

ISOLATED_KINDS = ("module", "buffer", "decision", "calls")
ACCUMULATED_KINDS = ("module.accumulated", "buffer.accumulated")


@dataclass
class ModuleRow:
    """One comparison of one module call.

    Attributes:
        module: Call key (``name``, or ``name#k`` for the k-th later call of a shared module).
        mode: ``'isolated'``, ``'accumulated'`` or ``'structure'``.
        kind: Tolerance kind: ``module``, ``buffer``, ``decision``, ``calls``, ``names``,
            ``module.accumulated`` or ``buffer.accumulated``.
        comparison: The metrics; its ``path`` is ``module -> leaf`` (``decoder -> pred_logits``).
        start: Position of the torch call by start (execution order); -1 for names.
        end: Position of the torch call by return; -1 for names.
    """

    module: str
    mode: str
    kind: str
    comparison: Comparison
    start: int
    end: int

    @property
    def passed(self) -> bool:
        """Whether the comparison passed."""
        return self.comparison.passed

    def message(self) -> str:
        """``<path> <mode> [<kind>]: <reason>``, e.g. ``x.conv isolated [module]: rel L2 ...``."""
        c = self.comparison
        return f"{c.path} {self.mode} [{self.kind}]: {c.reason or 'ok'}"

    def as_dict(self) -> dict:
        """A flat dict for tables, CSV and JSON."""
        c = self.comparison
        return {"module": self.module, "mode": self.mode, "kind": self.kind, "path": c.path,
                "max_abs": c.max_abs, "rel_l2": c.rel_l2, "cosine": c.cosine,
                "passed": c.passed, "reason": c.reason, "shape": "x".join(map(str, c.shape_ref)),
                "order": self.start}


@dataclass
class ModuleReport:
    """Everything one :func:`run_module_check` measured.

    Attributes:
        variant: Variant name.
        mode: ``'eval'`` or ``'train'``.
        input_shape: Shape of the images.
        isolation: ``'own'`` or ``'subtree'`` (see :func:`run_module_check`).
        rows: Every comparison, in execution order (structure rows first).
        calls: Call keys of the recorded torch forward, in execution order.
        notes: What the reader should know (skipped leaves, forced decisions, internals).
        seconds: Wall time of each phase.
        memory_mb: Held activations of each capture and the process's peak RSS.
        pairing: How another port's modules were paired with the reference's (None for
            jittor_impl, whose names are the reference's).
    """

    variant: str
    mode: str
    input_shape: tuple
    isolation: str = "own"
    rows: list[ModuleRow] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    memory_mb: dict[str, float] = field(default_factory=dict)
    pairing: ModulePairing | None = None

    @property
    def passed(self) -> bool:
        """Whether every row passed."""
        return all(r.passed for r in self.rows)

    def failures(self, mode: str | None = None) -> list[ModuleRow]:
        """Failing rows, optionally of one mode only."""
        return [r for r in self.rows if not r.passed and (mode is None or r.mode == mode)]

    @property
    def first_failure(self) -> ModuleRow | None:
        """The failing structure or isolated row of the call that returned first, or None.

        Structure (names) failures come first; then, among calls whose isolated comparison
        (outputs, buffers, decision, call count) fails, the one that returned first: the
        innermost failing module, not the modules that merely contain it.
        """
        failing = [r for r in self.rows if not r.passed and r.mode in ("structure", "isolated")]
        if not failing:
            return None
        return min(failing, key=lambda r: (r.mode != "structure", r.end))

    def worst(self, mode: str, kind: str = "module") -> ModuleRow | None:
        """The row of a mode and kind with the largest relative L2 error (NaN rows first)."""
        rows = [r for r in self.rows if r.mode == mode and r.kind == kind]
        if not rows:
            return None
        return max(rows, key=lambda r: math.inf if math.isnan(r.comparison.rel_l2)
                   else r.comparison.rel_l2)

    def as_dicts(self) -> list[dict]:
        """Every row as a flat dict (see :meth:`ModuleRow.as_dict`); for another port also its
        module's own name (``port_module``) and how it was paired (``paired_by``)."""
        rows = [r.as_dict() for r in self.rows]
        if self.pairing is not None:
            for row in rows:
                name = row["module"].split("#")[0]
                row["port_module"] = self.pairing.port_names.get(name)
                row["paired_by"] = self.pairing.how.get(name)
        return rows

    def format_table(self, only_failures: bool = False, limit: int | None = None) -> str:
        """A console table (pandas): module -> leaf in full, mode, kind, max abs, rel L2,
        cosine, status; at most ``limit`` rows, then how many more there are."""
        import pandas as pd

        from .tables import text_table

        rows = self.failures() if only_failures else self.rows
        frame = pd.DataFrame(
            [{"module -> leaf": r.comparison.path, "mode": r.mode, "kind": r.kind,
              "max abs": r.comparison.max_abs, "rel L2": r.comparison.rel_l2,
              "cosine": r.comparison.cosine,
              "status": "ok" if r.passed else f"FAIL: {r.comparison.reason}"}
             for r in rows[:limit]],
            columns=["module -> leaf", "mode", "kind", "max abs", "rel L2", "cosine", "status"])
        text = text_table(frame, {"max abs": ".2g", "rel L2": ".2g", "cosine": ".8f"})
        if limit is not None and len(rows) > limit:
            text += f"\n... {len(rows) - limit} more rows"
        return text

    def summary(self) -> str:
        """One paragraph: counts, worst errors, first failure, time and memory."""
        iso, acc = self.worst("isolated"), self.worst("accumulated", "module.accumulated")
        first = self.first_failure
        parts = [f"{self.variant} {self.mode} {'x'.join(map(str, self.input_shape))}: "
                 f"{len(self.calls)} calls, {len(self.rows)} rows, "
                 f"{len(self.failures())} failed"]
        if iso is not None:
            parts.append(f"worst isolated rel L2 {iso.comparison.rel_l2:.3g} "
                         f"({iso.comparison.path})")
        if acc is not None:
            parts.append(f"worst accumulated rel L2 {acc.comparison.rel_l2:.3g} "
                         f"({acc.comparison.path})")
        parts.append(f"first failure: {first.message() if first else 'none'}")
        parts.append("seconds " + ", ".join(f"{k} {v:.1f}" for k, v in self.seconds.items()))
        parts.append("memory MiB " + ", ".join(f"{k} {v:.0f}" for k, v in self.memory_mb.items()))
        return "; ".join(parts)


def _owns_state(module: torch.nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or any(
        True for _ in module.buffers(recurse=False))


def coarse_filter(torch_model: torch.nn.Module) -> ModuleFilter:
    """A coarser granularity: modules that own state or call others, and the decoder heads.

    Selected: every module that owns parameters or buffers, every module with children (so
    each block, layer and the whole model is isolated too) and everything inside the decoder's
    MLP heads. Left out: the parameter-free activations, dropouts and identities of the
    backbone, encoder and decoder layers; they run inside their parent's isolated call, so a
    fault there is named at the parent. Measured (r18vd, 256, eval): 332 of 437 calls and
    about the same time as every module, since comparing large activations, not running the
    isolated calls, is what costs; hence the default is every module.

    Args:
        torch_model: The reference model (names are shared with the port).
    """
    keep = set()
    for name, module in torch_model.named_modules():
        has_children = any(True for _ in module.children())
        in_head = any(name.startswith(p) for p in (
            "decoder.query_pos_head", "decoder.enc_bbox_head", "decoder.dec_bbox_head"))
        if _owns_state(module) or has_children or in_head:
            keep.add(name)
    return ModuleFilter(names=frozenset(keep))


def _selector(pair: ModelPair, modules: Any) -> Callable[[str, Any], bool]:
    """``modules`` of :func:`run_module_check` as a filter."""
    if modules is None or modules == "all":
        return ModuleFilter()
    if modules == "coarse":
        return coarse_filter(pair.torch_model)
    if callable(modules):
        return modules
    if isinstance(modules, str):
        raise ValueError(f"modules must be 'all', 'coarse', a filter or names, got {modules!r}")
    return ModuleFilter(names=frozenset(modules))


def _leaf_comparison(test: Any, ref: Any, kind: str, path: str,
                     mode: str = "eval") -> Comparison:
    """One leaf: arrays by the tolerance table (integers exactly), anything else by equality.

    The table is searched with ``<mode>:<path>`` (``train:decoder.decoder.layers.2``).
    """
    numeric = [isinstance(v, (np.ndarray, np.generic, int, float)) for v in (test, ref)]
    if not all(numeric):
        c = Comparison(path, (), (), type(ref).__name__, type(test).__name__)
        c.passed = not any(numeric) and type(test) is type(ref) and bool(test == ref)
        c.max_abs = c.rel_l2 = 0.0 if c.passed else math.inf
        c.cosine = 1.0 if c.passed else math.nan
        c.reason = "" if c.passed else f"value {test!r} != reference {ref!r}"
        return c
    ref_arr, test_arr = np.asarray(ref), np.asarray(test)
    if test_arr.shape == (1,) and ref_arr.ndim == 0:
        test_arr = test_arr.reshape(())  # Jittor has no 0-dim Vars
    if (test_arr.shape == ref_arr.shape and test_arr.dtype == ref_arr.dtype
            and np.array_equal(test_arr, ref_arr) and (ref_arr.dtype.kind in "biu"
                                                       or np.isfinite(ref_arr).all())):
        # Bit-identical and finite (children handed the very array torch handed them, shared
        # outputs): the metrics compare_arrays would compute, without its float64 passes.
        shape = tuple(ref_arr.shape)
        return Comparison(path, shape, shape, str(ref_arr.dtype), str(test_arr.dtype),
                          max_abs=0.0, max_rel=0.0, rel_l2=0.0, cosine=1.0, within=1.0,
                          passed=True)
    exact = ref_arr.dtype.kind in "biu"
    tol = Tolerance(atol=0.0) if exact else tolerance(kind, f"{mode}:{path}")
    return compare_arrays(test_arr, ref_arr, tol, path)


def _identity(leaf: Any) -> tuple | None:
    """What makes two held leaves the same array (a torch view, a Jittor Var), or None."""
    tensor = getattr(leaf, "tensor", None)
    if isinstance(tensor, torch.Tensor):
        return ("torch", tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), str(tensor.dtype))
    if isinstance(leaf, jt.Var):
        return ("jittor", id(leaf))
    return None


def compare_outputs(test: Any, ref: Any, kind: str, key: str, sep: str = " -> ",
                    cache: dict | None = None,
                    mode: str = "eval") -> tuple[list[Comparison], list[str]]:
    """Compares two nested values leaf by leaf under a tolerance kind.

    Args:
        test: Jittor side: numpy or held leaves (:data:`~parity.capture.NOT_RECORDED`
            leaves are skipped).
        ref: Torch side: numpy or held leaves.
        kind: Tolerance kind for float leaves.
        key: Prefix of every path (the call key).
        sep: Between ``key`` and the leaf path.
        cache: Metrics of held leaf pairs already compared, by identity: the output of a
            ConvNormLayer is its activation's output, compared once.
        mode: ``'eval'`` or ``'train'``, for the tolerance lookup.

    Returns:
        ``(comparisons, skipped paths)``; a single tensor's path is ``key`` itself.
    """
    left, right = dict(iter_leaves(test)), dict(iter_leaves(ref))
    out, skipped = [], []
    for leaf in list(right) + [p for p in left if p not in right]:
        path = f"{key}{sep}{leaf}" if leaf else key
        if left.get(leaf) is NOT_RECORDED:
            skipped.append(path)
            continue
        if leaf not in left or leaf not in right:
            side = "Jittor" if leaf not in left else "torch"
            out.append(Comparison(path, (), (), "", "", reason=f"missing on the {side} side"))
            continue
        ids = (_identity(left[leaf]), _identity(right[leaf]))
        if cache is not None and None not in ids and ids in cache:
            out.append(dataclasses.replace(cache[ids], path=path))
            continue
        c = _leaf_comparison(to_numpy(left[leaf]), to_numpy(right[leaf]), kind, path,
                             mode)
        if cache is not None and None not in ids:
            cache[ids] = c
        out.append(c)
    return out, skipped


def _contains(outer: str, inner: str) -> bool:
    """Whether module ``inner`` is ``outer`` or one of its descendants."""
    return outer == "" or inner == outer or inner.startswith(outer + ".")


def _as_var(arr: np.ndarray, like: jt.Var) -> jt.Var:
    """A numpy array as a Var of ``like``'s shape and dtype (torch 0-dim counters -> [1])."""
    arr = np.asarray(arr)
    var = jt.array(arr.reshape(like.shape))  # torch [] -> Jittor [1]; other shapes unchanged
    return var.int64() if arr.dtype == np.int64 else var.cast(like.dtype)


# The buffers of another port's modules that do not list theirs (``_buffer_names``): Jittor's
# BatchNorm statistics.
_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def _buffer_names(module: Any) -> tuple[str, ...]:
    listed = getattr(module, "_buffer_names", None)
    if listed is not None:
        return tuple(listed)
    return tuple(a for a in _STATISTICS if isinstance(vars(module).get(a), jt.Var))


class _JittorBuffers:
    """The Jittor model's buffers by ``(module name, attribute)``, to snapshot and restore."""

    def __init__(self, named: list[tuple[str, Any]]) -> None:
        self.modules = dict(named)
        self.owners = {n: _buffer_names(m) for n, m in self.modules.items() if _buffer_names(m)}

    def snapshot(self) -> dict[tuple[str, str], np.ndarray]:
        """Numpy copies of every buffer."""
        return {(n, a): getattr(self.modules[n], a).numpy().copy()
                for n, attrs in self.owners.items() for a in attrs}

    def own(self, name: str) -> dict[str, np.ndarray]:
        """Numpy copies of one module's own buffers."""
        return {a: getattr(self.modules[name], a).numpy().copy() for a in self.owners.get(name, ())}

    def load(self, values: dict[tuple[str, str], np.ndarray], within: str | None = None) -> None:
        """Writes buffers back (only those of ``within`` and its descendants, if given)."""
        for (n, a), v in values.items():
            if within is None or _contains(within, n):
                var = getattr(self.modules[n], a)
                var.update(_as_var(v, var))

    def load_own(self, name: str, values: dict[str, np.ndarray]) -> None:
        """Writes one module's own buffers from torch values of the same names.

        Raises:
            KeyError: If the Jittor module does not list a buffer the torch one has.
        """
        for a, v in values.items():
            if a not in self.owners.get(name, ()):
                raise KeyError(f"Jittor module {name!r} has no buffer {a!r} (torch has)")
            var = getattr(self.modules[name], a)
            var.update(_as_var(v, var))


def module_name_rows(pair: ModelPair, pairing: ModulePairing | None = None
                     ) -> tuple[list[ModuleRow], set[str]]:
    """Compares the module names of the two models.

    Every name on one side only gets a failing ``names`` row. For another port, ``pairing``
    gives its modules the reference's names; a reference module holding weights that no port
    module holds fails, modules without weights that pair with nothing are reported in notes.

    Returns:
        ``(rows, names)``: the rows, and the Jittor names whose calls have no torch
        counterpart by design (the children of torch's ``nn.MultiheadAttention``, which
        torch uses functionally and the port calls).
    """
    torch_mods = dict(pair.torch_model.named_modules())
    internal = {f"{name}.{child}" for name, module in torch_mods.items()
                if isinstance(module, torch.nn.MultiheadAttention)
                for child, _ in module.named_children()}  # used functionally by torch
    if pairing is not None:
        rows = [ModuleRow(name, "structure", "names", Comparison(
                    name, (), (), "", "", reason="holds weights; no port module pairs with it"),
                    -1, -1)
                for name in pairing.unpaired_reference
                if any(True for _ in torch_mods[name].parameters(recurse=False))]
        rows += [ModuleRow(name, "structure", "names", Comparison(
                     name, (), (), "", "", reason=f"{count} of its tensors were not loaded into "
                                                  "the port; not compared"), -1, -1)
                 for name, count in pairing.not_loaded.items()]
        return rows, internal
    jittor_names = [n for n, _ in jittor_named_modules(pair.jittor_model)]
    rows = [ModuleRow(name, "structure", "names",
                      Comparison(name, (), (), "", "", reason="module only in Jittor"), -1, -1)
            for name in jittor_names if name not in torch_mods]
    jittor_set = set(jittor_names)
    rows += [ModuleRow(name, "structure", "names",
                       Comparison(name, (), (), "", "", reason="module only in torch"), -1, -1)
             for name in torch_mods if name not in jittor_set]
    return rows, internal


def _topk_owner(named: Iterable[tuple[str, Any]]) -> str | None:
    """Name of the module making the top-k query selection (has ``forced_topk_ind``), or None."""
    return next((n for n, m in named if hasattr(type(m), "forced_topk_ind")), None)


def _without_defaults(call: dict) -> dict:
    """Call arguments without trailing ``None`` positionals and ``None`` keywords: another
    port may leave out what the reference passes as its default."""
    args = list(call["args"])
    while args and args[-1] is None:
        args.pop()
    return {"args": args, "kwargs": {k: v for k, v in call["kwargs"].items() if v is not None}}


def _official(ctx: "_Context", name: str, output: Any) -> Any:
    """The whole model's output in the official convention (another port's declared options)."""
    if name or not ctx.pair.external:
        return output
    return ctx.pair.port_parts.options.outputs(output)


def _rng_state(model: Any) -> dict | None:
    rng = getattr(model, "rng", None)
    return None if rng is None else rng.state_dict()


def _load_rng(model: Any, state: dict | None) -> None:
    if state is not None and getattr(model, "rng", None) is not None:
        model.rng.load_state_dict(state)


def port_pairing(pair: ModelPair, images: np.ndarray) -> ModulePairing:
    """Another port's modules under the reference's names (:func:`parity.ports.pair_modules`),
    with one eval forward of each model recording call order and output shapes."""
    was_training = pair.torch_model.training
    pair.eval()
    try:
        with torch.no_grad():
            ref_calls = record_calls(pair.torch_model,
                                     lambda: pair.torch_model(torch.from_numpy(images)), "torch")
        with jt.no_grad():
            port_calls = record_calls(pair.jittor_model,
                                      lambda: jt.sync_all() or pair.jittor_model(jt.array(images)),
                                      "jittor")
    finally:
        if was_training:
            pair.train()
    findings = pair.findings
    structure = {**(findings.suggested if findings is not None else {}), **pair.port.key_map}
    port_keys = set(pair.jittor_model.state_dict())
    present = [k for k in pair.torch_model.state_dict() if structure.get(k, k) in port_keys]
    return pair_modules(pair.torch_model, pair.jittor_model, structure,
                        findings.loaded if findings is not None else [], (ref_calls, port_calls),
                        present)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass
class _Context:
    """What the per-call comparisons share."""

    pair: ModelPair
    mode: str
    isolation: str
    jit_modules: dict[str, Any]
    jit_names: dict[int, str]
    jbuf: _JittorBuffers
    jit_after: dict[tuple[str, str], np.ndarray]
    topk_name: str | None
    forced: np.ndarray | None
    enc_scores: np.ndarray | None
    notes: list[str]


def run_module_check(pair: ModelPair, *, mode: str = "eval", images: np.ndarray,
                     targets: list[dict] | None = None, modules: Any = None,
                     isolation: str = "own",
                     on_step: Callable[[int, int], None] | None = None) -> ModuleReport:
    """Compares every selected module of the pair, accumulated and isolated.

    Args:
        pair: The model pair (identical weights).
        mode: ``'eval'`` or ``'train'``.
        images: ``[bs, 3, h, w]`` float32 images.
        targets: Per-image dicts of numpy ``labels`` (int64 ``[n]``) and ``boxes`` (float32
            normalised cxcywh ``[n, 4]``); in training they drive the denoising queries (None:
            no denoising).
        modules: ``None``/``'all'`` (every module), ``'coarse'`` (:func:`coarse_filter`), a
            filter ``(name, module) -> bool`` (e.g. :class:`~parity.capture.ModuleFilter`
            with names, prefixes or a maximum depth) or an iterable of module names.
        isolation: ``'own'``: an isolated call's recorded children return the torch
            children's outputs and the inputs it hands them are compared, so each row holds
            the module's own error only. ``'subtree'``: the children run for real, so a
            container's isolated error includes its children's.
        on_step: Called as ``on_step(done, total)`` after each recorded call is compared.

    Returns:
        The report; both models are left as they were found.

    Raises:
        ValueError: On an unknown mode or isolation, images that are not ``[bs, 3, h, w]``
            float32, or a ``modules`` value of the wrong type.
    """
    if mode not in ("eval", "train"):
        raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
    if isolation not in ("own", "subtree"):
        raise ValueError(f"isolation must be 'own' or 'subtree', got {isolation!r}")
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] != 3 or images.dtype != np.float32:
        raise ValueError(f"images must be float32 [bs, 3, h, w], got {images.dtype} "
                         f"{list(images.shape)}")
    select = _selector(pair, modules)
    report = ModuleReport(pair.cfg.name, mode, tuple(images.shape), isolation)
    tm, jm = pair.torch_model, pair.jittor_model
    if mode == "train" and not hasattr(jm, "rng"):
        raise ValueError("train-mode module comparison needs the port's shared random stream "
                         "(model.rng), to draw the reference's denoising noise")
    pairing = port_pairing(pair, images) if pair.external else None
    structure, internal = module_name_rows(pair, pairing)
    report.rows.extend(structure)
    if pairing is not None:
        report.pairing = pairing
        report.notes.append(pairing.describe())

    if mode == "eval":
        pair.eval()
    else:
        pair.train()
    jit_named = pairing.named if pairing is not None else jittor_named_modules(jm)
    jit_modules = dict(jit_named)
    topk_name = _topk_owner(jit_named)
    jbuf = _JittorBuffers(jit_named)
    torch_state0 = {k: v.detach().clone() for k, v in tm.named_buffers()}
    jit_state0 = jbuf.snapshot()
    torch_rng0, jit_rng0 = tm.rng.state_dict(), _rng_state(jm)
    try:
        timer = time.perf_counter()
        scores = ScoreCapture(tm) if topk_name is not None else None
        try:
            with TorchCapture(tm, select) as tcap, torch.no_grad():
                args = (torch.from_numpy(images),)
                if targets is not None:
                    args += (to_torch(targets),)
                tm(*args)
        finally:
            if scores is not None:
                scores.close()
        forced = None
        if topk_name is not None:
            forced = dict(tm.named_modules())[topk_name].last_topk_ind.numpy().copy()
        report.seconds["torch_forward"] = time.perf_counter() - timer

        # Jittor end to end: the same noise stream, the reference top-k forced in.
        timer = time.perf_counter()
        _load_rng(jm, torch_rng0)
        if forced is not None:
            jit_modules[topk_name].forced_topk_ind = jt.array(forced).int64()
        try:
            with JittorCapture(jm, select, inputs=False, named=jit_named) as jcap, jt.no_grad():
                args = (jt.array(images),)
                if targets is not None:
                    args += (to_jittor(targets),)
                jm(*args)
                jt.sync_all()
        finally:
            if forced is not None:
                jit_modules[topk_name].forced_topk_ind = None
        report.seconds["jittor_forward"] = time.perf_counter() - timer
        report.memory_mb["held_torch"] = held_bytes(tcap.calls) / 2**20
        report.memory_mb["held_jittor"] = held_bytes(jcap.calls) / 2**20
        report.calls = [c.key for c in tcap.calls]

        timer = time.perf_counter()
        ctx = _Context(pair, mode, isolation, jit_modules, {id(m): n for n, m in jit_named},
                       jbuf, jbuf.snapshot(), topk_name, forced,
                       None if scores is None else scores.scores, report.notes)
        _compare_calls(report, tcap.calls, jcap.by_key(), internal, ctx, on_step)
        report.seconds["compare_and_isolated"] = time.perf_counter() - timer
    finally:
        with torch.no_grad():
            named = dict(tm.named_buffers())
            for k, v in torch_state0.items():
                named[k].copy_(v)
        jbuf.load(jit_state0)
        tm.rng.load_state_dict(torch_rng0)
        _load_rng(jm, jit_rng0)
        if topk_name is not None:
            jit_modules[topk_name].forced_topk_ind = None
    report.memory_mb["peak_rss"] = _peak_rss_mb()
    report.rows.sort(key=lambda r: (r.mode != "structure", r.start))
    return report


def _compare_calls(report: ModuleReport, tcalls: list[Call], jcalls: dict[str, Call],
                   internal: set[str], ctx: _Context,
                   on_step: Callable[[int, int], None] | None = None) -> None:
    """Accumulated, isolated, buffer and call-count rows for every recorded torch call.

    Calls are compared in execution order, so a call's enclosing call (which needs its
    inputs and output) comes first; its held arrays are released once it is done, so memory
    falls as the comparison proceeds.
    """
    kids: dict[int, list[Call]] = {}
    for call in tcalls:
        kids.setdefault(call.parent, []).append(call)
    seen, cache = set(), {}
    for done, call in enumerate(tcalls):
        if on_step is not None:
            on_step(done, len(tcalls))
        key = call.key
        seen.add(key)

        def add(kind: str, row_mode: str, comparisons: list[Comparison]) -> None:
            report.rows.extend(ModuleRow(key, row_mode, kind, c, call.start, call.end)
                               for c in comparisons)

        if ctx.pair.external and (call.name not in ctx.jit_modules
                                  or call.name in report.pairing.not_loaded):
            call.release()  # paired with no port module, or not loaded: structure rows
            continue
        if call.name not in ctx.jit_modules:
            add("calls", "isolated", [Comparison(key, (), (), "", "",
                                                 reason="no Jittor module of this name")])
            call.release()
            continue
        ref = to_numpy(call.output)
        jcall = jcalls.get(key)
        if jcall is None:
            add("calls", "isolated", [Comparison(key, (), (), "", "",
                                                 reason="called by torch, not by Jittor")])
        else:
            rows, skipped = compare_outputs(_official(ctx, call.name, jcall.output), call.output,
                                            "module.accumulated",
                                            key, cache=cache, mode=ctx.mode)
            add("module.accumulated", "accumulated", rows)
            report.notes.extend(f"{p}: not recorded on the Jittor side (discarded by the "
                                "forward; compared in isolation only)" for p in skipped)
            jcall.release()
        if ctx.mode == "train" and call.buffers_after and call.index == 0:
            add("buffer.accumulated", "accumulated",
                [_leaf_comparison(ctx.jit_after.get((call.name, a)), v, "buffer.accumulated",
                                  f"{key} -> {a}", ctx.mode)
                 for a, v in call.buffers_after.items()])
        for kind, comparisons in _isolated(call, ref, kids.get(call.start, []), ctx).items():
            add(kind, "isolated", comparisons)
        call.release()
    if on_step is not None:
        on_step(len(tcalls), len(tcalls))
    for key, jcall in jcalls.items():
        if key not in seen and jcall.name not in internal:
            report.rows.append(ModuleRow(key, "isolated", "calls", Comparison(
                key, (), (), "", "", reason="called by Jittor, not by torch"), jcall.start,
                jcall.end))


class _ExtraCall(RuntimeError):
    """The Jittor module called a child more often than the torch module did."""


class _Stubs:
    """Answers the children of one isolated call with the torch children's recorded outputs.

    Each recorded torch call nested directly in the isolated one is answered, in order, by
    its Jittor module returning that call's torch output (converted); the arguments the Jittor
    parent passed are kept, to be compared with those torch passed. So the isolated module's
    own code, and only it, computes from torch data.
    """

    def __init__(self, kids: list[Call], jit_modules: dict[str, Any]) -> None:
        self.jit_modules = jit_modules
        self.queues: dict[str, list[Call]] = {}
        for kid in kids:
            if kid.name in jit_modules:  # another port's unpaired module computes for real
                self.queues.setdefault(kid.name, []).append(kid)
        self.seen: list[tuple[Call, tuple, dict]] = []

    def _stub(self, name: str) -> Callable:
        def execute(*args: Any, **kwargs: Any) -> Any:
            if not self.queues[name]:
                raise _ExtraCall(name)
            kid = self.queues[name].pop(0)
            self.seen.append((kid, args, kwargs))
            return torch_to_jittor_tree(kid.output, self.jit_modules)
        return execute

    def __enter__(self) -> "_Stubs":
        self._saved = {}
        for name in self.queues:
            own = vars(self.jit_modules[name])
            if "execute" in own:
                self._saved[name] = own["execute"]
            own["execute"] = self._stub(name)
        return self

    def __exit__(self, *exc: Any) -> None:
        for name in self.queues:
            own = vars(self.jit_modules[name])
            own.pop("execute", None)
            if name in self._saved:
                own["execute"] = self._saved[name]

    def missing(self) -> list[Call]:
        """Torch child calls the Jittor module did not make."""
        return [kid for queue in self.queues.values() for kid in queue]


def _jittor_refs(tree: Any, names: dict[int, str]) -> Any:
    """Jittor call arguments as comparable values: modules as :class:`ModuleRef`, Vars as numpy."""
    if isinstance(tree, jt.Module):
        return ModuleRef(names.get(id(tree), type(tree).__name__))
    if isinstance(tree, dict):
        return {k: _jittor_refs(v, names) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_jittor_refs(v, names) for v in tree)
    return to_numpy(tree)


def _isolated(call: Call, ref: Any, kids: list[Call], ctx: _Context) -> dict[str, list[Comparison]]:
    """Runs one Jittor module on the torch call's inputs and compares what it computed.

    Args:
        call: The torch call.
        ref: Its output as numpy.
        kids: The recorded torch calls nested directly in it.
        ctx: Shared state.

    Returns:
        Comparisons by kind: ``module`` (outputs and, with ``'own'`` isolation, the inputs
        handed to children), ``buffer`` (own buffers after the call, training mode),
        ``decision`` (the top-k selection, for the module that makes it) and ``calls``
        (children called another number of times than in torch).
    """
    jm = ctx.pair.jittor_model
    module = ctx.jit_modules[call.name]
    owner = ctx.jit_modules[ctx.topk_name] if ctx.topk_name is not None else None
    # With children answered by torch only the owner's own call selects; else any ancestor.
    holds_topk = owner is not None and (call.name == ctx.topk_name or (
        ctx.isolation == "subtree" and _contains(call.name, ctx.topk_name)))
    train = ctx.mode == "train"
    rng_before = _rng_state(jm)
    result: dict[str, list[Comparison]] = {}

    def run(force: bool) -> tuple[Any, _Stubs]:
        if call.rng_state is not None:
            _load_rng(jm, call.rng_state)
        if train:
            ctx.jbuf.load(ctx.jit_after, within=call.name)
            ctx.jbuf.load_own(call.name, call.buffers_before)
        if holds_topk:
            owner.forced_topk_ind = jt.array(ctx.forced).int64() if force else None
        stubs = _Stubs(kids if ctx.isolation == "own" else [], ctx.jit_modules)
        try:
            with jt.no_grad(), stubs:
                args = torch_to_jittor_tree(call.args, ctx.jit_modules)
                kwargs = torch_to_jittor_tree(call.kwargs, ctx.jit_modules)
                return to_numpy(_official(ctx, call.name, module(*args, **kwargs))), stubs
        finally:
            if holds_topk:
                owner.forced_topk_ind = None

    try:
        out, stubs = run(force=holds_topk and call.name != ctx.topk_name)
        if holds_topk and call.name == ctx.topk_name:
            test_ind = owner.last_topk_ind.numpy()
            decision = decision_comparison(f"{ctx.mode}.{ctx.topk_name}.topk_ind", test_ind,
                                           ctx.forced, ctx.enc_scores)
            decision.path = f"{call.key} -> topk_ind"
            result["decision"] = [decision]
            if not np.array_equal(test_ind, ctx.forced):
                ctx.notes.append(f"{call.key}: isolated top-k differs ({decision.reason}); "
                                 "outputs compared with the reference decision forced in")
                out, stubs = run(force=True)
        result["module"], _ = compare_outputs(out, ref, "module", call.key, mode=ctx.mode)
        for kid, args, kwargs in stubs.seen:
            test, ref_args = (_jittor_refs({"args": args, "kwargs": kwargs}, ctx.jit_names),
                              to_numpy({"args": kid.args, "kwargs": kid.kwargs}))
            if ctx.pair.external:
                test, ref_args = _without_defaults(test), _without_defaults(ref_args)
            rows, _ = compare_outputs(
                test, ref_args, "module",
                f"{call.key} -> input of {kid.key}", sep=": ", mode=ctx.mode)
            result["module"] += rows
        result["calls"] = [Comparison(f"{call.key} -> {kid.key}", (), (), "", "",
                                      reason="called by torch inside this call, not by Jittor")
                           for kid in stubs.missing()]
        if train and call.buffers_after:
            own = ctx.jbuf.own(call.name)
            result["buffer"] = [_leaf_comparison(own[a], v, "buffer", f"{call.key} -> {a}",
                                                 ctx.mode) for a, v in call.buffers_after.items()]
    except Exception as exc:
        if isinstance(exc, _ExtraCall):
            result["calls"] = [Comparison(f"{call.key} -> {exc.args[0]}", (), (), "", "",
                                          reason="called by Jittor inside this call more often "
                                                 "than by torch")]
        elif ctx.pair.external:
            ctx.notes.append(f"{call.key}: not compared in isolation: the port's module does "
                             f"not take the reference's inputs ({type(exc).__name__}: {exc}); "
                             "its accumulated comparison stands")
        else:
            raise
    finally:
        if train:
            ctx.jbuf.load(ctx.jit_after, within=call.name)
        _load_rng(jm, rng_before)
    return result
