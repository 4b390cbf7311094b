"""A built-in synthetic detection dataset, written in real COCO format.

No data can be downloaded here, so training and evaluation run end to end on a dataset this
module draws. It is a genuine COCO-format dataset on disk (PNG images plus
``annotations/instances_{train,val}.json``) that any COCO tool reads, with:

* **Shape classes.** The catalogue :data:`SHAPES` holds six shapes -- disk (filled ellipse),
  ring (elliptic annulus), rectangle, triangle, cross and five-point star -- and a dataset uses
  the first ``num_classes`` of them. Category ids are non-contiguous (2, 3, 5, 7, 11, 13) so that
  the id <-> label map is exercised as with real COCO (label = index among the sorted ids).
* **Colour independent of class** (``colour_mode="random"``, the default). Every instance gets a
  uniformly random RGB colour, redrawn until it differs from the pixels it covers by at least
  ``min_contrast`` (Euclidean RGB distance), plus a soft shading gradient across the object. The
  class can therefore only be told from the shape, never from the colour, while every object
  stands out from what lies beneath it. ``colour_mode="class"`` instead jitters a class-typical
  colour (per channel, +-``class_colour_jitter``), an easier variant for experiments.
* **Scale and aspect.** The object's size is log-uniform in ``[min_scale, max_scale]`` times the
  image's shorter side, its aspect (width / height) log-uniform in ``[1 / max_aspect,
  max_aspect]``, and it is rotated uniformly within +-``max_rotation`` degrees.
* **Occlusion.** Objects are painted in order, later ones on top, and may overlap. A new object
  is only placed where it leaves at least ``min_visible`` of every earlier object's pixels
  visible (up to ``placement_tries`` positions are tried; an object that fits nowhere is left
  out, so an image may hold fewer than the drawn count, never fewer than one). An object larger
  than the image (possible only with extreme ``max_scale`` / ``max_aspect``) is shrunk to fit. The annotation
  box is the object's FULL extent (the tight box of its whole outline, as if unoccluded), the
  annotation ``area`` its visible pixel count (as COCO's mask area). Objects lie wholly inside
  the image.
* **Textured backgrounds.** Smooth noise, a linear gradient, sine stripes or a rotated checker
  board between two colours of moderate contrast (an RGB step of 15-50, well below
  ``min_contrast``, so the texture never looks like an object). Optional per-pixel noise over
  the final image (``pixel_noise``) is off by default: it makes PNGs five times larger and
  generation three times slower for no gain in what the detector has to learn.
* **Varied image sizes.** Width and height each uniform in ``[min_size, max_size]``, so images
  are mostly non-square.
* **Anti-aliasing.** Each shape is rasterised with ``PIL.ImageDraw`` at ``supersample`` times the
  resolution and box-filtered down to a coverage mask.

Everything is deterministic: image ``i`` of a split is drawn from its own numpy stream seeded
by ``(seed, split, i)``, so the same parameters give byte-identical files (PNG encoding with a
fixed compression level writes no timestamps), and image ``i`` does not depend on how many
images the split holds.

A dataset is written into a temporary folder beside ``root`` and renamed into place, so an
interrupted run never leaves a half-written dataset at ``root``; ``root`` also holds
``manifest.json`` (generator name, :data:`GENERATOR_VERSION` and the parameters).

:data:`DEFAULT_DATASET` is the embedded default used whenever no dataset is given, and
:func:`ensure_default_dataset` generates it once into a cache folder and reuses it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

GENERATOR_NAME = "rtdetr_common.synthetic"
GENERATOR_VERSION = 1
SPLITS = ("train", "val")
MANIFEST_NAME = "manifest.json"
PNG_COMPRESS_LEVEL = 1
CACHE_ENV = "RTDETR_PARITY_DATASETS"


@dataclass(frozen=True)
class ShapeClass:
    """One object class of the synthetic dataset.

    Attributes:
        category_id: COCO category id written to the annotation files.
        name: Category name (also the shape drawn).
        colour: Class-typical RGB colour, used only with ``colour_mode="class"``.
    """

    category_id: int
    name: str
    colour: tuple[int, int, int]


SHAPES: tuple[ShapeClass, ...] = (
    ShapeClass(2, "disk", (220, 60, 50)),
    ShapeClass(3, "ring", (50, 170, 60)),
    ShapeClass(5, "rectangle", (40, 80, 210)),
    ShapeClass(7, "triangle", (230, 200, 40)),
    ShapeClass(11, "cross", (190, 60, 200)),
    ShapeClass(13, "star", (40, 200, 210)),
)

_BACKGROUNDS = ("noise", "gradient", "stripes", "checker")
_COLOUR_MODES = ("random", "class")


@dataclass(frozen=True)
class SyntheticParams:
    """Every parameter of a synthetic dataset; the manifest records them all.

    Attributes:
        num_train: Images in the train split.
        num_val: Images in the val split.
        seed: Seed of all randomness.
        num_classes: Number of classes, the first ones of :data:`SHAPES`.
        min_size: Smallest image side in pixels.
        max_size: Largest image side in pixels.
        min_objects: Fewest objects drawn per image.
        max_objects: Most objects drawn per image.
        min_scale: Smallest object size as a fraction of the image's shorter side.
        max_scale: Largest object size as a fraction of the image's shorter side.
        max_aspect: Largest object aspect ratio (width / height or its inverse).
        max_rotation: Largest object rotation in degrees (either way).
        min_visible: Fraction of each object's pixels that later objects must leave visible.
        placement_tries: Positions tried per object before it is left out.
        colour_mode: ``"random"`` (colour independent of class) or ``"class"``.
        class_colour_jitter: Per-channel jitter of the class colour with ``colour_mode="class"``.
        min_contrast: Least RGB distance between an object and the pixels it covers (random mode).
        pixel_noise: Standard deviation of the per-pixel noise over the final image (0..255
            scale); 0 disables it.
        supersample: Rasterisation supersampling factor for anti-aliasing.
    """

    num_train: int = 1000
    num_val: int = 200
    seed: int = 0
    num_classes: int = 5
    min_size: int = 240
    max_size: int = 400
    min_objects: int = 1
    max_objects: int = 6
    min_scale: float = 0.12
    max_scale: float = 0.45
    max_aspect: float = 1.5
    max_rotation: float = 30.0
    min_visible: float = 0.7
    placement_tries: int = 20
    colour_mode: str = "random"
    class_colour_jitter: int = 30
    min_contrast: float = 90.0
    pixel_noise: float = 0.0
    supersample: int = 4

    def validate(self) -> None:
        """Checks every parameter.

        Raises:
            ValueError: Naming the first parameter out of range.
        """
        checks = [
            (self.num_train >= 0, "num_train must be >= 0"),
            (self.num_val >= 0, "num_val must be >= 0"),
            (1 <= self.num_classes <= len(SHAPES), f"num_classes must be in 1..{len(SHAPES)}"),
            (32 <= self.min_size <= self.max_size, "need 32 <= min_size <= max_size"),
            (1 <= self.min_objects <= self.max_objects, "need 1 <= min_objects <= max_objects"),
            (0.02 <= self.min_scale <= self.max_scale <= 0.6,
             "need 0.02 <= min_scale <= max_scale <= 0.6"),
            (1.0 <= self.max_aspect <= 3.0, "max_aspect must be in [1, 3]"),
            (0.0 <= self.max_rotation <= 180.0, "max_rotation must be in [0, 180]"),
            (0.0 <= self.min_visible <= 1.0, "min_visible must be in [0, 1]"),
            (self.placement_tries >= 1, "placement_tries must be >= 1"),
            (self.colour_mode in _COLOUR_MODES, f"colour_mode must be one of {_COLOUR_MODES}"),
            (0 <= self.class_colour_jitter <= 127, "class_colour_jitter must be in [0, 127]"),
            (0.0 <= self.min_contrast <= 255.0, "min_contrast must be in [0, 255]"),
            (0.0 <= self.pixel_noise <= 64.0, "pixel_noise must be in [0, 64]"),
            (1 <= self.supersample <= 8, "supersample must be in 1..8"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid synthetic dataset parameters: {message} ({self})")

    @property
    def classes(self) -> tuple[ShapeClass, ...]:
        """The classes this dataset uses."""
        return SHAPES[: self.num_classes]


DEFAULT_DATASET = SyntheticParams()
"""The embedded default dataset, used whenever no dataset is given.

1000 train / 200 val images of 240-400 px per side; 5 shape classes (disk, ring, rectangle,
triangle, cross; category ids 2, 3, 5, 7, 11); 1-6 objects per image (about 3.5 on average),
each 12-45% of the shorter side; colours independent of class; at least 70% of every object
visible. It is meant to be learnable by an RT-DETR r18vd trained from scratch on a CPU in about
half an hour at a training size of 256-320: the objects are large (after resizing to 256 the
smallest are still ~25 px, well above the stride-8 feature cell), few, strongly contrasted with
what they cover (RGB distance >= 90, against background texture steps of 15-50) and the five
shapes differ in topology or outline (a hole, straight vs. curved edges, three vs. four corners,
concave arms), so the class is a shape cue a small CNN picks up quickly.
"""


@dataclass(frozen=True)
class SyntheticDataset:
    """Paths of a synthetic dataset on disk.

    Attributes:
        root: The dataset folder.
        train_images: Folder of the train PNGs.
        val_images: Folder of the val PNGs.
        train_ann: COCO annotation file of the train split.
        val_ann: COCO annotation file of the val split.
        params: The parameters it was generated with.
    """

    root: Path
    train_images: Path
    val_images: Path
    train_ann: Path
    val_ann: Path
    params: SyntheticParams

    @classmethod
    def at(cls, root: str | Path, params: SyntheticParams) -> "SyntheticDataset":
        """The paths of the dataset with ``params`` at ``root`` (nothing is read)."""
        root = Path(root)
        return cls(root=root, train_images=root / "train", val_images=root / "val",
                   train_ann=root / "annotations" / "instances_train.json",
                   val_ann=root / "annotations" / "instances_val.json", params=params)


# --------------------------------------------------------------------------------------------
# Drawing


def _unit_shape(name: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """Outline (and hole) of a shape inside the square [-1, 1]^2, as [n, 2] (x, y) arrays."""
    if name in ("disk", "ring"):
        t = np.linspace(0.0, 2.0 * math.pi, 72, endpoint=False)
        outline = np.stack([np.cos(t), np.sin(t)], axis=1)  # [72, 2]
        if name == "disk":
            return outline, None
        return outline, outline * rng.uniform(0.45, 0.65)
    if name == "rectangle":
        return np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]]), None
    if name == "triangle":
        return np.array([[0.0, -1.0], [1.0, 1.0], [-1.0, 1.0]]), None
    if name == "cross":
        a = rng.uniform(0.28, 0.4)
        quarter = np.array([[a, -1.0], [a, -a], [1.0, -a]])  # one arm corner, clockwise
        turns = [quarter @ np.array([[c, s], [-s, c]]) for c, s in ((1, 0), (0, 1), (-1, 0), (0, -1))]
        return np.concatenate(turns, axis=0), None  # [12, 2]
    if name == "star":
        inner = rng.uniform(0.42, 0.5)
        t = -math.pi / 2 + np.arange(10) * math.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, inner)
        return np.stack([r * np.cos(t), r * np.sin(t)], axis=1), None  # [10, 2]
    raise ValueError(f"unknown shape {name!r}; known: {[s.name for s in SHAPES]}")


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A textured background, float32 [H, W, 3] in 0..255."""
    kind = _BACKGROUNDS[int(rng.integers(len(_BACKGROUNDS)))]
    y = np.arange(height, dtype=np.float32)[:, None]  # [H, 1]
    x = np.arange(width, dtype=np.float32)[None, :]  # [1, W]
    angle = rng.uniform(0.0, math.pi)
    along = x * np.float32(math.cos(angle)) + y * np.float32(math.sin(angle))  # [H, W]
    across = y * np.float32(math.cos(angle)) - x * np.float32(math.sin(angle))  # [H, W]
    if kind == "noise":
        cells = int(rng.integers(3, 11))
        coarse = rng.random((cells, cells), dtype=np.float32)
        pattern = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR))
    elif kind == "gradient":
        pattern = (along - along.min()) / max(float(np.ptp(along)), 1.0)
    elif kind == "stripes":
        period = rng.uniform(6.0, 40.0)
        pattern = 0.5 + 0.5 * np.sin(2.0 * math.pi * along / period + rng.uniform(0.0, 2.0 * math.pi))
    else:
        cell = rng.uniform(8.0, 40.0)
        pattern = (np.floor(along / cell) + np.floor(across / cell)) % 2.0
    base = rng.uniform(0.0, 255.0, 3).astype(np.float32)
    direction = rng.normal(size=3)
    delta = (direction / np.linalg.norm(direction) * rng.uniform(15.0, 50.0)).astype(np.float32)
    image = base + (pattern.astype(np.float32)[..., None] - np.float32(0.5)) * delta  # [H, W, 3]
    return np.clip(image, np.float32(0.0), np.float32(255.0))


@dataclass
class _Placed:
    label: int
    box: tuple[float, float, float, float]  # x, y, w, h of the full outline


def _coverage(outline: np.ndarray, hole: np.ndarray | None, x0: int, y0: int, w: int, h: int,
              supersample: int) -> np.ndarray:
    """Anti-aliased coverage of the polygon in the pixel window (x0, y0, w, h): float32 [h, w]."""
    canvas = Image.new("L", (w * supersample, h * supersample), 0)
    draw = ImageDraw.Draw(canvas)
    offset = np.array([x0, y0], dtype=np.float64)
    draw.polygon([tuple(p) for p in ((outline - offset) * supersample).tolist()], fill=255)
    if hole is not None:
        draw.polygon([tuple(p) for p in ((hole - offset) * supersample).tolist()], fill=0)
    small = canvas.resize((w, h), Image.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _pick_colour(rng: np.random.Generator, shape: ShapeClass, under: np.ndarray,
                 params: SyntheticParams) -> np.ndarray:
    """The object's RGB colour (float, 0..255); ``under`` is the mean colour it covers."""
    if params.colour_mode == "class":
        jitter = rng.integers(-params.class_colour_jitter, params.class_colour_jitter + 1, 3)
        return np.clip(np.asarray(shape.colour, dtype=np.float64) + jitter, 0.0, 255.0)
    candidates = rng.uniform(0.0, 255.0, (32, 3))
    distance = np.linalg.norm(candidates - under, axis=1)
    good = np.flatnonzero(distance >= params.min_contrast)
    return candidates[good[0]] if good.size else candidates[int(np.argmax(distance))]


def _render(rng: np.random.Generator, params: SyntheticParams) -> tuple[np.ndarray, list[dict]]:
    """Draws one image: uint8 [H, W, 3] and its objects ({label, bbox [x, y, w, h], area})."""
    width = int(rng.integers(params.min_size, params.max_size + 1))
    height = int(rng.integers(params.min_size, params.max_size + 1))
    image = _background(rng, height, width)
    owner = np.full((height, width), -1, dtype=np.int32)
    visible: list[int] = []
    placed: list[_Placed] = []
    classes = params.classes
    for _ in range(int(rng.integers(params.min_objects, params.max_objects + 1))):
        label = int(rng.integers(len(classes)))
        shape = classes[label]
        size = min(width, height) * math.exp(rng.uniform(math.log(params.min_scale),
                                                         math.log(params.max_scale)))
        aspect = math.exp(rng.uniform(-math.log(params.max_aspect), math.log(params.max_aspect)))
        half = np.array([size * math.sqrt(aspect), size / math.sqrt(aspect)]) / 2.0
        theta = math.radians(rng.uniform(-params.max_rotation, params.max_rotation))
        rot = np.array([[math.cos(theta), math.sin(theta)], [-math.sin(theta), math.cos(theta)]])
        outline, hole = _unit_shape(shape.name, rng)
        outline = (outline * half) @ rot
        hole = None if hole is None else (hole * half) @ rot
        fit = min(1.0, 0.99 * (width - 2) / np.ptp(outline[:, 0]), 0.99 * (height - 2) / np.ptp(outline[:, 1]))
        outline = outline * fit  # shrinks only an object too large for the image
        hole = None if hole is None else hole * fit
        low, high = outline.min(axis=0), outline.max(axis=0)
        extent = high - low
        for _try in range(params.placement_tries):
            shift = np.array([rng.uniform(1.0 - low[0], width - 1.0 - high[0]),
                              rng.uniform(1.0 - low[1], height - 1.0 - high[1])])
            x0, y0 = int(math.floor(low[0] + shift[0])), int(math.floor(low[1] + shift[1]))
            x1, y1 = int(math.ceil(high[0] + shift[0])), int(math.ceil(high[1] + shift[1]))
            alpha = _coverage(outline + shift, None if hole is None else hole + shift,
                              x0, y0, x1 - x0, y1 - y0, params.supersample)
            mine = alpha >= 0.5
            window = owner[y0:y1, x0:x1]
            covered = np.bincount(window[mine & (window >= 0)], minlength=len(placed))
            left = np.asarray(visible, dtype=np.int64) - covered
            if np.all(left >= params.min_visible * np.asarray(visible, dtype=np.float64)):
                break
        else:
            continue
        region = image[y0:y1, x0:x1]  # view [h, w, 3]
        under = (region * alpha[..., None]).sum(axis=(0, 1)) / max(float(alpha.sum()), 1e-6)
        colour = _pick_colour(rng, shape, under, params)
        xs = np.arange(x1 - x0, dtype=np.float32)[None, :] - np.float32((x1 - x0 - 1) / 2)  # [1, w]
        ys = np.arange(y1 - y0, dtype=np.float32)[:, None] - np.float32((y1 - y0 - 1) / 2)  # [h, 1]
        phi = rng.uniform(0.0, 2.0 * math.pi)
        ramp = (xs * math.cos(phi) + ys * math.sin(phi)) / max(extent.max(), 1.0)  # [h, w]
        shaded = colour * (1.0 + rng.uniform(0.0, 0.4) * ramp[..., None])  # [h, w, 3]
        region[...] = region * (1.0 - alpha[..., None]) + np.clip(shaded, 0.0, 255.0) * alpha[..., None]
        visible = list(left)
        window[mine] = len(placed)
        visible.append(int(mine.sum()))
        placed.append(_Placed(label, (float(low[0] + shift[0]), float(low[1] + shift[1]),
                                      float(extent[0]), float(extent[1]))))
    if params.pixel_noise > 0:
        image += params.pixel_noise * rng.standard_normal(image.shape, dtype=np.float32)
    pixels = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    objects = [{"label": p.label, "bbox": [round(v, 2) for v in p.box], "area": float(visible[k])}
               for k, p in enumerate(placed)]
    return pixels, objects


# --------------------------------------------------------------------------------------------
# Writing


def _write_split(folder: Path, ann_file: Path, split: str, count: int, params: SyntheticParams) -> None:
    folder.mkdir()
    split_code = SPLITS.index(split)
    images, annotations = [], []
    for index in range(count):
        rng = np.random.default_rng(np.random.SeedSequence([params.seed, split_code, index]))
        pixels, objects = _render(rng, params)
        image_id = index + 1
        file_name = f"{image_id:012d}.png"
        Image.fromarray(pixels).save(folder / file_name, format="PNG",
                                                 compress_level=PNG_COMPRESS_LEVEL)
        images.append({"id": image_id, "file_name": file_name,
                       "width": int(pixels.shape[1]), "height": int(pixels.shape[0])})
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": params.classes[obj["label"]].category_id,
                                "bbox": obj["bbox"], "area": obj["area"], "iscrowd": 0})
    document = {
        "info": {"description": f"rtdetr-parity synthetic shapes, {split} split",
                 "version": f"{GENERATOR_VERSION}", "contributor": GENERATOR_NAME,
                 "seed": params.seed},
        "licenses": [{"id": 1, "name": "generated data, no restrictions", "url": ""}],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c.category_id, "name": c.name, "supercategory": "shape"}
                       for c in params.classes],
    }
    ann_file.write_text(json.dumps(document, separators=(",", ":")) + "\n")


def _manifest(params: SyntheticParams) -> dict:
    return {"generator": GENERATOR_NAME, "version": GENERATOR_VERSION, "params": asdict(params)}


def make_dataset(root: str | Path, *, num_train: int = DEFAULT_DATASET.num_train,
                 num_val: int = DEFAULT_DATASET.num_val, seed: int = 0,
                 num_classes: int = DEFAULT_DATASET.num_classes,
                 min_size: int = DEFAULT_DATASET.min_size, max_size: int = DEFAULT_DATASET.max_size,
                 overwrite: bool = False, **options) -> SyntheticDataset:
    """Generates a synthetic COCO-format dataset at ``root``.

    Args:
        root: Dataset folder to create. Its parent folders are created if needed.
        num_train: Images in the train split.
        num_val: Images in the val split.
        seed: Seed of all randomness; the same parameters give byte-identical files.
        num_classes: Number of shape classes (first ones of :data:`SHAPES`).
        min_size: Smallest image side in pixels.
        max_size: Largest image side in pixels.
        overwrite: Replace an existing ``root`` (atomically: the new dataset is complete before
            the old one is removed). Without it, an existing ``root`` is an error.
        **options: Any other field of :class:`SyntheticParams` (e.g. ``max_objects=3``,
            ``colour_mode="class"``); defaults from :data:`DEFAULT_DATASET`.

    Returns:
        The paths of the written dataset.

    Raises:
        FileExistsError: If ``root`` exists and ``overwrite`` is False.
        ValueError: On an unknown option or a parameter out of range.
    """
    known = {f.name for f in fields(SyntheticParams)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"make_dataset: unknown option(s) {unknown}; known: {sorted(known)}")
    params = replace(DEFAULT_DATASET, num_train=num_train, num_val=num_val, seed=seed,
                     num_classes=num_classes, min_size=min_size, max_size=max_size, **options)
    params.validate()
    root = Path(root)
    if root.exists() and not overwrite:
        raise FileExistsError(f"{root} already exists; pass overwrite=True to replace it")
    root.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".building", dir=root.parent))
    try:
        paths = SyntheticDataset.at(building, params)
        (building / "annotations").mkdir()
        _write_split(paths.train_images, paths.train_ann, "train", params.num_train, params)
        _write_split(paths.val_images, paths.val_ann, "val", params.num_val, params)
        (building / MANIFEST_NAME).write_text(json.dumps(_manifest(params), indent=2) + "\n")
        _move_into_place(building, root, overwrite)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return SyntheticDataset.at(root, params)


def _move_into_place(building: Path, root: Path, overwrite: bool) -> None:
    """Renames the finished folder to ``root``, moving an existing ``root`` aside first."""
    if not root.exists() and not root.is_symlink():
        try:
            os.rename(building, root)
            return
        except OSError as err:  # root appeared meanwhile (a non-empty folder cannot be replaced)
            if not root.exists() or not overwrite:
                raise FileExistsError(f"{root} appeared while the dataset was being generated") from err
    if not overwrite:
        raise FileExistsError(f"{root} appeared while the dataset was being generated")
    old = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".old", dir=root.parent))
    os.rename(root, old / "dataset")
    os.rename(building, root)
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# The cached default


def default_cache_dir() -> Path:
    """Where :func:`ensure_default_dataset` keeps datasets.

    In order: ``$RTDETR_PARITY_DATASETS`` if set; ``<repo>/runs/datasets`` when running from a
    source checkout (a ``pyproject.toml`` beside the package; ``runs/`` is git-ignored); else
    ``$XDG_CACHE_HOME/rtdetr-parity/datasets`` (``~/.cache/...`` by default).
    """
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[1]
    if (repo / "pyproject.toml").is_file():
        return repo / "runs" / "datasets"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "rtdetr-parity" / "datasets"


def is_complete(dataset: SyntheticDataset) -> bool:
    """Whether ``dataset.root`` holds a complete dataset generated with ``dataset.params``.

    Checks the manifest (generator, version, every parameter), both annotation files and the
    number of PNGs in each split folder.
    """
    manifest = dataset.root / MANIFEST_NAME
    try:
        recorded = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False
    if recorded != _manifest(dataset.params):
        return False
    for folder, ann, count in ((dataset.train_images, dataset.train_ann, dataset.params.num_train),
                               (dataset.val_images, dataset.val_ann, dataset.params.num_val)):
        if not ann.is_file() or not folder.is_dir():
            return False
        if sum(1 for p in folder.iterdir() if p.suffix == ".png") != count:
            return False
    return True


def ensure_default_dataset(cache_dir: str | Path | None = None,
                           params: SyntheticParams = DEFAULT_DATASET) -> SyntheticDataset:
    """The default dataset, generated on first use and reused afterwards.

    It lives at ``<cache_dir>/synthetic-v<GENERATOR_VERSION>-seed<seed>``; a folder there whose
    manifest does not match (other generator version or parameters) or that is incomplete is
    regenerated (atomically replaced).

    Args:
        cache_dir: Parent folder; :func:`default_cache_dir` when None.
        params: Parameters to generate; :data:`DEFAULT_DATASET` unless testing.

    Returns:
        The dataset's paths.
    """
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root = base / f"synthetic-v{GENERATOR_VERSION}-seed{params.seed}"
    wanted = SyntheticDataset.at(root, params)
    if is_complete(wanted):
        return wanted
    options = asdict(params)
    try:
        return make_dataset(root, overwrite=root.exists(), **options)
    except FileExistsError:
        # Another process finished the same dataset first.
        if is_complete(wanted):
            return wanted
        raise
