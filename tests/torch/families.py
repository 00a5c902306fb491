"""The public model matrix: small random-init configs of the model families users bring (no download).

Each `Family` builds its model, its example inputs (batch 2; text: 8 tokens, images: 32x32), the axes the
export makes dynamic, how many MLP blocks `make_collapsible` must find, how many sites the graph pass
must collapse in the export (a chain of blocks sharing a Linear is one site) and the exporter of the
default test run. `test_matrix.py` runs it; the README's "Supported models" table is checked against it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

B, S, D, FFN, IMG = 2, 8, 32, 64, 32
TEXT = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
IMAGES = {"pixel_values": {0: "batch"}}
DYNAMO, TORCHSCRIPT = "dynamo", "torchscript"


@dataclass(frozen=True)
class Family:
    """One row of the matrix.

    Attributes:
        library, name, model: as the README table writes them (`model`: the class and its depth).
        build: the random-init model.
        inputs: `seed -> {name: tensor}`, passed to the model by name (transformers) or position.
        dynamic: per input, the axes the export keeps symbolic.
        blocks: MLP blocks `make_collapsible` finds.
        sites: sites the graph pass collapses in the export (`blocks` unless blocks share a layer).
        default: the exporter of the default test run (the other one is `slow`).
        xfail: exporter -> why the graph pass fails there (marked `xfail(strict=True)`).
    """

    library: str
    name: str
    model: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int], dict[str, torch.Tensor]]
    dynamic: Mapping[str, Mapping[int, str]]
    blocks: int
    sites: int
    default: str = DYNAMO
    xfail: Mapping[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.library}-{self.name}".lower().replace(" ", "-").replace(",", "")


def text(vocab: int = 100, low: int = 3) -> Callable[[int], dict[str, torch.Tensor]]:
    def make(seed: int = 0) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        mask = torch.ones(B, S, dtype=torch.long)
        mask[1, -3:] = 0
        return {"input_ids": torch.randint(low, vocab, (B, S), generator=gen), "attention_mask": mask}

    return make


def images(size: int = IMG, name: str = "pixel_values") -> Callable[[int], dict[str, torch.Tensor]]:
    def make(seed: int = 0) -> dict[str, torch.Tensor]:
        return {name: torch.randn(B, 3, size, size, generator=torch.Generator().manual_seed(seed))}

    return make


def mel(seed: int = 0) -> dict[str, torch.Tensor]:
    return {"input_features": torch.randn(B, 16, 32, generator=torch.Generator().manual_seed(seed))}


# -- transformers ---------------------------------------------------------------------------------------


def bert(layers: int = 6) -> nn.Module:
    import transformers

    config = transformers.BertConfig(
        vocab_size=100, hidden_size=D, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=FFN, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.BertModel(config, add_pooling_layer=False)


def roberta() -> nn.Module:
    import transformers

    config = transformers.RobertaConfig(
        vocab_size=100, hidden_size=D, num_hidden_layers=2, num_attention_heads=4, intermediate_size=FFN,
        max_position_embeddings=64, pad_token_id=1,
    )  # fmt: skip
    return transformers.RobertaModel(config, add_pooling_layer=False)


def distilbert() -> nn.Module:
    import transformers

    config = transformers.DistilBertConfig(
        vocab_size=100, dim=D, n_layers=2, n_heads=4, hidden_dim=FFN, max_position_embeddings=64
    )
    return transformers.DistilBertModel(config)


def gpt2(layers: int = 4) -> nn.Module:
    import transformers

    config = transformers.GPT2Config(
        vocab_size=100, n_embd=D, n_layer=layers, n_head=4, n_positions=64, n_inner=FFN, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2Model(config)


def hf_vit() -> nn.Module:
    import transformers

    config = transformers.ViTConfig(
        image_size=IMG, patch_size=8, hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=FFN,
    )  # fmt: skip
    return transformers.ViTModel(config, add_pooling_layer=False)


def clip_text(layers: int = 4) -> nn.Module:
    import transformers

    config = transformers.CLIPTextConfig(
        vocab_size=100, hidden_size=D, intermediate_size=FFN, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=32, bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )  # fmt: skip
    return transformers.CLIPTextModel(config)


def clip_vision(layers: int = 4) -> nn.Module:
    import transformers

    config = transformers.CLIPVisionConfig(
        hidden_size=D, intermediate_size=FFN, num_hidden_layers=layers, num_attention_heads=4,
        image_size=IMG, patch_size=8,
    )  # fmt: skip
    return transformers.CLIPVisionModel(config)


def whisper_encoder() -> nn.Module:
    import transformers
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    config = transformers.WhisperConfig(
        vocab_size=100, num_mel_bins=16, d_model=D, encoder_layers=2, decoder_layers=1,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=FFN, decoder_ffn_dim=FFN,
        max_source_positions=16, max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1,
    )  # fmt: skip
    return WhisperEncoder(config)


def t5_encoder(proj: str = "relu") -> nn.Module:
    import transformers

    config = transformers.T5Config(
        vocab_size=100, d_model=D, d_kv=8, d_ff=FFN, num_layers=2, num_heads=4, feed_forward_proj=proj
    )
    return transformers.T5EncoderModel(config)


# -- timm -----------------------------------------------------------------------------------------------

_VIT = {"img_size": IMG, "patch_size": 8, "embed_dim": D, "depth": 2, "num_heads": 2, "num_classes": 10}


def timm_vit() -> nn.Module:
    import timm

    return timm.create_model("vit_tiny_patch16_224", **_VIT)


def timm_deit3() -> nn.Module:
    import timm

    return timm.create_model("deit3_small_patch16_224", **_VIT)


def timm_cait() -> nn.Module:
    import timm

    return timm.create_model("cait_xxs24_224", **_VIT, depth_token_only=1)


def timm_mixer() -> nn.Module:
    from timm.models.mlp_mixer import MlpMixer

    return MlpMixer(img_size=IMG, patch_size=8, num_blocks=2, embed_dim=D, num_classes=10)


def timm_convnext(conv_mlp: bool = False) -> nn.Module:
    import timm

    return timm.create_model(
        "convnext_atto", depths=(1, 1, 1, 1), dims=(32, 32, 64, 64), num_classes=10, conv_mlp=conv_mlp
    )


def timm_poolformer() -> nn.Module:
    from timm.models.metaformer import GroupNorm1, MetaFormer

    # poolformer_s12's arguments (GroupNorm, 1x1-conv Mlp with bias, layer scale) at a small size.
    return MetaFormer(
        depths=(1, 1, 1, 1), dims=(16, 16, 32, 32), downsample_norm=None, mlp_act=nn.GELU, mlp_bias=True,
        norm_layers=GroupNorm1, layer_scale_init_values=1e-5, res_scale_init_values=None,
        use_mlp_head=False, num_classes=10,
    )  # fmt: skip


def timm_swin() -> nn.Module:
    import timm

    return timm.create_model(
        "swin_tiny_patch4_window7_224", img_size=IMG, patch_size=4, window_size=4, embed_dim=D,
        depths=(2, 2), num_heads=(2, 4), num_classes=10,
    )  # fmt: skip


# -- torchvision ----------------------------------------------------------------------------------------


def tv_vit() -> nn.Module:
    import torchvision

    return torchvision.models.VisionTransformer(
        image_size=IMG, patch_size=8, num_layers=2, num_heads=2, hidden_dim=D, mlp_dim=FFN, num_classes=10
    )


def tv_swin() -> nn.Module:
    import torchvision

    return torchvision.models.SwinTransformer(
        patch_size=[4, 4], embed_dim=D, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4], num_classes=10
    )


def tv_convnext() -> nn.Module:
    import torchvision
    from torchvision.models.convnext import CNBlockConfig

    return torchvision.models.ConvNeXt([CNBlockConfig(32, 64, 1), CNBlockConfig(64, None, 1)], num_classes=10)


def tv_vgg() -> nn.Module:
    """torchvision's `VGG` class with small features; the classifier vgg11's
    `Linear ReLU Dropout Linear ReLU Dropout Linear`, 64 wide."""
    import torchvision

    model = torchvision.models.VGG(
        torchvision.models.vgg.make_layers([16, "M", 32, "M", 64, "M"]), num_classes=10
    )
    model.classifier = nn.Sequential(
        nn.Linear(64 * 7 * 7, 64), nn.ReLU(True), nn.Dropout(), nn.Linear(64, 64), nn.ReLU(True),
        nn.Dropout(), nn.Linear(64, 10),
    )  # fmt: skip
    return model


T5_DYNAMO = (
    "the torch exporter, not the graph pass: torch.onnx.export(dynamo=True) of transformers 5.24's T5 "
    "fails in torch.export's decomposition (view of the transposed attention output), with a dynamic "
    "batch alone too"
)

FAMILIES: list[Family] = [
    Family("transformers", "BERT", "`BertModel`, 6 layers", bert, text(), TEXT, 6, 6),
    Family("transformers", "RoBERTa", "`RobertaModel`, 2 layers", roberta, text(), TEXT, 2, 2),
    Family("transformers", "DistilBERT", "`DistilBertModel`, 2 layers", distilbert, text(), TEXT, 2, 2),
    Family("transformers", "GPT-2", "`GPT2Model` (`Conv1D`), 4 layers", gpt2, text(), TEXT, 4, 4),
    Family("transformers", "ViT", "`ViTModel`, 2 layers", hf_vit, images(), IMAGES, 2, 2),
    Family("transformers", "CLIP text", "`CLIPTextModel`, 4 layers", clip_text, text(), TEXT, 4, 4),
    Family("transformers", "CLIP vision", "`CLIPVisionModel`, 4 layers", clip_vision, images(), IMAGES, 4, 4),
    Family(
        "transformers",
        "Whisper encoder",
        "`WhisperEncoder`, 2 layers",
        whisper_encoder,
        mel,
        {"input_features": {0: "batch"}},
        2,
        2,
    ),  # fmt: skip
    Family(
        "transformers",
        "T5 encoder",
        "`T5EncoderModel` (ReLU), 2 layers",
        t5_encoder,
        text(),
        TEXT,
        2,
        2,
        default=TORCHSCRIPT,
        xfail={DYNAMO: T5_DYNAMO},
    ),  # fmt: skip
    Family("timm", "ViT", "`vit_tiny_patch16_224`, depth 2", timm_vit, images(), IMAGES, 2, 2),
    Family(
        "timm",
        "DeiT-III",
        "`deit3_small_patch16_224` (LayerScale), depth 2",
        timm_deit3,
        images(),
        IMAGES,
        2,
        2,
    ),
    Family(
        "timm", "CaiT", "`cait_xxs24_224`, depth 2 + 1 class-attention", timm_cait, images(), IMAGES, 3, 3
    ),
    Family(
        "timm", "Mixer", "`MlpMixer`, 2 blocks (token and channel MLPs)", timm_mixer, images(), IMAGES, 4, 4
    ),
    Family("timm", "ConvNeXt", "`convnext_atto`, 4 stages of 1 block", timm_convnext, images(), IMAGES, 4, 4),
    Family(
        "timm",
        "ConvNeXt, conv_mlp",
        "`convnext_atto`, `conv_mlp=True` (1x1 convs)",
        lambda: timm_convnext(conv_mlp=True),
        images(),
        IMAGES,
        4,
        4,
    ),  # fmt: skip
    Family(
        "timm",
        "PoolFormer",
        "`MetaFormer` as poolformer_s12 (1x1 convs), 4 stages",
        timm_poolformer,
        images(),
        IMAGES,
        4,
        4,
    ),
    Family(
        "timm",
        "Swin",
        "`swin_tiny_patch4_window7_224`, depths (2, 2)",
        timm_swin,
        images(),
        IMAGES,
        4,
        4,
        default=TORCHSCRIPT,
    ),  # fmt: skip
    Family("torchvision", "ViT", "`VisionTransformer`, 2 layers", tv_vit, images(), IMAGES, 2, 2),
    Family(
        "torchvision",
        "Swin",
        "`SwinTransformer`, depths (2, 2)",
        tv_swin,
        images(),
        IMAGES,
        4,
        4,
        default=TORCHSCRIPT,
    ),  # fmt: skip
    Family("torchvision", "ConvNeXt", "`ConvNeXt`, 2 stages of 1 block", tv_convnext, images(), IMAGES, 2, 2),
    # 56x56 images: the TorchScript exporter cannot write AdaptiveAvgPool2d(7) of a 4x4 map. Its two blocks
    # share a Linear: one chain, collapsed into one layer.
    Family("torchvision", "VGG", "`VGG`, vgg11's classifier 64 wide", tv_vgg, images(56), IMAGES, 2, 1),
]


def table() -> str:
    """The README's "Supported models" table, from `FAMILIES` (bold: the exporter of the default run)."""
    lines = [
        "| library | family | model (random init) | MLP blocks found | layers after `collapse` "
        "| dynamo export: sites collapsed | TorchScript export: sites collapsed |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for f in FAMILIES:
        cells = []
        for exporter in (DYNAMO, TORCHSCRIPT):
            cell = "export fails¹" if exporter in f.xfail else str(f.sites)
            cells.append(f"**{cell}**" if exporter == f.default else cell)
        lines.append(
            f"| {f.library} | {f.name} | {f.model} | {f.blocks} | {f.sites} | {cells[0]} | {cells[1]} |"
        )
    return "\n".join(lines) + "\n"
