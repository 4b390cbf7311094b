"""The framework-neutral data pipeline: COCO reading, bad data, transforms, loader determinism."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from rtdetr_common.coco import CATEGORY_NAMES, CATEGORY_TO_LABEL, LABEL_TO_CATEGORY, CategoryMap
from rtdetr_common.pipeline import (
    CocoDetection,
    ConvertBox,
    DataLoader,
    RandomHorizontalFlip,
    RandomIoUCrop,
    RandomPhotometricDistort,
    RandomZoomOut,
    Resize,
    SanitizeBoundingBox,
    ToFloat,
    eval_transforms,
    resize_nearest,
    train_transforms,
)
from rtdetr_common.pipeline.transforms import Compose, _adjust_hue
from rtdetr_common.random import SharedRandom

CATEGORIES = [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}, {"id": 11, "name": "eleven"}]
COLOURS = {3: (230, 30, 30), 7: (30, 230, 30), 11: (30, 30, 230)}  # category id -> RGB
BACKGROUND = (90, 90, 90)


def _write_dataset(root: Path, images: list[dict], annotations: list[dict],
                   categories: list[dict] = CATEGORIES) -> tuple[Path, Path]:
    """Writes images (entries with an ``array`` or ``pil`` are saved, others left missing) and the JSON."""
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for entry in images:
        entry = dict(entry)
        pil = entry.pop("pil", None)
        array = entry.pop("array", None)
        if array is not None:
            pil = Image.fromarray(array)
        if pil is not None:
            pil.save(img_dir / entry["file_name"])
        entries.append(entry)
    anns = [dict(a, id=a.get("id", i + 1)) for i, a in enumerate(annotations)]
    ann_file = root / "ann.json"
    ann_file.write_text(json.dumps({"images": entries, "annotations": anns, "categories": categories}))
    return img_dir, ann_file


def _scene(seed: int, w: int, h: int, count: int) -> tuple[np.ndarray, list[tuple[int, list[int]]]]:
    """A grey image with ``count`` disjoint solid rectangles coloured by category; (image, [(cat, xywh)])."""
    gen = np.random.default_rng(seed)
    image = np.empty((h, w, 3), np.uint8)
    image[...] = BACKGROUND
    objects = []
    cell_w = w // count
    for k in range(count):
        cat = CATEGORIES[int(gen.integers(0, 3))]["id"]
        bw, bh = int(gen.integers(4, cell_w - 1)), int(gen.integers(4, h - 2))
        x, y = k * cell_w + int(gen.integers(0, cell_w - bw)), int(gen.integers(0, h - bh))
        image[y:y + bh, x:x + bw] = COLOURS[cat]
        objects.append((cat, [x, y, bw, bh]))
    return image, objects


def _scene_dataset(root: Path, n: int = 10) -> CocoDetection:
    images, anns = [], []
    for i in range(n):
        w, h = 40 + 3 * i, 36 + 2 * (i % 4)
        image, objects = _scene(i, w, h, 1 + i % 3)
        images.append({"id": 100 + i, "file_name": f"{i:03d}.png", "width": w, "height": h, "array": image})
        anns += [{"image_id": 100 + i, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
                 for c, b in objects]
    img_dir, ann_file = _write_dataset(root, images, anns)
    return CocoDetection(img_dir, ann_file)


def _assert_batches_equal(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.images.dtype == y.images.dtype and x.images.tobytes() == y.images.tobytes()
        assert len(x.targets) == len(y.targets)
        for tx, ty in zip(x.targets, y.targets):
            assert tx.keys() == ty.keys() and tx["image_id"] == ty["image_id"]
            for key in ("labels", "boxes", "orig_size"):
                assert tx[key].dtype == ty[key].dtype and tx[key].tobytes() == ty[key].tobytes()


# --------------------------------------------------------------------------------------------
# Category map and reading


def test_category_map_coco2017_equals_official_map(tmp_path):
    official = CategoryMap.coco2017()
    assert official.num_classes == 80
    assert {label: official.to_category(label) for label in range(80)} == LABEL_TO_CATEGORY
    assert {c: official.to_label(c) for c in CATEGORY_NAMES} == CATEGORY_TO_LABEL
    cats = [{"id": c, "name": n} for c, n in CATEGORY_NAMES.items()]
    random.Random(0).shuffle(cats)  # file order must not matter
    img_dir, ann_file = _write_dataset(tmp_path, [], [], categories=cats)
    ds = CocoDetection(img_dir, ann_file)
    assert ds.category_map == official
    assert ds.category_map.names[0] == "person" and ds.category_map.names[79] == "toothbrush"
    with pytest.raises(KeyError, match="12"):
        official.to_label(12)  # an unused COCO id
    with pytest.raises(KeyError, match="80"):
        official.to_category(80)


def test_load_target_layout_and_non_contiguous_labels(tmp_path):
    image, objects = _scene(0, 60, 40, 3)
    anns = [{"image_id": 5, "category_id": c, "bbox": b, "area": 11.0, "iscrowd": 0} for c, b in objects]
    anns.append({"image_id": 5, "category_id": 3, "bbox": [1, 1, 10, 10], "area": 100.0, "iscrowd": 1})
    img_dir, ann_file = _write_dataset(tmp_path, [{"id": 5, "file_name": "a.png", "width": 60, "height": 40,
                                                   "array": image}], anns)
    ds = CocoDetection(img_dir, ann_file)
    assert ds.category_map.category_ids == (3, 7, 11) and ds.category_map.names == ["three", "seven", "eleven"]
    img, target = ds.load(0)
    assert img.dtype == np.uint8 and img.shape == (40, 60, 3) and np.array_equal(img, image)
    assert target["image_id"] == 5
    assert target["orig_size"].dtype == np.int64 and target["orig_size"].tolist() == [60, 40]
    assert target["boxes"].dtype == np.float32 and target["boxes"].shape == (3, 4)
    expected = [[x, y, x + w, y + h] for _, (x, y, w, h) in objects]
    np.testing.assert_array_equal(target["boxes"], np.array(expected, np.float32))
    assert target["labels"].dtype == np.int64
    assert target["labels"].tolist() == [{3: 0, 7: 1, 11: 2}[c] for c, _ in objects]
    assert target["area"].dtype == np.float32 and target["area"].tolist() == [11.0] * 3
    assert target["iscrowd"].dtype == np.int64 and target["iscrowd"].tolist() == [0, 0, 0]
    assert ds.annotation_counts["crowd"] == 1 and ds.annotation_counts["kept"] == 3


# --------------------------------------------------------------------------------------------
# Bad data


def test_annotation_file_not_json_names_the_file(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('{"images": [')
    with pytest.raises(ValueError, match="broken.json.*not valid JSON"):
        CocoDetection(tmp_path, bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="broken.json.*JSON object"):
        CocoDetection(tmp_path, bad)
    bad.write_text('{"images": [], "categories": []}')
    with pytest.raises(ValueError, match="broken.json.*'annotations'"):
        CocoDetection(tmp_path, bad)
    bad.write_text('{"images": [{"id": 1}], "annotations": [], "categories": [{"id": 1}]}')
    with pytest.raises(ValueError, match=r"broken.json: images\[0\] lacks \['file_name', 'width', 'height'\]"):
        CocoDetection(tmp_path, bad)
    with pytest.raises(FileNotFoundError, match="absent.json"):
        CocoDetection(tmp_path, tmp_path / "absent.json")


def test_bad_boxes_and_unknown_categories_are_dropped_with_counts(tmp_path, caplog):
    image = np.zeros((30, 50, 3), np.uint8)
    anns = [
        {"image_id": 1, "category_id": 3, "bbox": [5, 5, 10, 10]},     # fine
        {"image_id": 1, "category_id": 3, "bbox": [5, 5, 0, 10]},      # zero width
        {"image_id": 1, "category_id": 7, "bbox": [5, 5, 10, -3]},     # negative height
        {"image_id": 1, "category_id": 11, "bbox": [40, 20, 20, 20]},  # partly outside -> clipped
        {"image_id": 1, "category_id": 11, "bbox": [-8, 2, 6, 6]},     # wholly outside -> dropped
        {"image_id": 1, "category_id": 99, "bbox": [1, 1, 5, 5]},      # unknown category
        {"image_id": 42, "category_id": 3, "bbox": [1, 1, 5, 5]},      # unknown image
    ]
    img_dir, ann_file = _write_dataset(tmp_path, [{"id": 1, "file_name": "a.png", "width": 50, "height": 30,
                                                   "array": image}], anns)
    with caplog.at_level(logging.WARNING):
        ds = CocoDetection(img_dir, ann_file)
    assert ds.annotation_counts == {"kept": 2, "crowd": 0, "degenerate": 2, "unknown_category": 1,
                                    "unknown_image": 1, "clipped": 2, "outside": 1}
    message = caplog.text
    assert "ann.json" in message and "dropped 2 with zero or negative" in message
    assert "(99)" in message and "clipped 2 boxes" in message
    _, target = ds.load(0)
    np.testing.assert_array_equal(target["boxes"], np.array([[5, 5, 15, 15], [40, 20, 50, 30]], np.float32))
    assert target["labels"].tolist() == [0, 2]


def test_image_without_boxes_gives_empty_arrays(tmp_path):
    img_dir, ann_file = _write_dataset(tmp_path, [{"id": 1, "file_name": "a.png", "width": 20, "height": 16,
                                                   "array": np.full((16, 20, 3), 7, np.uint8)}], [])
    ds = CocoDetection(img_dir, ann_file)
    _, target = ds.load(0)
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == np.float32
    for key in ("labels", "iscrowd"):
        assert target[key].shape == (0,) and target[key].dtype == np.int64
    assert target["area"].shape == (0,) and target["area"].dtype == np.float32
    ds.transforms = train_transforms(24)
    for seed in range(8):
        image, target = ds.get(0, SharedRandom(seed))
        assert image.shape == (3, 24, 24) and image.dtype == np.float32
        assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == np.float32
        assert target["labels"].shape == (0,) and target["labels"].dtype == np.int64


def test_missing_and_corrupt_images_are_logged_skips(tmp_path, caplog):
    good = np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    images = [{"id": i, "file_name": f"{i}.png", "width": 16, "height": 12, "array": good} for i in range(6)]
    images[1].pop("array")  # missing file
    img_dir, ann_file = _write_dataset(tmp_path, images, [])
    (img_dir / "2.png").write_bytes(b"this is not an image")
    png = (img_dir / "3.png").read_bytes()
    (img_dir / "3.png").write_bytes(png[: len(png) * 3 // 4])  # opens, fails to decode
    ds = CocoDetection(img_dir, ann_file, eval_transforms(8))
    with caplog.at_level(logging.WARNING):
        assert ds.load(1) is None and ds.load(2) is None and ds.get(3, SharedRandom(0)) is None
    assert ds.num_skipped == 3 and sorted(ds.skipped) == [1, 2, 3]
    for name in ("1.png", "2.png", "3.png"):
        assert name in caplog.text
    assert "file not found" in ds.skipped[1]

    assert "truncated" in ds.skipped[3]

    for workers in (0, 2):
        fresh = CocoDetection(img_dir, ann_file, eval_transforms(8))
        loader = DataLoader(fresh, 2, shuffle=False, drop_last=False, num_workers=workers)
        with caplog.at_level(logging.WARNING):
            batches = list(loader)
        # Batches (0, 1), (2, 3), (4, 5): the first loses one image, the second has none left.
        assert [[t["image_id"] for t in b.targets] for b in batches] == [[0], [4, 5]]
        assert [b.images.shape[0] for b in batches] == [1, 2]
        assert "batch 1: none of its 2 images could be read" in caplog.text
        assert sorted(fresh.skipped) == [1, 2, 3], workers
        assert loader.state_dict() == {"epoch": 1, "position": 0}


def test_image_modes_become_rgb8(tmp_path):
    gray = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    rgba = np.dstack([gray, 255 - gray, np.full_like(gray, 9), np.full_like(gray, 128)])
    deep = (np.arange(48, dtype=np.uint16).reshape(6, 8) * 1365).astype(np.uint16)
    palette = Image.fromarray(gray).convert("P")
    modes = {"gray": Image.fromarray(gray), "rgba": Image.fromarray(rgba), "deep": Image.fromarray(deep),
             "palette": palette, "gray_alpha": Image.fromarray(gray).convert("LA")}
    images = [{"id": i, "file_name": f"{name}.png", "width": 8, "height": 6, "pil": pil}
              for i, (name, pil) in enumerate(modes.items())]
    img_dir, ann_file = _write_dataset(tmp_path, images, [])
    assert Image.open(img_dir / "deep.png").mode.startswith("I")
    ds = CocoDetection(img_dir, ann_file)
    loaded = [ds.load(i)[0] for i in range(len(ds))]
    for image in loaded:
        assert image.dtype == np.uint8 and image.shape == (6, 8, 3)
    gray3 = np.repeat(gray[:, :, None], 3, axis=2)
    assert np.array_equal(loaded[0], gray3)
    assert np.array_equal(loaded[1], rgba[:, :, :3])
    assert np.array_equal(loaded[2], np.repeat(np.rint(deep / 257.0).astype(np.uint8)[:, :, None], 3, axis=2))
    assert np.array_equal(loaded[3], np.asarray(palette.convert("RGB")))
    assert np.array_equal(loaded[4], gray3)


def test_image_size_differing_from_annotation_is_clipped(tmp_path, caplog):
    img_dir, ann_file = _write_dataset(tmp_path, [{"id": 1, "file_name": "a.png", "width": 40, "height": 40,
                                                   "array": np.zeros((20, 30, 3), np.uint8)}],
                                       [{"image_id": 1, "category_id": 3, "bbox": [20, 10, 15, 15]},
                                        {"image_id": 1, "category_id": 3, "bbox": [32, 5, 4, 4]}])
    ds = CocoDetection(img_dir, ann_file)
    with caplog.at_level(logging.WARNING):
        _, target = ds.load(0)
    assert "a.png is 30x20 but its annotation says 40x40" in caplog.text
    np.testing.assert_array_equal(target["boxes"], np.array([[20, 10, 30, 20]], np.float32))
    assert target["orig_size"].tolist() == [30, 20] and len(target["labels"]) == 1


# --------------------------------------------------------------------------------------------
# Transforms


def _scene_sample(seed: int) -> tuple[np.ndarray, dict]:
    image, objects = _scene(seed, 64, 48, 3)
    boxes = np.array([[x, y, x + w, y + h] for _, (x, y, w, h) in objects], np.float32)
    target = {"boxes": boxes, "labels": np.array([c for c, _ in objects], np.int64),
              "area": boxes[:, 2] * boxes[:, 3], "iscrowd": np.zeros(3, np.int64)}
    return image, target


def _assert_boxes_on_their_pixels(image: np.ndarray, target: dict) -> None:
    """Every box (integer xyxy) covers only its category's colour (labels hold category ids here)."""
    h, w = image.shape[:2]
    for (x1, y1, x2, y2), cat in zip(target["boxes"].astype(int), target["labels"]):
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
        assert np.all(image[y1:y2, x1:x2] == np.array(COLOURS[int(cat)], np.uint8))


def test_flip_twice_is_identity():
    image, target = _scene_sample(1)
    flip = RandomHorizontalFlip(p=1.0)
    once_image, once = flip(image, target, SharedRandom(0))
    _assert_boxes_on_their_pixels(np.ascontiguousarray(once_image), once)
    twice_image, twice = flip(once_image, once, SharedRandom(0))
    assert np.array_equal(twice_image, image)
    np.testing.assert_array_equal(twice["boxes"], target["boxes"])
    assert np.array_equal(RandomHorizontalFlip(p=0.0)(image, target, SharedRandom(0))[0], image)


def test_zoom_out_keeps_boxes_on_the_same_pixels():
    image, target = _scene_sample(2)
    zoom = RandomZoomOut(fill=0, p=1.0)
    for seed in range(20):
        out, out_target = zoom(image, target, SharedRandom(seed))
        h, w = out.shape[:2]
        assert 48 <= h <= 4 * 48 and 64 <= w <= 4 * 64
        _assert_boxes_on_their_pixels(out, out_target)
        assert (out == 0).all(axis=2).sum() == h * w - 48 * 64  # everything but the image is fill
        np.testing.assert_array_equal(out_target["labels"], target["labels"])


def test_iou_crop_keeps_boxes_inside_and_sanitize_drops_the_rest():
    image, target = _scene_sample(3)
    crop, sanitize = RandomIoUCrop(p=1.0), SanitizeBoundingBox(min_size=1)
    cropped_any = False
    for seed in range(30):
        out, out_target = crop(image, target, SharedRandom(seed))
        h, w = out.shape[:2]
        cropped_any |= (h, w) != (48, 64)
        boxes = out_target["boxes"]
        assert boxes.shape == (3, 4)
        assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= w).all() and (boxes[:, [1, 3]] <= h).all()
        out, kept = sanitize(out, out_target, SharedRandom(0))
        assert len(kept["boxes"]) >= 1
        assert len(kept["labels"]) == len(kept["area"]) == len(kept["iscrowd"]) == len(kept["boxes"])
        _assert_boxes_on_their_pixels(out, kept)
    assert cropped_any


def test_sanitize_drops_degenerate_boxes_with_their_entries():
    image = np.zeros((10, 20, 3), np.uint8)
    boxes = np.array([[1, 1, 5, 5], [2, 2, 2, 8], [3, 3, 3.5, 9], [-1, 0, 4, 4], [15, 2, 21, 6], [0, 0, 20, 10]],
                     np.float32)
    target = {"boxes": boxes, "labels": np.arange(6, dtype=np.int64), "area": np.arange(6, dtype=np.float32),
              "iscrowd": np.zeros(6, np.int64), "image_id": 9}
    _, out = SanitizeBoundingBox(min_size=1)(image, target, SharedRandom(0))
    assert out["labels"].tolist() == [0, 5] and out["area"].tolist() == [0.0, 5.0] and out["image_id"] == 9
    np.testing.assert_array_equal(out["boxes"], boxes[[0, 5]])
    with pytest.raises(ValueError, match="min_size"):
        SanitizeBoundingBox(min_size=0.5)


def test_geometric_chain_keeps_every_box_on_its_pixels():
    image, target = _scene_sample(4)
    chain = Compose([RandomZoomOut(p=1.0), RandomIoUCrop(p=1.0), SanitizeBoundingBox(), RandomHorizontalFlip()])
    for seed in range(40):
        out, out_target = chain(image, target, SharedRandom(seed))
        _assert_boxes_on_their_pixels(np.ascontiguousarray(out), out_target)


def test_resize_to_float_and_convert_box():
    image = np.zeros((20, 40, 3), np.uint8)
    image[4:12, 8:24] = 255
    target = {"boxes": np.array([[8, 4, 24, 12]], np.float32), "labels": np.array([1], np.int64)}
    resized, t = Resize(10)(image, target, SharedRandom(0))
    assert resized.shape == (10, 10, 3)
    np.testing.assert_allclose(t["boxes"], [[2, 2, 6, 6]])
    assert np.array_equal(resized, np.asarray(Image.fromarray(image).resize((10, 10), Image.Resampling.BILINEAR)))
    as_float, t = ToFloat()(resized, t, SharedRandom(0))
    assert as_float.shape == (3, 10, 10) and as_float.dtype == np.float32
    np.testing.assert_array_equal(as_float, resized.transpose(2, 0, 1).astype(np.float32) / 255)
    _, t = ConvertBox("cxcywh", normalize=True)(as_float, t, SharedRandom(0))
    assert t["boxes"].dtype == np.float32
    np.testing.assert_allclose(t["boxes"], [[0.4, 0.4, 0.4, 0.4]], rtol=1e-6)


def test_photometric_distort_follows_its_draw_order():
    image, target = _scene_sample(5)
    image = np.ascontiguousarray(image + np.arange(64, dtype=np.uint8)[None, :, None])  # not flat
    distort = RandomPhotometricDistort(p=1.0)
    out, out_target = distort(image, target, SharedRandom(11))
    assert out_target is target and out.dtype == np.uint8 and out.shape == image.shape
    draws = SharedRandom(11)
    factors = []
    for low, high in (distort.brightness, distort.contrast, distort.saturation, distort.hue):
        assert draws.uniform((1,))[0] < 1.0
        factors.append(low + (high - low) * float(draws.uniform((1,))[0]))
    contrast_before = bool(draws.uniform((1,))[0] < 0.5)
    draws.uniform((1,))
    permutation = np.argsort(draws.integers(0, 2**62, (3,)), kind="stable")
    pil = ImageEnhance.Brightness(Image.fromarray(image)).enhance(factors[0])
    if contrast_before:
        pil = ImageEnhance.Contrast(pil).enhance(factors[1])
    pil = _adjust_hue(ImageEnhance.Color(pil).enhance(factors[2]), factors[3])
    if not contrast_before:
        pil = ImageEnhance.Contrast(pil).enhance(factors[1])
    assert np.array_equal(out, np.asarray(pil)[:, :, permutation])
    assert np.array_equal(RandomPhotometricDistort(p=0.0)(image, target, SharedRandom(11))[0], image)


def test_train_transforms_output_format():
    image, target = _scene_sample(6)
    target["labels"] = np.array([0, 1, 2], np.int64)
    for seed in range(10):
        out, t = train_transforms(32)(image, target, SharedRandom(seed))
        assert out.shape == (3, 32, 32) and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1
        boxes = t["boxes"]
        assert boxes.dtype == np.float32 and boxes.shape[1] == 4 and len(boxes) == len(t["labels"])
        assert (boxes[:, 2:] > 0).all() and (boxes[:, :2] - boxes[:, 2:] / 2 >= -1e-6).all()
        assert (boxes[:, :2] + boxes[:, 2:] / 2 <= 1 + 1e-6).all()


def test_light_augmentation_keeps_every_box_and_its_area():
    """``light`` has no zoom-out or IoU crop: every box survives, its area only rescaled."""
    image, target = _scene_sample(6)
    target["labels"] = np.array([0, 1, 2], np.int64)
    h, w = image.shape[:2]
    areas = np.sort((target["boxes"][:, 2] - target["boxes"][:, 0])
                    * (target["boxes"][:, 3] - target["boxes"][:, 1]) / (w * h))
    official_changed = 0
    for seed in range(10):
        _, light = train_transforms(32, "light")(image, target, SharedRandom(seed))
        assert sorted(light["labels"].tolist()) == [0, 1, 2]
        np.testing.assert_allclose(np.sort(light["boxes"][:, 2] * light["boxes"][:, 3]), areas,
                                   rtol=1e-5)
        _, official = train_transforms(32, "official")(image, target, SharedRandom(seed))
        official_changed += (len(official["labels"]) != 3 or not np.allclose(
            np.sort(official["boxes"][:, 2] * official["boxes"][:, 3]), areas, rtol=1e-5))
    assert official_changed > 0  # the official chain does zoom out / crop on some draws


def test_unknown_augmentation_is_an_error():
    with pytest.raises(ValueError, match="augment must be one of"):
        train_transforms(32, "heavy")


# --------------------------------------------------------------------------------------------
# Loader


def test_loader_is_deterministic_per_seed_and_epoch(tmp_path):
    ds = _scene_dataset(tmp_path)
    ds.transforms = train_transforms(32)
    loader = DataLoader(ds, 3, shuffle=True, drop_last=False, seed=4, multi_scale=[24, 32, 40])
    assert len(loader) == 4
    epoch0, epoch1 = list(loader), list(loader)
    assert loader.state_dict() == {"epoch": 2, "position": 0}
    again = DataLoader(ds, 3, shuffle=True, drop_last=False, seed=4, multi_scale=[24, 32, 40])
    _assert_batches_equal(list(again), epoch0)
    again.set_epoch(1)
    _assert_batches_equal(list(again), epoch1)
    ids0 = [t["image_id"] for b in epoch0 for t in b.targets]
    ids1 = [t["image_id"] for b in epoch1 for t in b.targets]
    assert sorted(ids0) == sorted(ids1) == list(range(100, 110)) and ids0 != ids1
    sizes = {b.images.shape[-1] for b in epoch0 + epoch1}
    assert sizes <= {24, 32, 40} and len(sizes) > 1
    for batch in epoch0:
        assert batch.images.dtype == np.float32 and batch.images.shape[:2] == (len(batch.targets), 3)
    other_seed = list(DataLoader(ds, 3, shuffle=True, drop_last=False, seed=5))
    assert [t["image_id"] for b in other_seed for t in b.targets] != ids0
    assert len(DataLoader(ds, 3, shuffle=False, drop_last=True)) == 3


def test_workers_give_identical_batches(tmp_path):
    ds = _scene_dataset(tmp_path)
    ds.transforms = train_transforms(32)

    def run(workers: int) -> list:
        return list(DataLoader(ds, 2, shuffle=True, drop_last=True, num_workers=workers, seed=1,
                               multi_scale=[24, 32, 40]))

    _assert_batches_equal(run(2), run(0))


def test_workers_pass_uint8_batches_and_one_pool_serves_every_epoch(tmp_path):
    """Batches cross from the workers as uint8 (a quarter of float32's bytes) and come out
    float32 in [0, 1], byte for byte as in-process loading; the pool outlives an epoch, and
    leaving an epoch early or closing the loader stops it."""
    ds = _scene_dataset(tmp_path)
    ds.transforms = train_transforms(32)
    loader = DataLoader(ds, 2, shuffle=True, drop_last=True, num_workers=2, seed=1, multi_scale=[24, 40])
    with loader:
        first = list(loader)
        pool = loader._pool
        assert pool is not None
        second = list(loader)
        assert loader._pool is pool  # the same workers for the next epoch
        raw, _ = loader._maker(0, 0, loader.batch_indices(0)[0])
        assert raw.images.dtype == np.uint8 and raw.images.shape[-1] == 3
        for batch in first + second:
            assert batch.images.dtype == np.float32 and batch.images.shape[1] == 3
        for batch in loader:  # leaving an epoch early drops its jobs in flight with the pool
            break
        assert loader._pool is None
        list(loader)
        assert loader._pool is not None
    assert loader._pool is None
    plain = DataLoader(ds, 2, shuffle=True, drop_last=True, seed=1, multi_scale=[24, 40])
    _assert_batches_equal(first + second, list(plain) + list(plain))


def test_a_dataset_whose_transforms_hide_tofloat_is_loaded_as_float(tmp_path):
    ds = _scene_dataset(tmp_path)
    ds.transforms = lambda image, target, rng: train_transforms(32)(image, target, rng)
    assert not ds.can_defer_float()
    with pytest.raises(ValueError, match="exactly one ToFloat"):
        ds.get(0, SharedRandom(0), uint8=True)
    batch = next(iter(DataLoader(ds, 2, shuffle=False, drop_last=True)))
    assert batch.images.dtype == np.float32


def test_resume_continues_with_identical_batches(tmp_path):
    ds = _scene_dataset(tmp_path)
    ds.transforms = train_transforms(32)

    def loader() -> DataLoader:
        return DataLoader(ds, 2, shuffle=True, drop_last=True, seed=3, multi_scale=[24, 32])

    full = list(loader())
    first = loader()
    seen = []
    for batch in first:
        seen.append(batch)
        if len(seen) == 3:
            break
    state = first.state_dict()
    assert state == {"epoch": 0, "position": 3}
    resumed = loader()
    resumed.load_state_dict(json.loads(json.dumps(state)))
    resumed.set_epoch(0)  # same epoch: the position is kept
    rest = list(resumed)
    _assert_batches_equal(seen + rest, full)
    assert resumed.state_dict() == {"epoch": 1, "position": 0}
    with pytest.raises(ValueError, match="position=9"):
        resumed.load_state_dict({"epoch": 0, "position": 9})


def test_resize_nearest_matches_torch_interpolate():
    torch = pytest.importorskip("torch")
    images = SharedRandom(0).uniform((2, 3, 32, 32))
    for size in (24, 32, 40, 17):
        expected = torch.nn.functional.interpolate(torch.from_numpy(images), size=[size, size]).numpy()
        assert np.array_equal(resize_nearest(images, size), expected)


def test_loader_throughput_is_measured_per_worker_count(tmp_path):
    from parity.bench import loader_throughput
    from rtdetr_common.synthetic import make_dataset

    root = make_dataset(tmp_path / "data", num_train=6, num_val=1, num_classes=2,
                        min_size=64, max_size=96).root
    rows = loader_throughput([0, 1], size=128, batch=2, batches=2, dataset=str(root))
    assert [r["workers"] for r in rows] == [0, 1]
    for row in rows:
        assert row["images_per_s"] > 0
        assert row["shipped_mb_per_batch"] * 4 == pytest.approx(row["float32_mb_per_batch"])
    with pytest.raises(ValueError, match="train images"):
        loader_throughput([0], size=128, batch=2, batches=5, dataset=str(root))
