"""Shared fixtures: tiny generated data, no network."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("YOLO_OFFLINE", "1")
# label caches of test datasets never land in the user's ~/.cache
os.environ.setdefault("VISTRAIN_CACHE", tempfile.mkdtemp(prefix="vistrain-test-cache-"))

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def write_colour_folder(root: Path, per_class: int = 12, size: int = 32, seed: int = 0) -> Path:
    """An ImageFolder of 3 easy classes (noisy red / green / blue images)."""
    rng = np.random.default_rng(seed)
    for name, colour in COLOURS.items():
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            a = np.clip(np.array(colour) + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(a).save(d / f"{name}_{i:03d}.png")
    return root


def export_formats() -> list[str]:
    """The export formats whose runtimes are installed: ONNX and TorchScript, and OpenVINO with its extra."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return ["onnx", "torchscript"]
    return ["onnx", "torchscript", "openvino"]


@pytest.fixture
def colour_folder(tmp_path) -> Path:
    return write_colour_folder(tmp_path / "colours")


@pytest.fixture(autouse=True)
def _runs_in_tmp(tmp_path, monkeypatch):
    """Every test runs in its own folder so runs/ never lands in the repository."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def ultralytics_home(tmp_path_factory):
    """Import ultralytics (a test oracle only) offline, with its settings in a temp folder, and undo its
    process-wide patches (it replaces ``PIL.Image.open`` with a version that may try to pip-install a HEIF
    plugin, and changes OpenCV's thread count and numpy's print options).  Skips without ultralytics."""
    import cv2
    from PIL import Image

    os.environ["YOLO_OFFLINE"] = "1"
    os.environ.setdefault("YOLO_CONFIG_DIR", str(tmp_path_factory.mktemp("ultralytics-config")))
    pil_open, threads, np_opts = Image.open, cv2.getNumThreads(), np.get_printoptions()
    try:
        ultralytics = pytest.importorskip("ultralytics", reason="ultralytics (a dev extra) is the test oracle; "
                                                                "`make test` installs it")
        import ultralytics.nn.tasks  # noqa: F401  (its model code and patches load here, not mid-test)
    finally:
        Image.open = pil_open
        cv2.setNumThreads(threads)
        np.set_printoptions(**np_opts)
    return ultralytics
