"""YOLOv8 detect / segment / classify against ultralytics (a test oracle only: vistrain never imports it).

ultralytics builds its own model from its own YAML of the same name, offline (``YOLO_OFFLINE=1``,
random init, its settings folder in a temp dir).  Its state_dict is loaded into vistrain's model with
``strict=True``, and then the two must agree on:

* the raw head outputs (box distribution logits, class logits; for segment also the mask
  coefficients and the prototypes), in train mode (batch statistics) and eval mode;
* the decoded boxes and class probabilities (``decode_dfl`` vs ultralytics' Detect in eval mode);
* NMS (``non_max_suppression`` vs ``ultralytics.utils.nms.non_max_suppression``, single-label).
"""

from __future__ import annotations

import types

import pytest
import torch

import vistrain
from vistrain.ops.boxes import decode_dfl, flatten_levels, non_max_suppression

MODELS = ["yolov8n", "yolov8s", "yolov8n-seg", "yolov8s-seg"]


@pytest.fixture(scope="module")
def ul(ultralytics_home):
    """ultralytics' model classes and NMS (imported offline by the ``ultralytics_home`` fixture)."""
    from ultralytics.nn.tasks import DetectionModel, SegmentationModel
    from ultralytics.utils.nms import non_max_suppression as ul_nms
    from ultralytics.utils.ops import process_mask

    def build(name: str, nc: int):
        cls = SegmentationModel if name.endswith("-seg") else DetectionModel
        return cls(f"{name}.yaml", nc=nc, verbose=False)

    return types.SimpleNamespace(build=build, nms=ul_nms, process_mask=process_mask)


def _pair(ul, name: str, nc: int = 80):
    theirs = ul.build(name, nc)
    ours = vistrain.build_model(name, num_classes=nc)
    return theirs, ours


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_keys_and_shapes_equal_and_load_strictly(ul, name):
    theirs, ours = _pair(ul, name)
    a = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert a == b
    ours.load_state_dict(theirs.state_dict(), strict=True)
    n_theirs = sum(p.numel() for p in theirs.parameters())
    assert sum(p.numel() for p in ours.parameters()) == n_theirs


@pytest.mark.parametrize("name", ["yolov8n", "yolov8n-seg"])
def test_same_seed_same_initial_weights(ul, name):
    """A training seed gives the model ultralytics' trainer starts from with that seed, tensor for tensor (both
    seed torch, then build the modules in the same order): the two sides of bench/segment.py start each seed
    from the same weights, and a seed's runs differ only in the training code and its data draws."""
    from ultralytics.utils import RANK
    from ultralytics.utils.torch_utils import init_seeds as ul_init_seeds

    from vistrain.engine.utils import init_seeds

    for seed in (0, 7):
        ul_init_seeds(seed + 1 + RANK)  # as its BaseTrainer seeds (RANK -1 outside DDP)
        theirs = ul.build(name, 6).state_dict()
        init_seeds(seed)
        ours = vistrain.build_model(name, num_classes=6).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not torch.equal(ours["model.0.conv.weight"], _pair(ul, name, 6)[1].state_dict()["model.0.conv.weight"])


@pytest.mark.parametrize("name", ["yolov8n", "yolov8n-seg", "yolov8s", "yolov8s-seg"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_raw_outputs_equal(ul, name, mode):
    torch.manual_seed(0)
    theirs, ours = _pair(ul, name, nc=7)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.train(mode == "train")
    ours.train(mode == "train")
    x = torch.rand(2, 3, 96, 160)  # not square: rows and columns must not be swapped anywhere
    with torch.no_grad():
        t = theirs(x)
        o = ours(x)
    raw = t if mode == "train" else t[1]
    levels, coef, proto = o if name.endswith("-seg") else (o, None, None)
    assert [tuple(p.shape[2:]) for p in levels] == [(12, 20), (6, 10), (3, 5)]
    ref = torch.cat((raw["boxes"], raw["scores"]), 1).transpose(1, 2)
    torch.testing.assert_close(flatten_levels(levels), ref, rtol=1e-4, atol=1e-4)
    if coef is not None:
        torch.testing.assert_close(coef, raw["mask_coefficient"], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(proto, raw["proto"], rtol=1e-4, atol=1e-4)
        assert proto.shape[-2:] == (24, 40)


@pytest.mark.parametrize("name", ["yolov8n", "yolov8n-seg"])
def test_decoded_outputs_equal(ul, name):
    torch.manual_seed(1)
    theirs, ours = _pair(ul, name, nc=5)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.eval()
    ours.eval()
    x = torch.rand(1, 3, 128, 96)
    with torch.no_grad():
        t = theirs(x)
        o = ours(x)
    ref = (t[0][0] if name.endswith("-seg") else t[0]).transpose(1, 2)  # [B, N, 4 + nc (+ nm)]
    levels = o[0] if name.endswith("-seg") else o
    got = decode_dfl(levels, ours.model[-1].stride, ours.model[-1].reg_max)
    torch.testing.assert_close(got, ref[..., :4 + 5], rtol=1e-4, atol=1e-3)
    if name.endswith("-seg"):
        torch.testing.assert_close(o[1].transpose(1, 2), ref[..., 9:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("agnostic", [False, True])
def test_nms_equals_ultralytics(ul, agnostic):
    """Random boxes in a 320 px image with 4 classes and 3 extra columns (as mask coefficients)."""
    g = torch.Generator().manual_seed(3)
    n, nc, nm = 3000, 4, 3
    xy = torch.rand(2, n, 2, generator=g) * 320
    wh = torch.rand(2, n, 2, generator=g) * 60 + 4
    scores = (torch.randperm(2 * n * nc, generator=g).view(2, n, nc) / (2 * n * nc)) ** 3  # no ties to order
    extra = torch.randn(2, n, nm, generator=g)
    decoded = torch.cat((xy, wh, scores, extra), -1)
    ref = ul.nms(decoded.transpose(1, 2).clone(), 0.25, 0.45, agnostic=agnostic, max_det=300, nc=nc,
                max_time_img=1e9)
    got = non_max_suppression(decoded.clone(), 0.25, 0.45, agnostic=agnostic, max_det=300, objectness=False, nc=nc)
    for r, o in zip(ref, got):
        assert len(o) > 20 and o.shape == r.shape
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-4)


def test_boxes_and_masks_after_postprocessing_equal(ul):
    """The whole path: same weights -> same NMS boxes and the same masks at the input size."""
    from vistrain.ops.masks import masks_from_protos
    from vistrain.tasks.segment import SegmentTask

    torch.manual_seed(4)
    theirs, ours = _pair(ul, "yolov8n-seg", nc=3)
    with torch.no_grad():  # shift the class logits so that some dozens of boxes pass conf 0.25
        for conv in ours.model[-1].cv3:
            conv[-1].bias.fill_(1.0)
    theirs.load_state_dict(ours.state_dict(), strict=True)  # the keys are the same both ways
    theirs.eval()
    ours.eval()
    x = torch.rand(1, 3, 128, 160)
    with torch.no_grad():
        (y, proto), _ = theirs(x)
        ref = ul.nms(y.clone(), 0.25, 0.7, nc=3, max_det=300, max_time_img=1e9)[0]
        ref_masks = ul.process_mask(proto[0], ref[:, 6:], ref[:, :4], (128, 160), upsample=True)
        task = SegmentTask()
        task.setup_model(ours, None, {"box": None, "cls": 0.5, "dfl": 1.5, "overlap_mask": True, "model": "m"},
                         train=False)
        preds = ours(x)
        det = task.postprocess(preds, {"conf": 0.25, "iou": 0.7, "max_det": 300, "classes": None,
                                       "agnostic": False})[0]
        masks = masks_from_protos(det[:, 6:], preds[2][0], det[:, :4], (128, 160))
    assert len(det) >= 5 and det.shape == ref.shape
    torch.testing.assert_close(det, ref, rtol=1e-4, atol=1e-3)
    assert masks.shape == ref_masks.shape and masks.any()
    # the mask step on the same detections and prototypes: exactly ultralytics' masks
    same_input = masks_from_protos(ref[:, 6:], proto[0], ref[:, :4], (128, 160))
    assert torch.equal(same_input, ref_masks.bool())
    # end to end: box corners differ by float rounding (< 1e-3 px), which can move a pixel across a box edge
    mismatch = (masks != ref_masks.bool()).float().mean()
    assert mismatch < 5e-3, mismatch


@pytest.mark.parametrize("warmup_epochs, epochs, nb", [(3.0, 24, 25), (3.0, 10, 25), (3.0, 3, 25), (3.0, 1, 25),
                                                       (0.5, 2, 7), (0.0, 10, 25), (3.0, 100, 500), (2.7, 5, 13)])
def test_warmup_iterations_equal_ultralytics(ultralytics_home, warmup_epochs, epochs, nb):
    """The trainer's warmup length is ultralytics' (8.4: warmup_epochs of batches, never the final epoch; no
    100-batch floor, which made the bench's 24-epoch runs warm up for 4 epochs instead of 3)."""
    from ultralytics.engine.trainer import BaseTrainer

    from vistrain.engine.trainer import warmup_iterations

    peer = types.SimpleNamespace(args=types.SimpleNamespace(warmup_epochs=warmup_epochs), epochs=epochs)
    assert warmup_iterations(warmup_epochs, epochs, nb) == BaseTrainer._get_warmup_iterations(peer, nb)


@pytest.mark.parametrize("name", ["yolov8n-cls", "yolov8s-cls"])
def test_classifier_equals_ultralytics(ultralytics_home, name):
    """yolov8n-cls ...: the same state_dict keys and shapes (ultralytics' loads strictly), the same logits in train
    mode and, in eval mode, ultralytics' softmax of them (its Classify head returns probabilities there)."""
    from ultralytics.nn.tasks import ClassificationModel

    theirs = ClassificationModel(f"{name}.yaml", nc=10, verbose=False)
    ours = vistrain.build_model(name, num_classes=10)
    assert {k: tuple(v.shape) for k, v in theirs.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    ours.load_state_dict(theirs.state_dict(), strict=True)
    torch.manual_seed(0)
    x = torch.rand(4, 3, 64, 64)
    theirs.train(), ours.train()
    assert torch.allclose(ours(x), theirs(x), atol=1e-5)
    theirs.eval(), ours.eval()
    with torch.no_grad():
        probs = theirs(x)
        probs = probs[0] if isinstance(probs, (tuple, list)) else probs
        assert torch.allclose(ours(x).softmax(1), probs, atol=1e-6)
