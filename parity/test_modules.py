"""Per-module parity: capture, alignment, accumulated and isolated comparison of every module.

One table drives the module checks: r18vd in eval and in training with denoising, without
denoising and with an image that has no boxes (default tier; the eval and denoising cases are
non-square, one of each orientation, since a height/width swap is invisible on a square
input), and every variant at 640 in both modes (``slow`` tier). A failure names the module
path, the metric, its value and the tolerance. The smaller tests check the pieces: that
recording changes no bit, that module names align, how leaves are compared and how torch
inputs become Jittor arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

import jittor as jt
import numpy as np
import pytest
import torch

from parity.capture import (JittorCapture, ModuleFilter, ModuleRef, TorchCapture,
                            torch_to_jittor_tree, verify_capture_transparent)
from parity.models import ModelPair, build_pair
from parity.modules import ModuleReport, compare_outputs, module_name_rows, run_module_check
from rtdetr_common.configs import VARIANTS, Size
from rtdetr_common.seeded import seeded_images, seeded_targets

SLOW = pytest.mark.slow
SMALL = 256
# Non-square (h, w) of the default tier, one of each orientation, fewer pixels than SMALL.
WIDE, TALL = (192, 320), (320, 192)


@dataclass(frozen=True)
class Case:
    """One row of the module table."""

    variant: str
    size: Size  # S (S x S) or (h, w)
    mode: str
    counts: tuple[int, ...] | None  # boxes per image; None: no targets (no denoising)
    batch: int = 2  # images without targets; with targets one per entry of counts

    @property
    def id(self) -> str:
        """The pytest id, e.g. ``r18vd-256-train-boxes-3-0`` or ``r18vd-192x320-eval-b2-...``."""
        size = self.size if isinstance(self.size, int) else "x".join(map(str, self.size))
        if self.counts is None:
            return f"{self.variant}-{size}-{self.mode}-b{self.batch}-no-targets"
        boxes = "-".join(map(str, self.counts))
        return f"{self.variant}-{size}-{self.mode}-boxes-{boxes}"


# At 640 one image per case: every module of r101vd then holds 4.6 GB of activations
# (2.5 GB torch + 2.1 GB Jittor; peak RSS 6.3 GB), twice that with two images.
CASES = [
    Case("r18vd", WIDE, "eval", None),
    Case("r18vd", TALL, "train", (4, 2)),  # denoising on
    Case("r18vd", SMALL, "train", None),  # denoising off: no targets
    Case("r18vd", SMALL, "train", (3, 0)),  # one image without boxes
] + [c for v in VARIANTS for c in (Case(v, 640, "eval", None, batch=1),
                                    Case(v, 640, "train", (4,), batch=1))]


def _param(case: Case):
    return pytest.param(case, id=case.id, marks=[SLOW] if case.size == 640 else [])


@pytest.fixture(scope="module")
def pairs() -> dict:
    """Model pairs by (variant, size), built once per module."""
    return {}


def _pair(pairs: dict, variant: str, size: Size) -> ModelPair:
    if (variant, size) not in pairs:
        pairs.clear()  # one pair in memory at a time
        pairs[(variant, size)] = build_pair(variant, size=size)
    return pairs[(variant, size)]


def _run(pair: ModelPair, case: Case) -> ModuleReport:
    batch = case.batch if case.counts is None else len(case.counts)
    images = seeded_images(batch, case.size, seed=1)
    targets = None
    if case.counts is not None:
        targets = seeded_targets(list(case.counts), pair.cfg.num_classes, seed=2)
    return run_module_check(pair, mode=case.mode, images=images, targets=targets)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_module_parity(pairs: dict, case: Case) -> None:
    pair = _pair(pairs, case.variant, case.size)
    report = _run(pair, case)
    failures = report.failures()
    assert not failures, (f"{len(failures)} module comparisons failed; first failure: "
                          f"{report.first_failure.message() if report.first_failure else None}\n"
                          + "\n".join(r.message() for r in failures[:15]))
    kinds = {(r.mode, r.kind) for r in report.rows}
    assert {("isolated", "module"), ("accumulated", "module.accumulated"),
            ("isolated", "decision")} <= kinds
    if case.mode == "train":
        assert {("isolated", "buffer"), ("accumulated", "buffer.accumulated")} <= kinds
    # Every recorded torch call was compared, shared modules once per call.
    compared = {r.module for r in report.rows if r.mode == "isolated"}
    assert set(report.calls) <= compared
    assert "decoder.query_pos_head#2" in report.calls
    denoising = case.mode == "train" and case.counts is not None and sum(case.counts) > 0
    assert any("dn_meta" in r.comparison.path for r in report.rows) == denoising


def test_capture_changes_no_bit_eval(pairs: dict) -> None:
    pair = _pair(pairs, "r18vd", SMALL)
    verify_capture_transparent(pair, mode="eval", images=seeded_images(2, SMALL, seed=1))


def test_capture_changes_no_bit_train(pairs: dict) -> None:
    pair = _pair(pairs, "r18vd", SMALL)
    verify_capture_transparent(pair, mode="train", images=seeded_images(2, SMALL, seed=1),
                               targets=seeded_targets([4, 2], 80, seed=2))


@pytest.mark.parametrize("variant", ["r18vd", "r50vd"])
def test_module_names_align(variant: str) -> None:
    pair = build_pair(variant, size=SMALL)
    rows, internal = module_name_rows(pair)
    assert [r.message() for r in rows] == []
    assert {n for n in internal if n.endswith("self_attn.out_proj")}


def test_capture_records_every_call_with_keys_and_nesting(pairs: dict) -> None:
    pair = _pair(pairs, "r18vd", SMALL).eval()
    images = seeded_images(1, SMALL, seed=1)
    select = ModuleFilter(prefixes=("decoder.query_pos_head", "decoder.decoder"), max_depth=4)
    with TorchCapture(pair.torch_model, select) as tcap, torch.no_grad():
        pair.torch_model(torch.from_numpy(images))
    # The same query selection on both sides (a near-tie may fall either way).
    decoder = pair.jittor_model.decoder
    decoder.forced_topk_ind = jt.array(pair.torch_model.decoder.last_topk_ind.numpy()).int64()
    try:
        with JittorCapture(pair.jittor_model, select, inputs=False) as jcap, jt.no_grad():
            pair.jittor_model(jt.array(images))
    finally:
        decoder.forced_topk_ind = None
    tkeys, jkeys = [c.key for c in tcap.calls], [c.key for c in jcap.calls]
    assert tkeys == jkeys
    assert "decoder.query_pos_head#2" in tkeys and "decoder.decoder.layers.0.norm1" not in tkeys
    calls = tcap.by_key()
    # The heads passed to the decoder loop run inside its call.
    assert calls["decoder.query_pos_head"].parent == calls["decoder.decoder"].start
    assert calls["decoder.decoder"].end > calls["decoder.decoder.layers.2"].end
    assert isinstance(calls["decoder.decoder"].args[5], ModuleRef)
    assert not any(c.args for c in jcap.calls)
    for name in ("decoder.decoder", "decoder.decoder.layers.1", "decoder.query_pos_head#1"):
        rows, _ = compare_outputs(jcap.by_key()[name].output, calls[name].output,
                                  "module.accumulated", name)
        assert rows and all(r.passed for r in rows), [r.reason for r in rows]


def test_torch_inputs_become_jittor_arguments() -> None:
    head = object()
    tree = {"x": torch.arange(3, dtype=torch.int64), "m": [torch.ones(2, dtype=torch.bool), None],
            "shapes": [[8, 8], [4, 4]], "mod": ModuleRef("decoder.enc_score_head")}
    out = torch_to_jittor_tree(tree, {"decoder.enc_score_head": head})
    assert str(out["x"].dtype) == "int64" and out["x"].numpy().tolist() == [0, 1, 2]
    assert str(out["m"][0].dtype) == "bool" and out["m"][1] is None
    assert out["shapes"] == [[8, 8], [4, 4]] and out["mod"] is head


def test_leaves_compare_integers_exactly_and_values_by_equality() -> None:
    ref = {"idx": np.array([1, 2, 3], dtype=np.int64), "n": 3, "none": None,
           "x": np.ones(4, dtype=np.float32)}
    test = {"idx": np.array([1, 2, 4], dtype=np.int64), "n": 3, "none": None,
            "x": np.ones(4, dtype=np.float32) * (1 + 1e-6)}
    rows = {c.path: c for c in compare_outputs(test, ref, "module", "m")[0]}
    assert not rows["m -> idx"].passed
    assert rows["m -> n"].passed and rows["m -> none"].passed and rows["m -> x"].passed
    test["x"] = test["x"] * (1 + 1e-4)
    row = compare_outputs(test, ref, "module", "m")[0][-1]
    assert not row.passed and "rel L2" in row.reason


def test_subtree_isolation_runs_children_for_real(pairs: dict) -> None:
    pair = _pair(pairs, "r18vd", SMALL)
    report = run_module_check(pair, mode="eval", images=seeded_images(2, SMALL, seed=1),
                              modules=ModuleFilter(prefixes=("decoder",)), isolation="subtree")
    assert report.passed, "\n".join(r.message() for r in report.failures()[:10])
    assert report.calls[0] == "decoder" and "(model)" not in report.calls
    assert not any("input of" in r.comparison.path for r in report.rows)


def test_module_filter() -> None:
    select = ModuleFilter(prefixes=("decoder.dec_bbox_head",), max_depth=3)
    assert select("decoder.dec_bbox_head", None) and select("decoder.dec_bbox_head.0", None)
    assert not select("decoder.dec_bbox_head.0.layers", None)
    assert not select("decoder.dec_bbox_headx", None) and not select("", None)
    assert ModuleFilter(names=frozenset({""}))("", None)
