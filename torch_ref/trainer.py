"""Training, evaluation and inference of one RT-DETR variant with exact resume (PyTorch).

The loop is :class:`rtdetr_common.trainer.BaseTrainer`; this module supplies what PyTorch
does its own way: the builders, seeding, tensors, the step (:func:`torch_ref.engine.train_step`),
no-grad, deterministic algorithms at the configured thread count, and ``.pth`` checkpoints
(``torch.save``; read back with ``weights_only=True``). On the CPU with deterministic
algorithms and a fixed thread count a resumed run's weights are bit-identical.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from rtdetr_common.pipeline.loader import Batch
from rtdetr_common.trainer import BaseTrainer
from rtdetr_common.weights import (JITTOR_SUFFIXES, NEUTRAL_SUFFIXES, WeightSet,
                                   load_jittor_pickle, load_neutral)

from . import build, devices, distributed
from .checkpoint import load_state_dict_strict, read_weightset
from .engine import train_step

FRAMEWORK = "torch"
CHECKPOINT_SUFFIX = ".pth"


def read_weights(path: str | Path) -> WeightSet:
    """Reads model/EMA weights from an official ``.pth``, a Jittor ``.pkl`` or a neutral file."""
    path = Path(path)
    if path.suffix in JITTOR_SUFFIXES:
        return load_jittor_pickle(path)
    if path.suffix in NEUTRAL_SUFFIXES:
        return load_neutral(path)
    return read_weightset(path)


def to_tensors(batch: Batch, device: torch.device | str = "cpu") -> tuple[torch.Tensor, list[dict]]:
    """A loader batch as model inputs on ``device``: images [bs, 3, H, W] and ``labels`` /
    ``boxes`` targets."""
    images = torch.from_numpy(batch.images).to(device)
    targets = [{"labels": torch.from_numpy(t["labels"]).to(device),
                "boxes": torch.from_numpy(t["boxes"]).to(device)}
               for t in batch.targets]
    return images, targets


class Trainer(BaseTrainer):
    """Trains, evaluates and runs one RT-DETR variant as configured (see :class:`BaseTrainer`)."""

    FRAMEWORK = FRAMEWORK
    CHECKPOINT_SUFFIX = CHECKPOINT_SUFFIX
    build = build
    distributed = distributed
    devices = devices

    @staticmethod
    def seed(seed: int) -> None:
        torch.manual_seed(seed)

    @staticmethod
    def read_weights(path: str | Path) -> WeightSet:
        return read_weights(path)

    @staticmethod
    def load_model(model: torch.nn.Module, state_dict: dict[str, np.ndarray], source: str) -> None:
        load_state_dict_strict(model, {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()},
                               source)

    def place(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    @staticmethod
    def weights_of(module: torch.nn.Module) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}

    def optimise(self, batch: Batch) -> dict[str, float]:
        images, targets = to_tensors(batch, self.device)
        return train_step(self.train_model, self.criterion, self.optimizer, images, targets,
                          self.cfg.clip_max_norm, self.ema)

    def as_tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device)

    @staticmethod
    def as_numpy(tensor: torch.Tensor) -> np.ndarray:
        return tensor.detach().cpu().numpy()

    @staticmethod
    def no_grad() -> torch.no_grad:
        return torch.no_grad()

    @contextlib.contextmanager
    def runtime(self) -> Iterator[None]:
        """Deterministic algorithms and the configured thread count, restored afterwards. On
        CUDA an operator without a deterministic kernel (``grid_sample``'s backward) warns
        instead of stopping the run."""
        deterministic = torch.are_deterministic_algorithms_enabled()
        warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
        threads = torch.get_num_threads()
        torch.use_deterministic_algorithms(True, warn_only=self.device.type == "cuda")
        if self.cfg.threads is not None:
            torch.set_num_threads(self.cfg.threads)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
            torch.set_num_threads(threads)

    def checkpoint_contents(self) -> dict:
        contents = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
        if self.ema is not None:
            contents["ema"] = self.ema.state_dict()
        return contents

    @staticmethod
    def write_checkpoint(contents: dict, path: Path) -> None:
        torch.save(contents, path)

    @staticmethod
    def read_checkpoint(path: Path) -> dict:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for corrupt or unsafe pickles
            raise ValueError(f"{path}: cannot be read as a training checkpoint: {exc}") from exc

    def restore(self, contents: dict, source: str) -> None:
        load_state_dict_strict(self.model, contents["model"], f"{source} [model]")
        if self.ema is not None:
            self.ema.load_state_dict(contents["ema"])
        self.optimizer.load_state_dict(contents["optimizer"])
