from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import numpy as np  # noqa: E402

import lc_onnx  # noqa: E402
from lc_onnx.torch import collapse, export_onnx, make_collapsible  # noqa: E402
from tests.torch import nets  # noqa: E402

EXPORTERS = [pytest.param(False, id="torchscript"), pytest.param(True, id="dynamo")]
CASES = [
    # (model, fraction, blocks made collapsible, collapsed sites: VGG's two blocks share a Linear -> one,
    # GELU blocks left)
    pytest.param(nets.vit, 0.5, 2, 2, 2, id="vit"),
    pytest.param(nets.mixer, 1.0, 6, 6, 0, id="mixer"),
    pytest.param(nets.vgg, 1.0, 2, 1, 0, id="vgg-bn"),
]


def _ops(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


def _tensors(model: torch.nn.Module) -> int:
    """Float parameters and buffers: ONNX initializers also hold batch-norm running statistics."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() for t in tensors if t.is_floating_point())


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize(("build", "fraction", "n_blocks", "n_sites", "n_gelu"), CASES)
def test_export_keeps_prelu_then_fuse_collapses_the_same_blocks(
    tmp_path, build, fraction, n_blocks, n_sites, n_gelu, dynamo
):
    torch.manual_seed(0)
    model = nets.randomise(build())
    names = make_collapsible(model, fraction=fraction, init=1.0)
    assert len(names) == n_blocks
    # Distinct slopes one float32 step or so above 1: equal slopes would be deduplicated into one
    # initializer by the exporters, which makes ONNX and torch parameter counts differ.
    with torch.no_grad():
        for k, name in enumerate(names):
            model.get_submodule(name).weight.fill_(1.0 + k * 2.0**-22)
    path = export_onnx(model, nets.images(2), tmp_path / "m.onnx", dynamo=dynamo)
    exported = onnx.load(str(path))
    assert _ops(exported).count("PRelu") == n_blocks
    assert exported.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch

    # Batch 5 differs from the export's batch 2: the dynamic batch works in onnxruntime.
    x = nets.images(5, seed=7)
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(_run(exported, x.numpy()), expected, rtol=1e-4, atol=1e-5)

    result = lc_onnx.fuse(path)
    report = result.report.to_dict()
    collapsed_sites = [s for s in report["sites"] if s["decision"] == "collapsed"]
    assert len(collapsed_sites) == n_sites, report["sites"]
    # the other sites are the blocks left with their GELU (the pass lists them as skipped)
    skipped = [s["activation"] for s in report["sites"] if s["decision"] != "collapsed"]
    assert skipped == ["Gelu"] * n_gelu
    assert "PRelu" not in _ops(result.model)

    # The graph pass and the torch collapse agree on the result.
    params_before = _tensors(model)
    torch_linears = collapse(model)
    assert len(torch_linears) == n_sites
    with torch.no_grad():
        collapsed_torch = model(x).numpy()
    np.testing.assert_allclose(_run(result.model, x.numpy()), collapsed_torch, rtol=1e-4, atol=1e-5)
    params_after = _tensors(model)
    assert report["params_before"] - report["params_after"] == params_before - params_after


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_export_is_atomic_and_restores_training_mode(tmp_path, dynamo):
    model = nets.vgg().train()
    target = tmp_path / "m.onnx"
    target.write_bytes(b"old")
    with pytest.raises(Exception):  # noqa: B017 - a 2-D input cannot go through Conv2d; any exporter error
        export_onnx(model, torch.randn(2, 3), target, dynamo=dynamo)
    assert target.read_bytes() == b"old"
    assert model.training
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_export_of_a_transformers_model_with_keyword_inputs(tmp_path, dynamo):
    """A dict of keyword arguments names the inputs; the output is the ModelOutput's first tensor."""
    pytest.importorskip("transformers")
    from tests.torch.families import text

    model = _tiny_bert_classifier()
    inputs = text()(0)
    path = export_onnx(model, inputs, tmp_path / "bert.onnx", dynamo=dynamo)
    assert model.training  # restored
    exported = onnx.load(str(path))
    assert [i.name for i in exported.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in exported.graph.output] == ["output"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    with torch.no_grad():
        expected = model.eval()(**inputs).logits.numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def _tiny_bert_classifier():
    import transformers

    config = transformers.BertConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    return transformers.BertForSequenceClassification(config).train()
