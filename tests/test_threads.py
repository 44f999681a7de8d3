"""The ``threads`` key, OpenMP's wait policy and the data-loader workers' threads (no timing here: bench/threads.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import cv2
import pytest
import torch

import vistrain
from conftest import write_colour_folder
from vistrain.cli import main
from vistrain.config import ConfigError, get_config
from vistrain.utils import threads as vt


@pytest.fixture(autouse=True)
def _restore_threads():
    """Tests here change process-wide thread settings; put them back for the rest of the session."""
    torch_threads, cv2_threads = torch.get_num_threads(), cv2.getNumThreads()
    yield
    torch.set_num_threads(torch_threads)
    cv2.setNumThreads(cv2_threads)


def test_key_default_and_validation():
    assert get_config()["threads"] == 0
    assert get_config({"threads": "3"})["threads"] == 3
    with pytest.raises(ConfigError, match="threads=-1: must not be negative"):
        get_config({"threads": -1})
    with pytest.raises(ConfigError, match="expected an integer"):
        get_config({"threads": "two"})


def test_negative_threads_exits_2(capsys):
    assert main(["train", "threads=-2"]) == 2
    assert "threads=-2" in capsys.readouterr().err


def test_help_lists_threads(capsys):
    assert main(["help"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("threads="))
    assert "threads=0" in line and "auto" in line
    assert main(["train", "help"]) == 0
    assert "threads=" in capsys.readouterr().out


def test_resolve_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert vt.resolve_threads(3) == 3
    assert vt.resolve_threads(0) == vt.cpu_count() >= 1
    for cpus, workers, auto in ((2, 2, 1), (2, 0, 2), (4, 2, 2), (16, 2, 14), (16, 8, 8), (16, 12, 8), (1, 2, 1)):
        monkeypatch.setattr(vt, "cpu_count", lambda c=cpus: c)
        assert vt.resolve_threads(0, workers) == auto, (cpus, workers)
    monkeypatch.setattr(vt, "cpu_count", lambda: 2)
    assert vt.apply_threads({"threads": 0, "workers": 2, "_mode": "predict"}) == 2  # predict has no workers
    assert vt.apply_threads({"threads": 0, "workers": 2, "_mode": "train"}) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert vt.resolve_threads(0, 0) == 1
    assert vt.resolve_threads(2) == 2  # the key wins over the environment


def test_train_api_sets_threads(tmp_path):
    """vistrain.train(threads=1) trains with 1 intra-op thread in this process."""
    torch.set_num_threads(2)
    seen = []
    from vistrain.engine.trainer import Trainer

    orig = Trainer.train

    def spy(self):
        seen.append(torch.get_num_threads())
        return orig(self)

    Trainer.train = spy
    try:
        data = write_colour_folder(tmp_path / "colours", per_class=4, size=32)
        vistrain.train(model="yolov5n-cls", data=str(data), imgsz=32, epochs=1, batch=3, nbs=3, workers=0, threads=1,
                       plots=False, project=str(tmp_path / "runs"), verbose=False)
    finally:
        Trainer.train = orig
    assert seen == [1]
    assert torch.get_num_threads() == 1


def test_worker_init_limits_threads():
    from vistrain.engine.utils import seed_worker
    from vistrain.utils.threads import limit_worker_threads

    torch.set_num_threads(2)
    cv2.setNumThreads(2)
    limit_worker_threads()
    assert torch.get_num_threads() == 1
    assert cv2.getNumThreads() <= 1  # 0: sequential (OpenCV reports 1 on some builds)
    torch.set_num_threads(2)
    seed_worker(0)  # the DataLoader's worker_init_fn calls it
    assert torch.get_num_threads() == 1


def test_wait_policy_is_set_before_torch_loads():
    """A fresh process: `vistrain` (the command's module) does not load torch on import, and main() sets
    OMP_WAIT_POLICY=PASSIVE unless the user chose a policy; libgomp reads it when torch loads."""
    code = ("import os, sys\n"
            "import vistrain.cli\n"
            "assert 'torch' not in sys.modules, 'importing vistrain.cli loaded torch'\n"
            "vistrain.cli.main(['summary', 'model=yolov5n-cls', 'nc=2', 'imgsz=32', 'threads=1'])\n"
            "import torch\n"
            "print('POLICY', os.environ.get('OMP_WAIT_POLICY'), torch.get_num_threads())\n")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "POLICY PASSIVE 1" in out.stdout
    env["GOMP_SPINCOUNT"] = "1000"  # the user's choice is left alone
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "POLICY None 1" in out.stdout


def test_wait_policy_not_touched_once_torch_is_loaded(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert "torch" in sys.modules
    assert vt.set_wait_policy() is False
    assert "OMP_WAIT_POLICY" not in os.environ
