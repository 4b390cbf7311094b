"""Where the noise allowances come from: the reference measured against itself.

A port is a second fp32 implementation of the reference, so a training row may let the port's
error exceed the reference's own fp32 error (its gap to the float64 replay, the *floor*) by a
factor. The factor is measured: the reference is replayed in fp32 under *controls*, changes
that must not matter (one thread instead of two; oneDNN's convolutions off, so other summation
orders), every one of the reference's decisions forced into it. For every quantity a
row compares, the control's error against the reference divided by the floor is one sample of
what a correct second implementation needs; over seeds, inputs, sizes and controls the samples
of a kind form its distribution. One rule for every kind: the allowance factor is
:data:`MARGIN` times the :data:`QUANTILE` quantile of that distribution.

Kinds (what each factor judges in the checks):

- ``grad``: each parameter's gradient (relative L2), and the noise band of its AdamW update;
- ``zero``: a gradient zero in exact arithmetic, its norm against the reference's;
- ``loss``: each loss term (relative error);
- ``decision``: the tie band of each forced decision: per element where a control's side of
  a kink (ReLU gate, sampling cell, L1 sign) differs from the reference's, its distance to
  the kink in units of the reference's robust error there (the band that would force it);
- ``step``: AdamW moments, EMA values and changes, BatchNorm buffer changes after one step;
- ``trajectory``: each parameter's drift over the trajectory's steps;
- ``trajectory_loss``: the total loss along the trajectory.

``rtdetr-parity noise`` measures, derives and writes the record
(``parity/noise_derivation.json``) that :mod:`parity.tolerances` reads.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch_ref
from tqdm import tqdm

from .models import build_pair
from .replay import Float64Replay, numpy_params, snapshot, trainable
from .training import (_recorded_step, _rel_l2, _torch_optimizer_state, analytically_zero,
                       ema_updates, reference_pass, reference_step)
from .tolerances import NOISE_KINDS as KINDS
from .trajectory import training_batches

MARGIN = 2.0
QUANTILE = 0.999
# Changes that must not matter, as (name, threads, oneDNN on).
CONTROLS = (("one-thread", 1, True), ("no-onednn", 2, False))
TRAJECTORY_STEPS = 10


@contextlib.contextmanager
def control(threads: int, onednn: bool) -> Iterator[None]:
    """torch with ``threads`` threads and oneDNN on or off, restored afterwards."""
    before = torch.get_num_threads(), torch.backends.mkldnn.enabled
    torch.set_num_threads(threads)
    torch.backends.mkldnn.enabled = onednn
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        torch.backends.mkldnn.enabled = before[1]


def ratio(error: float, floor: float) -> float | None:
    """One sample: ``error / floor``; None when both are 0 (nothing measured), inf when
    only the floor is."""
    if floor > 0:
        return error / floor
    return None if error == 0 else math.inf


def _controls(pair) -> list[tuple[int, bool, Float64Replay]]:
    """An fp32 replay per control, copied from the reference's current state."""
    return [(threads, onednn, Float64Replay(pair, torch.float32)) for _, threads, onednn in CONTROLS]


def _bands(forcing) -> dict[str, float]:
    """Bands that force every kink of a recorded step: a control takes all of the reference's
    decisions, so its continuous quantities are measured on the same branches, and the
    elements where it would have decided otherwise measure the band a port needs."""
    return {path: math.inf for kink in forcing.kinks for path in kink.reference}


def _add(samples: dict[str, list[float]], kind: str, value: float | None) -> None:
    if value is not None:
        samples[kind].append(value)


def _pass_samples(pair, images, targets, samples: dict[str, list[float]]) -> None:
    """``grad``, ``zero``, ``loss`` and ``decision`` samples of one forward and backward."""
    controls = _controls(pair)
    ref = reference_pass(pair, images, targets, float64=True)
    zero = analytically_zero(ref.float64_grads)
    bands = _bands(ref.forcing)
    for threads, onednn, replay in controls:
        replay.bands = bands
        with control(threads, onednn):
            grads = replay.gradients(images, targets, ref.decisions)
        for name, g in ref.grads.items():
            if g is None or grads.get(name) is None:
                continue
            if name in zero:
                _add(samples, "zero", ratio(float(np.linalg.norm(grads[name])), float(np.linalg.norm(g))))
            else:
                _add(samples, "grad", ratio(_rel_l2(grads[name], g), _rel_l2(g, ref.float64_grads[name])))
        for term, value in ref.losses.items():
            exact = ref.float64_losses[term]
            _add(samples, "loss", ratio(abs(replay.losses[term] - value) / abs(value),
                                        abs(value - exact) / abs(exact)))
        for path, flips in replay.flips.items():
            for distance in np.concatenate(flips) if flips else ():
                _add(samples, "decision", ratio(float(distance), ref.tie_errors.get(path, 0.0)))


def _step_samples(pair, images, targets, samples: dict[str, list[float]]) -> None:
    """``step`` samples of one official step: moments, EMA values and changes, buffers."""
    controls = _controls(pair)
    ref = reference_step(pair, images, targets)
    counts = ema_updates(pair.cfg)
    bands = _bands(ref.forcing)
    for threads, onednn, replay in controls:
        replay.bands = bands
        with control(threads, onednn):
            replay.train_step(images, targets, ref.decisions, pair.cfg.schedule.clip_max_norm, counts)
        state = _torch_optimizer_state(replay.optimizer, trainable(replay.model))
        for name, moments in ref.state.items():
            if name in ref.zero or name not in state:
                continue
            for key in ("exp_avg", "exp_avg_sq"):
                _add(samples, "step", ratio(_rel_l2(state[name][key], moments[key]),
                                            _rel_l2(moments[key], ref.state64[name][key])))
        for updates, ema in zip(counts, replay.emas):
            after = snapshot(ema.module.state_dict())
            for key, value in after.items():
                if value.dtype.kind != "f" or key in ref.zero:
                    continue
                start = ref.ema_before[updates][key].astype(np.float64)
                reference = ref.ema_after[updates][key].astype(np.float64)
                _add(samples, "step", ratio(_rel_l2(value - start, reference - start),
                                            _rel_l2(reference - start, ref.ema_after64[updates][key] - start)))
        buffers = snapshot(replay.model.named_buffers())
        for key, before in ref.buffers_before.items():
            if before.dtype.kind != "f":
                continue
            change = ref.buffers_after[key] - before
            _add(samples, "step", ratio(_rel_l2(buffers[key] - before, change),
                                        _rel_l2(change, ref.buffers_after64[key] - before)))


def _trajectory_samples(pair, batches, steps: int, samples: dict[str, list[float]]) -> None:
    """``trajectory`` and ``trajectory_loss`` samples: the reference, its float64 replay and
    the controls trained side by side for ``steps`` steps, the reference's decisions of each
    step forced into the others."""
    pair.train()
    model = pair.torch_model
    named = trainable(model)
    optimizer = torch_ref.build_optimizer(model, pair.cfg)
    exact = Float64Replay(pair)
    controls = _controls(pair)
    clip = pair.cfg.schedule.clip_max_norm
    for i in range(steps):
        images, targets = batches[i % len(batches)]
        loss, forcing, _, rng_state = _recorded_step(pair, optimizer, images, targets)
        decisions = forcing.recorded(rng_state)
        loss64 = exact.train_step(images, targets, decisions, clip)["loss"]
        forcing.set_reference_error(exact.tie_errors)
        bands = _bands(forcing)
        weights, weights64 = numpy_params(named), exact.weights()
        for threads, onednn, replay in controls:
            replay.bands = bands
            with control(threads, onednn):
                loss_c = replay.train_step(images, targets, decisions, clip)["loss"]
            _add(samples, "trajectory_loss", ratio(abs(loss_c - loss) / abs(loss),
                                                   abs(loss - loss64) / abs(loss64)))
            mine = replay.weights()
            for name, w in weights.items():
                _add(samples, "trajectory", ratio(_rel_l2(mine[name], w), _rel_l2(w, weights64[name])))


def measure(variants: list[str], sizes: list[int | tuple[int, int]], seeds: list[int],
            steps: int = TRAJECTORY_STEPS, progress: bool = False) -> dict[str, list[float]]:
    """Per kind (:data:`KINDS`), the samples over ``variants`` x ``sizes`` x ``seeds`` x
    :data:`CONTROLS`.

    Each seed draws other weights and other batches; a size is an int (the checks'
    rectangles around it) or ``(h, w)``. Per seed and size: one forward and backward, one
    official step (from the state the pass left) and a ``steps``-step trajectory.
    """
    samples: dict[str, list[float]] = {kind: [] for kind in KINDS}
    cases = [(v, size, seed) for v in variants for size in sizes for seed in seeds]
    for variant, size, seed in tqdm(cases, desc="noise", disable=not progress):
        pair = build_pair(variant, size=None, seed=seed)
        batches = training_batches(pair.cfg.num_classes, size, seed=seed)
        images, targets = batches[0]
        _pass_samples(pair, images, targets, samples)
        _step_samples(pair, images, targets, samples)
        if steps:
            _trajectory_samples(pair, batches, steps, samples)
    return samples


def derive(samples: dict[str, list[float]], margin: float = MARGIN,
           quantile: float = QUANTILE) -> dict[str, dict[str, float]]:
    """Per kind: the distribution's quantiles and the factor ``margin * quantile(quantile)``.

    Raises:
        ValueError: For a kind without samples (its factor would be undefined).
    """
    out = {}
    for kind, values in samples.items():
        if not values:
            raise ValueError(f"noise kind {kind!r} has no samples: nothing to derive its factor from")
        v = np.asarray(values, np.float64)
        q = {f"p{p:g}": float(np.quantile(v, p / 100)) for p in (50, 90, 99, 99.9)}
        out[kind] = {"samples": int(v.size), **q, "max": float(v.max()),
                     "factor": float(margin * np.quantile(v, quantile))}
    return out


def write_derivation(path: Path, variants: list[str], sizes: list[int | tuple[int, int]], seeds: list[int],
                     command: str, steps: int = TRAJECTORY_STEPS) -> dict[str, Any]:
    """Measures, derives and writes the derivation record atomically; returns it."""
    record = {
        "rule": f"allowance factor = {MARGIN:g} x the {QUANTILE:g} quantile, per kind, of the "
                "ratio of a control's error against the fp32 reference (the reference replayed in "
                "fp32 under a change that must not matter, its decisions forced) to the "
                "reference's own fp32 error against its float64 replay",
        "margin": MARGIN, "quantile": QUANTILE,
        "controls": [{"name": n, "threads": t, "onednn": o} for n, t, o in CONTROLS],
        "variants": variants, "sizes": [s if isinstance(s, int) else list(s) for s in sizes],
        "seeds": seeds, "trajectory_steps": steps,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "numpy": np.__version__, "machine": platform.machine()},
        "command": command,
    }
    samples = measure(variants, sizes, seeds, steps, progress=True)
    record["kinds"] = derive(samples)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
    return record


def parse_size(text: str) -> int | tuple[int, int]:
    """``S`` or ``HxW``, multiples of 32."""
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"size {text!r}: expected S or HxW (for example 256 or 480x640)") from None
    if len(values) not in (1, 2) or any(v <= 0 or v % 32 for v in values):
        raise ValueError(f"size {text!r}: expected S or HxW, positive multiples of 32")
    return values[0] if len(values) == 1 else (values[0], values[1])


def cmd_noise(args: Any) -> int:
    """``rtdetr-parity noise``: measures the reference's noise and writes the derivation."""
    try:
        sizes = [parse_size(s) for s in args.sizes]
    except ValueError as e:
        raise SystemExit(f"rtdetr-parity noise: {e}") from None
    command = ("rtdetr-parity noise " + " ".join(sys.argv[2:])).strip()
    record = write_derivation(Path(args.out), args.variants, sizes, args.seeds, command, args.steps)
    import pandas as pd

    from .tables import text_table

    print(text_table(pd.DataFrame(
        [{"kind": kind, "samples": d["samples"], "median": d["p50"], "p99.9": d["p99.9"],
          "max": d["max"], "factor": d["factor"]} for kind, d in record["kinds"].items()],
        columns=["kind", "samples", "median", "p99.9", "max", "factor"]),
        {"samples": "d", "median": ".2f", "p99.9": ".2f", "max": ".2f", "factor": ".2f"}))
    print(f"wrote {args.out}")
    return 0
