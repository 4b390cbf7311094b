"""The Jittor port against the reference: state_dicts, conversion, eval outputs, detections, losses.

One table drives the end-to-end checks: every variant at 640x640 in eval, and train-mode loss
terms at a reduced size with the same targets and denoising noise. The large variants' 640
checks sit in the ``slow`` tier (``-m slow``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from jittor_impl import build_model as build_jittor
from jittor_impl.checkpoint import model_state_dict, state_dict_specs
from jittor_impl.common import count_parameters
from parity.check import CheckResult, check_eval, check_train_losses
from parity.convert import convert, read_any
from parity.models import build_pair
from rtdetr_common.configs import VARIANTS, load_official_manifest
from rtdetr_common.state_dicts import StateDictMismatchError, TensorSpec
from torch_ref import build_model as build_torch

MANIFEST = load_official_manifest()
SLOW = pytest.mark.slow


def _failures(result: CheckResult) -> list[str]:
    return [f"{r.kind} {r.comparison.path}: {r.comparison.reason}" for r in result.rows
            if not r.passed]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_jittor_state_dict_equals_official(name: str) -> None:
    model = build_jittor(name, num_classes=80)
    ours = state_dict_specs(model.state_dict())
    official = {k: TensorSpec(tuple(v[0]), v[1]) for k, v in MANIFEST[name]["state_dict"].items()}
    assert sorted(set(official) - set(ours)) == []
    assert sorted(set(ours) - set(official)) == []
    assert {k: ours[k] for k in official if ours[k] != official[k]} == {}
    assert list(ours) == list(official), "state_dict order differs from the official one"
    assert count_parameters(model) == MANIFEST[name]["num_parameters"]


@pytest.fixture(scope="module")
def r18_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An official-layout training checkpoint with model, ema and optimizer entries."""
    model = build_torch("r18vd")
    gen = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(v.shape, generator=gen) if v.is_floating_point() else v + 3)
             for k, v in model.state_dict().items()}
    ema = {k: (v * 0.5 if v.is_floating_point() else v) for k, v in state.items()}
    path = tmp_path_factory.mktemp("ckpt") / "official.pth"
    torch.save({"model": state, "ema": {"module": ema, "updates": 17, "warmups": 2000},
                "optimizer": {"state": {}, "param_groups": []}, "last_epoch": 4}, path)
    return path


def test_round_trip_pth_jittor_neutral_pth_is_bit_exact(r18_checkpoint: Path, tmp_path: Path) -> None:
    chain = [r18_checkpoint, tmp_path / "w.pkl", tmp_path / "w.safetensors", tmp_path / "w.npz",
             tmp_path / "back.pth"]
    for src, dst in zip(chain, chain[1:]):
        convert(src, dst, "r18vd")
    first, last = read_any(chain[0]), read_any(chain[-1])
    assert first.dropped == ["last_epoch", "optimizer"]
    for entry in ("model", "ema"):
        a, b = getattr(first, entry), getattr(last, entry)
        assert list(a) == list(b)
        for k in a:
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
            assert a[k].tobytes() == b[k].tobytes(), k
    assert last.ema_updates == 17 and int(last.model["backbone.conv1.conv1_1.norm.num_batches_tracked"]) == 3


def test_converted_weights_load_into_jittor(r18_checkpoint: Path, tmp_path: Path) -> None:
    dst = tmp_path / "w.safetensors"
    convert(r18_checkpoint, dst, "r18vd")
    model = build_jittor("r18vd")
    from jittor_impl import load_checkpoint

    assert load_checkpoint(model, dst) == "ema"
    loaded = model_state_dict(model)
    expected = read_any(r18_checkpoint).ema
    for k, v in expected.items():
        assert loaded[k].dtype == v.dtype and np.array_equal(loaded[k], v), k


def test_mismatched_weights_are_refused_and_nothing_is_written(tmp_path: Path) -> None:
    sd = build_torch("r18vd").state_dict()
    sd.pop("decoder.enc_bbox_head.layers.2.bias")
    sd["decoder.enc_score_head.weight"] = torch.zeros(80, 255)
    src = tmp_path / "bad.pth"
    torch.save({"model": sd}, src)
    dst = tmp_path / "out.safetensors"
    dst.write_bytes(b"previous content")
    with pytest.raises(StateDictMismatchError) as info:
        convert(src, dst, "r18vd")
    assert info.value.missing == ["decoder.enc_bbox_head.layers.2.bias"]
    assert [k for k, _, _ in info.value.mismatched] == ["decoder.enc_score_head.weight"]
    assert str(src) in str(info.value)
    assert dst.read_bytes() == b"previous content"


# Variant -> tier of the 640x640 end-to-end check.
EVAL_TABLE = [
    pytest.param("r18vd"),
    pytest.param("r50vd"),
    pytest.param("r34vd", marks=SLOW),
    pytest.param("r50vd_m", marks=SLOW),
    pytest.param("r101vd", marks=SLOW),
]


@pytest.mark.parametrize("name", EVAL_TABLE)
def test_eval_outputs_and_detections_match(name: str) -> None:
    pair = build_pair(name, size=640, seed=0)
    result = CheckResult(name, pair.weights_source, 640)
    check_eval(pair, result, 640)
    assert _failures(result) == []
    kinds = {r.kind for r in result.rows}
    assert kinds == {"output", "decision", "detection"}


# Train-mode checks run at the official 640x640: BatchNorm then normalises with batch
# statistics over enough elements per channel. At 256-320 with batch 2 the deepest level has
# only 2x8x8 to 2x10x10 values per channel, and fp32 rounding (different in each framework)
# is amplified about 2x per decoder layer: measured r50vd loss_giou differs 2.1e-4 relative at
# 320 against 2.4e-6 at 640 (torch's own fp32-vs-float64 gap: 4.7e-6).
@pytest.mark.parametrize("name,counts", [
    ("r18vd", (4, 0)),      # one image without boxes inside a batch with boxes
    ("r18vd", (0, 0)),      # no boxes at all: denoising off, empty matching
    ("r50vd", (3, 5)),      # frozen-norm backbone, 6 decoder layers
    pytest.param("r34vd", (1, 3), marks=SLOW),
    # Known divergences of the seeded weights, not of the port: in train mode the 6-layer
    # decoders of r50vd_m and r101vd amplify fp32 rounding about 3x per layer, so the
    # reference's own final logits are 0.083 (abs) off its float64 run (Jittor's: 0.129), and
    # r50vd_m's last-layer Hungarian match picks one different query (103 vs 138): loss_vfl
    # then differs by 2.7e-2 relative. Strict: when these agree they fail and move up.
    pytest.param("r50vd_m", (2, 6), marks=[SLOW, pytest.mark.xfail(
        strict=True, reason="known divergence: fp32 chaos of seeded weights flips one match")]),
    pytest.param("r101vd", (5, 2), marks=[SLOW, pytest.mark.xfail(
        strict=True, reason="known divergence: fp32 chaos of seeded weights, loss_vfl")]),
])
def test_train_loss_terms_match(name: str, counts: tuple[int, ...]) -> None:
    pair = build_pair(name, size=None, seed=0)
    result = CheckResult(name, pair.weights_source, 640)
    check_train_losses(pair, result, 640, list(counts))
    assert _failures(result) == []
    losses = [r for r in result.rows if r.kind == "loss"]
    n_layers = pair.cfg.decoder.num_decoder_layers
    expected = 3 * (1 + n_layers) + (3 * n_layers if sum(counts) else 0)
    assert len(losses) == expected


def test_jittor_training_leaves_no_graph_behind() -> None:
    """Steps, EMA updates and BatchNorm statistics keep no graph alive (lazy evaluation).

    The first steps load (and on a cold cache compile) the kernels of every fused graph, which
    raises memory once; the comparison starts after them.
    """
    from parity.bench import jittor_memory_growth

    rows = jittor_memory_growth("r18vd", size=128, batch=2, checkpoints=(10, 30))
    assert rows[1]["lived_vars"] == rows[0]["lived_vars"], rows
    assert rows[1]["rss_mb"] <= rows[0]["rss_mb"] * 1.03, rows


@pytest.mark.parametrize("name", ["r18vd", "r50vd"])
def test_optimizer_groups_match(name: str) -> None:
    """Same official parameter groups, learning rates and decays on both sides, in any mode."""
    import jittor_impl
    import torch_ref

    th_model, jt_model = build_torch(name), build_jittor(name)
    jt_model.eval()  # Jittor's eval marks Vars stop_grad; grouping must not depend on it
    th_opt = torch_ref.build_optimizer(th_model, name)
    jt_opt = jittor_impl.build_optimizer(jt_model, name)
    jt_model.train()

    th = [(len(g["params"]), sum(p.numel() for p in g["params"]), g["lr"], g["weight_decay"])
          for g in th_opt.param_groups]
    jt_ = [(len(g["params"]), sum(int(np.prod(p.shape)) for p in g["params"]),
            g.get("lr", jt_opt.lr), g.get("weight_decay", jt_opt.weight_decay))
           for g in jt_opt.param_groups]
    assert th == jt_
