"""`--dataset text:FILE`: lines, the fixed held-out split, tokenized batches, and bad files."""

from __future__ import annotations

import zlib

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lc_onnx.errors import UserError  # noqa: E402
from lc_onnx.torch.data.text import TextDataset, read_lines, split  # noqa: E402

WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "ran", "far", "and", "then", "slept"]


def wordpiece(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return transformers.BertTokenizerFast(vocab_file=str(vocab))


def test_lines_and_a_fixed_held_out_split(tmp_path):
    lines = [f"the cat sat {i}" for i in range(200)]
    path = tmp_path / "t.txt"
    path.write_text("\n\n".join(f"  {line} " for line in lines) + "\n")
    assert read_lines(path) == lines
    train, held = split(lines)
    assert held == [line for line in lines if zlib.crc32(line.encode()) % 10 == 0]
    assert 5 < len(held) < 40 and sorted(train + held) == sorted(lines)
    assert split(list(reversed(lines)))[1] == list(reversed(held))  # by example, not by position


def test_tokenized_batches_pad_to_the_longest(tmp_path):
    data = TextDataset.from_lines(
        ["the cat sat", "the dog ran far and then slept on the mat"], wordpiece(tmp_path), 8
    )
    batch = data.collate([data[0], data[1]])
    assert batch["input_ids"].shape == (2, 8) and batch["attention_mask"].tolist()[0] == [1] * 5 + [0] * 3


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        (b"\xff\xfe\x00bad", "not a readable UTF-8 text file"),
        (b"\n  \n", "has no text"),
    ],
)
def test_bad_files_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "t.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=message) as err:
        read_lines(path)
    assert str(err.value).startswith("dataset text:") and "\n" not in str(err.value)
