"""A small trained r18vd checkpoint that the project makes itself, for parity checks on
trained (not only seeded random) weights.

:func:`trained_checkpoint` trains r18vd from scratch with the torch trainer
(:class:`torch_ref.trainer.Trainer`) for a fixed number of iterations on the embedded synthetic
dataset, with a short version of the README's from-scratch recipe (light augmentation, batch 4,
rate 4e-4 for every group, linear warm-up, EMA 0.999; the warm-up lengths scale with the run)
on one thread (steady on a shared CPU, where more threads contend, and bit-reproducible),
and writes the EMA weights as a neutral ``.safetensors`` file. The default file is
``runs/trained/r18vd-synthetic-<recipe hash>.safetensors``: any change of the recipe or the
dataset names another file, and an existing one is reused. Beside it, ``<name>.json`` records
the recipe (every :class:`~rtdetr_common.train_config.TrainConfig` value), the loss of every
iteration, the val AP of the EMA model and the wall time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

from rtdetr_common.train_config import TrainConfig
from rtdetr_common.weights import atomic_write

RECIPE_VERSION = 1
VARIANT = "r18vd"
DEFAULT_STEPS = 90
DEFAULT_SIZE = 160
# README recipe: 750 iterations with 100 of warm-up and an EMA ramp of 200 updates.
_README_ITERS, _README_WARMUP, _README_EMA_WARMUPS = 750, 100, 200
# Fields that do not change the weights (or name machine-specific paths): left out of the hash.
_UNHASHED = ("dataset", "train_images", "train_ann", "val_images", "val_ann", "output_dir",
             "num_workers", "log_every", "eval_every", "eval_batch_size")


def recipe_config(*, steps: int = DEFAULT_STEPS, size: int = DEFAULT_SIZE, seed: int = 0,
                  dataset: str | Path | None = None) -> TrainConfig:
    """The training configuration of a ``steps``-iteration run (before resolution)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    return TrainConfig(
        variant=VARIANT, dataset=None if dataset is None else str(dataset), size=size,
        augment="light", batch_size=4, epochs=1, lr=4e-4, backbone_lr=4e-4,
        warmup_iters=max(1, round(steps * _README_WARMUP / _README_ITERS)),
        ema_decay=0.999, ema_warmups=max(1, round(steps * _README_EMA_WARMUPS / _README_ITERS)),
        seed=seed, threads=1, eval_every=0)


def _dataset_identity(dataset: str | Path | None) -> object:
    """What identifies the training data: a synthetic dataset's manifest, else its resolved path."""
    if dataset is None:
        from rtdetr_common.synthetic import DEFAULT_DATASET, _manifest

        return _manifest(DEFAULT_DATASET)
    manifest = Path(dataset) / "manifest.json"
    try:
        return json.loads(manifest.read_text())
    except (OSError, ValueError):
        return str(Path(dataset).resolve())


def recipe_hash(cfg: TrainConfig, steps: int) -> str:
    """12 hex digits identifying the recipe: every weight-relevant config value, the iteration
    count and the dataset."""
    values = {k: v for k, v in cfg.to_dict().items() if k not in _UNHASHED}
    key = {"recipe_version": RECIPE_VERSION, "steps": int(steps), "config": values,
           "dataset": _dataset_identity(cfg.dataset)}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def default_trained_dir() -> Path:
    """``<repo>/runs/trained`` in a source checkout, else ``runs/trained`` in the working folder."""
    repo = Path(__file__).resolve().parents[1]
    if (repo / "pyproject.toml").is_file():
        return repo / "runs" / "trained"
    return Path("runs") / "trained"


def recipe_path(path: str | Path) -> Path:
    """The JSON record beside a weight file (``<name>.json``)."""
    return Path(path).with_suffix(".json")


def trained_checkpoint(path: str | Path | None = None, *, steps: int = DEFAULT_STEPS,
                       size: int = DEFAULT_SIZE, seed: int = 0, force: bool = False,
                       dataset: str | Path | None = None, evaluate: bool = True) -> Path:
    """The path of a trained r18vd EMA weight file, training it first unless already there.

    Args:
        path: Weight file to write (``.safetensors``); None: the default file in
            :func:`default_trained_dir` named after the recipe hash.
        steps: Training iterations (batches of 4).
        size: Training size (multi-scale sizes scaled from it, as the trainer does).
        seed: Seed of the initialisation, data order, augmentation and denoising noise.
        force: Train again even when the file exists.
        dataset: COCO-format dataset root; None: the embedded synthetic dataset.
        evaluate: Record the val AP of the EMA model in the JSON record.

    Returns:
        The weight file. Its class count is the dataset's (5 for the embedded dataset).

    Raises:
        ValueError: If ``path`` exists but was made with another recipe (pass ``force``).
    """
    cfg = recipe_config(steps=steps, size=size, seed=seed, dataset=dataset)
    digest = recipe_hash(cfg, steps)
    if path is None:
        name = "synthetic" if dataset is None else Path(dataset).name
        path = default_trained_dir() / f"{VARIANT}-{name}-{digest}.safetensors"
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: the trained checkpoint is written as .safetensors")
    if path.is_file() and not force:
        try:
            recorded = json.loads(recipe_path(path).read_text()).get("recipe_hash")
        except (OSError, ValueError, AttributeError):
            recorded = None
        if recorded != digest:
            raise ValueError(f"{path} exists but its record {recipe_path(path)} names recipe "
                             f"{recorded!r}, not {digest!r}; pass force=True (--force) to "
                             f"replace it")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    _train(cfg, steps, digest, path, evaluate)
    return path


def _train(cfg: TrainConfig, steps: int, digest: str, path: Path, evaluate: bool) -> None:
    """Runs the recipe and writes the JSON record, then the weight file (both atomically)."""
    from rtdetr_common.run_log import advance, epoch_bar
    from rtdetr_common.train_config import train_loader
    from rtdetr_common.weights import WeightSet, save_neutral
    from torch_ref.trainer import Trainer

    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix=f".{path.stem}.", suffix=".run", dir=path.parent))
    try:
        trainer = Trainer(dataclasses.replace(cfg, output_dir=str(work)))
        loader = train_loader(trainer.cfg, trainer.dataset("train"), trainer.category_map)
        trainer.cfg.epochs = math.ceil(steps / len(loader))
        losses: list[float] = []
        bar = epoch_bar(steps, f"trained checkpoint ({path.name})")
        with trainer.runtime():  # the trainer's deterministic algorithms and thread count
            while len(losses) < steps:
                trainer.progress.epoch = loader.epoch
                for batch in loader:
                    trainer.set_lr()
                    losses.append(float(trainer.step(batch)["loss"]))
                    trainer.progress.global_step += 1
                    advance(bar, len(losses), f"loss {losses[-1]:.4f}")
                    if len(losses) == steps:
                        break
            bar.close()
            train_seconds = time.perf_counter() - start
            metrics = None
            if evaluate:
                metrics = {k: float(v) for k, v in trainer.evaluate("val").items()}
        ema = trainer.ema
        weights = {k: v.detach().numpy().copy() for k, v in ema.module.state_dict().items()}
        record = {
            "recipe_hash": digest, "recipe_version": RECIPE_VERSION, "steps": steps,
            "weights": path.name, "entry": "ema", "ema_updates": ema.updates,
            "num_classes": trainer.category_map.num_classes,
            "categories": trainer.category_map.names,
            "config": {k: v for k, v in trainer.cfg.to_dict().items() if k != "output_dir"},
            "train_seconds": round(train_seconds, 2),
            "total_seconds": round(time.perf_counter() - start, 2),
            "val_metrics": metrics, "losses": [round(x, 5) for x in losses],
        }
        text = json.dumps(record, indent=1) + "\n"
        atomic_write(recipe_path(path), lambda tmp: tmp.write_text(text))
        save_neutral(WeightSet(ema=weights, ema_updates=ema.updates, ema_warmups=ema.warmups), path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
