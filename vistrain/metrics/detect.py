"""Box detection metrics by the COCO definition: mAP50 and mAP50-95 equal to pycocotools' ``COCOeval``
(iouType 'bbox', area 'all', maxDets 100), plus P / R at the best mean-F1 confidence, a confusion
matrix with a background class, curves and COCO JSON export; on request (``voc=True``) also Pascal VOC
AP50, all-point (VOC2010+) and 11-point (VOC2007), by the VOC devkit's own matching.

Conventions:

- Boxes are ``(x1, y1, x2, y2)`` in original image pixels. They are turned into COCO ``[x, y, w, h]``
  in float64 exactly as ``coco_predictions`` writes them, and IoU is pycocotools' (no +1 pixel), so
  the numbers here and those of ``COCOeval`` on the written JSON agree to rounding error.
- COCO category id = class index + ``CATEGORY_ID_OFFSET`` (1), everywhere (JSON files and tests).
- Nothing is crowd. Boxes with ``x2 < x1`` or ``y2 < y1`` get width / height 0.
- ``difficult`` ground truth (``update(..., difficult=)``, Pascal VOC's flag) is excluded from scoring:
  for the COCO metrics it is what pycocotools calls an ignored (``_ignore``), non-crowd gt: it is not
  counted in the positives, a detection may match it only when no regular gt is left for it at that IoU
  threshold, and a detection matched to it counts neither as TP nor FP; like any non-crowd gt it takes
  one detection, so a second one on it is FP (what ``COCOeval`` does with an ignored, non-crowd gt;
  tests/test_metrics_voc.py checks it against ``COCOeval`` with those gts set ``ignore``). For VOC AP it
  is what the devkit does with ``difficult``: not counted in ``npos``, and every detection whose best gt
  it is, however many, is ignored.
  Without ``difficult`` every number is bit-identical to what it was before the flag existed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # as pycocotools (linspace, not arange)
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)
MAX_DETS = 100  # per image and category, as COCOeval's maxDets[-1]
CONF_GRID = np.linspace(0.0, 1.0, 1000)  # confidences of the P / R / F1 curves
CATEGORY_ID_OFFSET = 1
_CHUNK_ELEMENTS = 1 << 21  # images are matched in chunks of at most this many det x gt pairs
_CHUNK_IMAGES = 512
VOC_IOU = 0.5
VOC07_RECALLS = np.arange(0.0, 1.1, 0.1)  # as voc_eval's use_07_metric loop (0.30000000000000004, ...)
LOGGER = logging.getLogger("vistrain")


def _as_array(x: Any, cols: int) -> np.ndarray:
    """Tensor / array / list of shape ``[N, cols]`` (``[N]`` when ``cols`` is 1, anything empty)
    -> ``np.ndarray[N, cols]`` float64 on the CPU."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0 or cols == 1:
        return x.reshape(-1, cols)
    if x.ndim != 2 or x.shape[1] != cols:
        raise ValueError(f"expected an array of shape [N, {cols}], got {list(x.shape)}")
    return x


def _as_classes(x: Any) -> np.ndarray:
    return np.rint(_as_array(x, 1)[:, 0]).astype(np.int64)


def _as_flags(x: Any, n: int) -> np.ndarray:
    """``None`` or a bool / 0-1 array of ``n`` flags -> ``ndarray[n]`` bool."""
    if x is None:
        return np.zeros(n, bool)
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x).reshape(-1)
    if len(x) != n:
        raise ValueError(f"{len(x)} difficult flags for {n} gt boxes")
    return x.astype(bool)


def xyxy_to_coco(boxes: np.ndarray) -> np.ndarray:
    """``boxes (ndarray[N, 4])`` x1, y1, x2, y2 -> COCO ``[x, y, w, h]`` float64, w and h clipped at 0."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate((boxes[:, :2], np.maximum(boxes[:, 2:] - boxes[:, :2], 0.0)), 1)


def coco_iou(dt: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """IoU of COCO boxes as pycocotools' ``maskUtils.iou`` (iscrowd 0) computes it, in float64.

    ``dt (ndarray[..., D, 4])``, ``gt (ndarray[..., G, 4])`` in ``[x, y, w, h]`` -> ``ndarray[..., D, G]``.
    """
    d, g = dt[..., :, None, :], gt[..., None, :, :]
    iw = np.minimum(d[..., 2] + d[..., 0], g[..., 2] + g[..., 0]) - np.maximum(d[..., 0], g[..., 0])
    ih = np.minimum(d[..., 3] + d[..., 1], g[..., 3] + g[..., 1]) - np.maximum(d[..., 1], g[..., 1])
    overlap = (iw > 0) & (ih > 0)
    inter = np.where(overlap, iw * ih, 0.0)
    union = d[..., 2] * d[..., 3] + g[..., 2] * g[..., 3] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(overlap, inter / union, 0.0)


def _top_per_class(scores: np.ndarray, classes: np.ndarray, k: int = MAX_DETS) -> np.ndarray:
    """Indices of detections sorted by score (stable, as COCOeval's mergesort), keeping the first ``k``
    of each class. ``scores, classes (ndarray[N])`` -> ``ndarray[K]``."""
    order = np.argsort(-scores, kind="stable")
    if len(order) <= k:
        return order
    c = classes[order]
    by_class = np.argsort(c, kind="stable")
    start = np.searchsorted(c[by_class], c[by_class], side="left")
    rank = np.empty(len(c), np.int64)
    rank[by_class] = np.arange(len(c)) - start
    return order[rank < k]


def _last_best(cand: np.ndarray, thr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``cand (ndarray[..., T, G])`` -> (last index of the maximum over G, whether that maximum >= ``thr``)."""
    best = cand.shape[-1] - 1 - cand[..., ::-1].argmax(-1)
    return best, np.take_along_axis(cand, best[..., None], -1)[..., 0] >= thr


def _greedy_coco(iou: np.ndarray, n_dets: np.ndarray,
                 gt_ignore: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """COCOeval.evaluateImg's matching, for a batch of images at every IoU threshold at once.

    ``iou (ndarray[B, D, G])``: detections of each image in score order, IoU -1 for a pair of
    different classes or a padding gt; ``n_dets (ndarray[B])`` real detections per image, images
    sorted by ``n_dets`` descending. Each detection takes the unmatched gt of highest IoU that is
    >= the threshold, the last such gt on ties (pycocotools' ``iou < best: continue`` rule).
    ``gt_ignore (ndarray[B, G])`` bool, optional: ignored (non-crowd) gts, which pycocotools sorts
    last and reaches only when no regular gt was matched (``if m > -1 and gtIg[m] == 0 and gtIg[gind]
    == 1: break``); a detection matched to one is ignored (``dtIgnore``).
    Returns ``(tp, ignored)``, each ``ndarray[B, D, T]`` bool (``ignored`` None without ``gt_ignore``);
    ``tp`` excludes the ignored detections.
    """
    b_all, d_all, g_all = iou.shape
    thr = np.minimum(IOU_THRESHOLDS, 1 - 1e-10)
    tp = np.zeros((b_all, d_all, len(thr)), bool)
    ignored = None if gt_ignore is None else np.zeros_like(tp)
    if g_all == 0:
        return tp, ignored
    taken = np.zeros((b_all, len(thr), g_all), bool)
    for r in range(d_all):
        nb = int(np.count_nonzero(n_dets > r))  # images are sorted, so these are the first nb
        cand = np.where(taken[:nb], -np.inf, iou[:nb, r, None, :])  # [nb, T, G]
        if gt_ignore is None:
            best, hit = _last_best(cand, thr)
            tp[:nb, r] = hit
        else:
            ig = gt_ignore[:nb, None, :]
            best, hit = _last_best(np.where(ig, -np.inf, cand), thr)  # regular gts first
            best_ig, hit_ig = _last_best(np.where(ig, cand, -np.inf), thr)
            tp[:nb, r] = hit
            ignored[:nb, r] = on_ig = hit_ig & ~hit
            best = np.where(hit, best, best_ig)
            hit = hit | on_ig
        b, t = np.nonzero(hit)
        taken[b, t, best[b, t]] = True
    return tp, ignored


def _greedy_pairs(iou: np.ndarray, min_iou: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one matching by highest IoU first (ties: lowest det, then gt index) over a batch.

    ``iou (ndarray[B, D, G])`` with -1 for pairs that may not match -> ``(b, d, g)`` index arrays.
    """
    bsz, dn, gn = iou.shape
    cand = np.where(iou >= min_iou, iou, -1.0).reshape(bsz, dn * gn)
    rows = np.nonzero((cand >= 0).any(1))[0]
    out_b, out_d, out_g = [], [], []
    while len(rows):
        k = cand[rows].argmax(1)
        found = cand[rows, k] >= 0
        rows, k = rows[found], k[found]
        if not len(rows):
            break
        d, g = np.divmod(k, gn)
        out_b.append(rows), out_d.append(d), out_g.append(g)
        view = cand.reshape(bsz, dn, gn)
        view[rows, d, :] = -1.0
        view[rows, :, g] = -1.0
    if not out_b:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(out_b), np.concatenate(out_d), np.concatenate(out_g)


def _smooth(y: np.ndarray, half: int = 50) -> np.ndarray:
    """Moving average of width ``2 * half + 1`` with the ends repeated (a 101-point box filter)."""
    padded = np.concatenate((np.full(half, y[0]), y, np.full(half, y[-1])))
    return np.convolve(padded, np.ones(2 * half + 1) / (2 * half + 1), mode="valid")


def _coco_precision(tp: np.ndarray, n_gt: int, ignored: np.ndarray | None = None) -> np.ndarray:
    """COCOeval.accumulate for one category: ``tp (ndarray[N, T])`` of all its detections in score
    order (and which of them are ignored, ``ignored (ndarray[N, T])``: neither TP nor FP, their rows kept
    as pycocotools keeps them) -> interpolated precision ``ndarray[T, R]`` at ``RECALL_THRESHOLDS``."""
    tps = np.cumsum(tp, 0).T.astype(float)
    fps = np.cumsum(~tp if ignored is None else ~tp & ~ignored, 0).T.astype(float)
    rc = tps / n_gt
    pr = tps / (fps + tps + np.spacing(1))
    pr = np.flip(np.maximum.accumulate(np.flip(pr, 1), 1), 1)  # precision made monotone
    q = np.zeros((tp.shape[1], len(RECALL_THRESHOLDS)))
    for t in range(tp.shape[1]):
        inds = np.searchsorted(rc[t], RECALL_THRESHOLDS, side="left")
        ok = inds < len(tp)
        q[t, ok] = pr[t, inds[ok]]
    return q


def _pr_curves(tp50: np.ndarray, scores: np.ndarray, n_gt: int) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall at IoU 0.5 against confidence: ``tp50, scores (ndarray[N])`` in score order
    -> ``(p, r)``, each ``ndarray[len(CONF_GRID)]``. Above the highest score P = 1 and R = 0."""
    if len(scores) == 0:
        return np.zeros_like(CONF_GRID), np.zeros_like(CONF_GRID)
    tpc = np.cumsum(tp50)
    fpc = np.cumsum(~tp50)
    p = np.interp(-CONF_GRID, -scores, tpc / (tpc + fpc), left=1.0)
    r = np.interp(-CONF_GRID, -scores, tpc / n_gt, left=0.0)
    return p, r


def voc_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of ``a (ndarray[N, 4])`` and ``b (ndarray[M, 4])`` x1, y1, x2, y2 -> ``ndarray[N, M]``, as
    ``voc_eval`` computes it but continuous (no +1 pixel): boxes are pixel-edge coordinates. Widths and
    heights are clipped at 0; a pair of union 0 has IoU 0."""
    a, b = a[:, None, :], b[None, :, :]
    iw = np.maximum(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0.0)
    ih = np.maximum(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0.0)
    inters = iw * ih
    uni = (np.maximum(a[..., 2] - a[..., 0], 0.0) * np.maximum(a[..., 3] - a[..., 1], 0.0)
           + np.maximum(b[..., 2] - b[..., 0], 0.0) * np.maximum(b[..., 3] - b[..., 1], 0.0) - inters)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(uni > 0, inters / uni, 0.0)


def _voc_match(pred: np.ndarray, boxes: np.ndarray, cls: np.ndarray,
               difficult: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The VOC devkit's matching in one image, all detections (no per-image limit), in the order given.

    In score order (stable: ties keep their order), each detection looks at the gt of its class with the
    highest IoU (the first on ties, taken or not); IoU >= ``VOC_IOU`` and that gt not difficult: TP if the
    gt was not taken yet by a higher-scored detection, else FP; IoU >= ``VOC_IOU`` on a difficult gt:
    neither; otherwise FP. Since the gt a detection looks at does not depend on what is taken, "taken" is
    "an earlier detection looked at it". Returns ``(tp, fp)``, each ``ndarray[N]`` bool.
    """
    n = len(pred)
    tp = np.zeros(n, bool)
    if not n or not len(boxes):
        return tp, np.ones(n, bool)
    pcls = np.rint(pred[:, 5]).astype(np.int64)
    iou = np.where(pcls[:, None] == cls[None, :], voc_iou(pred[:, :4], boxes), -np.inf)
    jmax = iou.argmax(1)
    hit = iou[np.arange(n), jmax] >= VOC_IOU
    on_difficult = hit & difficult[jmax]
    order = np.argsort(-pred[:, 4], kind="stable")
    order = order[(hit & ~on_difficult)[order]]
    _, first = np.unique(jmax[order], return_index=True)
    tp[order[first]] = True
    return tp, ~tp & ~on_difficult


def voc_ap(rec: np.ndarray, prec: np.ndarray, use_07_metric: bool = False) -> float:
    """``voc_eval.voc_ap``: AP from recall and precision (``ndarray[N]``, score order). All-point
    (VOC2010+): the area under the precision envelope at every recall change; 11-point (VOC2007): the
    mean over recall 0, 0.1, ..., 1 of the highest precision at a recall >= it (0 where none)."""
    if use_07_metric:
        ap = 0.0
        for t in VOC07_RECALLS:
            p = np.max(prec[rec >= t]) if np.sum(rec >= t) else 0.0
            ap = ap + p / 11.0
        return float(ap)
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    mpre = np.flip(np.maximum.accumulate(np.flip(mpre)))
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


class DetectMetrics:
    """Accumulates detections and ground truth image by image; computes COCO mAP on demand.

    ``update(pred (Tensor[N, 6]) x1, y1, x2, y2, score, class; gt_boxes (Tensor[M, 4]) x1, y1, x2, y2;
    gt_cls (Tensor[M]))``, all in original image pixels. Then ``results()``, ``fitness()``,
    ``summary_lines()``, ``plot(save_dir)``, ``coco_json()``.

    mAP50 / mAP50-95 follow ``COCOeval`` exactly (see the module docstring); classes without ground
    truth are left out of the means (pycocotools' -1). When no class has ground truth, every metric is 0.

    P and R are those YOLOv5 / ultralytics report: per class, precision and recall at IoU 0.5 (COCO's
    matching above) against confidence on ``CONF_GRID`` (1000 points); the mean F1 over classes with
    ground truth is smoothed by a 101-point box filter, and P / R are read at its argmax, one confidence
    for all classes. A class with ground truth but no detections has P = R = 0.

    Per class (``ndarray[nc]``, NaN for a class without ground truth): ``ap50``, ``ap`` (50-95),
    ``p``, ``r``, ``f1``; ``ap_per_iou (ndarray[nc, 10])``, ``precision (ndarray[10, 101, nc])`` as
    ``COCOeval.eval['precision'][..., 0, 2]`` (-1 where no ground truth); ``instances`` and
    ``images_per_class (ndarray[nc] int)``.

    ``matrix (ndarray[nc + 1, nc + 1] int)``: rows = predicted class, columns = true class (as
    ``ClassifyMetrics`` and ultralytics), index ``nc`` = background. Detections with score >=
    ``matrix_conf`` are matched one-to-one to ground truth of any class at IoU >= ``matrix_iou``,
    highest IoU first: a pair adds to ``[pred, true]``, a missed gt to ``[nc, true]`` (background
    row), an unmatched detection to ``[pred, nc]`` (background column). A pair with a difficult gt and a
    difficult gt left over add nothing.

    ``difficult`` ground truth (``update(..., difficult=)``) is left out of the scoring as the module
    docstring says; ``instances`` and ``images_per_class`` still count it, ``instances_difficult
    (ndarray[nc] int)`` counts it alone, and "a class with ground truth" means one with a gt that is not
    difficult.

    With ``voc=True`` (boxes only): Pascal VOC AP at IoU 0.5 per class, ``voc_ap50`` all-point
    (``voc_eval(use_07_metric=False)``, VOC2010+) and ``voc07_ap50`` 11-point (VOC2007), ``ndarray[nc]``,
    NaN for a class without ground truth; their means over classes with ground truth are the results
    ``metrics/VOC_AP50(B)`` and ``metrics/VOC07_AP50(B)`` and two more columns of ``summary_lines``.
    VOC's rules, not COCO's: every detection counts (no 100 per image), all detections of a class are
    ranked by score over the dataset (ties: image order of ``update``, then row order), each looks only at
    its best-IoU gt of its class (taken or not; ``_voc_match``), IoU >= 0.5 as the VOC devkit's
    ``VOCevaldet.m`` (py-faster-rcnn's ``voc_eval.py`` has > 0.5), and IoU is continuous (``voc_iou``),
    not voc_eval's +1 pixel, since boxes here are pixel-edge coordinates (as torchvision's and effdet's
    VOC evaluators).
    """

    def __init__(self, names: Sequence[str] | dict[int, str], matrix_conf: float = 0.25, matrix_iou: float = 0.45,
                 iou_type: str = "bbox", voc: bool = False):
        if iou_type not in ("bbox", "segm"):
            raise ValueError(f"iou_type={iou_type!r}: 'bbox' or 'segm'")
        if voc and iou_type != "bbox":
            raise ValueError("voc=True: Pascal VOC AP is for boxes (iou_type 'bbox')")
        self.voc = bool(voc)
        self.names = [names[k] for k in sorted(names)] if isinstance(names, dict) else list(names)
        self.nc = len(self.names)
        self.matrix_conf, self.matrix_iou = matrix_conf, matrix_iou
        self.iou_type = iou_type
        self.suffix = "(B)" if iou_type == "bbox" else "(M)"
        self.reset()

    def reset(self) -> None:
        nc = self.nc
        self.images: list[dict[str, Any]] = []  # id, file_name, width, height (for COCO JSON)
        self.gts: list[tuple[np.ndarray, np.ndarray]] = []  # per image (boxes [M, 4] xyxy, cls [M])
        self.preds: list[np.ndarray] = []  # per image [N, 6], as given
        self.pred_rles: list[list[dict]] = []  # segm: per image the RLE of each prediction
        self.gt_rles: list[list[dict]] = []  # segm: per image the RLE of each ground-truth instance
        self.difficult: list[np.ndarray] = []  # per image [M] bool
        self.instances = np.zeros(nc, np.int64)
        self.instances_difficult = np.zeros(nc, np.int64)
        self.images_per_class = np.zeros(nc, np.int64)
        self._ids: set = set()
        self._pending: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []
        self._pending_pairs = 0
        self._stats: list[tuple[np.ndarray, ...]] = []  # per chunk: score, cls, tp [n, T], image, rank, ignored [n, T]
        self._voc_stats: list[tuple[np.ndarray, ...]] = []  # per image: score, cls, tp, fp, image index, row
        self._matrix = np.zeros((nc + 1, nc + 1), np.int64)
        self._result: dict[str, np.ndarray] | None = None

    # --- accumulation -------------------------------------------------------------------------
    def update(self, pred: torch.Tensor, gt_boxes: torch.Tensor, gt_cls: torch.Tensor, image_id: Any = None,
               image_size: tuple[int, int] | None = None, file_name: str | None = None,
               pred_masks: Any = None, gt_masks: Any = None, difficult: Any = None) -> None:
        """Add one image: ``pred (Tensor[N, 6])``, ``gt_boxes (Tensor[M, 4])``, ``gt_cls (Tensor[M])``;
        ``difficult (Tensor / ndarray / list [M] bool)``, optional: gts left out of the scoring (VOC).

        ``image_id`` defaults to the running image count; a string of digits becomes an int (as COCO
        ids); an id seen before gets a ``_2``, ``_3`` suffix and a warning. ``image_size`` is
        ``(width, height)`` and, like ``file_name``, only goes into the COCO JSON.
        With ``iou_type="segm"``: ``pred_masks`` and ``gt_masks``, one per row of ``pred`` / ``gt_boxes``, as
        bool ``Tensor[N, H, W]`` at the original image size or lists of COCO RLEs; IoU is then pycocotools'
        mask IoU (``maskUtils.iou``) of those RLEs.
        """
        try:
            pred, boxes, cls = _as_array(pred, 6), _as_array(gt_boxes, 4), _as_classes(gt_cls)
        except ValueError as e:
            raise ValueError(f"image {image_id} ({file_name}): {e}") from None
        if self.iou_type == "segm":
            if pred_masks is None or gt_masks is None:
                raise ValueError(f"image {image_id}: iou_type 'segm' needs pred_masks and gt_masks")
            pred_rles, gt_rles = to_rles(pred_masks), to_rles(gt_masks)
            if len(pred_rles) != len(pred) or len(gt_rles) != len(boxes):
                raise ValueError(f"image {image_id}: {len(pred_rles)} masks for {len(pred)} predictions, "
                                 f"{len(gt_rles)} for {len(boxes)} ground-truth instances")
        pcls = np.rint(pred[:, 5]).astype(np.int64)
        if len(boxes) != len(cls):
            raise ValueError(f"image {image_id}: {len(boxes)} gt boxes but {len(cls)} gt classes")
        try:
            diff = _as_flags(difficult, len(cls))
        except ValueError as e:
            raise ValueError(f"image {image_id} ({file_name}): {e}") from None
        for what, c in (("gt", cls), ("predicted", pcls)):
            if len(c) and (c.min() < 0 or c.max() >= self.nc):
                raise ValueError(f"image {image_id}: {what} class {int(c[(c < 0) | (c >= self.nc)][0])} "
                                 f"outside 0..{self.nc - 1} ({self.nc} names)")
        image = {"id": self._unique_id(image_id), "file_name": file_name or ""}
        if image_size is not None:
            image["width"], image["height"] = int(image_size[0]), int(image_size[1])
        index = len(self.images)
        self.images.append(image)
        self.gts.append((boxes, cls))
        self.preds.append(pred)
        if self.iou_type == "segm":
            self.pred_rles.append(pred_rles)
            self.gt_rles.append(gt_rles)
        self.difficult.append(diff)
        self.instances += np.bincount(cls, minlength=self.nc)
        self.instances_difficult += np.bincount(cls[diff], minlength=self.nc)
        self.images_per_class[np.unique(cls)] += 1
        if self.voc:
            tp, fp = _voc_match(pred, boxes, cls, diff)
            self._voc_stats.append((pred[:, 4], pcls, tp, fp, np.full(len(pred), index), np.arange(len(pred))))
        keep = _top_per_class(pred[:, 4], pcls)
        pairs = len(keep) * len(boxes)
        if self._pending and self._pending_pairs + pairs > _CHUNK_ELEMENTS:
            self._flush()
        self._pending.append((index, pred[keep], boxes, cls, keep, diff))
        self._pending_pairs += pairs
        if len(self._pending) >= _CHUNK_IMAGES:
            self._flush()
        self._result = None

    def _unique_id(self, image_id: Any) -> Any:
        if image_id is None:
            image_id = len(self.images)
        image_id = image_id.item() if hasattr(image_id, "item") else image_id
        if isinstance(image_id, str) and image_id.isdigit():
            image_id = int(image_id)
        new, n = image_id, 1
        while new in self._ids:
            n += 1
            new = f"{image_id}_{n}"
        if n > 1:
            LOGGER.warning(f"DetectMetrics: image id {image_id!r} seen before, using {new!r}")
        self._ids.add(new)
        return new

    def _flush(self) -> None:
        """Match the pending images as one padded batch (images sorted by detection count)."""
        if not self._pending:
            return
        items = sorted(self._pending, key=lambda it: -len(it[1]))
        self._pending, self._pending_pairs = [], 0
        bsz, dn, gn = len(items), max(len(it[1]) for it in items), max(len(it[2]) for it in items)
        det = np.zeros((bsz, dn, 6))
        gt = np.zeros((bsz, gn, 4))
        gcls = np.full((bsz, gn), -1, np.int64)
        gdiff = np.zeros((bsz, gn), bool)
        n_dets = np.array([len(it[1]) for it in items])
        for b, (_, p, boxes, cls, _, diff) in enumerate(items):
            det[b, : len(p)], gt[b, : len(boxes)], gcls[b, : len(cls)], gdiff[b, : len(diff)] = p, boxes, cls, diff
        any_difficult = bool(gdiff.any())
        dcls = np.rint(det[..., 5]).astype(np.int64)
        dvalid = np.arange(dn) < n_dets[:, None]
        if self.iou_type == "bbox":
            iou = coco_iou(xyxy_to_coco(det[..., :4].reshape(-1, 4)).reshape(bsz, dn, 4),
                           xyxy_to_coco(gt.reshape(-1, 4)).reshape(bsz, gn, 4))
        else:
            iou = np.zeros((bsz, dn, gn))
            for b, (index, p, boxes, _, keep, _) in enumerate(items):
                iou[b, : len(p), : len(boxes)] = mask_iou([self.pred_rles[index][k] for k in keep], self.gt_rles[index])
        iou = np.where(dvalid[:, :, None] & (gcls[:, None, :] >= 0), iou, -1.0)
        tp, ignored = _greedy_coco(np.where(dcls[:, :, None] == gcls[:, None, :], iou, -1.0), n_dets,
                                   gdiff if any_difficult else None)
        image_index = np.array([it[0] for it in items])
        self._stats.append((det[..., 4][dvalid], dcls[dvalid], tp[dvalid],
                            np.broadcast_to(image_index[:, None], dvalid.shape)[dvalid],
                            np.broadcast_to(np.arange(dn), dvalid.shape)[dvalid],
                            ignored[dvalid] if any_difficult else np.zeros((int(dvalid.sum()), 0), bool)))
        self._update_matrix(np.where((det[..., 4] >= self.matrix_conf)[:, :, None], iou, -1.0),
                            dcls, gcls, dvalid & (det[..., 4] >= self.matrix_conf), gdiff)

    def _update_matrix(self, iou: np.ndarray, dcls: np.ndarray, gcls: np.ndarray, dconf: np.ndarray,
                       gdiff: np.ndarray) -> None:
        """``iou (ndarray[B, D, G])`` class-agnostic, -1 for padding and low-score detections; pairs with a
        difficult gt (``gdiff (ndarray[B, G])``) and difficult gts left over are not counted."""
        b, d, g = _greedy_pairs(iou, self.matrix_iou)
        scored = ~gdiff[b, g]
        np.add.at(self._matrix, (dcls[b, d][scored], gcls[b, g][scored]), 1)
        gt_left = (gcls >= 0) & ~gdiff
        gt_left[b, g] = False
        np.add.at(self._matrix, (self.nc, gcls[gt_left]), 1)
        det_left = dconf.copy()
        det_left[b, d] = False
        np.add.at(self._matrix, (dcls[det_left], self.nc), 1)

    # --- results ------------------------------------------------------------------------------
    def _sorted_stats(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """All detections as COCOeval.accumulate orders them: by class, score descending, then image
        (sorted image ids, as ``COCOeval.params.imgIds``), then rank in the image. Returns ``(score, cls,
        tp, ignored)``, ``ignored`` None when no gt was difficult."""
        self._flush()
        if not self._stats:
            return np.zeros(0), np.zeros(0, np.int64), np.zeros((0, len(IOU_THRESHOLDS)), bool), None
        score, cls, tp, image, rank = (np.concatenate(x) for x in list(zip(*self._stats))[:5])
        ignored = None
        if any(st[5].shape[1] for st in self._stats):
            ignored = np.concatenate([st[5] if st[5].shape[1] else np.zeros(st[2].shape, bool) for st in self._stats])
        ids = [im["id"] for im in self.images]
        try:
            order = sorted(range(len(ids)), key=ids.__getitem__)
        except TypeError:  # ids of mixed types: keep the order of arrival
            order = list(range(len(ids)))
        image_rank = np.empty(len(ids), np.int64)
        image_rank[order] = np.arange(len(ids))
        idx = np.lexsort((rank, image_rank[image], -score, cls))
        return score[idx], cls[idx], tp[idx], None if ignored is None else ignored[idx]

    @property
    def n_positives(self) -> np.ndarray:
        """Ground truth that is scored, per class: ``instances - instances_difficult``, ``ndarray[nc]``."""
        return self.instances - self.instances_difficult

    def _compute(self) -> dict[str, np.ndarray]:
        if self._result is not None:
            return self._result
        score, cls, tp, ignored = self._sorted_stats()
        nc, n_t = self.nc, len(IOU_THRESHOLDS)
        n_pos = self.n_positives
        precision = -np.ones((n_t, len(RECALL_THRESHOLDS), nc))
        p_curve, r_curve = np.zeros((nc, len(CONF_GRID))), np.zeros((nc, len(CONF_GRID)))
        bounds = np.searchsorted(cls, np.arange(nc + 1))
        for k in np.nonzero(n_pos)[0]:
            s = slice(bounds[k], bounds[k + 1])
            if ignored is None:
                precision[:, :, k] = _coco_precision(tp[s], int(n_pos[k]))
                p_curve[k], r_curve[k] = _pr_curves(tp[s, 0], score[s], int(n_pos[k]))
            else:
                precision[:, :, k] = _coco_precision(tp[s], int(n_pos[k]), ignored[s])
                scored = ~ignored[s, 0]
                p_curve[k], r_curve[k] = _pr_curves(tp[s, 0][scored], score[s][scored], int(n_pos[k]))
        has_gt = n_pos > 0
        f1_curve = 2 * p_curve * r_curve / (p_curve + r_curve + 1e-16)
        best = int(_smooth(f1_curve[has_gt].mean(0)).argmax()) if has_gt.any() else 0
        nan = np.full(nc, np.nan)
        ap_per_iou = np.where(has_gt[:, None], precision.mean(1).T, np.nan)
        res = {"precision": precision, "ap_per_iou": ap_per_iou, "ap50": ap_per_iou[:, 0],
               "ap": ap_per_iou.mean(1), "p": np.where(has_gt, p_curve[:, best], nan),
               "r": np.where(has_gt, r_curve[:, best], nan), "f1": np.where(has_gt, f1_curve[:, best], nan),
               "p_curve": p_curve, "r_curve": r_curve, "f1_curve": f1_curve, "best_conf": CONF_GRID[best],
               "map50": precision[0][:, has_gt].mean() if has_gt.any() else 0.0,  # pycocotools' s[s > -1].mean()
               "map": precision[:, :, has_gt].mean() if has_gt.any() else 0.0}
        if self.voc:
            res.update(self._compute_voc())
        self._result = res
        return res

    def _compute_voc(self) -> dict[str, Any]:
        """``voc_eval`` per class from the per-image matches: detections ranked by score over the dataset
        (ties: image, then row), TP / FP cumulated (ignored ones add to neither), recall = TP / npos,
        precision = TP / max(TP + FP, eps), then ``voc_ap`` all-point and 11-point."""
        nc, n_pos = self.nc, self.n_positives
        ap, ap07 = np.full(nc, np.nan), np.full(nc, np.nan)
        if self._voc_stats:
            score, cls, tp, fp, image, row = (np.concatenate(x) for x in zip(*self._voc_stats))
        else:
            score, cls, tp, fp, image, row = np.zeros(0), np.zeros(0, np.int64), *np.zeros((4, 0), np.int64)
        idx = np.lexsort((row, image, -score, cls))
        cls, tp, fp = cls[idx], tp[idx], fp[idx]
        bounds = np.searchsorted(cls, np.arange(nc + 1))
        for k in np.nonzero(n_pos > 0)[0]:
            s = slice(bounds[k], bounds[k + 1])
            tpc, fpc = np.cumsum(tp[s], dtype=np.float64), np.cumsum(fp[s], dtype=np.float64)
            rec = tpc / float(n_pos[k])
            prec = tpc / np.maximum(tpc + fpc, np.finfo(np.float64).eps)
            ap[k], ap07[k] = voc_ap(rec, prec, False), voc_ap(rec, prec, True)
        has_gt = n_pos > 0
        return {"voc_ap50": ap, "voc07_ap50": ap07,
                "voc_map50": float(ap[has_gt].mean()) if has_gt.any() else 0.0,
                "voc07_map50": float(ap07[has_gt].mean()) if has_gt.any() else 0.0}

    @property
    def matrix(self) -> np.ndarray:
        self._flush()
        return self._matrix

    ap50 = property(lambda self: self._compute()["ap50"], doc="AP at IoU 0.5 per class, ndarray[nc].")
    ap = property(lambda self: self._compute()["ap"], doc="AP at IoU 0.5:0.95 per class, ndarray[nc].")
    ap_per_iou = property(lambda self: self._compute()["ap_per_iou"], doc="AP per class and IoU, [nc, 10].")
    precision = property(lambda self: self._compute()["precision"], doc="COCO precision, [10, 101, nc].")
    p = property(lambda self: self._compute()["p"], doc="Precision per class at the best-F1 confidence.")
    r = property(lambda self: self._compute()["r"], doc="Recall per class at the best-F1 confidence.")
    f1 = property(lambda self: self._compute()["f1"], doc="F1 per class at the best-F1 confidence.")
    voc_ap50 = property(lambda self: self._compute()["voc_ap50"],
                        doc="Pascal VOC all-point AP at IoU 0.5 per class, ndarray[nc] (voc=True).")
    voc07_ap50 = property(lambda self: self._compute()["voc07_ap50"],
                          doc="Pascal VOC2007 11-point AP at IoU 0.5 per class, ndarray[nc] (voc=True).")

    def _mean(self, key: str) -> float:
        values = self._compute()[key]
        return float(np.nanmean(values)) if np.isfinite(values).any() else 0.0

    def results(self) -> dict[str, float]:
        res = self._compute()
        x = self.suffix
        out = {f"metrics/precision{x}": self._mean("p"), f"metrics/recall{x}": self._mean("r"),
               f"metrics/mAP50{x}": float(res["map50"]), f"metrics/mAP50-95{x}": float(res["map"])}
        if self.voc:
            out.update({f"metrics/VOC_AP50{x}": res["voc_map50"], f"metrics/VOC07_AP50{x}": res["voc07_map50"]})
        return out

    def fitness(self) -> float:
        """What "best" means for detection: 0.1 x mAP50 + 0.9 x mAP50-95."""
        res = self._compute()
        return float(0.1 * res["map50"] + 0.9 * res["map"])

    def per_class_rows(self) -> list[dict[str, Any]]:
        """One dict per class: name, images, instances, p, r, map50, map (NaN without ground truth); with
        ``voc=True`` also voc_ap50 and voc07_ap50."""
        res = self._compute()
        rows = [{"class": i, "name": name, "images": int(self.images_per_class[i]),
                 "instances": int(self.instances[i]), "p": float(res["p"][i]), "r": float(res["r"][i]),
                 "map50": float(res["ap50"][i]), "map": float(res["ap"][i])} for i, name in enumerate(self.names)]
        if self.voc:
            for row in rows:
                row.update(voc_ap50=float(res["voc_ap50"][row["class"]]),
                           voc07_ap50=float(res["voc07_ap50"][row["class"]]))
        return rows

    def summary_lines(self, per_class: bool = True) -> list[str]:
        """The validation table: header, the 'all' row, then one row per class with ground truth; with
        ``voc=True`` two more columns, VOC all-point and VOC2007 11-point AP50."""
        res = self.results()
        head = ["Class", "Images", "Instances", "P", "R", "mAP50", "mAP50-95"]
        head += ["VOC-AP50", "VOC07-AP50"] if self.voc else []
        fmt = "{:>22}{:>11}{:>11}" + "{:>11.3g}" * (len(head) - 3)
        keys = ["p", "r", "map50", "map"] + (["voc_ap50", "voc07_ap50"] if self.voc else [])
        lines = [("{:>22}" + "{:>11}" * (len(head) - 1)).format(*head),
                 fmt.format("all", len(self.images), int(self.instances.sum()), *res.values())]
        if per_class:
            lines += [fmt.format(row["name"][:22], row["images"], row["instances"], *(row[k] for k in keys))
                      for row in self.per_class_rows() if row["instances"]]
        return lines

    # --- plots and COCO JSON ------------------------------------------------------------------
    def plot(self, save_dir: str | Path) -> None:
        """``PR_curve.png``, ``F1_curve.png``, ``P_curve.png``, ``R_curve.png``, ``confusion_matrix.png``."""
        from vistrain.utils.plotting import plot_confusion_matrix

        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        res = self._compute()
        has_gt = self.instances > 0
        kind = "Mask" if self.iou_type == "segm" else "Box"
        pr = res["precision"][0].T  # [nc, 101] precision at IoU 0.5 against recall
        _plot_curves(RECALL_THRESHOLDS, pr, self.names, has_gt, "Recall", "Precision",
                     f"all classes {res['map50']:.3f} mAP@0.5", save_dir / "PR_curve.png", kind,
                     values=res["ap50"])
        for key, label, name in (("f1_curve", "F1", "F1_curve.png"), ("p_curve", "Precision", "P_curve.png"),
                                 ("r_curve", "Recall", "R_curve.png")):
            mean = res[key][has_gt].mean(0) if has_gt.any() else np.zeros_like(CONF_GRID)
            i = int(_smooth(mean).argmax())
            _plot_curves(CONF_GRID, res[key], self.names, has_gt, "Confidence", label,
                         f"all classes {mean[i]:.2f} at {CONF_GRID[i]:.3f}", save_dir / name, kind)
        plot_confusion_matrix(self.matrix, self.names + ["background"], save_dir / "confusion_matrix.png")

    def coco_json(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """``(annotations, predictions)``: COCO ground truth of every image seen and the detections."""
        segm = self.iou_type == "segm"
        annotations = coco_annotations(self.images, self.gts, self.names, self.gt_rles if segm else None,
                                       self.difficult)
        return annotations, coco_predictions(self.preds, [im["id"] for im in self.images],
                                             self.pred_rles if segm else None)


LEGEND_CLASSES = 20  # curves named in a legend; with more classes, the best by ``values`` (or the first)


def _plot_curves(x: np.ndarray, ys: np.ndarray, names: list[str], show: np.ndarray, xlabel: str, ylabel: str,
                 mean_label: str, path: Path, kind: str = "Box", values: np.ndarray | None = None) -> list[str]:
    """One thin line per class with ground truth (``ys (ndarray[nc, X])``), the mean thick; titled ``KIND
    YLABEL-XLABEL curve``.  With ``values`` (per-class AP) each legend entry reads ``name 0.712``; with more than
    ``LEGEND_CLASSES`` classes only the best ones are named.  Returns the legend entries."""
    from vistrain.utils.plotting import _plt

    plt = _plt()
    fig, ax = plt.subplots(1, 1, figsize=(9, 6), tight_layout=True)
    idx = np.nonzero(show)[0]
    order = idx[np.argsort(-np.nan_to_num(values[idx], nan=-1.0), kind="stable")] if values is not None else idx
    named = set(order[:LEGEND_CLASSES].tolist())
    labels = []
    for i in order:
        label = None
        if i in named:
            label = names[i] if values is None else f"{names[i]} {values[i]:.3f}"
            labels.append(label)
        ax.plot(x, ys[i], linewidth=1, label=label)
    mean = ys[show].mean(0) if show.any() else np.zeros_like(x)
    ax.plot(x, mean, linewidth=3, color="blue", label=mean_label)
    more = f" (top {LEGEND_CLASSES} of {len(idx)} classes named)" if len(idx) > LEGEND_CLASSES else ""
    ax.set(xlabel=xlabel, ylabel=ylabel, xlim=(0, 1), ylim=(0, 1.01), title=f"{kind} {ylabel}-{xlabel} curve{more}")
    ax.legend(bbox_to_anchor=(1.04, 1), loc="upper left", fontsize=8)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return labels + [mean_label]


def coco_annotations(images: Sequence[dict[str, Any]], gts: Sequence[tuple[Any, Any]],
                     names: Sequence[str], rles: Sequence[list[dict]] | None = None,
                     difficult: Sequence[Any] | None = None) -> dict[str, Any]:
    """COCO ground truth: ``images[i]`` a dict with ``id`` (and ``file_name``, ``width``, ``height``),
    ``gts[i] = (boxes (Tensor[M, 4]) x1, y1, x2, y2 pixels, cls (Tensor[M]))``. Annotation ids run from
    1, ``area = w * h``, ``iscrowd = 0``, category id = class index + ``CATEGORY_ID_OFFSET``.  With
    ``rles[i]`` (one COCO RLE per instance) each annotation gets that ``segmentation`` and its mask area.
    With ``difficult[i]`` (``[M]`` bool) a difficult gt gets ``"difficult": 1`` (the key is absent on the
    others). pycocotools does not read it (its ``_prepare`` overwrites ``ignore`` from ``iscrowd``), so
    ``COCOeval`` on such a file scores difficult objects as regular ones, unlike ``DetectMetrics``."""
    if len(images) != len(gts):
        raise ValueError(f"{len(images)} images but {len(gts)} ground-truth entries")
    anns: list[dict[str, Any]] = []
    for i, (image, (boxes, cls)) in enumerate(zip(images, gts)):
        flags = _as_flags(None if difficult is None else difficult[i], len(_as_classes(cls)))
        for j, (box, c) in enumerate(zip(xyxy_to_coco(_as_array(boxes, 4)).tolist(), _as_classes(cls).tolist())):
            ann = {"id": len(anns) + 1, "image_id": image["id"], "category_id": c + CATEGORY_ID_OFFSET,
                   "bbox": box, "area": box[2] * box[3], "iscrowd": 0}
            if flags[j]:
                ann["difficult"] = 1
            if rles is not None:
                ann.update(segmentation=_json_rle(rles[i][j]), area=rle_area(rles[i][j]))
            anns.append(ann)
    return {"info": {"description": "vistrain ground truth"}, "images": [dict(im) for im in images],
            "annotations": anns,
            "categories": [{"id": i + CATEGORY_ID_OFFSET, "name": n} for i, n in enumerate(names)]}


def coco_predictions(preds: Sequence[Any], image_ids: Sequence[Any],
                     rles: Sequence[list[dict]] | None = None) -> list[dict[str, Any]]:
    """COCO results: ``preds[i] (Tensor[N, 6])`` x1, y1, x2, y2, score, class (pixels) of image
    ``image_ids[i]`` -> ``[{image_id, category_id, bbox [x, y, w, h], score}]``, full float precision;
    with ``rles[i]`` (one COCO RLE per row) each also gets its ``segmentation``."""
    if len(preds) != len(image_ids):
        raise ValueError(f"{len(preds)} prediction entries but {len(image_ids)} image ids")
    out = []
    for i, (image_id, pred) in enumerate(zip(image_ids, preds)):
        pred = _as_array(pred, 6)
        for j, (box, score, c) in enumerate(zip(xyxy_to_coco(pred[:, :4]).tolist(), pred[:, 4].tolist(),
                                                _as_classes(pred[:, 5]).tolist())):
            row = {"image_id": image_id, "category_id": c + CATEGORY_ID_OFFSET, "bbox": box, "score": score}
            if rles is not None:
                row["segmentation"] = _json_rle(rles[i][j])
            out.append(row)
    return out


# ------------------------------------------------------------------------------------ masks (COCO RLE)
def to_rles(masks: Any) -> list[dict]:
    """Bool masks ``Tensor / ndarray[N, H, W]`` (or already a list of RLE dicts) -> COCO RLEs (pycocotools)."""
    from pycocotools import mask as mask_utils

    if isinstance(masks, (list, tuple)):
        return list(masks)
    if isinstance(masks, torch.Tensor):
        masks = masks.detach().cpu().numpy()
    masks = masks.view(np.uint8) if isinstance(masks, np.ndarray) and masks.dtype == bool else np.asarray(masks, np.uint8)
    if masks.ndim != 3:
        raise ValueError(f"masks must be [N, H, W], got shape {list(masks.shape)}")
    n, h, w = masks.shape
    if not n:
        return []
    # COCO's RLE runs down the columns; the columns left and right of a mask's first and last nonzero one are
    # one run of zeros each, so only the columns in between are scanned (pycocotools.mask.encode would scan
    # the whole image for every mask).  tests/test_metrics_detect.py compares with encode.
    cols = masks.any(axis=1)  # [n, w]
    first, end = cols.argmax(1), w - cols[:, ::-1].argmax(1)
    objs = []
    for k in range(n):
        c0, c1 = int(first[k]), int(end[k])
        if not cols[k, c0]:
            objs.append({"size": [h, w], "counts": [h * w]})
            continue
        flat = masks[k, :, c0:c1].T.ravel()
        change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        counts = np.diff(np.concatenate(([0], change, [flat.size]))).tolist()
        if flat[0]:  # the counts start with a run of zeros, here only those of the columns left of c0
            counts.insert(0, c0 * h)
        else:
            counts[0] += c0 * h
        if c1 < w:
            if flat[-1]:
                counts.append((w - c1) * h)
            else:
                counts[-1] += (w - c1) * h
        objs.append({"size": [h, w], "counts": counts})
    return mask_utils.frPyObjects(objs, h, w)


def mask_iou(dt: list[dict], gt: list[dict]) -> np.ndarray:
    """pycocotools' mask IoU (``iscrowd`` 0) of RLEs -> ``ndarray[D, G]``."""
    from pycocotools import mask as mask_utils

    if not dt or not gt:
        return np.zeros((len(dt), len(gt)))
    return np.asarray(mask_utils.iou(dt, gt, [0] * len(gt)), dtype=np.float64).reshape(len(dt), len(gt))


def rle_area(rle: dict) -> float:
    from pycocotools import mask as mask_utils

    return float(mask_utils.area(rle))


def _json_rle(rle: dict) -> dict:
    """An RLE as JSON can hold it (compressed counts as text, as COCO files store them)."""
    counts = rle["counts"]
    return {"size": [int(v) for v in rle["size"]], "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


def write_coco_json(metrics: DetectMetrics, save_dir: str | Path) -> tuple[Path, Path]:
    """Write ``annotations.json`` and ``predictions.json`` (COCO) of ``metrics`` into ``save_dir``."""
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    annotations, predictions = metrics.coco_json()
    paths = save_dir / "annotations.json", save_dir / "predictions.json"
    for path, obj in zip(paths, (annotations, predictions)):
        path.write_text(json.dumps(obj))
    return paths
