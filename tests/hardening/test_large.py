"""Models beyond one protobuf, and weight dtypes other than float32.

`test_model_over_2gb_fuses_within_twice_its_weights` (slow: about a minute and 2.2 GB of disk) builds a
residual MLP stack whose weights (2.125 GiB) live in an external data file, fuses it in a subprocess and
measures that process's peak resident memory. The dtype tests are small and run by default.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lc_onnx
from lc_onnx.testing import ort_outputs, rel_l2
from tests.hardening.graphs import mlp

REPO = Path(__file__).resolve().parents[2]

# 68 residual blocks `x + (PRelu_1(x @ W1 + b1) @ W2 + b2)`, d=256, hidden 16384: 68 x 2 x 16 MiB of fp32
# (2.125 GiB, past the 2 GiB protobuf limit).
BLOCKS, D, HIDDEN = 68, 256, 16384


def _external(name: str, shape: tuple[int, ...], offset: int, nbytes: int) -> TensorProto:
    t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=shape)
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "big.onnx.data"), ("offset", str(offset)), ("length", str(nbytes))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


def write_big_model(directory: Path) -> tuple[Path, int]:
    """The stack as `big.onnx` + `big.onnx.data`, written block by block (never all in memory)."""
    rng = np.random.default_rng(0)
    nodes, inits, offset, x = [], [], 0, "x"
    with open(directory / "big.onnx.data", "wb") as data:
        for i in range(BLOCKS):
            for name, shape in ((f"b{i}.w1", (D, HIDDEN)), (f"b{i}.w2", (HIDDEN, D))):
                w = (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[0])).astype(np.float32)
                data.write(w.tobytes())
                inits.append(_external(name, shape, offset, w.nbytes))
                offset += w.nbytes
            inits += [
                numpy_helper.from_array(0.1 * rng.standard_normal(HIDDEN, dtype=np.float32), f"b{i}.b1"),
                numpy_helper.from_array(0.1 * rng.standard_normal(D, dtype=np.float32), f"b{i}.b2"),
                numpy_helper.from_array(np.ones(1, np.float32), f"b{i}.slope"),
            ]
            p = f"b{i}/"
            nodes += [
                helper.make_node("MatMul", [x, f"b{i}.w1"], [p + "h"], name=p + "fc1"),
                helper.make_node("Add", [p + "h", f"b{i}.b1"], [p + "hb"], name=p + "fc1/add"),
                helper.make_node("PRelu", [p + "hb", f"b{i}.slope"], [p + "a"], name=p + "act"),
                helper.make_node("MatMul", [p + "a", f"b{i}.w2"], [p + "o"], name=p + "fc2"),
                helper.make_node("Add", [p + "o", f"b{i}.b2"], [p + "ob"], name=p + "fc2/add"),
                helper.make_node("Add", [x, p + "ob"], [f"r{i}"], name=p + "residual"),
            ]
            x = f"r{i}"
    nodes.append(helper.make_node("Identity", [x], ["y"], name="out"))
    graph = helper.make_graph(
        nodes,
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", D])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = directory / "big.onnx"
    path.write_bytes(model.SerializeToString())
    return path, offset


FUSE_AND_MEASURE = """
import json, resource, sys
import lc_onnx
result = lc_onnx.fuse(sys.argv[1], output=sys.argv[2])
print(json.dumps({"collapsed": result.collapsed, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "rel_l2": result.report.verification.worst_rel_l2, "seconds": result.report.seconds}))
"""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**24):
            digest.update(chunk)
    return digest.hexdigest()


def _available_memory() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


@pytest.fixture
def scratch(tmp_path):
    """`tmp_path`, emptied afterwards: pytest keeps the last runs' directories, 2 GB each here."""
    yield tmp_path
    for item in tmp_path.iterdir():
        shutil.rmtree(item) if item.is_dir() else item.unlink()


@pytest.mark.slow
def test_model_over_2gb_fuses_within_twice_its_weights(scratch):
    tmp_path = scratch
    weights = BLOCKS * 2 * D * HIDDEN * 4
    if shutil.disk_usage(tmp_path).free < 2.5 * weights:
        pytest.skip(f"needs {2.5 * weights / 2**30:.1f} GiB free disk in {tmp_path}")
    if _available_memory() < 3 * weights:
        pytest.skip(f"needs {3 * weights / 2**30:.1f} GiB of available memory")
    source, written = write_big_model(tmp_path)
    assert written == weights > 2**31
    before = _sha256(tmp_path / "big.onnx.data")
    out = tmp_path / "out" / "fused.onnx"
    out.parent.mkdir()

    proc = subprocess.run(
        [sys.executable, "-c", FUSE_AND_MEASURE, str(source), str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=1800,
    )  # fmt: skip

    assert proc.returncode == 0, proc.stderr
    measured = json.loads(proc.stdout.splitlines()[-1])
    print(f"\nweights {weights / 2**30:.2f} GiB, fuse peak RSS {measured['peak_rss'] / 2**30:.2f} GiB, "
          f"{measured['seconds']:.1f} s, rel_l2 {measured['rel_l2']:.2g}")  # fmt: skip
    assert measured["collapsed"] == BLOCKS
    assert measured["peak_rss"] <= 2 * weights
    assert measured["rel_l2"] <= 1e-5
    assert _sha256(tmp_path / "big.onnx.data") == before
    # Written with external data (the input had it), the graph file itself small.
    assert sorted(p.name for p in out.parent.iterdir()) == ["fused.onnx", "fused.onnx.data"]
    assert out.stat().st_size < 2**20
    fused = onnx.load(str(out), load_external_data=False)
    assert [n.op_type for n in fused.graph.node].count("Gemm") == BLOCKS  # rank 2: written as Gemm(transB=1)
    assert "PRelu" not in {n.op_type for n in fused.graph.node}
    # The fused model on its own (small enough to check in memory) against the original.
    onnx.checker.check_model(str(out), full_check=True)
    feeds = {"x": np.random.default_rng(5).standard_normal((3, D)).astype(np.float32)}
    expected = ort_outputs(str(source), feeds)
    assert rel_l2(ort_outputs(str(out), feeds)[0], expected[0]) <= 1e-5


# --- weight dtypes: the fused layer keeps the dtype of the layers it replaces ------------------------

DTYPES = {
    "fp16": (TensorProto.FLOAT16, np.float16, 2e-3),
    "bf16": (TensorProto.BFLOAT16, ml_dtypes.bfloat16, 1.6e-2),
    "fp64": (TensorProto.DOUBLE, np.float64, 1e-12),
}


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _reference(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The Gemm/PRelu chain of `graphs.mlp` evaluated in float64 numpy (independent of onnxruntime)."""
    w = {k: v.astype(np.float64) for k, v in _weights(model).items()}
    h = x.astype(np.float64)
    for node in model.graph.node:
        if node.op_type == "Gemm":
            weight = w[node.input[1]]
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            h = h @ (weight.T if trans_b else weight) + (w[node.input[2]] if len(node.input) > 2 else 0)
        elif node.op_type == "PRelu":
            h = np.where(h < 0, h * w[node.input[1]], h)
        else:
            raise AssertionError(f"unexpected {node.op_type}")
    return h


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_weight_dtype_is_kept_and_values_are_exact(dtype):
    elem_type, np_type, tolerance = DTYPES[dtype]
    model = mlp((16, 64, 64, 16), elem_type=elem_type)

    result = lc_onnx.fuse(model, verify=dtype != "bf16")  # onnxruntime has no bf16 Gemm on CPU

    fused = result.model
    assert result.collapsed == 1
    assert [n.op_type for n in fused.graph.node] == ["Gemm"]
    assert {t.data_type for t in fused.graph.initializer} == {elem_type}
    assert fused.graph.input == model.graph.input and fused.graph.output == model.graph.output
    x = np.random.default_rng(2).standard_normal((8, 16)).astype(np_type)
    # The fused weights are the exact product, rounded once to the weight dtype: compare in float64.
    assert rel_l2(_reference(fused, x), _reference(model, x)) <= tolerance
    if dtype != "bf16":
        assert rel_l2(ort_outputs(fused, {"x": x})[0], _reference(model, x)) <= tolerance


def test_weights_near_the_protobuf_limit_are_written_external(tmp_path, monkeypatch):
    """A fused model that would not fit one protobuf goes to an external data file (limit lowered)."""
    from lc_onnx.model import io

    monkeypatch.setattr(io, "PROTO_LIMIT_BYTES", 4096)
    model = mlp((64, 128, 64))
    out = tmp_path / "fused.onnx"

    lc_onnx.fuse(model, output=out)

    assert sorted(os.listdir(tmp_path)) == ["fused.onnx", "fused.onnx.data"]
    fused = onnx.load(str(out), load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in fused.graph.initializer)
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    assert rel_l2(ort_outputs(str(out), {"x": x})[0], ort_outputs(model, {"x": x})[0]) <= 1e-5
