"""``vistrain.Model``: one object for a model, as ultralytics' ``YOLO(...)``::

    from vistrain import Model

    model = Model("yolov8n-seg")                  # a built-in name or model YAML: untrained
    model.train(data="data.yaml", epochs=10)      # afterwards the object holds the run's best.pt
    metrics = model.val()
    results = model.predict("images/", conf=0.3)  # or model("images/")
    path = model.export(format="onnx")
    Model("runs/detect/train/weights/best.pt")    # a checkpoint; Model("best.onnx") an exported file

The methods take the keys of the matching mode (``vistrain help``) and call the module functions
(``vistrain.train`` ...), so a ``Model`` does nothing the functions cannot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class Model:
    """A model name, model YAML, checkpoint (``.pt``) or exported file (``.onnx``, ``.torchscript``,
    ``NAME_openvino_model/``); see the module docstring."""

    def __init__(self, model: str | Path = "yolov8n", task: str | None = None):
        self.source = str(model)
        self.task_override = task
        self._module = None
        self._ckpt_meta: dict | None = None
        self._prepared: tuple | None = None  # (keys, prepare_predictor's result): kept between predict calls
        self.metrics: dict | None = None  # the last train / val metrics

    # --- what it is --------------------------------------------------------------------------------------
    @property
    def is_checkpoint(self) -> bool:
        return self.source.endswith((".pt", ".pth", ".safetensors"))

    @property
    def is_exported(self) -> bool:
        from vistrain.deploy.runtime import is_exported

        return is_exported(self.source)

    def _meta(self) -> dict:
        """task and names, read once: from the checkpoint, the exported file's metadata or the built model."""
        if self._ckpt_meta is None:
            if self.is_exported:
                from vistrain.deploy.runtime import load_exported

                meta = load_exported(self.source).meta
                self._ckpt_meta = {"task": meta["task"], "names": list(meta["names"])}
            elif self.is_checkpoint:
                from vistrain.engine.checkpoint import load_checkpoint

                ckpt = load_checkpoint(self.source)
                nc = ckpt["model_yaml"].get("nc", 0)
                self._ckpt_meta = {"task": ckpt.get("task"), "names": list(ckpt.get("names") or
                                                                          [str(i) for i in range(nc)])}
            else:
                m = self.model
                self._ckpt_meta = {"task": m.task, "names": [str(i) for i in range(int(m.yaml.get("nc") or 0))]}
        return self._ckpt_meta

    @property
    def task(self) -> str:
        return self.task_override or self._meta()["task"]

    @property
    def names(self) -> list[str]:
        return self._meta()["names"]

    @property
    def model(self):
        """The ``nn.Module`` in eval mode, FP32 (not for exported files: they are run by their runtime)."""
        if self._module is None:
            if self.is_exported:
                raise AttributeError(f"{self.source} is an exported file: no nn.Module; use predict / val")
            from vistrain.nn.model import build_model

            self._module = build_model(self.source).float().eval()
        return self._module

    def __repr__(self) -> str:
        return f"Model({self.source!r})"

    # --- modes ------------------------------------------------------------------------------------------
    def _keys(self, kwargs: dict) -> dict:
        if self.task_override and "task" not in kwargs:
            kwargs["task"] = self.task_override
        return kwargs

    def train(self, **kwargs: Any) -> dict:
        """Train (``vistrain.train`` keys); the object then holds the run's ``best.pt``.  Returns the metrics."""
        import vistrain

        kwargs.setdefault("model", self.source)
        res = vistrain.train(**self._keys(kwargs))
        best = Path(res["save_dir"]) / "weights" / "best.pt"
        if best.is_file():
            self.source, self._module, self._ckpt_meta, self._prepared = str(best), None, None, None
        self.metrics = res
        return res

    def val(self, **kwargs: Any) -> dict:
        import vistrain

        self.metrics = vistrain.val(model=self.source, **self._keys(kwargs))
        return self.metrics

    def predict(self, source: Any = None, **kwargs: Any):
        """``vistrain.predict`` keys; a list of ``Result`` (a generator with ``stream=True``).  The model (or the
        exported file's session) is built on the first call and kept while ``device``, ``fuse`` and
        ``channels_last`` stay the same."""
        import vistrain
        from vistrain.engine.predictor import predict as run_predict
        from vistrain.engine.predictor import prepare_predictor

        kwargs = self._keys(kwargs)
        kwargs["model"] = self.source
        if source is not None:
            kwargs["source"] = str(source) if isinstance(source, Path) else source
        kwargs.setdefault("save", False)
        cfg = vistrain._config("predict", kwargs)
        key = (cfg.get("device"), cfg.get("fuse"), cfg.get("channels_last"), cfg.get("task"))
        if self._prepared is None or self._prepared[0] != key:
            self._prepared = (key, prepare_predictor(cfg))
        return run_predict(cfg, prepared=self._prepared[1])

    __call__ = predict

    def embed(self, source: Any, layers: Any = None, **kwargs: Any) -> "torch.Tensor":
        """``Tensor[N, D]``: each image's embedding, the outputs of ``layers`` (indices or names; default the layer
        before the head) global-average-pooled and concatenated (predict's ``embed=``)."""
        import torch

        results = self.predict(source, embed=True if layers is None else layers, **kwargs)
        return torch.stack([r.embedding for r in results])

    def export(self, **kwargs: Any) -> Path:
        import vistrain

        return vistrain.export(model=self.source, **kwargs)

    def benchmark(self, **kwargs: Any) -> list[dict]:
        import vistrain

        return vistrain.benchmark(model=self.source, **kwargs)

    def info(self, imgsz: int | None = None, verbose: bool = True):
        """Layers, parameters and GFLOPs (``vistrain summary``) at ``imgsz`` (default: 224 for classifiers, else
        640, or the checkpoint's); printed when ``verbose``; returns the summary."""
        from vistrain.utils.summary import summarize

        size = imgsz or self._default_imgsz()
        s = summarize(self.model, imgsz=size)
        if verbose:
            print(s.table())
        return s

    def _default_imgsz(self) -> int:
        if self.is_checkpoint:
            from vistrain.engine.checkpoint import load_checkpoint

            size = load_checkpoint(self.source).get("imgsz")
            if size:
                return int(size)
        return 224 if self.task == "classify" else 640
