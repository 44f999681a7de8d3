import pytest
import torch
from torch import nn

from vistrain.utils.summary import LayerInfo, ModelSummary, summarize

torchvision = pytest.importorskip("torchvision")


@pytest.fixture(scope="module")
def resnet_summary():
    model = torchvision.models.resnet18(num_classes=10)
    return model, summarize(model, imgsz=64)


def test_resnet18_params_and_shapes(resnet_summary):
    model, s = resnet_summary
    assert isinstance(s, ModelSummary)
    n = sum(p.numel() for p in model.parameters())
    assert s.total_params == n == s.trainable_params
    assert s.non_trainable_params == 0
    by_name = {l.name: l for l in s.layers}
    assert [l.name for l in s.layers] == ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2",
                                          "layer3", "layer4", "avgpool", "fc"]
    assert by_name["conv1"].output_shape == (1, 64, 32, 32)
    assert by_name["layer1"].output_shape == (1, 64, 16, 16)
    assert by_name["layer2"].output_shape == (1, 128, 8, 8)
    assert by_name["layer3"].output_shape == (1, 256, 4, 4)
    assert by_name["layer4"].output_shape == (1, 512, 2, 2)
    assert by_name["fc"].output_shape == (1, 10)
    assert by_name["fc"].params == 512 * 10 + 10
    assert by_name["layer1"].type == "Sequential"

    table = s.table()
    assert f"Total params: {n:,}" in table
    assert "," in f"{n:,}"
    assert "[-1, 64, 16, 16]" in table and "[-1, 512, 2, 2]" in table
    assert "Non-trainable params: 0" in table
    for key in ("GFLOPs: ", "Input size (MB): ", "Forward/backward pass size (MB): ",
                "Params size (MB): ", "Estimated Total Size (MB): "):
        assert key in table
    assert str(s) == table


def test_resnet18_memory_and_flops(resnet_summary):
    model, s = resnet_summary
    assert s.input_mb == pytest.approx(3 * 64 * 64 * 4 / 2**20)
    assert s.params_mb == pytest.approx(s.total_params * 4 / 2**20)
    acts = sum(torch.Size(l.output_shape).numel() for l in s.layers)
    assert s.forward_backward_mb == pytest.approx(2 * acts * 4 / 2**20)
    assert s.total_mb == pytest.approx(s.input_mb + s.forward_backward_mb + s.params_mb)
    # resnet18 is ~1.82 GMACs = ~3.64 GFLOPs at 224; at 64 about (64/224)^2 of that
    assert 0.25 < s.gflops < 0.35


def test_conv_gflops_convention():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False))
    s = summarize(model, imgsz=32)
    assert s.gflops == pytest.approx(2 * 8 * 3 * 9 * 32 * 32 / 1e9)
    assert s.layers[0].output_shape == (1, 8, 32, 32)
    assert s.layers[0].params == 8 * 3 * 9


class _Concat(nn.Module):
    def forward(self, xs):
        return torch.cat(xs, 1)


class _LayersModel(nn.Module):
    """Mimics vistrain's YAML models: ``.layers`` with ``i``/``f``/``type`` attrs."""

    def __init__(self):
        super().__init__()
        specs = [(-1, nn.Conv2d(3, 4, 3, 2, 1), "Conv"),
                 (-1, nn.Conv2d(4, 6, 3, 1, 1), "Conv"),
                 ([-1, 0], _Concat(), "Concat")]
        for i, (f, m, t) in enumerate(specs):
            m.i, m.f, m.type = i, f, t
        self.layers = nn.ModuleList(m for _, m, _ in specs)
        self.head = nn.Linear(10, 2)  # not part of .layers -> no row, but counted in totals

    def forward(self, x):
        outs = []
        for m in self.layers:
            if m.f != -1:
                x = [x if j == -1 else outs[j] for j in m.f]
            x = m(x)
            outs.append(x)
        return x


def test_layers_attribute_rows():
    model = _LayersModel()
    s = summarize(model, imgsz=16)
    assert [(l.index, l.type, l.from_) for l in s.layers] == [
        (0, "Conv", "-1"), (1, "Conv", "-1"), (2, "Concat", "[-1, 0]")]
    assert [l.output_shape for l in s.layers] == [(1, 4, 8, 8), (1, 6, 8, 8), (1, 10, 8, 8)]
    assert s.layers[2].params == 0
    assert s.total_params == sum(p.numel() for p in model.parameters())
    lines = s.table().splitlines()
    concat_row = next(line for line in lines if "Concat" in line)
    assert concat_row.split()[:3] == ["2", "[-1,", "0]"]
    assert "[-1, 10, 8, 8]" in concat_row


def test_frozen_and_shared_params():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 1))
    model[0].weight.requires_grad_(False)
    s = summarize(model, imgsz=8)
    assert s.non_trainable_params == 12
    assert s.trainable_params == 4 + 16 + 4
    assert s.total_params == 12 + 4 + 16 + 4
    assert "Non-trainable params: 12" in s.table()

    # a shared module is counted once in the totals
    shared = nn.Conv2d(4, 4, 1)
    m2 = nn.Sequential(nn.Conv2d(3, 4, 1), shared, shared)
    s2 = summarize(m2, imgsz=8)
    assert s2.total_params == 16 + 20
    # named_children() lists the shared module once; it is called twice
    assert [l.params for l in s2.layers] == [16, 20]
    assert s2.layers[1].output_shape == (1, 4, 8, 8)


class _Split(nn.Module):
    def forward(self, x):
        return x[:, :1], x[:, 1:]


class _TupleModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.split = _Split()

    def forward(self, x):
        a, b = self.split(self.conv(x))
        return a + b.sum(1, keepdim=True)


def test_tuple_output_shapes():
    s = summarize(_TupleModel(), imgsz=(12, 10))
    split = s.layers[1]
    assert split.output_shape == [(1, 1, 12, 10), (1, 4, 12, 10)]
    assert "[-1, 1, 12, 10], [-1, 4, 12, 10]" in s.table()
    assert s.input_mb == pytest.approx(3 * 12 * 10 * 4 / 2**20)


def test_modes_restored():
    model = torchvision.models.resnet18(num_classes=10)
    model.train()
    model.bn1.eval()  # mixed modes must be restored per module
    s = summarize(model, imgsz=32)
    assert model.training and model.layer1.training
    assert not model.bn1.training
    assert isinstance(s.layers[0], LayerInfo)

    model.eval()
    summarize(model, imgsz=32)
    assert not any(m.training for m in model.modules())


def test_hooks_removed():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
    summarize(model, imgsz=8)
    assert all(not m._forward_hooks for m in model.modules())
