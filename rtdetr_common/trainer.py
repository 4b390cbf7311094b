"""The training, evaluation and inference loop of one RT-DETR variant, written once.

:class:`BaseTrainer` owns the loop that the nightly comparison holds equal between the two
frameworks: the configuration, the data (:mod:`rtdetr_common.pipeline`, numpy batches identical
for both), the learning-rate schedule, logging, the stop on SIGTERM/SIGINT, exact resume, COCO
evaluation and inference. ``torch_ref.trainer.Trainer`` and ``jittor_impl.trainer.Trainer``
subclass it and supply only what differs between the frameworks, under the same names: the
builders, seeding, tensors in and out, the optimisation step, no-grad, the runtime settings,
and the checkpoint file.

Checkpoints (``<output_dir>/last<suffix>``, written atomically at the end of every epoch and
when SIGTERM/SIGINT stops the run after the current step) hold ``model`` and ``ema`` in the
official layout, plus ``optimizer`` and ``train_state``: the config, epoch/iteration counters,
the data loader's position and the model's shared random stream (denoising noise). Nothing else
draws random numbers during training, so a resumed run repeats exactly what the uninterrupted
run would have computed.

Launched as several processes (``torchrun`` for torch, ``mpirun`` for Jittor), every process
trains on its shard of each global batch of ``cfg.batch_size`` images, with BatchNorm
statistics, gradients, the box normaliser and the denoising queries of the whole global batch,
so that the run equals a one-process run; process 0 alone writes the log, the checkpoints and
evaluates, and every process stops at the same step.
"""

from __future__ import annotations

import contextlib
import signal
import time
from pathlib import Path
from typing import Any, ContextManager, Iterator, Sequence, TextIO

import numpy as np

from . import coco_eval
from .distributed import first_signal, mean_over_processes
from .coco import CategoryMap
from .coco_eval import CocoMetrics
from .pipeline.coco_dataset import CocoDetection
from .pipeline.loader import Batch
from .pipeline.transforms import eval_transforms
from .random import SharedRandom
from .run_log import JsonLog, advance, epoch_bar, loss_entry, report_metrics
from .run_state import (Progress, TrainResult, categories_of, check_train_state, checkpoint_path,
                        train_state)
from .signals import StopOnSignal
from .state_dicts import TensorSpec, backbone_entries, check_backbone, presnet_depth
from .train_config import (TrainConfig, backbone_base_lr, config_differences, eval_due, eval_loader,
                           lr_factor, open_split, train_loader, variant_config)
from .weights import WeightSet, atomic_write


def _specs(state: dict[str, np.ndarray]) -> dict[str, TensorSpec]:
    return {k: TensorSpec(tuple(np.shape(v)), str(np.asarray(v).dtype)) for k, v in state.items()}


class BaseTrainer:
    """Trains, evaluates and runs one RT-DETR variant as configured (framework-neutral part).

    Args:
        cfg: The run's configuration (resolved here: dataset paths, multi-scale sizes).
        category_map: Labels <-> category ids; None reads them from the train annotations.
            Inference without a dataset passes one.

    Attributes:
        cfg: The resolved configuration.
        device: Where the framework computes (its ``devices.use`` of ``cfg.device``).
        category_map: The dataset's categories; the model predicts ``len(category_map)`` classes.
        variant: The variant config built from ``cfg`` (optimizer, schedule, EMA values).
        model: RTDETR in training mode (built without multi-scale: the loader resizes).
        criterion: SetCriterion.
        postprocessor: RTDETRPostProcessor (labels 0..K-1, boxes in original pixels).
        optimizer: AdamW over the official regex groups (every group with an explicit ``lr``).
        base_lrs: Each group's rate before the schedule factor.
        backbone_lr: The backbone groups' rate before the schedule factor (logged).
        backbone_loaded: What ``cfg.backbone_weights`` loaded, in words ("" without one).
        ema: ModelEMA of the model, or None when ``cfg.use_ema`` is False.
        progress: Epoch / iteration counters.
        loader_state: The train loader's position to resume from.

    Raises:
        ValueError: If the config is invalid or ``cfg.num_classes`` differs from the dataset.
        FileNotFoundError: If the dataset or the initial weights are missing.
        StateDictMismatchError: If the initial weights do not fit the variant.
        DeviceUnavailableError: If the framework cannot use ``cfg.device``.
    """

    FRAMEWORK = ""  # the framework's name in checkpoints, logs and the progress bar
    CHECKPOINT_SUFFIX = ""  # the training checkpoint's file suffix
    build: Any = None  # the framework's builders: build_model, build_criterion, ...
    distributed: Any = None  # the framework's collectives: init, rank, world_size, all_reduce, ...
    devices: Any = None  # the framework's devices: use, available (see rtdetr_common.devices)

    def __init__(self, cfg: TrainConfig, category_map: CategoryMap | None = None) -> None:
        self.device = self.devices.use(cfg.device)  # before anything is generated or read
        self.cfg = cfg.resolved(data=category_map is None)
        self.distributed.init(self.cfg.device)
        self.rank, self.world_size = self.distributed.rank(), self.distributed.world_size()
        if self.cfg.batch_size % self.world_size:
            raise ValueError(f"batch_size={self.cfg.batch_size} (the global batch) must be a multiple "
                             f"of the {self.world_size} processes")
        self._datasets: dict[tuple[str, bool], CocoDetection] = {}
        self.category_map = category_map or self.dataset("train").category_map
        num_classes = self.category_map.num_classes
        if self.cfg.num_classes is not None and self.cfg.num_classes != num_classes:
            raise ValueError(f"TrainConfig.num_classes={self.cfg.num_classes}, but the dataset has "
                             f"{num_classes} categories ({self.category_map.names})")
        self.cfg.num_classes = num_classes
        self.variant = variant_config(self.cfg, num_classes)
        self.seed(self.cfg.seed)
        self.model = self.build.build_model(self.variant, multi_scale=False, seed=self.cfg.seed)
        self.materialise(self.model)
        self.model = self.place(self.model)
        if self.cfg.init_weights is not None:
            state_dict, entry = self.read_weights(self.cfg.init_weights).preferred(self.cfg.init_entry)
            self.load_model(self.model, state_dict, f"{self.cfg.init_weights} [{entry}]")
        self.backbone_loaded = ""
        if self.cfg.backbone_weights is not None:
            self.backbone_loaded = self.load_backbone_weights(self.cfg.backbone_weights)
        if self.world_size > 1:
            self.model = self.distributed.convert_sync_batchnorm(self.model)
        self.train_model = self.distributed.parallel(self.model)  # what the training step calls
        self.criterion = self.build.build_criterion(self.variant)
        self.postprocessor = self.build.build_postprocessor(self.variant)
        self.optimizer = self.build.build_optimizer(self.model, self.variant)
        for group in self.optimizer.param_groups:  # the schedule sets every group's rate
            group.setdefault("lr", self.optimizer.defaults["lr"])
        self.base_lrs = [float(g["lr"]) for g in self.optimizer.param_groups]
        self.backbone_lr = backbone_base_lr(self.variant)
        self.ema = self.build.build_ema(self.model, self.variant) if self.cfg.use_ema else None
        self.progress = Progress()
        self.loader_state = {"epoch": 0, "position": 0}

    # ------------------------------------------------------------------------------ framework
    # What each framework supplies (torch_ref/trainer.py, jittor_impl/trainer.py).

    @staticmethod
    def seed(seed: int) -> None:
        """Seeds the framework's global random generator (model initialisation)."""
        raise NotImplementedError

    @staticmethod
    def read_weights(path: str | Path) -> WeightSet:
        """Model/EMA weights from a file the framework reads."""
        raise NotImplementedError

    @staticmethod
    def load_model(model: Any, state_dict: dict[str, np.ndarray], source: str) -> None:
        """Loads numpy weights into ``model``, strictly (official keys and shapes)."""
        raise NotImplementedError

    @staticmethod
    def materialise(model: Any) -> None:
        """Computes the freshly built model's initial values now (a framework that evaluates
        lazily would otherwise draw them later, after whatever else draws random numbers)."""

    def place(self, model: Any) -> Any:
        """The model on :attr:`device` (a framework whose device is process-wide returns it)."""
        return model

    @staticmethod
    def weights_of(module: Any) -> dict[str, np.ndarray]:
        """A module's state_dict as numpy arrays (official layout)."""
        raise NotImplementedError

    def optimise(self, batch: Batch) -> dict[str, float]:
        """One optimisation step of model, optimizer and EMA on a loader batch."""
        raise NotImplementedError

    def as_tensor(self, array: np.ndarray) -> Any:
        """A numpy array as the framework's tensor on :attr:`device`."""
        raise NotImplementedError

    @staticmethod
    def as_numpy(tensor: Any) -> np.ndarray:
        """A tensor's values as a numpy array (from any device)."""
        raise NotImplementedError

    @staticmethod
    def no_grad() -> ContextManager:
        """A context without gradient tracking."""
        raise NotImplementedError

    def runtime(self) -> ContextManager:
        """The framework's numeric settings for training (none unless the framework has some)."""
        return contextlib.nullcontext()

    def checkpoint_contents(self) -> dict:
        """``model``, ``optimizer`` and (when kept) ``ema`` of a training checkpoint."""
        raise NotImplementedError

    @staticmethod
    def write_checkpoint(contents: dict, path: Path) -> None:
        """Writes a training checkpoint's contents to ``path`` (a temporary file)."""
        raise NotImplementedError

    @staticmethod
    def read_checkpoint(path: Path) -> dict:
        """A training checkpoint's contents.

        Raises:
            ValueError: If ``path`` cannot be read as one.
        """
        raise NotImplementedError

    def restore(self, contents: dict, source: str) -> None:
        """Loads model, EMA and optimizer from a training checkpoint's contents."""
        raise NotImplementedError

    def model_weights(self) -> dict[str, np.ndarray]:
        """The model's state_dict as numpy arrays (official keys), e.g. to start other runs from."""
        return self.weights_of(self.model)

    def load_backbone_weights(self, path: str | Path) -> str:
        """Loads backbone weights (see ``TrainConfig.backbone_weights``) into the model's
        backbone, strictly; returns what was loaded, in words.

        Raises:
            ValueError: If the file holds a backbone of another depth.
            StateDictMismatchError: If its entries do not fit the backbone otherwise.
        """
        state_dict, entry = self.read_weights(path).preferred("model")
        state, where = backbone_entries(state_dict)
        own = self.weights_of(self.model.backbone)
        kept = check_backbone(_specs(own), _specs(state), f"{path} [{entry}]")
        self.load_model(self.model.backbone, {**{k: own[k] for k in kept}, **state},
                        f"{path} [backbone]")
        note = f"; the model keeps its own {len(kept)} BatchNorm step counters" if kept else ""
        return (f"backbone: {len(state)} tensors of PResNet-{presnet_depth(state)} from {path} "
                f"({where}){note}")

    # ------------------------------------------------------------------------------ data

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
            Every loss term and their sum (``loss``), the mean over processes.

        Raises:
            FloatingPointError: If the total loss is not finite (nothing is saved).
        """
        losses = mean_over_processes(self.optimise(batch), self.world_size,
                                     self.distributed.all_reduce)
        if not np.isfinite(losses["loss"]):
            raise FloatingPointError(
                f"loss is {losses['loss']} at epoch {self.progress.epoch} step "
                f"{self.progress.global_step}; stopping (the last checkpoint is "
                f"{checkpoint_path(self.cfg, self.CHECKPOINT_SUFFIX)})")
        return losses

    def train(self, stream: TextIO | None = None) -> TrainResult:
        """Trains to ``cfg.epochs``, resuming from ``<output_dir>/last<suffix>`` when it exists.

        Writes a JSON line every ``log_every`` iterations to ``log.jsonl``, a progress bar to
        ``stream`` (stderr by default), a checkpoint after every epoch, and evaluates every
        ``eval_every`` epochs and after the last. SIGTERM or SIGINT ends the current step,
        writes the checkpoint (with the loader's position) and returns with ``interrupted`` set.

        Raises:
            ValueError: If the checkpoint to resume was written with a different config.
            FloatingPointError: If a loss is not finite.
        """
        main = self.rank == 0
        out = Path(self.cfg.output_dir)
        if main:
            out.mkdir(parents=True, exist_ok=True)
        self.distributed.barrier()
        ckpt = checkpoint_path(self.cfg, self.CHECKPOINT_SUFFIX)
        resumed = None
        if ckpt.is_file():
            self.load_training_checkpoint(ckpt)
            resumed = ckpt
        log = JsonLog(out / "log.jsonl") if main else None
        if log is not None:
            log.truncate_to(self.progress)
        loader = train_loader(self.cfg, self.dataset("train"), self.category_map,
                              self.rank, self.world_size)
        loader.load_state_dict(self.loader_state)
        metrics = None
        with StopOnSignal() as stop, self.runtime(), loader:
            stopping = None  # the signal every process stops on

            def stop_requested() -> int | None:
                return first_signal(stop.signum, self.world_size, self.distributed.all_reduce)

            def stopped_by() -> str:
                return signal.Signals(stopping).name

            while self.progress.epoch < self.cfg.epochs:
                epoch = self.progress.epoch
                bar = epoch_bar(len(loader), f"{self.FRAMEWORK} epoch {epoch + 1}/{self.cfg.epochs}",
                                stream, loader.position, disable=not main)
                for batch in loader:
                    start = time.perf_counter()
                    factor = self.set_lr()
                    losses = self.step(batch)
                    self.progress.iteration = loader.position
                    if log is not None and self.progress.global_step % self.cfg.log_every == 0:
                        log.write(loss_entry(self.progress, self.cfg.lr * factor,
                                             self.backbone_lr * factor, losses,
                                             time.perf_counter() - start))
                    self.progress.global_step += 1
                    advance(bar, self.progress.iteration, f"loss {losses['loss']:.4f}")
                    stopping = stop_requested()
                    if stopping:
                        break
                bar.close()
                if stopping and loader.epoch == epoch and loader.position < len(loader):
                    self.loader_state = loader.state_dict()
                    self.save_training_checkpoint(ckpt)
                    return TrainResult(self.progress, ckpt, stopped_by(), resumed, metrics)
                self.progress.epoch, self.progress.iteration = epoch + 1, 0
                self.loader_state = {"epoch": epoch + 1, "position": 0}
                loader.load_state_dict(self.loader_state)
                self.save_training_checkpoint(ckpt)
                if main and eval_due(self.cfg, epoch):
                    metrics = self.evaluate("val")
                    log.write({"kind": "eval", "epoch": epoch, **metrics})
                    report_metrics(epoch, metrics, stream)
                stopping = stopping or stop_requested()
                if stopping:
                    return TrainResult(self.progress, ckpt, stopped_by(), resumed, metrics)
        return TrainResult(self.progress, ckpt, "", resumed, metrics)

    # ------------------------------------------------------------------------------ checkpoints

    def save_training_checkpoint(self, path: str | Path) -> None:
        """Writes model, EMA, optimizer and train state to ``path`` atomically.

        The previous file stays in place until the new one is complete. Only process 0 writes;
        every process returns once the file is in place.
        """
        if self.rank != 0:
            self.distributed.barrier()
            return
        contents = self.checkpoint_contents()
        contents["train_state"] = train_state(
            self.cfg, self.progress, self.loader_state, self.model.rng.state_dict(),
            self.FRAMEWORK, categories_of(self.category_map.names, self.category_map.category_ids))
        atomic_write(path, lambda tmp: self.write_checkpoint(contents, tmp))
        self.distributed.barrier()

    def load_training_checkpoint(self, path: str | Path) -> None:
        """Restores everything :meth:`save_training_checkpoint` wrote.

        Raises:
            ValueError: If ``path`` is not a training checkpoint of this framework, or its
                config differs from this trainer's in a field outside ``RESUME_EXEMPT``.
            StateDictMismatchError: If its weights do not fit the model.
        """
        contents = self.read_checkpoint(Path(path))
        state = check_train_state(contents.get("train_state") if isinstance(contents, dict) else None,
                                  str(path), self.FRAMEWORK)
        differences = config_differences(state["config"], self.cfg)
        if differences:
            raise ValueError(f"refusing to resume {path}: it was written with another config "
                             f"(use a new output folder, or the same settings):\n  "
                             + "\n  ".join(differences))
        self.restore(contents, str(path))
        self.model.rng.load_state_dict(state["rng"])
        self.progress = Progress(**state["progress"])
        self.loader_state = dict(state["loader"])

    # ------------------------------------------------------------------------------ evaluation

    def _eval_module(self) -> Any:
        """The model evaluation uses: the EMA when kept, else the trained model."""
        return self.ema.module if self.ema is not None else self.model

    @contextlib.contextmanager
    def _inference(self) -> Iterator[Any]:
        """The evaluation module in eval mode without gradients; training mode restored after."""
        module = self._eval_module()
        was_training = module.training
        module.eval()
        try:
            with self.no_grad():
                yield module
        finally:
            if was_training:
                module.train()

    def detect(self, module: Any, images: np.ndarray,
               orig_sizes: np.ndarray) -> list[dict[str, np.ndarray]]:
        """Detections of one batch in original-image pixels.

        Args:
            module: The model in eval mode.
            images: float32 [bs, 3, size, size] in [0, 1].
            orig_sizes: [bs, 2] original sizes as (width, height).

        Returns:
            Per image ``labels`` int64 [k], ``boxes`` float32 [k, 4] xyxy, ``scores`` float32 [k].
        """
        outputs = module(self.as_tensor(images))
        results = self.postprocessor(outputs, self.as_tensor(orig_sizes.astype(np.float32)))
        return [{k: self.as_numpy(v) for k, v in r.items()} for r in results]

    def evaluate(self, split: str = "val") -> CocoMetrics:
        """COCO bbox AP of the EMA model (else the model) on a split.

        Writes the detections to ``<output_dir>/results_<split>.json``.

        Returns:
            The twelve COCO statistics, -1 where missing (``.summary`` holds the
            COCOeval table).
        """
        dataset = self.dataset(split, train=False)
        loader = eval_loader(self.cfg, dataset)
        image_ids, results = [], []
        with self._inference() as module, loader:
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
