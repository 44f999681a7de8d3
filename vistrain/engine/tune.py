"""``vistrain tune``: hyperparameter search on Ray Tune (the extra ``vistrain[tune]``), not a home-made evolver.

Each trial is a normal ``vistrain train`` run (its own folder under ``TUNE_DIR/trials``, its ``args.yaml`` holding the
values Ray sampled for it) that reports each epoch's fitness to Ray; ASHA stops the trials that fall behind.  The
tune folder then holds ``results.csv`` (a row per trial: the sampled values, the last fitness, the epochs run, the
run folder), ``fitness.png`` (fitness per epoch, a line per trial) and ``best.yaml``: the search's fixed keys plus
the best trial's values, which ``vistrain train cfg=best.yaml`` runs again.

The search space: ``space=file.yaml`` with ``key: [low, high]`` (uniform), ``key: {loguniform: [low, high]}``,
``key: {uniform: [low, high]}`` or ``key: {choice: [a, b, c]}``; by default the YOLOv5 / ultralytics set of
optimiser and augmentation keys for detection and segmentation, the optimiser keys and flips for classification.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import yaml

from vistrain.engine.utils import LOGGER, UserError, increment_path

# (low, high[, "log"]): ultralytics' default tune space, which holds YOLOv5's evolve keys (the loss gains are left
# out: their scale depends on the head; add them with space=)
OPTIMISER_SPACE: dict[str, tuple] = {
    "lr0": (1e-5, 1e-1, "log"), "lrf": (0.01, 1.0), "momentum": (0.6, 0.98), "weight_decay": (0.0, 0.001),
    "warmup_epochs": (0.0, 5.0), "warmup_momentum": (0.0, 0.95),
}
DETECT_AUGMENT_SPACE: dict[str, tuple] = {
    "hsv_h": (0.0, 0.1), "hsv_s": (0.0, 0.9), "hsv_v": (0.0, 0.9), "degrees": (0.0, 45.0), "translate": (0.0, 0.9),
    "scale": (0.0, 0.9), "shear": (0.0, 10.0), "perspective": (0.0, 0.001), "flipud": (0.0, 1.0),
    "fliplr": (0.0, 1.0), "mosaic": (0.0, 1.0), "mixup": (0.0, 1.0),
}
CLASSIFY_AUGMENT_SPACE: dict[str, tuple] = {"fliplr": (0.0, 1.0)}
# keys of the tune mode itself: not passed to the trials
TUNE_KEYS = ("space", "iterations", "gpu_per_trial", "cpu_per_trial", "address", "project", "name", "exist_ok")


def default_space(task: str) -> dict[str, tuple]:
    return {**OPTIMISER_SPACE, **(CLASSIFY_AUGMENT_SPACE if task == "classify" else DETECT_AUGMENT_SPACE)}


def read_space(path: str) -> dict[str, Any]:
    """``space=file.yaml`` -> ``{key: spec}`` (keys checked against the config's)."""
    from vistrain.config import closest_key, load_defaults

    p = Path(path)
    if not p.is_file():
        raise UserError(f"space={path}: no such file; give a YAML of key: [low, high] lines")
    try:
        d = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"space={path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(d, dict) or not d:
        raise UserError(f"space={path}: expected key: [low, high] lines")
    defaults = load_defaults()
    for k in d:
        if k not in defaults or k in TUNE_KEYS:
            near = closest_key(str(k), defaults)
            raise UserError(f"space={path}: unknown key '{k}'" + (f"; did you mean '{near}'?" if near else ""))
    return d


def ray_domain(key: str, spec: Any, source: str):
    """One key's search domain for Ray from ``(low, high)``, ``(low, high, "log")`` or a {kind: values} mapping."""
    from ray import tune as rt

    kind, values = "uniform", spec
    if isinstance(spec, dict) and len(spec) == 1:
        kind, values = next(iter(spec.items()))
    elif isinstance(spec, (list, tuple)) and len(spec) == 3 and spec[2] == "log":
        kind, values = "loguniform", spec[:2]
    ok = isinstance(values, (list, tuple)) and (kind == "choice" and len(values) > 0 or len(values) == 2)
    if not ok or kind not in ("uniform", "loguniform", "choice"):
        raise UserError(f"{source}: {key}: {spec!r}; use [low, high], {{loguniform: [low, high]}} or "
                        f"{{choice: [a, b]}}")
    if kind == "choice":
        return rt.choice(list(values))
    low, high = float(values[0]), float(values[1])
    if not low < high or (kind == "loguniform" and low <= 0):
        raise UserError(f"{source}: {key}: low must be below high (and above 0 for loguniform), got {spec!r}")
    return rt.loguniform(low, high) if kind == "loguniform" else rt.uniform(low, high)


def absolute_paths(keys: dict[str, Any]) -> dict[str, Any]:
    """Paths that exist here made absolute: a trial may run in another working directory or on another machine."""
    out = dict(keys)
    for k in ("data", "model", "pretrained", "cfg"):
        v = out.get(k)
        if isinstance(v, str) and v and Path(v).exists():
            out[k] = str(Path(v).resolve())
    return out


def run_trial(config: dict[str, Any], base: dict[str, Any], tune_dir: str) -> None:
    """A Ray trial: ``vistrain train`` with the sampled ``config`` over ``base`` in ``TUNE_DIR/trials/TRIAL``, its
    fitness reported every epoch.  The sampled keys count as given: ``optimizer=auto`` keeps a sampled lr0."""
    from ray import tune as rt

    import vistrain
    from vistrain.engine.trainer import Trainer

    name = rt.get_context().get_trial_name()
    folder = Path(tune_dir)  # PROJECT/TASK/TUNE: the run folder is PROJECT/TASK/NAME
    cfg = vistrain._config("train", {**base, **config, "project": str(folder.parent.parent),
                                     "name": f"{folder.name}/trials/{name}", "exist_ok": True})

    def report(trainer) -> None:
        fitness = float(trainer.metrics.fitness())
        rt.report({"fitness": fitness if math.isfinite(fitness) else float("-inf"), "epoch": trainer.epoch + 1,
                   "save_dir": str(trainer.save_dir)})

    Trainer(cfg, callbacks={"on_epoch_end": [report]}).train()


def tune(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run the search; returns ``{"tune_dir", "best", "best_fitness"}``."""
    try:
        import ray
        from ray import tune as rt
        from ray.tune.schedulers import ASHAScheduler
    except ImportError:
        raise UserError("vistrain tune runs on Ray Tune, which is not installed: "
                        "pip install 'vistrain[tune]'") from None
    from vistrain.engine.run import get_task_for, resolve_model_source

    user = set(cfg.get("_user_keys", ()))
    base = absolute_paths({k: cfg[k] for k in sorted(user) if k not in TUNE_KEYS})
    task_name = get_task_for(dict(cfg), resolve_model_source(dict(cfg))[0]).name
    specs = read_space(cfg["space"]) if cfg.get("space") else default_space(task_name)
    source = f"space={cfg['space']}" if cfg.get("space") else "default space"
    space = {k: ray_domain(k, v, source) for k, v in specs.items()}
    base = {k: v for k, v in base.items() if k not in space}
    cpus = float(cfg.get("cpu_per_trial") or 1)
    if "threads" not in base:
        base["threads"] = max(1, int(cpus))  # each trial's torch threads: its CPUs (the trials run side by side)
    gpus = cfg.get("gpu_per_trial")
    if gpus is None:
        import torch

        gpus = 1 if torch.cuda.is_available() else 0
    tune_dir = increment_path(Path(cfg.get("project") or "runs") / task_name / (cfg.get("name") or "tune"),
                              exist_ok=cfg.get("exist_ok"))
    tune_dir.mkdir(parents=True, exist_ok=True)
    tune_dir = tune_dir.resolve()
    LOGGER.info(f"tune: {cfg['iterations']} trials of {cfg['epochs']} epochs on Ray Tune "
                f"({cfg.get('address') or 'local'}), {cpus:g} CPU / {gpus:g} GPU per trial, ASHA; searching "
                + ", ".join(specs) + f"\nResults go to {tune_dir}")
    ray.init(address=cfg.get("address") or None, ignore_reinit_error=True, include_dashboard=False,
             log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"RAY_CHDIR_TO_TRIAL_DIR": "0"}} if not cfg.get("address") else None)
    try:
        trainable = rt.with_parameters(run_trial, base=base, tune_dir=str(tune_dir))
        tuner = rt.Tuner(
            rt.with_resources(trainable, {"cpu": cpus, "gpu": float(gpus)}), param_space=space,
            tune_config=rt.TuneConfig(scheduler=ASHAScheduler(time_attr="epoch", metric="fitness", mode="max",
                                                              max_t=cfg["epochs"], grace_period=1),
                                      num_samples=cfg["iterations"]),
            run_config=rt.RunConfig(name="ray", storage_path=str(tune_dir), verbose=1))
        grid = tuner.fit()
    finally:
        if not cfg.get("address"):
            ray.shutdown()
    return write_results(grid, list(specs), base, tune_dir)


def write_results(grid, keys: list[str], base: dict[str, Any], tune_dir: Path) -> dict[str, Any]:
    """results.csv, fitness.png and best.yaml from Ray's ResultGrid."""
    rows, curves = [], {}
    for result in grid:
        m = result.metrics or {}
        name = Path(str(m.get("save_dir", ""))).name or str(m.get("trial_id", ""))
        row = {"trial": name, **{k: result.config.get(k) for k in keys}, "fitness": m.get("fitness"),
               "epochs": m.get("epoch"), "error": str(result.error).splitlines()[0] if result.error else "",
               "save_dir": m.get("save_dir", "")}
        rows.append(row)
        df = result.metrics_dataframe
        if df is not None and "fitness" in df:
            curves[name] = (list(df["epoch"]), list(df["fitness"]))
    done = [r for r in rows if isinstance(r["fitness"], (int, float)) and math.isfinite(r["fitness"])]
    if not done:
        first = next((r["error"] for r in rows if r["error"]), "no trial reported a fitness")
        raise UserError(f"tune: no trial finished an epoch ({first}); see {tune_dir}")
    rows.sort(key=lambda r: -r["fitness"] if r in done else math.inf)
    with open(tune_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    best = rows[0]
    best_keys = {**base, **{k: best[k] for k in keys}}
    (tune_dir / "best.yaml").write_text(
        f"# vistrain tune: trial {best['trial']}, fitness {best['fitness']:.6g}; "
        f"vistrain train cfg={tune_dir / 'best.yaml'}\n"
        + yaml.safe_dump(best_keys, sort_keys=False))
    plot_fitness(curves, tune_dir / "fitness.png")
    LOGGER.info(f"tune: best trial {best['trial']}, fitness {best['fitness']:.4g} after {best['epochs']} epochs; "
                f"{len(done)} of {len(rows)} trials reported\n{tune_dir / 'results.csv'}, fitness.png, best.yaml")
    return {"tune_dir": str(tune_dir), "best": best_keys, "best_fitness": best["fitness"], "trials": rows}


def plot_fitness(curves: dict[str, tuple[list, list]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, (epochs, fitness) in sorted(curves.items()):
        ax.plot(epochs, fitness, marker="o", ms=3, lw=1.2, label=name[-24:])
    ax.set_xlabel("epoch")
    ax.set_ylabel("fitness")
    ax.set_title(f"vistrain tune: {len(curves)} trials")
    ax.grid(alpha=0.3)
    if len(curves) <= 12:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
