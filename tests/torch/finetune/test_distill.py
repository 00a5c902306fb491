"""`lc-onnx finetune --objective distill`: post-training LayerCollapse on unlabeled text, a small random
BERT saved with its own WordPiece tokenizer (as `from_pretrained` directories are), end to end."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")

from lc_onnx.cli import main  # noqa: E402
from lc_onnx.model import runtime  # noqa: E402
from lc_onnx.torch.finetune.fidelity import pooled_cosine  # noqa: E402

WORDS = [
    "the",
    "a",
    "an",
    "of",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "with",
    "as",
    "by",
    "at",
    "from",
    "it",
    "this",
    "that",
    "be",
    "are",
    "or",
    "and",
    "not",
    "can",
    "function",
    "class",
    "module",
    "value",
    "object",
    "name",
    "type",
    "list",
    "string",
    "file",
    "data",
    "return",
    "call",
    "method",
    "error",
    "code",
]
LAYERS = 4


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A 4-layer BERT (hidden 32, FFN 64) with random weights and a tokenizer, saved as a directory."""
    root = tmp_path_factory.mktemp("bert")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(vocab))
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    model = transformers.BertModel(config)
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, size=int(rng.integers(4, 14)))) for _ in range(240)]
    path = tmp_path_factory.mktemp("text") / "lines.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def held_out_cosine(model_dir, fused_path, text_file) -> float:
    """Mean-pooled cosine of the fused ONNX model to the original torch model, computed here from the
    tokenizer and the split rule (every line whose CRC-32 is divisible by 10), not from the report."""
    import zlib

    lines = [line for line in text_file.read_text().splitlines() if line.strip()]
    held = [line for line in lines if zlib.crc32(line.encode()) % 10 == 0]
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    batch = tokenizer(held, padding=True, return_tensors="pt")
    with torch.no_grad():
        teacher = transformers.AutoModel.from_pretrained(model_dir).eval()(**batch).last_hidden_state
    session = runtime.session(fused_path)
    names = [i.name for i in session.get_inputs()]
    got = session.run(None, {k: v.numpy() for k, v in batch.items() if k in names})[0]
    return float(pooled_cosine(torch.from_numpy(got), teacher, batch["attention_mask"]).mean())


def test_distill_on_text_collapses_the_last_half_and_keeps_the_embeddings(bert_dir, text_file, tmp_path):
    out = tmp_path / "run"
    os.chdir(tmp_path)
    args = ["finetune", "--model", f"hf:{bert_dir}", "--dataset", f"text:{text_file}", "--fraction", "0.5"]
    args += ["--epochs", "2", "--out", str(out), "--no-progress", "--lr", "1e-3", "--batch-size", "16"]
    assert main(args) == 0  # the objective is distill by default for text:
    report = json.loads((out / "report.json").read_text())
    assert report["objective"] == "distill" and report["distill_loss"] == "cosine+mse"
    blocks = report["blocks"]
    assert (blocks["total"], blocks["targeted"], blocks["collapsed"]) == (LAYERS, 2, 2)
    assert blocks["not_collapsed"] == {}
    fid = report["fidelity"]
    assert fid["metric"] == "mean_pooled_cosine"
    assert set(fid) >= {"start", "before_collapse", "after_collapse_torch", "after_collapse_onnxruntime"}
    # the fused export computes what the collapsed torch model computes
    assert fid["after_collapse_onnxruntime"] == pytest.approx(fid["after_collapse_torch"], abs=1e-4)
    measured = held_out_cosine(bert_dir, out / "model.collapsed.onnx", text_file)
    assert measured == pytest.approx(fid["after_collapse_onnxruntime"], abs=1e-4)
    assert measured >= 0.8
    # the export: the tokenizer's input names, batch and sequence dynamic, hidden states out
    model = onnx.load(str(out / "model.collapsed.onnx"))
    inputs = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input
    }
    assert set(inputs) <= {"input_ids", "token_type_ids", "attention_mask"} and "input_ids" in inputs
    assert all(dims == ["batch", "sequence"] for dims in inputs.values())
    ops = [n.op_type for n in model.graph.node]
    # the 2 targeted FFNs are one MatMul (+ Add) each; the 2 others keep fc1, GELU, fc2
    assert "PRelu" not in ops and ops.count("Erf") == LAYERS - 2
    # 2 blocks of 32 -> 64 -> 32 (+ biases and the slope) became 32 -> 32
    removed = report["params"]["start"] - report["params"]["after_collapse_torch"]
    assert removed == 2 * ((32 * 64 + 64) + (64 * 32 + 32) - (32 * 32 + 32))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all("mean_pooled_cosine" in r for r in rows)
    # the student's own weights trained, not only its slopes (the teacher's stayed frozen)
    state = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    original = transformers.AutoModel.from_pretrained(bert_dir).state_dict()
    for key in ("encoder.layer.0.attention.self.query.weight", "encoder.layer.1.output.dense.weight"):
        assert not torch.equal(state[key], original[key]), key


def test_adaptive_depth_stops_at_the_budget(bert_dir, text_file, tmp_path):
    out = tmp_path / "run"
    args = ["finetune", "--model", f"hf:{bert_dir}", "--dataset", f"text:{text_file}", "--fraction", "1"]
    args += ["--epochs", "1", "--out", str(out), "--no-progress", "--lr", "1e-3", "--batch-size", "16"]
    args += ["--max-drop", "0.0"]  # nothing may be lost: the first stage already costs some cosine
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    adaptive = report["adaptive"]
    assert adaptive["blocks_reached"] == 0 and len(adaptive["stages"]) == 1
    assert adaptive["stages"][0]["block"] == f"encoder.layer.{LAYERS - 1}.intermediate.intermediate_act_fn"
    assert adaptive["stages"][0]["drop"] > 0.0 and "kept 0 block(s)" in adaptive["stopped"]
    assert report["blocks"]["collapsed"] == 0
    # the model kept is the unmodified one: the export computes the teacher's outputs
    assert report["fidelity"]["after_collapse_onnxruntime"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d, t: ["--dataset", f"text:{t.parent / 'missing.txt'}"], "no such file"),
        (lambda d, t: ["--dataset", f"text:{_empty(t)}"], "has no text"),
        (lambda d, t: ["--dataset", f"text:{_binary(t)}"], "not a readable UTF-8 text file"),
        (lambda d, t: ["--dataset", f"text:{t.parent}"], "not a readable UTF-8 text file"),
        (lambda d, t: ["--dataset", f"text:{t}", "--model", "hf-config:bert"], "has no tokenizer"),
        (lambda d, t: ["--dataset", f"text:{t}", "--model", "vgg-mlp"], "text needs a transformers model"),
        (lambda d, t: ["--dataset", f"text:{t}", "--distill-loss", "kl"], "kl compares logits"),
        (lambda d, t: ["--dataset", f"text:{t}", "--objective", "labels"], "--data have no labels"),
    ],
    ids=[
        "missing-file",
        "empty-file",
        "binary-file",
        "directory",
        "no-tokenizer",
        "not-transformers",
        "loss-cannot-compare",
        "labels",
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(bert_dir, text_file, tmp_path, capsys, make, message):
    out = tmp_path / "run"
    args = ["finetune", "--model", f"hf:{bert_dir}", "--out", str(out), "--no-progress", "--epochs", "1"]
    args += make(bert_dir, text_file)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())


def _empty(text_file):
    path = text_file.parent / "empty.txt"
    path.write_text("\n \n")
    return path


def _binary(text_file):
    path = text_file.parent / "weights.bin"
    path.write_bytes(bytes(range(128, 256)) * 4)
    return path


def test_distill_on_feeds_from_a_python_function(bert_dir, text_file, tmp_path):
    # The calibration recipes' convention: FILE.py:FN yields {input name: array}; every tenth feed
    # (the 1st, 11th, ...) is held out. Slopes start and stay at 1: the collapse is exact.
    script = tmp_path / "feeds.py"
    script.write_text(
        "import numpy as np\n"
        "from transformers import AutoTokenizer\n"
        f"LINES = open({str(text_file)!r}).read().split(chr(10))[:120]\n"
        "def feeds():\n"
        f"    tok = AutoTokenizer.from_pretrained({str(bert_dir)!r})\n"
        "    for i in range(0, len(LINES), 8):\n"
        "        enc = tok(LINES[i:i + 8], padding=True)\n"
        "        yield {k: np.asarray(enc[k], dtype=np.int64) for k in ('input_ids', 'attention_mask')}\n"
    )
    out = tmp_path / "run"
    args = ["finetune", "--model", f"hf:{bert_dir}", "--data", f"{script}:feeds", "--fraction", "1"]
    args += ["--epochs", "1", "--out", str(out), "--no-progress", "--init", "1", "--slope-lr", "0"]
    args += ["--lr", "0"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["objective"] == "distill"
    assert report["fidelity"]["held_out_batches"] == 2  # feeds 0 and 10 of 15
    assert report["blocks"]["collapsed"] == LAYERS and report["blocks"]["snapped"] == {}
    # nothing trained (lr 0) and every GELU replaced by the identity (slope 1): the student is the
    # untrained collapse, short of the teacher, and the collapse and the fused export change nothing
    fid = report["fidelity"]
    assert 0.5 < fid["start"] < 0.9999
    for key in ("before_collapse", "after_collapse_torch", "after_collapse_onnxruntime"):
        assert fid[key] == pytest.approx(fid["start"], abs=1e-5)
    assert report["blocks"]["collapsed_by_graph_pass"] == LAYERS
    inputs = [i.name for i in onnx.load(str(out / "model.collapsed.onnx")).graph.input]
    assert inputs == ["input_ids", "attention_mask"]


def test_distill_on_images_compares_logits(tmp_path):
    # An image classifier distilled into itself on digits images (labels ignored): kl on logits, top-1
    # agreement as the fidelity measure.
    out = tmp_path / "run"
    args = ["finetune", "--model", "vgg-mlp", "--dataset", "digits", "--objective", "distill"]
    args += ["--fraction", "1", "--epochs", "1", "--out", str(out), "--no-progress", "--img-size", "8"]
    args += ["--init", "1", "--slope-lr", "0", "--lr", "0"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["distill_loss"] == "kl"
    fid = report["fidelity"]
    assert fid["metric"] == "top1_agreement" and fid["held_out_batches"] == 12  # 360 test images / 32
    assert report["blocks"]["collapsed"] == 2
    # untrained (lr 0), every ReLU now the identity: the collapse and the fused export change nothing
    assert fid["kl"]["before_collapse"] > 1e-6  # the student is not the teacher
    assert fid["after_collapse_onnxruntime"] == fid["after_collapse_torch"] == fid["before_collapse"]
    assert fid["kl"]["after_collapse_onnxruntime"] == pytest.approx(fid["kl"]["before_collapse"], rel=1e-4)


def test_distill_keeps_a_pretrained_classifiers_own_head(tmp_path):
    # A transformers image classifier saved with 3 labels, distilled on digits images (10 classes, labels
    # ignored): the teacher is the checkpoint as saved, so the student and its export answer 3 logits.
    config = transformers.ViTConfig(
        image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    out = tmp_path / "run"
    args = ["finetune", "--model", f"hf:{tmp_path / 'vit'}", "--dataset", "digits", "--objective", "distill"]
    args += ["--fraction", "1", "--epochs", "1", "--out", str(out), "--no-progress", "--lr", "1e-3"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["distill_loss"] == "kl" and report["blocks"]["collapsed"] == 2
    model = onnx.load(str(out / "model.collapsed.onnx"))
    assert [d.dim_param or d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim] == [
        "batch",
        3,
    ]
    agreement = report["fidelity"]["after_collapse_onnxruntime"]
    assert agreement == pytest.approx(report["fidelity"]["after_collapse_torch"], abs=1 / 360)
