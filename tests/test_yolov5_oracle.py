"""vistrain's anchor-based YOLOv5 against the reference package ``yolov5==7.0.14`` (PyPI) as an oracle.

The reference is AGPL-3.0: only this test imports it, vistrain never does, and nothing of it is
copied here. ``make test`` installs it with ``pip install --no-deps yolov5==7.0.14`` beside the few
packages its import chain needs (pandas, seaborn, requests, psutil, and ``setuptools<81`` for
``pkg_resources``); where it is absent every test here is skipped.

Its import chain also reaches for ``ultralytics.utils.checks.check_requirements`` (an auto-installer
used only by export and font code). Rather than install ultralytics for that, a stub stands in for
it in ``sys.modules`` while the reference imports, and is removed again afterwards. The import also
changes process-wide state (print options, ``OMP_NUM_THREADS``, OpenCV threads, warning filters,
matplotlib rc, a config folder under ``~/.config``); ``_reference_import_guard`` undoes or redirects
all of that so the rest of the suite sees no difference.

What is compared, on the same weights and inputs:

* ``yolov5n`` / ``yolov5s`` (the reference's ``models/yolov5{n,s}.yaml``): state_dict keys and
  shapes, strict loading, strides, anchors in stride units, raw head outputs in eval mode and
  ``decode_yolov5`` against the reference ``Detect``'s decoded output.
* ``YOLOv5Loss`` against the reference ``utils.loss.ComputeLoss`` (hyp gains scaled as its
  train.py does), including the gradient with respect to the predictions.
* ``non_max_suppression`` against the reference's, in its single-label mode.

Not compared: the v3.0 layout (``yolov5s-v3``, Focus/BottleneckCSP/SPP). The reference ships no
YAML of that layout (its ``models/hub`` holds yolov3*, p2/p6/p7, fpn/bifpn/panet, ghost and
transformer variants), so there is no exact counterpart to test against.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import vistrain
from vistrain.losses.yolov5 import YOLOv5Loss
from vistrain.ops.boxes import decode_yolov5, non_max_suppression

REFERENCE = "yolov5==7.0.14"
SKIP_REASON = (f"reference package {REFERENCE} (installed with --no-deps beside pandas, seaborn, requests, "
               f"psutil and setuptools<81) is not importable; `make test` installs it")
_ENV_KEYS = ("OMP_NUM_THREADS", "NUMEXPR_MAX_THREADS", "TF_CPP_MIN_LOG_LEVEL", "YOLOV5_CONFIG_DIR")
_STUBBED = ("ultralytics", "ultralytics.utils", "ultralytics.utils.checks")


@contextlib.contextmanager
def _reference_import_guard(config_dir: Path):
    """Import the reference with a temporary ultralytics stub and undo its process-wide side effects."""
    import cv2
    import matplotlib

    env = {k: os.environ.get(k) for k in _ENV_KEYS}
    np_opts = np.get_printoptions()
    torch_opts = dict(vars(torch._tensor_str.PRINT_OPTS))  # there is no public getter
    cv2_threads = cv2.getNumThreads()
    stubs = {}
    if "ultralytics.utils.checks" not in sys.modules:
        for name in _STUBBED:
            stub = types.ModuleType(name)
            if sys.modules.setdefault(name, stub) is stub:
                stubs[name] = stub
        sys.modules["ultralytics.utils.checks"].check_requirements = lambda *args, **kwargs: None
    os.environ["YOLOV5_CONFIG_DIR"] = str(config_dir)  # else it makes ~/.config/Ultralytics
    try:
        with warnings.catch_warnings(), matplotlib.rc_context():
            warnings.simplefilter("ignore")  # pkg_resources' deprecation; its own global filters
            yield
    finally:
        for name, stub in stubs.items():
            if sys.modules.get(name) is stub:
                del sys.modules[name]
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        np.set_printoptions(**np_opts)
        torch.set_printoptions(**torch_opts)
        cv2.setNumThreads(cv2_threads)
        if getattr(sys.modules.get("pandas"), "reset_option", None):
            sys.modules["pandas"].reset_option("display.max_columns")


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """The reference's model class, loss, NMS and model folder (skips when it is not installed)."""
    with _reference_import_guard(tmp_path_factory.mktemp("yolov5-config")):
        pytest.importorskip("yolov5", minversion="7.0.14", reason=SKIP_REASON)
        from yolov5.models.yolo import DetectionModel
        from yolov5.utils.general import non_max_suppression as ref_nms
        from yolov5.utils.loss import ComputeLoss
    logging.getLogger("yolov5").setLevel(logging.WARNING)  # its own logger: no model summaries
    root = Path(sys.modules["yolov5.models.yolo"].__file__).parent
    return types.SimpleNamespace(Model=DetectionModel, ComputeLoss=ComputeLoss, nms=ref_nms, models=root)


def _reference_model(ref, name: str, nc: int):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ref.Model(str(ref.models / f"{name}.yaml"), ch=3, nc=nc)


def _randomise_weights(model: torch.nn.Module, seed: int = 1) -> None:
    """He-normal convolutions and non-trivial BatchNorm statistics: with the default initialisation
    the head's output hardly depends on the input (3e-5 between two random images for yolov5s), so
    equal outputs would prove little; after this they differ by ~10 and use every layer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.normal_(0.0, math.sqrt(2.0 / m.weight[0].numel()), generator=g)
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0.0, 0.1, generator=g)
                m.running_mean.normal_(0.0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)


# --- architecture, weights, raw outputs and decoding ----------------------------------------------
@pytest.mark.parametrize("name, depth, width", [("yolov5n", 0.33, 0.25), ("yolov5s", 0.33, 0.50)])
def test_model_matches_reference(ref, name, depth, width):
    torch.manual_seed(0)
    reference = _reference_model(ref, name, nc=80)
    assert (reference.yaml["depth_multiple"], reference.yaml["width_multiple"]) == (depth, width)
    ours = vistrain.build_model(name, num_classes=80)

    theirs, mine = reference.state_dict(), ours.state_dict()
    assert list(mine) == list(theirs)
    assert {k: tuple(v.shape) for k, v in mine.items()} == {k: tuple(v.shape) for k, v in theirs.items()}

    _randomise_weights(reference)
    ours.load_state_dict(reference.state_dict(), strict=True)
    head, ref_head = ours.model[-1], reference.model[-1]
    assert head.stride.tolist() == reference.stride.tolist() == [8.0, 16.0, 32.0]
    assert torch.equal(head.anchors, ref_head.anchors)  # stride units
    assert torch.equal(head.anchors * head.stride.view(-1, 1, 1), torch.tensor(  # pixels, as the YAML
        [[[10, 13], [16, 30], [33, 23]], [[30, 61], [62, 45], [59, 119]], [[116, 90], [156, 198], [373, 326]]],
        dtype=torch.float32))

    reference.eval()
    ours.eval()
    for shape in ((1, 3, 128, 128), (1, 3, 96, 160)):
        x = torch.rand(shape, generator=torch.Generator().manual_seed(sum(shape)))
        with torch.no_grad():
            ref_decoded, ref_raw = reference(x)
            raw = ours(x)
        assert [tuple(r.shape) for r in raw] == [tuple(r.shape) for r in ref_raw]
        assert raw[0].shape == (1, 3, shape[2] // 8, shape[3] // 8, 85)
        for got, expected in zip(raw, ref_raw):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        decoded = decode_yolov5(raw, head.anchors, head.stride)
        torch.testing.assert_close(decoded, ref_decoded, rtol=1e-4, atol=1e-4)


# --- loss -----------------------------------------------------------------------------------------
def _targets(nc: int, batch: int, seed: int) -> torch.Tensor:
    """``Tensor[T, 6]`` (image, class, cx, cy, w, h): random boxes plus edge cases (at the borders,
    too small for any anchor, very wide)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(batch):
        for j in range(6):
            rows.append([b, j % nc, *torch.rand(2, generator=g).tolist(),
                         *(torch.rand(2, generator=g) * 0.5 + 0.02).tolist()])
    rows += [[0, 0, 0.999, 0.999, 0.2, 0.2], [batch - 1, nc - 1, 0.001, 0.5, 0.05, 0.05],
             [batch - 1, 0, 0.5, 0.5, 0.95, 0.02], [0, 0, 0.3, 0.3, 0.001, 0.001]]
    return torch.tensor(rows)


@pytest.mark.parametrize("nc", [3, 1])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_loss_matches_reference(ref, nc, label_smoothing):
    imgsz, batch = 128, 2
    torch.manual_seed(nc)
    reference = _reference_model(ref, "yolov5n", nc=nc).train()
    _randomise_weights(reference, seed=nc)
    nl = reference.model[-1].nl
    # as the reference train.py scales its hyp-file gains (box 0.05, cls 0.5, obj 1.0)
    reference.hyp = {"box": 0.05 * 3 / nl, "cls": 0.5 * nc / 80 * 3 / nl, "obj": 1.0 * (imgsz / 640) ** 2 * 3 / nl,
                     "cls_pw": 1.0, "obj_pw": 1.0, "anchor_t": 4.0, "fl_gamma": 0.0,
                     "label_smoothing": label_smoothing}
    ours = vistrain.build_model("yolov5n", num_classes=nc)
    ours.load_state_dict(reference.state_dict(), strict=True)
    ours.train()

    x = torch.rand(batch, 3, imgsz, imgsz, generator=torch.Generator().manual_seed(7))
    targets = _targets(nc, batch, seed=nc)
    ref_preds, preds = reference(x), ours(x)
    for got, expected in zip(preds, ref_preds):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)

    ref_total, ref_items = ref.ComputeLoss(reference)(ref_preds, targets)
    loss = YOLOv5Loss.from_model(ours, {"label_smoothing": label_smoothing, "imgsz": imgsz})
    total, items = loss(preds, targets)
    torch.testing.assert_close(total.reshape(1), ref_total.reshape(1), rtol=1e-5, atol=0)
    torch.testing.assert_close(items, ref_items.reshape(3), rtol=1e-5, atol=1e-9)  # (box, obj, cls)
    assert (items[2] == 0) == (nc == 1) and bool((items[:2] > 0).all())

    ref_grads = torch.autograd.grad(ref_total.sum(), ref_preds)
    grads = torch.autograd.grad(total, preds)
    scale = max(g.abs().max().item() for g in ref_grads)
    for got, expected in zip(grads, ref_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * scale)


# --- non-max suppression --------------------------------------------------------------------------
def _canonical(det: torch.Tensor) -> torch.Tensor:
    """Rows sorted by score, then class and corners: equal scores do occur (float32 products of
    objectness and class probability), and NMS may list such boxes in either order."""
    keys = det[:, [0, 1, 2, 3, 5, 4]].double().numpy().T  # np.lexsort: the last key sorts first
    return det[torch.from_numpy(np.lexsort(keys).copy())]


@pytest.mark.parametrize("nc", [80, 3])
@pytest.mark.parametrize("conf", [0.25, 0.001])
@pytest.mark.parametrize("agnostic", [False, True])
def test_nms_matches_reference(ref, nc, conf, agnostic):
    """Same boxes, scores and classes as the reference ``non_max_suppression`` (iou 0.45, max_det 300)
    on the same decoded predictions (random logits through ``decode_yolov5`` at 256x256: 4032 boxes
    per image, overlapping within each cell's three anchors and across levels).

    Compared in the reference's default single-label mode (a box keeps only its best class), which is
    what vistrain implements. Legitimate differences, left out here:

    * the reference's ``multi_label=True`` (its val.py uses it at conf 0.001) keeps a box once per
      class above ``conf``; vistrain has no such mode (80 classes, 1 image: the reference's 300
      detections came from only 121 distinct boxes);
    * the reference separates classes by offsetting boxes by class x 7680 px in float32 before one
      ``nms``, which rounds coordinates to 1/64 px for class 24 and can flip a decision at the IoU
      threshold: a pair whose exact IoU is 0.450041 measured 0.449992 after the offset, so the
      reference kept a box that vistrain (``batched_nms``, exact per class) suppresses. The seeds
      here have no pair that close to 0.45;
    * the reference gives up with a warning after ``0.5 + 0.05 * batch`` s, so it is called one image
      at a time on few boxes, far inside that limit.

    Rows are compared in a canonical order because equal scores do occur.
    """
    head = vistrain.build_model("yolov5n", num_classes=nc).model[-1]
    g = torch.Generator().manual_seed(nc + int(conf * 1000))
    raw = [torch.randn(2, 3, s, s, nc + 5, generator=g) * 2 for s in (32, 16, 8)]
    decoded = decode_yolov5(raw, head.anchors, head.stride)
    expected = [ref.nms(d[None].clone(), conf, 0.45, agnostic=agnostic, max_det=300)[0] for d in decoded]
    got = non_max_suppression(decoded.clone(), conf, 0.45, agnostic=agnostic, max_det=300)
    assert len(got) == len(expected) == 2
    for mine, theirs in zip(got, expected):
        assert 0 < len(theirs) <= 300
        assert mine.shape == theirs.shape
        torch.testing.assert_close(_canonical(mine), _canonical(theirs), rtol=1e-5, atol=1e-4)
        assert bool((mine[:, 4] > conf).all())
    if conf < 0.01:
        assert max(len(d) for d in expected) == 300  # max_det is exercised
