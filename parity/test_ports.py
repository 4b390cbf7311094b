"""Checking other people's ports: ``check --port MODULE:FACTORY [--port-path] [--key-map]``.

The ports are those of ``parity/port_examples/handmade_rtdetr.py``: another layout and other
names than jittor_impl, other output keys, ``xyxy`` boxes and ``(h, w)`` original sizes. A
correct one passes through a key map (the one the check suggests), one with a porting bug is
caught at the module that introduces it, a stray ``detach`` by the gradients alone, a partial
key map leaves the rest checked, an eval-only one has its training parts reported as not run,
a raising factory stops the check with a clear error. jittor_impl named through
``--port`` gives the rows it gives without.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import jittor as jt
import jittor_impl
from parity.cli import main
from parity.ports import (DEFAULT_PORT, OutputOptions, PortError, key_findings, load_port,
                          read_key_map, suggest_key_map, write_key_map)

EXAMPLES = Path(__file__).parent / "port_examples"
# The default tier's small check (parity/test_cli.py): its kernels are compiled already.
SMALL = ["--variant", "r18vd", "--size", "96", "160", "--train-size", "160", "96",
         "--module-size", "96", "160", "--training-size", "128", "--steps", "2"]
PORT = ["--port-path", str(EXAMPLES)]


def _handmade():
    load_port("handmade_rtdetr:build_renamed", EXAMPLES)
    import handmade_rtdetr

    return handmade_rtdetr


def _true_key_map(variant: str) -> tuple[dict, dict, dict]:
    """(official specs, port specs, official -> port names) by tensor identity."""
    official = jittor_impl.build_port(variant, 80)["model"]
    names = {id(v): k for k, v in official.state_dict().items()}
    specs = {k: tuple(v.shape) for k, v in official.state_dict().items()}
    port = _handmade().relayout(official)
    truth = {names[id(v)]: k for k, v in port.state_dict().items()}
    return specs, {k: tuple(v.shape) for k, v in port.state_dict().items()}, truth


@pytest.mark.parametrize("variant", ["r18vd", "r50vd"])
def test_suggested_key_map_recovers_a_relaid_out_port(variant: str) -> None:
    official, port, truth = _true_key_map(variant)
    assert all(a != b for a, b in truth.items())  # every name differs
    assert suggest_key_map(official, port) == truth


def test_key_findings_name_missing_unexpected_misshaped_and_the_count() -> None:
    official = {"a.conv.weight": (4, 3, 3, 3), "a.norm.weight": (4,), "a.norm.running_mean": (4,),
                "b.fc.weight": (2, 4), "b.fc.bias": (2,)}
    port = {"x.c.weight": (4, 3, 3, 3), "x.bn.weight": (4,), "x.bn.running_mean": (4,),
            "b.fc.weight": (4, 2), "b.fc.bias": (2,), "extra.scale": (1,)}
    found = key_findings(official, port, {}, {"a.norm.running_mean"})
    assert found.missing == ["a.conv.weight", "a.norm.weight", "a.norm.running_mean"]
    assert found.unexpected == ["x.c.weight", "x.bn.weight", "x.bn.running_mean", "extra.scale"]
    assert found.misshaped == [("b.fc.weight", "b.fc.weight", (2, 4), (4, 2))]
    assert (found.official_parameters, found.port_parameters) == (122, 123)
    assert found.suggested == {"a.conv.weight": "x.c.weight", "a.norm.weight": "x.bn.weight",
                               "a.norm.running_mean": "x.bn.running_mean"}
    assert not found.complete
    text = found.format()
    assert "3 missing" in text and "mis-shaped: b.fc.weight [2, 4]" in text and "DIFFERENT" in text
    mapped = key_findings(official, {k: v for k, v in port.items() if k != "extra.scale"},
                          found.suggested, {"a.norm.running_mean"})
    assert mapped.missing == mapped.unexpected == [] and mapped.misshaped


def test_output_options_adapt_keys_boxes_and_sizes() -> None:
    options = OutputOptions({"pred_logits": "logits", "pred_boxes": "boxes"}, "xyxy", "hw")
    cxcywh = np.array([[[0.5, 0.4, 0.2, 0.6]]], dtype=np.float32)
    official = {"pred_logits": jt.array(np.ones((1, 1, 3), np.float32)),
                "pred_boxes": jt.array(cxcywh)}
    theirs = options.to_port(official)
    assert set(theirs) == {"logits", "boxes"}
    np.testing.assert_allclose(theirs["boxes"].numpy(), [[[0.4, 0.1, 0.6, 0.7]]], atol=1e-6)
    back = options.outputs(theirs)
    np.testing.assert_allclose(back["pred_boxes"].numpy(), cxcywh, atol=1e-6)
    np.testing.assert_array_equal(options.orig_sizes(np.array([[640, 480]])), [[480, 640]])
    with pytest.raises(PortError, match="box_format"):
        OutputOptions(box_format="xywh")
    with pytest.raises(PortError, match="unknown official keys"):
        OutputOptions({"logits": "pred_logits"})


@pytest.mark.parametrize("spec, path, message", [
    ("handmade_rtdetr", EXAMPLES, "expects MODULE:FACTORY"),
    ("handmade_rtdetr:build_renamed", EXAMPLES / "missing", "is not a folder"),
    ("no_such_port_module:build", None, "cannot import port module 'no_such_port_module'"),
    ("handmade_rtdetr:no_such_factory", EXAMPLES, "has no callable 'no_such_factory'"),
])
def test_a_port_that_cannot_be_loaded_is_named_with_why(spec, path, message) -> None:
    with pytest.raises(PortError, match=message):
        load_port(spec, path)


def test_key_map_files_are_checked_and_written_whole(tmp_path: Path) -> None:
    path = write_key_map({"a.weight": "x.weight"}, tmp_path / "map.json")
    assert read_key_map(path) == {"a.weight": "x.weight"}
    assert not list(tmp_path.glob(".*.tmp"))
    for text, message in (("{", "is not JSON"), ("[1]", "JSON object"),
                          ('{"a": "x", "b": "x"}', "maps both 'a' and 'b' to 'x'")):
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(PortError, match=message):
            read_key_map(tmp_path / "bad.json")
    with pytest.raises(PortError, match="does not exist"):
        read_key_map(tmp_path / "none.json")


def _run(tmp_path: Path, name: str, *extra: str, parts: str = "outputs,modules") -> tuple[int, dict]:
    out = tmp_path / name
    status = main(["check", *SMALL, "--parts", parts, "--out", str(out), *extra])
    report = out / "check_r18vd.json"
    return status, json.loads(report.read_text()) if report.exists() else {}


def _module_rows(payload: dict, mode: str) -> list[dict]:
    return next(m["rows"] for m in payload["modules"] if m["mode"] == mode)


def test_renamed_port_fails_on_its_names_then_passes_through_the_suggested_key_map(
        tmp_path: Path) -> None:
    port = [*PORT, "--port", "handmade_rtdetr:build_renamed"]
    status, first = _run(tmp_path, "names", *port)
    assert status == 1 and not first["passed"]
    findings = first["findings"]
    assert len(findings["missing"]) == len(findings["unexpected"]) == 533
    assert findings["loaded"] == [] and findings["official_parameters"] == findings["port_parameters"]
    suggested = tmp_path / "names" / "suggested_key_map_r18vd.json"
    assert read_key_map(suggested) == _true_key_map("r18vd")[2]

    status, second = _run(tmp_path, "mapped", *port, "--key-map", str(suggested),
                          parts="outputs,modules,training")
    assert status == 0 and second["passed"], [r for r in second["rows"] if not r["passed"]]
    assert second["findings"]["missing"] == [] and len(second["findings"]["loaded"]) == 533
    kinds = {r["kind"] for r in second["rows"]}
    assert {"output", "detection", "loss"} <= kinds
    assert {m["mode"] for m in second["modules"]} == {"eval", "train"}
    pairing = {p["mode"]: p for p in second["module_pairing"]}
    assert pairing["eval"]["key map"] > 200 and pairing["eval"]["call order"] > 50
    assert set(second["not_run"]) == {"decisions", "training.step", "training.trajectory"}
    grads = [r for r in second["rows"] if r["kind"] == "grad"]
    assert len(grads) > 300 and all(r["passed"] for r in grads)
    assert second["port"]["spec"] == "handmade_rtdetr:build_renamed"
    assert second["port"]["file"].endswith("handmade_rtdetr.py")


def test_a_porting_bug_is_named_at_the_module_that_introduces_it(tmp_path: Path) -> None:
    key_map = write_key_map(_true_key_map("r18vd")[2], tmp_path / "map.json")
    status, payload = _run(tmp_path, "bug", *PORT, "--port", "handmade_rtdetr:build_buggy",
                           "--key-map", str(key_map))
    assert status == 1
    for mode in ("eval", "train"):
        failing = [r for r in _module_rows(payload, mode)
                   if not r["passed"] and r["mode"] == "isolated"]
        assert {r["module"] for r in failing} == {"encoder.lateral_convs.0.act"}, failing
    assert any(not r["passed"] for r in payload["rows"] if r["kind"] == "output")


def test_an_eval_only_port_has_its_training_parts_reported_as_not_run(tmp_path: Path) -> None:
    status, payload = _run(tmp_path, "eval", *PORT, "--port", "handmade_rtdetr:build_eval_only",
                           parts="outputs,modules,training")
    assert status == 0 and payload["passed"]
    assert payload["not_run"] == {"outputs.losses": "the port has no criterion",
                                  "modules.train": payload["not_run"]["modules.train"],
                                  "training": "the port has no criterion"}
    kinds = {r["kind"] for r in payload["rows"]}
    # Its decoder keeps the official attribute name and hooks: the top-k is compared.
    assert kinds == {"output", "decision"}
    assert [m["mode"] for m in payload["modules"]] == ["eval"]
    assert any("no postprocessor" in n for n in payload["notes"])


def test_a_raising_factory_stops_the_check_with_a_clear_error(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    status, payload = _run(tmp_path, "raising", *PORT, "--port", "handmade_rtdetr:build_raising")
    assert status == 2 and payload == {}
    assert not (tmp_path / "raising").exists()
    err = capsys.readouterr().err
    assert ("port factory handmade_rtdetr:build_raising raised NotImplementedError for variant "
            "r18vd, 80 classes: variant r18vd is not ported yet") in err


def _comparable(payload: dict) -> tuple:
    rows = [(r["kind"], r["path"], r["passed"], r["max_abs"], r["rel_l2"]) for r in payload["rows"]]
    modules = [(m["mode"], [(r["module"], r["mode"], r["kind"], r["path"], r["passed"],
                             r["max_abs"], r["rel_l2"]) for r in m["rows"]])
               for m in payload["modules"]]
    return rows, modules


@pytest.mark.parametrize("parts", [
    "outputs,modules",
    pytest.param("outputs,modules,training", marks=pytest.mark.slow),
])
def test_jittor_impl_through_port_gives_the_same_rows(tmp_path: Path, parts: str) -> None:
    status, plain = _run(tmp_path, "plain", parts=parts)
    status_port, through = _run(tmp_path, "port", "--port", DEFAULT_PORT, parts=parts)
    assert status == status_port == 0
    assert plain["rows"] and _comparable(plain) == _comparable(through)
    assert through["port"]["spec"] == DEFAULT_PORT and through["findings"] is None
    assert through["not_run"] == {}


def test_the_report_of_a_port_has_our_sections_and_its_identity(tmp_path: Path) -> None:
    from parity.report import read_table

    key_map = write_key_map(_true_key_map("r18vd")[2], tmp_path / "map.json")
    out = tmp_path / "report"
    assert main(["report", *SMALL, "--out", str(out), "--port", "handmade_rtdetr:build_renamed",
                 *PORT, "--key-map", str(key_map)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    ours = json.loads((Path(__file__).parents[1] / "reports/r18vd/summary.json").read_text())
    assert [s["key"] for s in summary["sections"]] == [s["key"] for s in ours["sections"]]
    verdicts = {s["key"]: s["verdict"] for s in summary["sections"]}
    assert verdicts["port"] == verdicts["outputs"] == verdicts["modules"] == "pass"
    assert verdicts["trajectory"] == verdicts["fault-catalogue"] == "not run"
    meta = json.loads((out / "data" / "meta.json").read_text())
    assert meta["provenance"]["port"]["spec"] == "handmade_rtdetr:build_renamed"
    assert "handmade_rtdetr:build_renamed" in (out / "report.md").read_text()
    assert read_table(out / "data", "modules") is not None
    parameters = read_table(out / "data", "parameters")  # by official name, through the key map
    assert len(parameters) == 326 and (parameters["torch"] == parameters["jittor"]).all()
    assert (parameters["torch_trainable"] == parameters["jittor_trainable"]).all()


def test_a_port_whose_tensors_cannot_all_be_loaded_is_checked_on_the_modules_that_could(
        tmp_path: Path) -> None:
    truth = _true_key_map("r18vd")[2]
    partial = {k: v for k, v in truth.items() if not k.startswith("decoder.dec_score_head.")}
    key_map = write_key_map(partial, tmp_path / "partial.json")
    status, payload = _run(tmp_path, "partial", *PORT, "--port", "handmade_rtdetr:build_renamed",
                           "--key-map", str(key_map), parts="modules")
    assert status == 1
    findings = payload["findings"]
    assert sorted(findings["missing"]) == sorted(k for k in truth if k not in partial)
    assert len(findings["loaded"]) == len(partial)
    rows = _module_rows(payload, "eval")
    failing = {r["module"] for r in rows if not r["passed"] and r["mode"] != "accumulated"}
    assert failing == {f"decoder.dec_score_head.{i}" for i in range(3)}, failing
    heads = [r for r in rows if r["module"].startswith("decoder.dec_score_head.")]
    assert {r["reason"] for r in heads} == {"2 of its tensors were not loaded into the port; "
                                            "not compared"}
    backbone = [r for r in rows if r["module"].startswith("backbone.") and r["mode"] == "isolated"]
    assert len(backbone) > 100 and all(r["passed"] for r in backbone)
    assert {r["paired_by"] for r in backbone} == {"key map", "call order"}
    assert all(r["port_module"].startswith("net.body.") for r in backbone)


def test_a_stray_detach_is_caught_by_the_gradients_not_by_the_forward(tmp_path: Path) -> None:
    key_map = write_key_map(_true_key_map("r18vd")[2], tmp_path / "map.json")
    status, payload = _run(tmp_path, "detach", *PORT, "--port", "handmade_rtdetr:build_detached",
                           "--key-map", str(key_map), parts="outputs,modules,training")
    assert status == 1
    forward = [r for r in payload["rows"] if r["kind"] in ("output", "detection", "loss")]
    assert forward and all(r["passed"] for r in forward)
    assert all(m["passed"] for m in payload["modules"])
    failing = {r["path"] for r in payload["rows"] if not r["passed"]}
    assert failing and all(p.startswith("grad.") for p in failing), failing
    assert "grad.encoder.lateral_convs.0.conv.weight" in failing
    assert "grad.backbone.res_layers.3.blocks.1.branch2b.conv.weight" in failing
