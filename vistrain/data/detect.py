"""Detection dataset over verified YOLO labels: mosaic / perspective / HSV / flips / mixup for training,
rectangular letterboxed batches for validation.

A sample is a dict: ``img`` (uint8 ``Tensor[3, H, W]``), ``cls`` (``Tensor[N]``), ``bboxes``
(``Tensor[N, 4]`` cx, cy, w, h normalised to the output image), ``im_file``, ``ori_shape`` (h0, w0),
``ratio_pad`` ((rx, ry), (pad_x, pad_y)) mapping original pixels to output pixels, and, without
augmentation, ``ori_labels`` (the labels in original pixels, xyxy, and for segmentation their polygons)
for scoring.  With ``masks=True`` (segmentation) also ``masks``: the instances' masks at
``1 / mask_ratio`` of the output size (see :func:`vistrain.data.augment.instance_masks`).
"""

from __future__ import annotations

import logging
import math
import os
from collections import OrderedDict

import numpy as np
import torch
from torch.utils.data import Dataset

from vistrain.data import augment as A
from vistrain.data.image import BadImageError, load_rgb_array
from vistrain.data.sampler import SampleKey, sample_rng, split_key
from vistrain.data.yolo import ImageLabels

LOGGER = logging.getLogger("vistrain")


def _xywhn_to_xyxy(boxes: np.ndarray, w: float, h: float) -> np.ndarray:
    out = np.empty_like(boxes, dtype=np.float32)
    out[:, 0] = (boxes[:, 0] - boxes[:, 2] / 2) * w
    out[:, 1] = (boxes[:, 1] - boxes[:, 3] / 2) * h
    out[:, 2] = (boxes[:, 0] + boxes[:, 2] / 2) * w
    out[:, 3] = (boxes[:, 1] + boxes[:, 3] / 2) * h
    return out


def _xyxy_to_xywhn(boxes: np.ndarray, w: float, h: float) -> np.ndarray:
    out = np.empty((len(boxes), 4), dtype=np.float32)
    out[:, 0] = (boxes[:, 0] + boxes[:, 2]) / 2 / w
    out[:, 1] = (boxes[:, 1] + boxes[:, 3]) / 2 / h
    out[:, 2] = (boxes[:, 2] - boxes[:, 0]) / w
    out[:, 3] = (boxes[:, 3] - boxes[:, 1]) / h
    return out


class DetectDataset(Dataset):
    """Images and verified labels (:class:`ImageLabels`) -> training or validation samples."""

    def __init__(self, items: list[ImageLabels], imgsz: int, augment: bool = False, hyp: dict | None = None,
                 rect: bool = False, batch_size: int = 16, stride: int = 32, pad: float = 0.5, seed: int = 0,
                 masks: bool = False, mask_ratio: int = 4, overlap: bool = True, mosaic_buffer: bool = False):
        self.items = list(items)
        self.masks, self.mask_ratio, self.overlap = masks, int(mask_ratio), overlap
        self.imgsz, self.augment, self.stride, self.seed = imgsz, augment, stride, seed
        self.hyp = {"hsv_h": 0.015, "hsv_s": 0.7, "hsv_v": 0.4, "degrees": 0.0, "translate": 0.1, "scale": 0.5,
                    "shear": 0.0, "perspective": 0.0, "flipud": 0.0, "fliplr": 0.5, "mosaic": 1.0, "mixup": 0.0,
                    **(hyp or {})}
        self.rect = rect
        self.mosaic = float(self.hyp["mosaic"]) if augment and not rect else 0.0
        self.augmenter = A.DetectAugment.from_hyp(imgsz, {**self.hyp, "mosaic": self.mosaic})
        self.batch_shapes = None
        if rect:
            self._set_rect(batch_size, pad)
        self.failed: set[str] = set()
        # mosaic_buffer: ultralytics' image buffer: each process keeps the images it decoded last (8 batches'
        # worth, at most 1000), and mosaic draws its other three images from them: one decode per sample instead
        # of four. Off (default): the other three come from the whole dataset, as in YOLOv5; with the buffer,
        # 3 of 8 small-data runs fell far behind early, without it 3 of 10 (bench/README.md). The buffer holds what
        # this process loaded before, so with it a resumed run (or another worker count) draws other partners
        self.buffer_size = min(len(self.items), 8 * batch_size, 1000) if self.mosaic > 0 and mosaic_buffer else 0
        self._buffer: OrderedDict[int, tuple] = OrderedDict()
        self._buffer_pid = None

    def __len__(self) -> int:
        return len(self.items)

    def close_mosaic(self) -> None:
        """The last epochs: no mosaic and no mixup (``close_mosaic``), and so no image buffer."""
        self.mosaic = 0.0
        self.buffer_size = 0
        self._buffer.clear()
        self.hyp = {**self.hyp, "mixup": 0.0}
        self.augmenter = A.DetectAugment.from_hyp(self.imgsz, {**self.hyp, "mosaic": 0.0})

    def square(self) -> None:
        """Letterbox every image to the ``imgsz`` square instead of rectangular batch shapes (EfficientDet is
        validated at its square input size, as effdet does and as predict feeds it)."""
        self.rect, self.batch_shapes = False, None

    def _set_rect(self, batch_size: int, pad: float) -> None:
        """Sort by aspect ratio; each batch gets the smallest stride-multiple shape holding its images."""
        ar = np.array([h / w for h, w in (it.shape for it in self.items)], dtype=np.float64)
        order = ar.argsort()
        self.items = [self.items[i] for i in order]
        ar = ar[order]
        nb = math.ceil(len(ar) / batch_size)
        shapes = []
        for b in range(nb):
            a = ar[b * batch_size:(b + 1) * batch_size]
            lo, hi = a.min(), a.max()
            shape = [1.0, 1.0]  # (h, w) relative to imgsz
            if hi < 1:
                shape = [hi, 1.0]
            elif lo > 1:
                shape = [1.0, 1 / lo]
            shapes.append(shape)
        self.batch_shapes = (np.ceil(np.array(shapes) * self.imgsz / self.stride + pad).astype(int) * self.stride)
        self.batch_size = batch_size

    def sample_rng(self, index: int, epoch: int) -> np.random.Generator:
        """Every random number of training sample ``index`` in ``epoch`` (mosaic partners and centre, warp, HSV,
        flips, mixup): a function of ``(seed, epoch, index)``, whatever process loads it, so resume is exact."""
        return sample_rng(self.seed, epoch, index)

    # -- loading --
    @property
    def buffer(self) -> OrderedDict:
        """This process's image buffer: index -> ``load(index)``, oldest first (see ``buffer_size``)."""
        if self._buffer_pid != os.getpid():  # a DataLoader worker starts its own
            self._buffer, self._buffer_pid = OrderedDict(), os.getpid()
        return self._buffer

    def load(self, i: int) -> tuple[np.ndarray, A.Instances, tuple[int, int]]:
        """Image ``i`` resized so its long side is ``imgsz`` and its labels in those pixels -> (img, inst, (h0, w0)).

        With mosaic on, from the image buffer where it holds ``i`` (the arrays are shared: callers never modify
        them in place), else decoded and added to it, dropping the oldest."""
        if self.buffer_size:
            buffer = self.buffer
            if i in buffer:
                return buffer[i]
            out = buffer[i] = self._decode(i)
            while len(buffer) > self.buffer_size:
                buffer.popitem(last=False)
            return out
        return self._decode(i)

    def cache_images(self, mode: str | None, split: str, workers: int = 2) -> None:
        """``cache=ram|disk`` (:mod:`vistrain.data.cache`): decode and resize every image once, now."""
        from vistrain.data.cache import ImageCache

        if mode:
            self.cache = ImageCache(mode, [it.im_file for it in self.items], [it.shape for it in self.items],
                                    self.imgsz, split, lambda i: self._resized(i), workers)

    def _resized(self, i: int) -> np.ndarray:
        """Image ``i`` with its long side at ``imgsz`` (what ``cache=`` keeps)."""
        cache = getattr(self, "cache", None)
        img = cache.get(i) if cache is not None else None
        if img is None:
            img = A.load_resized(load_rgb_array(self.items[i].im_file), self.imgsz)[0]
        return img

    def _decode(self, i: int) -> tuple[np.ndarray, A.Instances, tuple[int, int]]:
        it = self.items[i]
        img = self._resized(i)
        h0, w0 = it.shape  # (the verified image size, EXIF rotation applied)
        h, w = img.shape[:2]
        boxes = _xywhn_to_xyxy(it.boxes, w, h)
        segments = [s * np.array([w, h], dtype=np.float32) for s in it.segments if len(s)]
        if len(segments) != len(it.cls):
            segments = []
        return img, A.Instances(cls=it.cls.copy(), boxes=boxes, segments=segments), (h0, w0)

    def _load_ok(self, i: int):
        """``load(i)``, or the next readable image if ``i`` cannot be decoded any more (logged once)."""
        n = len(self.items)
        for k in range(n):
            j = (i + k) % n
            if self.items[j].im_file in self.failed:
                continue
            try:
                return j, self.load(j)
            except BadImageError as e:
                self.failed.add(self.items[j].im_file)
                LOGGER.warning(f"skipping unreadable image {e} (using another instead)")
        raise RuntimeError("none of the dataset's images can be read")

    # -- samples --
    def __getitem__(self, key: int | SampleKey) -> dict:
        i, epoch = split_key(key)
        if self.augment:
            return self._train_sample(i, self.sample_rng(i, epoch))
        j, (img, inst, (h0, w0)) = self._load_ok(i)
        shape = self.batch_shapes[j // self.batch_size] if self.rect else (self.imgsz, self.imgsz)
        h, w = img.shape[:2]
        out, ratio, pad = A.letterbox(img, tuple(int(s) for s in shape), auto=False, scaleup=False)
        scale = (ratio[0] * w / w0, ratio[1] * h / h0)
        inst = A.apply_letterbox(inst, ratio, pad)
        it = self.items[j]
        ori = {"cls": it.cls.copy(), "boxes": _xywhn_to_xyxy(it.boxes, w0, h0)}
        if it.difficult is not None and it.difficult.any():  # Pascal VOC: left out of scoring, not of the image
            ori["difficult"] = it.difficult.copy()
        if self.masks:
            ori["segments"] = [sg * np.array([w0, h0], np.float32) for sg in it.segments]
        return self._pack(out, inst, it.im_file, (h0, w0), (scale, pad), ori)

    def _train_sample(self, i: int, rng: np.random.Generator) -> dict:
        hyp = self.hyp

        def load(k: int):
            return self._load_ok(k)[1][:2]

        if self.rect:  # rectangular batches: the batch's letterbox shape, no mosaic and no warp
            j, (img, inst, _) = self._load_ok(i)
            img, ratio, pad = A.letterbox(img, tuple(int(s) for s in self.batch_shapes[j // self.batch_size]),
                                          auto=False, scaleup=True)
            img = A.augment_hsv(img, rng, hyp["hsv_h"], hyp["hsv_s"], hyp["hsv_v"])
            img, inst = A.random_flips(img, A.apply_letterbox(inst, ratio, pad), rng, hyp["fliplr"], hyp["flipud"])
        elif self.buffer_size and self.mosaic > 0:
            self._load_ok(i)  # into the buffer first: the pool of mosaic partners holds this image too, as ultralytics'
            img, inst = self.augmenter(i, load, len(self), rng, pool=list(self.buffer))
        else:
            img, inst = self.augmenter(i, load, len(self), rng)
        it = self.items[i]
        return self._pack(img, inst, it.im_file, it.shape, ((1.0, 1.0), (0.0, 0.0)), None)

    def _pack(self, img: np.ndarray, inst: A.Instances, im_file: str, ori_shape, ratio_pad, ori_labels) -> dict:
        h, w = img.shape[:2]
        out = {}
        if self.masks:
            masks, inst = A.instance_masks(inst, (h, w), self.mask_ratio, self.overlap)
            out["masks"] = torch.from_numpy(masks)
        boxes = np.asarray(inst.boxes, dtype=np.float32).reshape(-1, 4)
        return {"img": torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))),
                "cls": torch.as_tensor(np.asarray(inst.cls), dtype=torch.float32).reshape(-1),
                "bboxes": torch.from_numpy(_xyxy_to_xywhn(boxes, w, h)),
                "im_file": im_file, "ori_shape": tuple(int(v) for v in ori_shape), "ratio_pad": ratio_pad,
                "ori_labels": ori_labels, **out}


def collate(samples: list[dict]) -> dict:
    """Stack images; ``targets (Tensor[T, 6])`` = (index in batch, class, cx, cy, w, h) normalised."""
    targets = [torch.cat((torch.full((len(s["cls"]), 1), float(i)), s["cls"][:, None], s["bboxes"]), 1)
               for i, s in enumerate(samples)]
    out = {"img": torch.stack([s["img"] for s in samples]),
           "targets": torch.cat(targets, 0) if targets else torch.zeros(0, 6),
           "im_file": [s["im_file"] for s in samples], "ori_shape": [s["ori_shape"] for s in samples],
           "ratio_pad": [s["ratio_pad"] for s in samples], "ori_labels": [s["ori_labels"] for s in samples]}
    if samples and "masks" in samples[0]:  # overlap: one [h, w] map per image; else [n, h, w] per image
        masks = [s["masks"] for s in samples]
        out["masks"] = torch.stack(masks) if masks[0].ndim == 2 else torch.cat(masks)
    return out
