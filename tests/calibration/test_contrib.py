"""Graphs after onnxruntime's transformers optimizer: its `com.microsoft` activations between linear
layers (Gelu, FastGelu, BiasGelu carrying fc1's bias, QuickGelu) and transformers' quick-GELU subgraph
are sites calibration fits, and the `onnx.reference` versions of those ops agree with onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper
from onnx.reference import ReferenceEvaluator

import lc_onnx
from lc_onnx.graph.activations import CONTRIB_OPS, MS_DOMAIN
from lc_onnx.graph.verify import measure
from lc_onnx.testing import GraphBuilder, ort_outputs, rel_l2

H = 32


def contrib(g: GraphBuilder, op: str, h: str, **attrs) -> str:
    """`op` in the com.microsoft domain applied to `h` (BiasGelu and FastGelu with a bias of their own)."""
    inputs = [h]
    if op in ("BiasGelu", "FastGelu"):
        inputs.append(g.init(g.fresh(f"{op}.bias"), g.random((H,), 0.1)))
    name = g.fresh(op)
    g.nodes.append(helper.make_node(op, inputs, [f"{name}_out"], name=name, domain=MS_DOMAIN, **attrs))
    return f"{name}_out"


def model_with(act) -> onnx.ModelProto:
    g = GraphBuilder()
    h = g.matmul(g.input("x", ["N", 5, 8]), 8, H, name="fc1", bias=True)
    g.output(g.matmul(act(g, h), H, 4, name="fc2"), ["N", 5, 4])
    model = g.model(opset=17)
    model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return model


ACTIVATIONS = {
    "Gelu": lambda g, h: contrib(g, "Gelu", h),
    "FastGelu": lambda g, h: contrib(g, "FastGelu", h),
    "BiasGelu": lambda g, h: contrib(g, "BiasGelu", h),
    "QuickGelu": lambda g, h: contrib(g, "QuickGelu", h, alpha=1.702),
    "quick-gelu-subgraph": lambda g, h: g.node(
        "Mul", [h, g.node("Sigmoid", [g.node("Mul", [h, g.init("k", np.float32(1.702))])])]
    ),
}


@pytest.mark.parametrize("op", ["Gelu", "FastGelu", "BiasGelu", "QuickGelu"])
def test_reference_ops_agree_with_onnxruntime(op):
    g = GraphBuilder()
    x = g.input("x", [4, H])
    g.output(contrib(g, op, x, **({"alpha": 1.3} if op == "QuickGelu" else {})), [4, H])
    model = g.model(opset=17)
    model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    feeds = {"x": (3 * np.random.default_rng(0).standard_normal((4, H))).astype(np.float32)}
    (reference,) = ReferenceEvaluator(model, new_ops=list(CONTRIB_OPS)).run(None, feeds)
    assert rel_l2(reference, ort_outputs(model, feeds)[0]) <= 1e-5


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_contrib_activations_are_sites_that_calibration_fits(name):
    model = model_with(ACTIVATIONS[name])
    expected = "QuickGelu" if name == "quick-gelu-subgraph" else name

    plain = lc_onnx.fuse(model)
    (site,) = plain.report.sites
    assert (site.activation, site.reason_kind) == (expected, "not_linear")
    assert site.reason.startswith(f"{expected} ") and site.reason.endswith(" is not linear")

    rng = np.random.default_rng(2)
    data = [{"x": rng.standard_normal((16, 5, 8)).astype(np.float32)} for _ in range(8)]
    calibration = lc_onnx.calibrate(model, data)
    (key,) = calibration.fits
    assert calibration.fits[key].op == expected and 0 < calibration.fits[key].fit_error < 1
    result = lc_onnx.fuse(model, data=data, fit_method="channel", max_error=1.0)
    assert result.collapsed == 1 and result.report.sites[0].reason_kind == "fitted"
    assert [n.op_type for n in result.model.graph.node] == ["MatMul", "Add"]
    held_out = data[3::4]  # every fourth feed is held out, for the selection and the verification
    measured = measure((ort_outputs(result.model, f)[0], ort_outputs(model, f)[0]) for f in held_out).rel_l2
    assert result.report.verification.outputs["fc2/Add_out"].rel_l2 == pytest.approx(measured, rel=1e-6)
