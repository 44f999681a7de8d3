"""Object detection: YOLO-format data, COCO mAP, boxes out.  Three kinds of head: anchor-based (YOLOv5:
autoanchor, the YOLOv5 loss, objectness), anchor-free (YOLOv8 ``DetectDFL``: task-aligned assignment,
CIoU + DFL, no objectness) and EfficientDet's class / box nets (RetinaNet anchors, IoU matching, focal +
Huber loss, top-k + class-wise NMS); the task finds which one the model has in ``setup_model``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vistrain.engine.utils import LOGGER, UserError
from vistrain.tasks.base import DataBundle, take_fraction, val_batch_size

HYP_KEYS = ("hsv_h", "hsv_s", "hsv_v", "degrees", "translate", "scale", "shear", "perspective", "flipud", "fliplr",
            "mosaic", "mixup")
BUILTIN_IMGSZ = 128


def parse_classes(value) -> list[int] | None:
    """``classes=0,2`` (str), an int, or a list -> list of class indices; empty -> None."""
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    try:
        return [int(v) for v in str(value).replace("[", "").replace("]", "").split(",") if v.strip()]
    except ValueError:
        raise UserError(f"classes={value}: expected class indices, e.g. classes=0,2") from None


EFFDET_MAX_DET = 100  # EfficientDet's detections per image (effdet's max_det_per_image), unless max_det= is given


def nms_settings(cfg: dict, mode: str, anchor_free: bool = False, effdet: bool = False) -> dict:
    """conf / iou / max_det / classes / agnostic for ``mode`` ('val' or 'predict'); empty keys take the mode's
    default: val conf 0.001, predict conf 0.25; iou 0.6 (val) / 0.45 (predict) for anchor-based heads as
    YOLOv5's val.py / detect.py, 0.7 for anchor-free heads as ultralytics' YOLOv8, 0.5 and 100 detections for
    EfficientDet as effdet's predict bench."""
    conf = cfg.get("conf")
    iou = cfg.get("iou")
    default_iou = 0.5 if effdet else 0.7 if anchor_free else (0.6 if mode == "val" else 0.45)
    max_det = int(cfg.get("max_det") or 300)
    if effdet and "max_det" not in cfg.get("_user_keys", ()):
        max_det = EFFDET_MAX_DET
    return {"conf": (0.001 if mode == "val" else 0.25) if conf is None else float(conf),
            "iou": default_iou if iou is None else float(iou),
            "max_det": max_det, "classes": parse_classes(cfg.get("classes")),
            "agnostic": bool(cfg.get("agnostic_nms"))}


def native_imgsz(model_ref) -> int | None:
    """The input size a built-in model was defined at (EfficientDet-D0 512 ... D7x 1536), else None."""
    import re

    m = re.match(r"^efficientdet-(d\d+x?)$", str(model_ref or ""))
    if m:
        from vistrain.nn.efficientdet import EFFICIENTDET

        return EFFICIENTDET[m.group(1)][1] if m.group(1) in EFFICIENTDET else None
    return None


def no_objects_message(data_file: str, split: str, labels) -> str:
    """Why a split without a single object cannot be trained on (train) or scored (val), and what to fix."""
    from vistrain.data.yolo import label_path

    n = len(labels.items)
    what = "nothing to learn from" if split == "train" else "0 objects cannot be scored"
    if labels.dropped:
        why = (f"all {labels.dropped} label rows were dropped (first: {labels.messages[0]}); fix those rows "
               f"(cls cx cy w h or cls x1 y1 x2 y2 x3 y3 ..., normalised to 0..1)")
    else:
        why = (f"no label rows found (the labels of {labels.items[0].im_file} are read from "
               f"{label_path(Path(labels.items[0].im_file))}); put the label .txt files under labels/ next to "
               f"images/, or point '{split}:' at labelled images")
    return f"data={data_file}: {split} split: 0 objects in {n} images, {what}: {why}"


def _first_images(preds, n: int):
    """The raw outputs of the first ``n`` images of a batch (a list of levels, or a tuple holding one)."""
    if isinstance(preds, torch.Tensor):
        return preds[:n]
    return type(preds)(_first_images(p, n) for p in preds)


def one_class(items: list, cfg: dict) -> bool:
    """``single_cls=True``: every object of ``items`` becomes class 0 (in place); returns whether it applied."""
    if not cfg.get("single_cls"):
        return False
    for item in items:
        item.cls = np.zeros_like(item.cls)
    return True


class DetectTask:
    name = "detect"
    builtin_folder = "detect"  # the built-in synthetic dataset's subfolder for this task
    loss_names = ("box_loss", "obj_loss", "cls_loss")  # anchor-free heads: set by setup_model
    metric_keys = ("metrics/precision(B)", "metrics/recall(B)", "metrics/mAP50(B)", "metrics/mAP50-95(B)")

    def __init__(self):
        self.cfg: dict = {}
        self.head = None
        self.graph_nms: dict | None = None  # the NMS settings of an exported nms=True file being run
        self.loss_fn = None
        self.anchor_report: dict | None = None
        self._anchor_cache: dict = {}  # EfficientDet: input (h, w) -> anchors
        self._head_kind, self._nc = "yolov5", 0  # set_head_kind: exported models, which have no head module here
        self.data_yaml: dict | None = None

    def default_model(self) -> str:
        return "yolov5n"

    def apply_defaults(self, cfg: dict, user_keys: set[str]) -> None:
        """Detection's own defaults for keys the user left alone: imgsz 640 (EfficientDet: its own size, 512
        for D0; 128, the images' size, on the built-in dataset)."""
        if "imgsz" not in user_keys and not cfg.get("_resume_dir"):
            cfg["imgsz"] = (native_imgsz(cfg.get("model")) or 640) if cfg.get("data") else BUILTIN_IMGSZ

    # --- data ---------------------------------------------------------------------------
    def resolve_data_yaml(self, cfg: dict) -> dict:
        """The dataset of ``data=``: a YOLO dataset YAML, a Pascal VOC folder or YAML (``format: voc``), a COCO
        instances JSON, folder or YAML, or the built-in dataset when empty (``vistrain.data.yolo.load_data``)."""
        from vistrain.data.yolo import DataYAMLError, load_data

        ref = cfg.get("data")
        if not ref:
            from vistrain.data.synthetic import ensure_dataset

            ref = str(ensure_dataset() / self.builtin_folder / "data.yaml")
            LOGGER.info(f"data: the built-in synthetic shapes dataset at {ref}")
            cfg["data"] = ref
        if not Path(ref).expanduser().exists():
            raise UserError(f"data={ref}: file does not exist; give a dataset YAML (path, train, val, names), a "
                            f"Pascal VOC folder, a COCO JSON, or leave data= empty for the built-in dataset")
        try:
            return load_data(ref)
        except DataYAMLError as e:
            raise UserError(str(e)) from None

    def scan(self, data: dict, split: str, workers: int):
        """Read and verify a split (YOLO, VOC or COCO); objects marked difficult (VOC) are left out of the train
        split unless ``difficult=True``, and kept, flagged in ``ImageLabels.difficult``, in the others."""
        from vistrain.data.yolo import DataYAMLError, data_format, scan_data_split

        fmt = data_format(data)
        try:
            labels, cached = scan_data_split(data, split, workers=max(1, workers))
        except DataYAMLError as e:
            raise UserError(str(e)) from None
        n_difficult = labels.drop_difficult() if split == "train" and not self.cfg.get("difficult") else 0
        if fmt != "yolo" and self.name == "segment" and labels.items and not any(it.has_polygons for it in labels.items):
            raise UserError(f"data={data['yaml_file']}: {split} split: no polygons in the {fmt.upper()} annotations; a "
                            f"segmentation model needs a polygon for every object (COCO segmentation). Train a "
                            f"detection model (e.g. model=yolov8n) on boxes")
        if labels.items:
            self.check_labels(labels, split)
        labels.log(split)
        line = (labels.summary(split) + (f", {n_difficult} difficult left out (difficult=True keeps them)"
                                         if n_difficult else "") + (" (cached)" if cached else ""))
        if not labels.items:
            raise UserError(f"data={data['yaml_file']}: {split}: no usable images ({line})")
        if not any(len(it.cls) for it in labels.items):
            if fmt == "yolo":
                raise UserError(no_objects_message(data["yaml_file"], split, labels))
            what = "nothing to learn from" if split == "train" else "0 objects cannot be scored"
            first = next((m for m in labels.messages if m.endswith("dropped")), None)
            why = (f"all {labels.dropped} objects were dropped (first: {first})" if first else
                   f"all {n_difficult} objects are marked difficult (difficult=True trains on them)" if n_difficult
                   else "the annotations hold no objects")
            raise UserError(f"data={data['yaml_file']}: {split} split: 0 objects in {len(labels.items)} images, "
                            f"{what}: {why}")
        return labels, line

    def build_data(self, cfg: dict, need_train: bool = True) -> DataBundle:
        from vistrain.data.detect import DetectDataset

        self.cfg = cfg
        data = self.data_yaml = self.resolve_data_yaml(cfg)
        hyp = {k: cfg[k] for k in HYP_KEYS}
        summary, train = [], None
        if need_train:
            labels, line = self.scan(data, "train", cfg["workers"])
            items, lines = take_fraction(labels.items, cfg.get("fraction", 1.0))
            summary += [line, *lines]
            one_class(items, cfg)
            train = DetectDataset(items, cfg["imgsz"], augment=bool(cfg.get("augment", True)), hyp=hyp,
                                  rect=bool(cfg.get("rect")), batch_size=cfg["batch"], seed=cfg["seed"],
                                  mosaic_buffer=bool(cfg.get("mosaic_buffer")), **self.dataset_options(cfg))
        val_labels, line = self.scan(data, "val", cfg["workers"])
        summary.append(line)
        names = list(data["names"])
        if one_class(val_labels.items, cfg):
            summary.append(f"single_cls: the {len(names)} classes train and validate as one, 'item'")
            names = ["item"]
        val = DetectDataset(val_labels.items, cfg["imgsz"], augment=False, hyp=hyp, rect=True,
                            batch_size=val_batch_size(cfg, need_train), **self.dataset_options(cfg))
        from vistrain.data.cache import cache_mode

        for split, ds in (("train", train), ("val", val)):  # cache=ram|disk: decoded and resized once
            if ds is not None and cache_mode(cfg.get("cache")):
                ds.cache_images(cache_mode(cfg.get("cache")), split, cfg["workers"])
        return DataBundle(train, val, names, summary, source=data["yaml_file"])

    def dataset_options(self, cfg: dict) -> dict:
        """Extra ``DetectDataset`` arguments of the task (segmentation: masks)."""
        return {}

    def check_labels(self, labels, split: str) -> None:
        """Stop early when the labels cannot serve this task, or drop the rows that cannot (segmentation: box
        rows) with a message in ``labels.messages``; called on every scanned split before it is logged."""

    # --- model hooks --------------------------------------------------------------------
    @property
    def head_kind(self) -> str:
        """'yolov5' (anchor-based ``Detect``), 'yolov8' (anchor-free ``DetectDFL`` / ``Segment``) or 'effdet': it
        decides the loss, the decoding and the NMS.  An exported model's metadata sets it (``set_head_kind``)."""
        from vistrain.nn.efficientdet import EfficientDet
        from vistrain.nn.modules import DetectDFL

        if self.head is None:
            return self._head_kind
        return "effdet" if isinstance(self.head, EfficientDet) else "yolov8" if isinstance(self.head, DetectDFL) \
            else "yolov5"

    def set_head_kind(self, kind: str, nc: int) -> None:
        """For outputs decoded elsewhere (an exported model): no head module here, its kind and class count."""
        self.head, self._head_kind, self._nc = None, kind, int(nc)

    @property
    def anchor_free(self) -> bool:
        return self.head_kind == "yolov8"

    @property
    def effdet(self) -> bool:
        return self.head_kind == "effdet"

    def find_head(self, model: torch.nn.Module, cfg: dict):
        from vistrain.nn.efficientdet import EfficientDet
        from vistrain.nn.modules import Detect, DetectDFL, Segment

        if isinstance(model, EfficientDet):  # its class and box nets are the head; anchors come from its config
            return model
        head = next((m for m in model.modules() if isinstance(m, (Detect, DetectDFL)) and not isinstance(m, Segment)),
                    None)
        if head is None:
            raise UserError(f"model={cfg.get('model')}: no Detect head; not a detection model")
        return head

    def setup_model(self, model: torch.nn.Module, data: DataBundle | None, cfg: dict, train: bool = True) -> None:
        """Attach the loss for ``model``'s head; before training an anchor-based head, check (and evolve) its
        anchors.  An empty ``box`` gain takes the head's default (YOLOv5 0.05, YOLOv8 7.5)."""
        self.head, self.cfg = self.find_head(model, cfg), cfg
        if self.effdet:
            from vistrain.losses.effdet import EffDetLoss

            preset = cfg.get("loss") or "effdet"
            if preset not in ("effdet", "tutorial"):
                raise UserError(f"loss={preset}: EfficientDet's loss presets are effdet and tutorial")
            self.loss_fn = EffDetLoss(model.nc, preset=preset, **model.anchor_config(),
                                      **({} if cfg.get("box") is None else {"box_loss_weight": float(cfg["box"])}))
            self.loss_names = self.loss_fn.names
            if data is not None and getattr(data.val, "rect", False):
                data.val.square()  # not rectangular batches padded by half a stride: the size it trains and predicts at
            return
        if self.anchor_free:
            self.loss_fn = self.make_loss(model, cfg)
            self.loss_names = self.loss_fn.names
            return
        from vistrain.losses.yolov5 import YOLOv5Loss

        if train and cfg.get("autoanchor", True) and data is not None and data.train is not None:
            self.autoanchor(self.head, data.train, cfg)
        hyp = {k: cfg[k] for k in ("box", "obj", "cls", "anchor_t", "label_smoothing")}
        hyp["box"] = 0.05 if hyp["box"] is None else hyp["box"]
        self.loss_fn = YOLOv5Loss.from_model(model, {**hyp, "imgsz": cfg["imgsz"]})

    def make_loss(self, model: torch.nn.Module, cfg: dict):
        from vistrain.losses.yolov8 import DetectLoss

        return DetectLoss.from_model(model, {"box": 7.5 if cfg["box"] is None else cfg["box"], "cls": cfg["cls"],
                                             "dfl": cfg["dfl"]})

    def autoanchor(self, head, dataset, cfg: dict) -> None:
        from vistrain.ops.anchors import check_anchors

        rng = np.random.default_rng(cfg.get("seed", 0))
        # label sizes in pixels once the image's long side is imgsz, as the model sees them
        wh = [it.boxes[:, 2:4] * np.array(it.shape[::-1]) * (cfg["imgsz"] / max(it.shape)) for it in dataset.items]
        wh = np.concatenate(wh, 0) if wh else np.zeros((0, 2))
        if not len(wh):
            return
        wh = wh * rng.uniform(0.9, 1.1, size=(len(wh), 1))  # as at train time, with random scale
        new, report = check_anchors(wh, head.anchors.cpu(), head.stride.cpu(), cfg["imgsz"],
                                    thr=cfg["anchor_t"], rng=rng)
        LOGGER.info(f"autoanchor: {report['message']}")
        if new is not None:
            head.anchors.copy_(new.to(head.anchors))
        self.anchor_report = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in report.items()}

    def state(self) -> dict:
        """What the task adds to a checkpoint: the autoanchor report."""
        return {"autoanchor": self.anchor_report} if self.anchor_report else {}

    def epoch_start(self, trainer) -> bool:
        """``close_mosaic``: for the last N epochs train without mosaic; returns True if the train
        dataset changed (the trainer then rebuilds its loader, whose workers hold copies)."""
        n = int(self.cfg.get("close_mosaic") or 0)
        ds = trainer.data.train
        if n and ds.mosaic > 0 and trainer.epoch >= trainer.epochs - n:
            ds.close_mosaic()
            LOGGER.info(f"close_mosaic: mosaic off for the last {min(n, trainer.epochs)} epochs")
            return True
        return False

    # --- batches ------------------------------------------------------------------------
    @staticmethod
    def collate_fn(samples: list[dict]) -> dict[str, Any]:
        from vistrain.data.detect import collate

        return collate(samples)

    def preprocess(self, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        nb = device.type == "cuda"
        out = dict(batch)
        out["img"] = batch["img"].to(device, non_blocking=nb).float().div_(255.0)
        out["targets"] = batch["targets"].to(device, non_blocking=nb)
        return out

    def loss(self, preds: list[torch.Tensor], batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loss_fn(preds, batch["targets"])

    def nms_settings(self, cfg: dict, mode: str) -> dict:
        return nms_settings(cfg, mode, anchor_free=self.anchor_free, effdet=self.effdet)

    def decode(self, preds):
        """Raw head outputs -> what an exported model returns, before NMS: ``Tensor[B, N, C]`` in input pixels.
        YOLOv5: (cx, cy, w, h), objectness, class probabilities; YOLOv8: (cx, cy, w, h), class probabilities
        (Segment: then its mask coefficients; see ``SegmentTask.decode``); EfficientDet: (x1, y1, x2, y2) of every
        anchor, class probabilities.  Pure tensor code, traced into exported graphs."""
        from vistrain.ops.boxes import decode_dfl, decode_yolov5

        if self.effdet:
            from vistrain.ops.retina import decode_outputs, make_anchors

            cls_outs, box_outs = preds
            # inputs are multiples of 32 (letterbox), so P3 (1/8, rounded up) gives the input size exactly
            hw = tuple(int(s) * 8 for s in cls_outs[0].shape[-2:])
            if hw not in self._anchor_cache:
                self._anchor_cache = {hw: make_anchors(hw, **self.head.anchor_config())}
            return decode_outputs(cls_outs, box_outs, self._anchor_cache[hw].to(cls_outs[0].device))
        if not self.anchor_free:
            return decode_yolov5(preds, self.head.anchors, self.head.stride)
        levels, coef = (preds[0], preds[1]) if isinstance(preds, tuple) else (preds, None)
        decoded = decode_dfl(levels, self.head.stride, self.head.reg_max)
        return decoded if coef is None else torch.cat((decoded, coef.transpose(1, 2).float()), -1)

    def select(self, decoded: torch.Tensor, settings: dict) -> list[torch.Tensor]:
        """``decode``'s output (from the model here or from an exported one) -> per image ``Tensor[K, 6 + E]``
        (x1, y1, x2, y2, score, class, E extra columns: mask coefficients) in input pixels, best first."""
        from vistrain.ops.boxes import non_max_suppression

        if self.graph_nms:  # an exported file made with nms=True: its rows are the detections
            from vistrain.deploy.nms import unpad

            return unpad(decoded, settings)
        kw = {k: settings[k] for k in ("conf", "iou", "classes", "agnostic", "max_det")}
        if self.effdet:
            from vistrain.ops.retina import select_detections

            return select_detections(decoded, soft_nms=bool(self.cfg.get("soft_nms")), **kw)
        if not self.anchor_free:
            return non_max_suppression(decoded, **kw)
        nc = self.head.nc if self.head is not None else self._nc
        return non_max_suppression(decoded, objectness=False, nc=nc, **kw)

    def postprocess(self, preds, settings: dict) -> list[torch.Tensor]:
        """Raw head outputs -> per image detections: ``select(decode(preds))``."""
        return self.select(self.decode(preds), settings)

    # --- metrics --------------------------------------------------------------------------
    def new_metrics(self, names: list[str]):
        from vistrain.metrics.detect import DetectMetrics

        from vistrain.data.yolo import data_format

        # VOC data: VOC AP50 (all-point and VOC2007 11-point) beside the COCO metrics
        return DetectMetrics(names, voc=bool(self.data_yaml) and data_format(self.data_yaml) == "voc")

    def update_metrics(self, metrics, preds, batch: dict[str, Any], decoded: bool = False) -> None:
        """Score a batch: ``preds`` the model's raw outputs, or ``decode``'s (``decoded``: an exported model's)."""
        from vistrain.data.augment import scale_boxes_back

        dets = self.select(preds if decoded else self.decode(preds), self.nms_settings(self.cfg, "val"))
        for i, det in enumerate(dets):
            det = det.detach().float().cpu().clone()
            h0, w0 = batch["ori_shape"][i]
            det[:, :4] = torch.as_tensor(scale_boxes_back(det[:, :4].numpy(), *batch["ratio_pad"][i], (h0, w0)))
            gt = batch["ori_labels"][i]
            metrics.update(det, torch.as_tensor(gt["boxes"]), torch.as_tensor(gt["cls"]),
                           image_id=Path(batch["im_file"][i]).stem, image_size=(w0, h0),
                           file_name=batch["im_file"][i], difficult=gt.get("difficult"))

    def report(self, metrics, names: list[str]) -> list[str]:
        return metrics.summary_lines()

    def save_json(self, metrics, save_dir: Path) -> None:
        """``predictions.json`` and ``annotations.json`` (COCO) beside ``metrics.json``."""
        from vistrain.metrics.detect import write_coco_json

        write_coco_json(metrics, save_dir)

    # --- plots --------------------------------------------------------------------------
    def plot_batch(self, batch: dict[str, Any], names: list[str], path: Path, preds: Any = None) -> None:
        from vistrain.ops.boxes import xywh2xyxy
        from vistrain.utils.plotting import plot_detections

        imgs = batch["img"][:16].detach().float().cpu()
        imgs = (imgs * 255).round().clamp(0, 255).to(torch.uint8) if imgs.max() <= 1.0 else imgs.to(torch.uint8)
        h, w = imgs.shape[2:]
        if preds is None:
            t = batch["targets"].detach().cpu()
            boxes = []
            for i in range(len(imgs)):
                ti = t[t[:, 0] == i]
                xyxy = xywh2xyxy(ti[:, 2:6]) * torch.tensor([w, h, w, h])
                boxes.append(torch.cat((xyxy, torch.ones(len(ti), 1), ti[:, 1:2]), 1))
        else:
            settings = {**self.nms_settings(self.cfg, "predict"), "conf": 0.25}
            boxes = [d[:, :6].detach().cpu() for d in self.postprocess(_first_images(preds, 16), settings)]
        plot_detections(imgs, boxes, names, path, show_conf=preds is not None)

    def plot_metrics(self, metrics, names: list[str], save_dir: Path) -> None:
        metrics.plot(save_dir)

    def plot_labels(self, dataset, names: list[str], save_dir: Path) -> None:
        from vistrain.utils.plotting import plot_label_distribution

        cls = np.concatenate([it.cls for it in dataset.items]) if dataset.items else np.zeros(0)
        boxes = np.concatenate([it.boxes for it in dataset.items]) if dataset.items else np.zeros((0, 4))
        plot_label_distribution(cls, boxes, names, save_dir / "labels.jpg")

    # --- prediction ---------------------------------------------------------------------
    def predict_preprocess(self, image, imgsz: int, stride: int | None = None) -> tuple[torch.Tensor, tuple]:
        """Letterbox to fit ``imgsz``: padded to the square ``imgsz`` x ``imgsz``, or with ``stride`` only to the
        next multiple of it (a 640 x 480 image stays 640 x 480: less to compute; the predictor gives ``stride``
        when the model accepts any size).  meta = (ratio, pad, original (h, w), input (h, w))."""
        from vistrain.data.augment import letterbox

        img = np.asarray(image.convert("RGB"))
        out, ratio, pad = letterbox(img, imgsz, auto=stride is not None, scaleup=True, stride=stride or 32)
        x = torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1))).float().div_(255.0)
        return x, (ratio, pad, img.shape[:2], out.shape[:2])

    def predict_stride(self, model) -> int | None:
        """The stride for ``predict_preprocess``'s smaller rectangular letterbox when ``model`` (a PyTorch model
        or an exported file made with ``dynamic=True``) runs any multiple of it, else None (square).
        EfficientDet stays square, as effdet predicts and as it validates."""
        if self.effdet:
            return None
        if getattr(model, "exported", False):
            return int(model.meta["stride"]) if model.meta.get("dynamic_hw") else None
        return int(self.head.stride.max()) if self.head is not None else None

    def predict_postprocess(self, decoded: torch.Tensor, cfg: dict, metas: list) -> list[torch.Tensor]:
        """``decode``'s output (the PyTorch model's or an exported model's) -> per image ``Tensor[K, 6]`` (x1, y1,
        x2, y2, score, class) in original-image pixels."""
        from vistrain.data.augment import scale_boxes_back

        out = []
        for det, (ratio, pad, shape, _) in zip(self.select(decoded, self.nms_settings(cfg, "predict")), metas):
            det = det.detach().float().cpu().clone()
            det[:, :4] = torch.as_tensor(scale_boxes_back(det[:, :4].numpy(), ratio, pad, shape), dtype=torch.float32)
            out.append(det)
        return out

    def make_result(self, path: str, names: list[str], image, out: torch.Tensor):
        from vistrain.engine.results import Result

        return Result(path, names, (image.height, image.width), boxes=out, orig_img=image)

    def describe(self, result, cfg: dict) -> str:
        if not len(result.boxes):
            return "no detections"
        counts = torch.bincount(result.boxes.cls.long(), minlength=len(result.names))
        return ", ".join(f"{int(n)} {result.names[i]}" for i, n in enumerate(counts) if n)

    def write_predictions(self, results: list, save_dir: Path, cfg: dict) -> None:
        """``labels/NAME.txt`` per image (``cls cx cy w h conf``, normalised) and ``predictions.json``."""
        labels = save_dir / "labels"
        labels.mkdir(exist_ok=True)
        records = []
        for r in results:
            h, w = r.orig_shape
            stem = Path(r.path).stem + (f"_{r.extra['frame']}" if "frame" in r.extra else "")
            rows, dets = [], []
            for x1, y1, x2, y2, score, c in r.boxes.data.tolist():
                rows.append(f"{int(c)} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} "
                            f"{(y2 - y1) / h:.6f} {score:.5f}\n")
                dets.append({"class": int(c), "name": r.names[int(c)], "confidence": round(score, 5),
                             "box": [round(v, 2) for v in (x1, y1, x2, y2)]})
            (labels / f"{stem}.txt").write_text("".join(rows))
            records.append({"image": r.path, **({"frame": r.extra["frame"]} if "frame" in r.extra else {}),
                            "width": w, "height": h, "detections": dets})
        (save_dir / "predictions.json").write_text(json.dumps(records, indent=1))
