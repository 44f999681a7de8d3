"""Exported models on CPU: vistrain's predictor with PyTorch, ONNX Runtime and OpenVINO against the peers' predictors.

    .venv/bin/python bench/export.py            # full run: ~12 minutes on 2 cores (plus any wait for a quiet machine)
    .venv/bin/python bench/export.py --quick    # smoke run (320 / 256 px, 1 + 3 rounds), < 2 minutes
    .venv/bin/python bench/export.py --help     # --models --rounds --warmup-rounds --threads --candidates ...

Writes ``bench/results/export.json`` (``--quick``: ``export-quick.json``).  Batch 1, CPU, the same ``--threads`` (2)
for torch, ONNX Runtime and OpenVINO on every side, ``OMP_WAIT_POLICY=PASSIVE`` as vistrain's API sets it (unless the
environment sets a policy).  Each side runs in a process of its own (spawned, built once, then one image per request,
as a deployed predictor runs), called in turn from the bench with a pause (``--gap-ms``, 100) before each call, so
that no side's idle thread pool (ONNX Runtime's threads spin after a run) eats into another side's time;
``--one-process`` puts every side in the bench's own process instead (how the results before 2026-12-07 were taken:
there the sides' thread pools compete).  Offline: ``YOLO_OFFLINE=1``, the peers' settings in the temp dir, internet
sockets refused, in the workers too.

Latency = one image end to end: pre-process (letterbox, HWC uint8 -> CHW float), inference, post-process (NMS,
boxes back to the original pixels, masks at the original size for vistrain), and the result object.  Not timed:
reading and decoding the JPEG (every side gets the same decoded PIL image in memory), building, loading, exporting.
The image: one 640x480 JPEG (the built-in shapes generator's ``render_detect(0, 3, 640)``, rows 80-560).

Sides (the same weights everywhere: one random-init model per family, seed 0, its score logits spread and shifted
so that ``--candidates`` boxes pass conf 0.25 before NMS, as ``bench/detect.py`` does; a fresh model's score prior
would leave NMS and the masks nothing to do; yolov8n-seg's mask coefficients shifted so that half the mask logits are
positive, since fresh ones leave the kept boxes' masks empty at 640 px):

* vistrain PyTorch / ONNX / OpenVINO: the checkpoint, ``vistrain.export(format="onnx", dynamic=True)`` and
  ``format="openvino", dynamic=True`` of it.  Timed: the steps of ``vistrain.engine.predictor.predict`` per image,
  replicated (``resolve_task_and_model``, ``inference_model`` for the checkpoint, as ``predict`` does; then per image
  ``task.predict_preprocess``, ``torch.stack``, the model under ``torch.no_grad``, ``task.predict_postprocess``,
  ``task.make_result`` and ``task.describe``), without the per-call setup, because a ``vistrain.predict()`` call
  builds the model (or the ONNX Runtime session / OpenVINO compile) and the run folder anew each time; what such a
  call costs is measured too, for information (``api_call_ms``).
* yolov8n-seg peers: ultralytics' predictor (``YOLO(path).predict(image, imgsz, conf=0.25, iou=0.7, max_det=300)``,
  reused across calls as its API does) on its own checkpoint holding vistrain's state_dict (equal keys) and on its
  own ONNX export of it (``YOLO.export(format="onnx")``: onnxslim if installed, as ultralytics ships; its ONNX
  Runtime session is rebuilt with ``--threads`` intra-op threads, vistrain's session options).  ultralytics' PyTorch
  predictor and vistrain's PyTorch and dynamic exports letterbox to the smallest stride multiple (640x480 here),
  ultralytics' ONNX predictor (a fixed-size export) to the square 640x640; ultralytics returns masks at the
  letterboxed size (vistrain at the original size); it drops detections whose mask is empty (so it may count
  fewer).  Information lines: ultralytics' PyTorch predictor with ``retina_masks=True`` (masks at the original
  size, as vistrain's), vistrain's ONNX exported with ``simplify=True`` (onnxslim).
* yolov5s peer: ultralytics' YOLOv5 is YOLOv5u (anchor-free head, another model), so the peer is the ``yolov5``
  package (7.0.14, the original anchor-based YOLOv5s, vistrain's weights loaded strictly): its PyTorch predictor
  ``AutoShape`` (what ``torch.hub`` / ``yolov5.load`` give) on its Conv+BN-fused model, conf 0.25, iou 0.45,
  ``max_det`` 300 (vistrain's; AutoShape's default is 1000).  It too letterboxes to 640x480.  No ONNX peer.
* EfficientDet-D0 at 512: vistrain ONNX / OpenVINO (and PyTorch, information) against effdet 0.4.1's
  ``DetBenchPredict`` with the same weights, built as ``bench/efficientdet.py`` builds it (its functions): vistrain's
  letterbox, ImageNet normalisation, ``DetBenchPredict`` (top 5000, class-wise NMS 0.5, 100 per image), score >=
  0.25, boxes scaled back.
* Every family, information: vistrain's ONNX file run with ONNX Runtime's intra-op spinning off
  (``session.intra_op.allow_spinning=0``, set by the bench around vistrain's own session; vistrain leaves the
  default, threads that spin after each run while torch's post-process wants the same cores).

Timing: per family, every side once per round, round robin, the order reversed every round; ``--warmup-rounds``
untimed, then ``--rounds`` timed; medians per side; ratios of the medians (and the median of the per-round ratios
as a check).  Each line also splits into pre-process / inference / post-process (vistrain: stamps around the model
call; ultralytics: its ``Results.speed``; yolov5: its ``Detections.t``; effdet: stamps).  Targets: vistrain's
fastest format <= 0.7x ultralytics' PyTorch predictor and <= 1.0x ultralytics' ONNX predictor (yolov8n-seg; for
yolov5s the 0.7 is shown against yolov5's PyTorch predictor); EfficientDet-D0 exported <= 0.5x effdet's PyTorch.
The 1-minute load average is awaited below ``--max-load`` before each family and stored with the share of the CPUs
other processes used during its timed rounds.  Outputs are checked: detection counts per side, and the largest box
difference of each vistrain format (and ultralytics' ONNX, which letterboxes alike) from vistrain's PyTorch.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
from vistrain.utils.threads import set_wait_policy  # noqa: E402 (imports no torch)

set_wait_policy()  # as vistrain's API: OMP_WAIT_POLICY=PASSIVE before torch loads, unless the environment says

import torch  # noqa: E402

sys.path.insert(0, str(BENCH))
from common import CpuMonitor, block_internet, cpu_name, load1, quiet, wait_for_quiet  # noqa: E402

RESULTS = BENCH / "results" / "export.json"
QUICK_RESULTS = RESULTS.with_name("export-quick.json")
CONF = 0.25
NC = 80
FAMILIES = ("yolov8n-seg", "yolov5s", "efficientdet-d0")
V_PT, V_ONNX, V_OV = "vistrain PyTorch", "vistrain ONNX", "vistrain OpenVINO"
V_SLIM = "vistrain ONNX simplify=True (info)"
V_NOSPIN = "vistrain ONNX, ORT spinning off (info)"
U_PT, U_ONNX = "ultralytics PyTorch", "ultralytics ONNX"
U_RETINA = "ultralytics PyTorch retina_masks (info)"
Y5_PT = "yolov5 PyTorch (AutoShape)"
E_PT = "effdet PyTorch (DetBenchPredict)"


def load_bench(name: str):
    """``bench/NAME.py`` as a module (its helpers build the peers with vistrain's weights)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def git_state() -> dict:
    def git(*cmd):  # --no-optional-locks: never rewrites the index
        r = subprocess.run(["git", "--no-optional-locks", *cmd], cwd=ROOT, capture_output=True, text=True)
        return r.returncode, r.stdout.strip()

    rc, commit = git("rev-parse", "HEAD")
    dirty, _ = git("diff", "--quiet", "HEAD", "--", "vistrain")
    return {"commit": commit if rc == 0 else None, "vistrain_dirty": dirty == 1}


def machine_info() -> dict:
    return {"torch": torch.__version__, **{p: version(p) for p in ("onnxruntime", "openvino", "onnx", "onnxslim",
                                                                    "ultralytics", "yolov5", "effdet", "timm")},
            "python": platform.python_version(), "cpu_count": os.cpu_count(), "cpu": cpu_name(),
            "platform": platform.platform(), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
            "GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT"), **git_state()}


# ---------------------------------------------------------------------------------------------- inputs, weights
def make_image(tmp: Path):
    from vistrain.data.image import load_image
    from vistrain.data.synthetic import render_detect

    im, _ = render_detect(0, 3, 640)
    path = tmp / "image-640x480.jpg"
    im.crop((0, 80, 640, 560)).save(path, quality=95)
    return path, load_image(path)


def save_checkpoint(model: torch.nn.Module, path: Path, imgsz: int) -> Path:
    torch.save({"model": {k: v.detach().clone() for k, v in model.state_dict().items()}, "model_yaml": model.yaml,
                "task": model.task, "names": [str(i) for i in range(NC)], "imgsz": imgsz}, path)
    return path


LOGIT_SPREAD = 2.0  # as bench/detect.py: the score rows of the output convs are scaled to this spread first
MASK_SHARE = 0.5  # share of the mask logits (all anchors, all prototype pixels) made positive (yolov8n-seg)


def tune_yolov8(model, x: torch.Tensor, target: int, bisect) -> dict:
    """Scale and shift the class logits of a YOLOv8 (Segment) head so that ``target`` anchors pass CONF on ``x``."""
    head = model.model[-1]
    nreg = 4 * head.reg_max

    def logits():
        with torch.no_grad():
            levels = model(x)[0]
        return [lv[0, nreg:].flatten(1) for lv in levels]  # [nc, positions] per level

    def count(ls, d):
        return sum(int(((lv + d).sigmoid().amax(0) > CONF).sum()) for lv in ls)

    ls = logits()
    at_init = count(ls, 0.0)
    if not target:
        return {"candidates_at_init": at_init, "candidates": at_init, "logit_shift": 0.0}
    with torch.no_grad():
        for branch, lv in zip(head.cv3, ls):
            branch[-1].weight *= LOGIT_SPREAD / max(float(lv.std(1).mean()), 1e-6)
    ls = logits()
    shift = bisect(lambda d: count(ls, d), target)
    with torch.no_grad():
        for branch in head.cv3:
            branch[-1].bias += shift
    # mask coefficients: fresh ones make ~25% of the mask logits positive, and at 640 px every kept box's mask empty
    # (ultralytics' predictor then drops them all); every prototype sums to > 0 per pixel, so one shift of all
    # coefficients' biases moves that share: to MASK_SHARE of the pixels
    with torch.no_grad():
        _, coef, proto = model(x)
    psum = proto[0].flatten(1).sum(0)
    if bool((psum > 0).all()):
        logits_m = coef[0].T @ proto[0].flatten(1)  # [anchors, pixels]

        def share(s):
            return int(1000 * float(((logits_m + s * psum) > 0).float().mean()))

        share0 = share(0.0)
        s = bisect(share, int(1000 * MASK_SHARE))
        with torch.no_grad():
            for branch in head.cv4:
                branch[-1].bias += s
        mask = {"mask_pixels_positive_at_init": share0 / 1000, "mask_pixels_positive": share(s) / 1000,
                "mask_coef_shift": s}
    else:
        mask = {"mask_coef_shift": None, "note": "prototypes' sum not positive everywhere: mask coefficients as built"}
    return {"candidates_at_init": at_init, "candidates": count(ls, shift), "logit_shift": shift, **mask}


def tune_effdet(model, x: torch.Tensor, target: int, bisect) -> dict:
    """The same for EfficientDet's class net (one conv shared by the levels): ``target`` (anchor, class) pairs."""
    conv = model.class_net.predict.conv_pw

    def logits():
        with torch.no_grad():
            return torch.cat([c.flatten() for c in model(x)[0]])

    def count(lg, d):
        return int(((lg + d).sigmoid() >= CONF).sum())

    lg = logits()
    at_init = count(lg, 0.0)
    if not target:
        return {"candidates_at_init": at_init, "candidates": at_init, "logit_shift": 0.0}
    with torch.no_grad():
        conv.weight *= LOGIT_SPREAD / max(float(lg.std()), 1e-6)
    lg = logits()
    shift = bisect(lambda d: count(lg, d), target)
    with torch.no_grad():
        conv.bias += shift
    return {"candidates_at_init": at_init, "candidates": count(lg, shift), "logit_shift": shift}


def vistrain_exports(ckpt: Path, imgsz: int, threads: int, slim: bool) -> dict:
    """ONNX and OpenVINO exports of ``ckpt`` (and with ``slim`` an onnxslim-simplified ONNX); paths and seconds."""
    import vistrain

    out = {}
    jobs = [("onnx", ckpt, {"dynamic": True}), ("openvino", ckpt, {"dynamic": True})]  # any size: rect letterbox
    if slim:
        slim_ckpt = ckpt.with_name(ckpt.stem + "-slim.pt")
        shutil.copy(ckpt, slim_ckpt)
        jobs.append(("onnx-slim", slim_ckpt, {"simplify": True, "dynamic": True}))
    for key, src, extra in jobs:
        t0 = time.perf_counter()
        with quiet(False):
            path = vistrain.export(model=str(src), format=key.split("-")[0], imgsz=imgsz, threads=threads,
                                   verbose=False, **extra)
        out[key] = {"path": str(path), "export_s": round(time.perf_counter() - t0, 2)}
    torch.set_num_threads(threads)  # vistrain's API applies its own thread choice
    return out


# ---------------------------------------------------------------------------------------------- sides
class Stamped:
    """Calls the model, stamping when it starts and ends (a PyTorch module or an ``ExportedModel`` alike)."""

    def __init__(self, model):
        self.model, self.t = model, [0.0, 0.0]

    def __call__(self, x):
        self.t[0] = time.perf_counter()
        out = self.model(x)
        self.t[1] = time.perf_counter()
        return out


class VistrainSide:
    """vistrain's predictor for ``path`` (checkpoint or exported file), per image as ``predictor.predict``."""

    def __init__(self, path: Path, imgsz: int, threads: int):
        from vistrain.config import get_config
        from vistrain.engine.predictor import inference_model
        from vistrain.engine.run import resolve_task_and_model

        over = dict(model=str(path), imgsz=imgsz, device="cpu", threads=threads, save=False, verbose=False)
        cfg = get_config(over)
        cfg["_user_keys"], cfg["_mode"] = sorted(over), "predict"
        torch.set_num_threads(threads)  # an ONNX Runtime session / OpenVINO model takes torch's count when loaded
        with quiet(False):
            task, model, ckpt = resolve_task_and_model(cfg, need_model=True)
            if not getattr(model, "exported", False):  # as predict(): fused, channels-last, decode after the model
                model = inference_model(model, task, cfg, torch.device("cpu"))
        self.names = list(ckpt.get("names") or [str(i) for i in range(NC)])
        self.task, self.cfg, self.path, self.model = task, cfg, path, Stamped(model)
        self.stride = task.predict_stride(model)  # as predict(): a rectangle for PyTorch and dynamic exports

    def __call__(self, image):
        t0 = time.perf_counter()
        x, meta = self.task.predict_preprocess(image, self.cfg["imgsz"], self.stride)
        with torch.no_grad():
            out = self.task.predict_postprocess(self.model(torch.stack([x])), self.cfg, [meta])
        r = self.task.make_result(str(self.path), self.names, image, out[0])
        self.task.describe(r, self.cfg)  # predict() logs it for every image
        t1 = time.perf_counter()
        return r.boxes, (self.model.t[0] - t0, self.model.t[1] - self.model.t[0], t1 - self.model.t[1])


@contextlib.contextmanager
def ort_no_spinning():
    """ONNX Runtime sessions created meanwhile (vistrain's ``deploy/runtime.py`` makes its own) have intra-op
    spinning off: their threads sleep at once after a run instead of spinning, as ``OMP_WAIT_POLICY=PASSIVE`` makes
    torch's (information line: the spinning threads take the CPUs from the post-process that follows)."""
    import onnxruntime as ort

    base = ort.SessionOptions

    class NoSpin(base):
        def __init__(self):
            super().__init__()
            self.add_session_config_entry("session.intra_op.allow_spinning", "0")

    ort.SessionOptions = NoSpin
    try:
        yield
    finally:
        ort.SessionOptions = base


class UltralyticsSide:
    """ultralytics' predictor, set up once and called per image as ``YOLO.predict`` is."""

    def __init__(self, path: Path, imgsz: int, threads: int, image, **kw):
        from ultralytics import YOLO

        self.model = YOLO(str(path), task="segment")
        self.kw = dict(imgsz=imgsz, conf=CONF, iou=0.7, max_det=300, device="cpu", verbose=False, save=False, **kw)
        with quiet(False):
            self(image)  # sets up the predictor (AutoBackend: fused; ONNX Runtime session)
        backend = getattr(self.predictor.model, "backend", None)
        self.session_threads_default = None
        if hasattr(backend, "session"):  # the same intra-op threads and options as vistrain's session
            import onnxruntime as ort

            self.session_threads_default = backend.session.get_session_options().intra_op_num_threads
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.log_severity_level = 3
            backend.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        torch.set_num_threads(threads)

    @property
    def predictor(self):
        return self.model.predictor

    def __call__(self, image):
        r = self.model.predict(image, **self.kw)[0]
        s = r.speed
        return r.boxes.data, (s["preprocess"] / 1e3, s["inference"] / 1e3, s["postprocess"] / 1e3)


class Yolov5Side:
    """The ``yolov5`` package's PyTorch predictor (AutoShape) on its own YOLOv5s holding vistrain's weights."""

    def __init__(self, state: dict, imgsz: int):
        if "yolov5.train" not in sys.modules:  # a worker process: import it as the parent did
            (sys.modules.get("bench_detect") or load_bench("detect")).import_yolov5()
        import yolov5
        from yolov5.models.common import AutoShape
        from yolov5.models.yolo import Model

        warnings.filterwarnings("ignore", message=r".*torch\.cuda\.amp\.autocast", category=FutureWarning)
        with quiet(False):
            m = Model(str(Path(yolov5.__file__).parent / "models" / "yolov5s.yaml"), ch=3, nc=NC)
            m.load_state_dict(state, strict=True)
            m = m.fuse().eval()  # as yolov5.load / torch.hub give it (DetectMultiBackend fuses)
            self.model = AutoShape(m, verbose=False)
        self.model.conf, self.model.iou, self.model.max_det = CONF, 0.45, 300
        self.imgsz = imgsz

    def __call__(self, image):
        d = self.model(image, size=self.imgsz)
        return d.pred[0], tuple(t / 1e3 for t in d.t)


class EffdetSide:
    """effdet's ``DetBenchPredict`` with vistrain's letterbox, as ``bench/efficientdet.py`` runs it."""

    def __init__(self, state: dict, imgsz: int):
        from vistrain.tasks.detect import DetectTask

        effbench = sys.modules.get("bench_efficientdet") or load_bench("efficientdet")
        self.bench = effbench.import_effdet().DetBenchPredict(effbench.effdet_model(state, imgsz, NC)).eval()
        self.mean = torch.tensor(effbench.MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(effbench.STD).view(1, 3, 1, 1)
        self.task, self.imgsz = DetectTask(), imgsz

    def __call__(self, image):
        from vistrain.data.augment import scale_boxes_back

        t0 = time.perf_counter()
        x, (ratio, pad, shape, _) = self.task.predict_preprocess(image, self.imgsz)
        inp = (torch.stack([x]) - self.mean) / self.std
        t1 = time.perf_counter()
        with torch.no_grad():
            det = self.bench(inp)[0]
        t2 = time.perf_counter()
        det = det[det[:, 4] >= CONF].clone()
        det[:, :4] = scale_boxes_back(det[:, :4], ratio, pad, shape)
        det[:, 5] -= 1  # effdet's classes are 1-based
        return det, (t1 - t0, t2 - t1, time.perf_counter() - t2)


# ---------------------------------------------------------------------------------------------- sides
SIDES = {"VistrainSide": VistrainSide, "UltralyticsSide": UltralyticsSide, "Yolov5Side": Yolov5Side,
         "EffdetSide": EffdetSide}


def side(cls, *args, nospin: bool = False, **kw) -> tuple:
    """A side as a picklable recipe (class name, arguments): built where it is timed (a worker process, or this
    one with ``--one-process``); ``nospin``: built under ``ort_no_spinning()``."""
    return cls.__name__, args, kw, nospin


def build_side(spec: tuple):
    name, args, kw, nospin = spec
    with ort_no_spinning() if nospin else contextlib.nullcontext():
        return SIDES[name](*args, **kw)


def _side_worker(conn, spec: tuple, threads: int, image) -> None:
    """One side in its own process, as a deployed predictor runs: built once, then one image per request."""
    block_internet()
    with quiet(False):
        import ultralytics  # noqa: F401 (as in the parent: its import sets OMP_NUM_THREADS)
    torch.set_num_threads(threads)
    try:
        s = build_side(spec)
        torch.set_num_threads(threads)
        with torch.no_grad():
            out = s(image)[0]
        conn.send(("ok", out.detach().clone().cpu(), getattr(s, "session_threads_default", None)))
    except Exception as e:  # noqa: BLE001 - reported by the parent
        conn.send(("error", f"{type(e).__name__}: {e}", None))
        return
    while n := conn.recv():  # n calls back to back, the first untimed (the side's caches warm again)
        times = []
        for _ in range(n + 1):
            t0 = time.perf_counter()
            with torch.no_grad():
                split = s(image)[1]
            times.append((time.perf_counter() - t0, *split))
        conn.send(times[1:])


class IsolatedSides:
    """Every side in a worker process of its own (spawned: nothing inherited but the environment), called in turn
    from here for a block of ``block`` back-to-back images (after one untimed), as a busy predictor runs; between
    two sides a pause (``gap``) so that no side's idle threads (ONNX Runtime's spinning) run into the next one's
    timing."""

    def __init__(self, specs: dict, threads: int, image, gap: float, block: int):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.gap, self.block, self.procs, self.conns, self.outputs, self.info = gap, block, {}, {}, {}, {}
        for n, spec in specs.items():
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_side_worker, args=(child, spec, threads, image), daemon=True)
            p.start()
            status, out, info = parent.recv()  # one at a time: the builds do not compete with each other
            if status != "ok":
                raise RuntimeError(f"{n}: {out}")
            self.procs[n], self.conns[n], self.outputs[n], self.info[n] = p, parent, out, info

    def time(self, n: str) -> list[tuple]:
        time.sleep(self.gap)
        self.conns[n].send(self.block)
        return self.conns[n].recv()

    def close(self) -> None:
        for n, c in self.conns.items():
            c.send(False)
            self.procs[n].join(timeout=30)


# ---------------------------------------------------------------------------------------------- timing
def api_call_ms(paths: dict, image_path: Path, imgsz: int, threads: int, calls: int, tmp: Path) -> dict:
    """What one ``vistrain.predict(path, [image])`` call costs (model / session built anew each call), ms."""
    import vistrain

    out = {}
    for name, path in paths.items():
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            with quiet(False):
                vistrain.predict(str(path), [str(image_path)], imgsz=imgsz, threads=threads, save=False,
                                 verbose=False, project=str(tmp / "runs"), exist_ok=True)
            times.append(1e3 * (time.perf_counter() - t0))
        out[name] = round(statistics.median(times), 1)
    torch.set_num_threads(threads)
    return out


def compare(outputs: dict, ref: str, same_letterbox: list[str]) -> dict:
    """Detections per side; for the sides that letterbox as ``ref`` does, each box's largest coordinate difference
    from the nearest of ``ref``'s boxes, the largest over the boxes (px; ultralytics' segment predictor drops the
    detections whose mask is empty, so its boxes are a subset of vistrain's)."""
    out = {"detections": {n: int(len(o)) for n, o in outputs.items()}, "max_box_diff_px": {}}
    r = outputs[ref][:, :4].float()
    for n in same_letterbox:
        o = outputs[n][:, :4].float()
        if len(o) and len(r):
            d = (o[:, None] - r[None]).abs().amax(-1).amin(1).max()
            out["max_box_diff_px"][n] = round(float(d), 4)
    return out


def time_sides(call, names: list[str], warmup_rounds: int, rounds: int) -> dict:
    """Round robin: every side once per round, order reversed every round; medians and per-round totals.
    ``call(name)`` runs a block of images on that side and gives (total, pre, model, post) seconds for each."""
    times = {n: [] for n in names}  # (total, pre, model, post) seconds
    mon = CpuMonitor()
    for r in range(warmup_rounds + rounds):
        if r == warmup_rounds:
            mon.start()
        for n in (names if r % 2 == 0 else names[::-1]):
            t = call(n)
            if r >= warmup_rounds:
                times[n].extend(t)
    med = {n: {k: round(1e3 * statistics.median(t[i] for t in times[n]), 2)
               for i, k in enumerate(("total_ms", "preprocess_ms", "inference_ms", "postprocess_ms"))} for n in names}
    for n, m in med.items():  # the rest of the call: result objects, argument handling, ...
        m["other_ms"] = round(1e3 * statistics.median(t[0] - t[1] - t[2] - t[3] for t in times[n]), 2)
    return {"median": med, "per_round_total_ms": {n: [round(1e3 * t[0], 2) for t in times[n]] for n in names},
            "other_cpu_share": mon.share(), "_times": times}


def ratios(res: dict, mine: list[str], peer: str, target: float) -> dict:
    """Fastest of ``mine`` (by median) / ``peer``; per format too; the per-round ratio of the fastest as a check."""
    med = res["median"]
    best = min(mine, key=lambda n: med[n]["total_ms"])
    t = res["_times"]
    paired = statistics.median(a[0] / b[0] for a, b in zip(t[best], t[peer]))
    r = med[best]["total_ms"] / med[peer]["total_ms"]
    return {"peer": peer, "fastest": best, "ratio": round(r, 3), "target": target, "met": r <= target,
            "ratio_per_round_median": round(paired, 3),
            "per_format": {n: round(med[n]["total_ms"] / med[peer]["total_ms"], 3) for n in mine}}


def run_family(name: str, specs: dict, image, args, extra: dict, targets: list[tuple]) -> dict:
    torch.set_num_threads(args.threads)
    if args.one_process:
        sides = {n: build_side(s) for n, s in specs.items()}
        torch.set_num_threads(args.threads)
        with torch.no_grad():
            outputs = {n: fn(image)[0] for n, fn in sides.items()}
        info = {n: getattr(fn, "session_threads_default", None) for n, fn in sides.items()}

        def call(n):
            t0 = time.perf_counter()
            with torch.no_grad():
                split = sides[n](image)[1]
            return [(time.perf_counter() - t0, *split)]
    else:
        iso = IsolatedSides(specs, args.threads, image, args.gap_ms / 1e3, args.block)
        outputs, info, call = iso.outputs, iso.info, iso.time
    extra["isolation"] = ("one process, every side in it" if args.one_process else
                          f"one spawned process per side; per round a block of {args.block} back-to-back images "
                          f"(after one untimed) on each side, {args.gap_ms:g} ms pause between two sides' blocks")
    if U_ONNX in info:
        extra["ultralytics_onnx_session_threads_default"] = info[U_ONNX]
    alike = [n for n in specs if n != V_PT and (n.startswith("vistrain") or n == U_ONNX)]  # the same letterbox
    extra["outputs"] = compare(outputs, V_PT, alike)
    load_before, waited = wait_for_quiet(args.max_load, args.max_wait)
    rounds = (args.warmup_rounds, args.rounds) if args.one_process else \
        (max(1, -(-args.warmup_rounds // args.block)), max(1, args.rounds // args.block))
    res = time_sides(call, list(specs), *rounds)
    if not args.one_process:
        iso.close()
    load_after = load1()
    res.update(extra)
    res["threads_after"] = torch.get_num_threads()
    res["load_average_1min"] = {"before": load_before, "after": load_after, "waited_s": round(waited)}
    res["ratios"] = [ratios(res, mine, peer, target) for mine, peer, target in targets]
    print_family(name, res)
    del res["_times"]
    return res


def print_family(name: str, res: dict) -> None:
    med = res["median"]
    det = res["outputs"]["detections"]
    print(f"\n  {name}: {'':<32}{'total ms':>9}{'pre':>8}{'infer':>9}{'post':>8}{'other':>8}{'dets':>6}")
    for n, m in med.items():
        print(f"    {n:<40}{m['total_ms']:>9.1f}{m['preprocess_ms']:>8.1f}{m['inference_ms']:>9.1f}"
              f"{m['postprocess_ms']:>8.1f}{m['other_ms']:>8.1f}{det[n]:>6}")
    for r in res["ratios"]:
        print(f"    {r['fastest']} / {r['peer']}: {r['ratio']:.3f} (target <= {r['target']}) "
              f"{'ok' if r['met'] else 'NOT MET'}  [per round {r['ratio_per_round_median']:.3f}]")
    diffs = res["outputs"]["max_box_diff_px"]
    if diffs:
        print("    boxes vs vistrain PyTorch, max |diff| px: " + ", ".join(f"{n} {d}" for n, d in diffs.items()))
    if "api_call_ms" in res:
        print("    one vistrain.predict() call (model built each call), ms: "
              + ", ".join(f"{n} {v:.0f}" for n, v in res["api_call_ms"].items()))
    share = res["other_cpu_share"]
    print(f"    load average {res['load_average_1min']['before']:.2f} before, {res['load_average_1min']['after']:.2f} "
          f"after; other processes {100 * (share or 0):.0f}% of the CPUs during the timed rounds", flush=True)


# ---------------------------------------------------------------------------------------------- families
def family_yolov8(args, tmp: Path, image, image_path: Path, bisect) -> dict:
    from ultralytics import YOLO

    from vistrain.nn.model import build_model
    from vistrain.tasks.segment import SegmentTask

    imgsz = args.imgsz
    torch.manual_seed(0)
    model = build_model("yolov8n-seg", num_classes=NC).eval()
    x = SegmentTask().predict_preprocess(image, imgsz)[0][None]
    tune = tune_yolov8(model, x, args.candidates, bisect)
    ckpt = save_checkpoint(model, tmp / "yolov8n-seg.pt", imgsz)
    slim = have("onnxslim")
    exports = vistrain_exports(ckpt, imgsz, args.threads, slim=slim)
    # ultralytics: its own checkpoint with vistrain's state_dict (equal keys), its own ONNX export of it
    with quiet(False):
        ul = YOLO("yolov8n-seg.yaml", task="segment")
        ul.model.load_state_dict(model.state_dict(), strict=True)
        ul_pt = tmp / "ultralytics-yolov8n-seg.pt"
        ul.save(str(ul_pt))  # it stores the model in half precision: put the float32 one in (the same weights)
        ck = torch.load(ul_pt, map_location="cpu", weights_only=False)
        ck["model"] = copy.deepcopy(ul.model).float()
        torch.save(ck, ul_pt)
        t0 = time.perf_counter()
        ul_onnx = Path(YOLO(str(ul_pt)).export(format="onnx", imgsz=imgsz, simplify=slim, device="cpu"))
    exports["ultralytics-onnx"] = {"path": str(ul_onnx), "export_s": round(time.perf_counter() - t0, 2),
                                   "simplify": slim}
    torch.set_num_threads(args.threads)
    sides = {V_PT: side(VistrainSide, ckpt, imgsz, args.threads),
             V_ONNX: side(VistrainSide, Path(exports["onnx"]["path"]), imgsz, args.threads),
             V_OV: side(VistrainSide, Path(exports["openvino"]["path"]), imgsz, args.threads),
             U_ONNX: side(UltralyticsSide, ul_onnx, imgsz, args.threads, image),
             U_PT: side(UltralyticsSide, ul_pt, imgsz, args.threads, image)}
    sides[U_RETINA] = side(UltralyticsSide, ul_pt, imgsz, args.threads, image, retina_masks=True)
    if slim:
        sides[V_SLIM] = side(VistrainSide, Path(exports["onnx-slim"]["path"]), imgsz, args.threads)
    sides[V_NOSPIN] = side(VistrainSide, Path(exports["onnx"]["path"]), imgsz, args.threads, nospin=True)
    extra = {"imgsz": imgsz, "weights": "build_model('yolov8n-seg', num_classes=80), torch seed 0, class logits tuned",
             "candidates": tune, "exports": exports,
             "input_shapes": {V_PT: [imgsz, imgsz], U_PT: "letterbox to a stride multiple (480x640 for 640x480)",
                              U_ONNX: [imgsz, imgsz]}}
    if args.api_calls:
        extra["api_call_ms"] = api_call_ms({V_PT: ckpt, V_ONNX: exports["onnx"]["path"],
                                            V_OV: exports["openvino"]["path"]}, image_path, imgsz, args.threads,
                                           args.api_calls, tmp)
    mine = [V_PT, V_ONNX, V_OV]
    return run_family("yolov8n-seg", sides, image, args, extra, [(mine, U_PT, 0.7), (mine, U_ONNX, 1.0)])


def family_yolov5(args, tmp: Path, image, image_path: Path, detect_bench) -> dict:
    from vistrain.tasks.detect import DetectTask

    imgsz = args.imgsz
    torch.manual_seed(0)
    x = DetectTask().predict_preprocess(image, imgsz)[0][None]
    with quiet(False):
        tuned = detect_bench.VistrainInfer(x, args.candidates)  # bench/detect.py's yolov5s, logits spread + shifted
    model = tuned.model.eval()
    tune = {"candidates_at_init": tuned.count_at_init, "candidates": int(tuned.candidates(x)),
            "logit_shift": tuned.shift}
    ckpt = save_checkpoint(model, tmp / "yolov5s.pt", imgsz)
    exports = vistrain_exports(ckpt, imgsz, args.threads, slim=False)
    sides = {V_PT: side(VistrainSide, ckpt, imgsz, args.threads),
             V_ONNX: side(VistrainSide, Path(exports["onnx"]["path"]), imgsz, args.threads),
             V_OV: side(VistrainSide, Path(exports["openvino"]["path"]), imgsz, args.threads),
             V_NOSPIN: side(VistrainSide, Path(exports["onnx"]["path"]), imgsz, args.threads, nospin=True)}
    if detect_bench.YOLOV5 is not None:
        sides[Y5_PT] = side(Yolov5Side, {k: v.detach().clone() for k, v in model.state_dict().items()}, imgsz)
    extra = {"imgsz": imgsz, "weights": "bench/detect.py's VistrainInfer: build_model('yolov5s', num_classes=80), "
                                        "torch seed 0, score logits tuned", "candidates": tune, "exports": exports,
             "yolov5": "imported" if detect_bench.YOLOV5 is not None else "not importable: left out",
             "input_shapes": {V_PT: [imgsz, imgsz], Y5_PT: "letterbox to a stride multiple (480x640 for 640x480)"}}
    if args.api_calls:
        extra["api_call_ms"] = api_call_ms({V_PT: ckpt, V_ONNX: exports["onnx"]["path"],
                                            V_OV: exports["openvino"]["path"]}, image_path, imgsz, args.threads,
                                           args.api_calls, tmp)
    targets = [([V_PT, V_ONNX, V_OV], Y5_PT, 0.7)] if Y5_PT in sides else []
    return run_family("yolov5s", sides, image, args, extra, targets)


def family_effdet(args, tmp: Path, image, image_path: Path, effbench, bisect) -> dict:
    from vistrain.nn.model import build_model
    from vistrain.tasks.detect import DetectTask

    imgsz = args.effdet_imgsz
    torch.manual_seed(0)
    model = build_model("efficientdet-d0", num_classes=NC).eval()
    x = DetectTask().predict_preprocess(image, imgsz)[0][None]
    tune = tune_effdet(model, x, args.candidates, bisect)
    ckpt = save_checkpoint(model, tmp / "efficientdet-d0.pt", imgsz)
    exports = vistrain_exports(ckpt, imgsz, args.threads, slim=False)
    state = effbench.nchw_state(model)
    sides = {V_PT: side(VistrainSide, ckpt, imgsz, args.threads),
             V_ONNX: side(VistrainSide, Path(exports["onnx"]["path"]), imgsz, args.threads),
             V_OV: side(VistrainSide, Path(exports["openvino"]["path"]), imgsz, args.threads),
             E_PT: side(EffdetSide, state, imgsz),
             V_NOSPIN: side(VistrainSide, Path(exports["onnx"]["path"]), imgsz, args.threads, nospin=True)}
    extra = {"imgsz": imgsz, "weights": "build_model('efficientdet-d0', num_classes=80), torch seed 0, class logits "
                                        "tuned; the same state_dict in effdet's EfficientDet (strict)",
             "candidates": tune, "exports": exports}
    if args.api_calls:
        extra["api_call_ms"] = api_call_ms({V_PT: ckpt, V_ONNX: exports["onnx"]["path"],
                                            V_OV: exports["openvino"]["path"]}, image_path, imgsz, args.threads,
                                           args.api_calls, tmp)
    return run_family("efficientdet-d0", sides, image, args, extra, [([V_ONNX, V_OV], E_PT, 0.5)])


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(FAMILIES), help=f"comma list of {', '.join(FAMILIES)}")
    p.add_argument("--imgsz", type=int, default=640, help="YOLO input size (default 640)")
    p.add_argument("--effdet-imgsz", type=int, default=512, help="EfficientDet-D0 input size (default 512)")
    p.add_argument("--rounds", type=int, default=40,
                   help="images timed per side (default 40): one per round with --one-process, else in blocks")
    p.add_argument("--warmup-rounds", type=int, default=3)
    p.add_argument("--candidates", type=int, default=100,
                   help="boxes (EfficientDet: anchor-class pairs) above conf 0.25 before NMS; 0 = as initialised")
    p.add_argument("--threads", type=int, default=2, help="torch / ONNX Runtime / OpenVINO threads, every side")
    p.add_argument("--api-calls", type=int, default=3, help="vistrain.predict() calls timed per format (info; 0: none)")
    p.add_argument("--max-load", type=float, default=1.0, help="wait until the 1-min load average is below this")
    p.add_argument("--max-wait", type=float, default=300.0, help="longest wait for a quiet machine, seconds")
    p.add_argument("--one-process", action="store_true",
                   help="every side in this process (default: each side in a process of its own)")
    p.add_argument("--gap-ms", type=float, default=100.0,
                   help="pause between two sides' blocks when each has its own process (default 100)")
    p.add_argument("--block", type=int, default=5,
                   help="images timed back to back per side and round, each side in its own process (default 5; "
                        "1 with --gap-ms: a predictor called now and then)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--quick", action="store_true", help="smoke run: 320 / 256 px, 1 + 3 rounds, no waiting")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if set(args.models) - set(FAMILIES):
        p.error(f"--models takes {', '.join(FAMILIES)}")
    if args.quick:
        args.imgsz, args.effdet_imgsz, args.rounds, args.warmup_rounds = 320, 256, 3, 1
        args.api_calls, args.max_wait = min(args.api_calls, 1), 0.0
    if args.out is None:
        args.out = QUICK_RESULTS if args.quick else RESULTS
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="vistrain-bench-export-") as tmp:
        tmp = Path(tmp)
        os.environ["YOLO_OFFLINE"] = "1"  # before the peers are imported: no network, settings in the temp dir
        os.environ["YOLO_CONFIG_DIR"] = str(tmp / "ultralytics-config")
        os.environ["YOLOV5_CONFIG_DIR"] = str(tmp / "yolov5-config")
        os.environ["VISTRAIN_CACHE"] = str(tmp / "vistrain-cache")
        block_internet()
        with quiet(False):
            import ultralytics  # noqa: F401 (its import sets OMP_NUM_THREADS; torch's count is set below)
            detect_bench = load_bench("detect")
            effbench = load_bench("efficientdet")
            if "yolov5s" in args.models:
                detect_bench.YOLOV5, why = detect_bench.import_yolov5()
                if why:
                    print(f"yolov5 not importable, left out: {why}", file=sys.__stdout__, flush=True)
        torch.set_num_threads(args.threads)
        image_path, image = make_image(tmp)
        load0 = load1()
        print(f"Exported-model latency, CPU, batch 1, {args.threads} threads for torch / ONNX Runtime / OpenVINO "
              f"(OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}); image {image.width}x{image.height} JPEG; "
              f"{args.warmup_rounds} warm-up + {args.rounds} timed rounds; {args.candidates} candidates above conf "
              f"{CONF}; load average {load0:.2f}", flush=True)
        result = {"benchmark": "vistrain predict with PyTorch / ONNX Runtime / OpenVINO vs the peers' predictors, "
                               "CPU latency per image (bench/export.py)",
                  "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_info(),
                  "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                  "image": f"{image.width}x{image.height} JPEG, render_detect(0, 3, 640) rows 80-560",
                  "timed": {"vistrain": "task.predict_preprocess + torch.stack + model (no_grad; PyTorch: fused, "
                                        "channels-last, decode) + task.predict_postprocess + make_result + describe",
                            U_PT: "YOLO.predict(PIL image) per call, predictor reused (setup excluded)",
                            U_ONNX: "the same on its ONNX export",
                            Y5_PT: "AutoShape(PIL image): letterbox, forward, NMS, Detections",
                            E_PT: "vistrain's letterbox, normalise, DetBenchPredict, score >= 0.25, boxes back"},
                  "not_timed": "JPEG read/decode (PIL image in memory), model build/load/export, drawing, saving",
                  "load_average_1min_start": load0, "families": {}}
        if args.quick:
            result["note"] = "--quick smoke run: not a measurement"
        for fam in args.models:
            print(f"\n=== {fam} ===", flush=True)
            if fam == "yolov8n-seg":
                res = family_yolov8(args, tmp, image, image_path, detect_bench._bisect)
            elif fam == "yolov5s":
                res = family_yolov5(args, tmp, image, image_path, detect_bench)
            else:
                res = family_effdet(args, tmp, image, image_path, effbench, detect_bench._bisect)
            result["families"][fam] = res
        result["load_average_1min_end"] = load1()
        result["wall_s"] = round(time.time() - t_start)
        for fam in result["families"].values():  # the temp dir goes away: keep only the file names
            for e in fam.get("exports", {}).values():
                e["path"] = Path(e["path"]).name
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nresults written to {args.out} ({result['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
