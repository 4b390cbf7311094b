"""COCO 2017 category maps shared by both frameworks.

COCO numbers its 80 detection categories with ids between 1 and 90, leaving ten ids unused
(12, 26, 29, 30, 45, 66, 68, 69, 71, 83). The models predict a contiguous label in ``[0, 80)``;
the official RT-DETR maps between the two in ascending id order (its
``mscoco_category2label``), and so do these tables:

* :data:`LABEL_TO_CATEGORY` -- contiguous label (0..79) to COCO category id.
* :data:`CATEGORY_TO_LABEL` -- COCO category id to contiguous label.
* :data:`CATEGORY_NAMES` -- COCO category id to its name.

:class:`CategoryMap` builds the same kind of map for any COCO-format annotation file (label =
position of the category id among the file's sorted ids); for COCO 2017 it equals these tables.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Mapping

import numpy as np

CATEGORY_NAMES: Dict[int, str] = {
    1: "person",
    2: "bicycle",
    3: "car",
    4: "motorcycle",
    5: "airplane",
    6: "bus",
    7: "train",
    8: "truck",
    9: "boat",
    10: "traffic light",
    11: "fire hydrant",
    13: "stop sign",
    14: "parking meter",
    15: "bench",
    16: "bird",
    17: "cat",
    18: "dog",
    19: "horse",
    20: "sheep",
    21: "cow",
    22: "elephant",
    23: "bear",
    24: "zebra",
    25: "giraffe",
    27: "backpack",
    28: "umbrella",
    31: "handbag",
    32: "tie",
    33: "suitcase",
    34: "frisbee",
    35: "skis",
    36: "snowboard",
    37: "sports ball",
    38: "kite",
    39: "baseball bat",
    40: "baseball glove",
    41: "skateboard",
    42: "surfboard",
    43: "tennis racket",
    44: "bottle",
    46: "wine glass",
    47: "cup",
    48: "fork",
    49: "knife",
    50: "spoon",
    51: "bowl",
    52: "banana",
    53: "apple",
    54: "sandwich",
    55: "orange",
    56: "broccoli",
    57: "carrot",
    58: "hot dog",
    59: "pizza",
    60: "donut",
    61: "cake",
    62: "chair",
    63: "couch",
    64: "potted plant",
    65: "bed",
    67: "dining table",
    70: "toilet",
    72: "tv",
    73: "laptop",
    74: "mouse",
    75: "remote",
    76: "keyboard",
    77: "cell phone",
    78: "microwave",
    79: "oven",
    80: "toaster",
    81: "sink",
    82: "refrigerator",
    84: "book",
    85: "clock",
    86: "vase",
    87: "scissors",
    88: "teddy bear",
    89: "hair drier",
    90: "toothbrush",
}

UNUSED_CATEGORY_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)

NUM_CLASSES = 80

LABEL_TO_CATEGORY: Dict[int, int] = {
    label: category for label, category in enumerate(sorted(CATEGORY_NAMES))
}

CATEGORY_TO_LABEL: Dict[int, int] = {
    category: label for label, category in LABEL_TO_CATEGORY.items()
}

if len(LABEL_TO_CATEGORY) != NUM_CLASSES:
    raise RuntimeError(f"COCO table holds {len(LABEL_TO_CATEGORY)} categories, expected {NUM_CLASSES}")
if set(CATEGORY_NAMES) != set(range(1, 91)) - set(UNUSED_CATEGORY_IDS):
    raise RuntimeError("COCO table ids differ from 1..90 without the ten unused ids")


class CategoryMap:
    """Contiguous labels ``0..K-1`` <-> a dataset's category ids, in ascending id order.

    This is the rule the official RT-DETR applies to COCO (``mscoco_category2label``), applied
    to whatever categories an annotation file lists, so non-contiguous ids (COCO's 1..90 with
    gaps, or a synthetic set such as 1, 3, 5, ...) map onto the model's contiguous labels.

    Args:
        categories: Category id -> category name.

    Raises:
        ValueError: If ``categories`` is empty.
    """

    def __init__(self, categories: Mapping[int, str]) -> None:
        if not categories:
            raise ValueError("a CategoryMap needs at least one category")
        self.category_ids: tuple[int, ...] = tuple(sorted(int(c) for c in categories))
        by_id = {int(c): str(name) for c, name in categories.items()}
        self.names: list[str] = [by_id[c] for c in self.category_ids]
        self._labels: Dict[int, int] = {c: label for label, c in enumerate(self.category_ids)}

    @classmethod
    def from_coco(cls, coco: Any) -> "CategoryMap":
        """The map of a pycocotools ``COCO`` object (its ``cats``: id -> category dict).

        A category without a ``name`` is named by its id.
        """
        return cls({int(c): cat.get("name", str(c)) for c, cat in coco.cats.items()})

    @classmethod
    def coco2017(cls) -> "CategoryMap":
        """The COCO 2017 map (80 categories, ids 1..90 with ten unused)."""
        return cls(CATEGORY_NAMES)

    @property
    def num_classes(self) -> int:
        """Number of categories K."""
        return len(self.category_ids)

    def __len__(self) -> int:
        return len(self.category_ids)

    def __contains__(self, category_id: object) -> bool:
        return category_id in self._labels

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CategoryMap):
            return NotImplemented
        return self.category_ids == other.category_ids and self.names == other.names

    def __repr__(self) -> str:
        return f"CategoryMap({self.num_classes} categories, ids {self.category_ids[0]}..{self.category_ids[-1]})"

    def to_label(self, category_id: int) -> int:
        """Contiguous label of a category id.

        Raises:
            KeyError: If the id is not one of the map's categories.
        """
        try:
            return self._labels[int(category_id)]
        except KeyError:
            raise KeyError(f"category id {category_id} is not in this CategoryMap "
                           f"(ids {self.category_ids[0]}..{self.category_ids[-1]})") from None

    def to_category(self, label: int) -> int:
        """Category id of a contiguous label.

        Raises:
            KeyError: If the label is outside ``[0, num_classes)``.
        """
        label = int(label)
        if not 0 <= label < self.num_classes:
            raise KeyError(f"label {label} is outside [0, {self.num_classes})")
        return self.category_ids[label]

    def to_labels(self, category_ids: Iterable[int]) -> np.ndarray:
        """Labels of many category ids, int64 [n] (raises KeyError on an unknown id)."""
        return np.array([self.to_label(c) for c in category_ids], dtype=np.int64)

    def to_categories(self, labels: Iterable[int]) -> np.ndarray:
        """Category ids of many labels, int64 [n] (raises KeyError on a label out of range)."""
        return np.array([self.to_category(label) for label in labels], dtype=np.int64)
