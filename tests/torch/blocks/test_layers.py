"""`linear` (the three linear-layer spellings as affine maps) and `roles` (what a module is in a block)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from torch import nn  # noqa: E402
from transformers.activations import ACT2CLS  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

from lc_onnx.torch.blocks import linear  # noqa: E402
from lc_onnx.torch.blocks.roles import Role, role  # noqa: E402


def _conv1d() -> nn.Module:
    layer = Conv1D(6, 4)  # nf=6 out, nx=4 in: weight stored [4, 6]
    nn.init.normal_(layer.bias)
    return layer


@pytest.mark.parametrize(
    ("build", "x", "axis"),
    [
        (lambda: nn.Linear(4, 6), torch.randn(2, 3, 4), linear.Axis.LAST),
        (lambda: nn.Linear(4, 6, bias=False), torch.randn(2, 4), linear.Axis.LAST),
        (_conv1d, torch.randn(2, 3, 4), linear.Axis.LAST),
        (lambda: nn.Conv2d(4, 6, 1), torch.randn(2, 4, 5, 5), linear.Axis.CHANNEL),
    ],
    ids=["linear", "linear-no-bias", "conv1d", "conv2d-1x1"],
)
def test_affine_reads_w_x_plus_b_and_like_writes_the_same_kind(build, x, axis):
    layer = build()
    w, b = linear.affine(layer)
    assert (w.dtype, w.shape, linear.features(layer), linear.axis(layer)) == (
        torch.float64,
        (6, 4),
        (4, 6),
        axis,
    )
    moved = x.movedim(1, -1) if axis is linear.Axis.CHANNEL else x
    expected = moved.double() @ w.T + (0 if b is None else b)
    with torch.no_grad():
        got = layer(x).double()
        copy = linear.like(layer, w, b)
        assert type(copy) is type(layer) and (copy.bias is None) == (layer.bias is None)
        assert torch.allclose(copy(x), layer(x), rtol=0, atol=1e-6)
    assert torch.allclose(got.movedim(1, -1) if axis is linear.Axis.CHANNEL else got, expected, atol=1e-6)


@pytest.mark.parametrize(
    "layer",
    [
        nn.Conv2d(4, 6, 3),
        nn.Conv2d(4, 6, 1, stride=2),
        nn.Conv2d(4, 8, 1, groups=2),
        nn.Conv2d(4, 6, 1, padding=1),
        nn.Conv1d(4, 6, 1),
        nn.Embedding(4, 6),
    ],
    ids=["3x3", "strided", "grouped", "padded", "conv1d-torch", "embedding"],
)
def test_other_layers_are_not_linear_layers(layer):
    assert not linear.is_linear(layer)
    assert role(layer) is Role.OTHER


@pytest.mark.parametrize("name", sorted(set(ACT2CLS) - {"xielu"}))
def test_every_parameter_free_transformers_activation_is_an_activation(name):
    from transformers.activations import ACT2FN

    assert role(ACT2FN[name]) is Role.ACTIVATION


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        (nn.GELU(), Role.ACTIVATION),
        (nn.PReLU(), Role.ACTIVATION),
        (nn.LeakyReLU(0.1), Role.ACTIVATION),
        (nn.Identity(), Role.PASS_THROUGH),
        (nn.Dropout(0.1), Role.PASS_THROUGH),
        (nn.BatchNorm1d(4), Role.BATCH_NORM),
        (nn.BatchNorm1d(4, track_running_stats=False), Role.NORM),
        (nn.LayerNorm(4), Role.NORM),
        (nn.LayerNorm(4, elementwise_affine=False), Role.NORM),
        (nn.GroupNorm(2, 4), Role.NORM),
        (nn.Linear(4, 4), Role.LINEAR),
        (nn.Sequential(nn.GELU()), Role.OTHER),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else v.name,
)
def test_roles(module, expected):
    assert role(module) is expected


def test_xielu_has_parameters_and_is_no_activation():
    from transformers.activations import ACT2FN

    assert role(ACT2FN["xielu"]) is Role.OTHER
