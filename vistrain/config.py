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

# Types of keys whose default is empty (None); other keys take the type of their default.
NONE_DEFAULT_TYPES: dict[str, type] = {
    "task": str, "model": str, "data": str, "nc": int, "pretrained": str, "time": float,
    "device": str, "name": str, "source": str, "conf": float, "iou": float, "classes": str, "box": float,
}
CHOICES: dict[str, tuple[str, ...]] = {
    "task": ("classify", "detect", "segment"),
    "optimizer": ("auto", "SGD", "Adam", "AdamW"),
}
NON_NEGATIVE = {"epochs", "patience", "batch", "workers", "threads", "lr0", "lrf", "weight_decay", "warmup_epochs",
                "nbs", "clip_grad", "label_smoothing", "dropout", "fliplr", "hsv", "time", "nc", "imgsz", "n", "topk",
                "box", "obj", "cls", "dfl", "anchor_t", "hsv_h", "hsv_s", "hsv_v", "degrees", "translate", "scale", "shear",
                "perspective", "mosaic", "mixup", "close_mosaic", "max_det"}
POSITIVE = {"batch", "imgsz", "nbs", "nc", "epochs", "n", "topk", "mask_ratio"}
UNIT_INTERVAL = {"split", "fliplr", "dropout", "label_smoothing", "lrf", "flipud", "mosaic", "mixup", "conf", "iou",
                 "hsv_h", "hsv_s", "hsv_v", "translate"}


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
           "weights": "model", "cfg": "model", "lr_final": "lrf", "wd": "weight_decay", "max_epochs": "epochs"}


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
        if key == "source" and isinstance(value, (list, tuple)):
            return [str(v) for v in value]
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


def get_config(overrides: dict[str, Any] | None = None, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Defaults (or ``base``) updated with ``overrides``, every key and value checked."""
    defaults = load_defaults()
    cfg = dict(base) if base else dict(defaults)
    for key, value in (overrides or {}).items():
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
        cfg[key] = value
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
