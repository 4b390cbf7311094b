"""Training configuration and the framework-neutral parts of the two trainers.

:class:`TrainConfig` is a plain dataclass (no registry): every value a training run depends on,
stored whole in each checkpoint so that a resumed run can refuse a changed configuration. The
training loop (:mod:`rtdetr_common.trainer`) takes from here the learning-rate rule
(:func:`lr_factor`, computed in Python so the two frameworks never differ through their
scheduler classes), dataset paths, the loaders and the multi-scale sizes; the checkpoint's
neutral state is :mod:`rtdetr_common.run_state`, the log :mod:`rtdetr_common.run_log`.

Schedule, compared with the official RT-DETR v1 (``rtdetr_pytorch``):

* The official solver steps ``MultiStepLR`` once per **epoch** (``lr_scheduler.step()`` after
  ``train_one_epoch``) with ``milestones=[1000]``, ``gamma=0.1``: with 72 epochs the rate never
  decays. :attr:`TrainConfig.lr_milestones` are therefore epochs, and epoch ``e`` (0-based)
  trains at ``gamma ** (number of milestones <= e)`` times the base rate, as ``MultiStepLR``.
* v1 has no warm-up. :attr:`TrainConfig.warmup_iters` adds an optional linear warm-up over the
  first iterations (factor ``min(1, (step + 1) / warmup_iters)``, the rule of RT-DETR v2's
  ``LinearWarmup``); the default 0 is the official v1 behaviour. A run from scratch (no
  pretrained backbone) is steadier with a few hundred iterations of warm-up.
* The official backbone rate (1e-5; 1e-6 for r101vd) assumes an ImageNet-pretrained backbone.
  :attr:`TrainConfig.backbone_lr` None keeps it; from scratch, set it to :attr:`TrainConfig.lr`
  so the randomly initialised backbone learns as fast as the rest.
* The EMA's warm-up time constant (official 2000 updates) is configurable: a run of a few
  hundred iterations needs a shorter one, or its EMA weights still lean on the initialisation.

Multi-scale training sizes come from the data loader (numpy resize, identical bytes for both
frameworks), not from the model. For a training size ``S`` other than the official 640, each
official size ``s`` (480 ... 800) becomes ``32 * floor(s * S / 640 / 32 + 0.5)``, clipped below at the
smallest size whose three feature maps still hold ``num_queries`` anchors (128 for the official
300 queries and strides 8/16/32). At ``S = 640`` this is exactly the official list.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from .coco import CategoryMap
from .devices import DEVICES
from .configs import VARIANTS, EMAConfig, ScheduleConfig, VariantConfig, variant_at_size
from .pipeline.coco_dataset import CocoDetection
from .pipeline.loader import DataLoader
from .pipeline.transforms import AUGMENTATIONS, eval_transforms, train_transforms

OFFICIAL_SIZE = 640
SIZE_MULTIPLE = 32

# Fields that may change between an interrupted run and its resumption: they do not change
# what is computed (batches are identical for any worker count; logging and evaluation do not
# touch the training state), or, for ``epochs``, they only extend or shorten the run.
# ``threads`` is here too, but bit-identical results need the same thread count.
# ``device`` likewise: a run may move to another device, which rounds differently.
RESUME_EXEMPT = ("output_dir", "num_workers", "threads", "device", "log_every", "eval_every",
                 "epochs", "eval_batch_size")


@dataclass
class TrainConfig:
    """Everything one training run depends on.

    Attributes:
        variant: Official variant name (``r18vd`` ... ``r101vd``).
        dataset: Dataset root holding ``train/``, ``val/`` and ``annotations/instances_{split}.json``
            (or COCO 2017's ``{split}2017`` names); None: the embedded synthetic dataset
            (:func:`rtdetr_common.synthetic.ensure_default_dataset`), generated on first use.
        train_images: Train image folder; overrides the one under ``dataset``.
        train_ann: Train annotation file; overrides the one under ``dataset``.
        val_images: Val image folder; overrides the one under ``dataset``.
        val_ann: Val annotation file; overrides the one under ``dataset``.
        num_classes: Number of classes; None: the number of categories of the dataset. When
            given it must equal the dataset's.
        size: Training and evaluation input size (square, a multiple of 32; official 640).
        multi_scale: Training sizes drawn per batch; None: the official list scaled to ``size``
            (see the module docstring); an empty list: always ``size``.
        augment: Training augmentation, ``"official"`` or ``"light"`` (no zoom-out and no IoU
            crop; see :func:`~rtdetr_common.pipeline.transforms.train_transforms`).
        batch_size: Training images per iteration (at least 2: train-mode BatchNorm).
        eval_batch_size: Images per evaluation batch.
        epochs: Number of epochs.
        lr: Base learning rate (official 1e-4).
        backbone_lr: Rate of the backbone parameter groups; None: the official value, which
            assumes a pretrained backbone (1e-5; 1e-6 for r101vd).
        weight_decay: AdamW weight decay of the default group (official 1e-4; the official
            norm/bias groups keep 0).
        lr_milestones: Epochs at which the rate is multiplied by ``lr_gamma`` (official
            ``MultiStepLR`` stepped per epoch; milestone 1000 never fires).
        lr_gamma: Decay factor at each milestone.
        warmup_iters: Iterations of linear warm-up (0: none, as in the official v1).
        clip_max_norm: Global gradient-norm clip (official 0.1; 0 disables it).
        use_ema: Keep an EMA of the weights (official True); evaluation then uses the EMA.
        ema_decay: EMA asymptotic decay (official 0.9999).
        ema_warmups: EMA decay ramp time constant in updates (official 2000).
        seed: Seed of the model initialisation, the data order and augmentations, the
            multi-scale draws and the denoising noise.
        num_workers: Data-loading worker processes (batches are identical for any count).
        threads: CPU threads of the framework; None leaves its default. Bit-identical resumes
            need the same count in both runs.
        device: ``cpu`` or ``cuda`` (:mod:`rtdetr_common.devices`); a run of several processes
            puts process ``r`` on CUDA device ``r`` of its machine (``LOCAL_RANK``).
        output_dir: Folder for ``log.jsonl``, ``last.pth`` / ``last.pkl`` and results.
        init_weights: Weights to start from (official ``.pth``, ``.pkl``, ``.safetensors``,
            ``.npz``), loaded strictly whenever a trainer is built (also before resuming, so the
            file must stay); None: the framework's official random initialisation (seeded, so
            the two frameworks start from different weights unless given a file).
        init_entry: Which state_dict of ``init_weights`` to load first (``ema`` or ``model``).
        backbone_weights: ImageNet weights of the backbone alone (the published PResNet
            checkpoints: a bare PResNet state_dict), loaded strictly into the backbone before
            the optimizer and EMA are built (also before resuming, so the file must stay);
            excludes ``init_weights``, which loads the whole model.
        eval_every: Evaluate on the val split every N epochs and after the last (0: never
            during training).
        log_every: Write one JSON log line every N iterations.
    """

    variant: str = "r18vd"
    dataset: str | None = None
    train_images: str | None = None
    train_ann: str | None = None
    val_images: str | None = None
    val_ann: str | None = None
    num_classes: int | None = None
    size: int = OFFICIAL_SIZE
    multi_scale: list[int] | None = None
    augment: str = "official"
    batch_size: int = 4
    eval_batch_size: int = 8
    epochs: int = 72
    lr: float = 1e-4
    backbone_lr: float | None = None
    weight_decay: float = 1e-4
    lr_milestones: list[int] = field(default_factory=lambda: [1000])
    lr_gamma: float = 0.1
    warmup_iters: int = 0
    clip_max_norm: float = 0.1
    use_ema: bool = True
    ema_decay: float = 0.9999
    ema_warmups: int = 2000
    seed: int = 0
    num_workers: int = 0
    threads: int | None = None
    device: str = "cpu"
    output_dir: str = "runs/train"
    init_weights: str | None = None
    init_entry: str = "ema"
    backbone_weights: str | None = None
    eval_every: int = 1
    log_every: int = 1

    def validate(self) -> None:
        """Checks every value.

        Raises:
            ValueError: Naming the first field out of range.
        """
        if self.variant not in VARIANTS:
            raise ValueError(f"TrainConfig.variant: unknown variant {self.variant!r}; "
                             f"choose one of {sorted(VARIANTS)}")
        low = min_input_size(self.variant)
        checks = [
            (self.size % SIZE_MULTIPLE == 0 and self.size >= low,
             f"size must be a multiple of {SIZE_MULTIPLE} and at least {low} (the decoder needs "
             f"num_queries anchors), got {self.size}"),
            (self.num_classes is None or self.num_classes > 0, "num_classes must be positive"),
            (self.augment in AUGMENTATIONS, f"augment must be one of {AUGMENTATIONS}, got "
                                            f"{self.augment!r}"),
            (self.batch_size >= 2, "batch_size must be at least 2 (train-mode BatchNorm)"),
            (self.eval_batch_size >= 1, "eval_batch_size must be at least 1"),
            (self.epochs >= 1, "epochs must be at least 1"),
            (self.lr > 0, "lr must be positive"),
            (self.backbone_lr is None or self.backbone_lr >= 0, "backbone_lr must be >= 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (all(int(m) >= 0 for m in self.lr_milestones), "lr_milestones must be epochs >= 0"),
            (0 < self.lr_gamma <= 1, "lr_gamma must lie in (0, 1]"),
            (self.warmup_iters >= 0, "warmup_iters must be >= 0"),
            (self.clip_max_norm >= 0, "clip_max_norm must be >= 0"),
            (0.0 <= self.ema_decay <= 1.0, "ema_decay must lie in [0, 1]"),
            (self.ema_warmups > 0, "ema_warmups must be positive"),
            (self.num_workers >= 0, "num_workers must be >= 0"),
            (self.threads is None or self.threads >= 1, "threads must be at least 1"),
            (self.device in DEVICES, f"device must be one of {DEVICES}, got {self.device!r}"),
            (self.init_entry in ("ema", "model"), "init_entry must be 'ema' or 'model'"),
            (self.init_weights is None or self.backbone_weights is None,
             "init_weights (the whole model) and backbone_weights (the backbone alone) exclude "
             "each other; give one"),
            (self.eval_every >= 0, "eval_every must be >= 0"),
            (self.log_every >= 1, "log_every must be at least 1"),
        ]
        if self.multi_scale:
            checks.append((all(s % SIZE_MULTIPLE == 0 and s >= low for s in self.multi_scale),
                           f"multi_scale sizes must be multiples of {SIZE_MULTIPLE} and at least "
                           f"{low}, got {self.multi_scale}"))
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid TrainConfig: {message}")

    def resolved(self, data: bool = True) -> "TrainConfig":
        """A validated copy with the dataset, multi-scale sizes and paths made explicit.

        The default dataset is generated here on first use. Paths become absolute so that the
        configuration stored in a checkpoint names the same files from any working folder.

        Args:
            data: Resolve the dataset too. Without it (inference with known categories) the
                dataset fields are kept as given and nothing is generated or checked.

        Raises:
            ValueError: If a value is out of range.
            FileNotFoundError: If a split's image folder or annotation file is missing.
        """
        self.validate()
        out = dataclasses.replace(self, lr_milestones=[int(m) for m in self.lr_milestones])
        if out.multi_scale is None:
            out.multi_scale = scaled_multi_scale(out.size, out.variant)
        out.multi_scale = [int(s) for s in out.multi_scale]
        if out.init_weights is not None:
            out.init_weights = str(Path(out.init_weights).resolve())
        if out.backbone_weights is not None:
            out.backbone_weights = str(Path(out.backbone_weights).resolve())
        if not data:
            return out
        explicit = (out.train_images, out.train_ann, out.val_images, out.val_ann)
        if out.dataset is None and not any(explicit):
            from .synthetic import ensure_default_dataset

            out.dataset = str(ensure_default_dataset().root)
        if out.dataset is not None:
            out.dataset = str(Path(out.dataset).resolve())
        for split in ("train", "val"):
            images, ann = split_paths(out, split)
            setattr(out, f"{split}_images", str(images.resolve()))
            setattr(out, f"{split}_ann", str(ann.resolve()))
        return out

    def to_dict(self) -> dict:
        """The fields as a JSON-serialisable dict."""
        return dataclasses.asdict(self)


def min_input_size(variant: str) -> int:
    """The smallest multiple of 32 whose feature maps give the decoder ``num_queries`` anchors."""
    decoder = variant_at_size(variant, 1, None).decoder
    size = SIZE_MULTIPLE
    while sum((size // s) ** 2 for s in decoder.feat_strides) < decoder.num_queries:
        size += SIZE_MULTIPLE
    return size


def scaled_multi_scale(size: int, variant: str = "r18vd") -> list[int]:
    """The official multi-scale list scaled to a training size (exact at 640).

    Each official size ``s`` becomes ``32 * floor(s * size / 640 / 32 + 0.5)``, at least
    :func:`min_input_size`.
    """
    official = variant_at_size(variant, 1, None).multi_scale
    low = min_input_size(variant)
    return [max(low, SIZE_MULTIPLE * math.floor(s * size / OFFICIAL_SIZE / SIZE_MULTIPLE + 0.5))
            for s in official]


def split_paths(cfg: TrainConfig, split: str) -> tuple[Path, Path]:
    """The image folder and annotation file of ``split`` (``train`` or ``val``).

    Explicit ``{split}_images`` / ``{split}_ann`` fields win; otherwise the dataset root is
    searched for ``{split}/`` + ``annotations/instances_{split}.json`` (the synthetic layout),
    then ``{split}2017/`` + ``annotations/instances_{split}2017.json`` (COCO 2017).

    Raises:
        ValueError: For an unknown split, or no dataset root and no explicit paths.
        FileNotFoundError: Naming every place looked at when the split is missing.
    """
    if split not in ("train", "val"):
        raise ValueError(f"unknown split {split!r}; use 'train' or 'val'")
    images, ann = getattr(cfg, f"{split}_images"), getattr(cfg, f"{split}_ann")
    candidates: list[tuple[Path, Path]] = []
    if images is not None or ann is not None:
        if images is None or ann is None:
            raise ValueError(f"give both {split}_images and {split}_ann, or neither")
        candidates.append((Path(images), Path(ann)))
    elif cfg.dataset is not None:
        root = Path(cfg.dataset)
        if not root.is_dir():
            raise FileNotFoundError(f"dataset folder {root} does not exist (create one with "
                                    f"`rtdetr-parity make-dataset --root {root}`)")
        for name in (split, f"{split}2017"):
            candidates.append((root / name, root / "annotations" / f"instances_{name}.json"))
    else:
        raise ValueError(f"no dataset: set dataset or {split}_images and {split}_ann")
    for img_dir, ann_file in candidates:
        if img_dir.is_dir() and ann_file.is_file():
            return img_dir, ann_file
    looked = "; ".join(f"{i}/ with {a}" for i, a in candidates)
    raise FileNotFoundError(f"{split} split not found: looked for {looked}")


def open_split(cfg: TrainConfig, split: str, train: bool) -> CocoDetection:
    """The split's dataset with the official training (``train``) or evaluation transforms."""
    images, ann = split_paths(cfg, split)
    transforms = train_transforms(cfg.size, cfg.augment) if train else eval_transforms(cfg.size)
    return CocoDetection(images, ann, transforms)


def train_loader(cfg: TrainConfig, dataset: CocoDetection, category_map: CategoryMap,
                 rank: int = 0, world_size: int = 1) -> DataLoader:
    """The shuffled, seeded, multi-scale train loader (last incomplete batch dropped); with
    several processes, this ``rank``'s shard of every global batch of ``cfg.batch_size`` images.

    Raises:
        ValueError: If the split holds fewer images than one batch, or its categories are not
            the model's, or ``world_size`` does not divide the batch size.
    """
    if len(dataset) < cfg.batch_size:
        raise ValueError(f"the train split ({dataset.ann_file}) has {len(dataset)} images, "
                         f"fewer than batch_size={cfg.batch_size}")
    if dataset.category_map != category_map:
        raise ValueError(f"the train split's categories {dataset.category_map.names} differ "
                         f"from the model's {category_map.names}")
    return DataLoader(dataset, cfg.batch_size, shuffle=True, drop_last=True,
                      num_workers=cfg.num_workers, seed=cfg.seed, multi_scale=cfg.multi_scale,
                      rank=rank, world_size=world_size)


def eval_loader(cfg: TrainConfig, dataset: CocoDetection) -> DataLoader:
    """Every image of an evaluation split in order, ``eval_batch_size`` at a time."""
    return DataLoader(dataset, cfg.eval_batch_size, shuffle=False, drop_last=False,
                      num_workers=cfg.num_workers, seed=cfg.seed)


def variant_config(cfg: TrainConfig, num_classes: int) -> VariantConfig:
    """The variant's config with this run's optimizer, schedule and EMA values.

    The model's eval-time size is ``cfg.size``; the official regex parameter groups are kept,
    with the backbone groups' rate replaced by ``cfg.backbone_lr`` when that is set.
    """
    vc = variant_at_size(cfg.variant, num_classes, cfg.size)
    groups = [dataclasses.replace(g, lr=cfg.backbone_lr)
              if g.lr is not None and cfg.backbone_lr is not None else dataclasses.replace(g)
              for g in vc.optimizer.params]
    vc.optimizer = dataclasses.replace(vc.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                       params=groups)
    vc.schedule = ScheduleConfig(epochs=cfg.epochs, milestones=list(cfg.lr_milestones),
                                 gamma=cfg.lr_gamma, clip_max_norm=cfg.clip_max_norm)
    vc.ema = EMAConfig(decay=cfg.ema_decay, warmups=cfg.ema_warmups)
    if cfg.multi_scale is not None:
        vc.multi_scale = list(cfg.multi_scale)
    return vc


def lr_factor(cfg: TrainConfig, epoch: int, global_step: int) -> float:
    """The factor applied to every group's base rate at one iteration.

    ``gamma ** (number of milestones <= epoch)`` (``MultiStepLR`` stepped per epoch) times the
    linear warm-up ``min(1, (global_step + 1) / warmup_iters)`` when ``warmup_iters > 0``.

    Args:
        cfg: The run's config.
        epoch: 0-based epoch of the iteration.
        global_step: 0-based iteration count since the start of training.
    """
    decay = cfg.lr_gamma ** sum(1 for m in cfg.lr_milestones if epoch >= m)
    if cfg.warmup_iters > 0:
        return decay * min(1.0, (global_step + 1) / cfg.warmup_iters)
    return decay


def config_differences(saved: Mapping, current: TrainConfig) -> list[str]:
    """Fields (outside :data:`RESUME_EXEMPT`) whose saved value differs from the current one."""
    now = current.to_dict()
    keys = sorted(set(saved) | set(now))
    return [f"{k}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}" for k in keys
            if k not in RESUME_EXEMPT and saved.get(k) != now.get(k)]


def backbone_base_lr(variant: VariantConfig) -> float:
    """The backbone groups' base rate (the first group with its own rate; else the default)."""
    return next((g.lr for g in variant.optimizer.params if g.lr is not None), variant.optimizer.lr)


def eval_due(cfg: TrainConfig, epoch: int) -> bool:
    """Whether to evaluate after 0-based ``epoch``: every ``eval_every`` epochs and after the last."""
    if cfg.eval_every == 0:
        return False
    return (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs


