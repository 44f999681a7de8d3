"""Plots written into a run folder: results curves, confusion matrix, image grids, labelled images.

matplotlib runs headless (Agg) and uses its bundled fonts; nothing is downloaded.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType support for sized default font
        return ImageFont.load_default()


def draw_label(image: Image.Image, text: str) -> Image.Image:
    """Return a copy of ``image`` with ``text`` written on a dark band at the top left."""
    image = image.convert("RGB").copy()
    draw = ImageDraw.Draw(image)
    size = max(12, image.height // 20)
    font = _font(size)
    x0, y0, x1, y1 = draw.textbbox((4, 2), text, font=font)
    draw.rectangle((0, 0, x1 + 4, y1 + 4), fill=(0, 0, 0))
    draw.text((4, 2), text, fill=(255, 255, 255), font=font)
    return image


def plot_image_grid(images: torch.Tensor, labels: list[str], path: str | Path, max_images: int = 16) -> None:
    """``images (Tensor[B, 3, H, W] uint8)`` tiled into a square grid, each with its label."""
    images = images[:max_images]
    n = len(images)
    if n == 0:
        return
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    h, w = images.shape[2:]
    scale = max(1, 128 // max(h, w))
    tile_h, tile_w = h * scale, w * scale
    grid = Image.new("RGB", (cols * tile_w, rows * tile_h), (114, 114, 114))
    for i, (img, label) in enumerate(zip(images, labels)):
        tile = Image.fromarray(img.permute(1, 2, 0).numpy()).resize((tile_w, tile_h), Image.NEAREST)
        grid.paste(draw_label(tile, label), ((i % cols) * tile_w, (i // cols) * tile_h))
    grid.save(path)


def plot_confusion_matrix(matrix: np.ndarray, names: list[str], path: str | Path) -> None:
    """Column-normalised confusion matrix (rows = predicted, columns = true), counts annotated."""
    plt = _plt()
    n = len(names)
    norm = matrix / np.maximum(matrix.sum(0, keepdims=True), 1)
    size = max(5.0, 0.5 * n + 3)
    fig, ax = plt.subplots(figsize=(size, size * 0.85), tight_layout=True)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), names, rotation=90 if n > 8 else 45, ha="right" if n <= 8 else "center")
    ax.set_yticks(range(n), names)
    ax.set_xlabel("True")
    ax.set_ylabel("Predicted")
    ax.set_title("Confusion matrix (normalised per true class)")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    ax.text(j, i, f"{norm[i, j]:.2f}\n({matrix[i, j]})", ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.savefig(path, dpi=150)
    plt.close(fig)


def read_results_csv(path: str | Path) -> dict[str, list[float]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    cols: dict[str, list[float]] = {}
    for row in rows:
        for k, v in row.items():
            try:
                cols.setdefault(k.strip(), []).append(float(v))
            except (TypeError, ValueError):
                cols.setdefault(k.strip(), []).append(float("nan"))
    return cols


def panel_title(column: str) -> str:
    """A results.csv column as a panel title: ``box_loss`` -> ``box loss``, ``mAP50-95(M)`` -> ``mask mAP50-95``."""
    name = column.split("/", 1)[-1]
    part = {"(B)": "box ", "(M)": "mask "}.get(name[-3:], "")
    name = name[:-3] if part else name
    if name.endswith("_loss"):
        name = name[: -len("_loss")] + " loss"
    return f"{part}{name.replace('_', ' ')}"


def _smoothed(y: list[float], frac: float = 0.1) -> np.ndarray:
    """A centred moving average over ~10% of the points (at least 3): the trend under a noisy curve."""
    y = np.asarray(y, dtype=float)
    k = max(3, int(round(len(y) * frac)) | 1)
    pad = k // 2
    padded = np.concatenate((np.full(pad, y[0]), y, np.full(pad, y[-1])))
    return np.convolve(padded, np.ones(k) / k, mode="valid")


RESULTS_COLUMNS = 5  # results.png: panels per row (5 x 480 px = 2400 px wide at most)


def plot_results(csv_path: str | Path, path: str | Path | None = None) -> list[str]:
    """results.csv -> results.png: a grid of panels (at most ``RESULTS_COLUMNS`` a row), each loss train and val
    in one panel, then each metric; every curve drawn raw and, from 5 epochs on, smoothed (dotted).  Returns the
    panel titles."""
    plt = _plt()
    cols = read_results_csv(csv_path)
    if not cols.get("epoch"):
        return []
    epochs = cols["epoch"]
    metrics = [k for k in cols if k.startswith("metrics/")]
    train_metrics = {f"train/{m.split('/', 1)[1]}" for m in metrics}
    losses = [k[len("train/"):] for k in cols if k.startswith("train/") and k not in train_metrics]
    panels = [(f"train/{n}", f"val/{n}") for n in losses] + [(f"train/{m.split('/', 1)[1]}", m) for m in metrics]
    n = max(len(panels), 1)
    ncols = min(n, RESULTS_COLUMNS)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 3 * nrows), tight_layout=True, squeeze=False)
    titles = []
    for ax, (train_key, val_key) in zip(axes.ravel(), panels):
        for key, label, colour_ in ((train_key, "train", "tab:blue"), (val_key, "val", "tab:orange")):
            if key in cols:
                ax.plot(epochs, cols[key], marker=".", color=colour_, label=label)
                if len(epochs) >= 5:
                    ax.plot(epochs, _smoothed(cols[key]), ":", color=colour_, label=f"{label} smoothed")
        titles.append(panel_title(val_key if val_key.startswith("metrics/") else train_key))
        ax.set_title(titles[-1])
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    fig.savefig(path or Path(csv_path).with_name("results.png"), dpi=120)
    plt.close(fig)
    return titles


def colour(i: int) -> tuple[int, int, int]:
    """A distinct, stable colour for class ``i``."""
    palette = ((255, 56, 56), (72, 249, 10), (0, 194, 255), (255, 157, 151), (146, 204, 23), (52, 69, 147),
               (255, 178, 29), (207, 210, 49), (100, 115, 255), (255, 55, 199), (26, 147, 52), (0, 24, 236))
    return palette[int(i) % len(palette)]


def draw_boxes(image: Image.Image, boxes, names: list[str], show_conf: bool = True,
               width: int | None = None) -> Image.Image:
    """Copy of ``image`` with ``boxes (Tensor/array[K, 6])`` (x1, y1, x2, y2, score, class, pixels) drawn."""
    image = image.convert("RGB").copy()
    draw = ImageDraw.Draw(image)
    width = width or max(1, round(max(image.size) / 300))
    font = _font(max(10, min(image.size) // 25))
    for x1, y1, x2, y2, score, c in np.asarray(boxes, dtype=np.float64).reshape(-1, 6):
        col = colour(int(c))
        draw.rectangle((x1, y1, x2, y2), outline=col, width=width)
        name = names[int(c)] if 0 <= int(c) < len(names) else str(int(c))
        text = f"{name} {score:.2f}" if show_conf else name
        tx0, ty0, tx1, ty1 = draw.textbbox((x1, y1), text, font=font)
        top = y1 - (ty1 - ty0) - 2 if y1 - (ty1 - ty0) - 2 >= 0 else y1
        draw.rectangle((x1, top, x1 + tx1 - tx0 + 4, top + ty1 - ty0 + 2), fill=col)
        draw.text((x1 + 2, top - (ty0 - y1)), text, fill=(255, 255, 255), font=font)
    return image


def draw_masks(image: Image.Image, masks, classes, alpha: float = 0.45) -> Image.Image:
    """Copy of ``image`` with each of ``masks (bool Tensor/array[K, H, W])`` (its size) tinted in the colour of
    its class (``classes[k]``)."""
    a = np.asarray(image.convert("RGB"), dtype=np.float32).copy()
    masks = np.asarray(masks, dtype=bool).reshape(-1, *a.shape[:2])
    for m, c in zip(masks, np.asarray(classes).reshape(-1)):
        a[m] = a[m] * (1 - alpha) + np.array(colour(int(c)), np.float32) * alpha
    return Image.fromarray(a.round().clip(0, 255).astype(np.uint8))


def plot_detections(images: torch.Tensor, boxes: list, names: list[str], path: str | Path, show_conf: bool = True,
                    max_images: int = 16, masks: list | None = None) -> None:
    """``images (Tensor[B, 3, H, W] uint8)`` in a grid, each with its ``boxes[i] (Tensor[K, 6])`` drawn and,
    given ``masks[i]`` (bool ``Tensor[K, H', W']``, any size), those tinted under them."""
    images = images[:max_images]
    if len(images) == 0:
        return
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    h, w = images.shape[2:]
    scale = max(1.0, 256 / max(h, w))
    tw, th = round(w * scale), round(h * scale)
    grid = Image.new("RGB", (cols * tw, rows * th), (114, 114, 114))
    for i, img in enumerate(images):
        tile = Image.fromarray(img.permute(1, 2, 0).numpy()).resize((tw, th), Image.BILINEAR)
        b = np.asarray(boxes[i], dtype=np.float64).reshape(-1, 6).copy() if i < len(boxes) else np.zeros((0, 6))
        if masks is not None and i < len(masks) and len(masks[i]):
            m = torch.as_tensor(masks[i])[:, None].float()
            m = torch.nn.functional.interpolate(m, size=(th, tw), mode="nearest")[:, 0] > 0.5
            tile = draw_masks(tile, m.numpy(), b[:, 5])
        b[:, :4] *= scale
        grid.paste(draw_boxes(tile, b, names, show_conf, width=2), ((i % cols) * tw, (i // cols) * th))
    grid.save(path, quality=90)


def plot_label_distribution(cls: np.ndarray, boxes: np.ndarray, names: list[str], path: str | Path) -> None:
    """Instances per class, box centres and box sizes (normalised ``boxes (ndarray[N, 4])`` cx, cy, w, h)."""
    plt = _plt()
    fig, ax = plt.subplots(1, 3, figsize=(12, 4), tight_layout=True)
    counts = np.bincount(cls.astype(int), minlength=len(names)) if len(cls) else np.zeros(len(names), int)
    ax[0].bar(range(len(names)), counts, color=[np.array(colour(i)) / 255 for i in range(len(names))])
    text = sum(len(n) + 2 for n in names)  # the panel fits ~30 characters side by side
    ax[0].set_xticks(range(len(names)), names, rotation=0 if text <= 30 else 45 if len(names) <= 20 else 90,
                     ha="center" if text <= 30 or len(names) > 20 else "right", fontsize=8 if len(names) > 20 else 10)
    ax[0].set_ylabel("instances")
    panels = ((ax[1], (0, 1), ("x", "y", "box centres")), (ax[2], (2, 3), ("width", "height", "box sizes")))
    for a, (i, j), labels in panels:
        if len(boxes):
            a.hist2d(boxes[:, i], boxes[:, j], bins=50, range=[[0, 1], [0, 1]], cmap="Blues")
        a.set(xlabel=labels[0], ylabel=labels[1], title=labels[2])
    ax[1].invert_yaxis()
    fig.savefig(path, dpi=120)
    plt.close(fig)
