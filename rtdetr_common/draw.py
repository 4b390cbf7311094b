"""Drawing detections on images, and saving them as PNG.

Boxes are drawn as two-pixel outlines in a colour chosen by label, with a ``"name 0.87"`` tag on
a filled strip above the box (inside it when the box touches the top edge). Text uses Pillow's
built-in default font, so nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .weights import atomic_write

PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
    (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128),
)
"""Box colours, indexed by ``label % len(PALETTE)``."""


def _to_pil(image) -> Image.Image:
    """A copy of ``image`` as an RGB PIL image; accepts PIL or uint8 [H, W, 3]."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"image must be a PIL image or uint8 [H, W, 3], got {array.dtype} {array.shape}")
    return Image.fromarray(np.ascontiguousarray(array))


def _name(names: Sequence[str] | Mapping[int, str] | None, label: int) -> str:
    if names is None:
        return str(label)
    if isinstance(names, Mapping):
        return names.get(label, str(label))
    return names[label] if 0 <= label < len(names) else str(label)


def draw_detections(image, boxes, labels, scores, names: Sequence[str] | Mapping[int, str] | None = None,
                    score_threshold: float = 0.5, line_width: int = 2) -> Image.Image:
    """Draws the detections scoring at least ``score_threshold`` on a copy of ``image``.

    Args:
        image: PIL image or uint8 [H, W, 3] RGB array; left unchanged.
        boxes: [n, 4] xyxy boxes in absolute pixels of ``image``.
        labels: [n] integer labels.
        scores: [n] scores.
        names: Label names, as a sequence indexed by label or a mapping label -> name; the label
            number is shown when None or when a label has no name.
        score_threshold: Detections scoring below it are not drawn.
        line_width: Box outline width in pixels.

    Returns:
        A new RGB PIL image.

    Raises:
        ValueError: If the image or the array shapes are malformed.
    """
    canvas = _to_pil(image)
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"draw_detections: boxes must be [n, 4] xyxy, got shape {boxes.shape}")
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if not len(boxes) == len(labels) == len(scores):
        raise ValueError(f"draw_detections: {len(boxes)} boxes, {len(labels)} labels and "
                         f"{len(scores)} scores; they must match")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for k in np.argsort(scores, kind="stable"):  # best last, so drawn on top
        if scores[k] < score_threshold:
            continue
        x0, y0, x1, y1 = boxes[k].tolist()
        colour = PALETTE[int(labels[k]) % len(PALETTE)]
        draw.rectangle([x0, y0, max(x0, x1), max(y0, y1)], outline=colour, width=line_width)
        text = f"{_name(names, int(labels[k]))} {scores[k]:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left + 4, bottom - top + 4
        ty = y0 - th if y0 - th >= 0 else y0
        draw.rectangle([x0, ty, x0 + tw, ty + th], fill=colour)
        ink = (0, 0, 0) if sum(colour) > 382 else (255, 255, 255)
        draw.text((x0 + 2 - left, ty + 2 - top), text, fill=ink, font=font)
    return canvas


def save_png(path: str | Path, image) -> None:
    """Writes ``image`` (PIL or uint8 [H, W, 3]) as a PNG at ``path``, atomically.

    Raises:
        FileNotFoundError: If the destination folder does not exist.
        ValueError: If the image is malformed.
    """
    pil = _to_pil(image)
    atomic_write(path, lambda tmp: pil.save(tmp, format="PNG"))
