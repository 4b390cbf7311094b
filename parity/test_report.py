"""``rtdetr-parity report``: regeneration from stored data, the report answering its data,
the browser rendering, and the folder's atomic replacement and errors.

The default-tier tests work on the committed ``reports/r18vd`` data (no model runs); the slow
tier measures a small report end to end.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from parity.cli import main
from parity.report import ROOT, framework_differences, read_table, write_report
from parity.report_render import index_text, render

COMMITTED = ROOT / "reports" / "r18vd"
needs_committed = pytest.mark.skipif(not (COMMITTED / "data" / "meta.json").is_file(),
                                     reason="no committed reports/r18vd (run bash scripts/main.sh)")


def _copy_report(tmp_path: Path, name: str = "source") -> Path:
    """A copy of the committed report's data in a fresh folder (no rendered files)."""
    folder = tmp_path / name
    shutil.copytree(COMMITTED / "data", folder / "data")
    return folder


def _regenerate(source: Path, out: Path, *extra: str) -> dict:
    """``report --from source --out out``; its exit status follows the verdict (1: fail)."""
    status = main(["report", "--from", str(source), "--out", str(out), *extra])
    summary = json.loads((out / "summary.json").read_text())
    assert status == (1 if summary["verdict"] == "fail" else 0)
    return summary


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory) -> Path:
    """The committed r18vd report regenerated from its data by the command, into a new folder."""
    out = tmp_path_factory.mktemp("regenerated") / "r18vd"
    _regenerate(COMMITTED, out)
    return out


@needs_committed
def test_from_reproduces_the_committed_report(regenerated: Path) -> None:
    assert (regenerated / "report.md").read_bytes() == (COMMITTED / "report.md").read_bytes()
    assert (regenerated / "summary.json").read_bytes() == (COMMITTED / "summary.json").read_bytes()
    pngs = sorted(p.name for p in COMMITTED.glob("*.png"))
    assert pngs and pngs == sorted(p.name for p in regenerated.glob("*.png"))
    for name in pngs:  # the plots are deterministic too
        assert (regenerated / name).read_bytes() == (COMMITTED / name).read_bytes(), name
    # The index beside the regenerated report links it with its verdict.
    summary = json.loads((regenerated / "summary.json").read_text())
    index = (regenerated.parent / "README.md").read_text()
    assert "[r18vd](r18vd/report.md)" in index and summary["verdict_line"] in index


@needs_committed
def test_committed_index_is_generated() -> None:
    assert (ROOT / "reports" / "README.md").read_text() == index_text(ROOT / "reports")


@needs_committed
def test_report_shows_every_section_with_its_verdict(regenerated: Path) -> None:
    md = (regenerated / "report.md").read_text()
    summary = json.loads((regenerated / "summary.json").read_text())
    titles = [s["title"] for s in summary["sections"]]
    assert titles == ["Port under test", "Outputs and detections", "Module map", "Decisions",
                      "Losses, gradients, optimizer step, EMA, BatchNorm buffers", "Trajectory",
                      "Training comparison", "Speed and memory", "Fault catalogue",
                      "Known divergences and framework differences"]
    assert md.index(f"**Verdict: {summary['verdict_line']}**") < md.index("## Outputs and detections")
    for s in summary["sections"]:
        assert s["verdict"] in ("pass", "fail", "inconclusive", "not run")
        assert f"## {s['title']}" in md
        assert f"**Verdict: {s['verdict']}**" in md
    for title in summary["reference_sections"]:
        assert f"## {title}" in md
    for png in regenerated.glob("*.png"):  # every plot beside the report is shown
        assert f"]({png.name})" in md
    # Tables are tidy CSVs, and every decision row shows its counts (no empty compared cell).
    checks = read_table(regenerated / "data", "checks")
    decisions = checks[checks["kind"] == "decision"]
    assert len(decisions) and decisions["compared"].notna().all()
    assert decisions["flipped"].notna().all() and decisions["band"].notna().all()


def _module_line(md: str, module: str) -> list[str]:
    """The cells of a module's row in the module map table."""
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 2 and cells[1] == module and (cells[0].isdigit() or cells[0] == "order"):
            return cells
    raise AssertionError(f"no module-map row of {module}")


@needs_committed
@pytest.mark.parametrize("nightly, section, top", [
    ("inconclusive", "inconclusive", "inconclusive"), ("different", "fail", "fail")])
def test_an_undecided_training_comparison_is_inconclusive_not_a_pass_or_a_fail(
        tmp_path: Path, nightly: str, section: str, top: str) -> None:
    """The nightly's verdict reaches the report as it is: inconclusive (too few seeds to
    decide) is neither a pass nor a fail, and makes the top verdict inconclusive; different
    fails."""
    source = _copy_report(tmp_path)
    path = source / "data" / "nightly_summary.json"
    summary = json.loads(path.read_text())
    summary["verdict"], summary["verdict_line"] = nightly, f"{nightly}: measured"
    path.write_text(json.dumps(summary))
    after = _regenerate(source, tmp_path / "out")
    verdicts = {s["key"]: s["verdict"] for s in after["sections"]}
    assert verdicts["training-comparison"] == section
    assert after["verdict"] == top and after["verdict_line"].startswith(top.upper())
    assert "Training comparison" in after["verdict_line"]


@needs_committed
@pytest.mark.parametrize("slowed, factor, section", [
    ("none", 1.0, "pass"),             # every ratio near 1
    ("slowest", 4.0, "inconclusive"),  # one slow Jittor run: the runs' spread straddles the limit
    ("all", 3.0, "fail")])             # every Jittor run three times slower: beyond the spread
def test_the_speed_verdict_weighs_the_runs_spread(tmp_path: Path, slowed: str, factor: float,
                                                 section: str) -> None:
    """Timed runs are set (torch 1.00, 1.05, ... s; Jittor 1.00, 1.03, ... s, equal memory),
    then the training task's Jittor runs are slowed (all of them, or the slowest only): the
    speed section passes, is undecided, or fails against its time limit accordingly."""
    source = _copy_report(tmp_path)
    times = pd.read_csv(source / "data" / "bench_times.csv")
    bench = pd.read_csv(source / "data" / "bench.csv")
    for framework, step in (("torch", 0.05), ("jittor", 0.03)):
        mine = times["framework"] == framework
        times.loc[mine, "seconds"] = 1.0 + step * (times.loc[mine, "rep"] - 1)
    jittor_train = (times["task"] == "train") & (times["framework"] == "jittor")
    if slowed == "all":
        times.loc[jittor_train, "seconds"] *= factor
    elif slowed == "slowest":
        times.loc[times.loc[jittor_train, "seconds"].idxmax(), "seconds"] *= factor
    for index, row in bench.iterrows():
        task = (times["task"] == row["task"]) & (times["size"] == row["size"])
        th = times.loc[task & (times["framework"] == "torch"), "seconds"]
        jt = times.loc[task & (times["framework"] == "jittor"), "seconds"]
        bench.loc[index, ["torch_min_s", "jittor_min_s", "torch_median_s", "jittor_median_s"]] = (
            th.min(), jt.min(), th.median(), jt.median())
        bench.loc[index, ["time_ratio", "median_ratio"]] = (jt.min() / th.min(), jt.median() / th.median())
    bench["jittor_peak_mb"] = bench["torch_peak_mb"]
    bench["mem_ratio"] = 1.0
    times.to_csv(source / "data" / "bench_times.csv", index=False)
    bench.to_csv(source / "data" / "bench.csv", index=False)
    after = _regenerate(source, tmp_path / "out")
    verdicts = {s["key"]: s["verdict"] for s in after["sections"]}
    assert verdicts["speed-and-memory"] == section
    report = (tmp_path / "out" / "report.md").read_text()
    assert ("undecided: train" in report) == (section == "inconclusive")


@needs_committed
def test_a_perturbed_measurement_changes_cells_and_verdicts(tmp_path: Path, regenerated: Path) -> None:
    source = _copy_report(tmp_path)
    modules = pd.read_csv(source / "data" / "modules.csv")
    target = modules[(modules["pass"] == "eval") & (modules["mode"] == "isolated")
                     & (modules["kind"] == "module")
                     & modules["module"].str.startswith("encoder.")].iloc[0]
    module = target["module"]
    assert (modules["module"] == module).sum() >= 2  # the module has other rows too
    modules.loc[target.name, "rel_l2"] = 0.0123  # one module's isolated error, nothing else
    modules.to_csv(source / "data" / "modules.csv", index=False, lineterminator="\n")
    out = tmp_path / "perturbed"
    _regenerate(source, out)

    before_md, after_md = (regenerated / "report.md").read_text(), (out / "report.md").read_text()
    before = json.loads((regenerated / "summary.json").read_text())
    after = json.loads((out / "summary.json").read_text())
    sections = {s["key"]: s for s in after["sections"]}
    # The top verdict and the section verdict follow the one changed number.
    assert [s["verdict"] for s in before["sections"] if s["key"] == "modules"] == ["pass"]
    assert sections["modules"]["verdict"] == "fail"
    assert after["verdict"] == "fail" and after["verdict_line"] != before["verdict_line"]
    assert after["verdict_line"].startswith("FAIL") and "first failure: Module map" in after["verdict_line"]
    assert module in sections["modules"]["first_failure"] and "0.0123" in sections["modules"]["first_failure"]
    assert f"**Verdict: {after['verdict_line']}**" in after_md
    # Other sections keep their verdicts.
    for s in before["sections"]:
        if s["key"] != "modules":
            assert sections[s["key"]]["verdict"] == s["verdict"], s["key"]
    # The module's cells: its eval isolated error and its status.
    old, new = _module_line(before_md, module), _module_line(after_md, module)
    header = _module_line(before_md, "module")  # the header row
    col = header.index("eval isolated")
    assert new[col] == "0.0123" and old[col] != new[col]
    assert old[-1] == "ok" and new[-1] == "FAIL"
    # The depth plot marks the new first divergence.
    assert (out / "module_depth.png").read_bytes() != (regenerated / "module_depth.png").read_bytes()


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


# Appended to a copy of report.html: after load, writes the width of every image and the
# visible section headings into the page, for --dump-dom.
PROBE = """<script>
window.addEventListener('load', () => {
  const out = document.createElement('pre');
  out.id = 'probe';
  out.textContent = JSON.stringify({
    images: [...document.images].map(i => i.naturalWidth),
    headings: [...document.querySelectorAll('h2')]
      .filter(h => h.getBoundingClientRect().height > 0).map(h => h.textContent),
    external: [...document.querySelectorAll('[src],[href]')]
      .map(e => e.getAttribute('src') || e.getAttribute('href'))
      .filter(u => /^(https?:)?\\/\\//.test(u))});
  document.body.appendChild(out);
});
</script>"""


def _browser(*args: str) -> subprocess.CompletedProcess:
    command = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               "--virtual-time-budget=10000", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


@needs_committed
@pytest.mark.skipif(_chromium() is None, reason="no chromium binary (bash scripts/setup.sh installs "
                                                  "Debian's chromium)")
def test_html_renders_in_headless_chromium(regenerated: Path, tmp_path: Path) -> None:
    from PIL import Image as PILImage

    page = (regenerated / "report.html").read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing external
    summary = json.loads((regenerated / "summary.json").read_text())
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", PROBE + "</body>"))
    dom = _browser("--dump-dom", probe.as_uri())
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom.stdout, re.S)
    assert found, f"the page did not load: {dom.stderr[-2000:]}"
    seen = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    pngs = list(regenerated.glob("*.png"))
    assert len(seen["images"]) == len(pngs) >= 4
    assert all(width > 0 for width in seen["images"]), seen["images"]
    assert seen["external"] == []
    titles = ["Verdict", *(s["title"] for s in summary["sections"]), *summary["reference_sections"]]
    assert seen["headings"] == titles

    shot = tmp_path / "report.png"
    result = _browser("--window-size=1280,2400", f"--screenshot={shot}",
                      (regenerated / "report.html").as_uri())
    assert shot.is_file(), result.stderr[-2000:]
    pixels = np.asarray(PILImage.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (2400, 1280)
    assert pixels.std() > 10  # text, tables and plots, not a blank page
    assert (pixels < 128).mean() > 0.005 and (pixels > 200).mean() > 0.5


@needs_committed
def test_existing_folder_needs_force_and_is_replaced_whole(tmp_path: Path, capsys) -> None:
    source = _copy_report(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier report")
    assert main(["report", "--from", str(source), "--out", str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "an earlier report"
    _regenerate(source, out, "--force")
    assert not (out / "keep.txt").exists() and (out / "report.md").is_file()
    # In place needs --force too, and then regenerates the same report.
    assert main(["report", "--from", str(out)]) == 2
    assert "in place replaces it; pass --force" in capsys.readouterr().err
    md = (out / "report.md").read_bytes()
    _regenerate(out, out, "--force")
    assert (out / "report.md").read_bytes() == md
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_failing_build_leaves_the_old_report(tmp_path: Path) -> None:
    out = tmp_path / "report"
    out.mkdir()
    (out / "report.md").write_text("old")

    def half_then_crash(folder: Path) -> None:
        (folder / "report.md").write_text("half")
        raise RuntimeError("crash while measuring")

    with pytest.raises(RuntimeError, match="crash while measuring"):
        write_report(out, True, half_then_crash)
    assert (out / "report.md").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report"]  # no temporary folder left
    with pytest.raises(FileExistsError, match="--force"):
        write_report(out, False, lambda folder: None)


def test_bad_input_is_named(tmp_path: Path, capsys) -> None:
    assert main(["report", "--variant", "r19vd", "--out", str(tmp_path / "x")]) == 2
    assert "unknown variant(s) ['r19vd']" in capsys.readouterr().err
    assert main(["report", "--from", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "no data folder at" in capsys.readouterr().err
    (tmp_path / "empty" / "data").mkdir(parents=True)
    assert main(["report", "--from", str(tmp_path / "empty"), "--out", str(tmp_path / "x")]) == 2
    assert "has no meta.json" in capsys.readouterr().err
    assert main(["report", "--weights", str(tmp_path / "none.pth"), "--out", str(tmp_path / "x")]) == 2
    assert "no weight file" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_framework_differences_come_from_every_port_module() -> None:
    rows = framework_differences()
    files = {r["file"] for r in rows}
    headed = {f"jittor_impl/{p.name}" for p in (ROOT / "jittor_impl").glob("*.py")
              if "\nDifferences from torch_ref/" in p.read_text()}
    assert files == headed and len(headed) >= 10
    assert all(r["difference"] and "\n" not in r["difference"] for r in rows)
    assert any("grid_sample" in r["difference"] for r in rows if r["file"].endswith("decoder.py"))


@pytest.mark.slow
def test_report_measures_end_to_end(tmp_path: Path) -> None:
    """A small report from scratch: every table in data/, and --from reproduces it."""
    out = tmp_path / "r18vd"
    args = ["report", "--variant", "r18vd", "--size", "96", "160", "--train-size", "160", "96",
            "--module-size", "96", "160", "--training-size", "128", "--steps", "2",
            "--bench", "none", "--faults", "none", "--out", str(out)]
    assert main(args) == 0
    for name in ("checks", "modules", "parameters", "trajectory", "drift", "tolerances", "noise",
                 "known_divergences", "framework_differences"):
        assert read_table(out / "data", name) is not None, name
    summary = json.loads((out / "summary.json").read_text())
    verdicts = {s["key"]: s["verdict"] for s in summary["sections"]}
    assert verdicts["modules"] == verdicts["trajectory"] == "pass"
    assert verdicts["speed-and-memory"] == verdicts["fault-catalogue"] == "not run"
    md = (out / "report.md").read_bytes()
    render(out)
    assert (out / "report.md").read_bytes() == md


def test_the_loss_difference_panel_plots_each_roles_gap_to_torch_per_seed() -> None:
    """The mean over seeds of (role - torch, same seed and step) as the line, the seeds' range
    as the band; a role's own curve never enters another's."""
    from matplotlib.figure import Figure

    from parity.report_plots import COLORS, loss_difference

    loss = {("torch", 0): [5.0, 4.0, 3.0], ("torch", 1): [6.0, 5.0, 4.0],
            ("jittor", 0): [5.0, 4.5, 3.0], ("jittor", 1): [6.0, 5.0, 3.0],
            ("control", 0): [5.0, 4.0, 3.2], ("control", 1): [6.0, 5.0, 4.2]}
    curves = pd.DataFrame([{"role": role, "seed": seed, "kind": "step", "step": step, "loss": value}
                           for (role, seed), values in loss.items() for step, value in enumerate(values)]
                          + [{"role": "torch", "seed": 0, "kind": "epoch", "epoch": 0, "AP": 50.0}])
    ax = Figure().subplots()
    loss_difference(ax, curves, COLORS)
    lines = {line.get_label(): line for line in ax.lines}
    jittor = lines["jittor - torch (mean; shaded: range over 2 seeds)"]
    control = lines["control - torch (mean; shaded: range over 2 seeds)"]
    np.testing.assert_allclose(jittor.get_ydata(), [0.0, 0.25, -0.5])
    np.testing.assert_allclose(control.get_ydata(), [0.0, 0.0, 0.2])
    band = ax.collections[0].get_paths()[0].vertices[:, 1]  # jittor's range: lows then highs
    assert band.min() == pytest.approx(-1.0) and band.max() == pytest.approx(0.5)
