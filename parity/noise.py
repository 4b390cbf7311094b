"""Where the noise allowances come from: the reference measured against itself.

A port is a second fp32 implementation of the reference, so the harness lets its error exceed
the reference's own fp32 error (its gap to the float64 replay, the *floor*) by a factor. That
factor is measured, not fitted: the reference is replayed in fp32 under *controls*, changes
that must not matter (one thread instead of two; oneDNN's convolutions off, so another
summation order), with the reference's decisions forced as they are into the port (ties
within the port's bands). For every
compared quantity the control's error against the reference, in units of the floor, is one
sample of the factor that implementation needs to pass a row (0 where the row's fixed entry
suffices); over seeds, inputs and controls these samples form the distribution of what a
correct second implementation needs. The rule (one for every kind): the allowance is
``MARGIN`` times the ``QUANTILE`` quantile of that distribution.

:func:`measure` takes the samples; ``rtdetr-parity noise`` writes them with the derived
factors to a JSON record.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .models import build_pair
from .replay import Float64Replay
from .tolerances import tolerance
from .training import _rel_l2, reference_pass
from .trajectory import training_batches

MARGIN = 2.0
QUANTILE = 0.999
# Changes that must not matter, as (name, threads, oneDNN on).
CONTROLS = (("one-thread", 1, True), ("no-onednn", 2, False))


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


def needed(error: float, floor: float, fixed: float) -> float:
    """The smallest factor ``k`` for which a row of this ``error`` passes
    ``error <= max(fixed, k * floor)``: 0 within the fixed entry, else ``error / floor``."""
    if error <= fixed:
        return 0.0
    return error / floor if floor > 0 else float("inf")


def measure(variant: str, sizes: list[tuple[int, int]], seeds: list[int]) -> dict[str, list[float]]:
    """Per kind, the factor each control row needs (:func:`needed`), over ``sizes`` x
    ``seeds`` x :data:`CONTROLS`.

    Kinds: ``grad`` (relative L2 of each parameter's gradient against the ``grad`` entry),
    ``loss`` (relative error of each loss term against the ``loss`` entry) and ``decision``
    (the robust error of each decision's inputs against its entry's ``atol``: the tie band).
    """
    samples: dict[str, list[float]] = {"grad": [], "loss": [], "decision": []}
    for seed in seeds:
        pair = build_pair(variant, size=None, seed=seed)
        for size in sizes:
            images, targets = training_batches(pair.cfg.num_classes, size)[seed % 2]
            ref = reference_pass(pair, images, targets, float64=True)
            for _, threads, onednn in CONTROLS:
                with control(threads, onednn):
                    bands = {path: kink.band(path) for kink in ref.forcing.kinks
                             for path in kink.reference}
                    replay = Float64Replay(pair, torch.float32, bands)
                    grads = replay.gradients(images, targets, ref.decisions)
                for name, g in ref.grads.items():
                    if g is None or ref.float64_grads.get(name) is None:
                        continue
                    samples["grad"].append(needed(
                        _rel_l2(grads[name], g), _rel_l2(g, ref.float64_grads[name]),
                        tolerance("grad", f"grad.{name}").max_rel_l2))
                for term, value in ref.losses.items():
                    exact = ref.float64_losses[term]
                    samples["loss"].append(needed(
                        abs(replay.losses[term] - value) / abs(value),
                        abs(value - exact) / abs(exact), tolerance("loss", term).rtol))
                for path, error in replay.tie_errors.items():
                    samples["decision"].append(needed(
                        error, ref.tie_errors.get(path, 0.0), tolerance("decision", path).atol))
    return samples


def derive(samples: dict[str, list[float]], margin: float = MARGIN,
           quantile: float = QUANTILE) -> dict[str, dict[str, float]]:
    """Per kind: the distribution's quantiles and the factor ``margin * quantile(quantile)``."""
    out = {}
    for kind, values in samples.items():
        v = np.asarray(values, np.float64)
        q = {f"p{p:g}": float(np.quantile(v, p / 100)) for p in (50, 90, 99, 99.9)}
        out[kind] = {"samples": int(v.size), "beyond_fixed": int(np.sum(v > 0)), **q,
                     "max": float(v.max()),
                     "factor": float(margin * np.quantile(v, quantile))}
    return out


def write_derivation(path: Path, variant: str, sizes: list[tuple[int, int]], seeds: list[int],
                     command: str) -> dict[str, Any]:
    """Measures, derives and writes the derivation record atomically; returns it."""
    record = {
        "rule": f"allowance factor = {MARGIN:g} x the {QUANTILE:g} quantile, per kind, of the "
                "factor a control (the reference replayed in fp32 under a change that must not "
                "matter, decisions forced) needs to pass: 0 within the fixed entry, else its "
                "error / the reference's own fp32 error against float64",
        "margin": MARGIN, "quantile": QUANTILE,
        "controls": [{"name": n, "threads": t, "onednn": o} for n, t, o in CONTROLS],
        "variant": variant, "sizes": [list(s) for s in sizes], "seeds": seeds,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "numpy": np.__version__, "machine": platform.machine()},
        "command": command,
    }
    samples = measure(variant, sizes, seeds)
    record["kinds"] = derive(samples)
    record["samples"] = {kind: [round(v, 4) for v in values] for kind, values in samples.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
    return record


def cmd_noise(args: Any) -> int:
    """``rtdetr-parity noise``: measures the reference's noise and writes the derivation."""
    sizes = [tuple(args.sizes[i:i + 2]) for i in range(0, len(args.sizes), 2)]
    command = "rtdetr-parity noise " + " ".join(sys.argv[2:])
    record = write_derivation(Path(args.out), args.variant, sizes, args.seeds, command.strip())
    for kind, d in record["kinds"].items():
        print(f"{kind:<9} {d['samples']:>5} samples: median {d['p50']:.2f}, p99.9 {d['p99.9']:.2f}, "
              f"max {d['max']:.2f} -> factor {d['factor']:.2f}")
    print(f"wrote {args.out}")
    return 0
