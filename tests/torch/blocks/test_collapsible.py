from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from timm.layers import LayerNorm, Mlp, SwiGLU  # noqa: E402
from torch import nn  # noqa: E402

from lc_onnx.torch import collapse, collapse_penalty, find_blocks, make_collapsible, slopes  # noqa: E402
from lc_onnx.torch.blocks import collapsible  # noqa: E402
from tests.torch import nets  # noqa: E402

MIXER_ALL = [f"blocks.{i}.{kind}.act" for i in range(3) for kind in ("mlp_tokens", "mlp_channels")]


def prelu_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.PReLU)]


@pytest.mark.parametrize(
    ("build", "fraction", "expected"),
    [
        (nets.vit, 1.0, [f"blocks.{i}.mlp.act" for i in range(4)]),
        (nets.vit, 0.5, ["blocks.2.mlp.act", "blocks.3.mlp.act"]),
        (nets.vit, 0.3, ["blocks.2.mlp.act", "blocks.3.mlp.act"]),  # ceil(0.3 * 4) = 2
        (nets.vit, 0.0, []),
        (nets.deit, 0.25, ["blocks.3.mlp.act"]),
        (nets.mixer, 1.0, MIXER_ALL),
        (nets.mixer, 0.5, MIXER_ALL[3:]),
        (nets.vgg, 1.0, ["classifier.1", "classifier.5"]),
        (nets.vgg, 0.5, ["classifier.5"]),
    ],
)
def test_make_collapsible_replaces_exactly_the_last_blocks(build, fraction, expected):
    model = build()
    acts_before = {name: type(m) for name, m in model.named_modules()}
    assert make_collapsible(model, fraction=fraction) == expected
    assert prelu_names(model) == expected
    for name, module in model.named_modules():
        if name not in expected:
            assert type(module) is acts_before[name], name


def test_mixer_finds_token_and_channel_mlps():
    blocks = find_blocks(nets.mixer())
    assert [b.name for b in blocks] == MIXER_ALL
    # token MLP mixes the 16 patches, channel MLP the 32 channels
    assert [(b.module("fc1").in_features, b.module("fc2").out_features) for b in blocks[:2]] == [
        (16, 16),
        (32, 32),
    ]


@pytest.mark.parametrize(
    ("init", "act", "expected"),
    [(None, nn.GELU(), 0.01), (None, nn.LeakyReLU(0.2), 0.2), (0.5, nn.GELU(), 0.5), (1.0, nn.ReLU(), 1.0)],
)
def test_initial_slope(init, act, expected):
    model = nn.Sequential(nn.Linear(4, 8), act, nn.Linear(8, 2))
    make_collapsible(model, init=init)
    assert model[1].weight.tolist() == pytest.approx([expected])


def test_per_channel_prelu_has_one_slope_per_hidden_unit():
    model = nets.vgg()
    make_collapsible(model, per_channel=True)
    assert [model.classifier[i].weight.shape[0] for i in (1, 5)] == [24, 40]


def test_existing_prelu_is_counted_but_not_returned():
    model = nn.Sequential(nn.Linear(4, 8), nn.PReLU(), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 2))
    assert make_collapsible(model) == ["3"]
    assert prelu_names(model) == ["1", "3"]


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (lambda: _vit_with(SwiGLU), "gated"),
        (lambda: Mlp(8, 16, norm_layer=LayerNorm), "timm-mlp-layernorm"),
        (
            lambda: nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 2)),
            "seq-layernorm",
        ),
        (lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.ReLU(), nn.Linear(8, 2)), "two acts"),
        (lambda: nn.Sequential(nn.Linear(4, 8), nn.Dropout(), nn.Linear(8, 2)), "no act"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_non_collapsible_structures_are_not_blocks(build, reason):
    model = build()
    assert find_blocks(model) == []
    assert make_collapsible(model) == []
    assert prelu_names(model) == []


def test_timm_conv_mlp_is_a_block_and_collapses_into_a_1x1_conv():
    """`Mlp(use_conv=True)` (PoolFormer's MLP) is fc1/fc2 as 1x1 convolutions: a block since 1x1 convs
    count as linear layers; it collapses into one 1x1 conv."""
    torch.manual_seed(0)
    model = nets.randomise(Mlp(8, 16, use_conv=True))
    assert [b.name for b in find_blocks(model)] == ["act"]
    assert make_collapsible(model, init=1.0) == ["act"]
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        before = model(x)
        assert collapse(model) == ["fc1"]
        after = model(x)
    assert (type(model.fc1), model.fc1.weight.shape) == (nn.Conv2d, (8, 8, 1, 1))
    assert _rel_l2(after, before) <= 1e-6


def _vit_with(mlp_layer):
    return nets.tiny(depth=2, mlp_layer=mlp_layer, num_classes=1000)


def test_fraction_out_of_range_is_refused():
    with pytest.raises(ValueError, match="fraction must be in"):
        make_collapsible(nets.vit(), fraction=1.5)


@pytest.mark.parametrize("build", [nets.vit, nets.mixer, nets.vgg])
def test_collapse_penalty_matches_independent_computation(build):
    model = build()
    names = make_collapsible(model, per_channel=build is nets.vgg)
    gen = torch.Generator().manual_seed(3)
    expected = 0.0
    with torch.no_grad():
        for name in names:
            weight = model.get_submodule(name).weight
            weight.copy_(torch.rand(weight.shape, generator=gen) * 2)
            expected += sum((1 - w) ** 2 for w in weight.tolist()) / weight.numel()
    penalty = collapse_penalty(model)
    assert penalty.dim() == 0
    assert penalty.item() == pytest.approx(expected, rel=1e-6)
    penalty.backward()
    for name in names:
        weight = model.get_submodule(name).weight
        assert weight.grad.tolist() == pytest.approx(
            (-2 * (1 - weight.detach()) / weight.numel()).tolist(), rel=1e-5
        )
    assert set(slopes(model)) == set(names)


def test_collapse_penalty_is_zero_without_prelu():
    penalty = collapse_penalty(nets.vit())
    assert penalty.dim() == 0 and penalty.item() == 0.0


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _removed_params(model: nn.Module, act_names: list[str]) -> int:
    """Parameters that collapsing these blocks removes, counted from the modules (not from `collapse`):
    every slot's parameters, minus one `in x out` Linear per chain of blocks sharing a Linear."""
    blocks = [b for b in find_blocks(model) if b.name in act_names]
    slots = {(id(b.parent), key): b.module(key) for b in blocks for key in b.keys}
    removed = sum(_params(m) for m in slots.values())
    chain_in = None
    for i, block in enumerate(blocks):
        chain_in = chain_in or block.module(block.keys[0]).in_features
        nxt = blocks[i + 1] if i + 1 < len(blocks) else None
        if nxt is not None and nxt.parent is block.parent and nxt.keys[0] == block.keys[-1]:
            continue
        out = block.module(block.keys[-1]).out_features
        removed -= chain_in * out + out
        chain_in = None
    return removed


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(
    ("build", "fraction", "expected_linears"),
    [
        (nets.vit, 0.5, ["blocks.3.mlp.fc1", "blocks.2.mlp.fc1"]),
        (nets.deit, 1.0, [f"blocks.{i}.mlp.fc1" for i in (3, 2, 1, 0)]),
        (
            nets.mixer,
            1.0,
            [f"blocks.{i}.{k}.fc1" for i in (2, 1, 0) for k in ("mlp_channels", "mlp_tokens")],
        ),
        # Two chained blocks sharing classifier.4, with a BatchNorm1d inside the first.
        (nets.vgg, 1.0, ["classifier.0"]),
        (nets.vgg, 0.5, ["classifier.4"]),
    ],
)
def test_collapse_with_unit_slopes_keeps_outputs_and_removes_expected_params(
    build, fraction, expected_linears
):
    torch.manual_seed(0)
    model = nets.randomise(build())
    names = make_collapsible(model, fraction=fraction, init=1.0)
    x = nets.images(8)
    with torch.no_grad():
        before = model(x)
    params_before = _params(model)
    removed = _removed_params(model, names)
    assert removed > 0

    assert collapse(model) == expected_linears
    with torch.no_grad():
        after = model(x)
    assert _rel_l2(after, before) <= 1e-5
    assert _params(model) == params_before - removed
    assert prelu_names(model) == []
    for name in expected_linears:
        assert type(model.get_submodule(name)) is nn.Linear
    assert find_blocks(model) == [b for b in find_blocks(model) if b.name not in names]
    assert collapse(model) == []  # nothing left to collapse


def test_vgg_chain_collapses_to_one_linear():
    model = nets.randomise(nets.vgg())
    make_collapsible(model, init=1.0)
    collapse(model)
    linears = [m for m in model.classifier if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(8, 10)]
    assert [type(m).__name__ for m in model.classifier] == ["Linear"] + ["Identity"] * 7


@pytest.mark.parametrize(
    ("slope", "threshold", "collapses"),
    [(0.96, 0.05, True), (1.04, 0.05, True), (0.94, 0.05, False), (0.94, 0.1, True), (0.5, 0.05, False)],
)
def test_collapse_threshold(slope, threshold, collapses):
    model = nets.vit(depth=2)
    make_collapsible(model, init=slope)
    assert collapse(model, threshold=threshold) == (
        ["blocks.1.mlp.fc1", "blocks.0.mlp.fc1"] if collapses else []
    )


def test_collapse_requires_every_channel_within_threshold():
    model = nets.randomise(nets.vgg())
    make_collapsible(model, per_channel=True, init=1.0)
    with torch.no_grad():
        model.classifier[5].weight[7] = 0.9
    assert collapse(model) == ["classifier.0"]  # first block; its fc2 (classifier.4) stays


def test_collapse_with_near_unit_slope_is_approximate_not_exact():
    """Slope 0.97 is treated as 1: outputs change a little, which is what the threshold trades."""
    torch.manual_seed(0)
    model = nets.randomise(nets.vit(depth=2))
    make_collapsible(model, init=0.97)
    x = nets.images(8)
    with torch.no_grad():
        before = model(x)
        collapse(model)
        err = _rel_l2(model(x), before)
    assert 1e-5 < err < 0.1


def test_collapse_uses_float64_for_large_widths():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 1024), nn.PReLU(init=1.0), nn.Linear(1024, 256)).eval()
    x = torch.randn(16, 256)
    with torch.no_grad():
        exact = model.double()(x.double())
        model.float()
        collapse(model)
        err = _rel_l2(model(x).double(), exact)
    assert err <= 1e-6
    assert math.isclose(_params(model), 256 * 256 + 256)


def test_penalty_training_drives_slopes_to_collapse():
    """A few hundred steps of penalty alone (λ large) bring the slope within the threshold."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2))
    make_collapsible(model)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(100):
        opt.zero_grad()
        (model(torch.randn(16, 4)).pow(2).mean() * 0 + 10 * collapsible.collapse_penalty(model)).backward()
        opt.step()
    assert abs(model[1].weight.item() - 1) <= 0.05
    assert collapse(model) == ["0"]
