"""Autoanchor: how well a set of anchors fits the label sizes, and new anchors by k-means plus
genetic evolution when it fits badly (the YOLOv5 v7.0 procedure).

A label fits an anchor when both its width and height ratios ``r`` to the anchor satisfy
``max(r, 1/r) < thr`` (the loss's ``anchor_t``). Sizes here are in pixels at the training image
size: ``wh (ndarray or Tensor[N, 2])``, ``anchors_px (Tensor[K, 2])``. Pure numpy inside; no scipy.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

BPR_OK = 0.98  # best possible recall above which the anchors are kept as they are
MIN_BOX_PX = 2.0  # boxes with both sides below this many pixels are left out of k-means and evolution


def _rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    """A numpy Generator; ``None`` means seed 0 so that training runs are reproducible."""
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(0 if rng is None else rng)


def _to_numpy(x: Any) -> np.ndarray:
    """Tensor or array-like -> float64 ``ndarray[N, 2]`` with non-finite rows dropped."""
    a = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    a = a.reshape(-1, 2)
    return np.clip(a[np.isfinite(a).all(1)], 0.0, None)


def _log_mismatch(log_wh: np.ndarray, log_k: np.ndarray) -> np.ndarray:
    """``log_wh (N, 2)``, ``log_k (K, 2)`` -> ``(N, K)``: max over w, h of |log r|, i.e. -log of
    YOLOv5's ratio metric min(r, 1/r) (taken over both sides)."""
    return np.abs(log_wh[:, None, :] - log_k[None]).max(2)


def _logs(wh: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):  # a zero side -> -inf -> never fits an anchor, as in YOLOv5
        return np.log(wh)


def anchor_bpr(anchors_px: Any, wh: Any, thr: float = 4.0) -> tuple[float, float]:
    """Best possible recall and anchors above threshold of ``anchors_px (Tensor[K, 2])`` for labels
    ``wh (Tensor[N, 2])``: (fraction of labels whose best anchor fits within ``thr``, mean number
    of anchors each label fits)."""
    wh, k = _to_numpy(wh), _to_numpy(anchors_px)
    if not len(wh):
        return 0.0, 0.0
    fits = _log_mismatch(_logs(wh), _logs(k)) < np.log(thr)
    return float(fits.any(1).mean()), float(fits.sum(1).mean())


def anchor_fitness(anchors_px: Any, wh: Any, thr: float = 4.0) -> float:
    """Evolution fitness: mean over labels of the best anchor's ratio metric min(r, 1/r), counted
    only where it is above ``1 / thr``."""
    wh, k = _to_numpy(wh), _to_numpy(anchors_px)
    return _fitness_log(_logs(wh), _logs(k), np.log(thr)) if len(wh) else 0.0


def _fitness_log(log_wh: np.ndarray, log_k: np.ndarray, log_thr: float) -> float:
    return float(_batch_fitness(np.ascontiguousarray(log_wh.T, np.float32), log_k[None], log_thr)[0])


def _batch_fitness(log_wh_t: np.ndarray, log_k: np.ndarray, log_thr: float) -> np.ndarray:
    """``log_wh_t (2, N)`` float32 log label sizes, ``log_k (b, n, 2)`` log anchor sets ->
    ``(b,)`` fitness. Width and height mismatches are taken as separate (b, N, n) arrays: much
    faster in numpy than a reduction over a trailing axis of length 2."""
    log_k = log_k.astype(np.float32)
    dw = np.abs(log_wh_t[0][None, :, None] - log_k[:, None, :, 0])
    dh = np.abs(log_wh_t[1][None, :, None] - log_k[:, None, :, 1])
    best = np.maximum(dw, dh, out=dw).min(2)  # (b, N) -log of the best anchor's ratio metric
    return np.where(best < log_thr, np.exp(-best), 0.0).mean(1, dtype=np.float64)


def kmeans(x: np.ndarray, k: int, rng: np.random.Generator, iters: int = 50, restarts: int = 3) -> np.ndarray:
    """Plain k-means on ``x (ndarray[N, D])``: k-means++ seeding, Lloyd iterations, best of
    ``restarts`` by distortion. Returns ``ndarray[k, D]`` centres. Needs ``N >= k``."""
    best, best_cost = None, np.inf
    for _ in range(restarts):
        centres = x[[rng.integers(len(x))]]
        for _ in range(k - 1):  # k-means++: next centre drawn with probability ~ squared distance
            d2 = ((x[:, None] - centres[None]) ** 2).sum(2).min(1)
            p = d2 / d2.sum() if d2.sum() > 0 else np.full(len(x), 1 / len(x))
            centres = np.concatenate((centres, x[[rng.choice(len(x), p=p)]]))
        for _ in range(iters):
            d2 = ((x[:, None] - centres[None]) ** 2).sum(2)
            label = d2.argmin(1)
            new = centres.copy()
            for j in range(k):
                members = x[label == j]
                # an empty cluster restarts at the point worst served by the current centres
                new[j] = members.mean(0) if len(members) else x[d2.min(1).argmax()]
            done = np.allclose(new, centres)
            centres = new
            if done:
                break
        cost = ((x[:, None] - centres[None]) ** 2).sum(2).min(1).sum()
        if cost < best_cost:
            best, best_cost = centres, cost
    return best


def _evolve(k: np.ndarray, log_wh: np.ndarray, log_thr: float, gen: int, rng: np.random.Generator,
            mutation_prob: float = 0.9, sigma: float = 0.1) -> np.ndarray:
    """Hill-climb ``k (ndarray[n, 2])`` by random multiplicative mutations, keeping a mutant when
    its fitness is higher. ``batch`` mutants are scored at once against the current parent; the
    first improving one is taken and the scan restarts after it, so the result equals the
    one-at-a-time loop for the same random draws."""
    fitness = _fitness_log(log_wh, np.log(k), log_thr)
    draws = []
    for _ in range(gen):
        v = np.ones(k.shape)
        while (v == 1).all():  # a mutation that changes nothing is drawn again
            v = ((rng.random(k.shape) < mutation_prob) * rng.random() * rng.standard_normal(k.shape) * sigma + 1)
            v = v.clip(0.3, 3.0)
        draws.append(v)
    draws = np.stack(draws) if draws else np.ones((0,) + k.shape)
    log_wh_t = np.ascontiguousarray(log_wh.T, np.float32)
    batch = int(np.clip(4_000_000 // max(1, log_wh.shape[0] * k.shape[0]), 1, 32))  # ~32 MB of scratch
    i = 0
    while i < len(draws):
        cand = (k[None] * draws[i:i + batch]).clip(min=MIN_BOX_PX)  # (b, n, 2)
        fit = _batch_fitness(log_wh_t, np.log(cand), log_thr)
        better = np.flatnonzero(fit > fitness)
        if len(better):
            j = better[0]
            fitness, k = fit[j], cand[j]
            i += j + 1
        else:
            i += len(cand)
    return k


def kmean_anchors(wh: Any, n: int = 9, imgsz: int = 640, thr: float = 4.0, gen: int = 1000,
                  rng: np.random.Generator | int | None = None) -> np.ndarray:
    """Anchors for label sizes ``wh (ndarray[N, 2])`` in pixels at the training size -> ``ndarray[n, 2]``
    pixels sorted by area: k-means on the std-whitened sizes of boxes with a side of at least
    2 px, then ``gen`` generations of mutation that keep improvements of ``anchor_fitness``.
    Fewer boxes than ``n``: random initial anchors up to ``imgsz`` (as YOLOv5)."""
    rng = _rng(rng)
    wh = _to_numpy(wh)
    wh = wh[(wh >= MIN_BOX_PX).any(1)]
    if not len(wh):
        raise ValueError(f"no label of at least {MIN_BOX_PX:g} px to fit anchors to")
    if len(np.unique(wh, axis=0)) >= n:
        std = wh.std(0)
        std[std == 0] = 1.0
        k = kmeans(wh / std, n, rng) * std
    else:
        k = np.sort(rng.random(n * 2)).reshape(n, 2) * imgsz
    k = k.clip(min=MIN_BOX_PX)
    k = k[np.argsort(k.prod(1))]
    k = _evolve(k, _logs(wh), float(np.log(thr)), gen, rng)
    return k[np.argsort(k.prod(1))]


def check_anchors(wh_px: Any, anchors: torch.Tensor, strides: torch.Tensor, imgsz: int = 640, thr: float = 4.0,
                  rng: np.random.Generator | int | None = None, gen: int = 1000
                  ) -> tuple[torch.Tensor | None, dict[str, Any]]:
    """Check ``anchors (Tensor[nl, na, 2])`` (stride units; ``strides (Tensor[nl])``) against label
    sizes ``wh_px (ndarray[N, 2])`` in pixels at the training size; evolve new ones if they fit badly.

    Returns (new anchors ``Tensor[nl, na, 2]`` in stride units, or None to keep the current ones,
    report ``{bpr_before, bpr_after, aat_before, aat_after, anchors_before_px, anchors_after_px,
    changed, message}``). Best possible recall >= 0.98 keeps the anchors; otherwise k-means plus
    evolution runs and its anchors, sorted by area and given small to large to the levels in
    stride order, are used only if their recall is higher.
    """
    anchors = torch.as_tensor(anchors).detach().cpu()
    strides = torch.as_tensor(strides, dtype=anchors.dtype).detach().cpu().view(-1)
    nl, na = anchors.shape[:2]
    before_px = anchors * strides.view(-1, 1, 1)
    wh = _to_numpy(wh_px)
    report: dict[str, Any] = {"anchors_before_px": before_px, "anchors_after_px": before_px, "changed": False}
    if not len(wh):
        return None, {**report, "bpr_before": 0.0, "bpr_after": 0.0, "aat_before": 0.0, "aat_after": 0.0,
                      "message": "no labels to check the anchors against; anchors kept"}
    bpr, aat = anchor_bpr(before_px.view(-1, 2), wh, thr)
    report.update(bpr_before=bpr, bpr_after=bpr, aat_before=aat, aat_after=aat)
    head = f"{aat:.2f} anchors/target, best possible recall {bpr:.4f}"
    if bpr >= BPR_OK:
        return None, {**report, "message": f"{head}: the anchors fit the labels"}
    new_px = kmean_anchors(wh, n=nl * na, imgsz=imgsz, thr=thr, gen=gen, rng=rng)
    new_bpr, new_aat = anchor_bpr(new_px, wh, thr)
    if new_bpr <= bpr:
        return None, {**report, "message": f"{head} < {BPR_OK}; evolved anchors are no better "
                                           f"(recall {new_bpr:.4f}), original anchors kept"}
    by_area = torch.as_tensor(new_px, dtype=anchors.dtype).view(nl, na, 2)  # rows small -> large
    after_px = torch.empty_like(anchors)
    after_px[torch.argsort(strides)] = by_area  # smallest anchors to the finest level
    report.update(bpr_after=new_bpr, aat_after=new_aat, anchors_after_px=after_px, changed=True)
    msg = f"{head} < {BPR_OK}; new anchors: recall {new_bpr:.4f}, {new_aat:.2f} anchors/target"
    return after_px / strides.view(-1, 1, 1), {**report, "message": msg}
