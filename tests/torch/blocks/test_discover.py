"""Blocks found by data flow (`discover`, `make_collapsible(..., example_inputs=...)`) and the refusals
with their reasons."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

import torch.nn.functional as F  # noqa: E402
from timm.layers import GluMlp, LayerNorm, Mlp, SwiGLU  # noqa: E402
from timm.models.metaformer import StarReLU  # noqa: E402
from torch import nn  # noqa: E402

from lc_onnx.torch import (  # noqa: E402
    RefusalKind,
    collapse,
    discover,
    find_blocks,
    make_collapsible,
    refusals,
)
from lc_onnx.torch.blocks.collapsible import restore_structure  # noqa: E402
from tests.torch import families, nets  # noqa: E402

TOKENS = torch.randn(2, 3, 4)
BETWEEN = "between fc1 and fc2"


class Pair(nn.Module):
    """fc1 -> `middle(h)` -> fc2, with the middle written in this forward."""

    def __init__(self, middle, d_in: int = 4, hidden: int = 8, **modules: nn.Module) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_in, hidden), nn.Linear(hidden, d_in)
        for name, module in modules.items():
            self.add_module(name, module)
        self.middle = middle

    def forward(self, x):
        return self.fc2(self.middle(self, self.fc1(x)))


def functional_gelu():
    return Pair(lambda m, h: F.gelu(h))


def swish_formula():
    return Pair(lambda m, h: h * torch.sigmoid(1.702 * h))


def shared_activation():
    act = nn.GELU()
    return nn.Sequential(Pair(lambda m, h: m.act(h), act=act), Pair(lambda m, h: m.act(h), act=act))


def fan_out():
    class FanOut(Pair):
        def forward(self, x):
            h = self.act(self.fc1(x))
            return self.fc2(h) + h.sum()

    return FanOut(None, act=nn.ReLU())


def batch_norm_on_tokens():
    return Pair(lambda m, h: m.bn(m.act(h)), act=nn.ReLU(), bn=nn.BatchNorm1d(3))


def conv_then_linear():
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Conv2d(4, 4, 1), nn.ReLU(), nn.Linear(3, 4)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    return Mixed()


def t5_gated():
    return families.t5_encoder(proj="gated-gelu")


def bert_functional():
    model = families.bert(layers=2)
    for layer in model.encoder.layer:
        del layer.intermediate.intermediate_act_fn  # a function where transformers puts a module
        layer.intermediate.intermediate_act_fn = F.gelu
    return model


def vit_swiglu():
    return nets.tiny(depth=1, mlp_layer=SwiGLU, num_classes=1000)


T5 = "encoder.block.0.layer.1.DenseReluDense"
GATE = "act(x·Wg) ⊙ (x·Wu) is not linear in x"
NEITHER = "is neither an activation nor a pass-through"
NO_MODULE = "no module to swap for a PReLU"


@pytest.mark.parametrize(
    ("build", "inputs", "expected"),
    [
        (functional_gelu, TOKENS, [("gelu()", RefusalKind.FUNCTIONAL, f"activation called as a function (gelu()) in the forward of the model, {BETWEEN}: {NO_MODULE}")]),
        (swish_formula, TOKENS, [("sigmoid()", RefusalKind.FUNCTIONAL, f"activation called as a function (mul(), sigmoid(), mul()) in the forward of the model, {BETWEEN}: {NO_MODULE}")]),
        (bert_functional, {"input_ids": torch.ones(2, 8, dtype=torch.long)}, [
            (f"encoder.layer.{i}.intermediate.gelu()", RefusalKind.FUNCTIONAL, f"activation called as a function (gelu()) in the forward of encoder.layer.{i}.intermediate, between encoder.layer.{i}.intermediate.dense and encoder.layer.{i}.output.dense: {NO_MODULE}")
            for i in range(2)
        ]),
        (t5_gated, {"input_ids": torch.ones(2, 8, dtype=torch.long)}, [
            (f"{T5.replace('0', str(i), 1)}.act", RefusalKind.GATED, f"gated MLP ({T5.replace('0', str(i), 1)}.wi_0 -> {T5.replace('0', str(i), 1)}.act -> mul() with {T5.replace('0', str(i), 1)}.wi_1 -> {T5.replace('0', str(i), 1)}.wo): {GATE}")
            for i in range(2)
        ]),
        (vit_swiglu, torch.randn(1, 3, 16, 16), [("blocks.0.mlp.act", RefusalKind.GATED, f"gated MLP (blocks.0.mlp.fc1_g -> blocks.0.mlp.act -> mul() with blocks.0.mlp.fc1_x -> blocks.0.mlp.fc2): {GATE}")]),
        (lambda: GluMlp(4, 8), TOKENS, [("act", RefusalKind.GATED, f"gated MLP (fc1 -> act -> mul() with chunk() of fc1 -> fc2): {GATE}")]),
        (lambda: Mlp(4, 8, norm_layer=LayerNorm), TOKENS, [("act", RefusalKind.NORM, f"LayerNorm norm {BETWEEN} is a norm, not linear")]),
        (lambda: Mlp(4, 8, act_layer=StarReLU), TOKENS, [("act.relu", RefusalKind.STEP, f"pow() in the forward of act {BETWEEN} {NEITHER}")]),
        (lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.ReLU(), nn.Linear(8, 2)), TOKENS, [("1", RefusalKind.ACTIVATIONS, "2 activations between 0 and 3 (1, 2)")]),
        (shared_activation, TOKENS, [("0.act", RefusalKind.SHARED, "0.act is called 2 times in one forward: a block's layers and activation must be its own to be swapped and collapsed")]),
        (fan_out, TOKENS, [("act", RefusalKind.FAN_OUT, "the output of act also feeds sum(), outside the block: collapsing would change it")]),
        (batch_norm_on_tokens, TOKENS, [("act", RefusalKind.BATCH_NORM_AXIS, "bn normalises axis 1 of a [2, 3, 8] tensor, not the features of fc1")]),
        (conv_then_linear, torch.randn(2, 4, 3, 3), [("act", RefusalKind.AXES, "fc1 (Conv2d 1x1) and fc2 (Linear) act on different axes")]),
    ],
    ids=["functional", "swish-formula", "bert-callable-act", "t5-gated", "timm-swiglu", "timm-glumlp", "layernorm",
         "param-activation", "two-activations", "shared-activation", "fan-out", "batchnorm-tokens", "axes"],
)  # fmt: skip
def test_refusals_come_with_their_reasons(build, inputs, expected):
    model = build()
    found = discover(model, inputs)
    assert found.specs == ()
    assert [(r.name, r.kind, r.reason) for r in found.refusals] == expected
    assert make_collapsible(model) == [] and find_blocks(model) == []
    assert refusals(model) == list(found.refusals)


@pytest.mark.parametrize(
    ("build", "inputs"),
    [
        # no activation between: not an MLP, nothing to say
        (lambda: nn.Sequential(nn.Linear(4, 8), nn.Dropout(), nn.Linear(8, 2)), TOKENS),
        # Swin's patch merging: reduction -> norm -> (window reshapes) -> qkv
        (lambda: nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2)), TOKENS),
        # a 1x1 expansion into a depthwise conv: a layer with its own kernel ends the walk
        (lambda: nn.Sequential(nn.Conv2d(4, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(), nn.Conv2d(8, 4, 1)),
         torch.randn(1, 4, 5, 5)),
        # CaiT's talking heads: proj_l -> softmax -> proj_w normalises along an axis; no MLP
        (lambda: Pair(lambda m, h: h.softmax(-1)), TOKENS),
    ],
    ids=["no-activation", "norm-only", "depthwise", "softmax"],
)  # fmt: skip
def test_non_mlps_are_neither_blocks_nor_refusals(build, inputs):
    found = discover(build(), inputs)
    assert (found.specs, found.refusals) == ((), ())


@pytest.mark.parametrize("build", [nets.vit, nets.deit, nets.mixer, nets.vgg])
def test_data_flow_finds_exactly_the_structural_blocks(build):
    """timm `Mlp`s and `nn.Sequential` runs: the same names, slots and order either way."""
    expected = [(b.name, b.prefix, b.keys, b.act_key) for b in find_blocks(build())]
    model = build()
    discover(model, nets.images(2))
    assert [(b.name, b.prefix, b.keys, b.act_key) for b in find_blocks(model)] == expected
    assert refusals(model) == []


@pytest.mark.parametrize(
    ("build", "inputs", "names"),
    [
        (families.bert, families.text()(0), [f"encoder.layer.{i}.intermediate.intermediate_act_fn" for i in range(6)]),
        (families.gpt2, families.text()(0), [f"h.{i}.mlp.act" for i in range(4)]),
        (families.clip_text, families.text()(0), [f"encoder.layers.{i}.mlp.activation_fn" for i in range(4)]),
        (families.clip_vision, families.images()(0), [f"encoder.layers.{i}.mlp.activation_fn" for i in range(4)]),
    ],
    ids=["bert", "gpt2", "clip-text", "clip-vision"],
)  # fmt: skip
def test_transformers_blocks_by_name_and_their_collapse(build, inputs, names):
    from tests.exports import randomise, torch_output

    torch.manual_seed(0)
    model = build()
    assert make_collapsible(model, fraction=0.5, example_inputs=inputs) == names[len(names) // 2 :]
    assert [b.name for b in find_blocks(model)] == names
    with torch.no_grad():
        for name in names[len(names) // 2 :]:
            model.get_submodule(name).weight.fill_(1.0)
    randomise(model)
    before = torch_output(model, inputs)
    layers = collapse(model)
    assert len(layers) == len(names) // 2
    after = torch_output(model, inputs)
    assert float(abs(after - before).max() / abs(before).max()) <= 1e-5


def test_gpt2_collapses_into_a_conv1d_and_keeps_the_other_state_dict_keys():
    from transformers.pytorch_utils import Conv1D

    model = families.gpt2(layers=1)
    make_collapsible(model, init=1.0, example_inputs=families.text()(0))
    keys = set(model.state_dict())
    assert collapse(model) == ["h.0.mlp.c_fc"]
    layer = model.h[0].mlp.c_fc
    assert (type(layer), layer.weight.shape, layer.nf, layer.nx) == (Conv1D, (32, 32), 32, 32)
    removed = {"h.0.mlp.act.weight", "h.0.mlp.c_proj.weight", "h.0.mlp.c_proj.bias"}
    assert set(model.state_dict()) == keys - removed


def test_t5_forward_reads_its_folded_layer():
    """T5's `DenseReluDense` reads `wo.weight.dtype`: the identity in fc2's slot has a None weight."""
    model = families.t5_encoder()
    inputs = families.text()(0)
    make_collapsible(model, init=1.0, example_inputs=inputs)
    assert collapse(model) == [f"encoder.block.{i}.layer.1.DenseReluDense.wi" for i in (1, 0)]
    wo = model.encoder.block[0].layer[1].DenseReluDense.wo
    assert (type(wo), wo.weight, list(wo.state_dict())) == (nn.Identity, None, [])
    assert model(**inputs).last_hidden_state.shape == (2, 8, 32)


def test_blocks_of_a_discovered_model_are_found_through_a_wrapper_and_restored_by_name():
    model = families.bert(layers=2)
    found = discover(model, families.text()(0))
    wrapper = nn.Sequential(model)
    assert [b.name for b in find_blocks(wrapper)] == [
        f"0.encoder.layer.{i}.intermediate.intermediate_act_fn" for i in range(2)
    ]
    fresh = families.bert(layers=2)
    restore_structure(fresh, [found.specs[1].act], [], found.specs)
    assert type(fresh.encoder.layer[1].intermediate.intermediate_act_fn) is nn.PReLU
    assert [b.name for b in find_blocks(fresh)] == [s.act for s in found.specs]


def test_structure_alone_refuses_timm_gated_and_normed_mlps():
    model = nn.Sequential(GluMlp(4, 8), Mlp(4, 8, norm_layer=LayerNorm), Mlp(4, 8))
    assert [b.name for b in find_blocks(model)] == ["2.act"]
    assert [(r.name, r.kind) for r in refusals(model)] == [
        ("0.act", RefusalKind.GATED),
        ("1.act", RefusalKind.NORM),
    ]
    assert refusals(model)[1].reason == "LayerNorm 1.norm between 1.fc1 and 1.fc2 is a norm, not linear"
