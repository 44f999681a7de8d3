"""The ``predict`` mode: sources (files, folders, globs) -> model -> results, printed and saved."""

from __future__ import annotations

import csv
import glob
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vistrain.engine.utils import LOGGER, UserError


@dataclass
class Result:
    """Prediction for one image. ``probs (Tensor[C])`` for classification; detection adds ``boxes``."""

    path: str
    names: list[str]
    orig_shape: tuple[int, int]  # (height, width)
    probs: torch.Tensor | None = None
    boxes: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def topk(self, k: int = 5) -> list[tuple[str, float]]:
        """The ``k`` most likely classes as (name, probability), most likely first."""
        conf, idx = self.probs.topk(min(k, len(self.probs)))
        return [(self.names[int(i)], float(c)) for c, i in zip(conf, idx)]

    @property
    def top1(self) -> tuple[str, float]:
        return self.topk(1)[0]


def resolve_sources(source: str | list | tuple | None) -> list[Path]:
    """Expand files, folders (their images, sorted) and globs into image paths; error if none."""
    from vistrain.data.image import is_image_file

    if source is None or source == "":
        raise UserError("source= is empty: give an image, a folder, or a glob, e.g. source='images/*.jpg'")
    items = source if isinstance(source, (list, tuple)) else [source]
    paths: list[Path] = []
    for item in items:
        s = str(item)
        p = Path(s)
        if p.is_dir():
            paths += sorted(x for x in p.iterdir() if x.is_file() and is_image_file(x))
        elif p.is_file():
            paths.append(p)
        elif any(c in s for c in "*?["):
            paths += sorted(Path(x) for x in glob.glob(s, recursive=True) if is_image_file(x))
        else:
            raise UserError(f"source={s}: no such file or folder")
    if not paths:
        raise UserError(f"source={source}: no images found (looked for {', '.join(sorted({'.jpg', '.png', '.bmp'}))} ...)")
    return paths


def predict(cfg: dict) -> list[Result]:
    from vistrain.data.image import BadImageError, load_image
    from vistrain.engine.run import prepare_run, resolve_task_and_model, user_keys
    from vistrain.utils.plotting import draw_label

    cfg["_mode"] = "predict"
    task, model, ckpt = resolve_task_and_model(cfg, need_model=True)
    paths = resolve_sources(cfg.get("source"))
    if "imgsz" not in user_keys(cfg) and ckpt.get("imgsz"):
        cfg["imgsz"] = ckpt["imgsz"]
    names = list(ckpt.get("names") or [str(i) for i in range(ckpt["model_yaml"].get("nc", 0))])
    device, save_dir = prepare_run(cfg, task, default_name="predict")
    model = model.to(device).eval()
    results: list[Result] = []
    skipped: list[str] = []
    batch = max(1, int(cfg["batch"]))
    for start in range(0, len(paths), batch):
        images, kept = [], []
        for p in paths[start:start + batch]:
            try:
                images.append(load_image(p))
                kept.append(p)
            except BadImageError as e:
                LOGGER.warning(f"WARNING skipped {e}")
                skipped.append(str(p))
        if not images:
            continue
        x = torch.stack([task.predict_preprocess(im, cfg["imgsz"]) for im in images]).to(device)
        with torch.no_grad():
            outputs = task.predict_postprocess(model(x), cfg)
        for p, im, out in zip(kept, images, outputs):
            r = Result(str(p), names, (im.height, im.width), probs=out)
            results.append(r)
            shown = ", ".join(f"{n} {c:.2f}" for n, c in r.topk(cfg["topk"]))
            LOGGER.info(f"image {len(results)}/{len(paths)} {p}: {shown}")
            if cfg["save"]:
                name, conf = r.top1
                draw_label(im, f"{name} {conf:.2f}").save(save_dir / f"{p.stem}.jpg")
    write_predictions(results, save_dir, cfg["topk"], cfg["save_json"])
    LOGGER.info(f"{len(results)} images predicted" + (f", {len(skipped)} unreadable skipped" if skipped else "")
                + f". Results saved to {save_dir}")
    for r in results:
        r.extra["save_dir"] = str(save_dir)
    return results


def write_predictions(results: list[Result], save_dir: Path, k: int, save_json: bool) -> None:
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
