"""The ``predict`` mode: sources (files, folders, globs) -> model -> results, printed and saved."""

from __future__ import annotations

import csv
import glob
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vistrain.engine.results import Result
from vistrain.engine.utils import LOGGER, UserError
from vistrain.nn.model import set_memory_format


VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mkv", ".m4v", ".mpg", ".mpeg", ".wmv", ".webm"})


def is_video_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def _describe(source) -> str:
    items = source if isinstance(source, (list, tuple)) else [source]
    text = ",".join(str(x) if isinstance(x, (str, Path)) else type(x).__name__ for x in items)
    return text if len(text) <= 200 else text[:200] + "..."


def in_memory_image(item, index: int):
    """A numpy array (``HxW`` or ``HxWx3`` BGR, as OpenCV reads; ``HxWx4`` BGRA), a PIL image or a torch tensor
    (``CxHxW`` or ``BxCxHxW``, RGB, 0..1) -> list of RGB PIL images; None when ``item`` is none of these."""
    from PIL import Image

    if isinstance(item, Image.Image):
        return [item.convert("RGB")]
    if isinstance(item, np.ndarray):
        a = item
        if a.dtype != np.uint8:
            a = np.clip(a, 0, 255).astype(np.uint8)
        if a.ndim == 2:
            return [Image.fromarray(a).convert("RGB")]
        if a.ndim == 3 and a.shape[2] in (3, 4):
            return [Image.fromarray(np.ascontiguousarray(a[:, :, 2::-1]))]
        raise UserError(f"source={_describe(item)} #{index}: a numpy image must be HxW or HxWx3 (BGR), got shape "
                        f"{tuple(a.shape)}")
    if isinstance(item, torch.Tensor):
        t = item.detach().float().cpu()
        if t.ndim == 3:
            t = t[None]
        if t.ndim != 4 or t.shape[1] != 3:
            raise UserError(f"source=Tensor #{index}: give CxHxW or BxCxHxW RGB in 0..1, got shape {tuple(item.shape)}")
        u8 = (t.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return [Image.fromarray(x) for x in u8]
    return None


def resolve_sources(source) -> list:
    """Expand files, folders (their images and videos, sorted) and globs into paths, and in-memory images into
    ``Frame``s named ``imageN.jpg``; error if none.  A comma-separated string is a list."""
    from vistrain.data.image import is_image_file

    def wanted(x) -> bool:
        return is_image_file(x) or is_video_file(x)

    if source is None or (isinstance(source, str) and source == ""):
        raise UserError("source= is empty: give an image, a video, a folder, or a glob, e.g. source='images/*.jpg'")
    items = list(source) if isinstance(source, (list, tuple)) else [source]
    if len(items) == 1 and isinstance(items[0], str) and "," in items[0] and not Path(items[0]).exists():
        items = [x.strip() for x in items[0].split(",") if x.strip()]
    out: list = []
    n_memory = 0
    for i, item in enumerate(items):
        if not isinstance(item, (str, Path)):
            images = in_memory_image(item, i)
            if images is None:
                raise UserError(f"source: item {i} is a {type(item).__name__}; give paths, numpy arrays, PIL images or "
                                f"torch tensors")
            for im in images:
                out.append(Frame(Path(f"image{n_memory}.jpg"), im))
                n_memory += 1
            continue
        s = str(item)
        p = Path(s)
        if s.lower().startswith(("http://", "https://", "rtsp://", "rtmp://")):
            raise UserError(f"source={s}: vistrain does not download; save the file and give its path")
        if p.is_dir():
            out += sorted(x for x in p.iterdir() if x.is_file() and wanted(x))
        elif p.is_file():
            out.append(p)
        elif any(c in s for c in "*?["):
            out += sorted(Path(x) for x in glob.glob(s, recursive=True) if wanted(x))
        else:
            raise UserError(f"source={s}: no such file or folder")
    if not out:
        raise UserError(f"source={_describe(source)}: no images or videos found (looked for .jpg, .png, .bmp, .mp4, "
                        f"...)")
    return out


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
        if isinstance(p, Frame):  # an in-memory image
            yield p
            continue
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


def predict(cfg: dict, prepared: tuple | None = None):
    """Run ``predict``: a list of ``Result``, or with ``stream=True`` a generator giving them one by one (for long
    videos: nothing is kept).  With ``save`` the run folder gets the drawn images (videos: ``NAME.mp4``) and the
    task's prediction files; without it nothing is written."""
    run = _predict(cfg, prepared)
    return run if cfg.get("stream") else list(run)


def prepare_predictor(cfg: dict) -> tuple:
    """``(task, model as predict runs it, checkpoint dict, device)`` for ``cfg['model']``: what a ``Model`` keeps
    between ``predict`` calls, so that the model (or ONNX Runtime session) is built once."""
    from vistrain.engine.run import resolve_task_and_model
    from vistrain.engine.utils import select_device

    cfg["_mode"] = "predict"
    task, model, ckpt = resolve_task_and_model(cfg, need_model=True)
    device = select_device(cfg.get("device"))
    if not getattr(model, "exported", False):  # an exported file's outputs are decoded already
        model = inference_model(model, task, cfg, device)
    return task, model, ckpt, device


def _predict(cfg: dict, prepared: tuple | None = None):
    from vistrain.engine.run import prepare_run, user_keys

    cfg["_mode"] = "predict"
    task, model, ckpt, device = prepared or prepare_predictor(cfg)
    if hasattr(task, "set_head_kind"):
        task.cfg = cfg  # this call's NMS keys (soft_nms)
    sources = resolve_sources(cfg.get("source"))
    if "imgsz" not in user_keys(cfg) and ckpt.get("imgsz"):
        cfg["imgsz"] = ckpt["imgsz"]
    names = list(ckpt.get("names") or [str(i) for i in range(ckpt["model_yaml"].get("nc", 0))])
    save = bool(cfg["save"])
    inspect = Inspection(cfg, model)  # visualize= / embed= / profile=
    save_dir = prepare_run(cfg, task, default_name="predict")[1] if save or inspect.visualize else None
    stride = task.predict_stride(model)
    kept: list[Result] = []  # for the prediction files (save)
    skipped: list[str] = []
    count = 0
    videos = _VideoWriters(save_dir) if save else None
    try:
        for frames in _batches(iter_frames(sources, skipped), max(1, int(cfg["batch"]))):
            inputs, metas = zip(*(task.predict_preprocess(f.image, cfg["imgsz"], stride) for f in frames))
            if len({x.shape for x in inputs}) > 1:  # rectangles of different shapes: square, so they stack
                inputs, metas = zip(*(task.predict_preprocess(f.image, cfg["imgsz"]) for f in frames))
            x = torch.stack(inputs).to(device)
            with torch.no_grad(), inspect.capture() as layer_outputs:
                outputs = task.predict_postprocess(model(x), cfg, list(metas))
            inspect.profile_once(x)
            for b, (f, out) in enumerate(zip(frames, outputs)):
                r = task.make_result(str(f.path), names, f.image, out)
                inspect.apply(r, layer_outputs, b, f, save_dir)
                if f.index is not None:
                    r.extra["frame"] = f.index
                count += 1
                where = f"{f.path} frame {f.index}" if f.index is not None else str(f.path)
                LOGGER.info(f"{count}: {where}: {task.describe(r, cfg)}")
                if save:
                    r.extra["save_dir"] = str(save_dir)
                    kept.append(r)
                    drawn = r.annotated()
                    if f.index is None:
                        drawn.save(save_dir / f"{f.name}.jpg", quality=90)
                    else:
                        videos.write(f, drawn)
                yield r
    finally:
        if videos is not None:
            videos.close()
    if not count:  # every source was unreadable: nothing to show, and exit 0 would hide it
        more = f" (and {len(skipped) - 1} more unreadable)" if len(skipped) > 1 else ""
        raise UserError(f"source={_describe(cfg.get('source'))}: nothing could be predicted: "
                        f"{skipped[0] if skipped else '?'}{more}; give images (.jpg, .png, ...) or videos that "
                        f"PIL / OpenCV can read")
    if save:
        task.write_predictions(kept, save_dir, cfg)
        if inspect.embed and cfg.get("save_json"):
            inspect.write_embeddings(kept, save_dir)
    LOGGER.info(f"{count} images predicted" + (f", {len(skipped)} unreadable skipped" if skipped else "")
                + (f". Results saved to {save_dir}" if save else ""))


class Inspection:
    """predict's ``visualize`` (feature maps of the chosen layers, one PNG per layer and image), ``embed`` (the
    chosen layers' outputs pooled into ``Result.embedding``) and ``profile`` (a per-layer time and GFLOPs table,
    once, on the first batch): forward hooks around the model (``vistrain.utils.layers``), its outputs unchanged."""

    def __init__(self, cfg: dict, model):
        from vistrain.utils import layers as L

        self.visualize = self.embed = None
        self.profile = bool(cfg.get("profile"))
        if not (self.profile or any(str(cfg.get(k) or "").strip().lower() not in ("", "false", "none")
                                    for k in ("visualize", "embed"))):
            return
        if getattr(model, "exported", False):
            raise UserError(f"visualize, embed and profile look inside the network: give a .pt checkpoint, not the "
                            f"exported {cfg.get('model')}")
        self.model, self.layers = model, L.model_layers(model)
        self.visualize = L.parse_layers(cfg.get("visualize"), self.layers, "visualize")
        spec = cfg.get("embed")
        if str(spec).strip().lower() in ("true", "default"):
            self.embed = [L.default_embed_layer(self.layers)]
        else:
            self.embed = L.parse_layers(spec, self.layers, "embed")

    def capture(self):
        from contextlib import nullcontext

        from vistrain.utils import layers as L

        wanted = sorted(set(self.visualize or []) | set(self.embed or []))
        return L.capture(self.model, wanted) if wanted else nullcontext({})

    def apply(self, r: Result, outputs: dict, b: int, frame, save_dir: Path | None) -> None:
        from vistrain.utils import layers as L

        if self.embed:
            r.embedding = torch.cat([L.pooled(outputs[k])[b] for k in self.embed]).cpu()
        if self.visualize and save_dir is not None:
            r.extra["feature_maps"] = [str(p) for p in L.save_feature_maps(outputs, self.layers, b, frame.name,
                                                                            save_dir)]

    def write_embeddings(self, results: list[Result], save_dir: Path) -> None:
        """``embeddings.json``: per image (and video frame) its embedding, with the layers it pools."""
        layers = [self.layers[k][0] for k in self.embed]
        records = [{"image": r.path, **({"frame": r.extra["frame"]} if "frame" in r.extra else {}), "layers": layers,
                    "embedding": [float(v) for v in r.embedding]} for r in results]
        (save_dir / "embeddings.json").write_text(json.dumps(records))

    def profile_once(self, x: torch.Tensor) -> None:
        from vistrain.utils import layers as L

        if self.profile:
            self.profile = False
            prof = L.profile_layers(self.model, x)
            LOGGER.info(f"profile: batch {tuple(x.shape)} on {x.device}, median of 3 passes")
            for line in L.profile_table(prof):
                LOGGER.info(line)


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
