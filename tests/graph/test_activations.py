"""Multi-node activation patterns, on what the torch exporters really write for tiny nn.Sequential models."""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import onnx
import pytest

from lc_onnx.graph.options import FuseOptions
from lc_onnx.graph.pipeline import collapse_graph
from lc_onnx.model import io as lc_io
from lc_onnx.testing import GraphBuilder

torch = pytest.importorskip("torch")
nn = torch.nn


class Swish(nn.Module):
    def __init__(self, beta: float) -> None:
        super().__init__()
        self.beta = beta

    def forward(self, x):
        return x * torch.sigmoid(self.beta * x)


ACTS = {
    "gelu": (lambda: nn.GELU(), "Gelu"),
    "gelu_tanh": (lambda: nn.GELU(approximate="tanh"), "GeluTanh"),
    "silu": (lambda: nn.SiLU(), "Silu"),
    "swish": (lambda: Swish(1.7), "Swish"),
    "mish": (lambda: nn.Mish(), "Mish"),
}


def export(act: nn.Module, dynamo: bool, opset: int) -> onnx.ModelProto:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), act, nn.Linear(16, 3)).eval()
    x = torch.randn(2, 4)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            return torch.onnx.export(model, (x,), dynamo=True, opset_version=opset, verbose=False).model_proto
        buf = io.BytesIO()
        torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=opset)
        return onnx.load_from_string(buf.getvalue())


def site_steps(model: onnx.ModelProto) -> list[tuple[str, str, str]]:
    rewritten = collapse_graph(lc_io.from_proto(model), FuseOptions(threshold=0.0))
    return [(s.activation, s.decision, s.reason) for s in rewritten.sites]


@pytest.mark.parametrize(
    "act,dynamo,opset",
    [
        ("gelu", False, 17),
        ("gelu", True, 18),
        ("gelu_tanh", False, 17),
        ("gelu_tanh", True, 18),
        ("silu", False, 17),
        ("silu", True, 18),
        ("swish", False, 17),
        ("mish", False, 17),
    ],
)
def test_exported_activation_is_one_nonlinear_step(act, dynamo, opset):
    make, name = ACTS[act]
    model = export(make(), dynamo, opset)
    ops = [n.op_type for n in model.graph.node if n.op_type != "Constant"]
    assert len(ops) > 3  # the activation really is several nodes in this export
    [(activation, decision, reason)] = site_steps(model)
    assert activation == name and decision == "skipped"
    assert reason.startswith(f"{name} ") and reason.endswith("is not linear")


def test_gelu_op_at_opset_20_stays_one_node():
    model = export(nn.GELU(), False, 20)
    assert [a for a, _, _ in site_steps(model)] == ["Gelu"]


@pytest.mark.parametrize(
    "build",
    [
        "second_consumer",  # an inner value of the pattern (the sigmoid) is also a graph output
        "non_channel_constant",  # a constant that varies along the batch axis: not per channel
    ],
)
def test_pattern_refusals(build):
    g = GraphBuilder()
    h = g.gemm(g.input("x", [2, 8]), 8, 8, name="fc1")
    if build == "second_consumer":
        s = g.node("Sigmoid", [h])
        y = g.node("Mul", [h, s])
        g.output(s, [2, 8])
    else:
        y = g.node("Mul", [h, g.node("Sigmoid", [g.node("Mul", [h, g.init("b", np.ones((2, 1)))])])])
    g.output(g.gemm(y, 8, 4, name="fc2"), [2, 4])
    assert collapse_graph(lc_io.from_proto(g.model()), FuseOptions(threshold=0.0)).sites == []
