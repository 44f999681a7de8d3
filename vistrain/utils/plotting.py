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


def plot_results(csv_path: str | Path, path: str | Path | None = None) -> None:
    """results.csv -> results.png: for each loss train vs. val, then each metric, against epoch."""
    plt = _plt()
    cols = read_results_csv(csv_path)
    if not cols.get("epoch"):
        return
    epochs = cols["epoch"]
    metrics = [k for k in cols if k.startswith("metrics/")]
    train_metrics = {f"train/{m.split('/', 1)[1]}" for m in metrics}
    losses = [k[len("train/"):] for k in cols if k.startswith("train/") and k not in train_metrics]
    panels = len(losses) + len(metrics)
    fig, axes = plt.subplots(1, max(panels, 1), figsize=(4 * max(panels, 1), 3.5), tight_layout=True, squeeze=False)
    axes = axes[0]
    for ax, name in zip(axes, losses):
        ax.plot(epochs, cols[f"train/{name}"], marker=".", label="train")
        if f"val/{name}" in cols:
            ax.plot(epochs, cols[f"val/{name}"], marker=".", label="val")
        ax.set_title(f"{name} loss")
        ax.set_xlabel("epoch")
        ax.legend()
    for ax, name in zip(axes[len(losses):], metrics):
        short = name.split("/", 1)[1]
        if f"train/{short}" in cols:
            ax.plot(epochs, cols[f"train/{short}"], marker=".", label="train")
        ax.plot(epochs, cols[name], marker=".", label="val")
        ax.set_title(short)
        ax.set_xlabel("epoch")
        ax.legend()
    fig.savefig(path or Path(csv_path).with_name("results.png"), dpi=120)
    plt.close(fig)
