"""The nightly job: the equivalence test's verdicts, the profile table, the resume logic, the
fault worker and (slow tier) a fault drill that must come out ``different``.

The default tier never trains: the job's trainer launcher is replaced by one that writes the
``log.jsonl`` a trainer would (losses per step, AP per epoch) and can stop midway like a
trainer stopped by SIGTERM, so the skip and resume logic of a real re-run is exercised.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import parity.nightly as nightly
from parity.cli import build_parser, main
from parity.equivalence import (DIFFERENT, EQUIVALENT, INCONCLUSIVE, detectable_shift,
                                mean_effect, paired_differences, seeds_needed, tost)
from parity.nightly_profiles import PROFILES, Profile, profile, validate_table
from parity.nightly_worker import main as worker_main

# ----------------------------------------------------------------------- equivalence test


def _sample(mean: float, sd: float, n: int) -> np.ndarray:
    """n values with exactly this mean and sample standard deviation."""
    z = np.random.default_rng(n).standard_normal(n)
    z = (z - z.mean()) / z.std(ddof=1)
    return mean + sd * z


def test_known_equivalent_sample_is_equivalent() -> None:
    d = _sample(0.2, 0.4, 8)
    result = tost(d, margin=1.0, alpha=0.05, min_n=3)
    assert result.verdict == EQUIVALENT
    # The interval is the textbook one-sample t interval at 90%.
    low, high = stats.ttest_1samp(d, 0.0).confidence_interval(0.90)
    assert result.effect.ci_low == pytest.approx(low)
    assert result.effect.ci_high == pytest.approx(high)
    assert -1.0 < result.effect.ci_low < result.effect.ci_high < 1.0
    assert result.p_value < 0.05
    assert result.more_seeds == 0


def test_known_different_sample_is_different() -> None:
    result = tost(_sample(-3.0, 0.5, 4), margin=1.0, min_n=3)
    assert result.verdict == DIFFERENT
    assert result.effect.ci_high < -1.0
    assert result.p_value > 0.5
    assert tost(_sample(2.5, 0.3, 3), margin=1.0).verdict == DIFFERENT


def test_too_few_runs_is_inconclusive_with_the_seeds_needed() -> None:
    tight = tost([0.0, 0.01], margin=1.0, min_n=3)  # a CI well inside the margin, but n < 3
    assert tight.verdict == INCONCLUSIVE
    assert tight.effect.ci_high < 1.0
    assert tight.more_seeds == 1
    single = tost([0.3], margin=1.0, min_n=3)
    assert single.verdict == INCONCLUSIVE and single.more_seeds == 2
    assert math.isnan(single.effect.sd)


@pytest.mark.parametrize("mean", [0.4, -1.8])
def test_seeds_needed_decide_at_the_observed_mean_and_spread(mean: float) -> None:
    wide = tost(_sample(mean, 1.2, 4), margin=1.0, min_n=3)
    assert wide.verdict == INCONCLUSIVE
    needed = wide.seeds_needed
    assert needed is not None and wide.more_seeds == needed - 4 > 0
    # With that many pairs of the same mean and spread the test decides; with one fewer not.
    decided = tost(_sample(mean, 1.2, needed), margin=1.0, min_n=3).verdict
    assert decided == (EQUIVALENT if abs(mean) < 1.0 else DIFFERENT)
    assert tost(_sample(mean, 1.2, needed - 1), margin=1.0, min_n=3).verdict == INCONCLUSIVE


def test_mean_on_the_margin_cannot_be_decided_by_more_seeds() -> None:
    result = tost(_sample(1.0, 0.5, 5), margin=1.0)
    assert result.verdict == INCONCLUSIVE
    assert result.seeds_needed is None and result.more_seeds is None
    assert "cannot decide" in result.describe()


def test_tost_p_value_agrees_with_the_interval() -> None:
    rng = np.random.default_rng(3)
    for _ in range(40):
        d = rng.normal(rng.uniform(-1.5, 1.5), rng.uniform(0.1, 1.5), rng.integers(3, 12))
        result = tost(d, margin=1.0, alpha=0.05)
        assert (result.p_value < 0.05) == (result.verdict == EQUIVALENT)


def test_detectable_shift_is_found_with_the_stated_power() -> None:
    sd, n, alpha = 0.8, 6, 0.05
    shift = detectable_shift(sd, n, alpha, 0.8)
    # A true mean difference of `shift` gives a one-sided t test the stated power (80%): the
    # noncentral t, by simulation within a few percent.
    rng = np.random.default_rng(0)
    d = rng.normal(shift, sd, size=(20000, n))
    t = d.mean(1) / (d.std(1, ddof=1) / np.sqrt(n))
    power = np.mean(t > stats.t.ppf(1 - alpha, n - 1))
    assert power == pytest.approx(0.8, abs=0.03)
    result = tost(_sample(0.0, sd, n), margin=1.0)
    assert result.detectable_shift == pytest.approx(shift)
    assert result.detectable_difference == pytest.approx(1.0 + shift)


@pytest.mark.parametrize("call, message", [
    (lambda: tost([], margin=1.0), "no differences"),
    (lambda: tost([0.1, float("nan")], margin=1.0), "finite"),
    (lambda: tost([0.1, 0.2], margin=0.0), "margin"),
    (lambda: tost([0.1, 0.2], margin=1.0, min_n=1), "min_n"),
    (lambda: tost([0.1, 0.2], margin=1.0, alpha=0.5), "alpha"),
    (lambda: paired_differences([1.0, 2.0], [1.0]), "equal lengths"),
    (lambda: mean_effect([1.0], confidence=1.5), "confidence"),
    (lambda: seeds_needed(0.0, 1.0, 1.0, alpha=0.0, min_n=3), "alpha"),
])
def test_bad_input_is_named(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


# -------------------------------------------------------------------------- profile table


def test_profile_table_is_valid_and_every_recipe_parses() -> None:
    validate_table()
    assert {"smoke", "cpu", "scratch", "coco"} <= {p.name for p in PROFILES}
    parser = build_parser()
    for prof in PROFILES:
        assert profile(prof.name) is prof
        args = parser.parse_args(["train", "--framework", "torch", *prof.train_args()])
        assert args.epochs == prof.epochs and args.lr == prof.lr and args.size == prof.size
        assert args.milestones == list(prof.milestones)
        assert prof.seeds >= prof.min_seeds >= 2


def test_scratch_profile_is_the_readme_recipe() -> None:
    p = profile("scratch")
    assert (p.size, p.epochs, p.num_train, p.batch_size, p.lr, p.backbone_lr) == \
        (160, 3, 1000, 4, 4e-4, 4e-4)
    assert (p.warmup_iters, p.ema_decay, p.ema_warmups, p.milestones, p.start) == \
        (100, 0.999, 200, (2,), "init")


@pytest.mark.parametrize("change, message", [
    ({"seeds": 2, "min_seeds": 3}, "never decide"),
    ({"control": "threads", "control_threads": 1}, "control_threads must differ"),
    ({"control": "avx512"}, "control must be one of"),
    ({"size": 150}, "multiple of 32"),
    ({"data": "imagenet"}, "data must be one of"),
    ({"start": "trained", "trained_steps": 0}, "trained_steps"),
    ({"margin": -1.0}, "margin"),
    ({"alpha": 0.5}, "alpha"),
    ({"num_train": 2}, "below one batch"),
    ({"expected_minutes": 0}, "expected_minutes"),
    ({"name": "a b"}, "name"),
])
def test_bad_profile_rows_are_named(change: dict, message: str) -> None:
    bad = dataclasses.replace(profile("cpu"), **change)
    with pytest.raises(ValueError, match=message):
        bad.validate()


def test_duplicate_and_unknown_profiles_are_errors() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        validate_table([profile("cpu"), profile("cpu")])
    with pytest.raises(ValueError, match="unknown nightly profile 'gpu'"):
        profile("gpu")


def test_coco_profile_needs_its_folder(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(nightly.COCO_ENV, raising=False)
    with pytest.raises(ValueError, match="RTDETR_PARITY_COCO"):
        nightly.prepare_inputs(profile("coco"), tmp_path)
    with pytest.raises(FileNotFoundError, match="lacks"):
        nightly.prepare_inputs(profile("coco"), tmp_path, dataset=str(tmp_path / "coco"))


def test_coco_subset_keeps_the_first_images_and_their_boxes(tmp_path) -> None:
    root = tmp_path / "coco"
    for split in ("train2017", "val2017"):
        (root / split).mkdir(parents=True)
        doc = {"images": [{"id": i, "file_name": f"{i}.jpg"} for i in (5, 3, 9, 1)],
               "annotations": [{"id": 10 + i, "image_id": i} for i in (5, 3, 9, 1, 1)],
               "categories": [{"id": 1, "name": "a"}]}
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))
    out = nightly.coco_subset(root, tmp_path / "subset", num_train=2, num_val=None)
    train = json.loads((out / "annotations" / "instances_train2017.json").read_text())
    assert [im["id"] for im in train["images"]] == [1, 3]
    assert sorted(a["image_id"] for a in train["annotations"]) == [1, 1, 3]
    val = json.loads((out / "annotations" / "instances_val2017.json").read_text())
    assert len(val["images"]) == 4
    assert (out / "train2017").resolve() == (root / "train2017").resolve()


# ------------------------------------------------------------------------ job and resume

# AP offset (fraction) of each role in the fake runs: Jittor 0.2 points above torch, the
# control 0.1 below.
FAKE_OFFSET = {"torch": 0.0, "jittor": 0.002, "control": -0.001}


class FakeLauncher(nightly.Launcher):
    """Writes what a trainer would (log.jsonl of every step and epoch) instead of training.

    ``stop_at``: the (1-based) launch that is stopped by a signal midway through its second
    epoch, as a trainer stopped by SIGTERM (its log keeps the steps done so far).
    """

    def __init__(self, prof: Profile, steps_per_epoch: int = 4, stop_at: int | None = None):
        super().__init__()
        self.prof, self.steps_per_epoch, self.stop_at = prof, steps_per_epoch, stop_at
        self.launched: list[tuple[str, bool]] = []

    def run(self, spec: nightly.RunSpec) -> int:
        if self.stopped:
            return -1
        spec.out.mkdir(parents=True, exist_ok=True)
        log = spec.out / "log.jsonl"
        resumed = log.is_file()
        self.launched.append((spec.name, resumed))
        done = len(nightly.read_log(log)) if resumed else 0
        lines = []
        ap = 0.5 + 0.01 * spec.seed + FAKE_OFFSET[spec.role] + 0.0005 * (spec.seed % 2)
        for epoch in range(self.prof.epochs):
            for i in range(self.steps_per_epoch):
                step = epoch * self.steps_per_epoch + i
                lines.append({"kind": "train", "epoch": epoch, "step": step,
                              "loss": 10.0 - 0.1 * step + 0.01 * spec.seed, "seconds": 0.1})
            lines.append({"kind": "eval", "epoch": epoch,
                          **{m: ap - 0.05 * (self.prof.epochs - 1 - epoch)
                             for m in nightly.AP_METRICS}})
        stop = len(self.launched) == self.stop_at
        if stop:
            lines = lines[:self.steps_per_epoch + 2]
        with open(log, "a") as f:
            for entry in lines[done:]:
                f.write(json.dumps(entry) + "\n")
        if stop:
            self.stopped = True
            return 143
        return 0


@pytest.fixture()
def job(tmp_path, monkeypatch):
    """A smoke-profile job of 3 seeds in tmp_path, inputs stubbed (nothing is trained)."""
    prof = dataclasses.replace(profile("smoke"), epochs=2, parallel=1)
    data, init = tmp_path / "data", tmp_path / "init.safetensors"
    monkeypatch.setattr(nightly, "prepare_inputs", lambda *a, **k: (data, init))
    kwargs = dict(out=tmp_path / "report", runs_dir=tmp_path / "runs", seeds=3,
                  progress=lambda line: None)
    return prof, kwargs


def test_interrupted_nightly_resumes_and_skips_finished_runs(job) -> None:
    prof, kwargs = job
    first = FakeLauncher(prof, stop_at=4)  # seed 1's torch run is stopped midway
    assert nightly.run_nightly(prof, launcher=first, **kwargs) == nightly.EXIT_INTERRUPTED
    runs = kwargs["runs_dir"]
    finished = sorted(p.parent.name for p in runs.glob("*/nightly_run.json"))
    stopped = first.launched[3][0]
    assert len(first.launched) == 4 and stopped not in finished
    assert len(finished) == 3
    assert not (kwargs["out"] / "summary.json").exists()

    with pytest.raises(ValueError, match="--resume"):  # earlier runs are never silently reused
        nightly.run_nightly(prof, launcher=FakeLauncher(prof), **kwargs)

    second = FakeLauncher(prof)
    assert nightly.run_nightly(prof, launcher=second, resume=True, **kwargs) == 0
    names = [name for name, _ in second.launched]
    assert sorted(names + finished) == sorted(f"{r}-seed{s}" for s in range(3)
                                              for r in nightly.ROLES)
    assert dict(second.launched)[stopped] is True  # resumed from its own log / checkpoint
    assert not any(resumed for name, resumed in second.launched if name != stopped)
    # The stopped run's two attempts are both counted in its wall time.
    attempts = nightly.read_log(runs / stopped / nightly.ATTEMPTS)
    assert [a["exit_code"] for a in attempts] == [143, 0]

    summary = json.loads((kwargs["out"] / "summary.json").read_text())
    assert summary["verdict"] == EQUIVALENT and summary["n"] == 3
    assert sorted(summary["runs_kept_from_earlier"]) == finished
    assert summary["effects_jittor_minus_torch"]["AP"]["mean"] == pytest.approx(0.2)
    assert summary["control"]["effects_control_minus_torch"]["AP"]["mean"] == pytest.approx(-0.1)
    runs_csv = pd.read_csv(kwargs["out"] / "runs.csv")
    assert len(runs_csv) == 9 and set(runs_csv["role"]) == set(nightly.ROLES)
    assert runs_csv.loc[runs_csv["role"] == "torch", "AP"].tolist() == pytest.approx(
        [50.0, 51.05, 52.0])
    curves = pd.read_csv(kwargs["out"] / "curves.csv")
    assert len(curves[curves["kind"] == "step"]) == 9 * 8
    assert len(curves[curves["kind"] == "epoch"]) == 9 * 2
    assert (kwargs["out"] / "nightly.png").stat().st_size > 10_000

    third = FakeLauncher(prof)  # all finished: nothing trains again
    assert nightly.run_nightly(prof, launcher=third, resume=True, **kwargs) == 0
    assert third.launched == []


def test_fresh_restarts_and_changed_settings_are_refused(job) -> None:
    prof, kwargs = job
    assert nightly.run_nightly(prof, launcher=FakeLauncher(prof), **kwargs) == 0
    changed = dataclasses.replace(prof, lr=2e-4)  # another recipe: the kept runs do not fit it
    with pytest.raises(ValueError, match="other settings"):
        nightly.run_nightly(changed, launcher=FakeLauncher(changed), resume=True, **kwargs)
    again = FakeLauncher(changed)
    assert nightly.run_nightly(changed, launcher=again, fresh=True, **kwargs) == 0
    assert len(again.launched) == 9 and not any(resumed for _, resumed in again.launched)
    with pytest.raises(ValueError, match="pick one"):
        nightly.run_nightly(prof, launcher=FakeLauncher(prof), resume=True, fresh=True, **kwargs)


def test_different_verdict_exits_non_zero(job, monkeypatch) -> None:
    prof, kwargs = job
    monkeypatch.setitem(FAKE_OFFSET, "jittor", -0.05)  # 5 AP points below torch on every seed
    assert nightly.run_nightly(prof, launcher=FakeLauncher(prof), **kwargs) == 1
    assert json.loads((kwargs["out"] / "summary.json").read_text())["verdict"] == DIFFERENT


def test_failed_run_is_an_error_not_a_verdict(job) -> None:
    prof, kwargs = job

    class Failing(FakeLauncher):
        def run(self, spec):
            code = super().run(spec)
            return 1 if spec.name == "jittor-seed1" else code

    assert nightly.run_nightly(prof, launcher=Failing(prof), **kwargs) == nightly.EXIT_FAILED_RUNS
    summary = json.loads((kwargs["out"] / "summary.json").read_text())
    assert summary["verdict"] == "error" and summary["failed_runs"] == ["jittor-seed1"]


def test_fault_runs_are_kept_apart_and_share_the_reference(tmp_path) -> None:
    prof = profile("smoke")
    specs = nightly.plan_runs(prof, 2, tmp_path, tmp_path / "d", tmp_path / "w.safetensors",
                              fault="bn-momentum")
    by = {s.name: s for s in specs}
    assert by["jittor-seed1"].out == tmp_path / "fault-bn-momentum" / "jittor-seed1"
    assert by["jittor-seed1"].fault == "bn-momentum"
    assert by["torch-seed1"].out == tmp_path / "torch-seed1" and by["torch-seed1"].fault is None
    assert by["control-seed0"].threads == prof.threads == 1
    assert dict(by["control-seed0"].env)["ATEN_CPU_CAPABILITY"] == "avx2"
    assert by["control-seed0"].environment()["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    assert by["torch-seed0"].env == () and by["jittor-seed0"].env == ()
    threads = dataclasses.replace(prof, control="threads", control_threads=2)
    control = nightly.plan_runs(threads, 1, tmp_path, tmp_path / "d", tmp_path / "w.safetensors")[2]
    assert control.threads == 2 and control.train_argv[-2:] == ("--threads", "2")
    assert "--threads" not in by["jittor-seed0"].train_argv
    assert by["jittor-seed0"].command()[3:5] == ["--fault", "bn-momentum"]
    clean = nightly.plan_runs(prof, 2, tmp_path, tmp_path / "d", tmp_path / "w.safetensors")
    assert clean[0].key() == specs[0].key() and clean[1].key() != specs[1].key()


def test_cli_errors(tmp_path, capsys) -> None:
    assert main(["nightly", "--profile", "smoke", "--fault", "no-such-fault",
                 "--runs", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "unknown fault ids ['no-such-fault']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["nightly", "--profile", "nope"])
    assert main(["nightly", "--profile", "smoke", "--seeds", "0", "--runs", str(tmp_path)]) == 2
    assert "--seeds must be at least 1" in capsys.readouterr().err


# --------------------------------------------------------------------------------- worker


def test_worker_applies_the_fault_only_while_the_command_runs(monkeypatch) -> None:
    import jittor_impl.nn as port_nn
    import parity.cli

    original = vars(port_nn.ReLU)["execute"]
    seen = []
    monkeypatch.setattr(parity.cli, "main",
                        lambda argv: seen.append((argv, vars(port_nn.ReLU)["execute"])) or 7)
    assert worker_main(["--fault", "relu-leaky", "train", "--x"]) == 7
    assert seen[0][0] == ["train", "--x"] and seen[0][1] is not original
    assert vars(port_nn.ReLU)["execute"] is original
    with pytest.raises(SystemExit):
        worker_main(["--fault", "no-such-fault", "train"])


def test_launcher_runs_the_worker_subprocess(tmp_path) -> None:
    spec = nightly.RunSpec("torch", 0, tmp_path / "run", 1, ("--help",))
    assert nightly.Launcher().run(spec) == 0
    assert "--init-weights" in (tmp_path / "run" / "train.out").read_text()


# ------------------------------------------------------------------------------ slow tier


@pytest.mark.slow
def test_fault_drill_on_the_smoke_profile_is_different(tmp_path) -> None:
    """Real training: the smoke profile with images fed to Jittor at 255x scale."""
    code = main(["nightly", "--profile", "smoke", "--fault", "data-images-255",
                 "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "report")])
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["verdict"] == DIFFERENT, summary["verdict_line"]
    assert code == 1
    assert summary["fault"] == "data-images-255"
