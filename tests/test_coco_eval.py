"""COCO evaluation (detections -> COCO results -> COCOeval) and drawing detections."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from rtdetr_common.coco import CATEGORY_NAMES, LABEL_TO_CATEGORY, CategoryMap
from rtdetr_common.coco_eval import (METRIC_NAMES, MISSING, detections_to_coco, evaluate,
                                     load_coco, write_results_json)
from rtdetr_common.draw import draw_detections, save_png
from rtdetr_common.synthetic import make_dataset

# Three images; objects on COCO ids at both ends of the 1..90 range and around its gaps, with
# small (< 32^2), medium and large areas.
_OBJECTS = {
    1: [(13, [10, 10, 20, 20]), (90, [60, 40, 120, 90]), (1, [200, 150, 60, 80])],
    2: [(1, [5, 5, 40, 60]), (67, [100, 20, 150, 150])],
    3: [(13, [30, 30, 25, 25]), (84, [150, 100, 50, 40]), (90, [10, 120, 110, 100])],
}


@pytest.fixture()
def coco_file(tmp_path):
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 320, "height": 280} for i in _OBJECTS]
    annotations = []
    for image_id, objects in _OBJECTS.items():
        for category_id, (x, y, w, h) in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": category_id, "bbox": [x, y, w, h],
                                "area": float(w * h), "iscrowd": 0})
    categories = [{"id": c, "name": n, "supercategory": "thing"} for c, n in CATEGORY_NAMES.items()]
    path = tmp_path / "instances_val.json"
    path.write_text(json.dumps({"info": {}, "licenses": [], "images": images,
                                "annotations": annotations, "categories": categories}))
    return path


def _results(shift: float = 0.0, relabel=lambda label: label):
    """Per-image postprocessor-style results from the ground truth (xyxy, contiguous labels)."""
    cmap = CategoryMap(CATEGORY_NAMES)
    image_ids, results = [], []
    for image_id, objects in _OBJECTS.items():
        boxes = np.array([[x + shift * w, y, x + w + shift * w, y + h] for _, (x, y, w, h) in objects],
                         dtype=np.float32)  # [n, 4] xyxy
        labels = np.array([relabel(cmap.to_label(c)) for c, _ in objects], dtype=np.int64)
        image_ids.append(image_id)
        results.append({"labels": labels, "boxes": boxes, "scores": np.ones(len(objects), np.float32)})
    return image_ids, results, cmap


def test_perfect_detections_score_one_and_round_trip_coco_ids(coco_file, capsys):
    image_ids, results, cmap = _results()
    assert cmap == CategoryMap.from_coco(load_coco(coco_file))
    assert {cmap.to_label(c): c for c in CATEGORY_NAMES} == LABEL_TO_CATEGORY
    dets = detections_to_coco(image_ids, results, cmap)
    assert [d["category_id"] for d in dets] == [c for objs in _OBJECTS.values() for c, _ in objs]
    assert [d["bbox"] for d in dets] == [b for objs in _OBJECTS.values() for _, b in objs]
    metrics = evaluate(coco_file, dets)
    assert tuple(metrics) == METRIC_NAMES
    assert all(metrics[k] == pytest.approx(1.0) for k in METRIC_NAMES), metrics
    assert "Average Precision" in metrics.summary and "IoU=0.50:0.95" in metrics.summary
    assert capsys.readouterr().out == ""  # pycocotools' prints are captured
    assert json.loads(json.dumps(metrics)) == dict(metrics)


def test_shifted_boxes_lower_ap(coco_file):
    perfect = evaluate(coco_file, detections_to_coco(*_results()))
    slight = evaluate(coco_file, detections_to_coco(*_results(shift=0.1)))
    large = evaluate(coco_file, detections_to_coco(*_results(shift=0.45)))
    assert slight["AP50"] == pytest.approx(1.0) and slight["AP"] < perfect["AP"]
    assert large["AP50"] < 0.5 and large["AP"] < slight["AP"]


def test_wrong_category_scores_zero(coco_file):
    dets = detections_to_coco(*_results(relabel=lambda label: (label + 1) % 80))
    metrics = evaluate(coco_file, dets)
    assert all(metrics[k] == 0.0 for k in METRIC_NAMES), metrics


def test_all_twelve_statistics_are_kept():
    assert METRIC_NAMES == ("AP", "AP50", "AP75", "APs", "APm", "APl",
                            "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def test_empty_detections_give_zeros_where_there_is_ground_truth(coco_file):
    metrics = evaluate(coco_file, [])
    assert dict(metrics) == {k: 0.0 for k in METRIC_NAMES}
    assert "no detections" in metrics.summary
    # image 2 has a medium and a large object only: the small-area metrics are missing
    only_two = evaluate(coco_file, [], image_ids=[2])
    assert {k for k, v in only_two.items() if v == MISSING} == {"APs", "ARs"}
    assert all(v == 0.0 for k, v in only_two.items() if k not in {"APs", "ARs"})


def test_missing_area_range_is_reported_missing_not_zero(coco_file):
    """Only medium and large objects on image 2 -> pycocotools' -1 for small objects is kept."""
    from rtdetr_common.run_log import format_metrics

    image_ids, results, cmap = _results()
    metrics = evaluate(coco_file, detections_to_coco(image_ids[1:2], results[1:2], cmap), image_ids=[2])
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AR100"] == pytest.approx(1.0)
    assert metrics["APs"] == MISSING and metrics["ARs"] == MISSING
    assert "APs n/a" in format_metrics(metrics) and "AP 100.00" in format_metrics(metrics)
    assert evaluate(coco_file, detections_to_coco(image_ids[1:2], results[1:2], cmap))["AP"] < 1.0


def test_results_json_round_trip(coco_file, tmp_path):
    dets = detections_to_coco(*_results(shift=0.1))
    out = tmp_path / "results.json"
    write_results_json(out, dets)
    assert json.loads(out.read_text()) == dets
    assert sorted(p.name for p in tmp_path.iterdir()) == ["instances_val.json", "results.json"]
    assert evaluate(coco_file, out) == evaluate(load_coco(coco_file), dets)
    with pytest.raises(FileNotFoundError):
        write_results_json(tmp_path / "missing" / "r.json", dets)


def test_evaluate_does_not_modify_detections(coco_file):
    dets = detections_to_coco(*_results())
    copy = json.loads(json.dumps(dets))
    evaluate(coco_file, dets)
    assert dets == copy


def test_bad_inputs_are_named(coco_file, tmp_path):
    image_ids, results, cmap = _results()
    dets = detections_to_coco(image_ids, results, cmap)
    with pytest.raises(ValueError, match="image ids not in the ground truth: \\[77\\]"):
        evaluate(coco_file, [dict(dets[0], image_id=77)])
    with pytest.raises(ValueError, match="category ids not in the ground truth: \\[12\\]"):
        evaluate(coco_file, [dict(dets[0], category_id=12)])
    with pytest.raises(ValueError, match="lacks \\['score'\\]"):
        evaluate(coco_file, [{k: v for k, v in dets[0].items() if k != "score"}])
    with pytest.raises(ValueError, match="2 image ids but 3 results"):
        detections_to_coco(image_ids[:2], results, cmap)
    with pytest.raises(ValueError, match="image 1 has boxes"):
        detections_to_coco([1], [dict(results[0], boxes=np.zeros((3, 5)))], cmap)
    with pytest.raises(KeyError, match="label 80"):
        detections_to_coco([1], [dict(results[0], labels=np.array([80, 0, 0]))], cmap)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        evaluate(broken, [])
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        evaluate(tmp_path / "nowhere.json", [])


def test_empty_result_arrays_are_fine(coco_file):
    cmap = CategoryMap(CATEGORY_NAMES)
    empty = {"labels": np.zeros(0, np.int64), "boxes": np.zeros((0, 4), np.float32),
             "scores": np.zeros(0, np.float32)}
    assert detections_to_coco([1, 2], [empty, empty], cmap) == []


def test_perfect_detections_on_the_synthetic_dataset(tmp_path):
    ds = make_dataset(tmp_path / "ds", num_train=0, num_val=4, min_size=96, max_size=128)
    coco = load_coco(ds.val_ann)
    cmap = CategoryMap.from_coco(coco)
    assert cmap.category_ids == (2, 3, 5, 7, 11)
    image_ids, results = [], []
    for image_id in coco.getImgIds():
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        xywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)  # [n, 4] xyxy
        image_ids.append(image_id)
        results.append({"labels": cmap.to_labels([a["category_id"] for a in anns]), "boxes": boxes,
                        "scores": np.linspace(1.0, 0.5, len(anns))})
    metrics = evaluate(coco, detections_to_coco(image_ids, results, cmap))
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AP50"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------ drawing


def _plain(height=120, width=160):
    return np.full((height, width, 3), 40, dtype=np.uint8)


def test_draw_detections_outlines_the_box_and_labels_it():
    image = _plain()
    drawn = np.asarray(draw_detections(image, [[40, 50, 120, 100]], [1], [0.87], ["disk", "ring"], 0.5))
    assert np.array_equal(image, _plain())  # input untouched
    changed = np.any(drawn != image, axis=2)  # [H, W]
    assert changed[50, 40:121].all() and changed[100, 40:121].all()  # top and bottom edges
    assert changed[50:101, 40].all() and changed[50:101, 120].all()  # left and right edges
    assert not changed[60:90, 50:110].any()  # box interior left alone
    assert not changed[105:, :].any() and not changed[:, 125:].any()  # nothing outside
    assert changed[35:50, 40:80].sum() > 20  # the "ring 0.87" tag above the box


def test_draw_detections_skips_scores_below_threshold():
    image = _plain()
    drawn = draw_detections(Image.fromarray(image), np.array([[10, 10, 60, 60], [70, 20, 150, 90]]),
                            np.array([0, 3]), np.array([0.3, 0.49]), None, score_threshold=0.5)
    assert np.array_equal(np.asarray(drawn), image)
    drawn = np.asarray(draw_detections(image, [[10, 10, 60, 60], [70, 20, 150, 90]], [0, 3],
                                       [0.3, 0.6], {3: "cross"}, score_threshold=0.5))
    changed = np.any(drawn != image, axis=2)
    assert not changed[:, :65].any() and changed[90, 70:151].all()


def test_draw_detections_rejects_bad_shapes():
    with pytest.raises(ValueError, match="uint8"):
        draw_detections(np.zeros((10, 10, 3), np.float32), [], [], [], None)
    with pytest.raises(ValueError, match="boxes must be"):
        draw_detections(_plain(), [[1, 2, 3]], [0], [1.0], None)
    with pytest.raises(ValueError, match="must match"):
        draw_detections(_plain(), [[1, 2, 3, 4]], [0, 1], [1.0], None)


def test_save_png_is_atomic_and_lossless(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    save_png(tmp_path / "a.png", image)
    with Image.open(tmp_path / "a.png") as im:
        assert np.array_equal(np.asarray(im), image)
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]
    with pytest.raises(FileNotFoundError):
        save_png(tmp_path / "no" / "b.png", image)
