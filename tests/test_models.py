"""Every built-in model YAML builds and runs; published parameter counts; torchvision equality."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torchvision

import vistrain.nn.model

from vistrain import build_model
from vistrain.nn.model import builtin_models, load_model_yaml
from vistrain.nn.parser import ModelYAMLError

ALL = builtin_models()


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_builtin_list_complete():
    for name in ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "yolov5-backbone-cls",
                 "yolov5n-cls", "yolov5s-cls", "yolov5m-cls", "yolov5l-cls", "yolov5x-cls"]:
        assert name in ALL


# ultralytics' YOLOv8 classifiers at 1000 classes (its model summary)
YOLOV8_CLS_PARAMS = {"n": 2_719_288, "s": 6_361_736, "m": 17_053_336, "l": 37_480_744, "x": 57_422_840}


@pytest.mark.parametrize("scale", list(YOLOV8_CLS_PARAMS))
def test_yolov8_classifier_parameter_counts(scale):
    with torch.device("meta"):  # (counts only: no memory, no init time)
        model = build_model(f"yolov8{scale}-cls", num_classes=1000)
    assert n_params(model) == YOLOV8_CLS_PARAMS[scale]


def shapes(out):
    """Nested shapes of a model output: a tensor's shape, or a list of the shapes of a list / tuple."""
    return tuple(out.shape) if isinstance(out, torch.Tensor) else [shapes(o) for o in out]


def tensors(out) -> list[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else [t for o in out for t in tensors(o)]


@pytest.mark.parametrize("name", ALL)
def test_every_model_builds_and_runs(name):
    imgsz = 64
    model = build_model(name, num_classes=3, imgsz=imgsz).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, imgsz, imgsz))
    if model.task == "classify":
        expected = (2, 3)
    elif name.startswith("efficientdet"):  # class and box nets, 9 anchors per cell, P3-P7 (P8 for D7x)
        sizes = [math.ceil(imgsz / 2 ** lvl) for lvl in range(3, 9 if name.endswith("x") else 8)]
        expected = [[(2, 9 * k, s, s) for s in sizes] for k in (3, 4)]
    elif name.startswith("yolov5"):  # anchor-based detect: [B, anchors, H, W, 5 + nc] per stride 8 / 16 / 32
        expected = [(2, 3, imgsz // s, imgsz // s, 8) for s in (8, 16, 32)]
    else:  # anchor-free: [B, 4 * 16 + nc, H, W] per level; segment adds coefficients and prototypes
        expected = [(2, 64 + 3, imgsz // s, imgsz // s) for s in (8, 16, 32)]
        if model.task == "segment":
            expected = [expected, (2, 32, sum((imgsz // s) ** 2 for s in (8, 16, 32))), (2, 32, 16, 16)]
    assert shapes(out) == expected
    assert all(torch.isfinite(t).all() for t in tensors(out))
    model.train()
    assert shapes(model(torch.rand(2, 3, imgsz, imgsz))) == expected  # same return type in train mode


@pytest.mark.parametrize("depth,count", [(18, 11_689_512), (34, 21_797_672), (50, 25_557_032),
                                         (101, 44_549_160), (152, 60_192_808)])
def test_resnet_param_counts_and_torchvision_keys(depth, count):
    ours = build_model(f"resnet{depth}", num_classes=1000)
    ref = getattr(torchvision.models, f"resnet{depth}")()
    assert n_params(ours) == count == n_params(ref)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


@pytest.mark.parametrize("depth", [18, 50])
def test_resnet_loads_torchvision_weights_same_logits(depth):
    torch.manual_seed(0)
    ref = getattr(torchvision.models, f"resnet{depth}")().eval()
    ours = build_model(f"resnet{depth}", num_classes=1000).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max() < 1e-4


def test_tutorial_backbone_classifier():
    model = build_model("yolov5-backbone-cls", num_classes=4, imgsz=224)
    assert n_params(model) == 21_729_592
    shapes = []
    hooks = [m.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape))) for m in model.layers]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, 224, 224))
    for h in hooks:
        h.remove()
    assert shapes[0] == (1, 64, 113, 113)
    assert shapes[8] == (1, 1024, 8, 8) and shapes[9] == (1, 1024, 8, 8)
    assert shapes[-1] == (1, 4)
    # the flattened size follows imgsz at build time
    small = build_model("yolov5-backbone-cls", num_classes=4, imgsz=96)
    assert small.layers[11].in_features == 1024 * 4 * 4  # 96 -> 49 -> 25 -> 13 -> 7 -> 4


@pytest.mark.parametrize("scale,approx", [("n", 2.5e6), ("s", 5.4e6), ("m", 12.9e6), ("l", 26.5e6), ("x", 48.1e6)])
def test_yolov5_cls_scales_match_published_sizes(scale, approx):
    # yolov5 v7.0 README: yolov5{n,s,m,l,x}-cls have 2.5M / 5.4M / 12.9M / 26.5M / 48.1M params (1000 classes)
    assert abs(n_params(build_model(f"yolov5{scale}-cls", num_classes=1000)) - approx) < 0.06e6


@pytest.mark.parametrize("name,count", [("yolov5n", 1_872_157), ("yolov5s", 7_235_389), ("yolov5m", 21_190_557),
                                        ("yolov5l", 46_563_709), ("yolov5x", 86_749_405)])
def test_yolov5_detect_param_counts(name, count):
    # the reference yolov5 v7.0 models at 80 classes
    model = build_model(name, num_classes=80)
    assert n_params(model) == count
    head = model.layers[-1]
    assert head.stride.tolist() == [8.0, 16.0, 32.0]
    # anchors kept per level, in stride units: P3 anchors (10,13) / 8
    assert torch.allclose(head.anchors[0, 0], torch.tensor([10 / 8, 13 / 8]))
    assert torch.allclose(head.anchors[2, 2] * 32, torch.tensor([373.0, 326.0]))


@pytest.mark.parametrize("name,count", [("yolov8n", 3_157_200), ("yolov8s", 11_166_560), ("yolov8n-seg", 3_409_968),
                                        ("yolov8s-seg", 11_821_056), ("yolov8m-seg", 27_285_968)])
def test_yolov8_param_counts_strides_and_bias_prior(name, count):
    model = build_model(name, num_classes=80)
    assert n_params(model) == count
    head = model.layers[-1]
    assert head.stride.tolist() == [8.0, 16.0, 32.0] and head.reg_max == 16
    assert model.task == ("segment" if name.endswith("-seg") else "detect")
    assert torch.all(head.cv2[0][-1].bias == 2.0)
    assert torch.allclose(head.cv3[2][-1].bias, torch.full((80,), math.log(5 / 80 / (640 / 32) ** 2)))
    assert not head.dfl.conv.weight.requires_grad  # the DFL bins are fixed
    x = torch.rand(1, 3, 64, 96)
    out = model.eval()(x)
    levels = out[0] if isinstance(out, tuple) else out
    assert [tuple(p.shape) for p in levels] == [(1, 144, 8, 12), (1, 144, 4, 6), (1, 144, 2, 3)]
    if name.endswith("-seg"):
        assert out[1].shape == (1, 32, 96 + 24 + 6) and out[2].shape == (1, 32, 16, 24)


def test_yolov5_v3_layout_matches_tutorial_table():
    assert n_params(build_model("yolov5x-v3", num_classes=1)) == 88_433_654
    model = build_model("yolov5s-v3", num_classes=1)
    assert [m.type for m in model.layers][:3] == ["Focus", "Conv", "BottleneckCSP"]
    assert model.layers[8].type == "SPP"


def test_detect_bias_prior_and_user_anchors(tmp_path):
    import math

    import yaml

    model = build_model("yolov5n", num_classes=2)
    bias = model.layers[-1].m[0].bias.view(3, -1)  # stride 8 level
    assert torch.allclose(bias[:, 4], torch.full((3,), math.log(8 / (640 / 8) ** 2)), atol=0.2)
    d = yaml.safe_load((Path(vistrain.nn.model.MODELS_DIR) / "yolov5.yaml").read_text())
    d["anchors"] = [[5, 6, 8, 14, 15, 11], [20, 30, 40, 25, 35, 70], [80, 60, 120, 150, 300, 250]]
    p = tmp_path / "custom.yaml"
    p.write_text(yaml.safe_dump(d))
    custom = build_model(str(p), num_classes=2)
    assert torch.allclose(custom.layers[-1].anchors[0, 0] * 8, torch.tensor([5.0, 6.0]))


def test_scaled_name_resolves_scale():
    assert load_model_yaml("yolov5s-cls")["scale"] == "s"
    assert load_model_yaml("yolov5x-cls")["scale"] == "x"


def test_user_yaml_and_errors(tmp_path):
    y = tmp_path / "tiny.yaml"
    y.write_text("nc: 2\nbackbone:\n  - [-1, 1, Conv, [8, 3, 2]]\n  - [-1, 2, C3, [8]]\nhead:\n"
                 "  - [-1, 1, Classify, [nc]]\n")
    m = build_model(str(y))
    assert m(torch.rand(1, 3, 32, 32)).shape == (1, 2)
    bad = tmp_path / "bad.yaml"
    bad.write_text("nc: 2\nbackbone:\n  - [-1, 1, Cnov, [8, 3, 2]]\nhead:\n  - [-1, 1, Classify, [nc]]\n")
    with pytest.raises(ModelYAMLError, match="did you mean 'Conv'"):
        build_model(str(bad))
    with pytest.raises(FileNotFoundError, match="resnet50"):
        build_model("resnet05")


def test_activation_is_a_constructor_argument(tmp_path):
    y = tmp_path / "relu.yaml"
    y.write_text("nc: 2\nact: relu\nbackbone:\n  - [-1, 1, Conv, [8, 3, 2]]\nhead:\n  - [-1, 1, Classify, [nc]]\n")
    relu_model = build_model(str(y))
    silu_model = build_model("yolov5n-cls", num_classes=2)
    assert isinstance(relu_model.layers[0].act, torch.nn.ReLU)
    assert isinstance(silu_model.layers[0].act, torch.nn.SiLU)  # building one did not change the other


@pytest.mark.parametrize("name", ["yolov8n-seg", "yolov5s", "yolov5n-cls", "resnet18", "efficientnet-b0",
                                  "efficientdet-d0"])
def test_fuse_conv_bn_same_outputs(name):
    from vistrain.nn.model import fuse_conv_bn

    torch.manual_seed(0)
    model = build_model(name, num_classes=3)
    model.train()
    with torch.no_grad():  # non-trivial running statistics
        for _ in range(3):
            model(torch.rand(2, 3, 64, 64))
    model.eval()
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        ref = tensors(model(x))
        fused = fuse_conv_bn(model)
        got = tensors(fused(x))
    left = sum(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    # EfficientDet's class / box nets keep one BatchNorm per level after convolutions shared across the levels
    assert left == (2 * 3 * 5 if name.startswith("efficientdet") else 0)
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="eval"):
        fuse_conv_bn(build_model(name, num_classes=3))


@pytest.mark.parametrize("name", ["resnet18", "yolov5n", "yolov8n-seg"])
def test_channels_last_same_outputs_and_gradients(name):
    """NHWC weights (channels_last=true) change the kernels, not the function: outputs in eval and train
    mode and the gradients equal the NCHW model's to rounding."""
    import copy

    from vistrain.nn.model import set_memory_format

    torch.manual_seed(0)
    model = build_model(name, num_classes=3)
    nhwc = set_memory_format(copy.deepcopy(model), True)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in nhwc.parameters() if p.ndim == 4)
    x = torch.rand(2, 3, 64, 96)
    for train in (True, False):
        model.train(train), nhwc.train(train)
        ref, got = tensors(model(x)), tensors(nhwc(x))
        for a, b in zip(ref, got):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        if train:
            sum(t.float().square().mean() for t in ref).backward()
            sum(t.float().square().mean() for t in got).backward()
            for (n, p), q in zip(model.named_parameters(), nhwc.parameters()):  # summation order differs:
                if p.grad is not None:  # each gradient equal to 1e-3 of its norm (measured ~1e-4)
                    assert float((q.grad - p.grad).norm()) <= 1e-3 * float(p.grad.norm()) + 1e-9, n
    assert all(p.is_contiguous() for p in set_memory_format(nhwc, False).parameters())
