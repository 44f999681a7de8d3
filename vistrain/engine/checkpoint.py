"""Checkpoints that load without running code.

A vistrain checkpoint is a ``torch.save`` of plain types and tensors only, read back with
``torch.load(weights_only=True)``: ``model`` (fp32 state_dict used for inference: the EMA when
there is one), ``train_model`` (the raw weights, for resume), ``optimizer``, ``grads`` (gradients accumulated
for the next optimizer step, for resume), ``ema_updates``,
``epoch``, ``best_fitness``, ``model_yaml`` (enough to rebuild the model), ``names``, ``imgsz``,
``task``, ``train_args``, ``results_row`` (the epoch's results.csv row), ``phase`` (1 frozen or 2 unfrozen, for
``freeze_epochs=``) and ``version``.  Files are written to
a temp file then renamed, so an interrupted save never leaves a broken ``last.pt``; a full disk is a
``UserError`` (the temp file removed, the previous file intact), and a file that is not a checkpoint (empty,
text, HTML, JSON, a Git LFS pointer, a truncated zip) is named for what it is before ``torch.load`` sees it.
When a run ends, ``best.pt`` is stripped of the training
state (:data:`TRAINING_STATE`: a quarter of its size for an AdamW run); ``last.pt`` keeps it, for resume.
"""

from __future__ import annotations

import codecs
import os
import pickle
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vistrain.engine.utils import UserError, disk_error_message, is_disk_full

FORMAT_VERSION = 1
TRAINING_STATE = ("train_model", "optimizer", "grads", "scaler", "rng", "threads", "phase")  # what only resume needs


def save_checkpoint(obj: dict[str, Any], path: str | Path) -> None:
    """Write ``obj`` atomically to ``path`` (temp file in the same folder + ``os.replace``), with the
    permissions a plain ``open()`` would give (mkstemp's temp files are owner-only)."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        os.close(fd)
        umask = os.umask(0o022)  # read the process umask (set back at once)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if is_disk_full(e):
            kept = ("the previous checkpoint is intact (free some space, then resume=True continues from it)"
                    if path.exists() else "nothing was saved (free some space and run again)")
            raise UserError(f"no space left on device while writing {path}; {kept}") from None
        if isinstance(e, OSError) and disk_error_message(e, path):
            raise UserError(disk_error_message(e, path)) from None
        raise
    finally:
        if tmp is not None and os.path.exists(tmp):
            try:
                os.unlink(tmp)
            except OSError:  # a read-only folder: nothing was written there either
                pass


def strip_training_state(path: str | Path) -> None:
    """Rewrite the checkpoint at ``path`` without :data:`TRAINING_STATE` (inference weights and metadata stay)."""
    ckpt = load_checkpoint(path)
    if any(k in ckpt for k in TRAINING_STATE):
        save_checkpoint({k: v for k, v in ckpt.items() if k not in TRAINING_STATE}, path)


ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format
PICKLE_PROTO = b"\x80"  # a pickle (torch's legacy format starts with one)
LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == ZIP_MAGIC


SAFETENSORS = "a safetensors file"


def sniff_checkpoint(path: Path) -> str | None:
    """``None`` when the first bytes look like a PyTorch checkpoint (zip or pickle); otherwise what the file
    is instead and the fix, so a wrong file gets one clear line rather than an unpickler's error."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        return f"cannot read it ({e.strerror})"
    if head.startswith(ZIP_MAGIC) or head.startswith(PICKLE_PROTO):
        return None
    if not head:
        return "an empty file (0 bytes), not a checkpoint; the copy or download did not finish - copy it again"
    if head.startswith(LFS_POINTER):
        return ("a Git LFS pointer, not the weights themselves; run `git lfs pull` in its repository to fetch "
                "the real file")
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<!doctype", b"<html", b"<head", b"<?xml")):
        return ("an HTML/XML page (an error or login page saved in place of the file?), not a checkpoint; "
                "download the file itself")
    if text.startswith((b"{", b"[")):
        return "a JSON file, not a checkpoint; give the .pt file that torch.save wrote"
    if head[8:10] == b'{"':  # 8-byte header length, then a JSON header
        return SAFETENSORS  # read by read_safetensors
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head)  # (the 512 bytes may end inside a character)
        is_text = all(c >= 32 or c in b"\t\r\n\f" for c in head)
    except UnicodeDecodeError:
        is_text = False
    if is_text:
        first = text.split(b"\n", 1)[0].decode("utf-8", "replace").strip()[:60]
        return f"a text file (starting {first!r}), not a checkpoint; give the .pt file that torch.save wrote"
    return (f"not a PyTorch checkpoint (unknown format: starts with bytes {head[:8].hex(' ')}); give the .pt "
            f"file that torch.save wrote")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint safely; raise ``UserError`` naming the file and the fix when it can't."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: checkpoint not found")
    if path.is_dir():
        raise UserError(f"{path}: a folder, not a checkpoint file")
    kind = sniff_checkpoint(path)
    if kind == SAFETENSORS:
        return read_safetensors(path)
    if kind is not None:
        raise UserError(f"{path}: {kind}")
    try:
        with warnings.catch_warnings():  # (e.g. "pickle protocol 4": the file is refused or loads; no warning)
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (whatever a damaged file makes the unpickler raise)
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        if isinstance(e, OSError):
            raise UserError(f"{path}: cannot read it ({e.strerror or reason})") from None
        if (is_zip(path) and not zipfile.is_zipfile(path) or "central directory" in str(e)
                or isinstance(e, EOFError) or "EOF" in str(e) or "truncated" in str(e)):
            raise UserError(f"{path}: a truncated or damaged checkpoint (it ends too early); the copy or download "
                            f"did not finish - copy it again") from None
        if "weights_only" in str(e) or isinstance(e, pickle.UnpicklingError):
            # pickled model objects: an ultralytics or yolov5 file is read with its classes as inert placeholders;
            # a file naming anything else (os.system, ...) is refused (vistrain.engine.foreign)
            from vistrain.engine.foreign import peer_checkpoint

            return peer_checkpoint(path)
        raise UserError(f"{path}: not a readable checkpoint ({reason})") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"{path}: expected a dict checkpoint or state_dict, found {type(ckpt).__name__}")
    return recognised(path, ckpt)


def read_safetensors(path: Path) -> dict[str, Any]:
    """A ``.safetensors`` file (timm's, effdet's, anyone's state_dict): tensors only, nothing to unpickle."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        sd = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: a damaged safetensors file ({str(e).splitlines()[0][:160]}); copy it again") from None
    return recognised(path, sd)


def recognised(path: Path, ckpt: dict[str, Any]) -> dict[str, Any]:
    """A bare state_dict that is a torchvision ResNet's or an effdet EfficientDet's becomes a vistrain checkpoint
    (the keys are the same; the architecture is read from the tensors' names and shapes); anything else as it is."""
    if is_vistrain_checkpoint(ckpt) or not is_state_dict(ckpt):
        return ckpt
    from vistrain.engine.foreign import state_dict_checkpoint

    return state_dict_checkpoint(path, ckpt.get("state_dict", ckpt)) or ckpt


def is_vistrain_checkpoint(ckpt: dict) -> bool:
    return isinstance(ckpt.get("model_yaml"), dict) and isinstance(ckpt.get("model"), dict)


def is_state_dict(ckpt: dict) -> bool:
    sd = ckpt.get("state_dict", ckpt)
    return isinstance(sd, dict) and bool(sd) and all(isinstance(v, torch.Tensor) for v in sd.values())


def not_vistrain_checkpoint(ref: str | Path, ckpt: dict) -> str:
    """The message for ``model=ref`` whose dict is not a vistrain checkpoint: a bare state_dict, or what else."""
    if is_state_dict(ckpt):
        return (f"model={ref}: a bare state_dict, not a vistrain checkpoint; use model=NAME pretrained={ref} to "
                f"start from its weights")
    keys = ", ".join(map(str, list(ckpt)[:6])) + (", ..." if len(ckpt) > 6 else "")
    return (f"model={ref}: a dict with keys {{{keys}}}, neither a vistrain checkpoint (model, model_yaml) nor a "
            f"state_dict of tensors; give a checkpoint that vistrain train wrote (weights/best.pt)")


def load_model_from_checkpoint(path: str | Path, num_classes: int | None = None) -> tuple[nn.Module, dict]:
    """Rebuild the model a vistrain checkpoint describes and load its inference weights.

    Returns ``(model, ckpt)``. With ``num_classes`` different from the checkpoint's, the
    classifier layer is left freshly initialised (fine-tuning to a new class count).
    """
    from vistrain.nn.model import model_from_yaml

    ckpt = load_checkpoint(path)
    if not is_vistrain_checkpoint(ckpt):
        raise UserError(not_vistrain_checkpoint(path, ckpt))
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
    if isinstance(getattr(model, "backbone", None), nn.Module):  # a classifier's weights into a detector's backbone
        # (EfficientNet-BN -> EfficientDet: timm's keys under backbone.), for the tensors not matched as they are
        matched.update({f"backbone.{k}": v for k, v in state_dict.items() if k not in matched
                        and own.get(f"backbone.{k}") is not None and own[f"backbone.{k}"].shape == v.shape})
    own.update(matched)
    model.load_state_dict(own)
    return len(matched), len(own)


def load_pretrained(model: nn.Module, path: str | Path) -> tuple[int, int]:
    """Initialise ``model`` from a vistrain checkpoint or a bare state_dict file (e.g. torchvision's)."""
    ckpt = load_checkpoint(path)
    sd = ckpt["model"] if is_vistrain_checkpoint(ckpt) else ckpt.get("state_dict", ckpt)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path}: no state_dict found (expected a mapping of names to tensors)")
    copied, total = transfer_weights(model, sd)
    if copied == 0:
        raise UserError(f"{path}: none of its {len(sd)} tensors match this model's names and shapes; "
                        f"is it for another architecture?")
    return copied, total
