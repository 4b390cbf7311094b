"""Bit-level fingerprint of the port's CPU kernels: outputs and gradients on fixed inputs.

usage:
    python scripts/kernel_fingerprint.py --out FILE.npz           # run the kernels, save arrays
    python scripts/kernel_fingerprint.py --compare A.npz B.npz    # exit 1 unless bit-identical

Runs the public kernels of whichever ``jittor_impl._kernels`` comes first on the path (set
PYTHONPATH to a tree to fingerprint that tree), on seeded float32 inputs of several shapes, on
the CPU. A case's gradients are ``jt.grad`` of a fixed seeded weighted sum of its outputs.
Compare two files made with the same thread count (``OMP_NUM_THREADS``) and kernel flags.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Dict, List, Tuple

import numpy as np

Case = Callable[[np.random.Generator], Tuple[List[object], Dict[str, object]]]


def _cases(k, jt) -> Dict[str, Case]:
    """Name -> case: given a generator, a case returns its outputs and the Vars to differentiate."""

    def arr(rng, shape, scale=1.0, shift=0.0):
        return jt.array((rng.standard_normal(shape) * scale + shift).astype(np.float32))

    def batch_norm(shape):
        def case(rng):
            x, w, b = arr(rng, shape, 3, 1.5), arr(rng, shape[1]), arr(rng, shape[1])
            return list(k.batch_norm_train(x, w, b, 1e-5)), {"x": x, "weight": w, "bias": b}
        return case

    def affine(shape, frozen):
        def case(rng):
            x, scale, shift = arr(rng, shape), arr(rng, shape[1]), arr(rng, shape[1])
            if frozen:
                scale, shift = scale.stop_grad(), shift.stop_grad()
            wrt = {"x": x} if frozen else {"x": x, "scale": scale, "shift": shift}
            return [k.channel_affine(x, scale, shift)], wrt
        return case

    def relu(shape):
        def case(rng):
            a = rng.standard_normal(shape).astype(np.float32)
            a.reshape(-1)[::7] = 0.0  # exact zeros take no gradient
            x = jt.array(a)
            return [k.relu(x)], {"x": x}
        return case

    def softmax(shape):
        def case(rng):
            a = (rng.standard_normal(shape) * 4).astype(np.float32)
            a.reshape(-1, shape[-1])[::3, ::4] = -np.inf  # masked entries, never a whole row
            a.reshape(-1, shape[-1])[:, 1] = rng.standard_normal(a.size // shape[-1])
            x = jt.array(a)
            return [k.softmax_last(x)], {"x": x}
        return case

    def deform(levels, with_cells):
        def case(rng):
            bs, len_q, heads, dim, points = 2, 7, 4, 8, 3
            len_v = sum(h * w for h, w in levels)
            value = arr(rng, (bs, len_v, heads, dim))
            loc_shape = (bs, len_q, heads, len(levels), points, 2)
            loc = rng.uniform(-0.1, 1.1, loc_shape).astype(np.float32)
            locations = jt.array(loc)
            weights = jt.array(rng.uniform(0, 1, loc.shape[:-1]).astype(np.float32))
            cells = None
            if with_cells:
                size = np.array([[w, h] for h, w in levels], np.float32).reshape(1, 1, 1, -1, 1, 2)
                cells = jt.array(np.floor(loc * size - 0.5).astype(np.int32))
            out = k.ms_deform_attn(value, levels, locations, weights, cells)
            return [out], {"value": value, "locations": locations, "weights": weights}
        return case

    def max_pool(shape, kernel, stride, padding, ceil, nan=False):
        def case(rng):
            a = (np.round(rng.standard_normal(shape) * 2) / 2).astype(np.float32)  # ties in windows
            if nan:
                a[0, 0, 1, 2] = np.nan
            x = jt.array(a)
            return [k.max_pool2d(x, kernel, stride, padding, ceil)], {"x": x}
        return case

    def avg_pool(shape, kernel, stride, padding, ceil, count_pad):
        def case(rng):
            x = arr(rng, shape)
            return [k.avg_pool2d(x, kernel, stride, padding, ceil, count_pad)], {"x": x}
        return case

    def swap(shape):
        def case(rng):
            x = arr(rng, shape)
            return [k.swap_last_axes(x)], {"x": x}
        return case

    def adamw(shape, step):
        def case(rng):
            hyper = k.adamw_hyperparameters(1e-3, 0.05, (0.9, 0.999), 1e-8, step)
            param, grad = arr(rng, shape), arr(rng, shape, 0.1)
            exp_avg = arr(rng, shape, 0.01)
            exp_avg_sq = jt.array(rng.uniform(0, 1e-3, shape).astype(np.float32))
            return [hyper, *k.adamw_update(param, grad, exp_avg, exp_avg_sq, hyper)], {}
        return case

    def sgemm(a_shape, b_shape, ta, tb):
        def case(rng):
            return [k.batched_sgemm(arr(rng, a_shape), arr(rng, b_shape), ta, tb)], {}
        return case

    def linear(x_shape, out_features, bias):
        def case(rng):
            x, w = arr(rng, x_shape), arr(rng, (out_features, x_shape[-1]), 0.2)
            b = arr(rng, out_features) if bias else None
            wrt = {"x": x, "weight": w, **({"bias": b} if bias else {})}
            return [k.linear(x, w, b)], wrt
        return case

    def layer_norm(shape):
        def case(rng):
            x, w, b = arr(rng, shape, 2, 0.5), arr(rng, shape[-1]), arr(rng, shape[-1])
            return [k.layer_norm(x, w, b, 1e-6)], {"x": x, "weight": w, "bias": b}
        return case

    def conv(x_shape, out_channels, bias, frozen):
        def case(rng):
            x, w = arr(rng, x_shape), arr(rng, (out_channels, x_shape[1], 1, 1), 0.3)
            b = arr(rng, out_channels) if bias else None
            if frozen:
                w = w.stop_grad()
            wrt = {"x": x, **({} if frozen else {"weight": w}), **({"bias": b} if bias else {})}
            return [k.conv1x1(x, w, b)], wrt
        return case

    return {
        "batch_norm_train/2x8x5x7": batch_norm((2, 8, 5, 7)),
        "batch_norm_train/1x3x1x2": batch_norm((1, 3, 1, 2)),
        "batch_norm_train/3x16x33x17": batch_norm((3, 16, 33, 17)),
        "channel_affine/2x8x5x7": affine((2, 8, 5, 7), False),
        "channel_affine/3x16x33x17-frozen": affine((3, 16, 33, 17), True),
        "relu/2x8x5x7": relu((2, 8, 5, 7)),
        "relu/3x33x17": relu((3, 33, 17)),
        "softmax_last/4x7": softmax((4, 7)),
        "softmax_last/2x3x30x27": softmax((2, 3, 30, 27)),
        "ms_deform_attn/3-levels": deform([(6, 9), (3, 5), (2, 3)], False),
        "ms_deform_attn/3-levels-cells": deform([(6, 9), (3, 5), (2, 3)], True),
        "ms_deform_attn/1-level": deform([(4, 7)], False),
        "max_pool2d/2x3x11x13-k3s2p1": max_pool((2, 3, 11, 13), 3, 2, 1, False),
        "max_pool2d/1x2x9x8-k2s2-ceil": max_pool((1, 2, 9, 8), 2, 2, 0, True),
        "max_pool2d/1x2x9x8-k3s2p1-nan": max_pool((1, 2, 9, 8), 3, 2, 1, False, nan=True),
        "avg_pool2d/2x3x11x13-k3s2p1": avg_pool((2, 3, 11, 13), 3, 2, 1, False, True),
        "avg_pool2d/2x3x11x13-k3s2p1-ceil-nopad": avg_pool((2, 3, 11, 13), 3, 2, 1, True, False),
        "avg_pool2d/1x4x10x6-k2s2": avg_pool((1, 4, 10, 6), 2, 2, 0, False, True),
        "swap_last_axes/2x37x70": swap((2, 37, 70)),
        "swap_last_axes/1x64x33": swap((1, 64, 33)),
        "adamw_update/5x7-step1": adamw((5, 7), 1),
        "adamw_update/300-step10": adamw((300,), 10),
        "batched_sgemm/3x5x4@3x4x6": sgemm((3, 5, 4), (3, 4, 6), False, False),
        "batched_sgemm/3x4x5^T@3x4x6": sgemm((3, 4, 5), (3, 4, 6), True, False),
        "batched_sgemm/16x40x8@16x40x8^T": sgemm((16, 40, 8), (16, 40, 8), False, True),
        "linear/2x7x12->5-bias": linear((2, 7, 12), 5, True),
        "linear/130x16->9": linear((130, 16), 9, False),
        "layer_norm/2x7x32": layer_norm((2, 7, 32)),
        "layer_norm/130x16": layer_norm((130, 16)),
        "conv1x1/2x6x5x7->4-bias": conv((2, 6, 5, 7), 4, True, False),
        "conv1x1/1x3x9x4->5": conv((1, 3, 9, 4), 5, False, False),
        "conv1x1/2x6x5x7->4-frozen": conv((2, 6, 5, 7), 4, True, True),
    }


def fingerprint(out_path: str) -> None:
    """Runs every case and saves ``<case>/out<i>`` and ``<case>/grad_<name>`` arrays."""
    import jittor_impl._kernels as k  # first: the package prepares Jittor before its import
    import jittor as jt

    jt.flags.use_cuda = 0
    arrays = {"meta/has_dnnl_sgemm": np.array(k.has_dnnl_sgemm())}
    for index, (name, case) in enumerate(_cases(k, jt).items()):
        rng = np.random.default_rng(1000 + index)
        outputs, wrt = case(rng)
        for i, out in enumerate(outputs):
            arrays[f"{name}/out{i}"] = out.numpy()
        if wrt:
            weights = [jt.array(rng.standard_normal(o.shape).astype(np.float32)) for o in outputs]
            loss = sum((o * w).sum() for o, w in zip(outputs, weights))
            for key, grad in zip(wrt, jt.grad(loss, list(wrt.values()))):
                arrays[f"{name}/grad_{key}"] = grad.numpy()
        print(f"{name}: {len(outputs)} outputs, {len(wrt)} gradients", flush=True)
    np.savez(out_path, **arrays)
    print(f"wrote {len(arrays)} arrays to {out_path} (oneDNN sgemm: {k.has_dnnl_sgemm()})")


def compare(path_a: str, path_b: str) -> int:
    """Prints every array that is missing from one file or not bit-identical; 1 if any."""
    a, b = np.load(path_a), np.load(path_b)
    bad = []
    for key in sorted(set(a.files) | set(b.files)):
        if key not in a.files or key not in b.files:
            bad.append(f"{key}: only in {path_a if key in a.files else path_b}")
            continue
        x, y = a[key], b[key]
        if x.dtype != y.dtype or x.shape != y.shape:
            bad.append(f"{key}: {x.dtype}{list(x.shape)} against {y.dtype}{list(y.shape)}")
        elif x.tobytes() != y.tobytes():
            bytes_x, bytes_y = (v.view(np.uint8).reshape(v.size, -1) for v in (x, y))
            differ = np.count_nonzero((bytes_x != bytes_y).any(axis=1))
            bad.append(f"{key}: {differ} of {x.size} elements differ")
    for line in bad:
        print("DIFFERENT", line)
    print(f"{len(set(a.files) | set(b.files))} arrays compared, {len(bad)} not bit-identical")
    return 1 if bad else 0


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--out", help="run the kernels and write this .npz")
    group.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two .npz files")
    args = parser.parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    fingerprint(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
