"""``rtdetr-parity check`` end to end at a small size: the table, the files, the exit status."""

from __future__ import annotations

import csv
import json

import pytest

import parity.models
from parity.cli import build_parser, main
from rtdetr_common.configs import format_size

# Non-square eval and module images, the train-loss images of the other orientation (96 x 160
# holds 315 anchors, enough for the 300 queries).
SMALL = ["--variant", "r18vd", "--size", "96", "160", "--train-size", "160", "96",
         "--module-size", "96", "160", "--training-size", "128", "--steps", "2"]
# A Jittor-side fault for the check to find: one backbone convolution's weights 1% too large.
FAULTY = "backbone.res_layers.1.blocks.0.branch2a.conv.weight"


def test_check_runs_every_part_and_writes_results(tmp_path, capsys) -> None:
    assert main(["check", *SMALL, "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    for text in ("loss_vfl", "modules: r18vd eval", "modules: r18vd train", "first failure: none",
                 "largest rel L2 of", "0 failed; module rows failed: 0"):
        assert text in printed
    for name in ("check_r18vd.csv", "modules_r18vd_eval.csv", "modules_r18vd_train.csv",
                 "trajectory_r18vd.csv"):
        assert (tmp_path / name).stat().st_size > 0
    payload = json.loads((tmp_path / "check_r18vd.json").read_text())
    assert payload["passed"] is True
    assert payload["size"] == [96, 160]
    assert [m["input_shape"] for m in payload["modules"]] == [[1, 3, 96, 160]] * 2
    assert {r["kind"] for r in payload["rows"]} >= {"output", "decision", "detection", "loss",
                                                    "grad", "step", "ema", "buffer.step",
                                                    "trajectory"}
    assert [m["mode"] for m in payload["modules"]] == ["eval", "train"]
    assert len(payload["trajectory"]["steps"]) == 2
    assert f"trajectory: {format_size(payload['trajectory']['size'])}, batch 2" in printed
    assert payload["known_divergences"] == []  # r18vd has none
    assert payload["tolerances"]


def test_check_fails_and_names_the_faulty_module(tmp_path, capsys, monkeypatch) -> None:
    build_pair = parity.models.build_pair

    def faulty_pair(*args, **kwargs):
        pair = build_pair(*args, **kwargs)
        params = dict(pair.jittor_model.named_parameters())
        params[FAULTY].assign(params[FAULTY] * 1.01)
        return pair

    monkeypatch.setattr(parity.models, "build_pair", faulty_pair)
    assert main(["check", *SMALL, "--parts", "outputs,modules", "--out", str(tmp_path)]) == 1
    printed = capsys.readouterr().out
    module = FAULTY.rsplit(".", 1)[0]
    assert f"first failure: {module} isolated [module]: rel L2" in printed
    assert not json.loads((tmp_path / "check_r18vd.json").read_text())["passed"]


def test_check_rejects_unknown_parts(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["check", "--parts", "outputs,speed"])
    assert exc.value.code == 2
    assert "unknown part(s) ['speed']" in capsys.readouterr().err


@pytest.mark.parametrize("values, expected", [
    (["640"], 640),
    (["480", "640"], (480, 640)),
    (["100"], "image sides must be positive multiples of 32, got '100'"),
    (["0"], "image sides must be positive multiples of 32, got '0'"),
    (["-32"], "image sides must be positive multiples of 32, got '-32'"),
    (["3.2e1"], "image sides must be positive multiples of 32, got '3.2e1'"),
    (["32", "64", "96"], "expected one size S (S x S) or two sides H W, got 3 values"),
])
@pytest.mark.parametrize("flag", ["--size", "--train-size", "--module-size", "--training-size"])
def test_check_sizes_are_one_side_or_height_and_width(flag: str, values: list[str],
                                                      expected: int | tuple | str,
                                                      capsys) -> None:
    if isinstance(expected, str):
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args(["check", flag, *values])
        assert exc.value.code == 2
        assert f"argument {flag}: {expected}" in capsys.readouterr().err
    else:
        args = build_parser().parse_args(["check", flag, *values])
        assert getattr(args, flag[2:].replace("-", "_")) == expected


def _write_run(folder, losses: list[float], aps: list[float]) -> None:
    folder.mkdir()
    lines = [{"kind": "train", "epoch": 0, "step": i, "loss": loss, "seconds": 1.0}
             for i, loss in enumerate(losses)]
    lines += [{"kind": "eval", "epoch": e, **{m: ap for m in ("AP", "AP50", "AP75", "APs", "APm", "APl")}}
              for e, ap in enumerate(aps)]
    (folder / "log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_compare_runs_checks_first_steps_and_final_ap(tmp_path, capsys) -> None:
    losses = [20.0 - 0.5 * i for i in range(25)]
    _write_run(tmp_path / "torch", losses, [0.30, 0.60])
    _write_run(tmp_path / "close", [x * (1 + 5e-4) for x in losses], [0.31, 0.605])
    _write_run(tmp_path / "far", losses[:3] + [losses[3] * 1.01] + losses[4:], [0.30, 0.585])
    assert main(["compare-runs", str(tmp_path / "torch"), str(tmp_path / "close")]) == 0
    assert "final AP within 1 points (0.50)" in capsys.readouterr().out
    assert main(["compare-runs", str(tmp_path / "torch"), str(tmp_path / "far")]) == 1
    printed = capsys.readouterr().out
    assert "FAIL: total loss differs by more than 0.001 relative at steps [3]" in printed
    assert "FAIL: final AP differs by 1.50 points > 1" in printed
    assert main(["compare-runs", str(tmp_path / "torch"), str(tmp_path / "missing")]) == 2
    assert "training log not found" in capsys.readouterr().err


def test_compare_runs_control_reports_the_reference_spread_without_changing_the_verdict(
        tmp_path, capsys) -> None:
    losses = [20.0 - 0.5 * i for i in range(25)]
    _write_run(tmp_path / "torch", losses, [0.30, 0.60])
    _write_run(tmp_path / "far", losses[:3] + [losses[3] * 1.01] + losses[4:], [0.30, 0.585])
    control = losses[:5] + [losses[5] * 1.02] + losses[6:]
    _write_run(tmp_path / "control", control[:22], [0.31, 0.58])
    args = ["compare-runs", str(tmp_path / "torch"), str(tmp_path / "far"),
            "--control", str(tmp_path / "control"), "--out", str(tmp_path / "report")]
    assert main(args) == 1
    printed = capsys.readouterr().out
    assert "FAIL: total loss differs by more than 0.001 relative at steps [3]" in printed
    assert ("first 20 steps' worst total-loss rel diff 2.00e-02 at step 5 (larger than the "
            "test's at 1 of 20 steps), final AP 2.00 points from the reference") in printed
    assert "60.00/58.50/58.00" in printed
    assert "step time summed over the 22 common steps" in printed
    with open(tmp_path / "report" / "runs_steps.csv") as f:
        steps = list(csv.DictReader(f))
    assert len(steps) == 22 and float(steps[5]["control_rel_diff"]) == pytest.approx(0.02)
    with open(tmp_path / "report" / "runs_epochs.csv") as f:
        assert [float(e["AP_control"]) for e in csv.DictReader(f)] == [0.31, 0.58]
