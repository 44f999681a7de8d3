"""The ``compare`` mode: several architectures trained on the same data under one pipeline, then one table.

    vistrain compare data=path/to/data.yaml models=yolov5n,yolov8n,efficientdet-d0 epochs=30 imgsz=640

Each model trains with the same keys (``epochs``, ``imgsz``, ``batch``, ``time``, ``seed``, ...) into
``PROJECT/TASK/compare/MODEL/``, is validated (its best checkpoint) and timed (PyTorch as ``predict`` runs it:
BatchNorm folded, batch 1 at ``imgsz``, median of 20 runs).  The compare folder holds ``compare.csv`` and
``compare.md`` (model, parameters, GFLOPs, train minutes, train img/s, the task's metric, ms per image) and
``compare.png`` (metric against latency).  A model that fails keeps its row with the one-line reason.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

import torch

from vistrain.engine.utils import LOGGER, UserError

DEFAULT_MODELS = {"classify": "yolov5n-cls,resnet18,efficientnet-b0", "detect": "yolov5n,yolov8n,efficientdet-d0",
                  "segment": "yolov8n-seg,yolov8s-seg"}
METRIC = {"classify": "metrics/accuracy_top1", "detect": "metrics/mAP50-95(B)", "segment": "metrics/mAP50-95(M)"}
TRAIN_KEYS_NOT_SHARED = ("model", "models", "name", "resume", "pretrained")
COLUMNS = ["model", "params_M", "gflops", "train_min", "train_img_s", "metric", "ms", "error"]


def compare_task(cfg: dict, models: list[str]) -> str:
    from vistrain.nn.model import build_model

    if cfg.get("task"):
        return cfg["task"]
    try:
        return build_model(models[0]).task
    except Exception:  # noqa: BLE001  (its own row will say what is wrong with it)
        return "detect"


def compare(cfg: dict) -> list[dict[str, Any]]:
    """Train, validate and time every model of ``models=``; write the table and plot; returns the rows."""
    import vistrain
    from vistrain.engine.run import user_keys

    cfg["_mode"] = "compare"
    task = cfg.get("task") or None
    given = cfg.get("models") or ""
    models = [str(m).strip() for m in (given if isinstance(given, (list, tuple)) else str(given).split(","))
              if str(m).strip()]
    if not models:
        task = task or "detect"
        models = DEFAULT_MODELS[task].split(",")
    task = compare_task(cfg, models) if task is None else task
    folder = Path(cfg.get("project") or "runs") / task / (cfg.get("name") or "compare")
    folder.mkdir(parents=True, exist_ok=True)
    shared = {k: cfg[k] for k in user_keys(cfg) if k not in TRAIN_KEYS_NOT_SHARED and not k.startswith("_")}
    shared.update(project=str(folder.parent.parent), exist_ok=True)  # train adds TASK/
    rows = []
    for m in models:
        LOGGER.info(f"compare: {m} ({len(rows) + 1}/{len(models)})")
        try:
            rows.append(compare_row(vistrain, m, task, folder, shared))
        except UserError as e:
            rows.append({"model": m, "error": str(e)})
        except Exception as e:  # noqa: BLE001 - the table goes on; the reason is the row's
            rows.append({"model": m, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"})
        LOGGER.info(f"compare: {m}: " + (rows[-1]["error"] or f"{rows[-1]['metric']:.4f}"))
    write_tables(rows, task, folder)
    return rows


def compare_row(vistrain, model: str, task: str, folder: Path, shared: dict) -> dict:
    from vistrain.deploy.benchmark import time_inference
    from vistrain.config import get_config
    from vistrain.engine.predictor import inference_model
    from vistrain.engine.run import resolve_task_and_model
    from vistrain.utils.summary import summarize

    t0 = time.time()
    res = vistrain.train(model=model, name=f"{folder.name}/{model}", **shared)
    minutes = (time.time() - t0) / 60
    best = Path(res["save_dir"]) / "weights" / "best.pt"
    ckpt = torch.load(best, map_location="cpu", weights_only=True)
    if ckpt.get("task") != task:
        raise UserError(f"model={model} is a {ckpt.get('task')} model; this comparison is of {task} models")
    imgsz = int(ckpt.get("imgsz") or 640)
    run_cfg = get_config({"model": str(best), "imgsz": imgsz})
    run_cfg["_user_keys"] = ["model", "imgsz"]
    t, net, _ = resolve_task_and_model(run_cfg)
    summary = summarize(net.eval(), imgsz=imgsz)
    ms = time_inference(inference_model(net, t, run_cfg, torch.device("cpu")), torch.rand(1, 3, imgsz, imgsz))
    return {"model": model, "params_M": summary.total_params / 1e6, "gflops": summary.gflops, "train_min": minutes,
            "train_img_s": res.get("train_img_s"), "metric": res[METRIC[task]], "ms": ms, "error": ""}


def write_tables(rows: list[dict], task: str, folder: Path) -> None:
    metric = METRIC[task].split("/")[-1]
    with open(folder / "compare.csv", "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)

    def fmt(v, spec):
        return "" if v is None else format(v, spec)

    md = [f"| model | params (M) | GFLOPs | train (min) | train img/s | {metric} | ms/image |",
          "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("error"):
            md.append(f"| {r['model']} | failed: {r['error']} ||||||")
        else:
            md.append(f"| {r['model']} | {fmt(r['params_M'], '.2f')} | {fmt(r['gflops'], '.2f')} | "
                      f"{fmt(r['train_min'], '.1f')} | {fmt(r['train_img_s'], '.1f')} | {fmt(r['metric'], '.4f')} | "
                      f"{fmt(r['ms'], '.1f')} |")
    (folder / "compare.md").write_text("\n".join(md) + "\n")
    ok = [r for r in rows if not r.get("error")]
    if ok:
        from vistrain.utils.plotting import _plt

        plt = _plt()
        fig, ax = plt.subplots(figsize=(7, 5), tight_layout=True)
        for r in ok:
            ax.scatter(r["ms"], r["metric"], s=40)
            ax.annotate(r["model"], (r["ms"], r["metric"]), textcoords="offset points", xytext=(5, 5), fontsize=9)
        ax.set(xlabel="ms per image (batch 1, CPU)" if not torch.cuda.is_available() else "ms per image (batch 1)",
               ylabel=metric, title=f"{task}: {metric} against latency")
        fig.savefig(folder / "compare.png", dpi=120)
        plt.close(fig)
    print("\n".join(md) + f"\nsaved to {folder / 'compare.csv'}, compare.md, compare.png", flush=True)
