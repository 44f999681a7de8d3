"""YOLOv8n-seg training img/s under CPU contention, vistrain vs ultralytics, each as shipped (its own threads).

Each side trains in a fresh process of its own (``--child``), so that each sets up its threads as a user's run would:
vistrain through its API (``threads=0``: auto; OpenMP's wait policy set before torch loads), ultralytics through
``YOLO(...).train()`` (``import ultralytics`` sets ``OMP_NUM_THREADS=1`` when unset, its ``select_device`` then
``torch.set_num_threads(min(8, cpu_count - 1))``, and its trainer forces ``workers=0`` on CPU; all left as shipped).
Same data (the built-in shapes, ``make_dataset(n=--n, imgsz=--imgsz)``, its ``segment/data.yaml``), model
(``yolov8n-seg.yaml``, from scratch, the same initial weights: checked by a hash of the state_dict), imgsz, batch,
epochs, workers requested, seed, ``close_mosaic=0`` (mosaic on in every epoch on both sides), plots off; the rest
is each side's defaults.

Conditions: ``quiet`` (nothing started by the script; others' load measured and printed) and ``busy``: one
CPU-bound process per CPU (``while True: pass``, bounded by --busy-max seconds, killed in a ``finally``) running for
the whole condition.  In each condition the sides run back to back, ``--rounds`` times, in alternating order;
a side's img/s is the median over its rounds.  img/s: training images over the batches of every epoch but the
first (from an epoch's start to its last batch; validation, checkpoints not timed).

``--variants t1,t2,t2-spin`` adds vistrain runs (for information, not in the ratio) with ``threads=N`` and, with
``-spin``, libgomp's default spinning (``GOMP_SPINCOUNT=300000`` in its environment, which vistrain leaves alone):
how the default was chosen.

    .venv/bin/python bench/threads.py                      # ~10-15 min on 2 cores: quiet + busy, 3 rounds each
    .venv/bin/python bench/threads.py --quick              # smoke run (~2 min)
    .venv/bin/python bench/threads.py --variants t1,t2,t2-spin --out bench/results/threads-variants.json

Writes ``bench/results/threads.json`` (``--quick``: ``threads-quick.json``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CpuMonitor, block_internet, cpu_name, load1  # noqa: E402  (numpy only: torch not loaded)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "threads.json"
V, P = "vistrain", "ultralytics"


# ---------------------------------------------------------------------------------------------- child: one run
class EpochClock:
    """Training seconds per epoch (its start to its last batch's end) and other processes' CPU share."""

    def __init__(self):
        self.starts, self.ends, self.monitor = [], [], CpuMonitor()

    def epoch_start(self, *_):
        if len(self.starts) == 1:
            self.monitor.start()  # from the second epoch: the loader's workers exist by now
        self.starts.append(time.perf_counter())
        self.ends.append(None)

    def batch_end(self, *_):
        self.ends[-1] = time.perf_counter()

    def result(self, n_train: int) -> dict:
        secs = [e - s for s, e in zip(self.starts, self.ends) if e is not None]
        timed = secs[1:] if len(secs) > 1 else secs
        return {"epoch_train_s": secs, "img_per_s": n_train * len(timed) / sum(timed),
                "other_cpu_share": self.monitor.share()}


def state_hash(model) -> str:
    sd = model.state_dict()
    h = hashlib.sha1()
    for k in sorted(sd):
        if sd[k].dtype.is_floating_point:
            h.update(k.encode())
            h.update(sd[k].detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def child(args) -> int:
    """One training run in this process; writes its numbers to ``args.child_out``."""
    block_internet()
    seen: dict = {}
    clock = EpochClock()
    common = dict(data=args.data, epochs=args.epochs, imgsz=args.imgsz, batch=args.batch, workers=args.workers,
                  device="cpu", seed=0, project=args.project, exist_ok=True, plots=False, close_mosaic=0)
    t0 = time.time()
    if args.child == V:
        import vistrain

        overrides = dict(model="yolov8n-seg", name=args.name, verbose=False, **common)
        if args.vistrain_threads is not None:
            overrides["threads"] = args.vistrain_threads
        cfg = vistrain._config("train", overrides)  # the API's own set-up: wait policy, then threads
        import torch

        from vistrain.engine.trainer import Trainer

        trainer = Trainer(cfg)

        def on_train_start(tr):
            seen.update(threads=torch.get_num_threads(), init=state_hash(tr.model),
                        workers=getattr(tr.train_loader, "num_workers", None))

        trainer.add_callback("on_train_start", on_train_start)
        trainer.add_callback("on_epoch_start", clock.epoch_start)
        trainer.add_callback("on_batch_end", clock.batch_end)
        trainer.train()
    else:
        import ultralytics  # sets OMP_NUM_THREADS=1 when unset, before torch loads (as a user's run)
        import torch
        from ultralytics import YOLO

        def on_train_start(tr):
            seen.update(threads=torch.get_num_threads(), init=state_hash(tr.model),
                        workers=getattr(tr.train_loader, "num_workers", None))

        model = YOLO("yolov8n-seg.yaml", task="segment")
        model.add_callback("on_train_start", on_train_start)
        model.add_callback("on_train_epoch_start", clock.epoch_start)
        model.add_callback("on_train_batch_end", clock.batch_end)
        model.train(name=args.name, pretrained=False, verbose=False, **common)
        seen["ultralytics"] = ultralytics.__version__
    res = {**clock.result(args.n_train), **seen, "wall_s": time.time() - t0, "torch": torch.__version__,
           "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}}
    Path(args.child_out).write_text(json.dumps(res))
    return 0


# ---------------------------------------------------------------------------------------------- parent
def start_busy(seconds: float) -> list:
    code = f"import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass\n"
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in range(os.cpu_count() or 1)]


def proc_cpu_s(pids: list) -> float:
    """utime + stime of these processes, seconds (0 for those gone)."""
    total = 0.0
    for pid in pids:
        try:
            rest = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass
    return total


def top_lines(n: int = 12) -> str:
    try:
        return subprocess.run(["top", "-bn1"], capture_output=True, text=True, timeout=20).stdout.splitlines()[:n]
    except (OSError, subprocess.SubprocessError):
        return []


def run_side(label: str, side: str, args, tmp: Path, data_yaml: Path, n_train: int, busy: list,
             threads: int | None = None, spin: bool = False) -> dict:
    out = tmp / f"{label}-{time.monotonic_ns()}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", side, "--child-out", str(out), "--data",
           str(data_yaml), "--n-train", str(n_train), "--project", str(tmp / "runs"), "--name", label,
           "--epochs", str(args.epochs), "--imgsz", str(args.imgsz), "--batch", str(args.batch),
           "--workers", str(args.workers)]
    if threads is not None:
        cmd += ["--vistrain-threads", str(threads)]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if spin:
        env["GOMP_SPINCOUNT"] = "300000"  # libgomp's default, stated: vistrain then leaves the policy alone
    busy_pids = [b.pid for b in busy]
    b0, t0 = proc_cpu_s(busy_pids), time.time()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if r.returncode != 0 or not out.exists():
        tail = "\n".join((r.stdout + r.stderr).splitlines()[-25:])
        raise SystemExit(f"{label}: the {side} run failed (exit {r.returncode}):\n{tail}")
    res = json.loads(out.read_text())
    res["busy_cpu_share"] = (proc_cpu_s(busy_pids) - b0) / wall / (os.cpu_count() or 1) if busy else 0.0
    res["process_wall_s"] = wall
    return res


def fmt(res: dict) -> str:
    other = res.get("other_cpu_share") or 0.0
    return (f"{res['img_per_s']:6.2f} img/s  ({res['threads']} threads, {res['workers']} workers; other processes "
            f"{100 * other:.0f}% of the CPUs, of which the script's busy loops ~{100 * res['busy_cpu_share']:.0f}%; "
            f"wall {res['process_wall_s']:.0f} s)")


def parent(args) -> int:
    from vistrain.data.synthetic import make_dataset, split_layout

    os.environ["YOLO_OFFLINE"] = "1"
    variants = [v for v in args.variants.split(",") if v]
    with tempfile.TemporaryDirectory(prefix="vistrain-bench-threads-") as tmp:
        tmp = Path(tmp)
        os.environ["YOLO_CONFIG_DIR"] = str(tmp / "ultralytics-config")
        os.environ["VISTRAIN_CACHE"] = str(tmp / "vistrain-cache")
        root = make_dataset(tmp / "data", n=args.n, imgsz=args.imgsz, seed=0)
        n_train = split_layout(args.n, 0.2)[0]
        data_yaml = root / "segment" / "data.yaml"
        print(f"YOLOv8n-seg from scratch on CPU: {n_train} train images at {args.imgsz} px, {args.epochs} epochs "
              f"(img/s over epochs 2..{args.epochs}), batch {args.batch}, workers {args.workers} requested; "
              f"{os.cpu_count()} CPUs ({cpu_name()})", flush=True)
        print(f"load average at start: {os.getloadavg()}", flush=True)
        print("\n".join(top_lines()), flush=True)
        conditions, busy = {}, []
        try:
            for cond in args.conditions.split(","):
                if cond == "busy":
                    busy = start_busy(args.busy_max)
                    time.sleep(2)
                load_start = load1()
                runs = {V: [], P: []}
                extra = {v: [] for v in variants}
                for rnd in range(args.rounds):
                    order = (V, P) if rnd % 2 == 0 else (P, V)
                    for side in order:
                        res = run_side(f"{cond}-{side}-{rnd}", side, args, tmp, data_yaml, n_train, busy)
                        runs[side].append(res)
                        print(f"{cond:<5} round {rnd} {side:<12} {fmt(res)}", flush=True)
                    for v in variants:
                        threads, spin = int(v.split("-")[0].lstrip("t")), v.endswith("-spin")
                        res = run_side(f"{cond}-{v}-{rnd}", V, args, tmp, data_yaml, n_train, busy, threads, spin)
                        extra[v].append(res)
                        print(f"{cond:<5} round {rnd} vistrain {v:<8} {fmt(res)}", flush=True)
                med = {side: statistics.median(r["img_per_s"] for r in runs[side]) for side in runs}
                conditions[cond] = {
                    "img_per_s_median": med, "ratio": med[V] / med[P],
                    "per_round_ratios": [a["img_per_s"] / b["img_per_s"] for a, b in zip(runs[V], runs[P])],
                    "same_init": all(a["init"] == b["init"] for a, b in zip(runs[V], runs[P])),
                    "load1_start": load_start, "load1_end": load1(), "runs": runs,
                    "variants": {v: {"img_per_s_median": statistics.median(r["img_per_s"] for r in rs), "runs": rs}
                                 for v, rs in extra.items()}}
                for b in busy:
                    b.kill()
                    b.wait()
                busy = []
        finally:
            for b in busy:
                b.kill()
                b.wait()

    print(f"\n{'condition':<10} {'vistrain img/s':>15} {'ultralytics img/s':>18} {'ratio':>7}  per round", flush=True)
    for cond, c in conditions.items():
        print(f"{cond:<10} {c['img_per_s_median'][V]:15.2f} {c['img_per_s_median'][P]:18.2f} {c['ratio']:7.2f}  "
              + ", ".join(f"{x:.2f}" for x in c["per_round_ratios"]), flush=True)
        for v, s in c["variants"].items():
            print(f"{'':<10} vistrain {v:<8} {s['img_per_s_median']:6.2f} img/s (information)", flush=True)
    import torch

    out = {"benchmark": "yolov8n-seg training img/s on CPU, each side as shipped (own threads), quiet and beside "
                        "one busy process per CPU (target: vistrain / ultralytics >= 1.0 in both)",
           "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "conditions": conditions, "load1_end": load1(),
           "machine": {"cpu": cpu_name(), "cpus": os.cpu_count(), "python": platform.python_version(),
                       "torch": torch.__version__}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"results: {args.out}", flush=True)
    return 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=200, help="images generated (80%% train, 20%% val)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run; img/s over all but the first")
    p.add_argument("--imgsz", type=int, default=160)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--workers", type=int, default=2, help="requested on both sides (ultralytics uses 0 on CPU)")
    p.add_argument("--rounds", type=int, default=3, help="runs per side and condition, alternating the order")
    p.add_argument("--conditions", default="quiet,busy")
    p.add_argument("--busy-max", type=float, default=1800.0, help="seconds after which a busy loop ends by itself")
    p.add_argument("--variants", default="", help="extra vistrain runs: tN (threads=N), tN-spin (+ libgomp spinning)")
    p.add_argument("--quick", action="store_true", help="smoke run: 80 images, 2 epochs, 1 round")
    p.add_argument("--out", type=Path, default=None)
    # child process only
    p.add_argument("--child", choices=(V, P), help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--n-train", type=int, help=argparse.SUPPRESS)
    p.add_argument("--project", help=argparse.SUPPRESS)
    p.add_argument("--name", help=argparse.SUPPRESS)
    p.add_argument("--vistrain-threads", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.epochs, args.rounds = 80, 2, 1
    args.out = args.out or (RESULTS.with_name("threads-quick.json") if args.quick else RESULTS)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    return child(args) if args.child else parent(args)


if __name__ == "__main__":
    raise SystemExit(main())
