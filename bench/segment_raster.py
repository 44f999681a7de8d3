"""Training-mask rasters against the label polygons on the bench's data: mask area / polygon area and centroid
shift, at full resolution and at 1/4 (the training masks), for pycocotools (the COCO ground truth that mask mAP
is scored against), vistrain's ``polygon_mask`` and ultralytics' ``polygon2mask``.

    .venv/bin/python bench/segment_raster.py [--n 500 --imgsz 320 --images 200]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np


def polygon_stats(p: np.ndarray) -> tuple[float, float, float]:
    """Area and centroid (x, y) of ``p (ndarray[K, 2])`` (shoelace)."""
    x, y = p[:, 0], p[:, 1]
    x1, y1 = np.roll(x, -1), np.roll(y, -1)
    c = x * y1 - x1 * y
    a = c.sum() / 2
    return abs(a), ((x + x1) * c).sum() / (6 * a), ((y + y1) * c).sum() / (6 * a)


def mask_stats(m: np.ndarray, ratio: int) -> tuple[float, float, float]:
    """Area in full-resolution pixels and centroid of mask ``m`` at ``1 / ratio`` (pixel-edge coordinates)."""
    ys, xs = np.nonzero(m)
    return len(xs) * ratio * ratio, ((xs + 0.5) * ratio).mean(), ((ys + 0.5) * ratio).mean()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--imgsz", type=int, default=320)
    p.add_argument("--images", type=int, default=200, help="training images whose polygons are measured")
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp())
    os.environ.update(YOLO_OFFLINE="1", YOLO_CONFIG_DIR=str(tmp / "ultralytics-config"))
    from PIL import Image
    from pycocotools import mask as mask_utils
    from ultralytics.data.utils import polygon2mask

    from vistrain.data.augment import polygon_mask
    from vistrain.data.synthetic import make_dataset

    root = make_dataset(tmp / "data", n=args.n, imgsz=args.imgsz, seed=0) / "segment"
    rasters = {
        "pycocotools": lambda hw, v, r: _blocks(
            mask_utils.decode(mask_utils.frPyObjects([v.ravel().tolist()], *hw))[..., 0], r),
        "vistrain": lambda hw, v, r: polygon_mask(hw, [v], ratio=r),
        "ultralytics": lambda hw, v, r: polygon2mask(hw, [v.reshape(-1)], color=1, downsample_ratio=r),
    }
    stats = {(k, r): [] for k in rasters for r in (1, 4)}
    for lf in sorted((root / "labels" / "train").glob("*.txt"))[: args.images]:
        image = next((root / "images" / "train").glob(lf.stem + ".*"))
        w, h = Image.open(image).size
        for line in lf.read_text().splitlines():
            v = np.array(line.split()[1:], float).reshape(-1, 2) * [w, h]
            area, cx, cy = polygon_stats(v)
            if area < 50:
                continue
            for (k, r), out in stats.items():
                a, x, y = mask_stats(rasters[k]((h, w), v, r), r)
                out.append((a / area, x - cx, y - cy))
    print(f"{len(stats[('vistrain', 1)])} polygons of {args.images} training images ({args.imgsz} px)")
    for (k, r), out in stats.items():
        a = np.array(out)
        print(f"{k:<12} 1/{r}: mask area / polygon area {a[:, 0].mean():.4f}, centroid shift x {a[:, 1].mean():+.3f} "
              f"y {a[:, 2].mean():+.3f} px")
    return 0


def _blocks(m: np.ndarray, ratio: int) -> np.ndarray:
    """Blocks of ``ratio`` x ``ratio`` at least half covered (the image padded to a multiple of ``ratio``)."""
    if ratio == 1:
        return m
    h, w = m.shape
    m = np.pad(m, ((0, -h % ratio), (0, -w % ratio)))
    return m.reshape(m.shape[0] // ratio, ratio, m.shape[1] // ratio, ratio).mean((1, 3)) >= 0.5


if __name__ == "__main__":
    raise SystemExit(main())
