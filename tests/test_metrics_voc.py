"""Pascal VOC AP50 (all-point and VOC2007 11-point) of DetectMetrics against a loop re-implementation of the
classic ``voc_eval``, and ``difficult`` ground truth in the VOC and the COCO metrics (the latter against
pycocotools' own ignore handling)."""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
import pytest
import torch

from vistrain.metrics.detect import DetectMetrics


# ----------------------------------------------------------------------------- reference: classic voc_eval
def ref_voc_ap(rec: np.ndarray, prec: np.ndarray, use_07_metric: bool) -> float:
    """py-faster-rcnn / Detectron ``voc_ap``, as written there."""
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            if np.sum(rec >= t) == 0:
                p = 0
            else:
                p = np.max(prec[rec >= t])
            ap = ap + p / 11.0
        return ap
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = np.maximum(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])


def ref_voc_eval(images: list, classname: int, use_07_metric: bool) -> float:
    """``voc_eval`` for one class with loops. ``images``: ``(gt boxes [M, 4], gt cls [M], difficult [M],
    preds [[x1, y1, x2, y2, score, cls], ...])``. Two documented departures from py-faster-rcnn: continuous IoU
    (no +1 pixel) and IoU >= 0.5 (the VOC devkit's ``VOCevaldet.m``; voc_eval.py has > 0.5). Detections are
    ranked by a stable sort on the score (the devkit's MATLAB sort), in image order then row order."""
    class_recs, npos = {}, 0
    for i, (boxes, cls, difficult, _) in enumerate(images):
        keep = [j for j in range(len(cls)) if cls[j] == classname]
        class_recs[i] = {"bbox": np.array([boxes[j] for j in keep]).reshape(-1, 4),
                         "difficult": np.array([bool(difficult[j]) for j in keep]),
                         "det": [False] * len(keep)}
        npos += sum(not d for d in class_recs[i]["difficult"])
    dets = [(i, p) for i, (_, _, _, preds) in enumerate(images) for p in preds if p[5] == classname]
    dets = sorted(dets, key=lambda d: -d[1][4])  # stable
    nd = len(dets)
    tp, fp = np.zeros(nd), np.zeros(nd)
    for d, (i, p) in enumerate(dets):
        r = class_recs[i]
        bb = np.asarray(p[:4], dtype=np.float64)
        ovmax, jmax = -np.inf, -1
        bbgt = r["bbox"]
        for j in range(len(bbgt)):
            iw = max(min(bbgt[j, 2], bb[2]) - max(bbgt[j, 0], bb[0]), 0.0)
            ih = max(min(bbgt[j, 3], bb[3]) - max(bbgt[j, 1], bb[1]), 0.0)
            inters = iw * ih
            uni = (bb[2] - bb[0]) * (bb[3] - bb[1]) + (bbgt[j, 2] - bbgt[j, 0]) * (bbgt[j, 3] - bbgt[j, 1]) - inters
            ov = inters / uni
            if ov > ovmax:  # the first gt on ties
                ovmax, jmax = ov, j
        if ovmax >= 0.5:
            if not r["difficult"][jmax]:
                if not r["det"][jmax]:
                    tp[d] = 1.0
                    r["det"][jmax] = True
                else:
                    fp[d] = 1.0
        else:
            fp[d] = 1.0
    fp, tp = np.cumsum(fp), np.cumsum(tp)
    rec = tp / float(npos)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return ref_voc_ap(rec, prec, use_07_metric)


# ----------------------------------------------------------------------------- random data
def random_boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    xy = rng.uniform(0, 400, (n, 2))
    return np.concatenate((xy, xy + rng.uniform(4, 120, (n, 2))), 1)


def random_voc_case(seed: int, n_images: int = 25):
    """Images of nc classes: class nc-1 only predicted; duplicate and integer (IoU exactly 0.5) detections, score
    ties, duplicated gts, ~25 % difficult gts, a class whose only gts are difficult (nc-2 in the first half)."""
    rng = np.random.default_rng(seed)
    nc = int(rng.integers(3, 6))
    images = []
    for n in range(n_images):
        m = int(rng.integers(0, 8))
        boxes, cls = random_boxes(rng, m), rng.integers(0, nc - 1, m)
        if m and rng.random() < 0.3:
            boxes, cls = np.concatenate((boxes, boxes[:1])), np.concatenate((cls, cls[:1]))
        difficult = rng.random(len(cls)) < 0.25
        difficult[cls == nc - 2] = True
        preds = []
        for box, c in zip(boxes, cls):
            if rng.random() < 0.2:
                continue
            for _ in range(int(rng.integers(1, 4))):
                b = box + rng.normal(0, 0.12, 4) * np.tile(box[2:] - box[:2], 2)
                b = np.rint(b) if rng.random() < 0.3 else b
                b[2:] = np.maximum(b[2:], b[:2] + 1)
                preds.append([*b, rng.random(), c if rng.random() < 0.9 else int(rng.integers(0, nc))])
        for box in random_boxes(rng, int(rng.integers(0, 4))):
            preds.append([*box, rng.random() * 0.7, int(rng.integers(0, nc))])
        for p in preds:
            if rng.random() < 0.3:
                p[4] = round(p[4] * 5) / 5  # score ties within and across images
        images.append((boxes, cls, difficult, preds))
    # exact-threshold cases: IoU 0.5 on a regular gt, on a difficult one; gt IoU ties
    images.append((np.array([[0, 0, 10, 10], [100, 100, 110, 110], [200, 0, 210, 10], [202, 0, 212, 10.0]]),
                   np.zeros(4, np.int64), np.array([False, True, False, False]),
                   [[0, 0, 10, 5, 0.9, 0], [100, 100, 110, 105, 0.8, 0], [201, 0, 211, 10, 0.7, 0],
                    [201, 0, 211, 10, 0.7, 0]]))
    return [f"c{i}" for i in range(nc)], images


def evaluate(names, images, voc=True, with_difficult=True) -> DetectMetrics:
    metrics = DetectMetrics(names, voc=voc)
    for i, (boxes, cls, difficult, preds) in enumerate(images):
        metrics.update(torch.tensor(preds, dtype=torch.float64).reshape(-1, 6), torch.tensor(boxes).reshape(-1, 4),
                       torch.tensor(cls), image_id=i, difficult=torch.tensor(difficult) if with_difficult else None)
    return metrics


@pytest.mark.parametrize("seed", range(6))
def test_voc_ap_equals_voc_eval(seed):
    names, images = random_voc_case(seed)
    metrics = evaluate(names, images)
    ap, ap07 = metrics.voc_ap50, metrics.voc07_ap50
    npos = np.zeros(len(names), int)
    for boxes, cls, difficult, _ in images:
        np.add.at(npos, cls[~difficult], 1)
    for k in range(len(names)):
        if npos[k] == 0:  # only predicted, or only difficult gts: no AP, left out of the mean
            assert np.isnan(ap[k]) and np.isnan(ap07[k])
            continue
        assert ap[k] == pytest.approx(ref_voc_eval(images, k, False), abs=1e-9)
        assert ap07[k] == pytest.approx(ref_voc_eval(images, k, True), abs=1e-9)
    assert np.isnan(ap[-1]) and np.isnan(ap[-2])  # class nc-1 never in the gts, nc-2 only difficult
    res = metrics.results()
    has = npos > 0
    assert res["metrics/VOC_AP50(B)"] == pytest.approx(ap[has].mean(), abs=1e-12)
    assert res["metrics/VOC07_AP50(B)"] == pytest.approx(ap07[has].mean(), abs=1e-12)
    assert 0.1 < res["metrics/VOC_AP50(B)"] < 0.95  # not degenerate


def test_voc_ap_without_difficult_and_large_images():
    """No difficult flags at all, and an image with 150 detections of one class, many of one score: VOC counts
    every detection (COCO keeps 100 per image and class) and ties keep the row order (a stable sort)."""
    names, images = random_voc_case(11)
    rng = np.random.default_rng(0)
    images = [(b, c, np.zeros(len(c), bool), p) for b, c, _, p in images]
    box = np.array([50, 50, 150, 120.0])
    many = [[*(box + rng.normal(0, 4, 4)), round(rng.random(), 1), 0] for _ in range(150)]  # score ties
    images[0] = (np.concatenate((images[0][0].reshape(-1, 4), box[None])), np.append(images[0][1], 0),
                 np.append(images[0][2], False), images[0][3] + many)
    metrics = evaluate(names, images, with_difficult=False)
    for k in range(len(names) - 1):
        if (np.concatenate([c for _, c, _, _ in images]) == k).any():
            assert metrics.voc_ap50[k] == pytest.approx(ref_voc_eval(images, k, False), abs=1e-9)
            assert metrics.voc07_ap50[k] == pytest.approx(ref_voc_eval(images, k, True), abs=1e-9)


def test_difficult_hand_made():
    """A detection on a difficult gt is neither TP nor FP, a difficult gt is not a positive; a second detection
    on a taken gt is FP even when a free gt of lower IoU is next to it (VOC looks only at the best gt)."""
    gt = torch.tensor([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10], [41, 0, 51, 10.0]])
    difficult = torch.tensor([False, True, False, False])
    pred = torch.tensor([[0, 0, 10, 10, 0.9, 0],  # TP on gt 0
                         [20, 0, 30, 10, 0.8, 0],  # on the difficult gt: ignored
                         [20, 0, 30, 10, 0.75, 0],  # again on the difficult gt: ignored, not FP
                         [41, 0, 51, 10, 0.7, 0],  # TP on gt 3
                         [41, 0, 51, 10, 0.6, 0],  # best gt 3 is taken: FP (gt 2, IoU 9/11, is not tried)
                         [300, 300, 310, 310, 0.5, 0]])  # FP
    metrics = DetectMetrics(["a"], voc=True)
    metrics.update(pred, gt, torch.zeros(4), image_id=0, difficult=difficult)
    # ranked: TP, -, -, TP, FP, FP; npos 3 -> rec 1/3, 1/3, 1/3, 2/3, 2/3, 2/3; prec 1, 1, 1, 1, 2/3, 1/2
    assert metrics.voc_ap50[0] == pytest.approx(2 / 3)
    assert metrics.voc07_ap50[0] == pytest.approx(7 / 11)  # recall 0 .. 0.6 at precision 1, 0.7 .. 1 none
    assert metrics.n_positives[0] == 3 and metrics.instances[0] == 4 and metrics.instances_difficult[0] == 1
    # COCO (pycocotools' non-crowd ignore, one-to-one): at IoU 0.5 the first detection on the difficult gt is
    # ignored, the second finds it taken and is FP; the one VOC calls FP takes gt 2 (IoU 9/11): TP, -, FP, TP, TP, FP
    recall = np.linspace(0, 1, 101)
    assert metrics.ap50[0] == pytest.approx(np.where(recall <= 1 / 3 + 1e-12, 1.0, 0.75).mean(), abs=1e-12)
    # VOC: the same image without the difficult gt and the two detections on it gives the same AP
    plain = DetectMetrics(["a"], voc=True)
    plain.update(pred[[0, 3, 4, 5]], gt[[0, 2, 3]], torch.zeros(3), image_id=0)
    assert plain.voc_ap50[0] == metrics.voc_ap50[0] and plain.voc07_ap50[0] == metrics.voc07_ap50[0]
    # confusion matrix (one-to-one, highest IoU first): pairs d0-g0, d1-g1 (difficult: not counted), d3-g3,
    # d4-g2; d2 and d5 are left over (background column); no gt is missed, the difficult one would not count
    np.testing.assert_array_equal(metrics.matrix, [[3, 2], [0, 0]])


def test_only_difficult_and_nothing_seen():
    metrics = DetectMetrics(["a", "b"], voc=True)
    metrics.update(torch.tensor([[0, 0, 10, 10, 0.9, 0.0]]), torch.tensor([[0, 0, 10, 10.0]]), torch.tensor([0]),
                   difficult=[True])
    res = metrics.results()
    assert res["metrics/VOC_AP50(B)"] == 0.0 and res["metrics/mAP50(B)"] == 0.0  # no class has ground truth
    assert np.isnan(metrics.voc_ap50).all() and np.isnan(metrics.ap50).all()
    empty = DetectMetrics(["a"], voc=True).results()
    assert empty["metrics/VOC_AP50(B)"] == 0.0 and empty["metrics/VOC07_AP50(B)"] == 0.0
    detections_only = DetectMetrics(["a"], voc=True)
    detections_only.update(torch.zeros(0, 6), torch.tensor([[0, 0, 10, 10.0]]), torch.tensor([0]))
    assert detections_only.voc_ap50[0] == 0.0 and detections_only.voc07_ap50[0] == 0.0


def test_api_keys_table_and_errors():
    names, images = random_voc_case(3, n_images=6)
    coco_only, voc = evaluate(names, images, voc=False), evaluate(names, images)
    assert set(coco_only.results()) == {"metrics/precision(B)", "metrics/recall(B)", "metrics/mAP50(B)",
                                        "metrics/mAP50-95(B)"}
    assert list(voc.results())[4:] == ["metrics/VOC_AP50(B)", "metrics/VOC07_AP50(B)"]
    assert {k: v for k, v in voc.results().items() if "VOC" not in k} == coco_only.results()
    assert coco_only._voc_stats == [] and "voc_ap50" not in coco_only._compute()
    lines = voc.summary_lines()
    assert lines[0].split() == ["Class", "Images", "Instances", "P", "R", "mAP50", "mAP50-95", "VOC-AP50", "VOC07-AP50"]
    assert all(len(line.split()) == 9 for line in lines)
    assert float(lines[1].split()[7]) == pytest.approx(voc.results()["metrics/VOC_AP50(B)"], abs=1e-3)
    assert len(coco_only.summary_lines()[0].split()) == 7
    rows = voc.per_class_rows()
    assert rows[0]["voc_ap50"] == voc.voc_ap50[0] or np.isnan(rows[0]["voc_ap50"])
    with pytest.raises(ValueError, match="3 difficult flags for 1 gt boxes"):
        voc.update(torch.zeros(0, 6), torch.tensor([[0, 0, 5, 5.0]]), torch.tensor([0]), difficult=[0, 1, 0])
    with pytest.raises(ValueError, match="voc=True"):
        DetectMetrics(["a"], iou_type="segm", voc=True)
    ann, _ = voc.coco_json()
    n_difficult = sum(int(d.sum()) for _, _, d, _ in images)
    assert sum(a.get("difficult", 0) for a in ann["annotations"]) == n_difficult > 0


# ----------------------------------------------------------------------------- COCO metrics with difficult
pycocotools = pytest.importorskip("pycocotools")
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402


class DifficultCOCOeval(COCOeval):
    """COCOeval whose annotations with ``"difficult": 1`` are ignored, non-crowd gts (``_prepare`` otherwise
    sets ``ignore = iscrowd``); everything else, IoU included, is pycocotools' own."""

    def _prepare(self):
        super()._prepare()
        for gts in self._gts.values():
            for gt in gts:
                gt["ignore"] = int(bool(gt["ignore"]) or bool(gt.get("difficult", 0)))


def run_cocoeval(annotations: dict, predictions: list, cls=COCOeval) -> COCOeval:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = copy.deepcopy(annotations)
        gt.createIndex()
        ev = cls(gt, gt.loadRes(copy.deepcopy(predictions)), "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    return ev


@pytest.mark.parametrize("seed", range(5))
def test_coco_with_difficult_equals_pycocotools_ignore(seed):
    names, images = random_voc_case(100 + seed)
    rng = np.random.default_rng(seed)
    boxes, cls, difficult, preds = images[0]
    crowd = [[*(np.array([10, 10, 60, 60.0]) + rng.normal(0, 3, 4)), float(rng.random()), 0] for _ in range(120)]
    images[0] = (np.concatenate((boxes.reshape(-1, 4), [[10, 10, 60, 60.0]] * 2)), np.append(cls, [0, 0]),
                 np.append(difficult, [True, False]), preds + crowd)  # > 100 detections; a difficult and a regular gt
    metrics = evaluate(names, images)
    annotations, predictions = metrics.coco_json()
    ev = run_cocoeval(annotations, predictions, DifficultCOCOeval)
    assert ev.stats[0] != pytest.approx(run_cocoeval(annotations, predictions).stats[0], abs=1e-4)  # flag matters
    res = metrics.results()
    assert res["metrics/mAP50-95(B)"] == pytest.approx(ev.stats[0], abs=1e-9)
    assert res["metrics/mAP50(B)"] == pytest.approx(ev.stats[1], abs=1e-9)
    np.testing.assert_allclose(metrics.precision, ev.eval["precision"][:, :, :, 0, 2], atol=1e-12)


def test_coco_unchanged_without_difficult():
    """No flags, all-False flags, and voc=True: the COCO numbers are those of pycocotools on the plain JSON."""
    names, images = random_voc_case(7)
    plain = evaluate(names, images, voc=False, with_difficult=False)
    annotations, predictions = plain.coco_json()
    assert not any("difficult" in a for a in annotations["annotations"])
    ev = run_cocoeval(annotations, predictions)
    assert plain.results()["metrics/mAP50-95(B)"] == pytest.approx(ev.stats[0], abs=1e-9)
    np.testing.assert_allclose(plain.precision, ev.eval["precision"][:, :, :, 0, 2], atol=1e-12)
    zeros = evaluate(names, [(b, c, np.zeros(len(c), bool), p) for b, c, _, p in images], voc=True)
    for key in ("precision", "ap_per_iou", "p_curve", "r_curve", "f1_curve", "p", "r", "map", "map50"):
        np.testing.assert_array_equal(zeros._compute()[key], plain._compute()[key])
    np.testing.assert_array_equal(zeros.matrix, plain.matrix)
