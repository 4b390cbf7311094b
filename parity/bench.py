"""Side-by-side speed and memory of the two implementations.

Each measurement runs in its own child process (one framework, one task), so the peak
resident memory it reports belongs to that framework alone; the parent runs them back to back
in one invocation and prints Jittor/PyTorch ratios. Times are medians of ``reps`` runs after
``warmup`` runs (Jittor compiles kernels during its first runs).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from dataclasses import dataclass


@dataclass
class BenchSpec:
    """One task to time in both frameworks."""

    task: str  # "eval" or "train"
    variant: str
    batch: int
    size: int


DEFAULT_SPECS = [
    BenchSpec("eval", "r18vd", 1, 640),
    BenchSpec("eval", "r50vd", 1, 640),
    BenchSpec("train", "r18vd", 2, 640),
]


def _measure(framework: str, spec: BenchSpec, warmup: int, reps: int, device: str = "cpu") -> dict:
    """Runs in the child: builds the model with seeded weights on ``device`` and times the
    task (on CUDA each timed run ends when the device has finished it)."""
    if framework == "jittor":
        import jittor_impl as impl
        import jittor as jt
        from jittor_impl import devices, engine
        from jittor_impl.checkpoint import load_state_dict_strict, state_dict_specs

        devices.use(device)
    else:
        import torch
        import torch_ref as impl
        from torch_ref import devices, engine
        from torch_ref.checkpoint import load_state_dict_strict, state_dict_specs

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        where = devices.use(device)
    from rtdetr_common.configs import variant_at_size
    from rtdetr_common.seeded import seeded_images, seeded_state_dict, seeded_targets

    cfg = variant_at_size(spec.variant, 80, spec.size)
    model = impl.build_model(cfg, multi_scale=False)
    sd = seeded_state_dict(state_dict_specs(model.state_dict()), 0)
    if framework == "torch":
        sd = {k: torch.from_numpy(v) for k, v in sd.items()}
    load_state_dict_strict(model, sd, "seeded:0")
    if framework == "torch":
        model.to(where)
    images = seeded_images(spec.batch, spec.size, seed=1)
    targets = seeded_targets([5] * spec.batch, 80, seed=3)

    if spec.task == "eval":
        model.eval()
        if framework == "jittor":
            x = jt.array(images)

            def step() -> None:
                with jt.no_grad():
                    out = model(x)
                    jt.sync([out["pred_logits"], out["pred_boxes"]])
        else:
            x = torch.from_numpy(images).to(where)

            def step() -> None:
                with torch.no_grad():
                    model(x)
                if where.type == "cuda":
                    torch.cuda.synchronize(where)
    else:
        model.train()
        criterion = impl.build_criterion(cfg)
        optimizer = impl.build_optimizer(model, cfg)
        clip = cfg.schedule.clip_max_norm
        if framework == "jittor":
            x = jt.array(images)
            tg = [{"labels": jt.array(t["labels"]).int64(), "boxes": jt.array(t["boxes"])}
                  for t in targets]
        else:
            x = torch.from_numpy(images).to(where)
            tg = [{k: torch.from_numpy(v).to(where) for k, v in t.items()} for t in targets]

        def step() -> None:
            engine.train_step(model, criterion, optimizer, x, tg, clip)

    for _ in range(warmup):
        step()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"framework": framework, "device": device, "median_s": statistics.median(times),
            "times_s": times, "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB since its program started: Linux's ``VmHWM``
    (per address space, so not inherited from the parent that started it), else ``ru_maxrss``
    (which a child keeps from its parent across ``exec``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(framework: str, spec: BenchSpec, warmup: int, reps: int, device: str = "cpu") -> dict:
    """Measures one framework on one spec in a fresh Python process."""
    cmd = [sys.executable, "-m", "parity.bench", "--child", framework, spec.task, spec.variant,
           str(spec.batch), str(spec.size), str(warmup), str(reps), device]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark child {framework} {spec} failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("BENCH "):])


def run_bench(specs: list[BenchSpec], warmup: int = 2, reps: int = 5,
              device: str = "cpu") -> list[dict]:
    """Times every spec in both frameworks on ``device``; returns one row per spec with both
    results (peak memory is the host process's resident memory on either device)."""
    rows = []
    for spec in specs:
        th = run_child("torch", spec, warmup, reps, device)
        jt_ = run_child("jittor", spec, warmup, reps, device)
        rows.append({"task": spec.task, "variant": spec.variant, "device": device, "batch": spec.batch,
                     "size": spec.size, "torch_s": th["median_s"], "jittor_s": jt_["median_s"],
                     "time_ratio": jt_["median_s"] / th["median_s"],
                     "torch_peak_mb": th["peak_rss_mb"], "jittor_peak_mb": jt_["peak_rss_mb"],
                     "mem_ratio": jt_["peak_rss_mb"] / th["peak_rss_mb"]})
    return rows


# Console columns of the benchmark table: (label, row key, format).
_BENCH_COLUMNS = (("task", "task", None), ("variant", "variant", None), ("device", "device", None),
                  ("batch", "batch", "d"),
                  ("size", "size", "d"), ("torch s", "torch_s", ".3f"),
                  ("jittor s", "jittor_s", ".3f"), ("J/T time", "time_ratio", ".2f"),
                  ("torch MB", "torch_peak_mb", ".0f"), ("jittor MB", "jittor_peak_mb", ".0f"),
                  ("J/T mem", "mem_ratio", ".2f"))


def loader_throughput(workers: list[int], size: int = 640, batch: int = 4, batches: int = 8,
                      dataset: str | None = None, seed: int = 0) -> list[dict]:
    """Images per second of the training loader (official augmentation and multi-scale) with
    each worker count, over ``batches`` batches after a first one (which starts the pool).

    Args:
        workers: Worker counts to time, one row each.
        size: The training size (the multi-scale sizes scale with it, as the trainers do).
        batch: Images per batch.
        batches: Timed batches.
        dataset: A COCO-format folder; None: the embedded synthetic dataset.
        seed: The loader's seed.
    """
    from rtdetr_common.train_config import TrainConfig, open_split, train_loader

    rows = []
    for count in workers:
        cfg = TrainConfig(dataset=dataset, size=size, batch_size=batch, num_workers=count,
                          seed=seed).resolved()
        split = open_split(cfg, "train", True)
        if len(split) < (batches + 1) * batch:
            raise ValueError(f"the dataset has {len(split)} train images; {batches + 1} batches "
                             f"of {batch} need {(batches + 1) * batch}")
        with train_loader(cfg, split, split.category_map) as loader:
            feed = iter(loader)
            first = next(feed)
            start = time.perf_counter()
            for _ in range(batches):
                next(feed)
            seconds = time.perf_counter() - start
            feed.close()
        rows.append({"workers": count, "size": size, "batch": batch, "batches": batches,
                     "images_per_s": batches * batch / seconds,
                     "float32_mb_per_batch": first.images.nbytes / 2**20,
                     "shipped_mb_per_batch": first.images.nbytes / 2**20 / (4 if split.can_defer_float() else 1)})
    return rows


def format_rows(rows: list[dict]) -> str:
    """The benchmark rows as a console table (median seconds, peak RSS and Jittor/PyTorch ratios)."""
    import pandas as pd

    from .tables import text_table

    frame = pd.DataFrame([{label: r[key] for label, key, _ in _BENCH_COLUMNS} for r in rows],
                         columns=[label for label, _, _ in _BENCH_COLUMNS])
    return text_table(frame, {label: spec for label, _, spec in _BENCH_COLUMNS if spec})


def _child_main(argv: list[str]) -> None:
    framework, task, variant, batch, size, warmup, reps, device = argv
    spec = BenchSpec(task, variant, int(batch), int(size))
    result = _measure(framework, spec, int(warmup), int(reps), device)
    print("BENCH " + json.dumps(result), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="benchmark child process (internal)")
    parser.add_argument("--child", nargs=8, required=True)
    _child_main(parser.parse_args().child)


def current_rss_mb() -> float:
    """Resident memory of this process now, in MiB (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def live_rss_mb() -> float:
    """Resident memory after glibc returns its freed heap pages to the OS (``malloc_trim``).

    Plain RSS keeps the allocator's high-water mark: heap fragments freed by numpy, scipy
    and Jittor stay resident, and their number drifts up over hundreds of steps without any
    live object behind them. Trimming first measures what the process actually holds.
    """
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return current_rss_mb()


def jittor_memory_growth(variant: str = "r18vd", size: int = 320, batch: int = 2,
                         checkpoints: tuple[int, ...] = (20, 200), ema: bool = True) -> list[dict]:
    """Trains the Jittor model and records memory and live Vars at the given step counts.

    Lazy evaluation that keeps any graph alive between steps (a BatchNorm statistic, an EMA
    average, a loss value never synchronised) shows up as live Vars and memory growing with
    the step count; a correct training loop is flat after its first steps.

    Returns:
        One row per checkpoint: ``step``, ``rss_mb`` (live, see :func:`live_rss_mb`),
        ``rss_untrimmed_mb`` and ``lived_vars``.
    """
    import jittor as jt

    import jittor_impl as impl
    from jittor_impl import engine
    from jittor_impl.checkpoint import load_state_dict_strict, state_dict_specs
    from rtdetr_common.configs import variant_at_size
    from rtdetr_common.seeded import seeded_images, seeded_state_dict, seeded_targets

    cfg = variant_at_size(variant, 80, None)
    model = impl.build_model(cfg, multi_scale=False)
    load_state_dict_strict(model, seeded_state_dict(state_dict_specs(model.state_dict()), 0),
                           "seeded:0")
    model.train()
    criterion = impl.build_criterion(cfg)
    optimizer = impl.build_optimizer(model, cfg)
    averager = impl.build_ema(model, cfg) if ema else None
    x = jt.array(seeded_images(batch, size, seed=1))
    targets = [{"labels": jt.array(t["labels"]).int64(), "boxes": jt.array(t["boxes"])}
               for t in seeded_targets([5] * batch, 80, seed=3)]
    rows = []
    for step in range(1, max(checkpoints) + 1):
        engine.train_step(model, criterion, optimizer, x, targets, cfg.schedule.clip_max_norm,
                          averager)
        if step in checkpoints:
            jt.gc()
            untrimmed = current_rss_mb()
            rows.append({"step": step, "rss_mb": live_rss_mb(), "rss_untrimmed_mb": untrimmed,
                         "lived_vars": jt.number_of_lived_vars()})
    return rows
