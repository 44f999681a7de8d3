"""Checkpoints that load without running code.

A vistrain checkpoint is a ``torch.save`` of plain types and tensors only, read back with
``torch.load(weights_only=True)``: ``model`` (fp32 state_dict used for inference: the EMA when
there is one), ``train_model`` (the raw weights, for resume), ``optimizer``, ``grads`` (gradients accumulated
for the next optimizer step, for resume), ``ema_updates``,
``epoch``, ``best_fitness``, ``model_yaml`` (enough to rebuild the model), ``names``, ``imgsz``,
``task``, ``train_args`` and ``version``.  Files are written to a temp file then renamed, so an
interrupted save never leaves a broken ``last.pt``.  When a run ends, ``best.pt`` is stripped of the training
state (:data:`TRAINING_STATE`: a quarter of its size for an AdamW run); ``last.pt`` keeps it, for resume.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vistrain.engine.utils import UserError

FORMAT_VERSION = 1
TRAINING_STATE = ("train_model", "optimizer", "grads", "scaler", "rng")  # what only resume needs


def save_checkpoint(obj: dict[str, Any], path: str | Path) -> None:
    """Write ``obj`` atomically to ``path`` (temp file in the same folder + ``os.replace``), with the
    permissions a plain ``open()`` would give (mkstemp's temp files are owner-only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        umask = os.umask(0o022)  # read the process umask (set back at once)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def strip_training_state(path: str | Path) -> None:
    """Rewrite the checkpoint at ``path`` without :data:`TRAINING_STATE` (inference weights and metadata stay)."""
    ckpt = load_checkpoint(path)
    if any(k in ckpt for k in TRAINING_STATE):
        save_checkpoint({k: v for k, v in ckpt.items() if k not in TRAINING_STATE}, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint safely; raise ``UserError`` naming the file and the fix when it can't."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, zipfile.BadZipFile, EOFError, AttributeError) as e:
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or isinstance(e, pickle.UnpicklingError):
            raise UserError(f"{path}: refused to load - it holds pickled Python objects, and vistrain never runs "
                            f"code from a checkpoint. Save a plain state_dict there (torch.save(model.state_dict())) "
                            f"and pass it as pretrained=") from None
        raise UserError(f"{path}: not a readable checkpoint ({reason})") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"{path}: expected a dict checkpoint or state_dict, found {type(ckpt).__name__}")
    return ckpt


def is_vistrain_checkpoint(ckpt: dict) -> bool:
    return "model_yaml" in ckpt and "model" in ckpt


def load_model_from_checkpoint(path: str | Path, num_classes: int | None = None) -> tuple[nn.Module, dict]:
    """Rebuild the model a vistrain checkpoint describes and load its inference weights.

    Returns ``(model, ckpt)``. With ``num_classes`` different from the checkpoint's, the
    classifier layer is left freshly initialised (fine-tuning to a new class count).
    """
    from vistrain.nn.model import model_from_yaml

    ckpt = load_checkpoint(path)
    if not is_vistrain_checkpoint(ckpt):
        raise UserError(f"{path}: not a vistrain checkpoint (no model_yaml); to start from a bare state_dict "
                        f"use model=NAME pretrained={path}")
    model = model_from_yaml(ckpt["model_yaml"])
    model.load_state_dict(ckpt["model"])
    if num_classes is not None and num_classes != ckpt["model_yaml"].get("nc"):
        fresh = model_from_yaml(ckpt["model_yaml"], num_classes=num_classes)
        transfer_weights(fresh, model.state_dict())
        model = fresh
    return model, ckpt


def transfer_weights(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Copy every tensor of ``state_dict`` whose key and shape match into ``model``.

    Returns ``(copied, total)`` where ``total`` is the number of entries in the model's state_dict.
    """
    own = model.state_dict()
    matched = {k: v for k, v in state_dict.items() if k in own and own[k].shape == v.shape}
    own.update(matched)
    model.load_state_dict(own)
    return len(matched), len(own)


def load_pretrained(model: nn.Module, path: str | Path) -> tuple[int, int]:
    """Initialise ``model`` from a vistrain checkpoint or a bare state_dict file (e.g. torchvision's)."""
    ckpt = load_checkpoint(path)
    sd = ckpt["model"] if is_vistrain_checkpoint(ckpt) else ckpt.get("state_dict", ckpt)
    if not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path}: no state_dict found (expected a mapping of names to tensors)")
    copied, total = transfer_weights(model, sd)
    if copied == 0:
        raise UserError(f"{path}: none of its {len(sd)} tensors match this model's names and shapes; "
                        f"is it for another architecture?")
    return copied, total
