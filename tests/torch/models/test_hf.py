"""transformers models for `lc-onnx finetune`: `hf:DIR_OR_NAME` (from_pretrained, with its processor) and
`hf-config:TYPE_OR_DIR` (random weights from a config), offline."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("sklearn")
onnx = pytest.importorskip("onnx")

from lc_onnx.cli import main  # noqa: E402
from lc_onnx.errors import UserError  # noqa: E402
from lc_onnx.torch.data.datasets import ImageFormat  # noqa: E402
from lc_onnx.torch.models import builders, hf  # noqa: E402

TINY_VIT = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32}
TINY_VIT_ARGS = [arg for key, value in TINY_VIT.items() for arg in ("--model-arg", f"{key}={value}")]
TINY_VIT_ARGS += ["--model-arg", "patch_size=4"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def vit_dir(tmp_path):
    """A saved tiny ViT classifier (3 labels) and its image processor (16x16, its own mean and std)."""
    path = tmp_path / "vit"
    config = transformers.ViTConfig(image_size=16, patch_size=4, num_labels=3, **TINY_VIT)
    transformers.ViTForImageClassification(config).save_pretrained(path)
    processor = transformers.ViTImageProcessor(
        size={"height": 16, "width": 16}, image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.4]
    )
    processor.save_pretrained(path)
    return path


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("hf:google/vit-base-patch16-224", hf.HFModel("google/vit-base-patch16-224", True)),
        ("hf-config:vit", hf.HFModel("vit", False)),
        ("vit_tiny_patch16_224", None),
        ("vgg-mlp", None),
    ],
)
def test_parse(spec, expected):
    assert hf.parse(spec) == expected


def test_an_empty_name_is_a_user_error():
    with pytest.raises(UserError, match=r"^model hf-config:: name a directory, a Hub model or a model type$"):
        hf.parse("hf-config:")


def test_from_config_builds_a_random_classifier_for_the_image_size():
    model = builders.build_model("hf-config:vit", 10, 8, kwargs={**TINY_VIT, "patch_size": 4})
    assert type(model) is hf.Logits and type(model.model).__name__ == "ViTForImageClassification"
    config = model.model.config
    assert (config.image_size, config.patch_size, config.num_labels, config.hidden_size) == (8, 4, 10, 16)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)
    assert builders.image_format("hf-config:vit", 8, TINY_VIT) == ImageFormat(8)


def test_pretrained_loads_weights_a_new_head_and_the_processors_image_format(vit_dir):
    saved = transformers.ViTForImageClassification.from_pretrained(vit_dir)
    model = builders.build_model(f"hf:{vit_dir}", 10, 8)
    assert model.model.classifier.out_features == 10  # the checkpoint's head had 3 outputs
    dense = "vit.layers.0.mlp.fc1.weight"
    assert torch.equal(model.model.state_dict()[dense], saved.state_dict()[dense])
    assert builders.image_format(f"hf:{vit_dir}", 8) == ImageFormat(16, (0.4, 0.5, 0.6), (0.2, 0.3, 0.4))


def test_features_task_loads_the_bare_model_and_its_tokenizer(tmp_path):
    """`AutoModel` without a head, and the tokenizer saved with it: what distillation on text needs."""
    path = tmp_path / "bert"
    config = transformers.BertConfig(
        vocab_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    transformers.BertModel(config).save_pretrained(path)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "!"]) + "\n")
    transformers.BertTokenizer(str(vocab)).save_pretrained(path)
    source = hf.parse(f"hf:{path}", task="features")
    assert type(source.model()).__name__ == "BertModel"
    tokenizer = source.processor()
    assert tokenizer("hello world")["input_ids"] == [2, 5, 6, 3]


@pytest.mark.parametrize(
    ("spec", "kwargs", "message"),
    [
        ("hf-config:vit", {"hiden_size": 16}, "model hf-config:vit: ViTConfig has no field 'hiden_size'"),
        (
            "hf-config:bert",
            {},
            "model hf-config:bert: transformers builds no AutoModelForImageClassification",
        ),
        ("hf:{tmp}/missing", {}, "model hf:{tmp}/missing: cannot load its config"),
    ],
)
def test_bad_models_are_user_errors(tmp_path, spec, kwargs, message):
    spec, message = spec.replace("{tmp}", str(tmp_path)), message.replace("{tmp}", str(tmp_path))
    with pytest.raises(UserError) as exc:
        builders.build_model(spec, 10, 8, kwargs=kwargs)
    assert str(exc.value).startswith(message)
    assert exc.value.params == ("model",)


def test_finetune_cli_on_a_random_transformers_vit(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["finetune", "--model", "hf-config:vit", *TINY_VIT_ARGS, "--img-size", "8", "--epochs", "1"]
    args += ["--fraction", "1.0", "--init", "1.0", "--slope-lr", "0", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    blocks = report["blocks"]
    assert blocks["collapsed_at_end"] == [f"model.vit.layers.{i}.mlp.activation_fn" for i in range(2)]
    assert (blocks["total"], blocks["collapsed"], blocks["collapsed_by_graph_pass"]) == (2, 2, 2)
    assert blocks["refused"] == []
    acc = report["accuracy"]
    assert acc["after_collapse_onnxruntime"] == pytest.approx(
        acc["after_collapse_torch"], abs=100 / 360 + 1e-9
    )
    fused = onnx.load(str(out / "model.collapsed.onnx"))
    assert [n.op_type for n in fused.graph.node].count("PRelu") == 0
    assert "2/2 MLP blocks collapsed" in capsys.readouterr().out


def test_finetune_cli_on_a_pretrained_directory_uses_its_image_size(tmp_path, vit_dir):
    out = tmp_path / "run"
    args = ["finetune", "--model", f"hf:{vit_dir}", "--img-size", "8", "--epochs", "1", "--fraction", "0.5"]
    args += ["--init", "1.0", "--slope-lr", "0", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    exported = onnx.load(str(out / "model.onnx"))
    dims = [d.dim_value or d.dim_param for d in exported.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, 16, 16]  # the processor's size, not --img-size
    report = json.loads((out / "report.json").read_text())
    assert report["blocks"]["collapsed_at_end"] == ["model.vit.layers.1.mlp.activation_fn"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model", "hf-config:vit", "--pretrained"], "--model hf-config:vit --pretrained: hf-config: models have random weights"),
        (["--model", "hf-config:vit", "--model-arg", "hiden_size=8"], "--model hf-config:vit: ViTConfig has no field 'hiden_size'"),
    ],
)  # fmt: skip
def test_finetune_cli_hf_user_errors(tmp_path, capsys, extra, message):
    out = tmp_path / "o"
    assert main(["finetune", "--epochs", "1", *extra, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lc-onnx finetune: error: ") and message in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()
