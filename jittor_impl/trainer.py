"""Training, evaluation and inference of one RT-DETR variant with exact resume (Jittor).

A :class:`Trainer` owns the model, criterion, postprocessor, AdamW over the official parameter
groups, the EMA and the data (:mod:`rtdetr_common.pipeline`, numpy batches identical for both
frameworks). Every iteration is :func:`jittor_impl.engine.train_step`; the learning rate of each
group is set before it from :func:`rtdetr_common.train_config.lr_factor`.

Checkpoints (``<output_dir>/last.pkl``, written atomically at the end of every epoch and when
SIGTERM/SIGINT stops the run after the current step) hold ``model`` and ``ema`` in the official
layout, so any loader of this project reads them as weights, plus ``optimizer`` and
``train_state``: the config, epoch/iteration counters, the data loader's position and the
model's shared random stream (denoising noise). Nothing else draws random numbers during
training, so a resumed run repeats exactly what the uninterrupted run would have computed.

Differences from torch_ref/trainer.py:
- Checkpoints are pickles of numpy arrays and plain Python values (``last.pkl``), read back with
  a numpy-only unpickler (:func:`rtdetr_common.train_config.read_numpy_pickle`), so a file
  cannot run code. Weights are stored in the official layout (0-dim ``num_batches_tracked``).
- Jittor's optimizers have no usable ``state_dict`` (it pickles the parameter Vars
  themselves): :func:`optimizer_state` / :func:`load_optimizer_state` save and restore
  :class:`jittor_impl.engine.AdamW`'s step count ``n_step`` and each group's rate, per-parameter
  update counts (``steps``) and first/second moments (``m`` / ``values``) by position.
  Groups without an explicit rate get one (``optimizer.lr``) so the schedule can set it.
- Jittor evaluates lazily: after each step the optimizer's moment Vars are synced with the
  weights, so every step starts from materialised values, as a resumed run does (without the
  sync a step could fuse the previous step's pending moment update into its own kernels and
  round differently from the resumed run).
- There is no ``_runtime`` context: Jittor's CPU kernels have no non-deterministic variants to
  switch off, and its thread count is fixed when it starts (``OMP_NUM_THREADS``), so
  ``TrainConfig.threads`` applies to the torch trainer only.
- The model is seeded with ``jt.set_global_seed`` (torch: ``torch.manual_seed``); a run from
  scratch therefore starts from other weights than the torch run unless ``init_weights`` is
  given.
- Initial weights are read with :func:`jittor_impl.checkpoint.read_weightset` (``.pkl``,
  ``.safetensors``, ``.npz``); a ``.pth`` must be converted first (``rtdetr-parity convert``).
- ``module.train(mode)`` is ``module.train()`` (Jittor's takes no argument); ``no_grad`` is
  ``jt.no_grad``; targets' int64 labels are cast with ``.int64()`` (``jt.array`` would make
  them int32).
"""

from __future__ import annotations

import contextlib
import pickle
import time
from pathlib import Path
from typing import Iterator, Sequence, TextIO

import jittor as jt
import numpy as np
from jittor import nn

from rtdetr_common import coco_eval
from rtdetr_common.coco import CategoryMap
from rtdetr_common.coco_eval import CocoMetrics
from rtdetr_common.pipeline.coco_dataset import CocoDetection
from rtdetr_common.pipeline.loader import Batch
from rtdetr_common.pipeline.transforms import eval_transforms
from rtdetr_common.random import SharedRandom
from rtdetr_common.train_config import (JsonLog, Progress, ProgressBar, StopOnSignal, TrainConfig,
                                        TrainResult, backbone_base_lr, categories_of,
                                        check_train_state, checkpoint_path, config_differences,
                                        eval_due, eval_loader, loss_entry, lr_factor, open_split,
                                        read_numpy_pickle, report_metrics, train_loader,
                                        train_state, variant_config)
from rtdetr_common.weights import WeightSet, atomic_write

from .build import build_criterion, build_ema, build_model, build_optimizer, build_postprocessor
from .checkpoint import load_state_dict_strict, model_state_dict, read_weightset
from .engine import AdamW, train_step

FRAMEWORK = "jittor"
CHECKPOINT_SUFFIX = ".pkl"


def read_weights(path: str | Path) -> WeightSet:
    """Reads model/EMA weights from a Jittor ``.pkl`` or a neutral file."""
    return read_weightset(path)


def to_tensors(batch: Batch) -> tuple[jt.Var, list[dict]]:
    """A loader batch as model inputs: images [bs, 3, S, S] and ``labels`` / ``boxes`` targets."""
    images = jt.array(batch.images)
    targets = [{"labels": jt.array(t["labels"]).int64(), "boxes": jt.array(t["boxes"])}
               for t in batch.targets]
    return images, targets


def optimizer_moments(optimizer: AdamW) -> list[jt.Var]:
    """Every first and second moment Var of AdamW (``m`` and ``values`` of each group)."""
    return [v for g in optimizer.param_groups for key in ("m", "values") for v in g[key]]


def optimizer_state(optimizer: AdamW) -> dict:
    """AdamW's step count and each group's rate, update counts and moments (numpy arrays)."""
    return {"n_step": int(optimizer.n_step),
            "groups": [{"lr": float(g["lr"]), "steps": list(g["steps"]),
                        "m": [v.numpy() for v in g["m"]],
                        "values": [v.numpy() for v in g["values"]]}
                       for g in optimizer.param_groups]}


def load_optimizer_state(optimizer: AdamW, state: dict, source: str) -> None:
    """Restores :func:`optimizer_state` output into an AdamW over the same parameter groups.

    Raises:
        ValueError: If the groups or moment shapes differ.
    """
    groups = state["groups"]
    if len(groups) != len(optimizer.param_groups):
        raise ValueError(f"{source}: optimizer state has {len(groups)} parameter groups, the "
                         f"optimizer {len(optimizer.param_groups)}")
    for index, (saved, group) in enumerate(zip(groups, optimizer.param_groups)):
        for key in ("m", "values"):
            shapes = [tuple(v.shape) for v in group[key]]
            found = [tuple(np.shape(v)) for v in saved[key]]
            if shapes != found:
                raise ValueError(f"{source}: optimizer group {index} '{key}' shapes differ from "
                                 f"the model's parameters")
            for var, value in zip(group[key], saved[key]):
                var.update(jt.array(value))
        # Checkpoints written before per-parameter counts: every parameter had taken every
        # step (exact unless a batch without any target left the denoising embedding out).
        steps = saved.get("steps", [int(state["n_step"])] * len(group["params"]))
        if len(steps) != len(group["params"]):
            raise ValueError(f"{source}: optimizer group {index} has {len(steps)} step counts "
                             f"for {len(group['params'])} parameters")
        group["steps"] = [int(n) for n in steps]
        group["lr"] = float(saved["lr"])
    optimizer.n_step = int(state["n_step"])
    jt.sync(optimizer_moments(optimizer))


class Trainer:
    """Trains, evaluates and runs one RT-DETR variant as configured.

    Args:
        cfg: The run's configuration (resolved here: dataset paths, multi-scale sizes).
        category_map: Labels <-> category ids; None reads them from the train annotations.
            Inference without a dataset passes one.

    Attributes:
        cfg: The resolved configuration.
        category_map: The dataset's categories; the model predicts ``len(category_map)`` classes.
        variant: The variant config built from ``cfg`` (optimizer, schedule, EMA values).
        model: RTDETR in training mode (built without multi-scale: the loader resizes).
        criterion: SetCriterion.
        postprocessor: RTDETRPostProcessor (labels 0..K-1, boxes in original pixels).
        optimizer: AdamW over the official regex groups (every group with an explicit ``lr``).
        base_lrs: Each group's rate before the schedule factor.
        backbone_lr: The backbone groups' rate before the schedule factor (logged).
        ema: ModelEMA of the model, or None when ``cfg.use_ema`` is False.
        progress: Epoch / iteration counters.
        loader_state: The train loader's position to resume from.

    Raises:
        ValueError: If the config is invalid or ``cfg.num_classes`` differs from the dataset.
        FileNotFoundError: If the dataset or the initial weights are missing.
        StateDictMismatchError: If the initial weights do not fit the variant.
    """

    def __init__(self, cfg: TrainConfig, category_map: CategoryMap | None = None) -> None:
        self.cfg = cfg.resolved(data=category_map is None)
        self._datasets: dict[tuple[str, bool], CocoDetection] = {}
        self.category_map = category_map or self.dataset("train").category_map
        num_classes = self.category_map.num_classes
        if self.cfg.num_classes is not None and self.cfg.num_classes != num_classes:
            raise ValueError(f"TrainConfig.num_classes={self.cfg.num_classes}, but the dataset has "
                             f"{num_classes} categories ({self.category_map.names})")
        self.cfg.num_classes = num_classes
        self.variant = variant_config(self.cfg, num_classes)
        jt.set_global_seed(self.cfg.seed)
        self.model = build_model(self.variant, multi_scale=False, seed=self.cfg.seed)
        if self.cfg.init_weights is not None:
            ws = read_weights(self.cfg.init_weights)
            state_dict, entry = ws.preferred(self.cfg.init_entry)
            load_state_dict_strict(self.model, state_dict, f"{self.cfg.init_weights} [{entry}]")
        self.criterion = build_criterion(self.variant)
        self.postprocessor = build_postprocessor(self.variant)
        self.optimizer = build_optimizer(self.model, self.variant)
        for group in self.optimizer.param_groups:
            group.setdefault("lr", self.optimizer.lr)
        self.base_lrs = [float(g["lr"]) for g in self.optimizer.param_groups]
        self.backbone_lr = backbone_base_lr(self.variant)
        self.ema = build_ema(self.model, self.variant) if self.cfg.use_ema else None
        self.progress = Progress()
        self.loader_state = {"epoch": 0, "position": 0}

    # ------------------------------------------------------------------------------ data

    def model_weights(self) -> dict[str, np.ndarray]:
        """The model's state_dict as numpy arrays (official keys), e.g. to start other runs from."""
        return model_state_dict(self.model)

    def dataset(self, split: str, train: bool = True) -> CocoDetection:
        """The split's dataset with training (``train``) or evaluation transforms, cached."""
        if (split, train) not in self._datasets:
            self._datasets[split, train] = open_split(self.cfg, split, train)
        return self._datasets[split, train]

    # ------------------------------------------------------------------------------ training

    def set_lr(self) -> float:
        """Sets every group's rate for the next iteration; returns the schedule factor."""
        factor = lr_factor(self.cfg, self.progress.epoch, self.progress.global_step)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor
        return factor

    def step(self, batch: Batch) -> dict[str, float]:
        """One optimisation step on a loader batch at the rates currently set.

        Returns:
            Every loss term and their sum (``loss``).

        Raises:
            FloatingPointError: If the total loss is not finite (nothing is saved).
        """
        images, targets = to_tensors(batch)
        losses = train_step(self.model, self.criterion, self.optimizer, images, targets,
                            self.cfg.clip_max_norm, self.ema)
        jt.sync(optimizer_moments(self.optimizer))
        if not np.isfinite(losses["loss"]):
            raise FloatingPointError(f"loss is {losses['loss']} at epoch {self.progress.epoch} "
                                     f"step {self.progress.global_step}; stopping (the last "
                                     f"checkpoint is {checkpoint_path(self.cfg, CHECKPOINT_SUFFIX)})")
        return losses

    def train(self, stream: TextIO | None = None) -> TrainResult:
        """Trains to ``cfg.epochs``, resuming from ``<output_dir>/last.pkl`` when it exists.

        Writes a JSON line every ``log_every`` iterations to ``log.jsonl``, a progress bar to
        ``stream`` (stderr by default), a checkpoint after every epoch, and evaluates every
        ``eval_every`` epochs and after the last. SIGTERM or SIGINT ends the current step,
        writes the checkpoint (with the loader's position) and returns with ``interrupted`` set.

        Raises:
            ValueError: If the checkpoint to resume was written with a different config.
            FloatingPointError: If a loss is not finite.
        """
        out = Path(self.cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        ckpt = checkpoint_path(self.cfg, CHECKPOINT_SUFFIX)
        resumed = None
        if ckpt.is_file():
            self.load_training_checkpoint(ckpt)
            resumed = ckpt
        log = JsonLog(out / "log.jsonl")
        log.truncate_to(self.progress)
        loader = train_loader(self.cfg, self.dataset("train"), self.category_map)
        loader.load_state_dict(self.loader_state)
        metrics = None
        with StopOnSignal() as stop:
            while self.progress.epoch < self.cfg.epochs:
                epoch = self.progress.epoch
                bar = ProgressBar(len(loader), f"{FRAMEWORK} epoch {epoch + 1}/{self.cfg.epochs}",
                                  stream, loader.position)
                for batch in loader:
                    start = time.perf_counter()
                    factor = self.set_lr()
                    losses = self.step(batch)
                    self.progress.iteration = loader.position
                    if self.progress.global_step % self.cfg.log_every == 0:
                        log.write(loss_entry(self.progress, self.cfg.lr * factor,
                                             self.backbone_lr * factor, losses,
                                             time.perf_counter() - start))
                    self.progress.global_step += 1
                    bar.update(self.progress.iteration, f"loss {losses['loss']:.4f}")
                    if stop.signum is not None:
                        break
                bar.close()
                if stop.signum is not None and loader.epoch == epoch and loader.position < len(loader):
                    self.loader_state = loader.state_dict()
                    self.save_training_checkpoint(ckpt)
                    return TrainResult(self.progress, ckpt, stop.name, resumed, metrics)
                self.progress.epoch, self.progress.iteration = epoch + 1, 0
                self.loader_state = {"epoch": epoch + 1, "position": 0}
                loader.load_state_dict(self.loader_state)
                self.save_training_checkpoint(ckpt)
                if eval_due(self.cfg, epoch):
                    metrics = self.evaluate("val")
                    log.write({"kind": "eval", "epoch": epoch, **metrics})
                    report_metrics(epoch, metrics, stream)
                if stop.signum is not None:
                    return TrainResult(self.progress, ckpt, stop.name, resumed, metrics)
        return TrainResult(self.progress, ckpt, "", resumed, metrics)

    # ------------------------------------------------------------------------------ checkpoints

    def save_training_checkpoint(self, path: str | Path) -> None:
        """Writes model, EMA, optimizer and train state to ``path`` atomically.

        The previous file stays in place until the new one is complete.
        """
        obj = {
            "model": model_state_dict(self.model),
            "optimizer": optimizer_state(self.optimizer),
            "train_state": train_state(self.cfg, self.progress, self.loader_state,
                                       self.model.rng.state_dict(), FRAMEWORK,
                                       categories_of(self.category_map.names,
                                                     self.category_map.category_ids)),
        }
        if self.ema is not None:
            obj["ema"] = {"module": model_state_dict(self.ema.module), "updates": self.ema.updates,
                          "warmups": self.ema.warmups}

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                pickle.dump(obj, f, protocol=4)

        atomic_write(path, write)

    def load_training_checkpoint(self, path: str | Path) -> None:
        """Restores everything :meth:`save_training_checkpoint` wrote.

        Raises:
            ValueError: If ``path`` is not a Jittor training checkpoint, or its config differs
                from this trainer's in a field outside ``RESUME_EXEMPT``.
            StateDictMismatchError: If its weights do not fit the model.
        """
        obj = read_numpy_pickle(path)
        state = check_train_state(obj.get("train_state"), str(path), FRAMEWORK)
        differences = config_differences(state["config"], self.cfg)
        if differences:
            raise ValueError(f"refusing to resume {path}: it was written with another config "
                             f"(use a new output folder, or the same settings):\n  "
                             + "\n  ".join(differences))
        load_state_dict_strict(self.model, obj["model"], f"{path} [model]")
        if self.ema is not None:
            self.ema.load_state_dict(obj["ema"])
        load_optimizer_state(self.optimizer, obj["optimizer"], str(path))
        self.model.rng.load_state_dict(state["rng"])
        self.progress = Progress(**state["progress"])
        self.loader_state = dict(state["loader"])

    # ------------------------------------------------------------------------------ evaluation

    def _eval_module(self) -> nn.Module:
        """The model evaluation uses: the EMA when kept, else the trained model."""
        return self.ema.module if self.ema is not None else self.model

    @contextlib.contextmanager
    def _inference(self) -> Iterator[nn.Module]:
        """The evaluation module in eval mode under ``no_grad``; the trained model's mode is restored."""
        module = self._eval_module()
        was_training = module.training
        module.eval()
        try:
            with jt.no_grad():
                yield module
        finally:
            if was_training:
                module.train()

    def detect(self, module: nn.Module, images: np.ndarray,
               orig_sizes: np.ndarray) -> list[dict[str, np.ndarray]]:
        """Detections of one batch in original-image pixels.

        Args:
            module: The model in eval mode.
            images: float32 [bs, 3, size, size] in [0, 1].
            orig_sizes: [bs, 2] original sizes as (width, height).

        Returns:
            Per image ``labels`` int64 [k], ``boxes`` float32 [k, 4] xyxy, ``scores`` float32 [k].
        """
        outputs = module(jt.array(images))
        results = self.postprocessor(outputs, jt.array(orig_sizes.astype(np.float32)))
        return [{k: v.numpy() for k, v in r.items()} for r in results]

    def evaluate(self, split: str = "val") -> CocoMetrics:
        """COCO bbox AP of the EMA model (else the model) on a split.

        Writes the detections to ``<output_dir>/results_<split>.json``.

        Returns:
            AP, AP50, AP75, APs, APm, APl in [0, 1] (``.summary`` holds the COCOeval table).
        """
        dataset = self.dataset(split, train=False)
        loader = eval_loader(self.cfg, dataset)
        image_ids, results = [], []
        with self._inference() as module:
            for batch in loader:
                sizes = np.stack([t["orig_size"] for t in batch.targets])  # [bs, 2] (w, h)
                results.extend(self.detect(module, batch.images, sizes))
                image_ids.extend(t["image_id"] for t in batch.targets)
        detections = coco_eval.detections_to_coco(image_ids, results, self.category_map)
        out = Path(self.cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        coco_eval.write_results_json(out / f"results_{split}.json", detections)
        return coco_eval.evaluate(dataset.coco, detections)

    def predict(self, images: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Detections of images with the EMA model (else the model), all ``num_top_queries`` kept.

        Args:
            images: uint8 [H, W, 3] RGB arrays of any sizes.

        Returns:
            Per image ``labels`` (contiguous, see :attr:`category_map`), ``boxes`` xyxy in the
            image's pixels and ``scores``, best first.
        """
        transforms = eval_transforms(self.cfg.size)
        results = []
        with self._inference() as module:
            for image in images:
                image = np.asarray(image)
                if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                    raise ValueError(f"predict takes uint8 [H, W, 3] RGB images, got "
                                     f"{image.dtype} {image.shape}")
                target = {"boxes": np.zeros((0, 4), np.float32)}
                tensor, _ = transforms(image, target, SharedRandom(self.cfg.seed))
                size = np.array([[image.shape[1], image.shape[0]]])  # [1, 2] (w, h)
                results.extend(self.detect(module, tensor[None], size))  # [1, 3, size, size]
        return results
