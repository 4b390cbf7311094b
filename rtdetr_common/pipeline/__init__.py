"""Framework-neutral COCO data pipeline: numpy arrays out, so torch and Jittor see identical bytes.

* :mod:`.coco_dataset` -- :class:`CocoDetection`: COCO-format images and targets, bad data reported.
* :mod:`.transforms` -- the official RT-DETR training/evaluation transforms in numpy and Pillow.
* :mod:`.loader` -- :class:`DataLoader`: deterministic, resumable batches, optionally from workers.
"""

from .coco_dataset import CocoDetection, pil_to_rgb8
from .loader import Batch, DataLoader, resize_nearest, sample_rng, stream_seed
from .transforms import (
    Compose,
    ConvertBox,
    RandomHorizontalFlip,
    RandomIoUCrop,
    RandomPhotometricDistort,
    RandomZoomOut,
    Resize,
    SanitizeBoundingBox,
    ToFloat,
    eval_transforms,
    train_transforms,
)

__all__ = [
    "CocoDetection",
    "pil_to_rgb8",
    "Batch",
    "DataLoader",
    "resize_nearest",
    "sample_rng",
    "stream_seed",
    "Compose",
    "ConvertBox",
    "RandomHorizontalFlip",
    "RandomIoUCrop",
    "RandomPhotometricDistort",
    "RandomZoomOut",
    "Resize",
    "SanitizeBoundingBox",
    "ToFloat",
    "eval_transforms",
    "train_transforms",
]
