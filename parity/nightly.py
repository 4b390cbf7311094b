"""``rtdetr-parity nightly``: train both frameworks over several seeds and judge their COCO AP.

For every seed the job trains three runs from one shared initial weights file, on the same
data and the same data order (``rtdetr-parity train`` in subprocesses, at most
:attr:`Profile.parallel` at a time):

* ``torch``: the reference trainer;
* ``jittor``: the port (with ``--fault ID``, a fault of :mod:`parity.faults` patched in);
* ``control``: the reference again with something changed that must not matter
  (:attr:`Profile.control`: its CPU kernels limited to AVX2, or another thread count): it
  changes fp32 rounding, hence near-tie decisions, and measures the reference's own
  run-to-run spread.

Each trainer evaluates with pycocotools after every epoch into its ``log.jsonl``. The verdict
is the equivalence test of :mod:`parity.equivalence` on the per-seed AP differences
(Jittor - torch, points) against the profile's margin; the effects on AP50, AP75 and the
final loss, the control's differences and the detectable difference are reported beside it.

Profiles (:data:`PROFILES`) are rows of :class:`Profile`: data, starting weights, recipe,
seeds, margin and level. Runs are kept under ``runs/nightly/<profile>/<role>-seed<k>/``
(checkpoints, logs); a finished run carries ``nightly_run.json`` and is skipped when the job is
run again with ``--resume``, an unfinished one resumes from its own checkpoint (the trainer's
resume). Results go to the output folder: ``summary.json``, ``runs.csv``, ``curves.csv`` and
``nightly.png``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from rtdetr_common.signals import install
from rtdetr_common.run_log import read_log
from rtdetr_common.weights import NEUTRAL_SUFFIXES, atomic_write

from . import equivalence
from .nightly_profiles import COCO_ENV, WEIGHTS_ENV, Profile, profile

ROLES = ("torch", "jittor", "control")
# AP-type metrics of log.jsonl eval lines (fractions there; points here).
AP_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
EFFECT_METRICS = ("AP", "AP50", "AP75", "final_loss")
RUN_RECORD = "nightly_run.json"
ATTEMPTS = "nightly_attempts.jsonl"
REPO = Path(__file__).resolve().parents[1]
VERDICT_RULE = (
    "TOST on the per-seed AP differences d = AP_jittor - AP_torch (points), Student t with n-1 "
    "degrees of freedom, two-sided {confidence:.0%} CI of the mean (alpha {alpha:g} per side): "
    "equivalent if the CI lies inside (-{margin:g}, +{margin:g}); different if it lies wholly "
    "outside [-{margin:g}, +{margin:g}]; otherwise inconclusive, with the seeds needed for the "
    "observed mean and spread to decide; inconclusive whenever n < {min_seeds}.")


# ------------------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class RunSpec:
    """One training run of the job.

    Attributes:
        role: ``torch``, ``jittor`` or ``control``.
        seed: The run's ``--seed``.
        out: Its run folder.
        threads: CPU threads (``OMP_NUM_THREADS``; ``--threads`` for torch).
        train_argv: The ``rtdetr-parity train`` arguments.
        fault: Fault id patched into the Jittor trainer, or None.
        env: Extra environment variables (the control's).
    """

    role: str
    seed: int
    out: Path
    threads: int
    train_argv: tuple[str, ...]
    fault: str | None = None
    env: tuple[tuple[str, str], ...] = ()

    @property
    def name(self) -> str:
        return f"{self.role}-seed{self.seed}"

    @property
    def framework(self) -> str:
        return "jittor" if self.role == "jittor" else "torch"

    def key(self) -> str:
        """16 hex digits naming everything that determines the run's results."""
        text = json.dumps([self.role, self.seed, self.threads, list(self.train_argv), self.fault,
                           sorted(self.env)])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def command(self) -> list[str]:
        """The subprocess: :mod:`parity.nightly_worker` running ``train`` (with the fault)."""
        fault = ["--fault", self.fault] if self.fault else []
        return [sys.executable, "-m", "parity.nightly_worker", *fault, "train", *self.train_argv]

    def environment(self) -> dict[str, str]:
        """The process environment with the run's thread count (and extra variables)."""
        return {**os.environ, "OMP_NUM_THREADS": str(self.threads), **dict(self.env)}


def plan_runs(prof: Profile, seeds: int, runs_dir: Path, dataset: Path, init_weights: Path,
              fault: str | None = None) -> list[RunSpec]:
    """The runs of a job, seed by seed (torch, jittor, control), so that an interrupted job
    leaves complete triples behind.

    With a fault the Jittor runs go to ``<runs_dir>/fault-<id>/`` and the reference runs
    (unchanged by a Jittor fault) are shared with the clean job.
    """
    if seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}")
    specs = []
    for seed in range(seeds):
        for role in ROLES:
            threads, env = (prof.control_threads_env() if role == "control"
                            else (prof.threads, {}))
            folder = runs_dir / (f"fault-{fault}" if fault and role == "jittor" else "")
            out = folder / f"{role}-seed{seed}"
            argv = ["--framework", "jittor" if role == "jittor" else "torch", "--out", str(out),
                    "--dataset", str(dataset), "--init-weights", str(init_weights),
                    "--seed", str(seed), *prof.train_args()]
            if role != "jittor":
                argv += ["--threads", str(threads)]
            specs.append(RunSpec(role, seed, out, threads, tuple(argv),
                                 fault if role == "jittor" else None, tuple(sorted(env.items()))))
    return specs


def run_record(spec: RunSpec) -> dict | None:
    """The finished-run record of a run folder, or None if the run has not finished.

    Raises:
        ValueError: If the folder holds a finished run made with other settings.
    """
    path = spec.out / RUN_RECORD
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("key") != spec.key():
        raise ValueError(f"{spec.out} holds a finished run made with other settings (key "
                         f"{record.get('key')!r}, now {spec.key()!r}); pass --fresh to redo it")
    return record


def _attempt_seconds(spec: RunSpec) -> float:
    path = spec.out / ATTEMPTS
    if not path.is_file():
        return 0.0
    return float(sum(entry.get("seconds", 0.0) for entry in read_log(path)))


def finish_run(spec: RunSpec, exit_code: int, seconds: float) -> dict | None:
    """Records one attempt; after a successful one writes the finished-run record."""
    spec.out.mkdir(parents=True, exist_ok=True)
    with open(spec.out / ATTEMPTS, "a") as f:
        f.write(json.dumps({"exit_code": exit_code, "seconds": round(seconds, 2),
                            "ended": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n")
    if exit_code != 0:
        return None
    record = {"key": spec.key(), "role": spec.role, "seed": spec.seed, "fault": spec.fault,
              "threads": spec.threads, "env": dict(spec.env),
              "command": shlex.join(spec.command()),
              "seconds": round(_attempt_seconds(spec), 2)}
    text = json.dumps(record, indent=1) + "\n"
    atomic_write(spec.out / RUN_RECORD, lambda tmp: tmp.write_text(text))
    return record


class Launcher:
    """Runs the trainers as subprocesses; :meth:`stop` forwards a signal to the running ones
    (they checkpoint and exit) and starts no more."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen] = set()
        self.stopped = False

    def run(self, spec: RunSpec) -> int:
        """Runs one training to its end (output appended to ``<out>/train.out``); its exit
        status, or -1 when stopped before it started."""
        with self._lock:
            if self.stopped:
                return -1
            spec.out.mkdir(parents=True, exist_ok=True)
        with open(spec.out / "train.out", "ab") as log:
            with self._lock:
                if self.stopped:
                    return -1
                proc = subprocess.Popen(spec.command(), stdout=log, stderr=subprocess.STDOUT,
                                        env=spec.environment(), cwd=REPO)
                self._running.add(proc)
            try:
                return proc.wait()
            finally:
                with self._lock:
                    self._running.discard(proc)

    def stop(self, signum: int = signal.SIGTERM) -> None:
        with self._lock:
            self.stopped = True
            for proc in self._running:
                proc.send_signal(signum)


def run_all(specs: Sequence[RunSpec], parallel: int, launcher: Launcher,
            progress: Callable[[str], None] = print) -> dict[str, int]:
    """Runs every unfinished spec, ``parallel`` at a time; returns the exit status of each run
    attempted (finished runs are skipped)."""
    pending = [s for s in specs if run_record(s) is None]
    for s in specs:
        if s not in pending:
            progress(f"  {s.name:16} done earlier, kept ({s.out})")
    codes: dict[str, int] = {}

    def one(spec: RunSpec) -> None:
        if launcher.stopped:
            return
        resumed = " (resuming)" if (spec.out / "log.jsonl").is_file() else ""
        progress(f"  {spec.name:16} started{resumed}")
        start = time.perf_counter()
        code = launcher.run(spec)
        if code == -1:
            return
        seconds = time.perf_counter() - start
        finish_run(spec, code, seconds)
        codes[spec.name] = code
        state = ("finished" if code == 0 else f"stopped (exit {code})" if launcher.stopped
                 else f"FAILED (exit {code}; see {spec.out / 'train.out'})")
        progress(f"  {spec.name:16} {state} in {seconds:.0f} s")

    pool = ThreadPoolExecutor(max_workers=max(1, parallel))
    try:
        for future in [pool.submit(one, s) for s in pending]:
            future.result()
    except KeyboardInterrupt:
        launcher.stop(signal.SIGINT)  # the queued runs then return at once
        raise
    finally:
        pool.shutdown(wait=True)
    return codes


# -------------------------------------------------------------------------------- inputs


def synthetic_subset(num_train: int, num_val: int) -> Path:
    """The embedded dataset's first ``num_train`` / ``num_val`` images (the generator draws
    image ``i`` independently of the split size), generated once into the dataset cache."""
    from rtdetr_common.synthetic import (DEFAULT_DATASET, GENERATOR_VERSION, SyntheticDataset,
                                         default_cache_dir, ensure_default_dataset, is_complete,
                                         make_dataset)

    if (num_train, num_val) == (DEFAULT_DATASET.num_train, DEFAULT_DATASET.num_val):
        return ensure_default_dataset().root
    params = dataclasses.replace(DEFAULT_DATASET, num_train=num_train, num_val=num_val)
    root = (default_cache_dir() / f"synthetic-v{GENERATOR_VERSION}-seed{params.seed}"
                                  f"-train{num_train}-val{num_val}")
    if not is_complete(SyntheticDataset.at(root, params)):
        options = {k: v for k, v in dataclasses.asdict(params).items()}
        make_dataset(root, overwrite=root.exists(), **options)
    return root


def coco_subset(root: Path, out: Path, num_train: int | None, num_val: int | None) -> Path:
    """A COCO 2017 folder, or at ``out`` the first images (by id) of each split: annotation
    files of the subset plus links to the image folders.

    Raises:
        FileNotFoundError: Naming what is missing under ``root``.
    """
    needed = [root / "train2017", root / "val2017",
              root / "annotations" / "instances_train2017.json",
              root / "annotations" / "instances_val2017.json"]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise FileNotFoundError(f"COCO 2017 folder {root} lacks {', '.join(missing)}")
    if num_train is None and num_val is None:
        return root
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    for split, count in (("train2017", num_train), ("val2017", num_val)):
        link = out / split
        if not link.exists():
            link.symlink_to((root / split).resolve(), target_is_directory=True)
        ann = out / "annotations" / f"instances_{split}.json"
        if ann.is_file():
            continue
        doc = json.loads((root / "annotations" / f"instances_{split}.json").read_text())
        images = sorted(doc["images"], key=lambda im: im["id"])
        images = images if count is None else images[:count]
        ids = {im["id"] for im in images}
        doc["images"] = images
        doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] in ids]
        text = json.dumps(doc)
        atomic_write(ann, lambda tmp: tmp.write_text(text))
    return out


def prepare_inputs(prof: Profile, runs_dir: Path, dataset: str | None = None,
                   weights: str | None = None) -> tuple[Path, Path]:
    """The dataset root and the shared initial weights file of a job (made on first use).

    Raises:
        ValueError: When a ``coco`` or ``weights`` profile is given no folder / file.
        FileNotFoundError: When they do not exist.
    """
    runs_dir.mkdir(parents=True, exist_ok=True)
    if prof.data == "synthetic":
        if dataset is not None:
            raise ValueError(f"profile {prof.name!r} uses the embedded synthetic dataset; "
                             f"--dataset is for COCO profiles")
        root = synthetic_subset(prof.num_train, prof.num_val)
    else:
        given = dataset or os.environ.get(COCO_ENV)
        if not given:
            raise ValueError(f"profile {prof.name!r} needs the COCO 2017 folder: pass --dataset "
                             f"DIR or set ${COCO_ENV}")
        root = coco_subset(Path(given), runs_dir / "data", prof.num_train, prof.num_val)
    if prof.start == "trained":
        from .trained import trained_checkpoint

        init = trained_checkpoint(steps=prof.trained_steps)
    elif prof.start == "init":
        init = runs_dir / f"init-seed{prof.init_seed}.safetensors"
        if not init.is_file():
            cmd = [sys.executable, "-m", "parity.cli", "init-weights", str(init), "--framework",
                   "torch", "--variant", prof.variant, "--size", str(prof.size),
                   "--seed", str(prof.init_seed), "--dataset", str(root)]
            subprocess.run(cmd, check=True, cwd=REPO,
                           env={**os.environ, "OMP_NUM_THREADS": str(prof.threads)})
    else:
        given = weights or os.environ.get(WEIGHTS_ENV)
        if not given:
            raise ValueError(f"profile {prof.name!r} starts from a weights file: pass --weights "
                             f"FILE or set ${WEIGHTS_ENV}")
        source = Path(given)
        if not source.is_file():
            raise FileNotFoundError(f"start weights not found: {source}")
        if source.suffix in NEUTRAL_SUFFIXES:
            init = source
        else:
            from .convert import convert

            init = runs_dir / "start.safetensors"
            if not init.is_file():
                convert(source, init, prof.variant)
    return Path(root).resolve(), Path(init).resolve()


# ------------------------------------------------------------------------------- results


@dataclass
class RunResult:
    """What one finished run's log says.

    Attributes:
        spec: The run.
        metrics: Last epoch's AP metrics in points, plus ``final_loss``.
        seconds: Wall time of all its attempts.
        steps: Per logged step: ``step`` and total ``loss``.
        epochs: Per evaluated epoch: ``epoch`` and the AP metrics in points.
    """

    spec: RunSpec
    metrics: dict[str, float]
    seconds: float
    steps: list[dict] = field(default_factory=list)
    epochs: list[dict] = field(default_factory=list)


def read_run(spec: RunSpec, epochs: int, final_loss_steps: int) -> RunResult:
    """The results of a finished run from its ``log.jsonl`` and record.

    Raises:
        ValueError: If the log lacks the last epoch's evaluation or any training step.
    """
    record = run_record(spec)
    if record is None:
        raise ValueError(f"{spec.out}: the run has not finished")
    log = spec.out / "log.jsonl"
    if not log.is_file():
        raise ValueError(f"{spec.out}: no log.jsonl")
    entries = read_log(log)
    steps = sorted(({"step": e["step"], "loss": float(e["loss"])} for e in entries
                    if e.get("kind") == "train"), key=lambda s: s["step"])
    evals = sorted(({"epoch": e["epoch"], **{m: 100 * float(e[m]) for m in AP_METRICS}}
                    for e in entries if e.get("kind") == "eval"), key=lambda e: e["epoch"])
    if not steps:
        raise ValueError(f"{log}: no training step logged")
    if not evals or evals[-1]["epoch"] != epochs - 1:
        raise ValueError(f"{log}: no evaluation of the last epoch ({epochs})")
    metrics = {m: evals[-1][m] for m in AP_METRICS}
    metrics["final_loss"] = float(np.mean([s["loss"] for s in steps[-final_loss_steps:]]))
    return RunResult(spec, metrics, float(record["seconds"]), steps, evals)


def _versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for package in ("torch", "jittor", "numpy", "scipy", "pycocotools", "pandas"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        out["commit"] = (commit + (" (uncommitted changes)" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        out["commit"] = "unknown"
    return out


def analyse(prof: Profile, results: Sequence[RunResult]) -> dict:
    """The verdict and every figure of ``summary.json`` (no file written)."""
    by = {(r.spec.role, r.spec.seed): r for r in results}
    seeds = sorted({seed for (_, seed) in by})
    complete = [s for s in seeds if all((role, s) in by for role in ROLES)]
    confidence = 1 - 2 * prof.alpha

    def diffs(role: str, metric: str) -> list[float]:
        return [by[role, s].metrics[metric] - by["torch", s].metrics[metric] for s in complete]

    if not complete:
        raise ValueError("no seed has all three runs (torch, jittor, control) finished")
    test = equivalence.tost(diffs("jittor", "AP"), prof.margin, prof.alpha, prof.min_seeds)
    control = equivalence.tost(diffs("control", "AP"), prof.margin, prof.alpha, prof.min_seeds)
    effects = {m: equivalence.mean_effect(diffs("jittor", m), confidence).as_dict()
               for m in EFFECT_METRICS}
    control_effects = {m: equivalence.mean_effect(diffs("control", m), confidence).as_dict()
                       for m in EFFECT_METRICS}
    ap = {role: [by[role, s].metrics["AP"] for s in complete] for role in ROLES}
    return {
        "verdict": test.verdict,
        "verdict_line": test.describe(),
        "rule": VERDICT_RULE.format(confidence=confidence, alpha=prof.alpha, margin=prof.margin,
                                    min_seeds=prof.min_seeds),
        "margin_ap_points": prof.margin, "alpha": prof.alpha, "confidence": confidence,
        "min_seeds": prof.min_seeds, "n": test.effect.n, "seeds": complete,
        "equivalence": test.as_dict(),
        "effects_jittor_minus_torch": effects,
        "detectable_shift_ap_points": test.detectable_shift,
        "detectable_difference_ap_points": test.detectable_difference,
        "more_seeds_needed": test.more_seeds,
        "control": {
            "what": prof.control_what(),
            "ap_diff_sd": control.effect.sd,
            "equivalence": control.as_dict(),
            "effects_control_minus_torch": control_effects,
        },
        "ap_mean": {role: float(np.mean(v)) for role, v in ap.items()},
        "ap_sd_across_seeds": {role: float(np.std(v, ddof=1)) if len(v) > 1 else math.nan
                               for role, v in ap.items()},
    }


def tables(results: Sequence[RunResult]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``runs.csv`` (one row per run) and ``curves.csv`` (per step loss, per epoch AP)."""
    runs = pd.DataFrame([{"seed": r.spec.seed, "role": r.spec.role,
                          "framework": r.spec.framework, "threads": r.spec.threads,
                          "fault": r.spec.fault or "", **{m: r.metrics[m] for m in AP_METRICS},
                          "final_loss": r.metrics["final_loss"], "steps": len(r.steps),
                          "wall_s": r.seconds, "run_dir": str(r.spec.out)} for r in results])
    rows = []
    for r in results:
        rows += [{"role": r.spec.role, "seed": r.spec.seed, "kind": "step", "step": s["step"],
                  "epoch": math.nan, "loss": s["loss"]} for s in r.steps]
        rows += [{"role": r.spec.role, "seed": r.spec.seed, "kind": "epoch", "step": math.nan,
                  "epoch": e["epoch"], "loss": math.nan, **{m: e[m] for m in AP_METRICS}}
                 for e in r.epochs]
    curves = pd.DataFrame(rows)
    order = {role: i for i, role in enumerate(ROLES)}
    runs = runs.sort_values(["seed", "role"], key=lambda c: c.map(order) if c.name == "role"
                            else c).reset_index(drop=True)
    return runs, curves


def plot(runs: pd.DataFrame, curves: pd.DataFrame, summary: dict, path: Path) -> None:
    """Loss per step (mean over seeds) and its difference from the torch run's, AP per epoch
    of every run, coloured by role, and the per-seed AP differences against the margin (PNG,
    written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report_plots import loss_difference, mean_loss

    colours = {"torch": "tab:blue", "jittor": "tab:red", "control": "tab:green"}
    fig, ((loss, spread), (middle, right)) = plt.subplots(2, 2, figsize=(14, 9))
    epochs = curves[curves["kind"] == "epoch"]
    mean_loss(loss, curves, colours)
    loss.set_title("training loss")
    loss_difference(spread, curves, colours)
    spread.set_title("training loss against the reference, per seed")
    for (role, seed), group in epochs.groupby(["role", "seed"]):
        offset = {"torch": -0.08, "jittor": 0.0, "control": 0.08}[role]
        middle.plot(group["epoch"] + 1 + offset, group["AP"], "o-", color=colours[role],
                    alpha=0.6, label=role if seed == epochs["seed"].min() else None)
    middle.set(xlabel="epoch", ylabel="val AP (points)", title="AP per epoch (every run)")
    middle.legend()
    wide = runs.pivot(index="seed", columns="role", values="AP")
    for role in ("jittor", "control"):
        if role in wide and "torch" in wide:
            right.plot(wide.index, wide[role] - wide["torch"], "o", color=colours[role],
                       label=f"{role} - torch")
    margin = summary["profile"]["margin"]
    right.axhspan(-margin, margin, color="0.9", label=f"margin +-{margin:g}")
    effect = summary.get("equivalence", {}).get("effect")
    if effect and math.isfinite(effect["ci_low"]):
        right.axhline(effect["mean"], color=colours["jittor"], lw=1)
        right.axhspan(effect["ci_low"], effect["ci_high"], color=colours["jittor"], alpha=0.15,
                      label=f"{100 * effect['confidence']:.0f}% CI of the mean")
    right.axhline(0, color="k", lw=0.5)
    right.set_xticks(list(wide.index))
    right.set(xlabel="seed", ylabel="final AP difference (points)")
    right.set_title(summary["verdict_line"], fontsize=8, wrap=True)
    right.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def _json_ready(value: object) -> object:
    """``value`` with every non-finite float as None (strict JSON has no NaN)."""
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_outputs(out: Path, summary: dict, runs: pd.DataFrame, curves: pd.DataFrame) -> list[Path]:
    """``summary.json``, ``runs.csv``, ``curves.csv`` and ``nightly.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_json_ready(summary), indent=1, default=str, allow_nan=False) + "\n"
    paths = [out / "summary.json", out / "runs.csv", out / "curves.csv", out / "nightly.png"]
    atomic_write(paths[0], lambda tmp: tmp.write_text(text))
    atomic_write(paths[1], lambda tmp: runs.to_csv(tmp, index=False))
    atomic_write(paths[2], lambda tmp: curves.to_csv(tmp, index=False))
    plot(runs, curves, summary, paths[3])
    return paths


def format_table(runs: pd.DataFrame) -> str:
    """Per seed: AP of each role and the two differences (a pandas console table)."""
    from .tables import text_table

    wide = runs.pivot(index="seed", columns="role", values="AP")
    ap = {role: wide[role] if role in wide else pd.Series(math.nan, index=wide.index)
          for role in ("torch", "jittor", "control")}
    table = pd.DataFrame({"seed": wide.index, "torch AP": ap["torch"].values,
                          "jittor AP": ap["jittor"].values, "control AP": ap["control"].values,
                          "jittor-torch": (ap["jittor"] - ap["torch"]).values,
                          "control-torch": (ap["control"] - ap["torch"]).values})
    return text_table(table, {"seed": "d", "torch AP": ".2f", "jittor AP": ".2f",
                              "control AP": ".2f", "jittor-torch": "+.2f", "control-torch": "+.2f"})


# ----------------------------------------------------------------------------------- job

EXIT_DIFFERENT = 1
EXIT_FAILED_RUNS = 3
EXIT_INTERRUPTED = 130


def run_nightly(prof: Profile, *, out: Path, runs_dir: Path, seeds: int | None = None,
                resume: bool = False, fresh: bool = False, fault: str | None = None,
                dataset: str | None = None, weights: str | None = None, command: str = "",
                launcher: Launcher | None = None, progress: Callable[[str], None] = print) -> int:
    """The whole job; returns its exit status (0: equivalent or inconclusive, 1: different,
    3: a run failed, 130: interrupted; re-run with ``--resume`` to continue).

    Raises:
        ValueError: On bad options, or earlier runs in ``runs_dir`` without ``resume``/``fresh``.
    """
    start = time.perf_counter()
    if resume and fresh:
        raise ValueError("--resume continues earlier runs and --fresh deletes them: pick one")
    seeds = prof.seeds if seeds is None else seeds
    if seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}")
    if fault is not None:
        from .faults import catalogue

        catalogue([fault])  # an unknown id fails here, before any training
    dataset_root, init = prepare_inputs(prof, runs_dir, dataset, weights)
    specs = plan_runs(prof, seeds, runs_dir, dataset_root, init, fault)
    earlier = [s for s in specs if s.out.exists()]
    if earlier and fresh:
        for s in earlier:
            shutil.rmtree(s.out)
    elif earlier and not resume:
        raise ValueError(f"{runs_dir} holds runs of an earlier nightly ({earlier[0].out.name} "
                         f"and {len(earlier) - 1} more): pass --resume to continue them or "
                         f"--fresh to delete them and start over")
    # A finished run of other settings fails here, before any training.
    kept = [s.name for s in specs if run_record(s) is not None]
    launcher = launcher or Launcher()
    progress(f"rtdetr-parity nightly: profile {prof.name}, {seeds} seeds x {len(ROLES)} runs, "
             f"{prof.parallel} at a time, runs in {runs_dir}"
             + (f", fault {fault} in the Jittor runs" if fault else ""))
    previous = install(signal.SIGTERM, lambda signum, frame: launcher.stop(signum))
    try:
        codes = run_all(specs, prof.parallel, launcher, progress)
    except KeyboardInterrupt:
        progress("interrupted: run the same command with --resume to continue")
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, previous)
    if launcher.stopped:
        progress("stopped: run the same command with --resume to continue")
        return EXIT_INTERRUPTED
    failed = sorted(name for name, code in codes.items() if code != 0)
    results = [read_run(s, prof.epochs, prof.final_loss_steps) for s in specs
               if run_record(s) is not None]
    runs, curves = tables(results)
    summary = {"profile": dataclasses.asdict(prof), "fault": fault, "failed_runs": failed}
    if failed:
        summary.update(verdict="error", verdict_line=f"runs failed: {', '.join(failed)}")
    else:
        summary.update(analyse(prof, results))
    summary.update({
        "wall_seconds": round(time.perf_counter() - start, 1),
        "runs_kept_from_earlier": kept,
        "run_seconds_total": round(float(runs["wall_s"].sum()), 1),
        "runs_dir": str(runs_dir), "dataset": str(dataset_root), "init_weights": str(init),
        "command": command, "versions": _versions(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    paths = write_outputs(out, summary, runs, curves)
    progress(format_table(runs))
    if not failed:
        c = summary["control"]["equivalence"]["effect"]
        if c["n"] >= 2:
            progress(f"control (reference against itself): AP diff sd {c['sd']:.3f}, mean "
                     f"{c['mean']:+.3f}, CI [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]")
            progress(f"detectable: a true shift of {summary['detectable_shift_ap_points']:.2f} "
                     f"AP points from zero, a gap of "
                     f"{summary['detectable_difference_ap_points']:.2f} called different (80% "
                     f"power)")
        else:
            progress(f"control (reference against itself): AP diff {c['mean']:+.3f} (one seed: "
                     f"no spread, no interval)")
    progress(f"verdict: {summary['verdict_line']}")
    progress(f"wrote {', '.join(str(p) for p in paths)}")
    if failed:
        return EXIT_FAILED_RUNS
    return EXIT_DIFFERENT if summary["verdict"] == equivalence.DIFFERENT else 0


def cmd_nightly(args) -> int:
    """``rtdetr-parity nightly``: the handler of :mod:`parity.cli`."""
    prof = profile(args.profile)
    out = Path(args.out) if args.out else Path("reports") / "nightly" / (
        prof.name if args.fault is None else f"{prof.name}-fault-{args.fault}")
    runs_dir = Path(args.runs) / prof.name
    argv = ["rtdetr-parity", "nightly", "--profile", prof.name, "--out", str(out)]
    for flag, value in (("--seeds", args.seeds), ("--fault", args.fault),
                        ("--runs", args.runs), ("--dataset", args.dataset),
                        ("--weights", args.weights)):
        if value is not None:
            argv += [flag, str(value)]
    argv += [flag for flag, on in (("--resume", args.resume), ("--fresh", args.fresh)) if on]
    return run_nightly(prof, out=out, runs_dir=runs_dir.resolve(), seeds=args.seeds,
                       resume=args.resume, fresh=args.fresh, fault=args.fault,
                       dataset=args.dataset, weights=args.weights, command=shlex.join(argv))
