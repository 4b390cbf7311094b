"""The console side of the harness on fabricated rows: ``check``'s summary tables, the CSV
writer, and the phase display with its quiet log (no model runs)."""

from __future__ import annotations

import io
import math
import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pandas as pd
import pytest

from parity.bench import format_rows
from parity.check import CheckResult
from parity.cli import format_check, format_trajectory
from parity.compare import Comparison
from parity.modules import ModuleReport, ModuleRow
from parity.progress import Progress, format_seconds, log_file
from parity.tables import text_table, write_csv
from parity.trajectory import Trajectory, TrajectoryStep

# Longer than any column the old fixed-width table gave a name (44 characters).
LONG = "train.decoder.decoder.layers.5.cross_attn.sampling_offsets.weight.transposed_view"


def _value(path: str, rel: float = 1e-7, passed: bool = True, reason: str = "") -> Comparison:
    return Comparison(path, (2, 3), (2, 3), "float32", "float32", max_abs=3 * rel, rel_l2=rel,
                      cosine=1 - rel, within=1.0, passed=passed, reason=reason)


def _gate(path: str, compared: int, flipped: int, passed: bool = True, reason: str = "") -> Comparison:
    # Counted decisions carry no rel L2 (NaN): the table must show their counts instead.
    return Comparison(path, (compared,), (compared,), "bool", "bool", max_abs=2e-6 * flipped,
                      within=1 - flipped / compared, passed=passed, reason=reason,
                      compared=compared, flipped=flipped, forced=flipped, band=0.01)


def _result() -> CheckResult:
    result = CheckResult("r18vd", "seeded:0", 640)
    result.add("output", [_value("pred_logits"), _value(LONG)])
    result.add("loss", [_value("loss_vfl", 2e-6)])
    result.precision_floor["loss_vfl"] = 7.1e-5
    # A plain index comparison (no counts of its own): 3 of 300 indices differ inside ties.
    result.add("decision", [Comparison("eval.decoder.topk_ind", (1, 300), (1, 300), "int64",
                                       "int64", max_abs=4.8e-7, rel_l2=math.nan, cosine=math.nan,
                                       within=0.99, passed=True, reason="ties within 1e-05")])
    result.add("decision", [_gate(f"train.relu_gate.backbone.res_layers.{i}.act", 1000, i)
                            for i in range(4)])
    result.add("decision", [_gate("train.sample_cell.decoder.decoder.layers.2.cross_attn", 500, 9,
                                  passed=False, reason="9 forced > 4 allowed")])
    # 200 gradients with three failures, 60 EMA rows all passing.
    result.add("grad", [_value(f"grad.backbone.block{i}.weight", rel=1e-6 + i * 1e-9,
                               passed=i not in (7, 50, 120),
                               reason="" if i not in (7, 50, 120) else f"rel L2 big at {i}")
                        for i in range(200)])
    result.add("ema", [_value(f"ema_delta[2000].{LONG}.{i}", rel=1e-7) for i in range(60)])
    return result


def _lines_with(text: str, needle: str) -> list[str]:
    return [line for line in text.splitlines() if needle in line]


def test_check_summary_keeps_every_name_whole() -> None:
    text = format_check(_result())
    assert _lines_with(text, LONG), "the long output path is missing or cut"
    assert _lines_with(text, "train.sample_cell.decoder.decoder.layers.2.cross_attn")
    assert _lines_with(text, "grad.backbone.block120.weight")
    # Every row whose name appears ends in its whole name, never a cut tail.
    assert not re.search(r"(^|\s)[a-z_]*\.decoder\.layers\.5\.cross_attn\.sampling_offsets\.weight"
                         r"\.transposed_view\b", text.replace(LONG, ""))


def test_decision_rows_show_counts_not_nan() -> None:
    text = format_check(_result())
    assert "nan" not in text.lower()
    gates = _lines_with(text, "train.relu_gate ")
    assert len(gates) == 1, text
    cells = gates[0].split()
    # family, kind, rows, failed, compared, flipped, forced, band, max gap, largest gap at, status
    assert cells[1:7] == ["decision", "4", "0", "4000", "6", "6"]
    topk = _lines_with(text, "eval.decoder.topk_ind")
    assert topk and topk[0].split()[4:6] == ["300", "3"]  # compared from the shape, flips from within
    # The failing decision is listed on its own with its reason.
    failing = _lines_with(text, "9 forced > 4 allowed")
    assert any(line.startswith("train.sample_cell.decoder.decoder.layers.2.cross_attn")
               for line in failing)


def test_per_parameter_rows_are_summarised_with_failures_listed() -> None:
    text = format_check(_result(), failures_per_kind=2)
    grad = [line for line in text.splitlines() if line.startswith("grad ")]
    assert len(grad) == 1 and grad[0].split()[1:4] == ["200", "197", "3"]
    assert "largest rel L2 of" in text
    # The summary's worst gradient is a failing one; two failures listed, the third counted.
    assert grad[0].split()[4] == "grad.backbone.block120.weight"
    assert _lines_with(text, "rel L2 big at 7") and _lines_with(text, "rel L2 big at 50")
    assert "... 1 more failing grad rows" in text
    ema = [line for line in text.splitlines() if line.startswith("ema ")]
    assert len(ema) == 1 and ema[0].split()[1:4] == ["60", "60", "0"]
    # Passing per-parameter rows stay in the files: no line for an ordinary gradient.
    assert not _lines_with(text, "grad.backbone.block3.weight")
    assert len(text.splitlines()) < 40


def test_trajectory_bench_and_module_tables_through_pandas() -> None:
    values = dict(step=1, torch_loss=33.778, jittor_loss=33.7779, float64_loss=33.7780,
                  loss_rel_diff=1.6e-6, loss_floor=1.3e-6, weights_rel_l2=7.6e-7,
                  max_param_rel_l2=5.6e-6, max_param=LONG, max_param_floor=3.5e-6,
                  worst_excess=0.0, tie_flips=36, tie_forced=36, tie_max_gap=1e-5,
                  seconds_torch=1.0, seconds_jittor=2.0)
    # Counters added to a step later start at zero here.
    step = TrajectoryStep(**{f.name: values.get(f.name, 0) for f in fields(TrajectoryStep)})
    text = format_trajectory(Trajectory("r18vd", (128, 192), 2, steps=[step]))
    header, row = text.splitlines()
    assert header.split()[:3] == ["step", "torch", "loss"] and "float64 loss" in header
    assert LONG in row and row.split()[:4] == ["1", "33.77800", "33.77790", "33.77800"]
    bench = format_rows([{"task": "eval", "variant": "r18vd", "device": "cpu", "batch": 1, "size": 640,
                          "torch_s": 0.5, "jittor_s": 0.7, "time_ratio": 1.4,
                          "torch_peak_mb": 900.0, "jittor_peak_mb": 1200.0, "mem_ratio": 1.33}])
    assert bench.splitlines()[1].split() == ["eval", "r18vd", "cpu", "1", "640", "0.500", "0.700",
                                             "1.40", "900", "1200", "1.33"]
    report = ModuleReport("r18vd", "eval", (1, 3, 64, 64))
    report.rows.append(ModuleRow(LONG, "isolated", "module",
                                 _value(f"{LONG} -> out", 0.5, False, "rel L2 0.5 > 1e-05"), 1, 2))
    table = report.format_table(only_failures=True)
    assert f"{LONG} -> out" in table and "FAIL: rel L2 0.5 > 1e-05" in table


def test_text_table_shows_missing_values_as_dashes() -> None:
    frame = pd.DataFrame({"name": ["a", "bb"], "n": [3, None], "x": [math.nan, 0.25]})
    lines = text_table(frame, {"n": "d", "x": ".2f"}).splitlines()
    assert lines == ["name n    x", "a    3    -", "bb   - 0.25"]
    assert text_table(frame.iloc[:0]) == "(no rows)"


def test_csv_is_written_by_pandas_and_atomically(tmp_path, monkeypatch) -> None:
    path = tmp_path / "rows.csv"
    write_csv(path, [{"path": LONG, "rel_l2": 1e-7}, {"path": "b", "rel_l2": 0.5, "extra": True}])
    frame = pd.read_csv(path)
    assert list(frame.columns) == ["path", "rel_l2", "extra"]
    assert frame["path"].tolist() == [LONG, "b"] and frame["rel_l2"].tolist() == [1e-7, 0.5]
    before = path.read_bytes()

    def half_written(self, target, **kwargs):
        Path(target).write_text("path,rel_l2\npartial")
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", half_written)
    with pytest.raises(OSError, match="disk full"):
        write_csv(path, [{"path": "new", "rel_l2": 1.0}])
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.csv"]  # no temporary left


def test_no_csv_module_writer_in_the_harness() -> None:
    harness = Path(__file__).parent
    for source in harness.glob("*.py"):
        if source.name.startswith("test_"):
            continue
        text = source.read_text()
        assert "csv.writer" not in text and "DictWriter" not in text, source.name


def test_progress_prints_one_line_per_phase_and_estimates_time_left(tmp_path) -> None:
    history = tmp_path / "times.json"
    for run in range(2):
        screen = io.StringIO()
        with Progress(["build", "compare"], history=history, key="k", screen=screen) as progress:
            progress.phase("build")
            progress.phase("compare", total=3)
            for _ in range(3):
                progress.advance()
        lines = screen.getvalue().splitlines()
        assert [line.split(" ... ")[0] for line in lines] == ["[1/2] build", "[2/2] compare"]
        assert all(re.search(r" \.\.\. done in \d+\.\d s", line) for line in lines)
        # The second run knows the first run's phase times: the first phase says what is left.
        assert ("left)" in lines[0]) == (run == 1)
    with pytest.raises(ValueError, match="unknown phase 'other'"):
        with Progress(["build"], screen=io.StringIO()) as progress:
            progress.phase("other")
    assert format_seconds(185) == "3 min 05 s"


# A command with a quiet phase, run as its own process so that its sys.stdout is descriptor 1.
_QUIET_COMMAND = """
import os, subprocess, sys
from pathlib import Path
from parity.progress import Progress
with Progress(["noisy"], log=Path(sys.argv[1])) as progress:
    progress.phase("noisy")
    os.write(1, b"[i 1206 compiler.cc:1] fd one\\n")
    os.write(2, b"[w 1206 compiler.cc:2] fd two\\n")
    print("python print")
    subprocess.run([sys.executable, "-c", "print('child process')"], check=True)
print("after the block")
"""


def test_quiet_phases_send_child_and_c_level_output_to_the_log(tmp_path) -> None:
    log = tmp_path / "logs" / "check.log"
    done = subprocess.run([sys.executable, "-c", _QUIET_COMMAND, str(log)], capture_output=True,
                          text=True, check=True, cwd=Path(__file__).parents[1])
    logged = log.read_text()
    for text in ("fd one", "fd two", "python print", "child process"):
        assert text in logged
        assert text not in done.stdout + done.stderr
    assert done.stdout.splitlines()[0].startswith("[1/1] noisy ... done in")
    assert done.stdout.splitlines()[-1] == "after the block"


def test_quiet_failure_marks_the_phase_and_shows_the_log_tail(tmp_path, capfd) -> None:
    screen = io.StringIO()
    with pytest.raises(RuntimeError, match="kernel failed"):
        with Progress(["compile"], log=tmp_path / "x.log", screen=screen) as progress:
            progress.phase("compile")
            os.write(2, b"[e compiler.cc:9] undefined symbol\n")
            raise RuntimeError("kernel failed")
    shown = screen.getvalue()
    assert "[1/1] compile ... FAILED after" in shown
    assert "undefined symbol" in shown and str(tmp_path / "x.log") in shown
    assert "undefined symbol" not in capfd.readouterr().err


def test_log_files_are_new_per_run_and_old_ones_pruned(tmp_path) -> None:
    for i in range(5):
        (tmp_path / f"check-2026010{i}T000000.000000Z.log").write_text("old")
    path = log_file("check", tmp_path, keep=3)
    assert path.parent == tmp_path and path.name.startswith("check-") and not path.exists()
    assert len(list(tmp_path.glob("check-*.log"))) == 2  # two kept, the new one makes three
