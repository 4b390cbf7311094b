"""The nightly job's profiles: a small table of :class:`Profile` rows (data, starting weights,
training recipe, seeds and the equivalence test's terms), read by :mod:`parity.nightly`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from rtdetr_common.configs import VARIANTS
from rtdetr_common.train_config import TrainConfig

DATA_KINDS = ("synthetic", "coco")
STARTS = ("trained", "init", "weights")
COCO_ENV = "RTDETR_PARITY_COCO"
WEIGHTS_ENV = "RTDETR_PARITY_COCO_WEIGHTS"
# The control runs: the reference with something changed that must not matter. ``threads``
# runs it with ``control_threads`` threads (another order of fp32 sums); ``avx2`` limits its CPU
# kernels (ATen, oneDNN, MKL) to AVX2: other vector widths, other rounding, still one thread
# (a second thread per run oversubscribes a machine that already runs one trainer per core).
CONTROLS = {
    "threads": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"},
}


@dataclass(frozen=True)
class Profile:
    """One nightly configuration: data, starting weights, recipe, seeds and the test's terms.

    Attributes:
        name: Profile id (``--profile``).
        what: What it is for, in a line.
        data: ``synthetic`` (the embedded dataset's first ``num_train`` / ``num_val`` images,
            generated on first use) or ``coco`` (COCO 2017 from ``--dataset`` or
            ``$RTDETR_PARITY_COCO``; the first images by id when counts are given).
        num_train: Train images (None: all).
        num_val: Val images (None: all).
        start: ``trained`` (the cached :mod:`parity.trained` checkpoint of ``trained_steps``
            iterations), ``init`` (the torch trainer's seeded initialisation, ``init_seed``) or
            ``weights`` (a file from ``--weights`` or ``$RTDETR_PARITY_COCO_WEIGHTS``).
        trained_steps: Iterations of the ``trained`` checkpoint's recipe.
        init_seed: Seed of the ``init`` weights (shared by every run; the runs' seeds vary
            data order, augmentation and denoising noise).
        variant, size, augment, batch_size, epochs, lr, backbone_lr, warmup_iters, ema_decay,
        ema_warmups, milestones: The ``rtdetr-parity train`` recipe.
        seeds: Seeds per role (``--seeds`` overrides).
        min_seeds: Fewest pairs that may give a verdict other than inconclusive.
        margin: Equivalence margin in AP points.
        alpha: One-sided level of each of the two tests (CI level ``1 - 2 * alpha``).
        threads: Threads of each run (the control's too, unless ``control`` is ``threads``).
        control: What the control changes: a key of :data:`CONTROLS`.
        control_threads: Threads of the control runs with ``control="threads"`` (must differ
            from ``threads``).
        parallel: Runs at a time.
        final_loss_steps: The final loss is the mean total loss of this many last steps.
        expected_minutes: Expected wall time of the whole job, on ``machine``.
        machine: Where ``expected_minutes`` holds, and whether it was measured or estimated.
    """

    name: str
    what: str
    data: str
    num_train: int | None
    num_val: int | None
    start: str
    trained_steps: int = 0
    init_seed: int = 0
    variant: str = "r18vd"
    size: int = 160
    augment: str = "light"
    batch_size: int = 4
    epochs: int = 1
    lr: float = 1e-4
    backbone_lr: float = 1e-4
    warmup_iters: int = 20
    ema_decay: float = 0.999
    ema_warmups: int = 100
    milestones: tuple[int, ...] = (1000,)
    seeds: int = 5
    min_seeds: int = 3
    margin: float = 1.0
    alpha: float = 0.05
    threads: int = 1
    control: str = "avx2"
    control_threads: int = 2
    parallel: int = 2
    final_loss_steps: int = 20
    expected_minutes: float = 0.0
    machine: str = ""

    def train_config(self) -> TrainConfig:
        """The recipe as a :class:`TrainConfig` (data and weights left unset)."""
        return TrainConfig(variant=self.variant, size=self.size, augment=self.augment,
                           batch_size=self.batch_size, epochs=self.epochs, lr=self.lr,
                           backbone_lr=self.backbone_lr, warmup_iters=self.warmup_iters,
                           ema_decay=self.ema_decay, ema_warmups=self.ema_warmups,
                           lr_milestones=list(self.milestones), threads=self.threads,
                           eval_every=1, log_every=1)

    def train_args(self) -> list[str]:
        """The recipe's ``rtdetr-parity train`` options."""
        return ["--variant", self.variant, "--size", str(self.size), "--augment", self.augment,
                "--batch-size", str(self.batch_size), "--epochs", str(self.epochs),
                "--lr", repr(self.lr), "--backbone-lr", repr(self.backbone_lr),
                "--warmup-iters", str(self.warmup_iters), "--ema-decay", repr(self.ema_decay),
                "--ema-warmups", str(self.ema_warmups),
                "--milestones", ",".join(str(m) for m in self.milestones),
                "--eval-every", "1", "--log-every", "1"]

    def control_threads_env(self) -> tuple[int, dict[str, str]]:
        """Thread count and extra environment of the control runs."""
        if self.control == "threads":
            return self.control_threads, {}
        return self.threads, dict(CONTROLS[self.control])

    def control_what(self) -> str:
        """What the control changes, in words."""
        if self.control == "threads":
            return f"torch with {self.control_threads} threads instead of {self.threads}"
        return ("torch with its CPU kernels limited to AVX2 ("
                + ", ".join(f"{k}={v}" for k, v in CONTROLS[self.control].items()) + ")")

    def validate(self) -> None:
        """Checks every field and the recipe (:meth:`TrainConfig.validate`).

        Raises:
            ValueError: Naming the profile and the first bad field.
        """
        def positive_or_none(v: int | None) -> bool:
            return v is None or (isinstance(v, int) and v > 0)

        checks = [
            (bool(self.name) and self.name.replace("-", "").isalnum(),
             f"name must be letters, digits and dashes, got {self.name!r}"),
            (self.data in DATA_KINDS, f"data must be one of {DATA_KINDS}, got {self.data!r}"),
            (positive_or_none(self.num_train) and positive_or_none(self.num_val),
             "num_train and num_val must be positive or None"),
            (self.data == "coco" or (self.num_train is not None and self.num_val is not None),
             "a synthetic profile needs num_train and num_val"),
            (self.start in STARTS, f"start must be one of {STARTS}, got {self.start!r}"),
            (self.start != "trained" or self.trained_steps > 0,
             "start 'trained' needs trained_steps > 0"),
            (self.start != "trained" or (self.data == "synthetic" and self.variant == "r18vd"),
             "start 'trained' is the r18vd checkpoint of the synthetic dataset"),
            (self.variant in VARIANTS, f"unknown variant {self.variant!r}"),
            (self.seeds >= 1, f"seeds must be at least 1, got {self.seeds}"),
            (self.min_seeds >= 2, f"min_seeds must be at least 2, got {self.min_seeds}"),
            (self.seeds >= self.min_seeds,
             f"seeds ({self.seeds}) below min_seeds ({self.min_seeds}): it could never decide"),
            (math.isfinite(self.margin) and self.margin > 0,
             f"margin must be a positive number of AP points, got {self.margin}"),
            (0 < self.alpha < 0.5, f"alpha must lie in (0, 0.5), got {self.alpha}"),
            (self.threads >= 1 and self.control_threads >= 1, "thread counts must be >= 1"),
            (self.control in CONTROLS, f"control must be one of {sorted(CONTROLS)}, got "
                                       f"{self.control!r}"),
            (self.control != "threads" or self.control_threads != self.threads,
             "control_threads must differ from threads (else the control repeats the reference)"),
            (self.parallel >= 1, f"parallel must be at least 1, got {self.parallel}"),
            (self.final_loss_steps >= 1, "final_loss_steps must be at least 1"),
            (self.expected_minutes > 0 and bool(self.machine),
             "expected_minutes and machine must be stated"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"profile {self.name!r}: {message}")
        try:
            self.train_config().validate()
        except ValueError as exc:
            raise ValueError(f"profile {self.name!r}: {exc}") from None
        if self.num_train is not None and self.num_train < self.batch_size:
            raise ValueError(f"profile {self.name!r}: num_train {self.num_train} is below one "
                             f"batch of {self.batch_size}")


# The table. Wall times: the cpu and smoke rows measured on a 2-core machine that other work
# shared (the README's Nightly section gives the figures), the others estimated.
PROFILES: tuple[Profile, ...] = (
    Profile("smoke", "a few iterations per run: tests, the fault drill, trying the job out",
            data="synthetic", num_train=40, num_val=50, start="trained", trained_steps=750,
            epochs=1, seeds=3, final_loss_steps=5, expected_minutes=5,
            machine="2 CPU cores shared with other work (measured)"),
    Profile("cpu", "fine-tuning from the cached trained checkpoint: decides on 2 CPU cores",
            data="synthetic", num_train=100, num_val=200, start="trained", trained_steps=750,
            epochs=2, seeds=6, expected_minutes=45,
            machine="2 CPU cores shared with other work (measured)"),
    Profile("scratch", "the README's from-scratch recipe (3 epochs x 250 iterations at 160)",
            data="synthetic", num_train=1000, num_val=200, start="init", init_seed=0,
            epochs=3, milestones=(2,), lr=4e-4, backbone_lr=4e-4, warmup_iters=100,
            ema_decay=0.999, ema_warmups=200, seeds=5, expected_minutes=360,
            machine="2 CPU cores shared with other work (estimated from the cpu profile's "
                    "measured per-step and evaluation times)"),
    Profile("coco", "COCO 2017: fine-tuning the official r18vd weights at 640 on a subset",
            data="coco", num_train=2000, num_val=500, start="weights", size=640,
            augment="official", lr=1e-5, backbone_lr=1e-6, warmup_iters=50, ema_decay=0.9999,
            ema_warmups=500, seeds=5, threads=4, control="threads", control_threads=8, parallel=2,
            final_loss_steps=50, expected_minutes=700,
            machine="16 CPU cores (estimated, not measured: 16x the pixels of the cpu "
                    "profile's 160 px per step; the trainers run on the CPU only)"),
)


def profile(name: str) -> Profile:
    """The profile of that name, validated.

    Raises:
        ValueError: For an unknown name or an invalid row.
    """
    known = {p.name: p for p in PROFILES}
    if name not in known:
        raise ValueError(f"unknown nightly profile {name!r}; choose one of {sorted(known)}")
    known[name].validate()
    return known[name]


def validate_table(profiles: Sequence[Profile] = PROFILES) -> None:
    """Every row valid and names unique.

    Raises:
        ValueError: On a duplicate name or an invalid row.
    """
    names = [p.name for p in profiles]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"duplicate nightly profile names {duplicates}")
    for p in profiles:
        p.validate()
