"""DetectMetrics against pycocotools' COCOeval on randomised cases, plus hand-made cases."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import time

import numpy as np
import pytest
import torch

from vistrain.metrics.detect import CATEGORY_ID_OFFSET, DetectMetrics, coco_iou, write_coco_json, xyxy_to_coco

pycocotools = pytest.importorskip("pycocotools")
from pycocotools import mask as mask_utils  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402


def run_cocoeval(annotations: dict, predictions: list, iou_type: str = "bbox") -> COCOeval:
    """COCOeval (bbox or segm) on in-memory COCO dicts, its prints swallowed."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = copy.deepcopy(annotations)
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(copy.deepcopy(predictions)), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def random_boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    xy = rng.uniform(0, 500, (n, 2))
    return np.concatenate((xy, xy + rng.uniform(4, 150, (n, 2))), 1)


def jitter(rng: np.random.Generator, box: np.ndarray, scale: float) -> np.ndarray:
    wh = np.tile(box[2:] - box[:2], 2)
    out = box + rng.normal(0, scale, 4) * wh
    return np.rint(out) if rng.random() < 0.3 else out  # integer boxes give IoUs exactly on a threshold


def random_image(rng: np.random.Generator, nc: int) -> tuple[np.ndarray, np.ndarray, list[list[float]]]:
    """gts of classes 0..nc-3 (nc-2: gts never predicted; nc-1: predicted, never in the gts)."""
    n_gt = 0 if rng.random() < 0.15 else int(rng.integers(0, 9))
    boxes, cls = random_boxes(rng, n_gt), rng.integers(0, nc - 1, n_gt)
    if n_gt and rng.random() < 0.3:  # a duplicated gt: IoU ties between gts
        boxes, cls = np.concatenate((boxes, boxes[:1])), np.concatenate((cls, cls[:1]))
    preds = []
    for box, c in zip(boxes, cls):
        if c == nc - 2 or rng.random() < 0.2:  # missed
            continue
        for _ in range(int(rng.integers(1, 4))):  # duplicates
            pc = c if rng.random() < 0.9 else rng.integers(0, nc)
            preds.append([*jitter(rng, box, 0.08), rng.random(), pc])
    for box in random_boxes(rng, int(rng.integers(0, 5))):  # false positives, some of class nc-1
        preds.append([*box, rng.random() * 0.6, rng.integers(0, nc)])
    preds = [p for p in preds if p[5] != nc - 2]
    for p in preds:
        if rng.random() < 0.3:
            p[4] = round(p[4] * 10) / 10  # ties in scores, within and across images
    return boxes, cls, preds


def edge_image() -> tuple[np.ndarray, np.ndarray, list[list[float]]]:
    """IoU ties between gts (pycocotools takes the last gt) and IoUs exactly 0.5 and 0.75 (>= matches)."""
    boxes = np.array([[0, 0, 10, 10], [2, 0, 12, 10], [100, 100, 110, 110], [200, 200, 220, 220.0]])
    preds = [[1, 0, 11, 10, 0.9, 0],  # IoU 9/11 with gts 0 and 1
             [3, 0, 13, 10, 0.8, 0],  # IoU 9/11 with gt 1, 7/13 with gt 0
             [100, 100, 110, 105, 0.7, 0],  # IoU 0.5
             [200, 200, 220, 215, 0.6, 0]]  # IoU 0.75
    return boxes, np.zeros(4, np.int64), preds


def random_case(seed: int, n_images: int = 30) -> tuple[list[str], list]:
    rng = np.random.default_rng(seed)
    nc = int(rng.integers(3, 6))
    images = [random_image(rng, nc) for _ in range(n_images)]
    boxes, cls, preds = images[0]
    crowd = [[*jitter(rng, boxes[0] if len(boxes) else np.array([10, 10, 60, 60.0]), 0.05), rng.random(), 0]
             for _ in range(130)]  # > 100 detections of one class in one image
    for p in crowd[::4]:
        p[4] = 0.5
    images[0] = (boxes, cls, preds + crowd)
    images[1] = edge_image()
    return [f"class{i}" for i in range(nc)], images


def evaluate(names: list[str], images: list, ids: list) -> DetectMetrics:
    metrics = DetectMetrics(names)
    for image_id, (boxes, cls, preds) in zip(ids, images):
        pred = torch.tensor(preds, dtype=torch.float32).reshape(-1, 6)
        metrics.update(pred, torch.tensor(boxes, dtype=torch.float32), torch.tensor(cls), image_id=image_id,
                       image_size=(640, 640), file_name=f"{image_id}.jpg")
    return metrics


@pytest.mark.parametrize("seed", range(8))
def test_parity_with_pycocotools(seed):
    names, images = random_case(seed)
    ids = list(np.random.default_rng(seed).permutation(len(images)) * 3 + 7)  # ids not in arrival order
    metrics = evaluate(names, images, [int(i) for i in ids])
    annotations, predictions = metrics.coco_json()
    ev = run_cocoeval(annotations, predictions)
    res = metrics.results()
    assert res["metrics/mAP50-95(B)"] == pytest.approx(ev.stats[0], abs=1e-9)
    assert res["metrics/mAP50(B)"] == pytest.approx(ev.stats[1], abs=1e-9)
    precision = ev.eval["precision"][:, :, :, 0, 2]  # [T, R, K], -1 without gt
    assert [c["id"] for c in annotations["categories"]] == [i + CATEGORY_ID_OFFSET for i in range(len(names))]
    np.testing.assert_allclose(metrics.precision, precision, atol=1e-12)
    for k in range(len(names)):
        p = precision[:, :, k]
        if (p > -1).any():
            assert metrics.ap[k] == pytest.approx(p[p > -1].mean(), abs=1e-9)
            assert metrics.ap50[k] == pytest.approx(p[0][p[0] > -1].mean(), abs=1e-9)
        else:
            assert np.isnan(metrics.ap[k]) and np.isnan(metrics.ap50[k])
    assert np.isnan(metrics.ap[-1]) and metrics.ap[-2] == 0  # predicted-only class; never-predicted class
    assert metrics.fitness() == pytest.approx(0.1 * ev.stats[1] + 0.9 * ev.stats[0], abs=1e-9)


def box_mask(rng: np.random.Generator, box, size: int = 160, scale: float = 0.25) -> np.ndarray:
    """The box (scaled to a ``size`` canvas) filled, often with a random notch cut out: mask IoU != box IoU."""
    m = np.zeros((size, size), bool)
    x1, y1, x2, y2 = (int(round(v * scale)) for v in box[:4])
    x1, y1, x2, y2 = max(x1, 0), max(y1, 0), min(max(x2, x1 + 1), size), min(max(y2, y1 + 1), size)
    m[y1:y2, x1:x2] = True
    if rng.random() < 0.6 and x2 - x1 > 2 and y2 - y1 > 2:
        nx, ny = int(rng.integers(x1, x2 - 1)), int(rng.integers(y1, y2 - 1))
        m[ny:ny + (y2 - y1) // 2, nx:nx + (x2 - x1) // 2] = False
    return m


@pytest.mark.parametrize("seed", range(4))
def test_mask_parity_with_pycocotools(seed):
    """iou_type 'segm': mAP equal to COCOeval('segm') on the same RLE masks (the written JSON)."""
    names, images = random_case(seed, n_images=20)
    rng = np.random.default_rng(seed)
    metrics = DetectMetrics(names, iou_type="segm")
    for i, (boxes, cls, preds) in enumerate(images):
        pred = torch.tensor(preds, dtype=torch.float32).reshape(-1, 6)
        gt_masks = np.stack([box_mask(rng, b) for b in boxes]) if len(boxes) else np.zeros((0, 160, 160), bool)
        pred_masks = np.stack([box_mask(rng, p) for p in preds]) if preds else np.zeros((0, 160, 160), bool)
        metrics.update(pred, torch.tensor(boxes, dtype=torch.float32), torch.tensor(cls), image_id=i,
                       image_size=(160, 160), pred_masks=torch.from_numpy(pred_masks), gt_masks=gt_masks)
    annotations, predictions = metrics.coco_json()
    assert "segmentation" in annotations["annotations"][0] and "segmentation" in predictions[0]
    ev = run_cocoeval(annotations, predictions, "segm")
    res = metrics.results()
    assert set(res) == {"metrics/precision(M)", "metrics/recall(M)", "metrics/mAP50(M)", "metrics/mAP50-95(M)"}
    assert 0.05 < ev.stats[0] < 0.95  # not a degenerate case
    assert res["metrics/mAP50-95(M)"] == pytest.approx(ev.stats[0], abs=1e-9)
    assert res["metrics/mAP50(M)"] == pytest.approx(ev.stats[1], abs=1e-9)
    box_ev = run_cocoeval(annotations, predictions, "bbox")
    assert abs(box_ev.stats[0] - ev.stats[0]) > 1e-3  # the masks, not the boxes, were scored


def test_json_files_load_in_pycocotools(tmp_path):
    names, images = random_case(100, n_images=12)
    metrics = evaluate(names, images, [f"{i:06d}" for i in range(len(images))])  # numeric stems -> int ids
    ann_path, pred_path = write_coco_json(metrics, tmp_path)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_path))
        ev = COCOeval(gt, gt.loadRes(str(pred_path)), "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    assert gt.getImgIds() == list(range(len(images)))
    ann = json.loads(ann_path.read_text())["annotations"][0]
    assert ann["id"] == 1 and ann["iscrowd"] == 0 and ann["area"] == ann["bbox"][2] * ann["bbox"][3]
    assert metrics.results()["metrics/mAP50-95(B)"] == pytest.approx(ev.stats[0], abs=1e-9)
    assert metrics.results()["metrics/mAP50(B)"] == pytest.approx(ev.stats[1], abs=1e-9)


def test_iou_matches_pycocotools():
    rng = np.random.default_rng(0)
    dt = xyxy_to_coco(random_boxes(rng, 40))
    gt = xyxy_to_coco(np.rint(random_boxes(rng, 30)))
    dt[:3, 2] = 0  # zero-width boxes
    ref = mask_utils.iou(dt.tolist(), gt.tolist(), [0] * len(gt))
    np.testing.assert_array_equal(coco_iou(dt, gt), ref)


def test_perfect_and_empty_predictions():
    names = ["a", "b", "c"]
    rng = np.random.default_rng(1)
    perfect, empty = DetectMetrics(names), DetectMetrics(names)
    for i in range(10):
        boxes = torch.tensor(random_boxes(rng, 4))
        cls = torch.tensor(rng.integers(0, 3, 4))
        pred = torch.cat((boxes, torch.rand(4, 1), cls[:, None].double()), 1)
        perfect.update(pred, boxes, cls, image_id=i)
        empty.update(torch.zeros(0, 6), boxes, cls, image_id=i)
    assert all(v == pytest.approx(1.0) for v in perfect.results().values())
    assert perfect.fitness() == pytest.approx(1.0)
    assert all(v == 0.0 for v in empty.results().values())
    assert DetectMetrics(names).results()["metrics/mAP50-95(B)"] == 0.0  # nothing seen at all
    assert empty.matrix[3, :3].sum() == 40 and empty.matrix.sum() == 40


def test_confusion_matrix_hand_made():
    metrics = DetectMetrics(["a", "b"])  # rows = predicted, columns = true, index 2 = background
    gt = torch.tensor([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60.0]])
    pred = torch.tensor([[0, 0, 10, 10, 0.90, 0],  # a on a (IoU 1)
                         [0, 0, 10, 9, 0.95, 0],  # a on a again (IoU 0.9, loses to the exact box): FP
                         [20, 20, 30, 30, 0.80, 0],  # a on b
                         [100, 100, 110, 110, 0.70, 1],  # b on nothing: FP
                         [50, 50, 60, 60, 0.10, 0]])  # below conf 0.25: not counted; so gt 3 is missed
    metrics.update(pred, gt, torch.tensor([0, 1, 0]))
    expected = np.array([[1, 1, 1],
                         [0, 0, 1],
                         [1, 0, 0]])
    np.testing.assert_array_equal(metrics.matrix, expected)
    lines = metrics.summary_lines()
    assert lines[0].split() == ["Class", "Images", "Instances", "P", "R", "mAP50", "mAP50-95"]
    assert lines[1].split()[:3] == ["all", "1", "3"] and len(lines) == 4


def test_plot_writes_files(tmp_path):
    names, images = random_case(3, n_images=8)
    metrics = evaluate(names, images, list(range(len(images))))
    metrics.plot(tmp_path)
    for name in ("PR_curve.png", "F1_curve.png", "P_curve.png", "R_curve.png", "confusion_matrix.png"):
        assert (tmp_path / name).stat().st_size > 1000


def test_speed_5000_images():
    """5,000 images x 20 detections x 5 gts: the whole evaluation well under a few seconds."""
    rng = np.random.default_rng(0)
    gts = torch.tensor(random_boxes(rng, 5000 * 5)).view(5000, 5, 4)
    gcls = torch.tensor(rng.integers(0, 10, (5000, 5)))
    pick = torch.tensor(rng.integers(0, 5, (5000, 20)))
    boxes = torch.gather(gts, 1, pick[..., None].expand(-1, -1, 4)) + torch.randn(5000, 20, 4) * 5
    preds = torch.cat((boxes, torch.rand(5000, 20, 1), torch.gather(gcls, 1, pick)[..., None].double()), 2)
    metrics = DetectMetrics([str(i) for i in range(10)])
    start = time.perf_counter()
    for i in range(5000):
        metrics.update(preds[i], gts[i], gcls[i], image_id=i)
    metrics.results()
    assert time.perf_counter() - start < 10


def test_bad_input_raises():
    metrics = DetectMetrics(["a", "b"])
    with pytest.raises(ValueError, match=r"shape \[N, 6\]"):
        metrics.update(torch.zeros(3, 7), torch.zeros(0, 4), torch.zeros(0), image_id=1)
    with pytest.raises(ValueError, match="gt class 2 outside 0..1"):
        metrics.update(torch.zeros(0, 6), torch.tensor([[0, 0, 5, 5.0]]), torch.tensor([2]), image_id=1)
    with pytest.raises(ValueError, match="predicted class 5"):
        metrics.update(torch.tensor([[0, 0, 5, 5, 0.5, 5.0]]), torch.zeros(0, 4), torch.zeros(0), image_id=1)
    metrics.update(torch.zeros(0, 6), torch.zeros(0, 4), torch.zeros(0), image_id="7")
    metrics.update(torch.zeros(0, 6), torch.zeros(0, 4), torch.zeros(0), image_id=7)  # duplicate: renamed
    assert [im["id"] for im in metrics.images] == [7, "7_2"]


def test_to_rles_equal_pycocotools_encode():
    """to_rles scans only the columns between a mask's first and last nonzero one; the RLEs are pycocotools'
    own: empty and full masks, single pixels in the corners, masks touching the first or last column."""
    from vistrain.metrics.detect import to_rles

    rng = np.random.default_rng(0)
    for t in range(300):
        h, w = (int(v) for v in rng.integers(1, 24, 2))
        m = np.zeros((8, h, w), bool)
        m[1] = True
        m[2, 0, 0] = m[3, h - 1, w - 1] = m[4, h - 1, 0] = True
        m[5] = rng.random((h, w)) < 0.5
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        y1, x1 = rng.integers(y0, h + 1), rng.integers(x0, w + 1)
        m[6, y0:y1, x0:x1] = True
        m[7, y0:y1, x0:x1] = rng.random((y1 - y0, x1 - x0)) < 0.3
        m = m[rng.permutation(8)[: rng.integers(0, 9)]]  # 0..8 of them, in any order
        got = to_rles(torch.from_numpy(m))
        ref = mask_utils.encode(np.asfortranarray(m.transpose(1, 2, 0).astype(np.uint8))) if len(m) else []
        assert [(list(r["size"]), r["counts"]) for r in got] == [(list(r["size"]), r["counts"]) for r in ref], (h, w)
