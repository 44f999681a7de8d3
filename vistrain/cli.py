"""``vistrain MODE key=value ...`` - the command line, in the ultralytics style.

Bad input (an unknown key, a bad value, a missing path, a broken file) prints one line and exits
with status 2; no traceback.
"""

from __future__ import annotations

import os
import sys

MODES = {
    "train": "train a model (vistrain train model=yolov5n-cls data=DIR epochs=10 imgsz=224)",
    "val": "validate a checkpoint (vistrain val model=runs/classify/train/weights/best.pt)",
    "predict": "predict images (vistrain predict model=best.pt source=DIR|FILE|GLOB)",
    "export": "export a checkpoint (vistrain export model=best.pt format=onnx|torchscript|openvino imgsz=640 "
              "dynamic=False)",
    "benchmark": "export to every format, validate and time each (vistrain benchmark model=best.pt)",
    "summary": "print a model's layers, parameters and GFLOPs (vistrain summary model=resnet50 nc=1000)",
    "data": "make the built-in synthetic dataset (vistrain data make out=DIR n=1000 imgsz=320 seed=0), or write "
            "a Pascal VOC folder's split lists (vistrain data split data=VOCdevkit/VOC2007 trainval=0.9 train=0.9 "
            "seed=0)",
    "compare": "train several models on the same data and compare them in one table (vistrain compare data=DIR "
               "models=yolov5n,yolov8n,efficientdet-d0 epochs=30)",
    "tune": "search training hyperparameters on Ray Tune (vistrain tune model=yolov8n data=data.yaml epochs=30 "
            "iterations=50; pip install 'vistrain[tune]')",
    "convert": "a peer's weight file (ultralytics, yolov5) to a vistrain checkpoint, read without running its code "
               "(vistrain convert yolov8n.pt yolov8n-vistrain.pt)",
    "version": "print vistrain's version",
    "checks": "the environment: vistrain, Python, torch, CUDA and GPUs, CPU, RAM, disk, optional packages",
    "help": "this text; `vistrain MODE help` lists the keys, `vistrain help models` the built-in models",
}
MODE_KEYS = {
    "summary": ("model", "nc", "imgsz", "device"),
    "data": ("out", "n", "imgsz", "seed", "workers", "data", "exist_ok"),
    "val": ("model", "data", "imgsz", "batch", "workers", "device", "project", "name", "exist_ok", "plots",
            "save_json", "verbose", "split", "seed"),
    "predict": ("model", "source", "imgsz", "batch", "device", "project", "name", "exist_ok", "save", "save_json",
                "topk"),
    "export": ("model", "format", "imgsz", "batch", "dynamic", "half", "opset", "simplify", "nms", "conf", "iou",
               "max_det", "device"),
    "convert": (),
    "version": (),
    "checks": (),
    "benchmark": ("model", "data", "imgsz", "batch", "workers", "device", "project"),
}


def print_help(mode: str | None = None) -> None:
    from vistrain.config import key_help

    if mode == "models":
        print(models_table())
        return
    if mode is None:
        print("Usage: vistrain MODE key=value ...\n\nModes:")
        for m, text in MODES.items():
            print(f"  {m:<8} {text}")
        print("\nKeys (key=default  meaning):")
    else:
        print(f"vistrain {mode}: {MODES[mode]}\n\nKeys (key=default  meaning):")
    wanted = MODE_KEYS.get(mode) if mode else None
    others = ("predict", "export", "data make", "images to predict") if mode == "train" else ()
    for key, default, meaning in key_help():
        if (wanted is None or key in wanted) and not meaning.startswith(others or "\0"):
            shown = "" if default is None else default
            print(f"  {key + '=' + str(shown):<28} {meaning}")


def model_stats(rows: list[tuple[str, str, int]]) -> dict[str, tuple[int, float]]:
    """(parameters, GFLOPs at the default size) of each built-in model, as ``vistrain summary`` counts them.

    Building every model takes about a minute, so the numbers are kept in ``$VISTRAIN_CACHE/models-HASH.json``, HASH of
    vistrain's version, the model YAMLs and ``vistrain/nn``'s code: made once, remade when any of them changes.
    The GFLOPs come from a forward pass on the ``meta`` device (shapes only, no arithmetic)."""
    import hashlib
    import json
    from pathlib import Path

    import torch

    import vistrain
    from vistrain.data.yolo import cache_dir
    from vistrain.nn.model import MODELS_DIR, build_model
    from vistrain.utils.summary import summarize

    nn_dir = Path(vistrain.__file__).parent / "nn"
    h = hashlib.sha1(vistrain.__version__.encode())
    for f in sorted(MODELS_DIR.glob("*.yaml")) + sorted(nn_dir.glob("*.py")):
        h.update(f.name.encode() + f.read_bytes())
    path = cache_dir() / f"models-{h.hexdigest()[:16]}.json"
    try:
        stats = json.loads(path.read_text())
    except (OSError, ValueError):
        stats = {}
    missing = [r for r in rows if r[0] not in stats]
    if missing:
        print(f"(counting the parameters and GFLOPs of {len(missing)} models once, about a minute; kept in {path})",
              file=sys.stderr, flush=True)
        for name, _task, size in missing:
            with torch.no_grad():
                model = build_model(name).eval()
                params = sum(p.numel() for p in model.parameters())
                stats[name] = [params, summarize(model.to("meta"), size, device="meta").gflops]
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(stats))
            tmp.replace(path)
        except OSError:  # a read-only cache: counted again next time
            pass
    return {name: (int(stats[name][0]), float(stats[name][1])) for name, _, _ in rows}


def models_table() -> str:
    """``vistrain help models``: every built-in name with its task, default input size, parameters and GFLOPs
    at that size (``model_stats``), in natural order (resnet18 before resnet101)."""
    import re

    from vistrain.nn.model import builtin_models, load_model_yaml
    from vistrain.tasks.detect import native_imgsz

    def key(name: str):
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]

    rows = []
    for name in builtin_models():
        d = load_model_yaml(name)
        head = str((d.get("head") or [[None, None, ""]])[-1][2])
        task = d.get("task") or ("detect" if d.get("arch") == "efficientdet" or head.startswith("Detect") else
                                 "segment" if head.startswith("Segment") else "classify")
        size = native_imgsz(name) or d.get("imgsz") or (224 if task == "classify" else 640)
        if d.get("arch") == "efficientnet":
            from vistrain.nn.efficientdet import EFFICIENTNET_IMGSZ

            size = EFFICIENTNET_IMGSZ.get(d.get("scale"), size)
        rows.append((name, task, size))
    scale_order = {s: i for i, s in enumerate("nsmlx")}
    rows.sort(key=lambda r: (key(re.sub(r"^(yolov\d+)([nsmlx])", r"\1", r[0])),
                             scale_order.get((re.match(r"^yolov\d+([nsmlx])", r[0]) or [None, ""])[1], 0)))
    stats = model_stats(rows)
    lines = ["Built-in models (model=NAME; `vistrain summary model=NAME` gives the per-layer table); parameters at "
             "the YAML's class count (nc), GFLOPs at imgsz:",
             f"  {'name':<24} {'task':<9} {'imgsz':>5} {'params':>12} {'GFLOPs':>8}"]
    lines += [f"  {n:<24} {t:<9} {sz:>5} {stats[n][0]:>12,} {stats[n][1]:>8.1f}" for n, t, sz in rows]
    return "\n".join(lines)


def summary(cfg: dict) -> None:
    import yaml

    from vistrain.engine.utils import UserError
    from vistrain.nn.model import build_model
    from vistrain.nn.parser import ModelYAMLError
    from vistrain.utils.summary import summarize

    if not cfg.get("model"):
        raise UserError("summary needs model=NAME|YAML|CHECKPOINT, e.g. vistrain summary model=resnet50 nc=1000")
    imgsz = cfg["imgsz"]
    if "imgsz" not in cfg.get("_user_keys", ()):  # each model at the size it is used at, as train's defaults
        from vistrain.tasks.detect import native_imgsz

        imgsz = None
    try:
        model = build_model(cfg["model"], num_classes=cfg.get("nc"), imgsz=imgsz)
        if imgsz is None:
            ckpt_size = None
            if str(cfg["model"]).endswith((".pt", ".pth")):
                from vistrain.engine.checkpoint import load_checkpoint

                ckpt_size = load_checkpoint(cfg["model"]).get("imgsz")
            imgsz = int(ckpt_size or native_imgsz(cfg["model"]) or model.yaml.get("imgsz") or
                        (cfg["imgsz"] if model.task == "classify" else 640))
    except FileNotFoundError as e:
        raise UserError(f"model={cfg['model']}: {e}") from None
    except (ModelYAMLError, yaml.YAMLError) as e:  # a bad row, argument or module: one line naming the row
        raise UserError(f"model={cfg['model']}: {str(e).splitlines()[0]}") from None
    print(f"{cfg['model']} at {imgsz} x {imgsz}:")
    print(summarize(model, imgsz=imgsz).table())
    if cfg.get("profile"):  # per-layer time and GFLOPs on this device
        import torch

        from vistrain.engine.utils import select_device
        from vistrain.utils.layers import profile_layers, profile_table

        device = select_device(cfg.get("device"))
        x = torch.zeros(1, 3, imgsz, imgsz, device=device)
        print(f"\nprofile: batch 1 on {device}, median of 3 passes")
        print("\n".join(profile_table(profile_layers(model.to(device).eval(), x))))


TASKS = ("classify", "detect", "segment")


def checks() -> str:
    """The environment printout: versions, devices, memory, disk and which optional packages are there."""
    import importlib.metadata as md
    import os
    import platform
    import shutil

    import torch

    from vistrain import __version__

    def version(pkg: str) -> str:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "not installed"

    lines = [f"vistrain {__version__}", f"Python {platform.python_version()} ({platform.platform()})",
             f"torch {torch.__version__}, torchvision {version('torchvision')}"]
    if torch.cuda.is_available():
        gpus = [f"{i}: {torch.cuda.get_device_name(i)} "
                f"({torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB)"
                for i in range(torch.cuda.device_count())]
        lines.append(f"CUDA {torch.version.cuda}: " + "; ".join(gpus))
    else:
        lines.append("CUDA: no GPU (device=cpu)")
    cpu = platform.processor() or platform.machine()
    lines.append(f"CPU: {os.cpu_count()} logical cores ({cpu}), torch threads {torch.get_num_threads()}")
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        lines.append(f"RAM: {pages * size / 2**30:.1f} GiB")
    except (ValueError, OSError, AttributeError):
        pass
    disk = shutil.disk_usage(".")
    lines.append(f"disk (here): {disk.free / 2**30:.1f} GiB free of {disk.total / 2**30:.1f} GiB")
    extras = ("onnx", "onnxruntime", "openvino", "onnxslim", "timm", "pycocotools", "opencv-python-headless")
    lines.append("packages: " + ", ".join(f"{p} {version(p)}" for p in extras))
    return "\n".join(lines)


def convert(args: list[str]) -> int:
    """``vistrain convert SRC DST``: SRC (an ultralytics or yolov5 ``.pt``, or a vistrain checkpoint) -> DST, a
    vistrain checkpoint (tensors and plain data only)."""
    from vistrain.engine.checkpoint import is_vistrain_checkpoint, load_checkpoint, not_vistrain_checkpoint, \
        save_checkpoint
    from vistrain.engine.utils import UserError

    if len(args) != 2 or any("=" in a for a in args):
        raise UserError("convert needs two paths: vistrain convert SRC.pt DST.pt")
    src, dst = args
    ckpt = load_checkpoint(src)
    if not is_vistrain_checkpoint(ckpt):
        raise UserError(not_vistrain_checkpoint(src, ckpt))
    keep = ("model", "model_yaml", "task", "names", "imgsz", "converted_from")
    save_checkpoint({k: ckpt[k] for k in keep if k in ckpt}, dst)
    print(f"{src} -> {dst}: {ckpt['task']} model {ckpt['model_yaml'].get('name', '?')}, {len(ckpt['names'])} "
          f"classes, {len(ckpt['model'])} tensors")
    return 0


SPLIT_KEYS = {"trainval": 0.9, "train": 0.9}  # `data split` only: fractions, as the VOC tutorials' voc_annotation.py


def data_split(cfg: dict, fractions: dict) -> None:
    """``vistrain data split data=VOC_FOLDER trainval=0.9 train=0.9 seed=0``: write ImageSets/Main/*.txt."""
    from vistrain.data.voc import write_voc_splits
    from vistrain.data.yolo import DataYAMLError
    from vistrain.engine.utils import UserError

    if not cfg.get("data"):
        raise UserError("usage: vistrain data split data=VOCdevkit/VOC2007 trainval=0.9 train=0.9 seed=0")
    try:
        values = {k: float(fractions.get(k, d)) for k, d in SPLIT_KEYS.items()}
    except ValueError:
        bad = next(k for k in fractions if not _is_number(fractions[k]))
        raise UserError(f"{bad}={fractions[bad]!r}: expected a fraction in 0..1") from None
    try:
        counts = write_voc_splits(cfg["data"], seed=cfg["seed"], exist_ok=cfg["exist_ok"], **values)
    except DataYAMLError as e:
        raise UserError(str(e)) from None
    total = counts["trainval"] + counts["test"]
    print(f"{cfg['data']}/ImageSets/Main: {total} annotated images -> trainval {counts['trainval']} (train "
          f"{counts['train']}, val {counts['val']}), test {counts['test']} (trainval={values['trainval']} "
          f"train={values['train']} seed={cfg['seed']})")


def _is_number(v) -> bool:
    try:
        float(v)
    except ValueError:
        return False
    return True


def data_mode(args: list[str], cfg: dict, fractions: dict | None = None) -> None:
    from vistrain.data.synthetic import make_dataset
    from vistrain.engine.utils import UserError

    if args and args[0] == "split":
        return data_split(cfg, fractions or {})
    if not args or args[0] != "make":
        raise UserError("usage: vistrain data make out=DIR n=1000 imgsz=320 seed=0, or vistrain data split "
                        "data=VOCdevkit/VOC2007 trainval=0.9 train=0.9 seed=0")
    import time

    t0 = time.time()
    out = make_dataset(cfg["out"], n=cfg["n"], imgsz=cfg["imgsz"], seed=cfg["seed"], workers=max(1, cfg["workers"]))
    print(f"built-in dataset written to {out} in {time.time() - t0:.1f}s (n={cfg['n']} imgsz={cfg['imgsz']} "
          f"seed={cfg['seed']}): classify/, detect/, segment/, voc/, coco/, data.yaml")


def main(argv: list[str] | None = None) -> int:
    from vistrain.utils.threads import apply_threads, set_wait_policy

    set_wait_policy()  # OpenMP threads sleep rather than spin when waiting; only before torch loads (next import)
    from vistrain.config import ConfigError, get_config, parse_cli_args
    from vistrain.engine.utils import UserError, setup_logging

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("help", "-h", "--help"):
        print_help(argv[1] if len(argv) > 1 and argv[1] in ("models", *MODES) else None)
        return 0
    if argv[0] in TASKS and len(argv) > 1 and argv[1] in MODES:  # `vistrain detect train ...`, as `yolo detect`
        argv = [argv[1], f"task={argv[0]}", *argv[2:]]
    mode, rest = argv[0], argv[1:]
    try:
        if mode not in MODES:
            from vistrain.config import closest_key

            near = closest_key(mode, MODES)
            raise ConfigError(f"unknown mode '{mode}'" + (f"; did you mean '{near}'?" if near else "")
                              + f" (modes: {', '.join(MODES)})")
        if rest and rest[0] in ("help", "-h", "--help"):
            print_help(mode)
            return 0
        sub = []
        if mode == "data" and rest and "=" not in rest[0]:
            sub, rest = [rest[0]], rest[1:]
        if mode == "convert":
            return convert(rest)
        if mode == "version":
            from vistrain import __version__

            print(__version__)
            return 0
        if mode == "checks":
            print(checks())
            return 0
        overrides = parse_cli_args(rest)
        fractions = {}
        if mode == "data":
            overrides.setdefault("imgsz", "320")
            if sub == ["split"]:  # its fractions are no config keys (train= would read as a path elsewhere)
                fractions = {k: overrides.pop(k) for k in SPLIT_KEYS if k in overrides}
        cfg = get_config(overrides)
        cfg["_user_keys"] = sorted(overrides)
        cfg["_mode"] = mode
        setup_logging(cfg["verbose"])
        apply_threads(cfg)  # torch's intra-op threads (key threads)
        if mode == "train":
            from vistrain.engine import distributed as ddp
            from vistrain.engine.trainer import Trainer

            nproc = ddp.processes_wanted(cfg)
            if nproc > 1 and ddp.dist_env().world_size == 1:  # this process starts torchrun with the same arguments
                ddp.check_batch(cfg, nproc)
                return ddp.launch(argv, nproc)
            Trainer(cfg).train()
        elif mode == "val":
            from vistrain.engine.validator import val

            val(cfg)
        elif mode == "predict":
            from vistrain.engine.predictor import predict

            predict(cfg)
        elif mode == "export":
            from vistrain.deploy.export import export

            export(cfg)
        elif mode == "benchmark":
            from vistrain.deploy.benchmark import benchmark

            benchmark(cfg)
        elif mode == "summary":
            summary(cfg)
        elif mode == "tune":
            from vistrain.engine.tune import tune

            tune(cfg)
        elif mode == "compare":
            from vistrain.engine.compare import compare

            compare(cfg)
        elif mode == "data":
            data_mode(sub, cfg, fractions)
        return 0
    except (ConfigError, UserError) as e:
        rank = os.environ.get("RANK", "0") if os.environ.get("WORLD_SIZE", "1") != "1" else "0"
        print(f"vistrain {mode}{'' if rank == '0' else f' [rank {rank}]'}: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full, read-only or forbidden disk while writing results, plots or predictions
        from vistrain.engine.utils import disk_error_message

        message = disk_error_message(e)
        if message is None:
            raise
        print(f"vistrain {mode}: {message}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # in a DDP run: a collective broken because another process died (its message says why)
        from vistrain.engine.distributed import peer_failed

        if not peer_failed(e):
            raise
        print(f"vistrain {mode} [rank {os.environ.get('RANK')}]: stopped: another process of the run failed",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nvistrain: interrupted; weights/last.pt holds the last finished epoch (resume=True continues)",
              file=sys.stderr)
        return 130


def entrypoint() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entrypoint()
