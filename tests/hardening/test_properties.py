"""Property tests: `lc_onnx.fuse` on random chains of linear layers.

Hypothesis draws chains of 2-4 linear layers (Gemm with transB 0/1, alpha/beta, with or without bias;
MatMul with or without Add; a Gemm wrapped in `Reshape`s to rows and back, as GPT-2's `Conv1D` exports,
with constant or run-time targets; or, in chains of their own, 1x1 convolutions with or without bias) of
random sizes on inputs of rank 2-4 with static or dynamic dims, in fp32 or fp16, joined by runs of
activations that are exactly linear (Identity, Dropout, PRelu/LeakyRelu of slope 1, BatchNormalization
on its channel axis, per-feature constant Mul/Add/Sub/Div), near-linear (PRelu slopes within the
threshold of 1) or not linear (Relu, slopes far from 1), with BatchNormalization or a per-feature scale
(LayerScale) also before the first and after the last layer, and optionally with the biases zero and
every equal constant shared, as the dynamo exporter writes a fresh model. For every chain:

- the input proto is not modified;
- the output passes `onnx.checker.check_model(full_check=True)` and runs in onnxruntime;
- when every collapse was exact, onnxruntime outputs match the original within a tolerance fitted to the
  dtype; when nothing collapsed, the model and its outputs are identical;
- non-linear activations are never removed, every collapse shrinks the weights and the parameters, and
  a gap that is exactly linear and whose collapse saves parameters in any case is collapsed;
- fusing the output again collapses nothing and returns the same graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

import lc_onnx
from lc_onnx.model import runtime
from lc_onnx.testing import rel_l2
from tests.hardening.graphs import MIN_IR

# Relative L2 error allowed for an exact collapse. fp32: the README's promise. fp16: the original itself
# rounds every layer's output to fp16 (unit roundoff 4.9e-4) and the fused weights are rounded once more;
# allow 8 roundoffs (measured over the 500 examples: at most 9.4e-4 for fp16, 3.2e-7 for fp32).
TOLERANCE = {np.dtype(np.float32): 1e-5, np.dtype(np.float16): 4e-3}
EXACT = ("identity", "dropout", "prelu_1", "leaky_1", "mul_c", "add_c", "sub_c", "div_c", "bn")
NEAR = ("prelu_near",)
NONLINEAR = ("relu", "prelu_far", "leaky_far")
THRESHOLD = 0.05


@dataclass(frozen=True)
class Layer:
    style: str  # gemm | matmul | reshaped (Reshape -> Gemm -> Reshape) | conv (1x1)
    trans_b: int = 1
    alpha: float = 1.0
    beta: float = 1.0
    bias: bool = True


@dataclass(frozen=True)
class Chain:
    dims: tuple[int, ...]
    layers: tuple[Layer, ...]
    gaps: tuple[tuple[str, ...], ...]  # activation steps between layer i and i + 1
    rank: int
    dynamic: tuple[bool, ...]  # per leading (non-feature) dim
    dtype: np.dtype
    opset: int
    bn_first: bool
    bn_last: bool
    per_channel: bool
    seed: int
    scale_first: bool = False
    scale_last: bool = False
    shared: bool = False  # zero biases, equal constants merged into one tensor
    conv: bool = False  # all layers 1x1 convolutions on [N, C, *spatial]


@st.composite
def layers(draw, rank: int, styles: tuple[str, ...]) -> Layer:
    style = draw(st.sampled_from(styles))
    if style in ("reshaped", "conv"):
        return Layer(style, trans_b=draw(st.sampled_from([0, 1])), bias=draw(st.booleans()))
    if rank == 2 and draw(st.booleans()):
        return Layer(
            "gemm",
            trans_b=draw(st.sampled_from([0, 1])),
            alpha=draw(st.sampled_from([1.0, 0.5, 2.0])),
            beta=draw(st.sampled_from([1.0, 0.5])),
            bias=draw(st.booleans()),
        )
    return Layer("matmul", bias=draw(st.booleans()))


@st.composite
def chains(draw) -> Chain:
    n = draw(st.integers(2, 4))
    conv = draw(st.integers(0, 4)) == 0
    rank = draw(st.integers(3, 4)) if conv else draw(st.integers(2, 4))
    dynamic = tuple(draw(st.lists(st.booleans(), min_size=rank - 1, max_size=rank - 1)))
    bn_ok = rank == 2 or conv  # BatchNormalization normalises axis 1: the features only there
    steps = st.sampled_from(EXACT + NEAR + NONLINEAR if bn_ok else EXACT[:-1] + NEAR + NONLINEAR)
    if conv:
        styles = ("conv",)
    elif rank > 2 and any(dynamic[1:]):
        # Run-time reshape targets: a chain of Conv1D layers (GPT-2), or none (a MatMul after one could
        # only be given its leading shape at run time, which the pass refuses).
        styles = draw(st.sampled_from([("reshaped",), ("gemm", "matmul")]))
    else:
        styles = ("gemm", "matmul", "reshaped")
    return Chain(
        dims=tuple(draw(st.lists(st.integers(1, 8), min_size=n + 1, max_size=n + 1))),
        layers=tuple(draw(st.lists(layers(rank, styles), min_size=n, max_size=n))),
        gaps=tuple(tuple(draw(st.lists(steps, max_size=2))) for _ in range(n - 1)),
        rank=rank,
        dynamic=dynamic,
        dtype=np.dtype(draw(st.sampled_from([np.float32, np.float16]))),
        opset=draw(st.sampled_from([13, 17, 21])),
        bn_first=bn_ok and draw(st.booleans()),
        bn_last=bn_ok and draw(st.booleans()),
        per_channel=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
        scale_first=draw(st.booleans()),
        scale_last=draw(st.booleans()),
        shared=draw(st.integers(0, 3)) == 0,
        conv=conv,
    )


def build(chain: Chain) -> onnx.ModelProto:
    """The chain as a model `x -> y`; node names say what each node is (`fc{i}`, `g{i}_{j}.{step}`)."""
    rng = np.random.default_rng(chain.seed)
    dt = chain.dtype
    spatial = chain.rank - 2 if chain.conv else 0
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def init(name: str, value, dtype=dt) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def node(op: str, inputs: list[str], name: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [name + "_out"], name=name, **attrs))
        return name + "_out"

    def feature_shape(d: int) -> tuple[int, ...]:
        """A constant with one value per feature: on the channel axis 1 of convolutions, else the last."""
        return (d, *([1] * spatial)) if chain.per_channel else (1,)

    def step(x: str, kind: str, d: int, name: str) -> str:
        shape = feature_shape(d)
        if kind in ("identity", "dropout", "relu"):
            return node({"identity": "Identity", "dropout": "Dropout", "relu": "Relu"}[kind], [x], name)
        if kind == "leaky_1":
            return node("LeakyRelu", [x], name, alpha=1.0)
        if kind == "leaky_far":
            return node("LeakyRelu", [x], name, alpha=0.1)
        if kind == "mul_c":
            return node("Mul", [x, init(f"{name}.c", rng.uniform(0.5, 1.5, shape))], name)
        if kind == "add_c":
            return node("Add", [init(f"{name}.c", 0.1 * rng.standard_normal(shape)), x], name)
        if kind == "sub_c":
            return node("Sub", [init(f"{name}.c", 0.1 * rng.standard_normal(shape)), x], name)
        if kind == "div_c":
            return node("Div", [x, init(f"{name}.c", rng.uniform(0.5, 2.0, shape))], name)
        if kind == "bn":
            return node("BatchNormalization", [x, init(f"{name}.scale", rng.uniform(0.5, 1.5, d)),
                        init(f"{name}.bias", 0.1 * rng.standard_normal(d)),
                        init(f"{name}.mean", 0.1 * rng.standard_normal(d)),
                        init(f"{name}.var", rng.uniform(0.5, 1.5, d))], name, epsilon=1e-5)  # fmt: skip
        slopes = {
            "prelu_1": np.ones(shape),
            "prelu_near": rng.uniform(1 - THRESHOLD / 2, 1, shape),
            "prelu_far": rng.uniform(-0.5, 0.5, shape),
        }[kind]
        return node("PRelu", [x, init(f"{name}.slope", slopes)], name)

    lead = ["N" if chain.dynamic[0] else 2] + [
        f"S{k}" if dyn else 3 for k, dyn in enumerate(chain.dynamic[1:])
    ]

    def back_to_tokens(y: str, d: int, name: str) -> str:
        """Rows `[M, d]` back to the input's leading shape: a constant target where it is static."""
        if all(isinstance(n, int) for n in lead[1:]):
            return node("Reshape", [y, init(f"{name}.shape", [-1, *lead[1:], d], np.int64)], name)
        head = node("Slice", ["x_shape", init(f"{name}.zero", [0], np.int64),
                              init(f"{name}.minus1", [-1], np.int64)], f"{name}.lead")  # fmt: skip
        target = node("Concat", [head, init(f"{name}.d", [d], np.int64)], f"{name}.target", axis=0)
        return node("Reshape", [y, target], name)

    if any(layer.style == "reshaped" for layer in chain.layers) and chain.rank > 2:
        nodes.append(helper.make_node("Shape", ["x"], ["x_shape"], name="x_shape"))
    x = "x"
    if chain.bn_first:
        x = step(x, "bn", chain.dims[0], "bn_first")
    if chain.scale_first:
        x = step(x, "mul_c", chain.dims[0], "scale_first")
    for i, (layer, d_in, d_out) in enumerate(zip(chain.layers, chain.dims[:-1], chain.dims[1:])):
        w = rng.standard_normal((d_in, d_out)) / np.sqrt(d_in)
        b = np.zeros(d_out) if chain.shared else 0.1 * rng.standard_normal(d_out)
        if layer.style == "conv":
            inputs = [x, init(f"fc{i}.weight", w.T.reshape(d_out, d_in, *([1] * spatial)))]
            if layer.bias:
                inputs.append(init(f"fc{i}.bias", b))
            x = node("Conv", inputs, f"fc{i}", kernel_shape=[1] * spatial)
        elif layer.style in ("gemm", "reshaped"):
            if layer.style == "reshaped":
                x = node("Reshape", [x, init(f"fc{i}.rows", [-1, d_in], np.int64)], f"fc{i}.rows")
            inputs = [x, init(f"fc{i}.weight", w.T if layer.trans_b else w)]
            if layer.bias:
                inputs.append(init(f"fc{i}.bias", b))
            x = node("Gemm", inputs, f"fc{i}", transB=layer.trans_b, alpha=layer.alpha, beta=layer.beta)
            if layer.style == "reshaped" and chain.rank > 2:
                x = back_to_tokens(x, d_out, f"fc{i}.tokens")
        else:
            x = node("MatMul", [x, init(f"fc{i}.weight", w)], f"fc{i}")
            if layer.bias:
                x = node("Add", [x, init(f"fc{i}.bias", b)], f"fc{i}/add")
        if i < len(chain.gaps):
            for j, kind in enumerate(chain.gaps[i]):
                x = step(x, kind, d_out, f"g{i}_{j}.{kind}")
    if chain.bn_last:
        x = step(x, "bn", chain.dims[-1], "bn_last")
    if chain.scale_last:
        x = step(x, "mul_c", chain.dims[-1], "scale_last")
    nodes.append(helper.make_node("Identity", [x], ["y"], name="out"))
    if chain.shared:
        _share_equal_constants(nodes, inits)

    elem = helper.np_dtype_to_tensor_dtype(dt)
    if chain.conv:
        shape_in, shape_out = [lead[0], chain.dims[0], *lead[1:]], [lead[0], chain.dims[-1], *lead[1:]]
    else:
        shape_in, shape_out = [*lead, chain.dims[0]], [*lead, chain.dims[-1]]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", elem, shape_in)],
        [helper.make_tensor_value_info("y", elem, shape_out)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", chain.opset)])
    model.ir_version = MIN_IR[chain.opset]
    return model


def _share_equal_constants(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto]) -> None:
    """Merge initializers with equal type, shape and bytes into the first of them (dynamo's dedup)."""
    first: dict[tuple, str] = {}
    alias: dict[str, str] = {}
    for tensor in list(inits):
        key = (tensor.data_type, tuple(tensor.dims), tensor.raw_data)
        if key in first:
            alias[tensor.name] = first[key]
            inits.remove(tensor)
        else:
            first[key] = tensor.name
    for n in nodes:
        n.input[:] = [alias.get(name, name) for name in n.input]


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return runtime.session(model.SerializeToString(), optimization="disable").run(None, feeds)


def weights(model: onnx.ModelProto) -> int:
    """Elements of the MatMul/Gemm/Conv weight matrices (what the growth guard counts; biases are not)."""
    sizes = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    return sum(sizes.get(n.input[1], 0) for n in model.graph.node if n.op_type in ("MatMul", "Gemm", "Conv"))


def must_collapse(chain: Chain) -> bool:
    """Some gap is exactly linear and collapsing its two layers shrinks the parameters even if the new
    layer needs a bias that neither had (`d_in·d_out + d_out < d_h·(d_in+d_out)`)."""
    return any(
        all(kind in EXACT for kind in gap) and d_in * d_out + d_out < d_h * (d_in + d_out)
        for gap, d_in, d_h, d_out in zip(chain.gaps, chain.dims, chain.dims[1:], chain.dims[2:])
    )


@settings(
    max_examples=500,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(chain=chains())
def test_fuse_is_safe_exact_and_idempotent(chain: Chain) -> None:
    model = build(chain)
    onnx.checker.check_model(model, full_check=True)
    original_bytes = model.SerializeToString()

    result = lc_onnx.fuse(model, threshold=THRESHOLD, max_error=float("inf"))

    assert model.SerializeToString() == original_bytes  # the input is never modified
    fused = result.model
    onnx.checker.check_model(fused, full_check=True)
    feeds = runtime.random_feeds(model, runtime.input_shapes(model), seed=1)
    expected, actual = run(model, feeds), run(fused, feeds)
    assert [(a.shape, a.dtype) for a in actual] == [(e.shape, e.dtype) for e in expected]

    collapsed = result.report.collapsed
    if not collapsed:
        assert fused.SerializeToString() == original_bytes
        assert all(np.array_equal(a, e) for a, e in zip(actual, expected))
    elif all(site.extra["exact"] for site in collapsed):
        for a, e in zip(actual, expected):
            assert rel_l2(a, e) <= TOLERANCE[chain.dtype], (rel_l2(a, e), chain)
    if not any(kind in NEAR for gap in chain.gaps for kind in gap):
        assert all(site.extra["exact"] for site in collapsed), collapsed
    if must_collapse(chain):
        assert collapsed, result.report.sites

    kept = {n.name for n in fused.graph.node}
    nonlinear = [n.name for n in model.graph.node if n.name.rsplit(".", 1)[-1] in NONLINEAR]
    assert set(nonlinear) <= kept
    # Every collapse strictly reduces the weights (the bottleneck guard) and the parameters, biases,
    # slopes and BatchNorm included (1 -> 1 -> 3 without biases would gain a bias of 3 for 1: refused).
    assert weights(fused) < weights(model) if collapsed else weights(fused) == weights(model)
    report = result.report
    assert (
        report.params_after < report.params_before
        if collapsed
        else report.params_after == report.params_before
    )

    again = lc_onnx.fuse(fused, threshold=THRESHOLD, max_error=float("inf"))
    assert again.collapsed == 0, again.report.sites
    assert again.model.SerializeToString() == fused.SerializeToString()
