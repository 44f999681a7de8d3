"""The README's Python examples run as written, on tiny settings.

Every ```python block of README.md is executed in order, in one namespace (the README reads as a tutorial: a block
may use what an earlier one made), in a fresh Python process whose working folder holds the files the examples
name (``images/``, ``photo.jpg``, ``photos/``, ``traffic/data.yaml``, ``cells/data.yaml``, ``VOCdevkit/VOC2007``,
``coco/annotations/instances_train.json``: links into a tiny synthetic dataset) and whose built-in dataset is that
tiny dataset (80 images at 64 px, placed where ``data=`` empty looks for it).  The only changes to the text are
``SUBSTITUTIONS`` (fewer epochs, smaller images); besides, keys the examples leave out default to ``workers=0``,
``plots=False`` and, in training, ``imgsz=64``.  A typo in an example fails the test, with the README's line number
in the traceback.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"

SUBSTITUTIONS = [
    (r"\bepochs=\d+", "epochs=1"),  # \b: freeze_epochs= is left alone
    (r"\bfreeze_epochs=\d+", "freeze_epochs=0"),  # frozen for the whole (one-epoch) run
    (r"\bimgsz=\d+", "imgsz=64"),
]

DRIVER = textwrap.dedent('''
    import json, sys
    import vistrain

    _config = vistrain._config

    def tiny(mode, kwargs):
        kwargs = dict(kwargs)
        kwargs.setdefault("workers", 0)
        kwargs.setdefault("plots", False)
        if mode == "train":
            kwargs.setdefault("imgsz", 64)
        return _config(mode, kwargs)

    vistrain._config = tiny  # vistrain.train/val/predict and Model look it up at each call
    namespace = {"__name__": "__main__"}
    for line, code in json.load(open(sys.argv[1])):
        # padded so that a traceback names the README's own line numbers
        exec(compile("\\n" * (line - 1) + code, "README.md", "exec"), namespace)
        print(f"README block at line {line}: ok", flush=True)
''')


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(first code line, code)`` of every ```python block."""
    blocks, lines, start = [], text.splitlines(), None
    for i, line in enumerate(lines, 1):
        if start is None and line.strip() == "```python":
            start = i + 1
        elif start is not None and line.strip() == "```":
            blocks.append((start, "\n".join(lines[start - 1:i - 1]) + "\n"))
            start = None
    assert start is None, f"README.md: the ```python block at line {start - 1} is not closed"
    return blocks


def tiny(code: str) -> str:
    for pattern, repl in SUBSTITUTIONS:
        code = re.sub(pattern, repl, code)
    return code


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> tuple[Path, dict]:
    """A working folder with the files the examples name, and the environment that makes the tiny dataset the
    built-in one."""
    from vistrain.data import synthetic

    base = tmp_path_factory.mktemp("readme")
    cache = base / "datasets"
    data = synthetic.make_dataset(cache / synthetic.dataset_name(), n=80, imgsz=64, workers=1)
    (data / synthetic._COMPLETE).write_text("ok\n")  # what ensure_dataset() looks for: it is not made again
    work = base / "work"
    work.mkdir()
    for name, target in {"photos": "classify", "traffic": "detect", "cells": "segment", "coco": "coco"}.items():
        (work / name).symlink_to(data / target, target_is_directory=True)
    (work / "VOCdevkit").mkdir()
    (work / "VOCdevkit" / "VOC2007").symlink_to(data / "voc", target_is_directory=True)
    (work / "images").mkdir()
    for image in sorted((data / "segment" / "images" / "val").glob("*.jpg"))[:4]:
        shutil.copy(image, work / "images" / image.name)
    shutil.copy(next((data / "classify" / "val").rglob("*.jpg")), work / "photo.jpg")
    env = {**os.environ, "VISTRAIN_DATASETS": str(cache), "PYTHONUNBUFFERED": "1"}
    return work, env


def run_blocks(blocks: list[tuple[int, str]], workdir: tuple[Path, dict], name: str) -> subprocess.CompletedProcess:
    work, env = workdir
    blocks_file, driver = work.parent / f"{name}.json", work.parent / "driver.py"
    blocks_file.write_text(json.dumps([(line, tiny(code)) for line, code in blocks]))
    driver.write_text(DRIVER)
    return subprocess.run([sys.executable, str(driver), str(blocks_file)], cwd=work, env=env, capture_output=True,
                          text=True, timeout=600)


def test_readme_python_examples_run(workdir):
    text = README.read_text()
    blocks = python_blocks(text)
    assert len(blocks) >= 5, f"README.md: {len(blocks)} ```python blocks found"
    for pattern, _ in SUBSTITUTIONS:  # the map still applies to the README (else it no longer keeps the test tiny)
        assert re.search(pattern, "".join(code for _, code in blocks)), pattern
    proc = run_blocks(blocks, workdir, "readme")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"a README example failed:\n{out[-6000:]}"
    for line, _ in blocks:
        assert f"README block at line {line}: ok" in proc.stdout, out[-6000:]


@pytest.mark.parametrize("typo", [("model.train(", "model.trian("), ("epochs=", "epoch=")])
def test_a_typo_in_a_readme_example_fails(workdir, typo):
    """The check can fail: the first block with a typo stops the run (before any training) with the README line."""
    blocks = python_blocks(README.read_text())
    line, code = next((line, code) for line, code in blocks if typo[0] in code)
    typo_line = line + code[:code.index(typo[0])].count("\n")
    proc = run_blocks([(line, code.replace(typo[0], typo[1], 1))], workdir, "typo")
    assert proc.returncode != 0
    assert f'File "README.md", line {typo_line}' in proc.stderr, proc.stderr[-3000:]
