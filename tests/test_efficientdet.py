"""EfficientDet / EfficientNet models: parameter counts, effdet state_dict compatibility, bit-equal outputs."""

from __future__ import annotations

import pytest
import torch

from vistrain.nn.model import build_model, builtin_models

# published / effdet's and timm's counts (90 COCO classes for the detectors, 1000 for the classifiers)
DET_PARAMS = {"d0": 3_880_067, "d1": 6_625_898, "d2": 8_097_039, "d3": 12_032_296, "d4": 20_723_675,
              "d5": 33_653_315, "d6": 51_871_782, "d7": 51_871_782, "d7x": 77_147_166}
CLS_PARAMS = {"b0": 5_288_548, "b1": 7_794_184, "b2": 9_109_994, "b3": 12_233_232, "b4": 19_341_616,
              "b5": 30_389_784, "b6": 43_040_704, "b7": 66_347_960}


def _count(name: str, nc: int) -> int:
    with torch.device("meta"):  # shapes only: no memory, no init time
        return sum(p.numel() for p in build_model(name, num_classes=nc).parameters())


@pytest.mark.parametrize("scale", list(DET_PARAMS))
def test_efficientdet_parameter_count(scale):
    assert f"efficientdet-{scale}" in builtin_models()
    assert _count(f"efficientdet-{scale}", 90) == DET_PARAMS[scale]


@pytest.mark.parametrize("scale", list(CLS_PARAMS))
def test_efficientnet_parameter_count(scale):
    assert f"efficientnet-{scale}" in builtin_models()
    assert _count(f"efficientnet-{scale}", 1000) == CLS_PARAMS[scale]


def _randomise(sd: dict, gen: torch.Generator) -> dict:
    """BN statistics and affine terms and BiFPN fusion weights away from their initial 0 / 1, so that a wrong
    epsilon, a missed weight or a swapped level shows up in the outputs."""
    out = {}
    for k, v in sd.items():
        if v.is_floating_point() and (k.endswith(("running_var", "edge_weights")) or ".bn" in k and k.endswith("weight")
                                      or k.startswith("backbone.bn") and k.endswith("weight")):
            v = torch.rand(v.shape, generator=gen) + 0.5
        elif v.is_floating_point() and k.endswith(("running_mean", "bias")):
            v = torch.rand(v.shape, generator=gen) - 0.5
        out[k] = v
    return out


@pytest.mark.parametrize("scale", ["d0", "d7"])  # d7: plain-sum fusion, anchor scale 5, the B6 backbone
def test_efficientdet_equals_effdet(scale):
    effdet = pytest.importorskip("effdet")
    cfg = effdet.get_efficientdet_config(f"tf_efficientdet_{scale}")
    cfg.image_size = (128, 128)  # effdet's up-sampling is sized for its configured input
    cfg.num_classes = 5
    torch.manual_seed(0)
    ref = effdet.EfficientDet(cfg, pretrained_backbone=False).eval()
    ours = build_model(f"efficientdet-{scale}", num_classes=5).eval()
    gen = torch.Generator().manual_seed(1)
    sd = _randomise(ref.state_dict(), gen)
    ref.load_state_dict(sd, strict=True)
    assert list(ours.state_dict()) == list(sd)  # same keys, same order
    ours.load_state_dict(sd, strict=True)
    x = torch.rand(2, 3, 128, 128, generator=gen)  # RGB 0..1; ours normalises it inside, effdet's loader outside
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        (rc, rb), (oc, ob) = ref((x - mean) / std), ours(x)
    assert len(oc) == len(rc) == 5
    for a, b in zip(rc + rb, oc + ob):
        assert a.shape == b.shape
        assert torch.equal(a, b), f"max abs diff {(a - b).abs().max().item()}"


def test_efficientdet_head_init_and_any_input_size():
    """Class prior 0.01 on the logits (a fresh model's focal loss starts small); the model is not tied to one
    input size: odd and rectangular inputs give every level, sized as TF 'SAME' padding does."""
    m = build_model("efficientdet-d0", num_classes=3).eval()
    assert torch.allclose(m.class_net.predict.conv_pw.bias, torch.tensor(-4.59512), atol=1e-5)
    with torch.no_grad():
        for h, w in ((128, 96), (100, 100)):
            cls, box = m(torch.zeros(1, 3, h, w))
            sizes = [tuple(t.shape[-2:]) for t in cls]
            expect, (fh, fw) = [], (h, w)
            for _ in range(7):
                fh, fw = -(-fh // 2), -(-fw // 2)
                expect.append((fh, fw))
            assert sizes == expect[2:]
            assert [t.shape[1] for t in cls] == [27] * 5 and [t.shape[1] for t in box] == [36] * 5


def test_timm_classifier_and_efficientnet_keys():
    """``timm:NAME`` builds any timm model as a classifier (nothing downloaded); EfficientNet's keys are timm's,
    and its feature part has exactly EfficientDet's backbone keys."""
    timm = pytest.importorskip("timm")
    m = build_model("timm:resnet18", num_classes=4)
    assert m.task == "classify" and m(torch.zeros(1, 3, 64, 64)).shape == (1, 4)
    assert list(m.state_dict()) == list(timm.create_model("resnet18", num_classes=4).state_dict())
    cls = build_model("efficientnet-b0", num_classes=4)
    det = build_model("efficientdet-d0", num_classes=4)
    backbone = {k[len("backbone."):] for k in det.state_dict() if k.startswith("backbone.")}
    assert backbone <= set(cls.state_dict())
    from vistrain.nn.parser import ModelYAMLError

    with pytest.raises(ModelYAMLError, match="did you mean timm:resnet18"):
        build_model("timm:resnet18x")
    with pytest.raises(FileNotFoundError, match="efficientdet-d0"):
        build_model("efficientdet-d9")


def test_classifier_weights_fill_the_detector_backbone():
    """``pretrained=`` an EfficientNet classifier (timm's keys) initialises EfficientDet's backbone."""
    from vistrain.engine.checkpoint import transfer_weights

    cls = build_model("efficientnet-b0", num_classes=10)
    det = build_model("efficientdet-d0", num_classes=3)
    copied, total = transfer_weights(det, cls.state_dict())
    backbone = [k for k in det.state_dict() if k.startswith("backbone.")]
    assert copied == len(backbone) and total == len(det.state_dict())
    for k in backbone:
        assert torch.equal(det.state_dict()[k], cls.state_dict()[k[len("backbone."):]])


def test_effdet_weight_file_loads_as_pretrained(tmp_path):
    """An effdet weight file (a plain state_dict, as its releases are) initialises every tensor."""
    effdet = pytest.importorskip("effdet")
    from vistrain.engine.checkpoint import load_pretrained

    cfg = effdet.get_efficientdet_config("tf_efficientdet_d0")
    ref = effdet.EfficientDet(cfg, pretrained_backbone=False)
    torch.save(ref.state_dict(), tmp_path / "tf_efficientdet_d0.pth")
    ours = build_model("efficientdet-d0", num_classes=90)
    copied, total = load_pretrained(ours, tmp_path / "tf_efficientdet_d0.pth")
    assert copied == total == len(ref.state_dict())
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in ours.state_dict().items())
