"""The official RT-DETR training and evaluation transforms, in numpy and PIL.

The official pipeline (``rtdetr_pytorch/configs/rtdetr/include/dataloader.yml``) is built from
torchvision ``transforms.v2`` ops working on PIL images and ``BoundingBox`` tensors. These
classes re-express each op's behaviour on a uint8 ``[H, W, 3]`` RGB array and a target dict,
drawing every random number from a :class:`~rtdetr_common.random.SharedRandom` so that a
sample's augmentation depends only on the stream it is given (never on a global generator).

Conventions:

* ``image``: uint8 ``[H, W, 3]`` RGB until :class:`ToFloat`, float32 ``[3, H, W]`` in [0, 1]
  after it (:func:`image_hw` reads the size of either).
* ``target``: a dict whose per-box entries (:data:`PER_BOX_KEYS`: ``boxes`` float32 ``[n, 4]``
  absolute-pixel xyxy until :class:`ConvertBox`, ``labels`` int64 ``[n]``, ``area`` float32
  ``[n]``, ``iscrowd`` int64 ``[n]``) are always filtered together; other entries pass through.
* Every transform is ``__call__(image, target, rng) -> (image, target)`` and never modifies its
  inputs in place.

Where the official ops run on PIL images (photometric distortion, resize), the same Pillow
calls do the work here, so the pixels equal the official ones for the same random factors.
Differences from the official transforms (all documented at the class):

* :class:`SanitizeBoundingBox` also filters ``area`` and ``iscrowd`` (torchvision filters only
  boxes and labels, leaving those two entries out of step with the boxes).
* :class:`RandomIoUCrop` returns a sample without boxes unchanged at once (torchvision keeps
  drawing options until it draws the "leave as is" one: the same result, fewer draws), and
  counts a crop side that rounds to 0 pixels as a failed trial (torchvision divides by zero).
* The random draws come from ``rng`` in a fixed documented order, not torch's generator, so the
  numbers (not the distributions) differ from a torch run.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np
from PIL import Image, ImageEnhance

from ..random import SharedRandom

PER_BOX_KEYS = ("boxes", "labels", "area", "iscrowd")

Target = dict[str, Any]


def image_hw(image: np.ndarray) -> tuple[int, int]:
    """(height, width) of a uint8 ``[H, W, 3]`` or float32 ``[3, H, W]`` image.

    Raises:
        TypeError: For any other array layout or dtype.
    """
    if image.ndim == 3 and image.dtype == np.uint8 and image.shape[2] == 3:
        return int(image.shape[0]), int(image.shape[1])
    if image.ndim == 3 and image.dtype == np.float32 and image.shape[0] == 3:
        return int(image.shape[1]), int(image.shape[2])
    raise TypeError(f"expected a uint8 [H, W, 3] or float32 [3, H, W] image, got {image.dtype} {image.shape}")


def _require_uint8(image: np.ndarray, name: str) -> None:
    if not (image.ndim == 3 and image.dtype == np.uint8 and image.shape[2] == 3):
        raise TypeError(f"{name} expects a uint8 [H, W, 3] RGB image, got {image.dtype} {image.shape}")


def _filter_boxes(target: Target, keep: np.ndarray) -> Target:
    """A copy of ``target`` with every per-box entry restricted to ``keep``."""
    out = dict(target)
    for key in PER_BOX_KEYS:
        if key in out:
            out[key] = out[key][keep]
    return out


def _with_boxes(target: Target, boxes: np.ndarray) -> Target:
    out = dict(target)
    out["boxes"] = boxes.astype(np.float32, copy=False)
    return out


def _coin(rng: SharedRandom, p: float) -> bool:
    """True with probability ``p`` (torchvision's ``torch.rand(1) < p``)."""
    return bool(rng.uniform((1,))[0] < p)


def _uniform(rng: SharedRandom, low: float, high: float) -> float:
    """One float in [low, high)."""
    return float(low + (high - low) * float(rng.uniform((1,))[0]))


def _permutation(rng: SharedRandom, n: int) -> np.ndarray:
    """A uniformly random permutation of ``range(n)`` (argsort of 62-bit random keys)."""
    return np.argsort(rng.integers(0, 2**62, (n,)), kind="stable")


def box_iou(boxes: np.ndarray, other: np.ndarray) -> np.ndarray:
    """IoU of xyxy boxes ``[n, 4]`` against ``[m, 4]``, ``[n, m]`` (torchvision's ``box_iou``)."""
    area1 = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    area2 = (other[:, 2] - other[:, 0]) * (other[:, 3] - other[:, 1])
    lt = np.maximum(boxes[:, None, :2], other[None, :, :2])  # [n, m, 2]
    rb = np.minimum(boxes[:, None, 2:], other[None, :, 2:])  # [n, m, 2]
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area1[:, None] + area2[None, :] - inter)


class Compose:
    """Applies transforms in order, all drawing from the same stream.

    Args:
        transforms: Callables ``(image, target, rng) -> (image, target)``.
    """

    def __init__(self, transforms: Sequence[Callable[..., tuple[np.ndarray, Target]]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: np.ndarray, target: Target, rng: SharedRandom) -> tuple[np.ndarray, Target]:
        for transform in self.transforms:
            image, target = transform(image, target, rng)
        return image, target

    def __repr__(self) -> str:
        inner = ",\n    ".join(repr(t) for t in self.transforms)
        return f"Compose(\n    {inner}\n)"


def _adjust_hue(image: Image.Image, hue_factor: float) -> Image.Image:
    """torchvision's PIL hue shift: the uint8 H channel of PIL's HSV moves by int(factor*255) mod 256."""
    h, s, v = image.convert("HSV").split()
    shift = int(hue_factor * 255) % 256
    h_arr = np.asarray(h, dtype=np.uint8) + np.uint8(shift)  # wraps modulo 256
    return Image.merge("HSV", (Image.fromarray(h_arr), s, v)).convert("RGB")


class RandomPhotometricDistort:
    """SSD photometric distortion, as torchvision v2 ``RandomPhotometricDistort``.

    Each of brightness, contrast, saturation and hue is applied with probability ``p`` with a
    factor uniform in its range; contrast goes before or after saturation+hue with equal
    probability; finally the channels are permuted at random with probability ``p``. The
    adjustments are Pillow's ``ImageEnhance`` Brightness/Contrast/Color and the HSV hue shift,
    the functions torchvision calls on the PIL images of the official pipeline.

    Draw order: for brightness, contrast, saturation, hue: one coin, then (if it fires) one
    factor; one coin for contrast-before; one coin for the permutation, then (if it fires)
    three permutation keys.

    Args:
        brightness: Brightness factor range.
        contrast: Contrast factor range.
        saturation: Saturation factor range.
        hue: Hue shift range, as a fraction of the full hue circle.
        p: Probability of each of the five operations.
    """

    def __init__(self, brightness: tuple[float, float] = (0.875, 1.125), contrast: tuple[float, float] = (0.5, 1.5),
                 saturation: tuple[float, float] = (0.5, 1.5), hue: tuple[float, float] = (-0.05, 0.05),
                 p: float = 0.5) -> None:
        self.brightness = brightness
        self.contrast = contrast
        self.saturation = saturation
        self.hue = hue
        self.p = p

    def __call__(self, image: np.ndarray, target: Target, rng: SharedRandom) -> tuple[np.ndarray, Target]:
        _require_uint8(image, "RandomPhotometricDistort")
        factors = {}
        for name in ("brightness", "contrast", "saturation", "hue"):
            if _coin(rng, self.p):
                low, high = getattr(self, name)
                factors[name] = _uniform(rng, low, high)
        contrast_before = _coin(rng, 0.5)
        permutation = _permutation(rng, 3) if _coin(rng, self.p) else None
        if factors:
            pil = Image.fromarray(image)
            if "brightness" in factors:
                pil = ImageEnhance.Brightness(pil).enhance(factors["brightness"])
            if "contrast" in factors and contrast_before:
                pil = ImageEnhance.Contrast(pil).enhance(factors["contrast"])
            if "saturation" in factors:
                pil = ImageEnhance.Color(pil).enhance(factors["saturation"])
            if "hue" in factors:
                pil = _adjust_hue(pil, factors["hue"])
            if "contrast" in factors and not contrast_before:
                pil = ImageEnhance.Contrast(pil).enhance(factors["contrast"])
            image = np.asarray(pil)
        if permutation is not None:
            image = image[:, :, permutation]
        return np.ascontiguousarray(image), target

    def __repr__(self) -> str:
        return (f"RandomPhotometricDistort(brightness={self.brightness}, contrast={self.contrast}, "
                f"saturation={self.saturation}, hue={self.hue}, p={self.p})")


class RandomZoomOut:
    """Places the image on a larger canvas filled with ``fill``, as torchvision v2 ``RandomZoomOut``.

    With probability ``p``: a side ratio r uniform in ``side_range`` gives a canvas of
    ``int(w * r) x int(h * r)``; the image goes at a uniformly drawn offset; boxes move with it.

    Draw order: one coin; then (if it fires) r; then the two offset fractions (x, y).

    Args:
        fill: Canvas value, one int or an RGB triple.
        side_range: Range of the canvas-to-image side ratio (first value >= 1).
        p: Probability of zooming out.

    Raises:
        ValueError: If ``side_range`` is not (low, high) with 1 <= low <= high.
    """

    def __init__(self, fill: int | Sequence[int] = 0, side_range: tuple[float, float] = (1.0, 4.0),
                 p: float = 0.5) -> None:
        if len(side_range) != 2 or side_range[0] < 1.0 or side_range[0] > side_range[1]:
            raise ValueError(f"RandomZoomOut side_range must be (low, high) with 1 <= low <= high, got {side_range}")
        self.fill = fill
        self.side_range = (float(side_range[0]), float(side_range[1]))
        self.p = p

    def __call__(self, image: np.ndarray, target: Target, rng: SharedRandom) -> tuple[np.ndarray, Target]:
        _require_uint8(image, "RandomZoomOut")
        if not _coin(rng, self.p):
            return image, target
        h, w = image.shape[:2]
        low, high = self.side_range
        r = np.float32(low) + rng.uniform((1,))[0] * np.float32(high - low)
        canvas_w, canvas_h = int(np.float32(w) * r), int(np.float32(h) * r)
        offset = rng.uniform((2,))
        left = int(np.float32(canvas_w - w) * offset[0])
        top = int(np.float32(canvas_h - h) * offset[1])
        canvas = np.empty((canvas_h, canvas_w, 3), dtype=np.uint8)
        canvas[...] = np.asarray(self.fill, dtype=np.uint8)
        canvas[top:top + h, left:left + w] = image
        boxes = target["boxes"] + np.array([left, top, left, top], dtype=np.float32)
        return canvas, _with_boxes(target, boxes)

    def __repr__(self) -> str:
        return f"RandomZoomOut(fill={self.fill}, side_range={self.side_range}, p={self.p})"


class RandomIoUCrop:
    """SSD IoU crop, as torchvision v2 ``RandomIoUCrop`` with the official ``p`` wrapper.

    With probability ``p``: repeatedly draw a minimum IoU from ``sampler_options`` (a value
    >= 1 means "leave the image as is"); for up to ``trials`` candidate crops of each, accept the
    first whose aspect ratio is in range, which contains at least one box centre, and whose best
    IoU with those boxes reaches the minimum. The image is cropped, boxes are shifted and clamped
    to the crop, and boxes whose centre lies outside it are zeroed so that the following
    :class:`SanitizeBoundingBox` removes them (as in torchvision).

    Draw order: one coin; then per option: one option index; per trial: two scale fractions
    (w, h), then (if the aspect ratio passes) two offset fractions (x, y).

    Differences from torchvision: a sample without boxes is returned unchanged at once
    (torchvision reaches the same result after drawing options until "leave as is"); a crop side
    that rounds to 0 pixels fails the trial (torchvision would divide by zero).

    Args:
        min_scale: Smallest crop side, as a fraction of the image side.
        max_scale: Largest crop side fraction.
        min_aspect_ratio: Smallest crop width/height.
        max_aspect_ratio: Largest crop width/height.
        sampler_options: Minimum-IoU options; default [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0].
        trials: Candidate crops per drawn option.
        p: Probability of attempting the crop at all (the official pipeline uses 0.8).
    """

    def __init__(self, min_scale: float = 0.3, max_scale: float = 1.0, min_aspect_ratio: float = 0.5,
                 max_aspect_ratio: float = 2.0, sampler_options: Optional[Sequence[float]] = None,
                 trials: int = 40, p: float = 1.0) -> None:
        self.min_scale = min_scale
        self.max_scale = max_scale
        self.min_aspect_ratio = min_aspect_ratio
        self.max_aspect_ratio = max_aspect_ratio
        self.options = list(sampler_options) if sampler_options is not None else [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0]
        self.trials = trials
        self.p = p

    def _find_crop(self, boxes: np.ndarray, h: int, w: int,
                   rng: SharedRandom) -> Optional[tuple[int, int, int, int, np.ndarray]]:
        """(left, top, crop width, crop height, centre-inside mask), or None for "leave as is"."""
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2  # [n, 2]
        while True:
            min_iou = self.options[int(rng.integers(0, len(self.options), (1,))[0])]
            if min_iou >= 1.0:
                return None
            for _ in range(self.trials):
                scale = np.float32(self.min_scale) + np.float32(self.max_scale - self.min_scale) * rng.uniform((2,))
                new_w, new_h = int(np.float32(w) * scale[0]), int(np.float32(h) * scale[1])
                if new_w == 0 or new_h == 0:
                    continue
                if not self.min_aspect_ratio <= new_w / new_h <= self.max_aspect_ratio:
                    continue
                offset = rng.uniform((2,))
                left = int(np.float32(w - new_w) * offset[0])
                top = int(np.float32(h - new_h) * offset[1])
                right, bottom = left + new_w, top + new_h
                inside = ((left < centres[:, 0]) & (centres[:, 0] < right)
                          & (top < centres[:, 1]) & (centres[:, 1] < bottom))
                if not inside.any():
                    continue
                crop = np.array([[left, top, right, bottom]], dtype=np.float32)
                if box_iou(boxes[inside], crop).max() < min_iou:
                    continue
                return left, top, new_w, new_h, inside

    def __call__(self, image: np.ndarray, target: Target, rng: SharedRandom) -> tuple[np.ndarray, Target]:
        _require_uint8(image, "RandomIoUCrop")
        if not _coin(rng, self.p) or len(target["boxes"]) == 0:
            return image, target
        h, w = image.shape[:2]
        found = self._find_crop(target["boxes"], h, w, rng)
        if found is None:
            return image, target
        left, top, new_w, new_h, inside = found
        image = image[top:top + new_h, left:left + new_w]
        boxes = target["boxes"] - np.array([left, top, left, top], dtype=np.float32)
        boxes = np.clip(boxes, 0, np.array([new_w, new_h, new_w, new_h], dtype=np.float32))
        boxes[~inside] = 0
        return image, _with_boxes(target, boxes)

    def __repr__(self) -> str:
        return (f"RandomIoUCrop(min_scale={self.min_scale}, max_scale={self.max_scale}, "
                f"aspect_ratio=({self.min_aspect_ratio}, {self.max_aspect_ratio}), options={self.options}, "
                f"trials={self.trials}, p={self.p})")


class SanitizeBoundingBox:
    """Drops degenerate boxes with their labels, as torchvision v2 ``SanitizeBoundingBox``.

    A box is kept when its width and height are >= ``min_size``, no coordinate is negative and it
    lies within the image. Boxes must be absolute xyxy (use before :class:`ConvertBox`).

    Difference from torchvision: ``area`` and ``iscrowd`` are filtered with the boxes too.

    Args:
        min_size: Smallest width and height kept, in pixels (>= 1).

    Raises:
        ValueError: If ``min_size`` < 1.
    """

    def __init__(self, min_size: float = 1.0) -> None:
        if min_size < 1:
            raise ValueError(f"SanitizeBoundingBox min_size must be >= 1, got {min_size}")
        self.min_size = min_size

    def __call__(self, image: np.ndarray, target: Target, rng: SharedRandom) -> tuple[np.ndarray, Target]:
        h, w = image_hw(image)
        boxes = target["boxes"]
        keep = ((boxes[:, 2] - boxes[:, 0] >= self.min_size) & (boxes[:, 3] - boxes[:, 1] >= self.min_size)
                & (boxes >= 0).all(axis=1) & (boxes[:, 0] <= w) & (boxes[:, 2] <= w)
                & (boxes[:, 1] <= h) & (boxes[:, 3] <= h))
        return image, _filter_boxes(target, keep)

    def __repr__(self) -> str:
        return f"SanitizeBoundingBox(min_size={self.min_size})"


class RandomHorizontalFlip:
    """Mirrors image and boxes left-right with probability ``p`` (draws one coin).

    Args:
        p: Probability of flipping.
    """

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, image: np.ndarray, target: Target, rng: SharedRandom) -> tuple[np.ndarray, Target]:
        _require_uint8(image, "RandomHorizontalFlip")
        if not _coin(rng, self.p):
            return image, target
        w = image.shape[1]
        boxes = target["boxes"]
        flipped = np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], axis=1)  # [n, 4]
        return image[:, ::-1], _with_boxes(target, flipped)

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class Resize:
    """Resizes to a fixed size with Pillow's bilinear filter; boxes scale with the image.

    The official pipeline resizes PIL images, where torchvision calls exactly this Pillow
    resize: a triangle filter whose support widens with the scale factor when downscaling
    (antialiased, as torchvision's ``antialias=True``), plain bilinear with half-pixel centres
    when upscaling.

    Args:
        size: Output side (square) or (height, width).
    """

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = (int(size), int(size)) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))

    def __call__(self, image: np.ndarray, target: Target, rng: SharedRandom) -> tuple[np.ndarray, Target]:
        _require_uint8(image, "Resize")
        h, w = image.shape[:2]
        out_h, out_w = self.size
        if (h, w) == (out_h, out_w):
            return image, target
        resized = np.asarray(Image.fromarray(image).resize((out_w, out_h), Image.Resampling.BILINEAR))
        scale = np.array([out_w / w, out_h / h, out_w / w, out_h / h], dtype=np.float32)
        return resized, _with_boxes(target, target["boxes"] * scale)

    def __repr__(self) -> str:
        return f"Resize(size={self.size})"


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 ``[..., H, W, 3]`` -> float32 ``[..., 3, H, W]`` in [0, 1]: the one conversion that
    :class:`ToFloat` and the loader (which ships uint8 batches from its workers) share."""
    chw = np.moveaxis(images, -1, -3)  # [..., 3, H, W]
    return np.ascontiguousarray(chw, dtype=np.float32) / np.float32(255)


class ToFloat:
    """uint8 ``[H, W, 3]`` -> float32 ``[3, H, W]`` in [0, 1] (``ToImageTensor`` + ``ConvertDtype``)."""

    def __call__(self, image: np.ndarray, target: Target, rng: SharedRandom) -> tuple[np.ndarray, Target]:
        _require_uint8(image, "ToFloat")
        return to_float(image), target

    def __repr__(self) -> str:
        return "ToFloat()"


class ConvertBox:
    """Converts absolute xyxy boxes to ``out_fmt`` and optionally normalises by the image size.

    Args:
        out_fmt: ``"cxcywh"``, ``"xyxy"`` or ``""`` (keep xyxy).
        normalize: Divide by (w, h, w, h) of the image.

    Raises:
        ValueError: For an unknown ``out_fmt``.
    """

    def __init__(self, out_fmt: str = "cxcywh", normalize: bool = True) -> None:
        if out_fmt not in ("", "xyxy", "cxcywh"):
            raise ValueError(f"ConvertBox out_fmt must be '', 'xyxy' or 'cxcywh', got {out_fmt!r}")
        self.out_fmt = out_fmt
        self.normalize = normalize

    def __call__(self, image: np.ndarray, target: Target, rng: SharedRandom) -> tuple[np.ndarray, Target]:
        boxes = target["boxes"]
        if self.out_fmt == "cxcywh":
            boxes = np.concatenate([(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]], axis=1)  # [n, 4]
        if self.normalize:
            h, w = image_hw(image)
            boxes = boxes / np.array([w, h, w, h], dtype=np.float32)
        return image, _with_boxes(target, boxes)

    def __repr__(self) -> str:
        return f"ConvertBox(out_fmt={self.out_fmt!r}, normalize={self.normalize})"


AUGMENTATIONS = ("official", "light")


def train_transforms(size: int, augment: str = "official") -> Compose:
    """The training ops at ``size``; boxes end normalised cxcywh.

    Args:
        size: Output side.
        augment: ``"official"``: the official ops (``dataloader.yml``): photometric distortion,
            zoom-out, IoU crop, sanitising, flip, resize. ``"light"``: photometric distortion,
            flip and resize only; zoom-out (up to 4x smaller objects) and IoU crop make a short
            run from scratch converge much more slowly, so a run of minutes uses these.

    Raises:
        ValueError: For an unknown ``augment``.
    """
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {augment!r}")
    geometric = [RandomZoomOut(fill=0), RandomIoUCrop(p=0.8)] if augment == "official" else []
    return Compose([
        RandomPhotometricDistort(p=0.5),
        *geometric,
        SanitizeBoundingBox(min_size=1),
        RandomHorizontalFlip(),
        Resize(size),
        ToFloat(),
        SanitizeBoundingBox(min_size=1),
        ConvertBox(out_fmt="cxcywh", normalize=True),
    ])


def eval_transforms(size: int) -> Compose:
    """The official evaluation ops (resize, to float) plus :class:`ConvertBox` to normalised cxcywh.

    The official evaluation keeps its target boxes in absolute xyxy (its evaluator reads the
    ground truth from the annotation file); converting them here gives every loader batch the
    same target format, and the evaluator here reads the annotation file too.
    """
    return Compose([Resize(size), ToFloat(), ConvertBox(out_fmt="cxcywh", normalize=True)])
