"""End to end: a timm ViT-Tiny whose last 6 MLP activations are PReLU(1), exported by both torch
exporters, fused by `lc-onnx fuse`."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from lc_onnx import cli
from lc_onnx.testing import ort_outputs, rel_l2

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

D = 192


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    for block in model.blocks:
        # timm zero-inits MLP biases; the exporters would then share one zero tensor across blocks,
        # which the pass rightly refuses to collapse.
        torch.nn.init.normal_(block.mlp.fc1.bias, std=0.02)
        torch.nn.init.normal_(block.mlp.fc2.bias, std=0.02)
    for block in model.blocks[-6:]:
        block.mlp.act = torch.nn.PReLU(init=1.0)
    return model


def export(model, path, dynamo: bool):
    x = torch.randn(1, 3, 224, 224)
    if dynamo:
        batch = torch.export.Dim("batch", min=1, max=64)
        torch.onnx.export(model, (x,), path, input_names=["x"], output_names=["y"], dynamo=True,
                          dynamic_shapes={"x": {0: batch}}, verbose=False)  # fmt: skip
    else:
        torch.onnx.export(model, (x,), path, input_names=["x"], output_names=["y"], dynamo=False, opset_version=17,
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})  # fmt: skip


def slope_initializers(model: onnx.ModelProto) -> dict[str, int]:
    """Initializers feeding PRelu slopes, directly or through Identity nodes: name -> element count."""
    producers = {out: node for node in model.graph.node for out in node.output}
    sizes = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type == "PRelu":
            name = node.input[1]
            while name in producers and producers[name].op_type == "Identity":
                name = producers[name].input[0]
            if name in sizes:
                found[name] = sizes[name]
    return found


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_vit_tiny_collapses_exactly_the_six_prelu_mlps(vit, tmp_path, dynamo):
    path, fused_path, report_path = tmp_path / "vit.onnx", tmp_path / "vit.fused.onnx", tmp_path / "r.json"
    export(vit, path, dynamo)
    assert cli.main(["fuse", str(path), "-o", str(fused_path), "--report", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    collapsed = [s for s in report["sites"] if s["decision"] == "collapsed"]
    assert len(collapsed) == 6
    assert all(s["activation"] == "PRelu" and s["exact"] for s in collapsed)
    original, fused = onnx.load(path), onnx.load(fused_path)
    # Exactly the six MLPs: each collapsed site holds one of the six PRelu nodes, and every PRelu is taken.
    prelus = sorted(n.name for n in original.graph.node if n.op_type == "PRelu")
    assert len(prelus) == 6
    assert sorted(n for s in collapsed for n in s["nodes"] if n in prelus) == prelus
    assert all(sum(n in prelus for n in s["nodes"]) == 1 for s in collapsed)
    slopes = slope_initializers(original)
    fused_names = {t.name for t in fused.graph.initializer}
    removed_slopes = sum(size for name, size in slopes.items() if name not in fused_names)
    assert removed_slopes >= 1
    assert report["params_before"] - report["params_after"] == 6 * (7 * D * D + 4 * D) + removed_slopes
    assert sum(n.op_type == "PRelu" for n in fused.graph.node) == 0
    assert (
        sum(n.op_type == "MatMul" for n in fused.graph.node)
        == sum(n.op_type == "MatMul" for n in original.graph.node) - 6
    )
    onnx.checker.check_model(fused, full_check=True)

    x = {"x": np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)}
    assert rel_l2(ort_outputs(fused, x)[0], ort_outputs(original, x)[0]) <= 1e-5
    assert max(o["rel_l2"] for o in report["verification"]["outputs"].values()) <= 1e-5
