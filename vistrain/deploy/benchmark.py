"""The ``benchmark`` mode: for each format, export, validate on the model's data and time inference; one table.

    vistrain benchmark model=runs/detect/train/weights/best.pt          # data: the run's own (built-in if none)

Rows: PyTorch (the checkpoint, as ``predict`` runs it: BatchNorm folded), TorchScript, ONNX (onnxruntime) and
OpenVINO.  Columns: format, file size (MB), the validation metric (mAP50-95, or top-1 for classifiers), ms per
image (batch 1, inference only: the median of timed runs on one input at ``imgsz``, after warm-up), and the
speed-up over PyTorch.  A format that cannot be exported or run keeps its row with the one-line reason; the
others go on.  The table is printed and written to ``PROJECT/TASK/benchmark/benchmark.csv``.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import torch

from vistrain.engine.utils import UserError

FORMATS = ("pytorch", "torchscript", "onnx", "openvino")
METRIC = {"classify": "metrics/accuracy_top1", "detect": "metrics/mAP50-95(B)", "segment": "metrics/mAP50-95(M)"}


def time_inference(model, x: torch.Tensor, runs: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of ``model(x)`` over ``runs`` calls after ``warmup`` untimed ones."""
    times = []
    with torch.no_grad():
        for i in range(warmup + runs):
            t0 = time.perf_counter()
            model(x)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return 1000 * sorted(times)[len(times) // 2]


def file_size_mb(path: Path) -> float:
    files = [f for f in path.rglob("*") if f.is_file()] if path.is_dir() else [path]
    return sum(f.stat().st_size for f in files) / 1e6


def benchmark_row(fmt: str, cfg: dict, ckpt_path: str, imgsz: int) -> dict:
    """Export (except PyTorch), validate and time one format -> its row."""
    import vistrain
    from vistrain.config import get_config
    from vistrain.engine.predictor import inference_model
    from vistrain.engine.run import resolve_task_and_model

    keys = {k: cfg[k] for k in ("data", "batch", "workers", "device", "project") if cfg.get(k) not in (None, "")}
    path = Path(ckpt_path) if fmt == "pytorch" else vistrain.export(model=ckpt_path, format=fmt, imgsz=imgsz,
                                                                   verbose=False)
    res = vistrain.val(model=str(path), imgsz=imgsz, plots=False, name=f"benchmark-{fmt}", exist_ok=True,
                       verbose=False, **keys)
    run_cfg = get_config({"model": str(path), "imgsz": imgsz})
    run_cfg["_user_keys"] = ["model", "imgsz"]
    task, model, _ = resolve_task_and_model(run_cfg)
    if fmt == "pytorch":
        model = inference_model(model, task, run_cfg, torch.device("cpu"))
    ms = time_inference(model, torch.rand(1, 3, imgsz, imgsz))
    return {"format": fmt, "size_mb": file_size_mb(path), "metric": res[METRIC[task.name]], "ms": ms, "error": ""}


def benchmark(cfg: dict) -> list[dict]:
    """Run every format; print and save the table; returns its rows."""
    from vistrain.engine.run import prepare_run, resolve_task_and_model, user_keys

    cfg["_mode"] = "benchmark"
    ref = str(cfg.get("model") or "")
    if not ref.endswith((".pt", ".pth")):
        raise UserError(f"model={ref or '(empty)'}: benchmark needs a trained vistrain checkpoint, e.g. "
                        f"model=runs/detect/train/weights/best.pt")
    task, _, ckpt = resolve_task_and_model(cfg, need_model=True)
    imgsz = int(cfg["imgsz"]) if "imgsz" in user_keys(cfg) else int(ckpt.get("imgsz") or cfg["imgsz"])
    if not cfg.get("data") and (ckpt.get("train_args") or {}).get("data"):
        cfg["data"] = ckpt["train_args"]["data"]
    _, save_dir = prepare_run(cfg, task, default_name="benchmark")
    rows = []
    for fmt in FORMATS:
        try:
            rows.append(benchmark_row(fmt, cfg, ref, imgsz))
        except UserError as e:  # a missing runtime, an export that cannot be made: this row only
            rows.append({"format": fmt, "size_mb": None, "metric": None, "ms": None, "error": str(e)})
        except Exception as e:  # noqa: BLE001 - the table must go on; the reason is the row's
            rows.append({"format": fmt, "size_mb": None, "metric": None, "ms": None,
                         "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"})
    base = rows[0]["ms"]
    for r in rows:
        r["speedup"] = base / r["ms"] if base and r["ms"] else None
    name = METRIC[task.name].split("/")[-1]
    lines = [f"{'format':<12} {'size (MB)':>9} {name:>16} {'ms/image':>9} {'speed-up':>8}"]
    for r in rows:
        if r["error"]:
            lines.append(f"{r['format']:<12} failed: {r['error']}")
        else:
            lines.append(f"{r['format']:<12} {r['size_mb']:>9.1f} {r['metric']:>16.4f} {r['ms']:>9.2f} "
                         f"{r['speedup']:>7.2f}x")
    with open(save_dir / "benchmark.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["format", "size_mb", "metric", "ms", "speedup", "error"])
        w.writeheader()
        w.writerows(rows)
    # printed, not logged: the val runs inside set the log level (verbose=False)
    print(f"benchmark of {ref} at imgsz {imgsz} (batch 1, {torch.get_num_threads()} CPU threads; {name} on "
          f"{cfg.get('data') or 'the built-in data'}):\n" + "\n".join(lines) + f"\nsaved to {save_dir / 'benchmark.csv'}",
          flush=True)
    return rows
