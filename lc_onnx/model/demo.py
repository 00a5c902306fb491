"""The embedded demo model: a small token MLP network with near-linear activations.

Input `tokens [batch, 16, 32]`. Three residual-free MLP blocks on the token tensor (MatMul + Add, as the
torch exporters write `nn.Linear` on 3-D inputs), then mean pooling and a Gemm classifier head with
`Gemm -> PRelu -> BatchNormalization -> Gemm` (the reference VGG classifier's shape):

- block 0: GELU (not linear: skipped),
- block 1: PRelu with slope exactly 1 (exact collapse),
- block 2: PRelu with per-channel slopes in [0.995, 1.0] (near-linear: collapsed under threshold 0.05),
- head: PRelu(1) then BatchNorm (exact collapse, BatchNorm folded).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

D_MODEL, D_HIDDEN, TOKENS, CLASSES = 32, 128, 16, 10


def build_demo_model(seed: int = 0) -> onnx.ModelProto:
    """The demo model with random weights drawn from `seed`."""
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    def dense(x: str, prefix: str, d_in: int, d_out: int) -> str:
        w = const(f"{prefix}.weight", rng.standard_normal((d_in, d_out)) / np.sqrt(d_in))
        b = const(f"{prefix}.bias", 0.1 * rng.standard_normal(d_out))
        nodes.append(helper.make_node("MatMul", [x, w], [f"{prefix}/mm"], name=f"{prefix}/MatMul"))
        nodes.append(helper.make_node("Add", [f"{prefix}/mm", b], [f"{prefix}/out"], name=f"{prefix}/Add"))
        return f"{prefix}/out"

    x = "tokens"
    slopes = [None, np.ones((1,), np.float32), rng.uniform(0.995, 1.0, D_HIDDEN)]
    for i, slope in enumerate(slopes):
        h = dense(x, f"blocks.{i}.mlp.fc1", D_MODEL, D_HIDDEN)
        if slope is None:
            nodes.append(helper.make_node("Gelu", [h], [f"blocks.{i}/act"], name=f"blocks.{i}.mlp.act"))
        else:
            s = const(f"blocks.{i}.mlp.act.weight", slope)
            nodes.append(helper.make_node("PRelu", [h, s], [f"blocks.{i}/act"], name=f"blocks.{i}.mlp.act"))
        x = dense(f"blocks.{i}/act", f"blocks.{i}.mlp.fc2", D_HIDDEN, D_MODEL)

    inits.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "pool.axes"))
    nodes.append(helper.make_node("ReduceMean", [x, "pool.axes"], ["pooled"], name="pool", keepdims=0))
    w1 = const("head.fc1.weight", rng.standard_normal((D_HIDDEN, D_MODEL)) / np.sqrt(D_MODEL))
    b1 = const("head.fc1.bias", 0.1 * rng.standard_normal(D_HIDDEN))
    nodes.append(helper.make_node("Gemm", ["pooled", w1, b1], ["head/h"], name="head.fc1", transB=1))
    nodes.append(
        helper.make_node(
            "PRelu", ["head/h", const("head.act.weight", np.ones(1))], ["head/a"], name="head.act"
        )
    )
    bn = [
        const("head.bn.weight", rng.uniform(0.5, 1.5, D_HIDDEN)),
        const("head.bn.bias", 0.1 * rng.standard_normal(D_HIDDEN)),
        const("head.bn.running_mean", 0.1 * rng.standard_normal(D_HIDDEN)),
        const("head.bn.running_var", rng.uniform(0.5, 1.5, D_HIDDEN)),
    ]
    nodes.append(
        helper.make_node("BatchNormalization", ["head/a", *bn], ["head/bn"], name="head.bn", epsilon=1e-5)
    )
    w2 = const("head.fc2.weight", rng.standard_normal((CLASSES, D_HIDDEN)) / np.sqrt(D_HIDDEN))
    b2 = const("head.fc2.bias", 0.1 * rng.standard_normal(CLASSES))
    nodes.append(helper.make_node("Gemm", ["head/bn", w2, b2], ["logits"], name="head.fc2", transB=1))

    graph = helper.make_graph(
        nodes,
        "lc_onnx_demo",
        [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["batch", TOKENS, D_MODEL])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 20)], producer_name="lc-onnx demo"
    )
    model.ir_version = 9
    return model
