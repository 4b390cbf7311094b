"""The synthetic COCO-format dataset (format, determinism, atomic writes, geometry, the cache)
and the seeded images of the parity checks.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rtdetr_common import synthetic
from pycocotools.coco import COCO
from rtdetr_common.seeded import seeded_images
from rtdetr_common.synthetic import (DEFAULT_DATASET, SHAPES, SyntheticParams, ensure_default_dataset,
                                     is_complete, make_dataset)

SMALL = dict(num_train=5, num_val=3, min_size=96, max_size=160)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_writes_a_valid_coco_dataset(tmp_path):
    ds = make_dataset(tmp_path / "ds", seed=3, **SMALL)
    assert ds.train_ann == tmp_path / "ds" / "annotations" / "instances_train.json"
    for folder, ann, count in ((ds.train_images, ds.train_ann, 5), (ds.val_images, ds.val_ann, 3)):
        doc = json.loads(ann.read_text())
        assert set(doc) == {"info", "licenses", "images", "annotations", "categories"}
        assert [c["id"] for c in doc["categories"]] == [s.category_id for s in SHAPES[:5]]
        assert [c["id"] for c in doc["categories"]] != list(range(1, 6))  # non-contiguous
        assert all(set(c) == {"id", "name", "supercategory"} for c in doc["categories"])
        assert len(doc["images"]) == count == len(list(folder.glob("*.png")))
        sizes = {}
        for img in doc["images"]:
            with Image.open(folder / img["file_name"]) as im:
                assert im.mode == "RGB" and im.size == (img["width"], img["height"])
            assert 96 <= img["width"] <= 160 and 96 <= img["height"] <= 160
            sizes[img["id"]] = (img["width"], img["height"])
        cat_ids = {c["id"] for c in doc["categories"]}
        assert doc["annotations"], "no objects drawn"
        assert len({a["id"] for a in doc["annotations"]}) == len(doc["annotations"])
        for a in doc["annotations"]:
            assert set(a) == {"id", "image_id", "category_id", "bbox", "area", "iscrowd"}
            assert a["category_id"] in cat_ids and a["iscrowd"] == 0
            x, y, w, h = a["bbox"]
            width, height = sizes[a["image_id"]]
            assert x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= width and y + h <= height
            assert 0 < a["area"] <= w * h + 1
        coco = COCO(str(ann))
        assert len(coco.getImgIds()) == count
    manifest = json.loads((ds.root / "manifest.json").read_text())
    assert manifest["version"] == synthetic.GENERATOR_VERSION and manifest["params"]["seed"] == 3
    assert is_complete(ds)


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    a = _files(make_dataset(tmp_path / "a", seed=7, **SMALL).root)
    b = _files(make_dataset(tmp_path / "b", seed=7, **SMALL).root)
    c = _files(make_dataset(tmp_path / "c", seed=8, **SMALL).root)
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    assert a["train/000000000001.png"] != c["train/000000000001.png"]


def test_image_does_not_depend_on_split_length(tmp_path):
    short = make_dataset(tmp_path / "short", num_train=2, num_val=1, min_size=96, max_size=128)
    long = make_dataset(tmp_path / "long", num_train=4, num_val=1, min_size=96, max_size=128)
    for name in ("000000000001.png", "000000000002.png"):
        assert (short.train_images / name).read_bytes() == (long.train_images / name).read_bytes()


def test_existing_root_refused_unless_overwrite(tmp_path):
    root = tmp_path / "ds"
    make_dataset(root, seed=1, **SMALL)
    before = _files(root)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        make_dataset(root, seed=2, **SMALL)
    assert _files(root) == before
    make_dataset(root, seed=2, overwrite=True, **SMALL)
    assert _files(root) != before
    assert json.loads((root / "manifest.json").read_text())["params"]["seed"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no temp folders left


def test_interrupted_run_leaves_no_half_dataset(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_render = synthetic._render

    def failing_render(rng, params):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_render(rng, params)

    monkeypatch.setattr(synthetic, "_render", failing_render)
    with pytest.raises(KeyboardInterrupt):
        make_dataset(tmp_path / "fresh", **SMALL)
    assert list(tmp_path.iterdir()) == []

    monkeypatch.setattr(synthetic, "_render", real_render)
    root = tmp_path / "kept"
    make_dataset(root, **SMALL)
    before = _files(root)
    calls["n"] = 0
    monkeypatch.setattr(synthetic, "_render", failing_render)
    with pytest.raises(KeyboardInterrupt):
        make_dataset(root, seed=5, overwrite=True, **SMALL)
    assert _files(root) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]


@pytest.mark.parametrize("bad", [dict(num_classes=0), dict(num_classes=len(SHAPES) + 1),
                                 dict(min_size=200, max_size=100), dict(max_objects=0),
                                 dict(colour_mode="rainbow"), dict(min_scale=0.5, max_scale=0.3)])
def test_bad_parameters_are_named(tmp_path, bad):
    name = next(iter(bad)).split("_")[-1]
    with pytest.raises(ValueError, match=name):
        make_dataset(tmp_path / "ds", **{**SMALL, **bad})
    assert not (tmp_path / "ds").exists()


def test_unknown_option_is_named(tmp_path):
    with pytest.raises(ValueError, match="num_shapes"):
        make_dataset(tmp_path / "ds", num_shapes=3)


@pytest.mark.parametrize("shape", range(len(SHAPES)))
def test_box_is_the_full_extent_of_the_drawn_object(shape):
    """With one object, the pixels that differ from the background lie in (and fill) its box."""
    params = replace(DEFAULT_DATASET, num_classes=len(SHAPES), min_objects=1, max_objects=1,
                     min_size=120, max_size=200)
    for index in range(40):
        probe = np.random.default_rng([shape, index])
        image, objects = synthetic._render(probe, params)
        if objects[0]["label"] == shape:
            break
    else:
        pytest.skip("shape not drawn in 40 tries")
    replay = np.random.default_rng([shape, index])
    width, height = int(replay.integers(120, 201)), int(replay.integers(120, 201))
    background = np.clip(np.rint(synthetic._background(replay, height, width)), 0, 255)
    changed = np.abs(image.astype(np.int32) - background.astype(np.int32)).max(axis=2) > 8  # [H, W]
    ys, xs = np.nonzero(changed)
    x, y, w, h = objects[0]["bbox"]
    assert xs.min() >= math.floor(x) - 1 and xs.max() <= math.ceil(x + w) + 1
    assert ys.min() >= math.floor(y) - 1 and ys.max() <= math.ceil(y + h) + 1
    # The outline reaches (within 2 px) all four sides of the box.
    assert xs.min() <= x + 2 and xs.max() >= x + w - 3 and ys.min() <= y + 2 and ys.max() >= y + h - 3


def test_default_dataset_statistics():
    """The default draws large objects, 1-6 per image, every class, varied non-square sizes."""
    counts, fractions, labels, aspects = [], [], [], []
    for index in range(40):
        image, objects = synthetic._render(np.random.default_rng([99, index]), DEFAULT_DATASET)
        height, width = image.shape[:2]
        assert DEFAULT_DATASET.min_size <= min(height, width) <= max(height, width) <= DEFAULT_DATASET.max_size
        aspects.append(width / height)
        counts.append(len(objects))
        for obj in objects:
            fractions.append(max(obj["bbox"][2:]) / min(height, width))
            labels.append(obj["label"])
    assert min(counts) >= 1 and max(counts) <= 6 and np.mean(counts) >= 2.5
    assert 0.1 <= min(fractions) and max(fractions) <= 0.75 and 0.2 <= np.median(fractions) <= 0.45
    assert set(labels) == set(range(DEFAULT_DATASET.num_classes))
    assert np.mean([abs(a - 1) > 0.05 for a in aspects]) > 0.5
    assert DEFAULT_DATASET.num_classes == 5 and DEFAULT_DATASET.colour_mode == "random"


def test_colour_independent_of_class_by_default_and_class_colours_on_request():
    def object_colours(params):
        out = {}
        for index in range(30):
            rng = np.random.default_rng([5, index])
            image, objects = synthetic._render(rng, replace(params, min_objects=1, max_objects=1))
            x, y, w, h = objects[0]["bbox"]
            centre = image[int(y + h / 2) - 1: int(y + h / 2) + 2, int(x + w / 2) - 1: int(x + w / 2) + 2]
            if objects[0]["label"] in (0, 2):  # disk, rectangle: filled at the centre
                out.setdefault(objects[0]["label"], []).append(centre.reshape(-1, 3).mean(axis=0))
        return out

    base = replace(DEFAULT_DATASET, min_size=96, max_size=128, max_rotation=0.0)
    random_mode = object_colours(base)
    class_mode = object_colours(replace(base, colour_mode="class"))
    def spread(values):
        return float(np.linalg.norm(np.std(values, axis=0)))

    for groups in (random_mode, class_mode):
        assert sorted(groups) == [0, 2] and min(len(v) for v in groups.values()) >= 4
    assert all(spread(v) > 60 for v in random_mode.values())
    assert all(spread(v) < 40 for v in class_mode.values())


def test_ensure_default_dataset_generates_once_and_regenerates_on_mismatch(tmp_path, monkeypatch):
    params = SyntheticParams(num_train=3, num_val=2, min_size=96, max_size=128)
    first = ensure_default_dataset(tmp_path, params)
    assert first.root == tmp_path / f"synthetic-v{synthetic.GENERATOR_VERSION}-seed0"
    assert is_complete(first)
    before = _files(first.root)

    def refuse(*args, **kwargs):
        raise AssertionError("regenerated a complete dataset")

    monkeypatch.setattr(synthetic, "make_dataset", refuse)
    assert ensure_default_dataset(tmp_path, params) == first
    monkeypatch.undo()

    manifest = first.root / "manifest.json"
    recorded = json.loads(manifest.read_text())
    recorded["version"] = -1
    manifest.write_text(json.dumps(recorded))
    assert not is_complete(first)
    again = ensure_default_dataset(tmp_path, params)
    assert is_complete(again) and _files(again.root) == before

    (again.val_images / "000000000001.png").unlink()
    assert not is_complete(again)
    assert is_complete(ensure_default_dataset(tmp_path, params))


def test_default_cache_dir_honours_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(synthetic.CACHE_ENV, str(tmp_path / "cache"))
    assert synthetic.default_cache_dir() == tmp_path / "cache"
    monkeypatch.delenv(synthetic.CACHE_ENV)
    assert synthetic.default_cache_dir() == Path(synthetic.__file__).resolve().parents[1] / "runs" / "datasets"


@pytest.mark.parametrize("size, shape, sha1", [
    # One side S: S x S, the same bytes as before (h, w) pairs were accepted.
    (250, (250, 250), "e484a6d6eb8588192672b7d9255496edeae8a1ef"),
    ((250, 250), (250, 250), "e484a6d6eb8588192672b7d9255496edeae8a1ef"),
    ((96, 160), (96, 160), None),
    ((160, 96), (160, 96), None),
])
def test_seeded_images_are_square_or_height_by_width(size, shape: tuple[int, int],
                                                      sha1: str | None) -> None:
    images = seeded_images(2, size, seed=3)
    assert images.shape == (2, 3, *shape) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert np.array_equal(images, seeded_images(2, size, seed=3))
    if sha1 is not None:
        assert hashlib.sha1(images.tobytes()).hexdigest() == sha1
