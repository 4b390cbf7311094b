"""Training, evaluation and inference of one RT-DETR variant with exact resume (Jittor).

The loop is :class:`rtdetr_common.trainer.BaseTrainer`; this module supplies what Jittor does
its own way: the builders, seeding, tensors, the step (:func:`jittor_impl.engine.train_step`),
no-grad, and ``.pkl`` checkpoints.

Differences from torch_ref/trainer.py:
- Checkpoints (``last.pkl``) pickle numpy arrays (official layout) and plain values, read back numpy-only by :func:`rtdetr_common.weights.read_numpy_pickle`.
- Jittor's optimizers have no usable ``state_dict``: :func:`optimizer_state` / :func:`load_optimizer_state` keep AdamW's ``n_step``, rates, ``steps`` and moments.
- The optimizer's moments are synced after each step, so every step starts from materialised values as a resumed run does (fusion across steps rounds differently).
- ``runtime`` is a no-op: Jittor's CPU kernels have no non-deterministic variants and its thread count is fixed at start (``TrainConfig.threads`` is torch-only).
- Seeding is ``jt.set_global_seed``, so a run from scratch starts from other weights than the torch run unless ``init_weights`` is given.
- ``jt.set_global_seed`` is told ``different_seed_for_mpi=False``: Jittor would seed each MPI process differently; torch seeds every process alike.
- ``materialise`` evaluates the model once built (Jittor's initialisers draw when evaluated): its initial weights do not depend on what is built or loaded later.
- Backbone weights in the published ``.pth`` format are converted first (``rtdetr-parity convert FILE.pth FILE.safetensors --variant V --backbone``).
- Initial weights are read by :func:`jittor_impl.checkpoint.read_weightset` (``.pkl``, ``.safetensors``, ``.npz``); a ``.pth`` is converted first.
- Targets' int64 labels are cast with ``.int64()`` (``jt.array`` would make them int32).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import jittor as jt
import numpy as np
from jittor import nn

from rtdetr_common.pipeline.loader import Batch
from rtdetr_common.weights import read_numpy_pickle
from rtdetr_common.trainer import BaseTrainer
from rtdetr_common.weights import WeightSet

from . import build, devices, distributed
from .checkpoint import load_state_dict_strict, model_state_dict, read_weightset
from .engine import AdamW, train_step

FRAMEWORK = "jittor"
CHECKPOINT_SUFFIX = ".pkl"


def read_weights(path: str | Path) -> WeightSet:
    """Reads model/EMA weights from a Jittor ``.pkl`` or a neutral file."""
    return read_weightset(path)


def to_tensors(batch: Batch) -> tuple[jt.Var, list[dict]]:
    """A loader batch as model inputs: images [bs, 3, H, W] and ``labels`` / ``boxes`` targets."""
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
    """Restores :func:`optimizer_state` output into an AdamW over the same groups (ValueError if they differ)."""
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


class Trainer(BaseTrainer):
    """Trains, evaluates and runs one RT-DETR variant as configured (see :class:`BaseTrainer`)."""

    FRAMEWORK = FRAMEWORK
    CHECKPOINT_SUFFIX = CHECKPOINT_SUFFIX
    build = build
    distributed = distributed
    devices = devices

    @staticmethod
    def seed(seed: int) -> None:
        jt.set_global_seed(seed, different_seed_for_mpi=False)  # every process alike

    @staticmethod
    def read_weights(path: str | Path) -> WeightSet:
        return read_weights(path)

    @staticmethod
    def load_model(model: nn.Module, state_dict: dict[str, np.ndarray], source: str) -> None:
        load_state_dict_strict(model, state_dict, source)

    @staticmethod
    def materialise(model: nn.Module) -> None:
        jt.sync(list(model.state_dict().values()))

    @staticmethod
    def weights_of(module: nn.Module) -> dict[str, np.ndarray]:
        return model_state_dict(module)

    def optimise(self, batch: Batch) -> dict[str, float]:
        images, targets = to_tensors(batch)
        losses = train_step(self.train_model, self.criterion, self.optimizer, images, targets,
                            self.cfg.clip_max_norm, self.ema)
        jt.sync(optimizer_moments(self.optimizer))
        return losses

    def as_tensor(self, array: np.ndarray) -> jt.Var:
        return jt.array(array)

    @staticmethod
    def as_numpy(tensor: jt.Var) -> np.ndarray:
        return tensor.numpy()

    @staticmethod
    def no_grad() -> jt.no_grad:
        return jt.no_grad()

    def checkpoint_contents(self) -> dict:
        contents = {"model": model_state_dict(self.model),
                    "optimizer": optimizer_state(self.optimizer)}
        if self.ema is not None:
            contents["ema"] = {"module": model_state_dict(self.ema.module),
                               "updates": self.ema.updates, "warmups": self.ema.warmups}
        return contents

    @staticmethod
    def write_checkpoint(contents: dict, path: Path) -> None:
        with open(path, "wb") as f:
            pickle.dump(contents, f, protocol=4)

    @staticmethod
    def read_checkpoint(path: Path) -> dict:
        return read_numpy_pickle(path)

    def restore(self, contents: dict, source: str) -> None:
        load_state_dict_strict(self.model, contents["model"], f"{source} [model]")
        if self.ema is not None:
            self.ema.load_state_dict(contents["ema"])
        load_optimizer_state(self.optimizer, contents["optimizer"], source)
