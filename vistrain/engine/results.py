"""What ``predict`` returns: one ``Result`` per image (or video frame), with ultralytics' accessors.

- ``Result.boxes`` (detect, segment): ``Boxes`` — ``.xyxy .xywh .xyxyn .xywhn`` (pixels of the original image /
  normalised), ``.conf``, ``.cls``, ``.data`` (``Tensor[N, 6]``: x1, y1, x2, y2, score, class);
- ``Result.masks`` (segment): ``Masks`` — ``.data`` (bool ``Tensor[N, H, W]`` at the original size), ``.xy``
  (each mask's outline as ``ndarray[K, 2]`` pixels), ``.xyn`` (normalised);
- ``Result.probs`` (classify): ``Probs`` — ``.top1 .top5 .top1conf .top5conf``, ``.data`` (``Tensor[C]``).

Indexing a ``Boxes`` / ``Masks`` / ``Probs`` along its first axis (``r.boxes[0]``, ``r.boxes[r.boxes.conf > 0.5]``)
gives the same kind of object; any other index (``r.boxes[:, :4]``) and tensor methods (``.tolist()``,
``.numpy()``, ``.shape``) act on ``.data``.  ``Result.plot()`` draws the image (a numpy ``HxWx3`` BGR array, as
OpenCV and ultralytics use), ``.save(path)`` writes it, ``.summary()`` / ``.to_json()`` give the predictions as
plain data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch


class _Data:
    """A tensor with named views; see the module docstring for indexing."""

    ndim = 0  # rows of fewer dimensions (one box, one mask) get a leading axis of 1

    def __init__(self, data: torch.Tensor, orig_shape: tuple[int, int]):
        if self.ndim and data.ndim == self.ndim - 1:
            data = data[None]
        self.data, self.orig_shape = data, tuple(orig_shape)

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self):
        return iter(self.data)

    def __getitem__(self, index):
        if isinstance(index, tuple):
            return self.data[index]
        return type(self)(self.data[index], self.orig_shape)

    def __getattr__(self, name: str):  # shape, dtype, tolist, numpy, cpu, any, sum, ...: the tensor's
        if name.startswith("__") or name in ("data", "orig_shape"):
            raise AttributeError(name)
        return getattr(self.data, name)

    def __array__(self, dtype=None, copy=None):
        a = self.data.cpu().numpy()
        return a.astype(dtype) if dtype is not None else a

    def __repr__(self) -> str:
        return f"{type(self).__name__}(data={self.data!r}, orig_shape={self.orig_shape})"


class Boxes(_Data):
    """Detections: ``data`` ``Tensor[N, 6]`` (x1, y1, x2, y2, score, class) in original-image pixels."""

    ndim = 2

    @property
    def xyxy(self) -> torch.Tensor:
        return self.data[:, :4]

    @property
    def conf(self) -> torch.Tensor:
        return self.data[:, 4]

    @property
    def cls(self) -> torch.Tensor:
        return self.data[:, 5]

    @property
    def xywh(self) -> torch.Tensor:
        """Centre x, centre y, width, height in pixels."""
        b = self.xyxy
        return torch.cat(((b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2]), 1)

    def _scale(self) -> torch.Tensor:
        h, w = self.orig_shape
        return torch.tensor([w, h, w, h], dtype=self.data.dtype, device=self.data.device)

    @property
    def xyxyn(self) -> torch.Tensor:
        return self.xyxy / self._scale()

    @property
    def xywhn(self) -> torch.Tensor:
        return self.xywh / self._scale()


class Masks(_Data):
    """Instance masks: ``data`` bool ``Tensor[N, H, W]`` at the original image size."""

    ndim = 3

    @property
    def xy(self) -> list[np.ndarray]:
        """Each mask's outline (its largest region) as ``ndarray[K, 2]`` (x, y) pixels; ``[0, 2]`` when empty."""
        from vistrain.tasks.segment import mask_polygon

        return [mask_polygon(m) for m in self.data.cpu().numpy()]

    @property
    def xyn(self) -> list[np.ndarray]:
        h, w = self.orig_shape
        return [p / np.array([w, h], np.float32) for p in self.xy]


class Probs(_Data):
    """Class probabilities: ``data`` ``Tensor[C]``."""

    def __getitem__(self, index):
        return self.data[index]

    @property
    def top5(self) -> list[int]:
        return self.data.topk(min(5, len(self.data))).indices.tolist()

    @property
    def top5conf(self) -> torch.Tensor:
        return self.data.topk(min(5, len(self.data))).values

    @property
    def top1(self) -> int:
        return int(self.data.argmax())

    @property
    def top1conf(self) -> torch.Tensor:
        return self.data.max()


@dataclass
class Result:
    """Prediction for one image: ``probs`` (classify), ``boxes`` (detect, segment), ``masks`` (segment), the
    ``path`` it came from (a made-up ``imageN.jpg`` for in-memory images), ``orig_shape`` (h, w), ``names``;
    ``orig_img`` the RGB PIL image; ``extra``: ``frame`` (video frame number), ``save_dir``, ``feature_maps``;
    ``embedding`` (with ``embed=``)."""

    path: str
    names: list[str]
    orig_shape: tuple[int, int]  # (height, width)
    probs: Any = None
    boxes: Any = None
    masks: Any = None
    extra: dict[str, Any] = field(default_factory=dict)
    orig_img: Any = field(default=None, repr=False)
    embedding: Any = None  # predict embed=: the chosen layers' outputs, pooled and concatenated (Tensor[D])

    def __post_init__(self):
        wrap = {"probs": Probs, "boxes": Boxes, "masks": Masks}
        for name, kind in wrap.items():
            value = getattr(self, name)
            if isinstance(value, torch.Tensor):
                setattr(self, name, kind(value, self.orig_shape))

    # --- classification shortcuts (as before the accessors) ------------------------------------------------
    def topk(self, k: int = 5) -> list[tuple[str, float]]:
        """The ``k`` most likely classes as (name, probability), most likely first."""
        conf, idx = self.probs.data.topk(min(k, len(self.probs)))
        return [(self.names[int(i)], float(c)) for c, i in zip(conf, idx)]

    @property
    def top1(self) -> tuple[str, float]:
        return self.topk(1)[0]

    # --- drawing and plain data ------------------------------------------------------------------------------
    def annotated(self, image=None):
        """The image (``orig_img`` unless given, PIL) with the predictions drawn, as a PIL image."""
        from vistrain.utils.plotting import draw_boxes, draw_label, draw_masks

        image = image if image is not None else self.orig_img
        if image is None:
            raise ValueError(f"{self.path}: no image kept with this result; pass one: result.plot(image)")
        if self.probs is not None:
            name, conf = self.top1
            return draw_label(image, f"{name} {conf:.2f}")
        if self.masks is not None:
            image = draw_masks(image, self.masks.data, self.boxes.cls)
        return draw_boxes(image, self.boxes.data, self.names)

    def plot(self, image=None) -> np.ndarray:
        """The annotated image as a numpy ``uint8`` array ``[H, W, 3]`` in BGR order (OpenCV's, ultralytics')."""
        return np.ascontiguousarray(np.asarray(self.annotated(image).convert("RGB"))[:, :, ::-1])

    def save(self, path: str | Path | None = None) -> str:
        """Write the annotated image to ``path`` (default: ``NAME.jpg`` in the current folder); returns it."""
        path = Path(path) if path is not None else Path(Path(self.path).stem + ".jpg")
        self.annotated().save(path)
        return str(path)

    def summary(self, decimals: int = 5) -> list[dict]:
        """The predictions as plain data: per detection ``name``, ``class``, ``confidence``, ``box`` (x1, y1, x2,
        y2 pixels) and, for masks, ``segments`` (``x``, ``y`` outline lists); for a classifier the top 5."""
        r = lambda v: round(float(v), decimals)  # noqa: E731
        if self.probs is not None:
            return [{"name": self.names[i], "class": i, "confidence": r(self.probs.data[i])} for i in self.probs.top5]
        out = []
        outlines = self.masks.xy if self.masks is not None else None
        for k, (x1, y1, x2, y2, score, c) in enumerate(self.boxes.data.tolist()):
            d = {"name": self.names[int(c)], "class": int(c), "confidence": r(score),
                 "box": {"x1": r(x1), "y1": r(y1), "x2": r(x2), "y2": r(y2)}}
            if outlines is not None:
                d["segments"] = {"x": [r(v) for v in outlines[k][:, 0]], "y": [r(v) for v in outlines[k][:, 1]]}
            out.append(d)
        return out

    def to_json(self, decimals: int = 5) -> str:
        return json.dumps(self.summary(decimals))
