"""COCO bbox evaluation of detections, shared by both frameworks.

Detections flow as: the postprocessor's per-image ``labels`` / ``boxes`` (xyxy, absolute pixels
of the original image) / ``scores`` -> :func:`detections_to_coco` (COCO results entries, label
mapped to the category id through a :class:`~rtdetr_common.coco.CategoryMap`) ->
:func:`write_results_json` and/or :func:`evaluate`, which runs pycocotools' ``COCOeval`` with
``iouType="bbox"`` and its default parameters (as the official RT-DETR evaluator does) and
returns its first six statistics. pycocotools' console output is captured, never printed; the
summary table it would print is kept in :attr:`CocoMetrics.summary`.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from .coco import CategoryMap
from .weights import atomic_write

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl",
                "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
"""The metrics :func:`evaluate` returns: all twelve ``COCOeval.stats``, in this order."""
MISSING = -1.0
"""pycocotools' value of a metric without ground truth (an area range with no object)."""
# The area range (pycocotools' ``areaRng``, in square pixels) of each metric.
_AREA = {"APs": (0, 32 ** 2), "APm": (32 ** 2, 96 ** 2), "APl": (96 ** 2, 1e10),
         "ARs": (0, 32 ** 2), "ARm": (32 ** 2, 96 ** 2), "ARl": (96 ** 2, 1e10)}

__all__ = ["CategoryMap", "CocoMetrics", "METRIC_NAMES", "MISSING", "detections_to_coco", "evaluate",
           "load_coco", "write_results_json"]


class CocoMetrics(dict):
    """The twelve COCO statistics (:data:`METRIC_NAMES`) as floats in [0, 1], plus the printed
    summary; :data:`MISSING` (-1) where there is no ground truth to measure (an area range
    without objects), as pycocotools reports it.

    A plain dict for every purpose (JSON, logging); the extra attribute ``summary`` holds the
    twelve-line table ``COCOeval.summarize()`` prints (or a note when there was nothing to
    evaluate).
    """

    summary: str

    def __init__(self, values: Mapping[str, float], summary: str) -> None:
        super().__init__(values)
        self.summary = summary


def load_coco(ann_file_or_coco: str | Path | COCO) -> COCO:
    """A pycocotools ``COCO`` from an annotation file (quietly), or the given one unchanged.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If the file is not JSON or not a COCO annotation object.
    """
    if isinstance(ann_file_or_coco, COCO):
        return ann_file_or_coco
    path = Path(ann_file_or_coco)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file {path} does not exist")
    try:
        document = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"COCO annotation file {path} is not valid JSON: {err}") from err
    if not isinstance(document, dict) or "images" not in document or "categories" not in document:
        raise ValueError(f"COCO annotation file {path} lacks the 'images' and 'categories' lists")
    coco = COCO()
    coco.dataset = document
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def detections_to_coco(image_ids: Sequence[int], results: Sequence[Mapping[str, np.ndarray]],
                       category_map: CategoryMap) -> list[dict]:
    """COCO results entries from per-image detections.

    Args:
        image_ids: COCO image id of each result.
        results: Per image, ``labels`` [n] int contiguous labels, ``boxes`` [n, 4] xyxy in
            absolute pixels of the original image and ``scores`` [n] (numpy or array-likes).
        category_map: Maps each label to its category id.

    Returns:
        One ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` per detection, in
        image order and, within an image, in the given order.

    Raises:
        ValueError: If the counts or shapes do not match.
        KeyError: If a label is outside the category map.
    """
    if len(image_ids) != len(results):
        raise ValueError(f"detections_to_coco: {len(image_ids)} image ids but {len(results)} results")
    entries: list[dict] = []
    for image_id, result in zip(image_ids, results):
        missing = [k for k in ("labels", "boxes", "scores") if k not in result]
        if missing:
            raise ValueError(f"detections_to_coco: result of image {image_id} lacks {missing}")
        labels = np.asarray(result["labels"]).reshape(-1)
        scores = np.asarray(result["scores"], dtype=np.float64).reshape(-1)
        boxes = np.asarray(result["boxes"], dtype=np.float64)
        if boxes.size == 0:
            boxes = boxes.reshape(0, 4)
        if boxes.ndim != 2 or boxes.shape[1] != 4 or not len(boxes) == len(labels) == len(scores):
            raise ValueError(f"detections_to_coco: image {image_id} has boxes {boxes.shape}, labels "
                             f"{labels.shape}, scores {scores.shape}; need [n, 4], [n], [n]")
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)  # [n, 4]
        categories = category_map.to_categories(labels.tolist())
        for category, box, score in zip(categories.tolist(), xywh.tolist(), scores.tolist()):
            entries.append({"image_id": int(image_id), "category_id": category,
                            "bbox": box, "score": score})
    return entries


def write_results_json(path: str | Path, detections: Sequence[Mapping]) -> None:
    """Writes COCO results entries as a JSON list, atomically.

    Raises:
        FileNotFoundError: If the destination folder does not exist.
    """
    text = json.dumps([dict(d) for d in detections])
    atomic_write(path, lambda tmp: tmp.write_text(text))


def _read_detections(detections: str | Path | Iterable[Mapping]) -> list[dict]:
    if isinstance(detections, (str, Path)):
        path = Path(detections)
        try:
            loaded = json.loads(path.read_text())
        except ValueError as err:
            raise ValueError(f"results file {path} is not valid JSON: {err}") from err
        if not isinstance(loaded, list):
            raise ValueError(f"results file {path} must hold a JSON list of detections")
        detections = loaded
    out = []
    for k, det in enumerate(detections):
        missing = [key for key in ("image_id", "category_id", "bbox", "score") if key not in det]
        if missing:
            raise ValueError(f"detection {k} lacks {missing}: {det}")
        if len(det["bbox"]) != 4:
            raise ValueError(f"detection {k} bbox must be [x, y, w, h], got {det['bbox']}")
        out.append({"image_id": int(det["image_id"]), "category_id": int(det["category_id"]),
                    "bbox": [float(v) for v in det["bbox"]], "score": float(det["score"])})
    return out


def evaluate(ann_file_or_coco: str | Path | COCO, detections: str | Path | Iterable[Mapping],
             image_ids: Sequence[int] | None = None) -> CocoMetrics:
    """COCO bbox AP of detections against ground truth.

    Args:
        ann_file_or_coco: The ground truth: annotation file or pycocotools ``COCO``.
        detections: COCO results entries (as from :func:`detections_to_coco`) or a results
            JSON file. The entries are not modified.
        image_ids: Evaluate on these images only (e.g. when only part of a split was run);
            all images of the ground truth when None.

    Returns:
        :class:`CocoMetrics` with the twelve statistics. An empty detection list gives 0.0
        for every metric that has ground truth, :data:`MISSING` for the others.

    Raises:
        ValueError: If a detection names an image or category the ground truth lacks, or
            ``image_ids`` holds unknown ids.
    """
    gt = load_coco(ann_file_or_coco)
    dets = _read_detections(detections)
    known_images = set(gt.getImgIds())
    if image_ids is not None:
        unknown = sorted(set(int(i) for i in image_ids) - known_images)
        if unknown:
            raise ValueError(f"image_ids not in the ground truth: {unknown[:10]}")
    stray_images = sorted({d["image_id"] for d in dets} - known_images)
    if stray_images:
        raise ValueError(f"detections name image ids not in the ground truth: {stray_images[:10]}")
    stray_cats = sorted({d["category_id"] for d in dets} - set(gt.getCatIds()))
    if stray_cats:
        raise ValueError(f"detections name category ids not in the ground truth: {stray_cats[:10]} "
                         f"(known: {sorted(gt.getCatIds())}); was the label -> category map applied?")
    if not dets:
        ids = known_images if image_ids is None else {int(i) for i in image_ids}
        areas = [a["area"] for a in gt.dataset.get("annotations", [])
                 if a["image_id"] in ids and not a.get("iscrowd", 0)]
        ranges = {name: _AREA.get(name, (0, 1e10)) for name in METRIC_NAMES}
        return CocoMetrics({name: 0.0 if any(lo <= a <= hi for a in areas) else MISSING
                            for name, (lo, hi) in ranges.items()},
                           "no detections: every metric with ground truth is 0.0\n")
    with contextlib.redirect_stdout(io.StringIO()):
        results = gt.loadRes(dets)
        coco_eval = COCOeval(gt, results, iouType="bbox")
        if image_ids is not None:
            coco_eval.params.imgIds = sorted(int(i) for i in image_ids)
        coco_eval.evaluate()
        coco_eval.accumulate()
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        coco_eval.summarize()
    stats = [float(v) for v in coco_eval.stats[: len(METRIC_NAMES)]]
    return CocoMetrics(dict(zip(METRIC_NAMES, stats)), table.getvalue())
