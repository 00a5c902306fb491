"""Text as calibration data: `--data text:FILE --tokenizer DIR`, one example per line through the model's own
tokenizer, the lines whose CRC-32 is divisible by 10 held out, and its bad inputs."""

from __future__ import annotations

import json
import math
import sys
import zlib

import numpy as np
import onnx
import pytest

from lc_onnx.calibration import text
from lc_onnx.cli import main
from lc_onnx.errors import UserError
from lc_onnx.testing import GraphBuilder

transformers = pytest.importorskip("transformers")

WORDS = [
    "the",
    "a",
    "model",
    "layer",
    "graph",
    "text",
    "token",
    "linear",
    "fuse",
    "data",
    "line",
    "held",
    "out",
    "fit",
    "each",
    "one",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizer")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(root / "tok")
    return root / "tok"


def token_model(ids: str = "input_ids", vocab: int = 5 + len(WORDS)) -> onnx.ModelProto:
    """ids, mask [N, T] -> embedding * mask -> MatMul+Add -> Relu -> MatMul+Add: one site (Relu)."""
    g = GraphBuilder()
    tokens = g.input(ids, ["N", "T"], onnx.TensorProto.INT64)
    mask = g.input("attention_mask", ["N", "T"], onnx.TensorProto.INT64)
    embedded = g.node("Gather", [g.init("embedding", g.random((vocab, 16))), tokens])
    weight = g.node("Unsqueeze", [g.node("Cast", [mask], to=1), g.init("axis", np.array([-1]), np.int64)])
    h = g.node("Relu", [g.matmul(g.node("Mul", [embedded, weight]), 16, 32, name="fc1")], name="act")
    g.output(g.matmul(h, 32, 16, name="fc2"), ["N", "T", 16])
    return g.model()


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, size=rng.integers(2, 12))) + f" {i}" for i in range(200)]
    path = tmp_path / "lines.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def save(model: onnx.ModelProto, path):
    onnx.save(model, path)
    return path


def test_text_data_feeds_the_model_from_its_tokenizer_and_holds_out_lines_by_crc(
    tmp_path, corpus, tokenizer_dir, monkeypatch
):
    model = save(token_model(), tmp_path / "m.onnx")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # absolute paths, another working directory
    argv = ["fuse", str(model), "--data", f"text:{corpus}", "--tokenizer", str(tokenizer_dir),
            "--max-error", "10", "-o", str(tmp_path / "f.onnx"), "--report", str(tmp_path / "r.json")]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    train, held = text.split(text.read_lines(corpus, "data"))
    assert len(held) == sum(
        1 for line in corpus.read_text().splitlines() if zlib.crc32(line.encode()) % 10 == 0
    )
    assert report["verification"]["feeds"] == math.ceil(
        len(held) / text.BATCH
    )  # verified on the held-out lines
    (site,) = report["sites"]
    assert site["decision"] == "collapsed" and site["reason_kind"] == "least_squares"
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    tokens = {line: len(tokenizer(line)["input_ids"]) for line in [*train, *held]}
    # Padding never enters a fit: the rows fitted are the training lines' real tokens.
    assert site["least_squares"]["rows"] == sum(tokens[line] for line in train)
    # The feeds are the tokenizer's, lines batched by length: the first held-out batch is padded to the
    # longest of the shortest 32 held-out lines.
    shortest = sorted(tokens[line] for line in held)[: text.BATCH]
    assert report["verification"]["feed_shapes"]["input_ids"][1] == max(shortest)
    assert report["verification"]["feed_shapes"]["attention_mask"][1] == max(shortest)


def test_calibrate_fits_on_the_lines_not_held_out(tmp_path, corpus, tokenizer_dir, capsys):
    model = save(token_model(), tmp_path / "m.onnx")
    argv = ["calibrate", str(model), "--data", f"text:{corpus}", "--tokenizer", str(tokenizer_dir), "-o", str(tmp_path / "fits.json")]  # fmt: skip
    assert main(argv) == 0
    train, _ = text.split(text.read_lines(corpus, "data"))
    assert (
        f"1 activation(s) fitted on {math.ceil(len(train) / text.BATCH)} batch(es)" in capsys.readouterr().out
    )


def bad_cases(corpus, tokenizer_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    return {
        "text without a tokenizer": (["--data", f"text:{corpus}"], "needs the model's --tokenizer"),
        "a tokenizer without text": (
            ["--tokenizer", str(tokenizer_dir)],
            "--tokenizer applies to text data only",
        ),
        "calib batches with text": (
            ["--data", f"text:{corpus}", "--tokenizer", str(tokenizer_dir), "--calib-batches", "2"],
            "--calib-batches does not apply to text data",
        ),  # fmt: skip
        "an empty file": (["--data", f"text:{empty}", "--tokenizer", str(tokenizer_dir)], "has no text"),
        "a missing file": (
            ["--data", f"text:{tmp_path / 'no.txt'}", "--tokenizer", str(tokenizer_dir)],
            "no such file",
        ),  # fmt: skip
        "no tokenizer there": (
            ["--data", f"text:{corpus}", "--tokenizer", str(tmp_path)],
            "no tokenizer could be loaded",
        ),  # fmt: skip
        "max length 0": (
            ["--data", f"text:{corpus}", "--tokenizer", str(tokenizer_dir), "--max-length", "0"],
            "--max-length must be >= 1",
        ),  # fmt: skip
    }


@pytest.mark.parametrize(
    "case",
    ["text without a tokenizer", "a tokenizer without text", "calib batches with text", "an empty file", "a missing file",
     "no tokenizer there", "max length 0", "tokenizer outputs are not the model's inputs"],
)  # fmt: skip
def test_bad_text_data_is_one_line_exit_2_and_nothing_written(tmp_path, corpus, tokenizer_dir, capsys, case):
    work = tmp_path / "work"
    work.mkdir()
    if case == "tokenizer outputs are not the model's inputs":
        model = save(token_model(ids="ids"), work / "m.onnx")
        flags, message = (
            ["--data", f"text:{corpus}", "--tokenizer", str(tokenizer_dir)],
            "not the model input 'ids'",
        )
    else:
        model = save(token_model(), work / "m.onnx")
        flags, message = bad_cases(corpus, tokenizer_dir, tmp_path)[case]
    before = {p: p.read_bytes() for p in work.iterdir()}
    code = main(["fuse", str(model), *flags, "-o", str(work / "out.onnx")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and message in err and "Traceback" not in err, err
    assert {p: p.read_bytes() for p in work.iterdir()} == before


def test_without_transformers_text_data_names_the_torch_extra(tmp_path, corpus, tokenizer_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    with pytest.raises(UserError, match=r"pip install 'lc-onnx\[torch\]'"):
        text.load_tokenizer(tokenizer_dir)
