"""DDP on CPUs (gloo, 2 processes under torchrun): a DDP step equals a one-process step on the whole batch, a killed
DDP run resumes exactly, a failing rank ends the job with its message, and the loss normalisers of every detection
loss are the whole batch's.

The equality runs use plain SGD with a small lr: there, float rounding (which differs between 2 x 8 and 1 x 16 images,
as between 1 and 2 CPU threads) stays far below the tolerance, while the weights move 100x more than it.  With larger
steps the tiny BatchNorm batches amplify rounding from step to step (1 vs 2 threads in one process then differ as
much as DDP does). The tolerance does not hide real differences: without sync_bn (a smaller yolov8n run, 2 x 4
images, lr 1e-4) DDP was 3.3e-4 off, 30x the tolerance.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import write_colour_folder
from vistrain.data.sampler import EpochSampler
from vistrain.data.synthetic import make_dataset
from vistrain.engine.checkpoint import load_checkpoint

TESTS = Path(__file__).parent
ENV = {**os.environ, "PYTHONPATH": f"{TESTS.parent}{os.pathsep}{TESTS}", "OMP_NUM_THREADS": "1"}
COMMON = ["device=cpu", "workers=0", "plots=False", "threads=1", "optimizer=SGD", "lr0=0.001", "nbs=0",
          "warmup_epochs=0", "exist_ok=True"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ddp-data")
    shapes = make_dataset(root / "shapes", n=60, imgsz=64, seed=1, workers=1)  # 48 train images
    return {"classify": write_colour_folder(root / "colours", per_class=30),  # 72 train images
            "detect": shapes / "detect" / "data.yaml"}


def vistrain(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vistrain", "train", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def torchrun(script: str, *args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    path = cwd / "script.py"
    path.write_text(script)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(path), *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def weights(path: Path) -> dict[str, torch.Tensor]:
    """The trainable state (parameters) of a checkpoint's training model."""
    sd = load_checkpoint(path)["train_model"]
    return {k: v for k, v in sd.items() if "running_" not in k and "num_batches" not in k}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


RUNS = {  # 3 optimizer steps an epoch: 72 images in batches of 24, 48 in batches of 16
    "classify": ["model=yolov5n-cls", "imgsz=32", "batch=24", "epochs=2", "save_period=1"],
    "detect": ["model=yolov8n", "imgsz=64", "batch=16", "epochs=1"],
}


@pytest.fixture(scope="module")
def ddp_runs(data, tmp_path_factory) -> dict[str, Path]:
    """Each family trained by `vistrain train device=cpu nproc=2 sync_bn=True` (the CLI starts torchrun)."""
    cwd = tmp_path_factory.mktemp("ddp-runs")
    out = {}
    for family, args in RUNS.items():
        proc = vistrain(*args, f"data={data[family]}", *COMMON, "nproc=2", "sync_bn=True", f"name={family}", cwd=cwd)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        assert "DDP: 2 processes (gloo), batch" in proc.stdout
        out[family] = next(cwd.glob(f"runs/*/{family}"))
        assert sorted(p.name for p in out[family].parent.iterdir()) == [family]  # rank 0 alone made the folder
    return out


@pytest.mark.parametrize("family", list(RUNS))
def test_ddp_step_equals_one_process_step(family, data, ddp_runs, tmp_path):
    proc = vistrain(*RUNS[family], f"data={data[family]}", *COMMON, "name=one", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = next(tmp_path.glob("runs/*/one"))
    ckpt = "epoch1.pt" if family == "classify" else "last.pt"  # after the first epoch's 3 optimizer steps
    d = max_diff(weights(ddp_runs[family] / "weights" / ckpt), weights(one / "weights" / ckpt))
    assert d < 1e-5, f"{family}: DDP 2 x {int(RUNS[family][2][6:]) // 2} differs from 1 x {RUNS[family][2][6:]} by {d}"
    if family == "detect":  # the weights did move: the tolerance is far below one run's change
        proc = vistrain(*RUNS[family], f"data={data[family]}", *COMMON, "name=still", "lr0=0", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        moved = max_diff(weights(one / "weights" / ckpt), weights(next(tmp_path.glob("runs/*/still")) / "weights" /
                                                                    ckpt))
        assert moved > 100 * 1e-5, moved
    # rank 0 logged the whole batch's mean losses: equal to one process's
    rows = [(one / "results.csv").read_text().splitlines(), (ddp_runs[family] / "results.csv").read_text().splitlines()]
    head = rows[0][0].split(",")
    for name in [h for h in head if h.startswith("train/")]:
        i = head.index(name)
        assert float(rows[0][1].split(",")[i]) == pytest.approx(float(rows[1][1].split(",")[i]), rel=1e-4), name


KILL = r"""
import os, signal, sys
from vistrain.config import get_config
from vistrain.engine.trainer import Trainer

kw = dict(a.split("=", 1) for a in sys.argv[1:])
cfg = get_config(kw)
cfg["_user_keys"] = sorted(kw)
trainer = Trainer(cfg)
seen = {}

def kill(t):  # rank 0 dies without a word after the 2nd batch of epoch 2: torchrun stops rank 1
    seen[t.epoch] = seen.get(t.epoch, 0) + 1
    if t.rank == 0 and t.epoch == 1 and seen[t.epoch] == 2:
        os.kill(os.getpid(), signal.SIGKILL)

trainer.add_callback("on_batch_end", kill)
trainer.train()
"""


def test_killed_ddp_run_resumes_to_the_uninterrupted_weights(data, ddp_runs, tmp_path):
    proc = torchrun(KILL, *RUNS["classify"], f"data={data['classify']}", *COMMON, "nproc=2", "sync_bn=True",
                    "name=killed", cwd=tmp_path)
    assert proc.returncode != 0
    last = tmp_path / "runs" / "classify" / "killed" / "weights" / "last.pt"
    assert load_checkpoint(last)["epoch"] == 0  # epoch 2 never finished
    t0 = time.time()
    proc = vistrain(f"resume={last}", cwd=tmp_path)  # 2 processes again: nproc and device come from last.pt
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "DDP: 2 processes" in proc.stdout, proc.stdout[-2000:]
    full = ddp_runs["classify"] / "weights" / "last.pt"
    a, b = load_checkpoint(last)["train_model"], load_checkpoint(full)["train_model"]
    assert all(torch.equal(a[k], b[k]) for k in a), max_diff(a, b)
    assert time.time() - t0 < 300


FAIL = r"""
import sys
from vistrain.config import get_config
from vistrain.engine.trainer import Trainer

kw = dict(a.split("=", 1) for a in sys.argv[1:])
trainer = Trainer(get_config(kw))

def fail(t):
    if t.rank == 1:
        raise RuntimeError("rank 1 cannot go on: deliberate failure")

trainer.add_callback("on_batch_end", fail)
trainer.train()
"""


def test_a_failing_rank_ends_the_job_with_its_message(data, tmp_path):
    t0 = time.time()
    proc = torchrun(FAIL, *RUNS["classify"], f"data={data['classify']}", *COMMON, "nproc=2", cwd=tmp_path,
                    timeout=240)
    assert proc.returncode != 0
    assert "rank 1 cannot go on: deliberate failure" in proc.stderr
    assert time.time() - t0 < 120  # torchrun stopped rank 0, which was waiting for rank 1's gradients


def test_batch_must_split_over_the_processes(data, tmp_path):
    proc = vistrain(*RUNS["classify"], f"data={data['classify']}", *COMMON, "nproc=2", "batch=7", cwd=tmp_path)
    assert proc.returncode == 2  # found before torchrun starts
    assert proc.stderr.strip() == ("vistrain train: batch=7 is the batch of all 2 processes together; give a multiple "
                                   "of 2 (batch=6)")


def test_bad_input_in_the_ranks_is_one_line_each_and_status_2(tmp_path):
    proc = vistrain("model=yolov5n-cls", f"data={tmp_path / 'missing'}", *COMMON, "nproc=2", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[-1].startswith("vistrain: rank ") and "failed (exit status 2)" in lines[-1]
    assert any(line.startswith("vistrain train: ") and "missing" in line for line in lines), lines


def test_sampler_shards_hold_the_one_process_batches():
    one = EpochSampler(21, seed=3)
    one.set_epoch(2)
    shards = []
    for rank in range(2):
        s = EpochSampler(21, seed=3, num_replicas=2, rank=rank)
        s.set_epoch(2)
        shards.append([k.index for k in s])
        assert len(s) == 11 and len(shards[-1]) == 11
    order = [k.index for k in one]
    for i in range(10):  # the ranks' i-th samples are places 2i and 2i + 1 of the one-process order
        assert {shards[0][i], shards[1][i]} == {order[2 * i], order[2 * i + 1]}
    assert shards[0][10] == order[20] and shards[1][10] == order[0]  # padded with the first index


LOSSES = r"""
import os, sys, torch, torch.distributed as dist
from vistrain.losses.sync import synced

def main():
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    from loss_cases import cases
    out = {}
    for name, loss_fn, preds, targets, extra in cases():
        whole = [p.clone().requires_grad_(True) for p in preds]
        loss, _ = loss_fn(whole, targets, *extra)
        loss.backward()
        half = [p[rank::2].detach().clone().requires_grad_(True) for p in preds]  # images rank, rank + 2, ...
        keep = targets[:, 0].long() % 2 == rank
        t = targets[keep].clone()
        t[:, 0] = t[:, 0].div(2, rounding_mode="floor")
        ex = [e[rank::2] for e in extra]
        with synced():
            part, _ = loss_fn(half, t, *ex)
        (part / dist.get_world_size()).backward()  # what DDP's gradient average does
        grads = [torch.zeros_like(p) for p in preds]
        for g, h in zip(grads, half):
            g[rank::2] = h.grad
            dist.all_reduce(g)
        out[name] = max(float((g - w.grad).abs().max() / w.grad.abs().max()) for g, w in zip(grads, whole))
    if rank == 0:
        print("RESULT", out)
    dist.destroy_process_group()

main()
"""

LOSS_CASES = r'''
import torch
from vistrain.nn.model import build_model

def targets(b, nc, seed):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(b):
        for _ in range(1 + i % 3):
            cx, cy = torch.rand(2, generator=g) * 0.6 + 0.2
            w, h = torch.rand(2, generator=g) * 0.3 + 0.1
            rows.append([i, int(torch.randint(0, nc, (1,), generator=g)), cx, cy, w, h])
    return torch.tensor(rows, dtype=torch.float32)

def cases():
    """(name, loss(preds, targets, *extra) -> (loss, items), preds: list of Tensor[B, ...], targets, extra)"""
    from vistrain.losses.yolov5 import YOLOv5Loss
    from vistrain.losses.yolov8 import DetectLoss, SegmentLoss
    from vistrain.losses.effdet import EffDetLoss
    b, nc = 4, 3
    torch.manual_seed(0)
    out = []
    m = build_model("yolov5n", num_classes=nc).train()
    preds = [p.detach() for p in m(torch.rand(b, 3, 64, 64))]
    loss = YOLOv5Loss.from_model(m)
    out.append(("yolov5", lambda p, t: loss(p, t), preds, targets(b, nc, 1), []))
    m = build_model("yolov8n", num_classes=nc).train()
    preds = [p.detach() for p in m(torch.rand(b, 3, 64, 64))]
    det = DetectLoss.from_model(m)
    out.append(("yolov8", lambda p, t: det(p, t), preds, targets(b, nc, 2), []))
    m = build_model("yolov8n-seg", num_classes=nc).train()
    levels, coef, proto = m(torch.rand(b, 3, 64, 64))
    seg = SegmentLoss.from_model(m, {"overlap_mask": True})
    t = targets(b, nc, 3)
    masks = torch.zeros(b, 16, 16)
    for j, row in enumerate(t):
        i, cx, cy = int(row[0]), float(row[2]), float(row[3])
        k = int((t[:j, 0] == i).sum()) + 1
        masks[i, int(cy * 16) - 2:int(cy * 16) + 2, int(cx * 16) - 2:int(cx * 16) + 2] = k
    n = len(levels)
    out.append(("yolov8-seg", lambda p, t, mk: seg((p[:n], p[n], p[n + 1]), t, mk),
                [x.detach() for x in levels] + [coef.detach(), proto.detach()], t, [masks]))
    m = build_model("efficientdet-d0", num_classes=nc, imgsz=128).train()
    cls, box = m(torch.rand(b, 3, 128, 128))
    eff = EffDetLoss(nc, **m.anchor_config())
    k = len(cls)
    out.append(("effdet", lambda p, t: eff((p[:k], p[k:]), t), [x.detach() for x in cls + box], targets(b, nc, 4),
                []))
    return out
'''


def test_loss_normalisers_are_the_whole_batchs(tmp_path):
    """Every detection loss: 2 ranks with half the images each and DDP's gradient average give the one-process
    gradient of the whole batch (the positives and target-score sums are summed over the ranks)."""
    (tmp_path / "loss_cases.py").write_text(LOSS_CASES)
    env = {**ENV, "PYTHONPATH": f"{ENV['PYTHONPATH']}{os.pathsep}{tmp_path}"}
    script = tmp_path / "losses.py"
    script.write_text(LOSSES)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = eval(proc.stdout.split("RESULT", 1)[1].strip())
    assert set(result) == {"yolov5", "yolov8", "yolov8-seg", "effdet"}
    for name, rel in result.items():
        assert rel < 1e-5, (name, rel)


def test_gpus_that_do_not_exist_are_one_line_before_anything_starts(tmp_path):
    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has the GPUs")
    proc = vistrain("model=yolov5n-cls", "device=0,1", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("vistrain train: device=0,1: ")
