"""Instance segmentation (YOLOv8 ``Segment`` head): polygon labels, box + mask losses, box and mask COCO mAP,
masks at the original image size in predictions.  Everything box-related is detection's (``DetectTask``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vistrain.engine.utils import UserError
from vistrain.tasks.detect import DetectTask


def polygon_rles(polygons: list[np.ndarray], h: int, w: int) -> list[dict]:
    """COCO RLEs of polygons (``[K, 2]`` in pixels of an ``h`` x ``w`` image), rasterised by pycocotools as
    COCO rasterises polygon annotations."""
    from pycocotools import mask as mask_utils

    out = []
    for poly in polygons:
        if len(poly) >= 3:
            out.append(mask_utils.merge(mask_utils.frPyObjects([np.asarray(poly, np.float64).ravel().tolist()], h, w)))
        else:  # no polygon: an empty mask
            out.append(mask_utils.encode(np.zeros((h, w, 1), np.uint8, order="F"))[0])
    return out


def touches_masks(boxes: torch.Tensor, rles: list[dict], h: int, w: int) -> np.ndarray:
    """bool ``ndarray[K]``: which boxes (x1, y1, x2, y2 in pixels of the ``h`` x ``w`` image) share a pixel
    (``box_pixels``, the pixels their masks may cover) with the bounding box of any of the masks ``rles``."""
    from pycocotools import mask as mask_utils

    from vistrain.ops.masks import box_pixels

    px = box_pixels(boxes, h, w)
    if not len(rles) or not len(px):
        return np.zeros(len(px), bool)
    g = np.asarray(mask_utils.toBbox(rles), np.float64).reshape(-1, 4)  # x, y, width, height of the mask's pixels
    g = g[(g[:, 2] > 0) & (g[:, 3] > 0)]
    gx0, gy0, gx1, gy1 = g[:, 0], g[:, 1], g[:, 0] + g[:, 2], g[:, 1] + g[:, 3]
    c0, r0, c1, r1 = (px[:, i, None] for i in range(4))
    return ((c0 < gx1) & (gx0 < c1) & (r0 < gy1) & (gy0 < r1)).any(1)


def mask_polygon(mask: np.ndarray) -> np.ndarray:
    """The outline of a mask's largest region -> ``ndarray[K, 2]`` (x, y) pixel coordinates (``[0, 2]`` if empty)."""
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return np.zeros((0, 2), np.float32)
    return max(contours, key=len).reshape(-1, 2).astype(np.float32)


class SegmentTask(DetectTask):
    name = "segment"
    builtin_folder = "segment"
    loss_names = ("box_loss", "seg_loss", "cls_loss", "dfl_loss")
    metric_keys = DetectTask.metric_keys + ("metrics/precision(M)", "metrics/recall(M)", "metrics/mAP50(M)",
                                            "metrics/mAP50-95(M)")

    def default_model(self) -> str:
        return "yolov8n-seg"

    # --- data ---------------------------------------------------------------------------
    def dataset_options(self, cfg: dict) -> dict:
        return {"masks": True, "mask_ratio": int(cfg["mask_ratio"]), "overlap": bool(cfg["overlap_mask"])}

    def check_labels(self, labels, split: str) -> None:
        """A segmentation model needs a polygon for every object.  A split without any polygon (box labels)
        stops the run; in a split of polygons, a row of 5 values (2 points, or a box) is reported ``file:line``
        and dropped."""
        from vistrain.data.yolo import label_path

        if any(it.has_polygons for it in labels.items):
            labels.drop_box_rows(self.data_yaml["nc"])
            return
        for it in labels.items:
            if len(it.cls) and (len(it.segments) != len(it.cls) or not all(len(s) for s in it.segments)):
                raise UserError(f"{label_path(Path(it.im_file))}: box rows without polygons ({split} split); a "
                                f"segmentation model needs a polygon for every object (rows cls x1 y1 x2 y2 x3 y3 "
                                f"...). Give polygons, or train a detection model (e.g. model=yolov8n) on box labels")

    # --- model hooks --------------------------------------------------------------------
    def find_head(self, model: torch.nn.Module, cfg: dict):
        from vistrain.nn.modules import Segment

        head = next((m for m in model.modules() if isinstance(m, Segment)), None)
        if head is None:
            raise UserError(f"model={cfg.get('model')}: no Segment head; not a segmentation model")
        return head

    def make_loss(self, model: torch.nn.Module, cfg: dict):
        from vistrain.losses.yolov8 import SegmentLoss

        return SegmentLoss.from_model(model, {"box": 7.5 if cfg["box"] is None else cfg["box"], "cls": cfg["cls"],
                                              "dfl": cfg["dfl"], "overlap_mask": cfg["overlap_mask"]})

    # --- batches ------------------------------------------------------------------------
    def preprocess(self, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        out = super().preprocess(batch, device)
        out["masks"] = batch["masks"].to(device, non_blocking=device.type == "cuda")
        return out

    def loss(self, preds, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loss_fn(preds, batch["targets"], batch["masks"])

    def masks_for(self, det: torch.Tensor, proto: torch.Tensor, input_hw, ratio_pad, orig_hw,
                  gt_rles: list[dict] | None = None) -> torch.Tensor:
        """bool ``Tensor[K, h0, w0]``: the masks of ``det`` (rows with mask coefficients after column 6, boxes
        in input pixels) at the original image size.  With ``gt_rles`` (for metrics only), a mask whose box
        shares no pixel with any ground-truth mask's bounding box is left empty: its IoU with every ground
        truth is 0 either way."""
        from vistrain.data.augment import scale_boxes_back
        from vistrain.ops.masks import masks_from_protos

        boxes = torch.as_tensor(scale_boxes_back(det[:, :4].detach().float().cpu().numpy(), *ratio_pad, orig_hw))
        only = None if gt_rles is None else touches_masks(boxes, gt_rles, *orig_hw)
        return masks_from_protos(det[:, 6:], proto, boxes, input_hw, ratio_pad, orig_hw, only=only).cpu()

    # --- metrics --------------------------------------------------------------------------
    def new_metrics(self, names: list[str]):
        from vistrain.metrics.segment import SegmentMetrics

        return SegmentMetrics(names)

    def decode(self, preds):
        """Raw Segment outputs -> ``(Tensor[B, N, 4 + nc + nm], prototypes Tensor[B, nm, h, w])``: detection's
        decoded boxes and class probabilities followed by each anchor's mask coefficients, and the prototypes."""
        return super().decode(preds), preds[2]

    def select(self, decoded, settings: dict) -> list[torch.Tensor]:
        return super().select(decoded[0], settings)

    def update_metrics(self, metrics, preds, batch: dict[str, Any], decoded: bool = False) -> None:
        from vistrain.data.augment import scale_boxes_back

        preds = preds if decoded else self.decode(preds)  # (boxes, prototypes)
        dets = self.select(preds, self.nms_settings(self.cfg, "val"))
        input_hw = tuple(batch["img"].shape[2:])
        all_masks = bool(self.cfg.get("save_json"))  # predictions.json holds every mask
        for i, det in enumerate(dets):
            h0, w0 = batch["ori_shape"][i]
            gt = batch["ori_labels"][i]
            gt_rles = polygon_rles(gt["segments"], h0, w0)
            masks = self.masks_for(det, preds[1][i], input_hw, batch["ratio_pad"][i], (h0, w0),
                                   gt_rles=None if all_masks else gt_rles)
            box = det[:, :6].detach().float().cpu().clone()
            box[:, :4] = torch.as_tensor(scale_boxes_back(box[:, :4].numpy(), *batch["ratio_pad"][i], (h0, w0)))
            metrics.update(box, masks, torch.as_tensor(gt["boxes"]), torch.as_tensor(gt["cls"]), gt_rles,
                           image_id=Path(batch["im_file"][i]).stem, image_size=(w0, h0),
                           file_name=batch["im_file"][i])

    # --- plots --------------------------------------------------------------------------
    def plot_batch(self, batch: dict[str, Any], names: list[str], path: Path, preds: Any = None) -> None:
        """As detection's, with the instances' masks tinted: the label masks, or the predicted ones."""
        from vistrain.ops.boxes import xywh2xyxy
        from vistrain.ops.masks import masks_from_protos
        from vistrain.tasks.detect import _first_images
        from vistrain.utils.plotting import plot_detections

        imgs = batch["img"][:16].detach().float().cpu()
        imgs = (imgs * 255).round().clamp(0, 255).to(torch.uint8) if imgs.max() <= 1.0 else imgs.to(torch.uint8)
        h, w = imgs.shape[2:]
        boxes, masks = [], []
        if preds is None:
            t, gt = batch["targets"].detach().cpu(), batch["masks"].detach().cpu()
            start = 0
            for i in range(len(imgs)):
                ti = t[t[:, 0] == i]
                boxes.append(torch.cat((xywh2xyxy(ti[:, 2:6]) * torch.tensor([w, h, w, h]), torch.ones(len(ti), 1),
                                        ti[:, 1:2]), 1))
                if self.cfg.get("overlap_mask", True):  # one map per image: instance k + 1 of image i
                    masks.append(gt[i][None] == torch.arange(1, len(ti) + 1).view(-1, 1, 1))
                else:  # one mask per target row, rows in image order
                    masks.append(gt[start:start + len(ti)] > 0)
                start += len(ti)
        else:
            decoded = self.decode(_first_images(preds, 16))
            settings = {**self.nms_settings(self.cfg, "predict"), "conf": 0.25}
            for i, det in enumerate(self.select(decoded, settings)):
                det = det.detach()
                boxes.append(det[:, :6].cpu())
                masks.append(masks_from_protos(det[:, 6:], decoded[1][i].detach(), det[:, :4], (h, w)).cpu())
        plot_detections(imgs, boxes, names, path, show_conf=preds is not None, masks=masks)

    # --- prediction ---------------------------------------------------------------------
    def predict_postprocess(self, decoded, cfg: dict, metas: list) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``decode``'s (boxes, prototypes) -> per image (``Tensor[K, 6]`` boxes in original pixels, bool
        ``Tensor[K, h0, w0]`` masks)."""
        from vistrain.data.augment import scale_boxes_back

        out = []
        dets = self.select(decoded, self.nms_settings(cfg, "predict"))
        for i, (det, (ratio, pad, shape, input_hw)) in enumerate(zip(dets, metas)):
            masks = self.masks_for(det, decoded[1][i], input_hw, (ratio, pad), tuple(shape))
            box = det[:, :6].detach().float().cpu().clone()
            box[:, :4] = torch.as_tensor(scale_boxes_back(box[:, :4].numpy(), ratio, pad, shape), dtype=torch.float32)
            out.append((box, masks))
        return out

    def make_result(self, path: str, names: list[str], image, out):
        from vistrain.engine.results import Result

        boxes, masks = out
        return Result(path, names, (image.height, image.width), boxes=boxes, masks=masks, orig_img=image)

    def write_predictions(self, results: list, save_dir: Path, cfg: dict) -> None:
        """``labels/NAME.txt`` per image (``cls x1 y1 ... xn yn conf``: the mask outline, normalised) and
        ``predictions.json`` (boxes, scores and COCO RLE masks)."""
        from vistrain.metrics.detect import _json_rle, to_rles

        labels = save_dir / "labels"
        labels.mkdir(exist_ok=True)
        records = []
        for r in results:
            h, w = r.orig_shape
            stem = Path(r.path).stem + (f"_{r.extra['frame']}" if "frame" in r.extra else "")
            rows, dets = [], []
            rles = to_rles(r.masks.data) if len(r.masks) else []
            for (x1, y1, x2, y2, score, c), mask, rle in zip(r.boxes.data.tolist(), r.masks.data.numpy(), rles):
                poly = mask_polygon(mask) / np.array([w, h], np.float32)
                if len(poly) >= 3:
                    rows.append(f"{int(c)} " + " ".join(f"{v:.6f}" for v in poly.ravel()) + f" {score:.5f}\n")
                dets.append({"class": int(c), "name": r.names[int(c)], "confidence": round(score, 5),
                             "box": [round(v, 2) for v in (x1, y1, x2, y2)], "segmentation": _json_rle(rle)})
            (labels / f"{stem}.txt").write_text("".join(rows))
            records.append({"image": r.path, **({"frame": r.extra["frame"]} if "frame" in r.extra else {}),
                            "width": w, "height": h, "detections": dets})
        (save_dir / "predictions.json").write_text(json.dumps(records, indent=1))
