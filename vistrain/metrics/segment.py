"""Instance segmentation metrics: the box metrics and the mask metrics side by side, each by the COCO
definition (pycocotools' ``bbox`` and ``segm``), keys ``metrics/...(B)`` and ``metrics/...(M)``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from vistrain.metrics.detect import DetectMetrics, coco_annotations, coco_predictions


class SegmentMetrics:
    """``update(pred (Tensor[N, 6]), pred_masks, gt_boxes, gt_cls, gt_masks, ...)`` per image, masks at the
    original image size (bool ``Tensor[N, H, W]`` or COCO RLEs); then ``results()`` (box and mask keys),
    ``fitness()`` (box fitness + mask fitness, as ultralytics), ``summary_lines()``, ``plot()``, ``coco_json()``
    (one annotation / prediction list holding both ``bbox`` and ``segmentation``)."""

    def __init__(self, names: Sequence[str] | dict[int, str]):
        self.box = DetectMetrics(names)
        self.mask = DetectMetrics(names, iou_type="segm")
        self.names, self.nc = self.box.names, self.box.nc

    def update(self, pred, pred_masks, gt_boxes, gt_cls, gt_masks, image_id: Any = None,
               image_size: tuple[int, int] | None = None, file_name: str | None = None) -> None:
        kw = {"image_id": image_id, "image_size": image_size, "file_name": file_name}
        self.box.update(pred, gt_boxes, gt_cls, **kw)
        self.mask.update(pred, gt_boxes, gt_cls, pred_masks=pred_masks, gt_masks=gt_masks, **kw)

    @property
    def images(self) -> list[dict[str, Any]]:
        return self.box.images

    def results(self) -> dict[str, float]:
        return {**self.box.results(), **self.mask.results()}

    def fitness(self) -> float:
        return self.box.fitness() + self.mask.fitness()

    def summary_lines(self, per_class: bool = True) -> list[str]:
        """Header, the 'all' row and one row per class with ground truth: box and mask P, R, mAP50, mAP50-95."""
        head = ("{:>22}" + "{:>11}" * 10).format("Class", "Images", "Instances", "Box(P", "R", "mAP50", "mAP50-95)",
                                                 "Mask(P", "R", "mAP50", "mAP50-95)")
        fmt = "{:>22}{:>11}{:>11}" + "{:>11.3g}" * 8
        lines = [head, fmt.format("all", len(self.images), int(self.box.instances.sum()),
                                  *self.box.results().values(), *self.mask.results().values())]
        if per_class:
            for b, m in zip(self.box.per_class_rows(), self.mask.per_class_rows()):
                if b["instances"]:
                    lines.append(fmt.format(b["name"][:22], b["images"], b["instances"], b["p"], b["r"], b["map50"],
                                            b["map"], m["p"], m["r"], m["map50"], m["map"]))
        return lines

    def plot(self, save_dir: str | Path) -> None:
        """The box curves and confusion matrix as for detection, the mask curves in ``mask/``."""
        self.box.plot(save_dir)
        self.mask.plot(Path(save_dir) / "mask")

    def coco_json(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        m = self.mask
        annotations = coco_annotations(m.images, m.gts, m.names, m.gt_rles)
        return annotations, coco_predictions(m.preds, [im["id"] for im in m.images], m.pred_rles)
