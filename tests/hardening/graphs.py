"""Tiny graph builders for the hardening tests (no golden files: every model is built here in a few lines)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# The lowest IR version each default-domain opset needs (onnx.helper.VERSION_TABLE, inverted).
MIN_IR = {
    7: 3,
    8: 3,
    9: 4,
    10: 5,
    11: 6,
    12: 7,
    13: 7,
    14: 7,
    15: 8,
    16: 8,
    17: 8,
    18: 8,
    19: 9,
    20: 9,
    21: 10,
}


def tensor(name: str, value: np.ndarray, elem_type: int | None = None) -> onnx.TensorProto:
    """An initializer; `elem_type` forces e.g. BFLOAT16 (values are converted from float32)."""
    if elem_type == TensorProto.BFLOAT16:
        import ml_dtypes

        t = numpy_helper.from_array(np.asarray(value, np.float32), name)
        t.data_type = TensorProto.BFLOAT16
        t.raw_data = np.asarray(value, np.float32).astype(ml_dtypes.bfloat16).tobytes()
        return t
    return numpy_helper.from_array(np.asarray(value), name)


def mlp(
    dims: Sequence[int] = (4, 8, 4),
    *,
    act: str | None = "PRelu",
    slope: float = 1.0,
    style: str = "gemm",
    rank: int = 2,
    elem_type: int = TensorProto.FLOAT,
    opset: int = 17,
    ir: int | None = None,
    seed: int = 0,
    prefix: str = "fc",
    batch: int | str = "N",
) -> onnx.ModelProto:
    """A chain of linear layers `dims[0] -> dims[1] -> ...` joined by `act` (None: directly).

    `style` "gemm" writes `Gemm(x, W.T, b, transB=1)` (rank 2 only), "matmul" writes `MatMul(x, W) + b`.
    Input `x [batch, (3,)* , dims[0]]`, output `y`.
    """
    np_type = helper.tensor_dtype_to_np_dtype(elem_type) if elem_type != TensorProto.BFLOAT16 else np.float32
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "x"
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        w = (rng.standard_normal((d_in, d_out)) / np.sqrt(d_in)).astype(np_type)
        b = (0.1 * rng.standard_normal(d_out)).astype(np_type)
        name = f"{prefix}{i}"
        out = "y" if i == len(dims) - 2 else f"{name}_out"
        if style == "gemm":
            inits += [tensor(f"{name}.weight", w.T, elem_type), tensor(f"{name}.bias", b, elem_type)]
            nodes.append(
                helper.make_node("Gemm", [x, f"{name}.weight", f"{name}.bias"], [out], name=name, transB=1)
            )
        else:
            inits += [tensor(f"{name}.weight", w, elem_type), tensor(f"{name}.bias", b, elem_type)]
            nodes.append(helper.make_node("MatMul", [x, f"{name}.weight"], [f"{name}_mm"], name=f"{name}/mm"))
            nodes.append(helper.make_node("Add", [f"{name}_mm", f"{name}.bias"], [out], name=f"{name}/add"))
        x = out
        if out != "y" and act is not None:
            act_out = f"{name}_act"
            if act == "PRelu":
                inits.append(tensor(f"{name}.slope", np.full((1,), slope, np_type), elem_type))
                nodes.append(helper.make_node("PRelu", [x, f"{name}.slope"], [act_out], name=f"{name}/act"))
            else:
                nodes.append(helper.make_node(act, [x], [act_out], name=f"{name}/act"))
            x = act_out
    shape = [batch] + [3] * (rank - 2)
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", elem_type, [*shape, dims[0]])],
        [helper.make_tensor_value_info("y", elem_type, [*shape, dims[-1]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir if ir is not None else MIN_IR.get(opset, 8)
    if model.ir_version < 4:  # IR 3: every initializer must also be declared as a graph input
        for init in inits:
            graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return model


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]
