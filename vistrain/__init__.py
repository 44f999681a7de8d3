"""vistrain: build, train, evaluate and run vision models offline, with one engine.

The Python API takes the same keys as the CLI (``vistrain help`` lists them)::

    import vistrain
    model = vistrain.Model("yolov8n")  # .train(...), .val(), .predict(source), .export(format=...), .info()
    net = vistrain.build_model("resnet50", num_classes=1000)
    results = vistrain.train(model="yolov5n-cls", epochs=3, imgsz=64)
    metrics = vistrain.val(model="runs/classify/train/weights/best.pt")
    preds = vistrain.predict("runs/classify/train/weights/best.pt", "images/")
    path = vistrain.export(model="runs/classify/train/weights/best.pt", format="onnx")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__version__ = "0.1.0"

from vistrain.model import Model  # noqa: E402  (imports nothing heavy: torch loads on first use)


def __getattr__(name: str) -> Any:
    # build_model is imported on first use, so that `import vistrain` (and the `vistrain` command) does not load
    # torch: OpenMP's wait policy can only be set before it loads (vistrain/utils/threads.py)
    if name == "build_model":
        from vistrain.nn.model import build_model

        return build_model
    raise AttributeError(f"module 'vistrain' has no attribute {name!r}")


def _config(mode: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    from vistrain.utils.threads import apply_threads, set_wait_policy

    set_wait_policy()  # takes effect only if torch is not loaded yet (the import below loads it)
    from vistrain.config import get_config
    from vistrain.engine.utils import setup_logging

    cfg = get_config(kwargs)
    cfg["_user_keys"] = sorted(kwargs)
    cfg["_mode"] = mode
    setup_logging(cfg.get("verbose", True))
    apply_threads(cfg)
    return cfg


def train(**kwargs: Any) -> dict[str, Any]:
    """Train a model; returns the final metrics of the best checkpoint and ``save_dir``."""
    cfg = _config("train", kwargs)  # first: it sets the thread policy before torch loads
    from vistrain.engine import distributed as ddp
    from vistrain.engine.trainer import Trainer

    nproc = ddp.processes_wanted(cfg)
    if nproc > 1 and ddp.dist_env().world_size == 1:  # device=0,1 or nproc=2: the same keys under torchrun
        ddp.check_batch(cfg, nproc)
        return _train_under_torchrun(kwargs, nproc)
    return Trainer(cfg).train()


def _train_under_torchrun(kwargs: dict[str, Any], nproc: int) -> dict[str, Any]:
    """``vistrain train KEYS`` in ``nproc`` processes (torchrun); rank 0's final metrics.  Callbacks cannot travel
    to the new processes: a script that adds some runs itself under torchrun instead."""
    import json
    import tempfile

    from vistrain.engine import distributed as ddp
    from vistrain.engine.utils import UserError

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.json"
        status = ddp.launch(["train", *ddp.cli_args(kwargs)], nproc, results_json=out)
        if status or not out.is_file():
            raise UserError(f"the DDP run failed (exit status {status}); the failing rank's message is above")
        return json.loads(out.read_text())


def tune(**kwargs: Any) -> dict[str, Any]:
    """Search training hyperparameters on Ray Tune (``vistrain[tune]``); returns the tune folder, the best keys and
    fitness, and every trial's row."""
    cfg = _config("tune", kwargs)
    from vistrain.engine.tune import tune as run_tune

    return run_tune(cfg)


def val(**kwargs: Any) -> dict[str, Any]:
    """Validate a checkpoint on the validation split of ``data`` (default: the data it trained on)."""
    cfg = _config("val", kwargs)
    from vistrain.engine.validator import val as run_val

    return run_val(cfg)


def predict(model: str | None = None, source: Any = None, **kwargs: Any):
    """Predict ``source`` with a checkpoint or an exported file; returns one ``Result`` per image (a generator
    with ``stream=True``).  Sources: paths, folders, globs, videos, numpy arrays (HxWx3 BGR, as OpenCV reads),
    PIL images, torch tensors (CxHxW or BxCxHxW RGB 0..1), or a list of these.  Nothing is written unless
    ``save=True``."""
    if model is not None:
        kwargs["model"] = str(model)
    if source is not None:
        kwargs["source"] = str(source) if isinstance(source, Path) else source
    kwargs.setdefault("save", False)
    cfg = _config("predict", kwargs)
    from vistrain.engine.predictor import predict as run_predict

    return run_predict(cfg)


def export(**kwargs: Any):
    """Export a checkpoint (``model=``) to ``format=`` onnx, torchscript or openvino; returns the written path."""
    cfg = _config("export", kwargs)
    from vistrain.deploy.export import export as run_export

    return run_export(cfg)


def benchmark(**kwargs: Any) -> list[dict]:
    """Export a checkpoint to every format, validate and time each; returns the table's rows."""
    cfg = _config("benchmark", kwargs)
    from vistrain.deploy.benchmark import benchmark as run_benchmark

    return run_benchmark(cfg)


def compare(**kwargs: Any) -> list[dict]:
    """Train every model of ``models=`` on ``data`` with the same keys, validate and time each; one table."""
    cfg = _config("compare", kwargs)
    from vistrain.engine.compare import compare as run_compare

    return run_compare(cfg)


__all__ = ["Model", "compare", "build_model", "train", "val", "predict", "export", "benchmark", "__version__"]
