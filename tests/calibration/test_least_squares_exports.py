"""The least-squares block fit on models as users have them: a random-init transformers BERT and a timm
ViT (GELU MLPs, biases drawn away from zero), exported by both torch exporters, saved with external data,
fused by the command line from another working directory with `.npz` calibration data: one block
replaced, padding left out of its fit, the report's verification equal to an independent onnxruntime
run on the held-out feeds, and the input untouched."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

from lc_onnx import cli  # noqa: E402
from lc_onnx.testing import ort_outputs, rel_l2  # noqa: E402
from tests.exports import export, randomise  # noqa: E402

FEEDS = 12  # every 4th is held out: 9 fitted, 3 held out


def bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, attn_implementation="eager",
    )  # fmt: skip
    model = randomise(transformers.BertModel(config, add_pooling_layer=False))
    rng = np.random.default_rng(0)
    feeds = []
    for _ in range(FEEDS):
        lengths = rng.integers(3, 9, size=4)
        mask = (np.arange(8)[None, :] < lengths[:, None]).astype(np.int64)
        feeds.append(
            {"input_ids": np.where(mask == 1, rng.integers(3, 100, (4, 8)), 0), "attention_mask": mask}
        )
    dynamic = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
    return model, feeds, dynamic


def vit():
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10
    )
    model = randomise(model)
    rng = np.random.default_rng(0)
    feeds = [{"pixel_values": rng.normal(size=(4, 3, 32, 32)).astype(np.float32)} for _ in range(FEEDS)]
    return model, feeds, {"pixel_values": {0: "batch"}}


def _digest(paths) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def _gelus(model: onnx.ModelProto) -> int:
    ops = [n.op_type for n in model.graph.node]
    return ops.count("Gelu") + ops.count("Erf")


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("family", [bert, vit], ids=["bert", "vit"])
def test_one_block_replaced_from_another_directory(tmp_path, monkeypatch, capsys, family, dynamo):
    model, feeds, dynamic = family()
    inputs = {k: torch.from_numpy(v) for k, v in feeds[0].items()}
    source = export(model, inputs, tmp_path / "model.onnx", dynamo=dynamo, dynamic=dynamic)
    data = tmp_path / "data"
    data.mkdir()
    for i, feed in enumerate(feeds):
        np.savez(data / f"{i:02d}.npz", **feed)
    before = _digest([source, tmp_path / "model.onnx.data"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    out, report_path = tmp_path / "out" / "fused.onnx", tmp_path / "out" / "report.json"
    out.parent.mkdir()
    argv = ["fuse", str(source), "--data", str(data), "--blocks", "1", "-o", str(out), "--report", str(report_path),
            "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0, capsys.readouterr().err

    report = json.loads(report_path.read_text())
    (site,) = [s for s in report["sites"] if s["decision"] == "collapsed"]
    assert site["reason_kind"] == "least_squares" and site["least_squares"]["order"] == 1
    assert report["calibration"]["blocks"] == 1 and report["calibration"]["candidates"] == 2
    fitted = [f for i, f in enumerate(feeds) if i % 4 != 3]
    held = [f for i, f in enumerate(feeds) if i % 4 == 3]
    if "attention_mask" in feeds[0]:  # padding left out: the real tokens of the fit feeds only
        assert site["least_squares"]["rows"] == sum(int(f["attention_mask"].sum()) for f in fitted)
    else:  # every patch token (16 and the class token) of every image
        assert site["least_squares"]["rows"] == len(fitted) * 4 * 17
    original, fused = onnx.load(str(source)), onnx.load(str(out))
    assert _gelus(fused) == _gelus(original) - 1
    assert sorted(p.name for p in out.parent.iterdir()) == ["fused.onnx", "fused.onnx.data", "report.json"]
    assert list(elsewhere.iterdir()) == [] and _digest([source, tmp_path / "model.onnx.data"]) == before
    # The report's verification is onnxruntime's own comparison on the held-out feeds (at real tokens).
    keep = [f["attention_mask"] != 0 if "attention_mask" in f else Ellipsis for f in held]
    expected = [ort_outputs(str(source), f)[0][k] for f, k in zip(held, keep)]
    actual = [ort_outputs(str(out), f)[0][k] for f, k in zip(held, keep)]
    error = rel_l2(np.concatenate([a.ravel() for a in actual]), np.concatenate([e.ravel() for e in expected]))
    assert report["verification"].get("padding_mask") == (
        "attention_mask" if "attention_mask" in held[0] else None
    )
    (measured,) = report["verification"]["outputs"].values()
    assert measured["rel_l2"] == pytest.approx(error, rel=1e-4) and 0 < error < 1
