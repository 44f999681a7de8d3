"""Faults outside the code: full, read-only or forbidden disks, and files that are not checkpoints.

Each one is a user error: one line on stderr, exit status 2, no traceback, and nothing half-written left
behind (issue 26).  The real-disk tests mount a tiny tmpfs and are skipped where mounting is not allowed.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import pickle
import re
import subprocess
import types
from pathlib import Path

import pytest
import torch

import vistrain
import vistrain.engine.checkpoint as checkpoint_module
import vistrain.engine.run as run_module
import vistrain.engine.records as records_module
import vistrain.engine.trainer as trainer_module
from vistrain.cli import main
from vistrain.engine.checkpoint import load_checkpoint, save_checkpoint
from vistrain.engine.utils import UserError
from conftest import write_colour_folder

FAST = ["model=yolov5n-cls", "imgsz=32", "batch=8", "nbs=8", "workers=0", "seed=0", "warmup_epochs=0", "plots=False"]


@pytest.fixture
def colour_folder(tmp_path) -> Path:
    """Smaller than the shared fixture's (18 images): these runs only need to reach their saves."""
    return write_colour_folder(tmp_path / "colours", per_class=6)


def one_line_error(capsys) -> str:
    """The one error line, last on stderr (training runs draw their progress bars there before it)."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    lines = [s for s in re.split(r"[\r\n]+", err) if s.strip()]
    messages = [s for s in lines if s.startswith("vistrain ")]
    assert len(messages) == 1 and lines[-1] == messages[0], err
    return messages[0]


def epochs_in(csv_path: Path) -> list[int]:
    with open(csv_path) as f:
        return [int(r["epoch"]) for r in csv.DictReader(f)]


def temp_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.tmp")) + sorted(folder.rglob(".write-probe-*"))


def vistrain_checkpoint(path: Path) -> Path:
    """A small, real vistrain checkpoint (untrained weights) for the val / predict modes."""
    model = vistrain.build_model("yolov5n-cls", num_classes=3, imgsz=32)
    save_checkpoint({"model": model.state_dict(), "model_yaml": model.yaml, "names": ["a", "b", "c"], "imgsz": 32,
                     "task": "classify"}, path)
    return path


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a tmpfs with the given options at a fresh folder (skip where mount is not permitted)."""
    mounted = []

    def mount(options: str) -> Path:
        where = tmp_path / f"mnt{len(mounted)}"
        where.mkdir()
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
        if p.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {p.stderr.decode().strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", str(where)], capture_output=True)


# ---------------------------------------------------------------- checkpoints that are not checkpoints
def _truncated(path: Path) -> None:
    vistrain_checkpoint(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


class Stranger:
    pass


BAD_FILES = {
    "empty": (lambda p: p.write_bytes(b""), ["empty file", "copy it again"]),
    "text": (lambda p: p.write_text("epochs: 10\nlr0: 0.01\n"), ["a text file", "not a checkpoint"]),
    "json": (lambda p: p.write_text(json.dumps({"model": "yolov5n-cls"})), ["a JSON file", "not a checkpoint"]),
    "html": (lambda p: p.write_text("<!DOCTYPE html>\n<html><body>Sign in</body></html>\n"),
             ["an HTML/XML page", "download the file itself"]),
    "lfs": (lambda p: p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:4d7a21\nsize 5242880\n"),
            ["a Git LFS pointer", "git lfs pull"]),
    "truncated": (_truncated, ["truncated or damaged checkpoint", "copy it again"]),
    "pickle": (lambda p: p.write_bytes(pickle.dumps({"model": Stranger()})),
               ["pickled Python objects", "never runs code"]),
    "dict": (lambda p: torch.save({"foo": 1}, p), ["a dict with keys {foo}", "neither a vistrain checkpoint"]),
}


@pytest.mark.parametrize("mode", ["val", "predict", "train"])
@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_bad_checkpoint_file_one_line_exit_2(kind, mode, tmp_path, capsys):
    make, words = BAD_FILES[kind]
    path = tmp_path / "x.pt"
    make(path)
    image = tmp_path / "img.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(image)
    extra = {"predict": [f"source={image}"], "train": ["epochs=1", "workers=0"], "val": ["workers=0"]}[mode]
    assert main([mode, f"model={path}", *extra]) == 2
    err = one_line_error(capsys)
    assert err.startswith(f"vistrain {mode}: ") and str(path) in err, err
    for w in words:
        assert w in err, err
    if kind != "pickle":
        assert "pickled Python objects" not in err, err
    assert not Path("runs").exists()  # nothing created before the model was known


def test_lfs_pointer_refused_for_pretrained_and_resume(tmp_path):
    lfs = tmp_path / "w.pt"
    BAD_FILES["lfs"][0](lfs)
    for kw in ({"pretrained": str(lfs)}, {"resume": str(lfs)}):
        with pytest.raises(UserError, match="Git LFS pointer.*git lfs pull"):
            vistrain.train(model="yolov5n-cls", imgsz=32, epochs=1, workers=0, **kw)


# ---------------------------------------------------------------- full disk while saving
@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
    RuntimeError("PytorchStreamWriter failed writing file data/3: file write failed"),
])
def test_save_checkpoint_disk_full_keeps_previous_and_no_tmp(failure, tmp_path, monkeypatch):
    path = tmp_path / "weights" / "last.pt"
    save_checkpoint({"epoch": 0, "w": torch.ones(3)}, path)
    before = path.read_bytes()
    real_save = torch.save

    def save_half_then_fail(obj, f, *args, **kw):
        real_save(obj, f, *args, **kw)
        Path(f).write_bytes(Path(f).read_bytes()[:100])
        raise failure

    monkeypatch.setattr(checkpoint_module.torch, "save", save_half_then_fail)
    with pytest.raises(UserError) as e:
        save_checkpoint({"epoch": 1, "w": torch.zeros(3)}, path)
    assert str(e.value) == (f"no space left on device while writing {path}; the previous checkpoint is intact "
                            f"(free some space, then resume=True continues from it)")
    assert path.read_bytes() == before
    assert temp_files(tmp_path) == []
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    assert load_checkpoint(path)["epoch"] == 0


def test_train_disk_full_at_a_save_then_resume_is_clean(colour_folder, monkeypatch, capsys):
    """The save of epoch 2 fails: one line, exit 2, results.csv lists epoch 1 only, no temp file. A resume (after a
    killed run left stale temp files and an unsaved epoch's row) removes both and finishes with rows 1-2."""
    real_save, calls = torch.save, []

    def full_on_third_save(obj, f, *args, **kw):  # epoch 1 writes last.pt and best.pt; epoch 2's last.pt fails
        calls.append(f)
        if len(calls) == 3:
            with open(f, "wb") as out:
                out.write(b"PK\x03\x04 partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1024 vs 960")
        return real_save(obj, f, *args, **kw)

    monkeypatch.setattr(checkpoint_module.torch, "save", full_on_third_save)
    assert main(["train", f"data={colour_folder}", "epochs=2", "name=full", *FAST]) == 2
    err = one_line_error(capsys)
    run = Path("runs/classify/full")
    last = run / "weights/last.pt"
    assert err == (f"vistrain train: no space left on device while writing {last}; the previous checkpoint is "
                   f"intact (free some space, then resume=True continues from it)")
    assert epochs_in(run / "results.csv") == [1]
    assert temp_files(run) == []
    assert load_checkpoint(last)["epoch"] == 0
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)  # (undo() would also undo the chdir)

    # what a killed run leaves: a temp file of a save cut off, and the row of an epoch it never saved
    (run / "weights/last.pt.k3j2_x9.tmp").write_bytes(b"PK\x03\x04 cut")
    (run / "weights/best.pt.a8b7c6.tmp").write_bytes(b"")
    (run / "weights/keep.tmp").write_bytes(b"not ours")
    with open(run / "results.csv") as f:
        lines = f.read().splitlines()
    with open(run / "results.csv", "a") as f:
        f.write("2" + lines[1][1:] + "\n")
    assert epochs_in(run / "results.csv") == [1, 2]

    assert main(["train", f"resume={last}"]) == 0
    assert epochs_in(run / "results.csv") == [1, 2]
    assert sorted(p.name for p in (run / "weights").iterdir()) == ["best.pt", "keep.tmp", "last.pt"]
    assert load_checkpoint(last)["epoch"] == 1
    assert temp_files(Path("runs")) == [run / "weights/keep.tmp"]  # and no write probe left


def test_resume_restores_the_row_of_a_saved_epoch(colour_folder, monkeypatch):
    """Killed between the save and the results.csv row: resume puts the checkpoint's own row back."""
    real_log = trainer_module.Trainer.log_epoch

    def killed_before_first_row(self, *args):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer_module.Trainer, "log_epoch", killed_before_first_row)
    assert main(["train", f"data={colour_folder}", "epochs=2", "name=killed", *FAST]) == 130
    run = Path("runs/classify/killed")
    assert not (run / "results.csv").exists() and load_checkpoint(run / "weights/last.pt")["epoch"] == 0
    monkeypatch.setattr(trainer_module.Trainer, "log_epoch", real_log)
    assert main(["train", f"resume={run / 'weights/last.pt'}"]) == 0
    assert epochs_in(run / "results.csv") == [1, 2]


def test_results_csv_on_a_full_disk_one_line(colour_folder, monkeypatch, capsys):
    real_open = open

    def full_for_csv(file, mode="r", *args, **kw):
        if str(file).endswith("results.csv") and "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        return real_open(file, mode, *args, **kw)

    monkeypatch.setattr(records_module, "open", full_for_csv, raising=False)  # (where results.csv is written)
    assert main(["train", f"data={colour_folder}", "epochs=2", "name=csvfull", *FAST]) == 2
    err = one_line_error(capsys)
    assert err.startswith("vistrain train: no space left on device while writing runs/classify/csvfull/results.csv")
    assert load_checkpoint("runs/classify/csvfull/weights/last.pt")["epoch"] == 0  # saved before the row


# ---------------------------------------------------------------- run folders that cannot be written
def _mode_args(mode: str, tmp_path: Path) -> list[str]:
    if mode == "train":
        return ["epochs=1", *FAST]
    ckpt = vistrain_checkpoint(tmp_path / "ck" / "best.pt")
    if mode == "val":
        return [f"model={ckpt}", "workers=0"]
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "img.png")
    return [f"model={ckpt}", f"source={tmp_path / 'img.png'}"]


@pytest.mark.parametrize("code,words", [(errno.EROFS, "read-only file system; choose a writable project="),
                                        (errno.EACCES, "permission denied; choose a writable project="),
                                        (errno.ENOSPC, "no space left on device; free some space or choose another "
                                                       "project=")])
@pytest.mark.parametrize("mode", ["train", "val", "predict"])
def test_unwritable_project_stops_before_work(mode, code, words, tmp_path, monkeypatch, capsys):
    """Without mounting anything (and as root, whom chmod does not stop): the probe write fails as such a disk
    would make it fail."""
    args = _mode_args(mode, tmp_path)

    def refuse(*a, **kw):
        raise OSError(code, os.strerror(code), kw.get("dir"))

    monkeypatch.setattr(run_module, "tempfile", types.SimpleNamespace(mkstemp=refuse))
    monkeypatch.setattr(trainer_module.Trainer, "train_epoch", lambda self: pytest.fail("training started"))
    assert main([mode, *args, f"project={tmp_path / 'out'}"]) == 2
    err = one_line_error(capsys)
    assert err == f"vistrain {mode}: cannot write the run folder {tmp_path / 'out'}/classify/{mode}: {words}"


@pytest.mark.parametrize("mode", ["train", "val", "predict"])
def test_read_only_mount_stops_before_work(mode, tmp_path, tmpfs, capsys):
    args = _mode_args(mode, tmp_path)
    ro = tmpfs("ro,size=64k")
    assert main([mode, *args, f"project={ro}"]) == 2
    err = one_line_error(capsys)
    assert f"cannot write the run folder {ro}/classify/{mode}: read-only file system" in err, err
    assert "mkdir" not in err and "Errno" not in err


def test_real_full_disk_during_the_first_save(colour_folder, tmpfs, capsys):
    """A 256 KiB tmpfs: the run folder and args.yaml fit, the first checkpoint (MBs) does not."""
    small = tmpfs("size=256k")
    assert main(["train", f"data={colour_folder}", "epochs=2", f"project={small}", *FAST]) == 2
    err = one_line_error(capsys)
    run = small / "classify/train"
    assert err == (f"vistrain train: no space left on device while writing {run / 'weights/last.pt'}; nothing was "
                   f"saved (free some space and run again)")
    assert not (run / "results.csv").exists()  # no row for an epoch without a checkpoint
    assert temp_files(small) == [] and not list((run / "weights").iterdir())
    os.statvfs(small)  # still mounted and readable
