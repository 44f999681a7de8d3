"""Plots people read: results.png as a grid with readable titles (classify, detect and segment columns), PR curves
with per-class AP in the legend and mask curves titled as masks, class names on labels.jpg that do not collide."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from vistrain.metrics.detect import _plot_curves
from vistrain.utils.plotting import plot_label_distribution, plot_results

COLUMNS = {
    "classify": ["train/loss", "val/loss", "metrics/accuracy_top1", "metrics/accuracy_top5"],
    "detect": ["train/box_loss", "train/cls_loss", "train/dfl_loss", "metrics/precision(B)", "metrics/recall(B)",
               "metrics/mAP50(B)", "metrics/mAP50-95(B)", "val/box_loss", "val/cls_loss", "val/dfl_loss"],
    "segment": ["train/box_loss", "train/seg_loss", "train/cls_loss", "train/dfl_loss", "metrics/precision(B)",
                "metrics/recall(B)", "metrics/mAP50(B)", "metrics/mAP50-95(B)", "metrics/precision(M)",
                "metrics/recall(M)", "metrics/mAP50(M)", "metrics/mAP50-95(M)", "val/box_loss", "val/seg_loss",
                "val/cls_loss", "val/dfl_loss"],
}
TITLES = {
    "classify": ["loss", "accuracy top1", "accuracy top5"],
    "detect": ["box loss", "cls loss", "dfl loss", "box precision", "box recall", "box mAP50", "box mAP50-95"],
    "segment": ["box loss", "seg loss", "cls loss", "dfl loss", "box precision", "box recall", "box mAP50",
                "box mAP50-95", "mask precision", "mask recall", "mask mAP50", "mask mAP50-95"],
}


@pytest.mark.parametrize("task", list(COLUMNS))
def test_results_png_is_a_readable_grid(task, tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "results.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", *COLUMNS[task], "lr/pg0", "time"])
        for e in range(1, 13):
            w.writerow([e, *rng.random(len(COLUMNS[task])).round(4), 0.01, e * 10])
    titles = plot_results(path)
    assert titles == TITLES[task]
    width, height = Image.open(tmp_path / "results.png").size
    assert width <= 2400 and height <= 1200 and width / height < 5, (width, height)
    assert not any("loss loss" in t or "_" in t for t in titles)


def test_pr_legend_names_the_best_classes_with_their_ap_and_masks_are_titled(tmp_path):
    names = [f"class{i}" for i in range(25)]
    ap = np.linspace(0.1, 0.9, 25)
    curves = np.tile(np.linspace(1, 0, 101), (25, 1))
    has_gt = np.ones(25, bool)
    has_gt[3] = False
    labels = _plot_curves(np.linspace(0, 1, 101), curves, names, has_gt, "Recall", "Precision", "all 0.5",
                          tmp_path / "PR.png", "Mask", values=ap)
    assert labels[0] == "class24 0.900" and len(labels) == 21 and labels[-1] == "all 0.5"
    assert "class3 " not in " ".join(labels) and (tmp_path / "PR.png").is_file()


def test_long_class_names_are_turned_on_labels_jpg(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    names = ["circle", "square", "triangle", "star", "hexagon", "cross"]
    saved = {}
    real = plt.Figure.savefig

    def spy(fig, *args, **kwargs):
        saved["rotation"] = fig.axes[0].get_xticklabels()[0].get_rotation()
        return real(fig, *args, **kwargs)

    plt.Figure.savefig = spy
    try:
        plot_label_distribution(np.arange(6) % 6, np.random.default_rng(0).random((6, 4)), names,
                                tmp_path / "labels.jpg")
    finally:
        plt.Figure.savefig = real
    assert saved["rotation"] == 45 and (tmp_path / "labels.jpg").is_file()
