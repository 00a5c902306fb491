"""`--metric calibration/digits.py:accuracy`: a labelled metric chooses what to collapse, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from lc_onnx import cli
from lc_onnx.testing import GraphBuilder, op_types, ort_outputs

RECIPE = Path(__file__).resolve().parents[2] / "calibration" / "digits.py"


def digits_16px() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train/test images `[n, 3, 16, 16]` and labels as `lc-onnx finetune --dataset digits` makes them
    (torch's bilinear resize; the recipe says it preprocesses the same way, and this checks it)."""
    splits = pytest.importorskip("lc_onnx.torch.data.datasets").digits(16)
    train, test = (ds.tensors for ds in (splits.train, splits.test))
    return train[0].numpy(), train[1].numpy(), test[0].numpy(), test[1].numpy()


def classifier(slopes: np.ndarray) -> onnx.ModelProto:
    """Flatten -> Gemm 768x64 -> PRelu(slopes) -> Gemm 64x10, the second layer fitted by least squares."""
    x_train, y_train, _, _ = digits_16px()
    g = GraphBuilder(seed=0)
    flat = g.node("Flatten", [g.input("input", ["N", 3, 16, 16])], name="flatten")
    w1 = g.random((64, 768), 1 / np.sqrt(768))
    b1 = g.random((64,), 0.1)
    h = x_train.reshape(len(x_train), -1) @ w1.T + b1
    h = np.where(h > 0, h, slopes * h)
    feats = np.hstack([h, np.ones((len(h), 1))])
    sol = np.linalg.lstsq(feats, np.eye(10)[y_train], rcond=None)[0]
    hidden = g.node("Gemm", [flat, g.init("fc1.weight", w1), g.init("fc1.bias", b1)], name="fc1", transB=1)
    act = g.node("PRelu", [hidden, g.init("act.slope", slopes)], name="act")
    logits = g.node(
        "Gemm", [act, g.init("fc2.weight", sol[:-1].T), g.init("fc2.bias", sol[-1])], name="fc2", transB=1
    )
    g.output(logits, ["N", 10])
    return g.model()


def accuracy(model, images, labels) -> float:
    return float(np.mean(np.argmax(ort_outputs(model, {"input": images})[0], axis=1) == labels))


@pytest.mark.parametrize("max_drop", [0.0, 0.05])
def test_accuracy_metric_decides_the_collapse(tmp_path, max_drop):
    slopes = np.random.default_rng(1).uniform(0.3, 0.6, 64)  # far from linear: the fit costs accuracy
    model = classifier(slopes)
    _, _, x_test, y_test = digits_16px()
    base = accuracy(model, x_test, y_test)
    assert base > 0.85  # a real classifier, so a drop is measurable
    path, out, report = tmp_path / "clf.onnx", tmp_path / "clf.fused.onnx", tmp_path / "r.json"
    onnx.save(model, path)
    argv = ["fuse", str(path), "-o", str(out), "--report", str(report), "--data", f"{RECIPE}:images",
            "--fit-method", "channel"]  # fmt: skip
    assert cli.main([*argv, "--metric", f"{RECIPE}:accuracy", "--max-drop", str(max_drop)]) == 0

    entry = json.loads(report.read_text())["sites"][0]["calibration"]["act"]
    fused = onnx.load(out)
    if max_drop == 0.0:  # the fit costs accuracy: rejected, the model is written unchanged
        assert entry["decision"] == "rejected" and entry["reason"].startswith("fit rejected: metric")
        assert entry["metric"] < base and op_types(fused) == op_types(model)
        assert accuracy(fused, x_test, y_test) == base
    else:
        assert entry["decision"] == "applied" and op_types(fused) == ["Flatten", "Gemm"]
        fused_accuracy = accuracy(fused, x_test, y_test)
        assert entry["metric"] == pytest.approx(fused_accuracy, abs=1e-9)
        assert 0 < base - fused_accuracy <= max_drop
