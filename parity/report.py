"""``rtdetr-parity report``: the migration report of one variant.

A report is a folder::

    report.md        the report (renders on a Git forge; PNG plots beside it)
    report.html      the same, one self-contained file (plots embedded)
    *.png            the plots
    summary.json     every section's verdict and the thresholds it was judged against
    data/*.csv       every table the report shows, tidy (pandas)
    data/meta.json   provenance and the run's settings

Making one has two stages. :func:`collect` measures (the parity check, the benchmark, the
fault catalogue) and reads the stored results it reports on (the nightly training comparison,
the tolerance table, the noise derivation, the known divergences, the port's framework
differences) into ``data/``. :func:`parity.report_render.render` then writes everything else
from ``data/`` alone, so ``--from DIR`` regenerates a report from its stored data without
running a model, byte for byte. Reports are built in a temporary sibling folder and renamed
into place (:func:`write_report`); an existing report is replaced only when asked.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from rtdetr_common.signals import install

ROOT = Path(__file__).resolve().parent.parent
# Floats in data/*.csv: 7 significant digits (a report shows 3; a module row is judged again
# from its stored error, next to the check's own verdict).
FLOAT_FORMAT = "%.7g"
# The format of data/ and summary.json; a reader refuses other formats.
REPORT_FORMAT = 1
# Where `rtdetr-parity nightly` leaves the training comparison of its default profile.
NIGHTLY_DIR = ROOT / "reports" / "nightly" / "cpu"
# Where `rtdetr-parity faults --out reports/out` leaves the catalogue's table.
STORED_FAULTS = ROOT / "reports" / "out"
# Packages whose versions the provenance lists.
PACKAGES = ("torch", "jittor", "numpy", "scipy", "pandas", "matplotlib", "pycocotools",
            "safetensors", "tabulate")


# The phases of a report, in order: the name collect() announces and the screen's label.
PHASES = {"load": "load PyTorch and Jittor",
          "outputs": "outputs, decisions, losses",
          "modules": "every module, eval and train",
          "training": "gradients, optimizer step, trajectory",
          "faults": "fault catalogue (fast tier)",
          "bench": "benchmark (each framework in its own process)",
          "render": "write report.md, report.html, plots"}


@dataclass(frozen=True)
class BenchPlan:
    """Which benchmark the report runs: a name, its specs and repetitions."""

    name: str
    specs: tuple  # of parity.bench.BenchSpec
    warmup: int
    reps: int


def bench_plan(name: str, variant: str) -> BenchPlan | None:
    """The benchmark of a report: ``quick`` (eval at 320 and a training step at 256 of the
    report's variant, one warm-up and three timed runs), ``default`` (``rtdetr-parity bench``'s
    specs and repetitions) or ``none``."""
    from .bench import DEFAULT_SPECS, BenchSpec

    if name == "none":
        return None
    if name == "quick":
        return BenchPlan(name, (BenchSpec("eval", variant, 1, 320), BenchSpec("train", variant, 2, 256)),
                         warmup=1, reps=3)
    if name == "default":
        return BenchPlan(name, tuple(DEFAULT_SPECS), warmup=2, reps=5)
    raise ValueError(f"unknown benchmark {name!r}; choose from quick, default, none")


def run_bench(plan: BenchPlan) -> tuple[list[dict], list[dict]]:
    """Times every task of ``plan`` in both frameworks, each in a fresh process.

    Returns:
        One row per task (median and best time of each framework, their ratios, peak RSS and
        its ratio; ``time_ratio`` is of the best times, the least disturbed by other work on
        the machine), and one row per timed run (``framework``, ``task``, ``rep``, ``seconds``).
    """
    from .bench import run_child

    rows, times = [], []
    for spec in plan.specs:
        task = {"task": spec.task, "variant": spec.variant, "batch": spec.batch, "size": spec.size}
        th = run_child("torch", spec, plan.warmup, plan.reps)
        jt = run_child("jittor", spec, plan.warmup, plan.reps)
        for side in (th, jt):
            times += [{**task, "framework": side["framework"], "rep": i + 1, "seconds": s}
                      for i, s in enumerate(side["times_s"])]
        rows.append({**task, "torch_min_s": min(th["times_s"]), "jittor_min_s": min(jt["times_s"]),
                     "time_ratio": min(jt["times_s"]) / min(th["times_s"]),
                     "torch_median_s": th["median_s"], "jittor_median_s": jt["median_s"],
                     "median_ratio": jt["median_s"] / th["median_s"],
                     "torch_peak_mb": th["peak_rss_mb"], "jittor_peak_mb": jt["peak_rss_mb"],
                     "mem_ratio": jt["peak_rss_mb"] / th["peak_rss_mb"]})
    return rows, times


@dataclass
class ReportSettings:
    """What one report measures and reads.

    Attributes:
        variant: Official variant name.
        check: The ``rtdetr-parity check`` options (an ``argparse.Namespace`` of that parser).
        bench: ``quick``, ``default`` or ``none`` (see :func:`bench_plan`).
        faults: ``run`` (the fast tier of the catalogue at its default size), ``stored`` (the
            table ``rtdetr-parity faults`` left in ``reports/out``, when there) or ``none``.
        nightly: Folder of a ``rtdetr-parity nightly`` result, or None.
        command: The command line that made the report.
    """

    variant: str
    check: argparse.Namespace
    bench: str = "quick"
    faults: str = "stored"
    nightly: Path | None = NIGHTLY_DIR
    command: str = ""


# --- data/ -------------------------------------------------------------------------------

def write_table(data: Path, name: str, rows: list[dict] | pd.DataFrame,
                columns: list[str] | None = None) -> None:
    """Writes one tidy table as ``data/<name>.csv`` (pandas). ``columns`` orders the columns
    (others follow) and heads an empty table."""
    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    if columns is not None:
        frame = frame.reindex(columns=list(dict.fromkeys([*columns, *frame.columns])))
    frame.to_csv(data / f"{name}.csv", index=False, lineterminator="\n", float_format=FLOAT_FORMAT)


def read_table(data: Path, name: str) -> pd.DataFrame | None:
    """Reads ``data/<name>.csv`` as written by :func:`write_table`, or None when absent.

    Floats are parsed to the same doubles that were written; empty text cells are ``""``.
    """
    path = data / f"{name}.csv"
    if not path.is_file():
        return None
    frame = pd.read_csv(path, float_precision="round_trip")
    for col in frame.columns:
        if frame[col].dtype == object or str(frame[col].dtype).startswith("str"):
            frame[col] = frame[col].fillna("").astype(str)
    return frame


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    return str(value)


def write_json(path: Path, payload: Any) -> None:
    """Writes JSON with a fixed layout (indent 1, keys in insertion order, trailing newline)."""
    path.write_text(json.dumps(payload, indent=1, default=_json_default, allow_nan=True) + "\n")


# The columns of data/checks.csv (the metrics of parity.compare.Comparison a report shows).
CHECK_COLUMNS = ("kind", "path", "shape_ref", "max_abs", "max_rel", "rel_l2", "cosine", "passed",
                 "reason", "compared", "flipped", "forced", "band", "precision_floor")


def _decision_counts(c) -> tuple[int | None, int | None, int | None, float | None]:
    """``(compared, flipped, forced, band)`` of a decision row the check did not count itself
    (a top-k selection, a denoising group, detection labels): its elements, how many differ
    (from the row's own message), how many the check forced (it forces a differing top-k), and
    the tie band of its tolerance entry."""
    from .tolerances import tolerance

    compared = int(math.prod(c.shape_ref)) if c.shape_ref else None
    found = re.match(r"(\d+) of (\d+) indices differ", c.reason or "")
    if found:
        flipped = int(found.group(1))
    elif c.passed and c.max_abs == 0:
        flipped = 0
    else:
        flipped = None
    forced = flipped if c.path.endswith("topk_ind") else 0 if flipped == 0 else None
    return compared, flipped, forced, tolerance("decision", c.path).atol


def _check_rows(result) -> list[dict]:
    rows = []
    for r in result.rows:
        c = r.comparison
        row = {"kind": r.kind, **c.as_row(),
               "precision_floor": result.precision_floor.get(c.path, c.floor)}
        floor = re.search(r"fp32 floor (\d[\d.]*(?:e[-+]?\d+)?)", c.reason or "")
        if r.kind == "loss" and row["precision_floor"] is None and floor:
            row["precision_floor"] = float(floor.group(1))  # as the check's message gives it
        if (r.kind == "decision" or c.path.endswith(".labels")) and c.compared is None:
            row["compared"], row["flipped"], row["forced"], row["band"] = _decision_counts(c)
        rows.append({k: row.get(k) for k in CHECK_COLUMNS})
    return rows


def _module_rows(reports: list) -> tuple[list[dict], list[dict]]:
    """Every module comparison (one row per leaf), and one row per module check run."""
    rows, runs = [], []
    for report in reports:
        for r in report.rows:
            c = r.comparison
            rows.append({"pass": report.mode, "module": r.module, "mode": r.mode, "kind": r.kind,
                         "path": c.path, "shape": "x".join(map(str, c.shape_ref)),
                         "dtype": c.dtype_ref, "max_abs": c.max_abs, "rel_l2": c.rel_l2,
                         "cosine": c.cosine, "passed": c.passed, "reason": c.reason,
                         "start": r.start, "end": r.end})
        runs.append({"pass": report.mode, "input_shape": "x".join(map(str, report.input_shape)),
                     "isolation": report.isolation, "calls": len(report.calls),
                     "rows": len(report.rows), "notes": " | ".join(report.notes),
                     **{f"seconds_{k}": v for k, v in report.seconds.items()},
                     **{f"memory_mb_{k}": v for k, v in report.memory_mb.items()}})
    return rows, runs


def _drift_rows(trajectory) -> list[dict]:
    """Per step and parameter: the port's weight drift from the reference and the reference's
    own fp32 drift from its float64 replay (both relative L2)."""
    return [{"step": step.step, "parameter": name, "drift": d, "floor": f}
            for step, drift in zip(trajectory.steps, trajectory.drift)
            for name, (d, f) in drift.items()]


def _divergence_rows(result) -> list[dict]:
    """Every known divergence of the file; ``applies`` and this run's covered rows."""
    from .divergences import load_known_divergences, report_entries

    applying = {e["id"]: e for e in report_entries(result)}
    rows = []
    for e in load_known_divergences():
        covered = applying.get(e.id, {}).get("rows", [])
        resolution = (e.resolution if isinstance(e.resolution, str)
                      else f"tolerance {e.resolution['kind']}/{e.resolution['path']}")
        rows.append({"id": e.id, "variant": e.variant, "check": e.check, "kind": e.kind,
                     "path": e.path, "resolution": resolution,
                     "conditions": ", ".join(f"{k}={v}" for k, v in e.conditions.items()),
                     "applies": e.id in applying, "rows": len(covered),
                     "rows_failed": sum(not r["passed"] for r in covered),
                     "xfail": e.xfail, "reason": e.reason})
    return rows


def framework_differences(root: Path = ROOT) -> list[dict]:
    """One row per item of the ``Differences from torch_ref/...`` list in the docstring of
    every ``jittor_impl`` module: the file and the difference (whitespace folded)."""
    rows = []
    for path in sorted((root / "jittor_impl").glob("*.py")):
        with warnings.catch_warnings():  # escape sequences in the sources' other strings
            warnings.simplefilter("ignore", SyntaxWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        match = re.search(r"^Differences from [^\n]*:\n", doc, re.M)
        if not match:
            continue
        items: list[list[str]] = []
        bullet = None  # the indentation of the list's items
        for line in doc[match.end():].splitlines():
            indent = len(line) - len(line.lstrip())
            if line.lstrip().startswith("- ") and bullet in (None, indent):
                bullet = indent
                items.append([line.strip()[2:]])
            elif items and line.strip() and indent > bullet:
                items[-1].append(line.strip())
            else:
                break  # the list ends at the first line that is neither an item nor its text
        rows += [{"file": f"jittor_impl/{path.name}", "difference": " ".join(item)} for item in items]
    return rows


def _tolerance_rows() -> list[dict]:
    from .tolerances import table_rows

    return table_rows()


def _noise_rows() -> tuple[list[dict], dict]:
    """The derived noise factors (one row per kind) and the derivation's rule and settings."""
    from .tolerances import noise_record

    record = noise_record()
    rows = [{"kind": kind, **values} for kind, values in record["kinds"].items()]
    about = {k: record[k] for k in ("rule", "margin", "quantile", "variants", "sizes", "seeds",
                                    "trajectory_steps", "command") if k in record}
    about["controls"] = record.get("controls")
    return rows, about


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def provenance(settings: ReportSettings, weights: str, sha256: str) -> dict:
    """Commit, versions, threads, machine, seeds, weights and the command of a report."""
    import torch

    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    cpu = ""
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), "")
    except OSError:
        pass
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    status = _git("status", "--porcelain", "--untracked-files=no")
    check = settings.check
    from .divergences import jittor_kernels

    return {
        "git_commit": _git("rev-parse", "HEAD") or "unknown",
        "git_dirty": bool(status),
        "git_dirty_files": len(status.splitlines()) if status else 0,
        "versions": versions,
        "threads": {"torch": torch.get_num_threads(),
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"),
                    "cpu_count": os.cpu_count()},
        "jittor_kernels": jittor_kernels(),
        "machine": {"platform": platform.platform(), "cpu": cpu or platform.processor(),
                    "memory_gb": round(memory_gb, 1)},
        "weights": weights, "weights_sha256": sha256,
        "seeds": {"weights_and_streams": check.seed, "eval_images": 1, "train_images": 2,
                  "train_targets": 3, "module_images": 4, "module_targets": 5},
        "command": settings.command,
    }


def _sizes(check: argparse.Namespace) -> dict:
    return {"eval": check.size, "train_loss": check.train_size, "modules": check.module_size,
            "training": check.training_size}


def _copy_nightly(source: Path, data: Path, variant: str) -> dict:
    """Copies a nightly result's tables into ``data/``; returns what the report says about it."""
    try:
        shown = source.resolve().relative_to(ROOT)
    except ValueError:
        shown = source
    summary_path = source / "summary.json"
    if not summary_path.is_file():
        return {"source": str(shown), "state": "not run",
                "why": f"no nightly result at {shown} (run `rtdetr-parity nightly`)"}
    summary = json.loads(summary_path.read_text())
    trained = summary.get("profile", {}).get("variant")
    if trained != variant:
        return {"source": str(shown), "state": "not run",
                "why": f"the nightly profile {summary.get('profile', {}).get('name')!r} trains "
                       f"{trained}, not {variant}"}
    for name in ("runs", "curves"):
        frame = pd.read_csv(source / f"{name}.csv")
        frame = frame.drop(columns=[c for c in ("run_dir",) if c in frame.columns])
        write_table(data, f"nightly_{name}", frame)
    keep = ("profile", "fault", "failed_runs", "verdict", "verdict_line", "rule", "margin_ap_points",
            "alpha", "confidence", "min_seeds", "n", "seeds", "equivalence",
            "effects_jittor_minus_torch", "control")
    write_json(data / "nightly_summary.json", {k: summary[k] for k in keep if k in summary})
    return {"source": str(shown), "state": "run"}


# The share of the catalogue's faults the report's own process keeps: it runs the check
# first, while the spawned worker starts on the rest.
FAULT_OWN_SHARE = 1 / 3


def _external(settings: ReportSettings) -> bool:
    """Whether the report is of a port other than jittor_impl."""
    from .ports import DEFAULT_PORT

    return getattr(settings.check, "port", None) not in (None, DEFAULT_PORT)


def _start_faults(settings: ReportSettings) -> Any:
    """The fault catalogue's run, its spawned worker started now (None unless ``run``)."""
    from .faults import CATALOGUE_SIZE, CatalogueRun

    if settings.faults != "run" or _external(settings):
        return None
    workers = min(2, os.cpu_count() or 1)
    return CatalogueRun(settings.variant, CATALOGUE_SIZE, "fast", weights=settings.check.weights,
                        num_classes=settings.check.num_classes, workers=workers,
                        own_share=FAULT_OWN_SHARE if workers > 1 else None)


def _faults(settings: ReportSettings, data: Path, on_phase: Callable[[str], None],
            started: Any = None) -> dict:
    """The fault catalogue's table in ``data/faults.csv``: run now (finishing ``started``),
    read, or not run."""
    if settings.faults == "none":
        return {"state": "not run", "why": "not requested (--faults none)"}
    if _external(settings):
        return {"state": "not run", "why": "the catalogue injects its faults into jittor_impl, "
                                           "not into the port named with --port"}
    if settings.faults == "stored":
        stored = STORED_FAULTS / f"faults_{settings.variant}_fast.csv"
        if not stored.is_file():
            return {"state": "not run",
                    "why": f"no stored table at {stored.relative_to(ROOT)} (run `rtdetr-parity "
                           f"faults --variant {settings.variant}` or the report with --faults run)"}
        write_table(data, "faults", pd.read_csv(stored))
        return {"state": "stored", "source": str(stored.relative_to(ROOT)),
                "tier": "fast", "baseline_failures": None}
    from .faults import CATALOGUE_SIZE

    on_phase("faults")
    run = started or _start_faults(settings)
    baseline, results = run.finish()
    write_table(data, "faults", [r.row() for r in results])
    return {"state": "run", "tier": "fast", "size": list(CATALOGUE_SIZE),
            "baseline_failures": sum(len(v) for v in baseline.values()),
            "threads_each": run.threads_each}


def collect(settings: ReportSettings, data: Path,
            on_phase: Callable[[str], None] = lambda phase: None,
            on_step: Callable[[int, int], None] | None = None) -> None:
    """Measures and reads everything a report shows into the folder ``data`` (created).

    ``on_phase(name)`` is called as each phase starts (:data:`PHASES`, in that order, those
    that run); ``on_step(done, total)`` as the check's parts advance.
    """
    from .cli import measure_check

    data.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    measured_at = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    # The catalogue's worker starts beside the check, the cores divided between the two
    # processes; this process runs its own share once the check is done. The benchmark comes
    # last, alone on the machine, with the kernels that the check compiled (its children
    # measure their own peak memory, not this process's).
    faults_started = _start_faults(settings)
    fault_start = time.perf_counter()
    try:
        on_phase("load")
        from . import check as _frameworks  # noqa: F401  (imports torch and Jittor)

        measured = measure_check(settings.check, on_part=on_phase, on_step=on_step)
    except BaseException:
        if faults_started is not None:
            faults_started.close()
        raise
    seconds.update({f"check_{k}": v for k, v in measured.seconds.items()})
    result = measured.result
    write_table(data, "checks", _check_rows(result), columns=list(CHECK_COLUMNS))
    module_rows, module_runs = _module_rows(measured.modules)
    write_table(data, "modules", module_rows, columns=[
        "pass", "module", "mode", "kind", "path", "shape", "dtype", "max_abs", "rel_l2", "cosine",
        "passed", "reason", "start", "end"])
    write_table(data, "module_runs", module_runs, columns=["pass", "input_shape", "isolation"])
    write_table(data, "parameters", measured.parameters)
    trajectory = measured.trajectory
    write_table(data, "trajectory", trajectory.rows() if trajectory else [],
                columns=None if trajectory else ["step"])
    write_table(data, "drift", _drift_rows(trajectory) if trajectory else [],
                columns=["step", "parameter", "drift", "floor"])
    write_table(data, "known_divergences", _divergence_rows(result), columns=["id"])
    write_table(data, "framework_differences", framework_differences())
    write_table(data, "tolerances", _tolerance_rows())
    noise_rows, noise_about = _noise_rows()
    write_table(data, "noise", noise_rows)

    start = time.perf_counter()
    faults_info = _faults(settings, data, on_phase, faults_started)
    if faults_info["state"] == "run":
        seconds["faults"] = time.perf_counter() - start
        seconds["faults_since_start"] = time.perf_counter() - fault_start
    plan = None if _external(settings) else bench_plan(settings.bench, settings.variant)
    bench_info: dict = {"state": "not run", "why": "not requested (--bench none)"
                        if not _external(settings) else "the benchmark times jittor_impl, not "
                                                        "the port named with --port"}
    if plan is not None:
        on_phase("bench")
        start = time.perf_counter()
        load_before = os.getloadavg()[0]
        rows, times = run_bench(plan)
        write_table(data, "bench", rows)
        write_table(data, "bench_times", times)
        seconds["bench"] = time.perf_counter() - start
        bench_info = {"state": "run", "plan": plan.name, "warmup": plan.warmup, "reps": plan.reps,
                      "load_average_before": round(load_before, 2),
                      "load_average_after": round(os.getloadavg()[0], 2)}
    if _external(settings):
        nightly_info = {"state": "not run", "why": "the nightly comparison trains jittor_impl, "
                                                   "not the port named with --port"}
    else:
        nightly_info = ({"state": "not run", "why": "not requested (--nightly none)"}
                        if settings.nightly is None else _copy_nightly(settings.nightly, data,
                                                                       settings.variant))
    check = settings.check
    meta = {
        "format": REPORT_FORMAT,
        "variant": settings.variant,
        "measured_at": measured_at.isoformat(),
        "weights": result.weights,
        "num_classes": check.num_classes,
        "sizes": _sizes(check),
        "trajectory": None if trajectory is None else {
            "size": list(trajectory.size), "batch": trajectory.batch, "steps": len(trajectory.steps)},
        "parts": list(check.parts),
        "notes": list(result.notes),
        "bench": bench_info,
        "faults": faults_info,
        "nightly": nightly_info,
        "noise_derivation": noise_about,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "provenance": {**provenance(settings, result.weights, measured.weights_sha256),
                       "port": measured.port},
        "not_run": measured.not_run,
        "findings": None if measured.findings is None else dataclasses.asdict(measured.findings),
        "module_pairing": [{"mode": m.mode, **m.pairing.counts(),
                            "unpaired_reference": len(m.pairing.unpaired_reference),
                            "unpaired_port": len(m.pairing.unpaired_port)}
                           for m in measured.modules if m.pairing is not None],
    }
    write_json(data / "meta.json", meta)


def read_meta(data: Path) -> dict:
    """The ``data/meta.json`` of a report; errors name what is missing or wrong."""
    path = data / "meta.json"
    if not data.is_dir():
        raise FileNotFoundError(f"no data folder at {data}: a report folder holds data/meta.json "
                                "and data/*.csv")
    if not path.is_file():
        raise FileNotFoundError(f"{data} has no meta.json: not the data of a report")
    meta = json.loads(path.read_text())
    if meta.get("format") != REPORT_FORMAT:
        raise ValueError(f"{path} is report format {meta.get('format')!r}; this version reads "
                         f"format {REPORT_FORMAT}")
    return meta


# --- writing a report folder ----------------------------------------------------------------

def write_report(out: Path, force: bool, fill: Callable[[Path], None]) -> Path:
    """Builds a report in a temporary sibling of ``out`` with ``fill(folder)``, then renames it
    into place: an existing ``out`` is replaced only with ``force``, and a failure leaves
    whatever was at ``out`` untouched.

    Raises:
        FileExistsError: ``out`` exists and ``force`` is not set.
    """
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"report folder {out} exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        fill(tmp)
        os.chmod(tmp, 0o755)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except OSError:
                os.replace(old, out)
                raise
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def _copy_data(source: Path, target: Path) -> None:
    """Copies a report's ``data/`` folder (its regular files only)."""
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir()):
        if path.is_file():
            shutil.copyfile(path, target / path.name)


def check_namespace(variant: str, weights: str | None, num_classes: int, sizes: dict[str, Any],
                    steps: int | None, seed: int,
                    port: dict[str, str | None] | None = None) -> argparse.Namespace:
    """The ``rtdetr-parity check`` options of a report: the check's defaults, then the given
    weights, sizes (``None`` keeps the check's), trajectory length and port options
    (``{"--port": ..., "--port-path": ..., "--key-map": ...}``, None values left out)."""
    from .cli import build_parser

    argv = ["check", "--variant", variant, "--num-classes", str(num_classes), "--seed", str(seed)]
    for flag, value in (port or {}).items():
        if value is not None:
            argv += [flag, str(value)]
    if weights is not None:
        argv += ["--weights", weights]
    for flag, size in sizes.items():
        if size is not None:
            argv += [flag, *map(str, size if isinstance(size, (tuple, list)) else [size])]
    if steps is not None:
        argv += ["--steps", str(steps)]
    return build_parser().parse_args(argv)


def _progress(settings: ReportSettings, args: argparse.Namespace):
    """The screen phases of one report (quiet unless ``--verbose``: the rest goes to a log
    under runs/logs/), with estimates from the last report with the same options."""
    from .progress import Progress, default_log_dir, log_file

    parts = settings.check.parts
    names = (["load"] + [p for p in ("outputs", "modules", "training") if p in parts]
             + (["faults"] if settings.faults == "run" else [])
             + (["bench"] if settings.bench != "none" else []) + ["render"])
    options = {k: v for k, v in sorted(vars(args).items())
               if k not in ("func", "out", "verbose", "force", "command", "argv", "variant")}
    return Progress([PHASES[n] for n in names], log=log_file("report"),
                    verbose=getattr(args, "verbose", False),
                    history=default_log_dir() / "phase-times.json",
                    key=f"report {settings.variant} {json.dumps(options, default=str, sort_keys=True)}")


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def cmd_report(args: argparse.Namespace) -> int:
    """``rtdetr-parity report``: one report folder per variant, then the folder's index.

    A termination request (SIGTERM) unwinds like an error: the temporary folder is removed and
    the report in place stays as it was.
    """
    previous = install(signal.SIGTERM, _terminate)
    try:
        return _report(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _report(args: argparse.Namespace) -> int:
    from .cli import VARIANTS
    from .report_render import render, write_index

    command = shlex.join(["rtdetr-parity", *getattr(args, "argv", [])])
    if args.from_dir is not None:
        source = Path(args.from_dir)
        meta = read_meta(source / "data")
        out = Path(args.out) if args.out is not None else source
        same = out.resolve() == source.resolve()
        if same and not args.force:
            raise FileExistsError(f"regenerating {source} in place replaces it; pass --force")

        def regenerate(folder: Path) -> None:
            _copy_data(source / "data", folder / "data")
            render(folder)

        write_report(out, args.force or same, regenerate)
        summary = json.loads((out / "summary.json").read_text())
        print(f"rtdetr-parity report: {meta['variant']} regenerated from {source / 'data'}: "
              f"{summary['verdict_line']}\n  {out / 'report.md'}\n  {out / 'report.html'}")
        write_index(out.parent)
        return 0 if summary["verdict"] != "fail" else 1

    unknown = [v for v in args.variant if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    if args.weights is not None and not Path(args.weights).is_file():
        raise FileNotFoundError(f"no weight file at {args.weights}")
    if args.out is not None and len(args.variant) > 1:
        outs = {v: Path(args.out) / v for v in args.variant}
    else:
        outs = {v: Path(args.out) if args.out is not None else ROOT / "reports" / v
                for v in args.variant}
    for variant, out in outs.items():  # refuse before measuring anything
        if out.exists() and not args.force:
            raise FileExistsError(f"report folder {out} exists; pass --force to replace it")
    nightly = None if args.nightly == "none" else Path(args.nightly)
    status = 0
    for variant, out in outs.items():
        check = check_namespace(variant, args.weights, args.num_classes,
                                {"--size": args.size, "--train-size": args.train_size,
                                 "--module-size": args.module_size,
                                 "--training-size": args.training_size}, args.steps, args.seed,
                                {"--port": args.port, "--port-path": args.port_path,
                                 "--key-map": args.key_map})
        settings = ReportSettings(variant, check, bench=args.bench, faults=args.faults,
                                  nightly=nightly, command=command)
        progress = _progress(settings, args)

        def build(folder: Path) -> None:
            with progress:
                collect(settings, folder / "data", lambda name: progress.phase(PHASES[name]),
                        progress.update)
                progress.phase(PHASES["render"])
                render(folder)

        write_report(out, args.force, build)
        summary = json.loads((out / "summary.json").read_text())
        print(f"rtdetr-parity report: {variant}: {summary['verdict_line']} "
              f"(in {progress.elapsed:.0f} s)")
        for section in summary["sections"]:
            print(f"  {section['verdict']:8} {section['title']}: {section['detail']}")
        print(f"  {out / 'report.md'}\n  {out / 'report.html'}")
        if progress.quiet:
            print(f"log (compiler and library output): {progress.log}")
        write_index(out.parent)
        status |= summary["verdict"] == "fail"
    return status
