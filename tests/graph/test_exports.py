"""Real exports through the graph pass: transformers GPT-2 (its `Conv1D` MLP, dynamo), BERT after
onnxruntime's transformers optimizer, timm DeiT-III (LayerScale) and PoolFormer (1x1-conv MLPs, a
LayerScale on the channel axis), built from random-init configs with every MLP activation swapped for
PReLU(1) by hand and biases and gammas randomised, saved with external data and fused from another
working directory: every MLP collapses, and the fused graph gives the torch model's output.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

from tests.exports import assert_matches_torch, export, fuse_elsewhere, prelu_one, randomise  # noqa: E402

B, S, D, FFN = 2, 8, 32, 64
TEXT = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
IMAGES = {"pixel_values": {0: "batch"}}


def text_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, -3:] = 0
    return {"input_ids": torch.randint(3, 100, (B, S), generator=gen), "attention_mask": mask}


def images(seed: int = 0) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(seed))}


def check(tmp_path: Path, model, inputs, source: Path, blocks: int) -> onnx.ModelProto:
    result = fuse_elsewhere(source, tmp_path / "fused.onnx", tmp_path / "elsewhere")
    assert result.collapsed == blocks, [(s.decision, s.reason) for s in result.report.sites]
    assert all(s.reason_kind == "exact" for s in result.report.collapsed)
    assert (tmp_path / "fused.onnx.data").exists() and list((tmp_path / "elsewhere").iterdir()) == []
    assert_matches_torch(tmp_path / "fused.onnx", model, inputs)
    fused = onnx.load(str(tmp_path / "fused.onnx"))
    assert [n.op_type for n in fused.graph.node].count("PRelu") == 0
    return fused


def test_gpt2_conv1d_mlps_collapse(tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=100, n_embd=D, n_layer=2, n_head=4, n_positions=64, n_inner=FFN
    )
    model = transformers.GPT2Model(config)
    for block in model.h:
        block.mlp.act = prelu_one()
    randomise(model)
    inputs = text_inputs()
    source = export(model, inputs, tmp_path / "gpt2.onnx", dynamo=True, dynamic=TEXT)
    fused = check(tmp_path, model, inputs, source, blocks=2)
    # Per block the attention's c_attn and c_proj stay, the MLP's c_fc and c_proj become one Gemm.
    assert [n.op_type for n in fused.graph.node].count("Gemm") == 2 * (2 + 1)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_bert_after_onnxruntimes_transformers_optimizer(tmp_path, dynamo):
    from onnxruntime.transformers.optimizer import optimize_model

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=D, num_hidden_layers=2, num_attention_heads=4, intermediate_size=FFN,
        max_position_embeddings=64, attn_implementation="eager",
    )  # fmt: skip
    model = transformers.BertModel(config, add_pooling_layer=False)
    for layer in model.encoder.layer:
        layer.intermediate.intermediate_act_fn = prelu_one()
    randomise(model)
    inputs = text_inputs()
    raw = export(model, inputs, tmp_path / "raw.onnx", dynamo=dynamo, dynamic=TEXT)
    optimized = optimize_model(str(raw), model_type="bert", num_heads=4, hidden_size=D)
    source = tmp_path / "bert.onnx"
    optimized.save_model_to_file(str(source), use_external_data_format=True)
    ops = {n.op_type for n in onnx.load(str(source), load_external_data=False).graph.node}
    assert "SkipLayerNormalization" in ops and (dynamo or "Attention" in ops)
    fused = check(tmp_path, model, inputs, source, blocks=2)
    assert {n.op_type for n in fused.graph.node} >= {"SkipLayerNormalization"}


def test_deit3_layerscale_mlps_collapse_with_their_gamma(tmp_path):
    model = timm.create_model(
        "deit3_small_patch16_224",
        img_size=32,
        patch_size=8,
        embed_dim=D,
        depth=2,
        num_heads=2,
        num_classes=10,
    )
    for block in model.blocks:
        block.mlp.act = prelu_one()
    randomise(model)
    inputs = images()
    source = export(model, inputs, tmp_path / "deit3.onnx", dynamo=True, dynamic=IMAGES)
    fused = check(tmp_path, model, inputs, source, blocks=2)
    original = onnx.load(str(source), load_external_data=False)
    muls = [[n.op_type for n in m.graph.node].count("Mul") for m in (original, fused)]
    assert muls[0] - muls[1] == 2  # each MLP's LayerScale folded into the collapsed layer


def test_poolformer_conv_mlps_collapse_into_1x1_convs(tmp_path):
    from timm.models.metaformer import GroupNorm1, MetaFormer

    # poolformer_s12's arguments (GroupNorm, 1x1-conv Mlp with bias, layer scale) at a small size.
    model = MetaFormer(
        depths=(1, 1, 1, 1), dims=(16, 16, 32, 32), downsample_norm=None, mlp_act=torch.nn.GELU,
        mlp_bias=True, norm_layers=GroupNorm1, layer_scale_init_values=1e-5, res_scale_init_values=None,
        use_mlp_head=False, num_classes=10,
    )  # fmt: skip
    for stage in model.stages:
        for block in stage.blocks:
            block.mlp.act = prelu_one()
    randomise(model)
    inputs = images()
    source = export(model, inputs, tmp_path / "poolformer.onnx", dynamo=True, dynamic=IMAGES)
    fused = check(tmp_path, model, inputs, source, blocks=4)
    # The stem's 7x7 and the one downsampling 3x3 stay; each MLP's two 1x1 convs become one, with the
    # GroupNorm's affine before it and the LayerScale after it folded in.
    kernels = [
        tuple(a.ints)
        for n in fused.graph.node
        if n.op_type == "Conv"
        for a in n.attribute
        if a.name == "kernel_shape"
    ]
    assert sorted(kernels) == [(1, 1)] * 4 + [(3, 3), (7, 7)]
    original = onnx.load(str(source), load_external_data=False)
    muls = [[n.op_type for n in m.graph.node].count("Mul") for m in (original, fused)]
    assert muls[0] - muls[1] == 4 + 4  # per MLP: the GroupNorm's scale before it, the LayerScale after it
