"""torch_ref state_dicts equal the official manifest key for key, shape for shape, dtype for dtype."""

from __future__ import annotations

import pytest

from rtdetr_common.configs import VARIANTS, load_official_manifest
from torch_ref import build_model

MANIFEST = load_official_manifest()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_state_dict_equals_official(name: str) -> None:
    official = MANIFEST[name]
    model = build_model(name, num_classes=80)
    buffers = {n for n, _ in model.named_buffers()}
    ours = {k: [list(v.shape), str(v.dtype).replace("torch.", ""), k in buffers]
            for k, v in model.state_dict().items()}
    expected = {k: list(v) for k, v in official["state_dict"].items()}
    assert sorted(set(expected) - set(ours)) == [], "keys missing from torch_ref"
    assert sorted(set(ours) - set(expected)) == [], "keys torch_ref has but the official model lacks"
    wrong = {k: (ours[k], expected[k]) for k in expected if ours[k] != expected[k]}
    assert wrong == {}, "shape / dtype / buffer flag differs (ours, official)"
    assert list(ours) == list(expected), "state_dict order differs from the official one"
    assert len(ours) == official["num_state_dict_entries"]
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == official["num_parameters"]
