"""Per-epoch training time with ``cache=false`` / ``ram`` / ``disk`` on the built-in detection data.

    .venv/bin/python bench/cache.py [--n 400] [--imgsz 320] [--epochs 3] [--model yolov8n]

Each setting trains the same run (same seed, so the same samples); the epoch time is the median of the epochs after
the first (results.csv's cumulative ``time`` column), so the cache's one-off fill is left out and reported apart.
Writes bench/results/cache.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--model", default="yolov8n")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="vistrain-cache-bench-"))
    os.environ["VISTRAIN_CACHE"] = str(tmp / "cache")
    import vistrain
    from vistrain.data.synthetic import make_dataset

    data = make_dataset(tmp / "data", n=args.n, imgsz=args.imgsz, seed=0, workers=2) / "detect" / "data.yaml"
    out = {"n": args.n, "imgsz": args.imgsz, "epochs": args.epochs, "model": args.model, "cpus": os.cpu_count(),
           "load": os.getloadavg()[0]}
    for mode in ("false", "ram", "disk"):
        t0 = time.time()
        res = vistrain.train(model=args.model, data=str(data), imgsz=args.imgsz, epochs=args.epochs, batch=16,
                             cache=mode, plots=False, project=str(tmp / "runs"), name=mode, verbose=False)
        with open(Path(res["save_dir"]) / "results.csv") as f:
            times = [float(r["time"]) for r in csv.DictReader(f)]
        epochs = [b - a for a, b in zip(times, times[1:])]
        out[mode] = {"epoch_s": round(statistics.median(epochs), 2), "first_epoch_s": round(times[0], 2),
                     "total_s": round(time.time() - t0, 1)}
        print(mode, out[mode], flush=True)
    out["ram_vs_false"] = round(out["ram"]["epoch_s"] / out["false"]["epoch_s"], 3)
    out["disk_vs_false"] = round(out["disk"]["epoch_s"] / out["false"]["epoch_s"], 3)
    path = Path(__file__).parent / "results" / "cache.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
