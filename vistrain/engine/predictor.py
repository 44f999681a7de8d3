"""The ``predict`` mode: sources (files, folders, globs) -> model -> results, printed and saved."""

from __future__ import annotations

import csv
import glob
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vistrain.engine.utils import LOGGER, UserError
from vistrain.nn.model import set_memory_format


@dataclass
class Result:
    """Prediction for one image. ``probs (Tensor[C])`` for classification; detection adds ``boxes
    (Tensor[N, 6])`` (x1, y1, x2, y2, score, class in original pixels); segmentation also ``masks`` (bool
    ``Tensor[N, H, W]`` at the original image size)."""

    path: str
    names: list[str]
    orig_shape: tuple[int, int]  # (height, width)
    probs: torch.Tensor | None = None
    boxes: torch.Tensor | None = None
    masks: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def topk(self, k: int = 5) -> list[tuple[str, float]]:
        """The ``k`` most likely classes as (name, probability), most likely first."""
        conf, idx = self.probs.topk(min(k, len(self.probs)))
        return [(self.names[int(i)], float(c)) for c, i in zip(conf, idx)]

    @property
    def top1(self) -> tuple[str, float]:
        return self.topk(1)[0]


VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mkv", ".m4v", ".mpg", ".mpeg", ".wmv", ".webm"})


def is_video_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def resolve_sources(source: str | list | tuple | None) -> list[Path]:
    """Expand files, folders (their images and videos, sorted) and globs into paths; error if none."""
    from vistrain.data.image import is_image_file

    def wanted(x) -> bool:
        return is_image_file(x) or is_video_file(x)

    if source is None or source == "":
        raise UserError("source= is empty: give an image, a video, a folder, or a glob, e.g. source='images/*.jpg'")
    items = source if isinstance(source, (list, tuple)) else [source]
    paths: list[Path] = []
    for item in items:
        s = str(item)
        p = Path(s)
        if p.is_dir():
            paths += sorted(x for x in p.iterdir() if x.is_file() and wanted(x))
        elif p.is_file():
            paths.append(p)
        elif any(c in s for c in "*?["):
            paths += sorted(Path(x) for x in glob.glob(s, recursive=True) if wanted(x))
        else:
            raise UserError(f"source={s}: no such file or folder")
    if not paths:
        raise UserError(f"source={source}: no images or videos found (looked for .jpg, .png, .bmp, .mp4, ...)")
    return paths


@dataclass
class Frame:
    """One input picture: an image file, or frame ``index`` of a video."""

    path: Path
    image: Any  # PIL.Image, RGB
    index: int | None = None  # video frame number
    fps: float = 0.0

    @property
    def name(self) -> str:
        return self.path.stem if self.index is None else f"{self.path.stem}_{self.index}"


def iter_frames(paths: list[Path], skipped: list[str]):
    """Yield a :class:`Frame` per image and per video frame; unreadable files are logged and skipped."""
    from vistrain.data.image import BadImageError, load_image

    for p in paths:
        if is_video_file(p):
            yield from _video_frames(p, skipped)
            continue
        try:
            yield Frame(p, load_image(p))
        except BadImageError as e:
            LOGGER.warning(f"WARNING skipped {e}")
            skipped.append(str(e))


def _video_frames(path: Path, skipped: list[str]):
    import cv2
    from PIL import Image

    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        LOGGER.warning(f"WARNING skipped {path}: cannot open video")
        skipped.append(f"{path}: cannot open video")
        return
    fps, i = cap.get(cv2.CAP_PROP_FPS) or 25.0, 0
    try:
        while True:
            ok, bgr = cap.read()
            if not ok:
                break
            yield Frame(path, Image.fromarray(bgr[:, :, ::-1].copy()), i, fps)
            i += 1
    finally:
        cap.release()
    if i == 0:
        LOGGER.warning(f"WARNING skipped {path}: no frames could be read")
        skipped.append(f"{path}: no frames could be read")


def _batches(frames, size: int):
    batch = []
    for f in frames:
        batch.append(f)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class _VideoWriters:
    """Annotated frames of each video go to ``save_dir/NAME.mp4``."""

    def __init__(self, save_dir: Path):
        self.save_dir, self.writers = save_dir, {}

    def write(self, frame: Frame, image) -> None:
        import cv2

        w = self.writers.get(frame.path)
        if w is None:
            fourcc = cv2.VideoWriter_fourcc(*"mp4v")
            w = self.writers[frame.path] = cv2.VideoWriter(str(self.save_dir / f"{frame.path.stem}.mp4"), fourcc,
                                                           frame.fps, image.size)
        w.write(np.asarray(image.convert("RGB"))[:, :, ::-1].copy())

    def close(self) -> None:
        for w in self.writers.values():
            w.release()


def predict(cfg: dict) -> list[Result]:
    from vistrain.engine.run import prepare_run, resolve_task_and_model, user_keys

    cfg["_mode"] = "predict"
    task, model, ckpt = resolve_task_and_model(cfg, need_model=True)
    paths = resolve_sources(cfg.get("source"))
    if "imgsz" not in user_keys(cfg) and ckpt.get("imgsz"):
        cfg["imgsz"] = ckpt["imgsz"]
    names = list(ckpt.get("names") or [str(i) for i in range(ckpt["model_yaml"].get("nc", 0))])
    device, save_dir = prepare_run(cfg, task, default_name="predict")
    if not getattr(model, "exported", False):  # an exported file's outputs are decoded already
        model = inference_model(model, task, cfg, device)
    stride = task.predict_stride(model)
    results: list[Result] = []
    skipped: list[str] = []
    videos = _VideoWriters(save_dir)
    try:
        for frames in _batches(iter_frames(paths, skipped), max(1, int(cfg["batch"]))):
            inputs, metas = zip(*(task.predict_preprocess(f.image, cfg["imgsz"], stride) for f in frames))
            if len({x.shape for x in inputs}) > 1:  # rectangles of different shapes: square, so they stack
                inputs, metas = zip(*(task.predict_preprocess(f.image, cfg["imgsz"]) for f in frames))
            with torch.no_grad():
                outputs = task.predict_postprocess(model(torch.stack(inputs).to(device)), cfg, list(metas))
            for f, out in zip(frames, outputs):
                r = task.make_result(str(f.path), names, f.image, out)
                if f.index is not None:
                    r.extra["frame"] = f.index
                results.append(r)
                where = f"{f.path} frame {f.index}" if f.index is not None else str(f.path)
                LOGGER.info(f"{len(results)}: {where}: {task.describe(r, cfg)}")
                if cfg["save"]:
                    drawn = task.draw(r, f.image)
                    if f.index is None:
                        drawn.save(save_dir / f"{f.name}.jpg", quality=90)
                    else:
                        videos.write(f, drawn)
    finally:
        videos.close()
    if not results:  # every source was unreadable: nothing to show, and exit 0 would hide it
        more = f" (and {len(skipped) - 1} more unreadable)" if len(skipped) > 1 else ""
        raise UserError(f"source={cfg.get('source')}: nothing could be predicted: {skipped[0] if skipped else '?'}"
                        f"{more}; give images (.jpg, .png, ...) or videos that PIL / OpenCV can read")
    task.write_predictions(results, save_dir, cfg)
    LOGGER.info(f"{len(results)} images predicted" + (f", {len(skipped)} unreadable skipped" if skipped else "")
                + f". Results saved to {save_dir}")
    for r in results:
        r.extra["save_dir"] = str(save_dir)
    return results


def inference_model(model, task, cfg: dict, device):
    """The checkpoint's model as ``predict`` runs it, and as ``export`` writes it: eval mode, BatchNorm folded
    (``fuse``), NHWC weights (``channels_last``), the task's ``decode`` after it (``InferenceModel``)."""
    from vistrain.deploy.export import InferenceModel

    model = model.to(device).eval()
    if cfg.get("fuse", True):
        from vistrain.nn.model import fuse_conv_bn

        fuse_conv_bn(model)
    set_memory_format(model, cfg["channels_last"])
    if hasattr(task, "setup_model"):
        task.setup_model(model, None, cfg, train=False)
    return InferenceModel(model, task).eval()


def write_classify_predictions(results: list[Result], save_dir: Path, k: int, save_json: bool) -> None:
    """predictions.csv (image, top-k classes and probabilities); predictions.json when asked."""
    with open(save_dir / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image"] + [c for j in range(1, k + 1) for c in (f"top{j}_class", f"top{j}_prob")])
        for r in results:
            w.writerow([r.path] + [x for name, p in r.topk(k) for x in (name, f"{p:.6f}")])
    if save_json:
        data = [{"image": r.path, "top": [{"class": r.names.index(n), "name": n, "prob": round(p, 6)}
                                          for n, p in r.topk(k)]} for r in results]
        (save_dir / "predictions.json").write_text(json.dumps(data, indent=1))
