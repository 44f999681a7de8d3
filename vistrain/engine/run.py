"""Setup shared by the train, val and predict modes: which task, which model, where the run goes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from vistrain.engine.utils import LOGGER, UserError, disk_error_words, increment_path, is_disk_full, select_device


def user_keys(cfg: dict) -> set[str]:
    """Keys the user set explicitly (the API records them under ``_user_keys``)."""
    return set(cfg.get("_user_keys", ()))


def public_args(cfg: dict) -> dict[str, Any]:
    """The config without private bookkeeping keys, as written to args.yaml and checkpoints."""
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def resolve_model_source(cfg: dict) -> tuple[str, dict | None, dict | None]:
    """Return ``(task name, model YAML dict or None, checkpoint dict or None)`` for ``cfg['model']``.

    A checkpoint carries its YAML and task; a name or YAML path is loaded (not yet built, since the
    number of classes may come from the data).
    """
    from vistrain.engine.checkpoint import is_vistrain_checkpoint, load_checkpoint, not_vistrain_checkpoint
    from vistrain.nn.model import infer_task, load_model_yaml
    from vistrain.nn.parser import ModelYAMLError, check_rows

    ref = cfg.get("model")
    if not ref:
        from vistrain.tasks.base import get_task

        ref = get_task(cfg["task"]).default_model() if cfg.get("task") else "yolov5n-cls"
        cfg["model"] = ref
    if str(ref).endswith((".pt", ".pth")):
        ckpt = load_checkpoint(ref)
        if not is_vistrain_checkpoint(ckpt):
            raise UserError(not_vistrain_checkpoint(ref, ckpt))
        task = ckpt.get("task") or infer_task(ckpt["model_yaml"])
        return task, ckpt["model_yaml"], ckpt
    try:
        d = load_model_yaml(ref)
        if d.get("arch") in (None, "yaml"):
            check_rows(d)  # unknown modules and mistyped rows stop the run before the data are scanned
    except FileNotFoundError as e:
        raise UserError(f"model={ref}: {e}") from None
    except (ModelYAMLError, yaml.YAMLError) as e:
        raise UserError(f"model={ref}: {str(e).splitlines()[0]}") from None
    return d.get("task") or infer_task(d), d, None


def build_run_model(cfg: dict, model_yaml: dict, ckpt: dict | None, num_classes: int) -> nn.Module:
    """Build the model for ``num_classes`` classes; start from the checkpoint's or ``pretrained`` weights."""
    from vistrain.engine.checkpoint import load_pretrained, transfer_weights
    from vistrain.nn.model import model_from_yaml
    from vistrain.nn.parser import ModelYAMLError

    imgsz = cfg["imgsz"] if model_yaml.get("imgsz") is not None else None
    try:
        model = model_from_yaml(model_yaml, num_classes=num_classes, imgsz=imgsz)
    except ModelYAMLError as e:
        raise UserError(f"model={cfg['model']}: {e}") from None
    if ckpt is not None:
        copied, total = transfer_weights(model, ckpt["model"])
        LOGGER.info(f"weights: {copied}/{total} tensors from {cfg['model']}")
    if cfg.get("pretrained"):
        copied, total = load_pretrained(model, cfg["pretrained"])
        LOGGER.info(f"pretrained: {copied}/{total} tensors from {cfg['pretrained']}")
    return model


def get_task_for(cfg: dict, model_task: str):
    from vistrain.tasks.base import get_task

    if cfg.get("task") and cfg["task"] != model_task:
        raise UserError(f"task={cfg['task']} but model={cfg['model']} is a {model_task} model")
    cfg["task"] = model_task
    task = get_task(model_task)
    if hasattr(task, "apply_defaults"):
        task.apply_defaults(cfg, user_keys(cfg))
    return task


def resolve_exported(cfg: dict):
    """``model=`` an exported file (ONNX, TorchScript, OpenVINO): ``(task, ExportedModel, checkpoint-like dict)``;
    the task learns the head's kind and class count from the file's metadata."""
    from vistrain.deploy.runtime import load_exported

    model = load_exported(cfg["model"])
    meta = model.meta
    task = get_task_for(cfg, meta["task"])
    if hasattr(task, "set_head_kind"):
        task.set_head_kind(meta["head"], meta["nc"])
        task.cfg = cfg  # what setup_model would record: the NMS keys (soft_nms)
        task.graph_nms = meta.get("nms")
        if task.graph_nms:
            LOGGER.info(f"{cfg['model']}: NMS in the file, exported with " + ", ".join(
                f"{k}={v}" for k, v in task.graph_nms.items()) + "; the run's conf, classes and max_det can only keep "
                "fewer")
    size = int(meta["imgsz"][0])
    if not meta.get("dynamic_hw") and "imgsz" in user_keys(cfg) and int(cfg["imgsz"]) != size:
        raise UserError(f"imgsz={cfg['imgsz']}: {cfg['model']} was exported for {size} x {size} inputs; use "
                        f"imgsz={size}, or export with dynamic=True")
    ckpt = {"names": meta["names"], "imgsz": size, "task": meta["task"], "model_yaml": meta["model_yaml"],
            "train_args": meta.get("train_args") or {}, "exported": meta}
    return task, model, ckpt


def resolve_task_and_model(cfg: dict, need_model: bool = True):
    """For val/predict: ``(task, model or None, checkpoint or None)``. Without a checkpoint the model
    is built later from the data's class count, so ``None`` is returned for it.  An exported file gives an
    ``ExportedModel`` (``vistrain.deploy.runtime``), whose outputs are already decoded."""
    from vistrain.deploy.runtime import is_exported

    if is_exported(cfg.get("model")):
        return resolve_exported(cfg)
    task_name, model_yaml, ckpt = resolve_model_source(cfg)
    task = get_task_for(cfg, task_name)
    model = None
    if ckpt is not None:
        from vistrain.nn.model import model_from_yaml
        from vistrain.nn.parser import ModelYAMLError

        try:
            model = model_from_yaml(model_yaml)
        except ModelYAMLError as e:  # a checkpoint whose stored model YAML was edited or written elsewhere
            raise UserError(f"model={cfg['model']}: its model YAML: {e}") from None
        model.load_state_dict(ckpt["model"])
    elif need_model:
        raise UserError(f"model={cfg['model']}: {cfg.get('_mode', 'this mode')} needs trained weights; "
                        f"give a checkpoint, e.g. model=runs/{task_name}/train/weights/best.pt")
    return task, model, ckpt


def prepare_run(cfg: dict, task, default_name: str) -> tuple[Any, Path]:
    """Select the device and create ``PROJECT/TASK/NAME`` (numbered unless ``exist_ok``)."""
    device = select_device(cfg.get("device"))
    name = cfg.get("name") or default_name
    save_dir = increment_path(Path(cfg.get("project") or "runs") / task.name / name, exist_ok=cfg.get("exist_ok"))
    check_writable(save_dir)
    return device, save_dir


def check_writable(folder: Path) -> None:
    """Create ``folder`` and write (then remove) a small probe file in it, so a read-only, forbidden or full
    disk stops the run now, with one line, instead of at the first save after an epoch of training."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(b"\0" * 4096)
                f.flush()
                os.fsync(f.fileno())
        finally:
            os.unlink(probe)
    except OSError as e:
        reason = disk_error_words(e) or (e.strerror or str(e)).lower()
        fix = "free some space or choose another project=" if is_disk_full(e) else "choose a writable project="
        raise UserError(f"cannot write the run folder {folder}: {reason}; {fix}") from None
