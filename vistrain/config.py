"""Configuration: the defaults in ``cfg/default.yaml`` plus the user's overrides, checked.

An unknown key or a value of the wrong type raises ``ConfigError`` whose message is one line
naming the key and the closest valid one; the CLI prints it and exits with status 2.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import yaml

DEFAULT_CFG_PATH = Path(__file__).resolve().parent / "cfg" / "default.yaml"
RECIPES_DIR = DEFAULT_CFG_PATH.parent / "recipes"  # cfg=NAME: NAME.yaml here

# Types of keys whose default is empty (None); other keys take the type of their default.
NONE_DEFAULT_TYPES: dict[str, type] = {
    "task": str, "model": str, "data": str, "nc": int, "pretrained": str, "time": float,
    "device": str, "name": str, "source": str, "conf": float, "iou": float, "classes": str, "box": float,
    "cfg": str, "freeze": str, "unfreeze_batch": int, "unfreeze_lr0": float, "opset": int, "cache": str,
    "space": str, "gpu_per_trial": float, "address": str, "visualize": str, "embed": str,
}
CHOICES: dict[str, tuple[str, ...]] = {
    "task": ("classify", "detect", "segment"),
    "optimizer": ("auto", "SGD", "Adam", "AdamW"),
    "format": ("onnx", "torchscript", "openvino"),
    "cache": ("ram", "disk", "true", "false"),
}
NON_NEGATIVE = {"epochs", "patience", "batch", "workers", "threads", "lr0", "lrf", "weight_decay", "warmup_epochs",
                "nbs", "clip_grad", "label_smoothing", "dropout", "fliplr", "hsv", "time", "nc", "imgsz", "n", "topk",
                "box", "obj", "cls", "dfl", "anchor_t", "hsv_h", "hsv_s", "hsv_v", "degrees", "translate", "scale", "shear",
                "perspective", "mosaic", "mixup", "close_mosaic", "max_det", "freeze_epochs", "unfreeze_lr0",
                "lr_step_gamma", "gpu_per_trial"}
POSITIVE = {"batch", "imgsz", "nc", "epochs", "n", "topk", "mask_ratio", "unfreeze_batch", "opset",
            "fraction", "nproc", "iterations", "cpu_per_trial"}  # nbs 0 = the batch
UNIT_INTERVAL = {"split", "fraction", "fliplr", "dropout", "label_smoothing", "lrf", "flipud", "mosaic", "mixup",
                 "conf", "iou", "hsv_h", "hsv_s", "hsv_v", "translate", "lr_step_gamma"}


class ConfigError(ValueError):
    """A bad key or value; the message is one line meant for the user."""


def load_defaults() -> dict[str, Any]:
    return yaml.safe_load(DEFAULT_CFG_PATH.read_text())


def key_help() -> list[tuple[str, Any, str]]:
    """(key, default, one-line meaning) for every key, in the order of default.yaml."""
    out = []
    for line in DEFAULT_CFG_PATH.read_text().splitlines():
        m = re.match(r"^([a-z_0-9]+):\s*(.*?)\s*(?:#\s*(.*))?$", line)
        if m:
            out.append((m.group(1), yaml.safe_load(m.group(2)) if m.group(2) else None, m.group(3) or ""))
    return out


# names users bring from other tools -> our key
ALIASES = {"lr": "lr0", "learning_rate": "lr0", "img_size": "imgsz", "imgsize": "imgsz", "image_size": "imgsz",
           "batch_size": "batch", "bs": "batch", "num_classes": "nc", "classes": "nc", "num_workers": "workers",
           "weights": "model", "lr_final": "lrf", "wd": "weight_decay", "max_epochs": "epochs"}


def closest_key(key: str, keys) -> str | None:
    keys = list(keys)
    if ALIASES.get(key) in keys:
        return ALIASES[key]
    match = difflib.get_close_matches(key, list(keys), n=1, cutoff=0.5)
    return match[0] if match else None


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Convert ``value`` (a CLI string or a Python value) to the type the key takes."""
    typ = NONE_DEFAULT_TYPES.get(key) if default is None else type(default)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "") and default is None):
        return None
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        if key == "resume" and isinstance(value, (str, Path)):
            return str(value)  # resume=path/to/last.pt
        raise ConfigError(f"{key}={value!r}: expected true or false")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected an integer, e.g. {key}={default or 1}")
        try:
            f = float(value)
            if f != int(f):
                raise ValueError
            return int(f)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r}: expected an integer, e.g. {key}={default or 1}") from None
    if typ is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r}: expected a number, e.g. {key}={default or 1.0}") from None
    if typ is str:
        if key == "source" and isinstance(value, (list, tuple)):  # paths, or in-memory images (kept as they are)
            return [str(v) if isinstance(v, (str, Path)) else v for v in value]
        if key == "source" and not isinstance(value, (str, Path)):  # a numpy array, PIL image or tensor
            return value
        if key == "freeze" and isinstance(value, (list, tuple)):  # ultralytics' list form: layer indices
            return "[" + ",".join(str(v) for v in value) + "]"
        return str(value)
    return value


def _check_range(key: str, value: Any) -> None:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if key in POSITIVE and value <= 0:
        raise ConfigError(f"{key}={value}: must be greater than 0")
    if key in NON_NEGATIVE and value < 0:
        raise ConfigError(f"{key}={value}: must not be negative")
    if key in UNIT_INTERVAL and not 0 <= value <= 1:
        raise ConfigError(f"{key}={value}: must lie between 0 and 1")


def _checked(key: str, value: Any, defaults: dict[str, Any]) -> Any:
    """``value`` converted to the type ``key`` takes and checked; ``ConfigError`` for an unknown key or bad value."""
    if key not in defaults:
        near = closest_key(key, defaults)
        hint = f"; did you mean '{near}'?" if near else ""
        raise ConfigError(f"unknown key '{key}'{hint} (`vistrain help` lists every key)")
    value = _coerce(key, value, defaults[key])
    if key in CHOICES and value is not None:
        lowered = {c.lower(): c for c in CHOICES[key]}
        if str(value).lower() not in lowered:
            near = closest_key(str(value), CHOICES[key]) or CHOICES[key][0]
            raise ConfigError(f"{key}={value}: not one of {', '.join(CHOICES[key])}; did you mean '{near}'?")
        value = lowered[str(value).lower()]
    _check_range(key, value)
    return value


def recipes() -> list[str]:
    """Names ``cfg=`` finds without a path (``cfg/recipes/*.yaml``)."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def load_cfg_file(ref: str) -> dict[str, Any]:
    """The ``key: value`` pairs of ``cfg=ref``: a YAML file, or a recipe name (``efficientdet-tutorial``)."""
    path = Path(ref).expanduser()
    if not path.is_file():
        recipe = RECIPES_DIR / (ref if ref.endswith((".yaml", ".yml")) else f"{ref}.yaml")
        if "/" in ref or not recipe.is_file():
            raise ConfigError(f"cfg={ref}: no such file, nor a recipe name ({', '.join(recipes()) or 'none'})")
        path = recipe
    try:
        d = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"cfg={ref}: cannot read it as YAML ({str(e).splitlines()[0]})") from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ConfigError(f"cfg={ref}: expected key: value lines, found a YAML {type(d).__name__}")
    if "backbone" in d or "arch" in d:
        raise ConfigError(f"cfg={ref}: a model YAML, not a file of settings; give it as model={ref}")
    if "cfg" in d:
        raise ConfigError(f"cfg={ref}: a cfg file cannot name another cfg file (cfg: {d['cfg']})")
    return d


def get_config(overrides: dict[str, Any] | None = None, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Defaults (or ``base``) updated with the keys of ``cfg=FILE`` if given, then with ``overrides``, every key
    and value checked.  The file's keys are added to ``overrides`` (where not there), so that callers that
    record the keys the user chose (``_user_keys``) count them: a key in the user's file is the user's."""
    defaults = load_defaults()
    cfg = dict(base) if base else dict(defaults)
    overrides = {} if overrides is None else overrides
    ref = _checked("cfg", overrides["cfg"], defaults) if "cfg" in overrides else None
    from_file = load_cfg_file(ref) if ref else {}
    for key, value in from_file.items():
        try:
            cfg[key] = _checked(key, value, defaults)
        except ConfigError as e:
            raise ConfigError(f"cfg={ref}: {e}") from None
    for key, value in overrides.items():
        cfg[key] = _checked(key, value, defaults)
    for key, value in from_file.items():
        overrides.setdefault(key, value)
    return cfg


def parse_cli_args(args: list[str]) -> dict[str, str]:
    """``["epochs=3", "batch=8"]`` -> ``{"epochs": "3", "batch": "8"}``; a bare word is an error."""
    out = {}
    for a in args:
        if "=" not in a:
            raise ConfigError(f"argument '{a}' is not key=value (e.g. epochs=10); `vistrain help` lists every key")
        k, v = a.split("=", 1)
        k = k.strip().lstrip("-").replace("-", "_")
        if not k:
            raise ConfigError(f"argument '{a}' has no key before '='")
        out[k] = v.strip()
    return out
