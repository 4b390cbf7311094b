"""Height/width swaps in the port: caught on a non-square input, invisible on a square one.

Each fault swaps height and width in one place of the Jittor side only (patched on the
instance the check uses, and undone after the test): the hybrid
encoder's 2-D sin-cos position embedding, the decoder's anchors (``_generate_anchors``) and
the postprocessor's (w, h) original sizes. The check at a non-square size must fail and name
the fault (the module check its module, the eval check its rows). On a square input the
embedding and anchor swaps change no bit, so the same check passes there: the blind spot of
square inputs. The postprocessor's original sizes are non-square whatever the image size, so
its swap shows on a square input too.

The sizes and batch are those of the default tier's eval module checks
(``parity/test_modules.py``, ``parity/test_faults.py``): the same compiled kernels.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Callable

import jittor as jt
import numpy as np
import pytest
import torch

from parity.check import CheckResult, check_eval
from parity.arrays import to_numpy
from parity.models import ModelPair, build_pair
from parity.modules import run_module_check
from rtdetr_common.configs import Size
from rtdetr_common.seeded import seeded_images

SQUARE = 256
NON_SQUARE = (192, 320)  # (h, w)
BATCH = 2

Inject = Callable[[ModelPair, pytest.MonkeyPatch], None]


def _swap_position_embedding(pair: ModelPair, monkeypatch: pytest.MonkeyPatch) -> None:
    """The encoder builds its sin-cos embedding for (h, w) instead of (w, h)."""
    encoder = pair.jittor_model.encoder
    build = encoder.build_2d_sincos_position_embedding

    def swapped(w: int, h: int, *args: Any, **kwargs: Any) -> jt.Var:
        return build(h, w, *args, **kwargs)

    monkeypatch.setattr(encoder, "build_2d_sincos_position_embedding", swapped)
    for idx in encoder.use_encoder_idx:  # the precomputed eval-time embeddings
        stride = encoder.feat_strides[idx]
        h, w = (side // stride for side in encoder.eval_spatial_size)
        monkeypatch.setattr(encoder, f"pos_embed{idx}",
                            swapped(w, h, encoder.hidden_dim, encoder.pe_temperature).numpy())


def _swap_anchors(pair: ModelPair, monkeypatch: pytest.MonkeyPatch) -> None:
    """The decoder lays its anchors out on a (w, h) grid instead of (h, w)."""
    decoder = pair.jittor_model.decoder
    generate = decoder._generate_anchors

    def swapped(spatial_shapes: list[list[int]] | None = None, grid_size: float = 0.05,
                dtype: str = "float32") -> tuple[jt.Var, jt.Var]:
        if spatial_shapes is None:
            h, w = decoder.eval_spatial_size
            spatial_shapes = [[int(h / s), int(w / s)] for s in decoder.feat_strides]
        return generate([[w, h] for h, w in spatial_shapes], grid_size, dtype)

    monkeypatch.setattr(decoder, "_generate_anchors", swapped)
    anchors, valid_mask = swapped()  # the precomputed eval-time anchors
    monkeypatch.setattr(decoder, "_anchors", anchors)
    monkeypatch.setattr(decoder, "_valid_mask", valid_mask)


def _swap_original_sizes(pair: ModelPair, monkeypatch: pytest.MonkeyPatch) -> None:
    """The postprocessor scales boxes by (h, w) instead of the (w, h) it is given."""
    postprocessor = pair.port_parts.postprocessor
    execute = postprocessor.execute
    monkeypatch.setattr(postprocessor, "execute",
                        lambda outputs, sizes: execute(outputs, sizes.flip(1)))


def _module_failures(pair: ModelPair, size: Size) -> tuple[str | None, list[str]]:
    """The module check: its first failing module and every failing isolated row path."""
    report = run_module_check(pair, mode="eval", images=seeded_images(BATCH, size, seed=1))
    first = report.first_failure
    return (None if first is None else first.module,
            [r.comparison.path for r in report.failures("isolated")])


def _eval_failures(pair: ModelPair, size: Size) -> tuple[str | None, list[str]]:
    """The eval check (outputs, top-k, detections): no module, every failing row path."""
    result = CheckResult(pair.cfg.name, pair.weights_source, size)
    check_eval(pair, result, size, batch=BATCH)
    return None, [r.comparison.path for r in result.rows if not r.passed]


@dataclass(frozen=True)
class Fault:
    """One height/width swap, the check that must catch it, and what that check must name.

    Attributes:
        id: Test id.
        inject: Writes the swap into the Jittor side of a pair (undone by the monkeypatch).
        check: ``(pair, size) -> (first failing module, failing row paths)``.
        module: The module the check must name first (None for the eval check).
        rows: Globs of the failing row paths; every failing row matches one, each one matches
            a failing row.
        seen_at_square: Whether a square input shows the swap too.
    """

    id: str
    inject: Inject
    check: Callable[[ModelPair, Size], tuple[str | None, list[str]]]
    module: str | None
    rows: tuple[str, ...]
    seen_at_square: bool


FAULTS = [
    Fault("encoder-position-embedding", _swap_position_embedding, _module_failures, "encoder",
          ("encoder -> input of encoder.encoder.0: kwargs.pos_embed",), False),
    # The reference points handed to the decoder layers carry the anchors.
    Fault("decoder-anchors", _swap_anchors, _module_failures, "decoder",
          ("decoder -> input of decoder.decoder: args[[]1[]]",), False),
    Fault("postprocessor-original-sizes", _swap_original_sizes, _eval_failures, None,
          ("detections[[]*[]].boxes",), True),
]


def _assert_named(fault: Fault, module: str | None, rows: list[str]) -> None:
    assert rows, f"{fault.id}: the injected swap went unnoticed"
    assert module == fault.module, f"{fault.id}: first failure {module}, expected {fault.module}"
    unexplained = [r for r in rows if not any(fnmatch.fnmatchcase(r, g) for g in fault.rows)]
    assert unexplained == [], f"{fault.id}: unexpected failing rows {unexplained[:10]}"
    missing = [g for g in fault.rows if not any(fnmatch.fnmatchcase(r, g) for r in rows)]
    assert missing == [], f"{fault.id}: no failing row matches {missing}"


@pytest.mark.parametrize("fault", FAULTS, ids=[f.id for f in FAULTS])
def test_height_width_swap_is_caught_on_non_square_input(
        fault: Fault, monkeypatch: pytest.MonkeyPatch) -> None:
    for size, seen in ((NON_SQUARE, True), (SQUARE, fault.seen_at_square)):
        pair = build_pair("r18vd", size=size)
        with monkeypatch.context() as patch:
            fault.inject(pair, patch)
            module, rows = fault.check(pair, size)
        if seen:
            _assert_named(fault, module, rows)
        else:
            assert (module, rows) == (None, []), f"{fault.id} at {size}: a square input sees it"


def test_eval_spatial_size_is_height_then_width_in_both_models(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An (h, w) pair precomputes what an h x w input computes on the fly, in both models.

    A height/width confusion shared by both models (or by :func:`variant_at_size`) passes every
    parity comparison; here each model is compared with itself instead.
    """
    pair = build_pair("r18vd", size=NON_SQUARE).eval()
    images = seeded_images(BATCH, NON_SQUARE, seed=1)
    outputs = []
    for on_the_fly in (False, True):
        with monkeypatch.context() as patch:
            for model in (pair.torch_model, pair.jittor_model):
                assert model.encoder.eval_spatial_size == list(NON_SQUARE)
                assert model.decoder.eval_spatial_size == list(NON_SQUARE)
                if on_the_fly:
                    patch.setattr(model.encoder, "eval_spatial_size", None)
                    patch.setattr(model.decoder, "eval_spatial_size", None)
            with torch.no_grad(), jt.no_grad():
                outputs.append(to_numpy([pair.torch_model(torch.from_numpy(images)),
                                         pair.jittor_model(jt.array(images))]))
    precomputed, computed = outputs
    for side, a, b in (("torch", precomputed[0], computed[0]), ("jittor", precomputed[1], computed[1])):
        for key in ("pred_logits", "pred_boxes"):
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{side} {key}")
