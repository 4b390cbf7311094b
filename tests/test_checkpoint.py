"""Official-format checkpoint loading: entry selection, strictness, clear errors, no code execution."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from rtdetr_common.state_dicts import StateDictMismatchError
from torch_ref import build_model, load_checkpoint, read_checkpoint


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build_model("r18vd", num_classes=80)


def _perturbed(sd: dict, delta: float) -> dict:
    return {k: (v + delta if v.is_floating_point() else v.clone()) for k, v in sd.items()}


def test_ema_preferred_then_model_then_bare(tmp_path: Path, model: torch.nn.Module) -> None:
    sd = model.state_dict()
    ema_sd, model_sd = _perturbed(sd, 1.0), _perturbed(sd, 2.0)
    both = tmp_path / "train.pth"
    torch.save({"model": model_sd, "ema": {"module": ema_sd, "updates": 3, "warmups": 2000},
                "last_epoch": 1, "date": "2026-11-25"}, both)
    loaded, entry = read_checkpoint(both)
    assert entry == "ema" and torch.equal(loaded["encoder.input_proj.0.0.weight"],
                                          ema_sd["encoder.input_proj.0.0.weight"])
    assert read_checkpoint(both, prefer="model")[1] == "model"
    only_model = tmp_path / "model.pth"
    torch.save({"model": model_sd}, only_model)
    assert read_checkpoint(only_model)[1] == "model"
    bare = tmp_path / "bare.pth"
    torch.save(sd, bare)
    assert read_checkpoint(bare)[1] == "model"


def test_load_roundtrip_is_exact(tmp_path: Path) -> None:
    src, dst = build_model("r18vd", seed=1), build_model("r18vd", seed=2)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in src.parameters():
            p.normal_()
    path = tmp_path / "published.pth"
    torch.save({"ema": {"module": src.state_dict()}}, path)
    assert load_checkpoint(dst, path) == "ema"
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), k


def test_mismatch_lists_every_problem_and_loads_nothing(tmp_path: Path, model: torch.nn.Module) -> None:
    sd = dict(model.state_dict())
    del sd["decoder.enc_score_head.bias"]
    sd["decoder.extra.weight"] = torch.zeros(3)
    sd["decoder.dec_score_head.0.weight"] = torch.zeros(91, 256)
    sd["backbone.conv1.conv1_1.norm.num_batches_tracked"] = torch.tensor(0, dtype=torch.int32)
    path = tmp_path / "bad.pth"
    torch.save({"model": sd}, path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(StateDictMismatchError) as info:
        load_checkpoint(model, path)
    err = info.value
    assert err.missing == ["decoder.enc_score_head.bias"]
    assert err.unexpected == ["decoder.extra.weight"]
    assert [k for k, _, _ in err.mismatched] == ["backbone.conv1.conv1_1.norm.num_batches_tracked",
                                                 "decoder.dec_score_head.0.weight"]
    message = str(err)
    assert str(path) in message and "(91, 256)" in message and "int32" in message
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed although loading was refused"


class _Boom:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_untrusted_pickle_does_not_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": _Boom()}, f)
    with pytest.raises(ValueError, match="weights-only"):
        read_checkpoint(path)
    assert not (tmp_path / "PWNED").exists()


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="x.pth"):
        read_checkpoint(tmp_path / "x.pth")


@pytest.mark.parametrize("content", [b"", b"not a checkpoint"])
def test_unreadable_files_are_clear_errors(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "x.pth"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="x.pth"):
        read_checkpoint(path)


def test_checkpoint_without_weights(tmp_path: Path) -> None:
    path = tmp_path / "opt.pth"
    torch.save({"optimizer": {"state": {}}, "last_epoch": 3}, path)
    with pytest.raises(ValueError, match="no 'model', no 'ema'"):
        read_checkpoint(path)
