"""COCO-format detection dataset with numpy outputs, as the official ``CocoDetection``.

The official dataset (``rtdetr_pytorch/src/data/coco/coco_dataset.py``, ``ConvertCocoPolysToMask``)
reads an image as RGB, removes crowd annotations (``iscrowd`` = 1) from the training target,
turns ``[x, y, w, h]`` into xyxy, clamps boxes to the image, drops boxes left with no width or
height, and remaps COCO category ids to contiguous labels. This class does the same with
numpy arrays, and reports bad data instead of failing deep inside a training run:

* an annotation file that is missing, not JSON or not COCO-shaped: a clear error naming it;
* annotations with zero/negative width or height, an unknown category id or an unknown image
  id: dropped, with one warning per file giving the counts (:attr:`CocoDetection.annotation_counts`);
* boxes reaching outside their image: clipped, and dropped when nothing is left (counted);
* a missing or unreadable image: :meth:`CocoDetection.load` logs a warning naming the file,
  records it in :attr:`CocoDetection.skipped` and returns None (the loader leaves it out);
* images without boxes: empty ``[0, 4]`` / ``[0]`` arrays;
* grayscale, palette, RGBA, CMYK and 16-bit images: converted to 8-bit RGB (16-bit values are
  scaled by 255/65535; Pillow's own conversion would clip them at 255).

Labels come from :class:`rtdetr_common.coco.CategoryMap` (position of the category id among
the file's sorted ids), which for COCO 2017 is the official 91 -> 80 map.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from PIL import Image
from pycocotools.coco import COCO

from ..coco import CategoryMap
from ..random import SharedRandom
from .transforms import Compose, ToFloat

logger = logging.getLogger(__name__)

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")

_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def pil_to_rgb8(image: Image.Image) -> np.ndarray:
    """Any Pillow image as a uint8 ``[H, W, 3]`` RGB array.

    16-bit and 32-bit integer grayscale (``I;16*``, ``I``) is read as 16-bit intensity and
    scaled to 8 bits (rounded); every other mode goes through Pillow's RGB conversion (alpha
    dropped, palettes expanded, grayscale replicated).
    """
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.float64)
        gray = np.rint(np.clip(values, 0, 65535) * (255.0 / 65535.0)).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)  # [H, W, 3]
    return np.array(image.convert("RGB"), dtype=np.uint8)


def _read_json(path: Path) -> dict:
    """The annotation file's top-level object, with errors that name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} does not exist")
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"annotation file {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"annotation file {path} must hold a JSON object, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"annotation file {path} needs a list under {key!r}")
    return data


def _check_entries(path: Path, data: dict) -> None:
    """Raises ValueError naming the file and entry for malformed images/annotations/categories."""
    required = {"images": ("id", "file_name", "width", "height"),
                "annotations": ("id", "image_id", "category_id", "bbox"),
                "categories": ("id",)}
    for section, keys in required.items():
        seen: set = set()
        for i, entry in enumerate(data[section]):
            if not isinstance(entry, dict):
                raise ValueError(f"annotation file {path}: {section}[{i}] is not an object")
            missing = [k for k in keys if k not in entry]
            if missing:
                raise ValueError(f"annotation file {path}: {section}[{i}] lacks {missing}")
            if section != "annotations" and entry["id"] in seen:
                raise ValueError(f"annotation file {path}: {section} has id {entry['id']} twice")
            seen.add(entry["id"])
            if section == "annotations":
                bbox = entry["bbox"]
                if not (isinstance(bbox, list) and len(bbox) == 4
                        and all(isinstance(v, (int, float)) for v in bbox)):
                    raise ValueError(f"annotation file {path}: annotation id {entry['id']} has bbox {bbox!r}, "
                                     "expected [x, y, w, h] numbers")
                if "area" in entry and not isinstance(entry["area"], (int, float)):
                    raise ValueError(f"annotation file {path}: annotation id {entry['id']} has area "
                                     f"{entry['area']!r}, expected a number")


def _empty_target() -> dict[str, np.ndarray]:
    return {"boxes": np.zeros((0, 4), np.float32), "labels": np.zeros((0,), np.int64),
            "area": np.zeros((0,), np.float32), "iscrowd": np.zeros((0,), np.int64)}


class CocoDetection:
    """A COCO-format detection dataset yielding numpy images and targets.

    Images are indexed in ascending image-id order (as torchvision's ``CocoDetection``); images
    without annotations are kept.

    Args:
        img_folder: Folder the images' ``file_name`` entries are relative to.
        ann_file: COCO-format annotation JSON.
        transforms: ``(image, target, rng) -> (image, target)`` applied by :meth:`get`, e.g.
            :func:`~rtdetr_common.pipeline.transforms.train_transforms`; None applies only
            :class:`~rtdetr_common.pipeline.transforms.ToFloat`.

    Attributes:
        coco: The pycocotools ``COCO`` object of the annotation file.
        category_map: Labels <-> category ids of the file.
        ids: Image ids, index -> id.
        annotation_counts: How many annotations were kept, and dropped or clipped for each
            reason (``kept``, ``crowd``, ``degenerate``, ``unknown_category``, ``unknown_image``,
            ``clipped``, ``outside``).
        skipped: Index -> "file: reason" for every image that could not be read so far.

    Raises:
        FileNotFoundError: If the annotation file does not exist.
        ValueError: If it is not valid JSON or not COCO-shaped (the message names the file).
    """

    def __init__(self, img_folder: str | Path, ann_file: str | Path,
                 transforms: Optional[Callable[..., tuple[np.ndarray, dict]]] = None) -> None:
        self.img_folder = Path(img_folder)
        self.ann_file = Path(ann_file)
        self.transforms = transforms
        data = _read_json(self.ann_file)
        _check_entries(self.ann_file, data)
        self.coco = COCO()
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
            self.coco.createIndex()
        if not self.coco.cats:
            raise ValueError(f"annotation file {self.ann_file} lists no categories")
        self.category_map = CategoryMap.from_coco(self.coco)
        self.ids: list[int] = sorted(self.coco.imgs)
        self.skipped: dict[int, str] = {}
        self.annotation_counts: dict[str, int] = {}
        self._targets = self._build_targets(data["annotations"])

    def _build_targets(self, annotations: list[dict]) -> list[dict[str, np.ndarray]]:
        """Per-image targets after the official filtering, with counts of what was dropped."""
        index_of = {image_id: i for i, image_id in enumerate(self.ids)}
        # (w, h) per image, plus a (0, 0) row that annotations of unknown images (index -1) read.
        sizes = np.array([[self.coco.imgs[i]["width"], self.coco.imgs[i]["height"]] for i in self.ids] + [[0, 0]],
                         dtype=np.float64)  # [num_images + 1, 2]
        n = len(annotations)
        xywh = np.array([a["bbox"] for a in annotations], dtype=np.float64).reshape(n, 4)  # [n, 4]
        image_index = np.array([index_of.get(a["image_id"], -1) for a in annotations], dtype=np.int64)
        crowd = np.array([bool(a.get("iscrowd", 0)) for a in annotations], dtype=bool)
        known_cat = np.array([a["category_id"] in self.category_map for a in annotations], dtype=bool)
        area = np.array([a.get("area", a["bbox"][2] * a["bbox"][3]) for a in annotations], dtype=np.float32)
        with np.errstate(invalid="ignore"):
            degenerate = ~((xywh[:, 2] > 0) & (xywh[:, 3] > 0))  # also catches NaN sizes
        known_image = image_index >= 0
        candidate = ~crowd & known_image & known_cat & ~degenerate
        xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)  # [n, 4]
        wh = np.tile(sizes[image_index], 2)  # [n, 4] (w, h, w, h)
        clipped_xyxy = np.clip(xyxy, 0, wh)
        with np.errstate(invalid="ignore"):
            was_clipped = np.any(clipped_xyxy != xyxy, axis=1)
            empty = ~((clipped_xyxy[:, 2] > clipped_xyxy[:, 0]) & (clipped_xyxy[:, 3] > clipped_xyxy[:, 1]))
        keep = candidate & ~empty
        unknown_cat = ~crowd & known_image & ~degenerate & ~known_cat
        unknown_ids = sorted({a["category_id"] for a, bad in zip(annotations, unknown_cat) if bad}, key=str)
        self.annotation_counts = {
            "kept": int(keep.sum()),
            "crowd": int((crowd & known_image).sum()),
            "degenerate": int((~crowd & known_image & degenerate).sum()),
            "unknown_category": int(unknown_cat.sum()),
            "unknown_image": int((~known_image).sum()),
            "clipped": int((candidate & was_clipped).sum()),
            "outside": int((candidate & empty).sum()),
        }
        self._warn_about_annotations(unknown_ids)
        labels = np.zeros(n, dtype=np.int64)
        labels[keep] = self.category_map.to_labels(a["category_id"] for a, k in zip(annotations, keep) if k)
        kept = np.flatnonzero(keep)
        order = kept[np.argsort(image_index[kept], kind="stable")]  # file order within each image
        starts = np.searchsorted(image_index[order], np.arange(len(self.ids) + 1))
        targets = []
        for i in range(len(self.ids)):
            sel = order[starts[i]:starts[i + 1]]
            targets.append({"boxes": clipped_xyxy[sel].astype(np.float32), "labels": labels[sel],
                            "area": area[sel], "iscrowd": np.zeros(len(sel), np.int64)})
        return targets

    def _warn_about_annotations(self, unknown_ids: list) -> None:
        counts = self.annotation_counts
        problems = []
        if counts["degenerate"]:
            problems.append(f"dropped {counts['degenerate']} with zero or negative width/height")
        if counts["unknown_category"]:
            shown = ", ".join(str(c) for c in unknown_ids[:10]) + (", ..." if len(unknown_ids) > 10 else "")
            problems.append(f"dropped {counts['unknown_category']} with category ids not in the file's "
                            f"categories ({shown})")
        if counts["unknown_image"]:
            problems.append(f"dropped {counts['unknown_image']} whose image_id is not among the images")
        if counts["clipped"]:
            problems.append(f"clipped {counts['clipped']} boxes reaching outside their image "
                            f"({counts['outside']} of them empty after clipping, dropped)")
        if problems:
            logger.warning("annotation file %s: %s; %d annotations kept",
                           self.ann_file, "; ".join(problems), counts["kept"])

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_skipped(self) -> int:
        """Number of distinct images that could not be read so far."""
        return len(self.skipped)

    def image_path(self, index: int) -> Path:
        """Path of the image at ``index``."""
        return self.img_folder / self.coco.imgs[self.ids[index]]["file_name"]

    def _skip(self, index: int, path: Path, reason: str) -> None:
        self.skipped[index] = f"{path}: {reason}"
        logger.warning("skipping image %s (index %d, image id %d): %s", path, index, self.ids[index], reason)

    def load(self, index: int) -> Optional[tuple[np.ndarray, dict[str, Any]]]:
        """The image and its target, before any transform.

        Args:
            index: Position in :attr:`ids`.

        Returns:
            ``(image, target)``: image uint8 ``[H, W, 3]`` RGB; target ``boxes`` float32 ``[n, 4]``
            absolute xyxy, ``labels`` int64 ``[n]``, ``image_id`` int, ``orig_size`` int64 ``[2]``
            (w, h), ``area`` float32 ``[n]``, ``iscrowd`` int64 ``[n]`` (zeros: crowd annotations are
            excluded). None when the image file is missing or unreadable: the skip is logged and
            recorded in :attr:`skipped`.
        """
        path = self.image_path(index)
        try:
            with Image.open(path) as pil:
                pil.load()
                image = pil_to_rgb8(pil)
        except FileNotFoundError:
            self._skip(index, path, "file not found")
            return None
        except _IMAGE_ERRORS as err:
            self._skip(index, path, f"unreadable image ({type(err).__name__}: {err})")
            return None
        target = {key: value.copy() for key, value in self._targets[index].items()}
        h, w = image.shape[:2]
        info = self.coco.imgs[self.ids[index]]
        if (w, h) != (info["width"], info["height"]):
            logger.warning("image %s is %dx%d but its annotation says %sx%s; boxes are clipped to the image",
                           path, w, h, info["width"], info["height"])
            boxes = np.clip(target["boxes"], 0, np.array([w, h, w, h], dtype=np.float32))
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            target = {key: value[keep] for key, value in target.items()}
            target["boxes"] = boxes[keep]
        target["image_id"] = int(self.ids[index])
        target["orig_size"] = np.array([w, h], dtype=np.int64)
        return image, target

    def can_defer_float(self) -> bool:
        """Whether :meth:`get` can leave the float conversion out (``uint8``): the transforms
        are a :class:`Compose` holding one :class:`ToFloat`, or none."""
        if self.transforms is None:
            return True
        steps = getattr(self.transforms, "transforms", None)
        return (isinstance(self.transforms, Compose)
                and sum(isinstance(t, ToFloat) for t in steps) == 1)

    def get(self, index: int, rng: SharedRandom, uint8: bool = False
            ) -> Optional[tuple[np.ndarray, dict[str, Any]]]:
        """:meth:`load` followed by the transforms, which draw all their randomness from ``rng``.

        Args:
            index: The sample.
            rng: Its random stream.
            uint8: Leave out the transforms' :class:`ToFloat` (the loader converts whole
                batches with :func:`~rtdetr_common.pipeline.transforms.to_float`, after they
                crossed from its workers at a quarter of the size).

        Returns:
            ``(image float32 [3, h, w] in [0, 1], target)`` (uint8 ``[h, w, 3]`` with
            ``uint8``) with the target as the transforms leave it, or None when the image was
            skipped.

        Raises:
            ValueError: With ``uint8``, if the transforms hold other than one ToFloat.
        """
        sample = self.load(index)
        if sample is None:
            return None
        image, target = sample
        transforms = self.transforms if self.transforms is not None else Compose([ToFloat()])
        if uint8:
            if not self.can_defer_float():
                raise ValueError(f"uint8 samples need a Compose with exactly one ToFloat as the "
                                 f"transforms, got {transforms!r}")
            kept = [t for t in transforms.transforms if not isinstance(t, ToFloat)]
            transforms = Compose(kept)
        return transforms(image, target, rng)

    def __repr__(self) -> str:
        return (f"CocoDetection({len(self)} images, {self.category_map.num_classes} categories, "
                f"img_folder={self.img_folder}, ann_file={self.ann_file})")
