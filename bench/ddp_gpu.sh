#!/usr/bin/env bash
# DDP on GPUs: YOLOv8n training throughput on 1 GPU and on 2 (device=0,1, which starts torchrun), and the first
# epoch's mean losses of both with sync_bn=True (equal up to GPU float rounding: the same batches, the same
# normalisers). Needs 2 CUDA GPUs; writes bench/results/ddp_gpu.json.
#   bash bench/ddp_gpu.sh            (EPOCHS=3 BATCH=64 IMGSZ=320 N=2000 to change the run)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
EPOCHS=${EPOCHS:-3} BATCH=${BATCH:-64} IMGSZ=${IMGSZ:-320} N=${N:-2000}
OUT=$(mktemp -d)
"$PY" -m vistrain data make out="$OUT/data" n="$N" imgsz="$IMGSZ" >/dev/null
"$PY" - "$OUT" "$EPOCHS" "$BATCH" "$IMGSZ" <<'PY'
import csv, json, sys, time
from pathlib import Path
import torch
import vistrain

out, epochs, batch, imgsz = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
assert torch.cuda.device_count() >= 2, "bench/ddp_gpu.sh needs 2 GPUs"
keys = dict(model="yolov8n", data=str(out / "data" / "detect" / "data.yaml"), epochs=epochs, batch=batch,
            imgsz=imgsz, sync_bn=True, plots=False, project=str(out / "runs"), exist_ok=True, workers=8)
rows = {}
for name, device in (("1gpu", "0"), ("2gpu", "0,1")):
    t0 = time.time()
    res = vistrain.train(device=device, name=name, **keys)
    with open(Path(res["save_dir"]) / "results.csv") as f:
        first = next(csv.DictReader(f))
    rows[name] = {"train_img_s": res["train_img_s"], "wall_s": round(time.time() - t0, 1),
                  "epoch1_losses": {k: float(v) for k, v in first.items() if k.startswith("train/")},
                  "mAP50-95": res.get("metrics/mAP50-95(B)")}
rows["speedup"] = rows["2gpu"]["train_img_s"] / rows["1gpu"]["train_img_s"]
rows["device"] = torch.cuda.get_device_name(0)
Path("bench/results").mkdir(parents=True, exist_ok=True)
Path("bench/results/ddp_gpu.json").write_text(json.dumps(rows, indent=1))
print(json.dumps(rows, indent=1))
PY
