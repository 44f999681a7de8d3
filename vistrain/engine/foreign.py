"""The peers' weight files as vistrain checkpoints: ultralytics ``.pt`` (YOLOv8 / YOLOv5u detect and segment) and
yolov5-repo ``.pt`` files, read without running their code; and bare state_dicts whose architecture the tensors
tell (torchvision ResNets, effdet EfficientDets: ``state_dict_checkpoint``).

Such a file pickles whole model objects (``ultralytics.nn.tasks.DetectionModel``, ``models.yolo.Model``, torch's
``Conv2d`` ...).  Unpickling it normally imports those classes and may call anything the file names; here:

1. every global the pickle names is listed first (``pickletools``, nothing executed);
2. a name outside the peers' model classes and torch's tensor rebuilding (``os.system``, ``builtins.eval``, an
   unknown callable) refuses the file with one line;
3. the peers' classes (and ``torch.nn.modules.*``) become inert placeholders (``Inert``: they store the state
   the pickle gives them and do nothing else), and ``torch.load(weights_only=True)`` does the rest with them
   allowed, so only torch's own tensor rebuilding runs;
4. the placeholders' ``_parameters`` / ``_buffers`` / ``_modules`` give the state_dict; the model object's
   ``yaml`` (ultralytics) or its ``yaml`` attribute (yolov5) the architecture; ``names`` the classes.

The result is a vistrain checkpoint dict (``model``, ``model_yaml``, ``task``, ``names``, ``imgsz``,
``converted_from``), which ``vistrain convert SRC DST.pt`` writes.
"""

from __future__ import annotations

import io
import pickletools
import zipfile
from pathlib import Path
from typing import Any

import torch

from vistrain.engine.utils import UserError

# the peers' model code: classes only ever stored as placeholders
PEER_PREFIXES = ("ultralytics.", "yolov5.", "models.", "utils.", "torch.nn.modules.")
# what torch itself needs to rebuild tensors and containers (weights_only's own set covers these)
TORCH_OK = {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter",
            "torch._utils._rebuild_parameter_with_state", "torch.Size", "torch.device", "torch.float16",
            "torch.float32", "torch.bfloat16", "builtins.set", "__builtin__.set", "torch.serialization._get_layout",
            "torch.strided"}
STORAGES = ("Storage",)  # torch.FloatStorage, torch.HalfStorage, ...
# small data types a training script pickles beside the model (dates, namespaces, numpy scalars): placeholders
DATA_OK = ("datetime.", "types.SimpleNamespace", "argparse.Namespace", "numpy.", "pathlib.", "_codecs.encode")


class Inert:
    """Stands for a class of a peer's code: keeps the state the pickle sets, runs nothing."""

    _vistrain_name = "?"

    def __init__(self, *args, **kwargs):
        self._args, self._kwargs = args, kwargs

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.__dict__.update(state)
        elif isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):  # (dict, slots)
            self.__dict__.update(state[0])
        else:
            self._state = state

    def __repr__(self) -> str:
        return f"<inert {self._vistrain_name}>"


def pickle_globals(path: Path) -> list[str]:
    """The ``module.name`` of every global a ``torch.save`` zip (or legacy pickle) file refers to."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            name = next((n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            if name is None:
                raise UserError(f"{path}: a zip file without data.pkl; not a PyTorch checkpoint")
            data = z.read(name)
    else:
        data = path.read_bytes()
    names, strings = [], []
    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(data)):
            if op.name == "GLOBAL":
                names.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
            elif op.name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"):
                strings.append(str(arg))
            if op.name == "STOP":
                break
    except Exception as e:  # noqa: BLE001  (a damaged pickle stream)
        raise UserError(f"{path}: a damaged pickle ({type(e).__name__}: {str(e)[:120]})") from None
    return list(dict.fromkeys(names))


def allowed(name: str) -> bool:
    return (name in TORCH_OK or name.startswith(PEER_PREFIXES) or name.startswith(DATA_OK)
            or (name.startswith("torch.") and name.endswith(STORAGES) and name.count(".") == 1))


def load_inert(path: Path) -> Any:
    """Unpickle ``path`` with every peer class as an ``Inert`` placeholder; ``UserError`` for anything else."""
    names = pickle_globals(path)
    bad = [n for n in names if not allowed(n)]
    if bad:
        raise UserError(f"{path}: refused - it holds pickled Python objects, and loading it would call {bad[0]}"
                        f"{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''}, which is not part of an "
                        f"ultralytics or yolov5 model; vistrain never runs code from a weight file. Save a plain "
                        f"state_dict there (torch.save(model.state_dict())) and pass it as pretrained=")
    mapping = []
    for n in names:
        if n.startswith(PEER_PREFIXES) or n.startswith(DATA_OK):
            mapping.append((type(n.rsplit(".", 1)[-1], (Inert,), {"_vistrain_name": n}), n))
        elif n in ("builtins.set", "__builtin__.set"):
            mapping.append((set, n))
    with torch.serialization.safe_globals(mapping):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"{path}: cannot be read safely ({type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else ''})") from None


def inert_state_dict(module: Any, prefix: str = "", out: dict | None = None) -> dict[str, torch.Tensor]:
    """A placeholder module tree -> its state_dict (parameters and persistent buffers), as ``nn.Module`` would."""
    out = {} if out is None else out
    d = getattr(module, "__dict__", {})
    skip = d.get("_non_persistent_buffers_set") or set()
    for k, v in (d.get("_parameters") or {}).items():
        if v is not None:
            out[prefix + k] = v.detach().float() if v.is_floating_point() else v.detach()
    for k, v in (d.get("_buffers") or {}).items():
        if v is not None and k not in skip:
            out[prefix + k] = v.detach().float() if v.is_floating_point() else v.detach()
    for k, v in (d.get("_modules") or {}).items():
        if v is not None:
            inert_state_dict(v, prefix + k + ".", out)
    return out


def is_inert(x: Any) -> bool:
    return isinstance(x, Inert)


def peer_checkpoint(path: str | Path) -> dict:
    """An ultralytics or yolov5-repo ``.pt`` -> a vistrain checkpoint dict (see the module docstring)."""
    path = Path(path)
    obj = load_inert(path)
    if not isinstance(obj, dict):
        raise UserError(f"{path}: holds a {type(obj).__name__}, not a checkpoint dict")
    net = obj.get("ema") if is_inert(obj.get("ema")) else obj.get("model")
    if not is_inert(net):
        raise UserError(f"{path}: no model object in it (keys: {', '.join(map(str, list(obj)[:6]))})")
    kind = net._vistrain_name
    d = net.__dict__
    yaml_dict = d.get("yaml")
    if not isinstance(yaml_dict, dict):
        raise UserError(f"{path}: its model ({kind}) carries no model YAML; vistrain cannot rebuild it")
    names = d.get("names")
    nc = int(yaml_dict.get("nc") or 0)
    if isinstance(names, dict):
        names = [str(names[i]) for i in sorted(names)]
    names = list(names) if names else [str(i) for i in range(nc)]
    task = peer_task(kind, yaml_dict, path)
    model_yaml = vistrain_yaml(yaml_dict, task, path)
    if kind == "ultralytics.nn.tasks.ClassificationModel" and "batchnorm" not in model_yaml:
        model_yaml["batchnorm"] = {"eps": 1e-5, "momentum": 0.1}  # its classifiers keep torch's BatchNorm defaults
    state = inert_state_dict(net)
    args = obj.get("train_args") or obj.get("opt") or {}
    imgsz = args.get("imgsz") if isinstance(args, dict) else None
    source = "ultralytics" if kind.startswith("ultralytics.") else "yolov5"
    return {"model": state, "model_yaml": model_yaml, "task": task, "names": names,
            "imgsz": int(imgsz[0] if isinstance(imgsz, (list, tuple)) else imgsz) if imgsz else 640,
            "converted_from": {"file": str(path), "package": source, "class": kind,
                               "version": str(obj.get("version") or "")}}


def peer_task(kind: str, yaml_dict: dict, path: Path) -> str:
    head = str(yaml_dict.get("head", [[None, None, ""]])[-1][2]) if yaml_dict.get("head") else ""
    if kind.endswith("SegmentationModel") or head == "Segment":
        return "segment"
    if kind.endswith("ClassificationModel") or head == "Classify":
        return "classify"
    if kind.endswith(("DetectionModel", ".Model")) or head == "Detect":
        return "detect"
    raise UserError(f"{path}: a {kind} ({head or 'unknown head'}); vistrain reads detection, segmentation and "
                    f"classification models")


def vistrain_yaml(yaml_dict: dict, task: str, path: Path) -> dict:
    """The peer's model YAML as vistrain's (same module names and arguments; ``scale`` picked as the peer did)."""
    from vistrain.nn.model import model_from_yaml
    from vistrain.nn.parser import ModelYAMLError

    d = {k: v for k, v in yaml_dict.items() if k not in ("yaml_file", "channels", "ch")}
    d["task"] = task
    if "name" not in d:
        d["name"] = Path(str(yaml_dict.get("yaml_file") or path.stem)).stem
    try:
        model_from_yaml(d)
    except ModelYAMLError as e:
        raise UserError(f"{path}: its model YAML cannot be built by vistrain: {str(e).splitlines()[0]}") from None
    return d


RESNETS = {((2, 2, 2, 2), False): "resnet18", ((3, 4, 6, 3), False): "resnet34", ((3, 4, 6, 3), True): "resnet50",
           ((3, 4, 23, 3), True): "resnet101", ((3, 8, 36, 3), True): "resnet152"}


def state_dict_checkpoint(path: Path, sd: dict[str, torch.Tensor]) -> dict | None:
    """A torchvision ResNet's or an effdet EfficientDet's state_dict -> a vistrain checkpoint dict, else None.
    The model is named from the tensors (ResNet: blocks per stage and bottlenecks; EfficientDet: BiFPN width and
    depth, the backbone's head width, the anchor levels), built, and must load the state_dict strictly."""
    from vistrain.nn.model import load_model_yaml, model_from_yaml
    from vistrain.tasks.detect import native_imgsz

    name, nc = None, None
    if "fc.weight" in sd and "conv1.weight" in sd and "layer1.0.conv1.weight" in sd:
        blocks = tuple(len({k.split(".")[1] for k in sd if k.startswith(f"layer{i}.")}) for i in range(1, 5))
        name, nc = RESNETS.get((blocks, "layer1.0.conv3.weight" in sd)), int(sd["fc.weight"].shape[0])
    elif "class_net.predict.conv_pw.weight" in sd and any(k.startswith("fpn.cell.") for k in sd):
        name, nc = effdet_name(path, sd)
    if name is None:
        return None
    d = load_model_yaml(name)
    model = model_from_yaml(d, num_classes=nc)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise UserError(f"{path}: looks like {name}'s weights but does not load into it "
                        f"({str(e).splitlines()[0][:160]}); give model={name} pretrained={path}") from None
    return {"model": {k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()},
            "model_yaml": model.yaml, "task": model.task, "names": [str(i) for i in range(nc)],
            "imgsz": int(d.get("imgsz") or native_imgsz(name) or 224),
            "converted_from": {"file": str(path), "package": "torchvision" if name.startswith("resnet") else "effdet",
                               "class": name, "version": ""}}


def effdet_name(path: Path, sd: dict[str, torch.Tensor]) -> tuple[str | None, int | None]:
    """EfficientDet-Dn from its tensors: BiFPN channels and cells, the backbone's last stage width and the number
    of levels; D6 and D7 have the same tensors (D7 runs larger inputs with larger anchors): the file name decides,
    else D6."""
    from vistrain.nn.efficientdet import EFFICIENTDET

    channels = int(sd["class_net.predict.conv_pw.weight"].shape[1])
    cells = len({k.split(".")[2] for k in sd if k.startswith("fpn.cell.")})
    anchors = 9  # 3 scales x 3 aspect ratios, as effdet
    nc = int(sd["class_net.predict.conv_pw.weight"].shape[0]) // anchors
    found = [k for k, v in EFFICIENTDET.items() if v[2] == channels and v[3] == cells]
    levels = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("class_net.bn_rep.") and k.count(".") > 4) \
        if any(k.startswith("class_net.bn_rep.") for k in sd) else None
    if len(found) > 1 and levels is not None:
        found = [k for k in found if EFFICIENTDET[k][6] - 2 == levels] or found
    if set(found) == {"d6", "d7"}:
        found = ["d7"] if "d7" in Path(path).name.lower() else ["d6"]
    if len(found) != 1:
        return None, None
    return f"efficientdet-{found[0]}", nc
