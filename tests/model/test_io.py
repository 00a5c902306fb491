"""Loading without copying weights, external data confinement, atomic and streaming saves."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from lc_onnx.errors import UserError
from lc_onnx.model import io, wire
from tests.model.graphs import big_model


def test_wire_loader_keeps_weights_on_disk_and_reads_them_back(tmp_path):
    model = big_model()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    loaded = io.load(path)
    weight = next(t for t in loaded.proto.graph.initializer if t.name == "fc1.weight")
    assert weight.data_location == onnx.TensorProto.EXTERNAL and not weight.raw_data
    assert {e.key: e.value for e in weight.external_data}["location"] == "m.onnx"
    assert loaded.source_external is False
    expected = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for tensor in loaded.proto.graph.initializer:
        np.testing.assert_array_equal(io.read_tensor(tensor, loaded.base_dir), expected[tensor.name])
    # A full load gives back exactly the model that was saved.
    assert io.load_model(path).SerializeToString() == model.SerializeToString()


def test_wire_rejects_garbage(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\xff" * 64)
    with pytest.raises(wire.WireError):
        wire.read_model_bytes(bad)
    with pytest.raises(UserError, match="not a readable ONNX model"):
        io.load(bad)


def test_external_data_round_trip_and_inline_stays_inline(tmp_path):
    model = big_model()
    onnx.save(
        model, tmp_path / "ext.onnx", save_as_external_data=True, location="ext.bin", size_threshold=1024
    )
    loaded = io.load(tmp_path / "ext.onnx")
    assert loaded.source_external
    out = tmp_path / "sub"
    out.mkdir()
    io.save(loaded, out / "copy.onnx")
    assert (out / "copy.onnx.data").is_file()
    assert (
        io.load_model(out / "copy.onnx").graph.initializer
        == io.load_model(tmp_path / "ext.onnx").graph.initializer
    )
    # A self-contained model is written back self-contained (onnx.save above made `model` external).
    model = big_model()
    onnx.save(model, tmp_path / "inline.onnx")
    io.save(io.load(tmp_path / "inline.onnx"), out / "inline.onnx")
    assert not (out / "inline.onnx.data").exists()
    assert onnx.load(out / "inline.onnx").SerializeToString() == model.SerializeToString()


@pytest.mark.parametrize("location", ["../outside.bin", "/etc/passwd", "sub/../../x.bin"])
def test_external_location_outside_the_model_directory_is_refused(tmp_path, location):
    model = big_model()
    onnx.save(model, tmp_path / "m.onnx", save_as_external_data=True, location="w.bin", size_threshold=1024)
    proto = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(proto, tmp_path / "evil.onnx")
    with pytest.raises(UserError, match="escapes the model's directory"):
        io.load(tmp_path / "evil.onnx")


def test_missing_and_truncated_external_data(tmp_path):
    onnx.save(
        big_model(), tmp_path / "m.onnx", save_as_external_data=True, location="w.bin", size_threshold=1024
    )
    data = (tmp_path / "w.bin").read_bytes()
    (tmp_path / "w.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="is truncated"):
        io.load(tmp_path / "m.onnx")
    (tmp_path / "w.bin").unlink()
    with pytest.raises(UserError, match="external data file 'w.bin' not found"):
        io.load(tmp_path / "m.onnx")


def test_save_model_is_atomic_and_leaves_no_temp_files(tmp_path):
    io.save_model(big_model(), tmp_path / "a.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx"]
    with pytest.raises(UserError, match="does not exist"):
        io.save_model(big_model(), tmp_path / "missing" / "a.onnx")


def test_skeleton_keeps_dims_and_drops_data():
    model = big_model()
    skeleton = io.skeleton(model)
    assert skeleton.ByteSize() < model.ByteSize() // 10
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    assert {t.name: list(t.dims) for t in skeleton.graph.initializer} == dims
    assert skeleton.opset_import == model.opset_import and skeleton.graph.node == model.graph.node
