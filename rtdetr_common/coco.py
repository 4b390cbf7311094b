"""COCO 2017 category maps shared by both frameworks.

COCO numbers its 80 detection categories with ids between 1 and 90, leaving ten ids unused
(12, 26, 29, 30, 45, 66, 68, 69, 71, 83). The models predict a contiguous label in ``[0, 80)``;
the official RT-DETR maps between the two in ascending id order (its
``mscoco_category2label``), and so do these tables:

* :data:`LABEL_TO_CATEGORY` -- contiguous label (0..79) to COCO category id.
* :data:`CATEGORY_TO_LABEL` -- COCO category id to contiguous label.
* :data:`CATEGORY_NAMES` -- COCO category id to its name.
"""

from __future__ import annotations

from typing import Dict

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
