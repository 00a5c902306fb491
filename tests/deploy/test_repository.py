"""The repository on disk: layout, versions, --force, report record, and nothing half-written."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import TensorProto, helper, numpy_helper

import lc_onnx
from lc_onnx.deploy import TritonOptions, check_model_repository, write_model_repository
from lc_onnx.errors import UserError
from lc_onnx.model import io as lc_io
from lc_onnx.model.demo import build_demo_model
from tests.deploy import helpers

pytest.importorskip("tritonclient")
pytest.importorskip("onnxruntime")


def small_model(width: int = 4) -> onnx.ModelProto:
    return onnx.parser.parse_model(
        helpers.HEADER + f"g (float[N,{width}] x) => (float[N,{width}] y) {{ y = Relu(x) }}"
    )


def big_model(tmp_path, external: bool, rows: int = 64, cols: int = 64):
    """A MatMul model with a 16 KiB weight, saved with or without an external data file; (path, weight)."""
    weight = np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", rows])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", cols])],
        initializer=[numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "src" / "big.onnx"
    path.parent.mkdir()
    if external:
        onnx.save(model, path, save_as_external_data=True, location="big.weights", size_threshold=0)
    else:
        onnx.save(model, path)
    return path, weight


@pytest.fixture(scope="module")
def fused():
    """The demo model collapsed by the real pipeline, with its report."""
    return lc_onnx.fuse(build_demo_model())


def test_fused_model_serves_the_fused_outputs(tmp_path, fused):
    assert fused.collapsed > 0
    version_dir = write_model_repository(
        fused.model, tmp_path / "repo", TritonOptions(name="demo"), report=fused.report.to_dict()
    )
    assert version_dir == tmp_path / "repo" / "demo" / "1"
    assert sorted(p.name for p in (tmp_path / "repo" / "demo").iterdir()) == [
        "1",
        "config.pbtxt",
        "fuse_report_v1.json",
    ]
    assert [p.name for p in version_dir.iterdir()] == ["model.onnx"]

    config = helpers.parse_config(tmp_path / "repo" / "demo" / "config.pbtxt")
    served = onnx.load(version_dir / "model.onnx")
    helpers.assert_config_matches_graph(config, served)
    helpers.assert_config_matches_graph(config, fused.model)
    assert config.max_batch_size == 8

    feeds = {"tokens": np.random.default_rng(1).standard_normal((3, 16, 32)).astype(np.float32)}
    for got, want in zip(
        helpers.run_ort(version_dir / "model.onnx", feeds), helpers.run_ort(fused.model, feeds)
    ):
        np.testing.assert_array_equal(got, want)

    record = json.loads((tmp_path / "repo" / "demo" / "fuse_report_v1.json").read_text())
    assert record == json.loads(json.dumps(fused.report.to_dict()))
    assert len(record["sites"]) == len(fused.report.sites)


@pytest.mark.parametrize("external", [True, False], ids=["external", "self-contained"])
def test_weights_travel_with_the_version(tmp_path, external):
    path, weight = big_model(tmp_path, external)
    source_files = sorted(p.name for p in path.parent.iterdir())
    version_dir = write_model_repository(path, tmp_path / "repo")
    assert version_dir == tmp_path / "repo" / "big" / "1"
    expected = ["model.onnx", "model.onnx.data"] if external else ["model.onnx"]
    assert sorted(p.name for p in version_dir.iterdir()) == expected
    x = np.random.default_rng(2).standard_normal((2, 64)).astype(np.float32)
    [y] = helpers.run_ort(version_dir / "model.onnx", {"x": x})
    np.testing.assert_allclose(y, x @ weight, rtol=1e-5, atol=1e-5)
    # The source is untouched and still loads on its own.
    assert sorted(p.name for p in path.parent.iterdir()) == source_files
    [y_src] = helpers.run_ort(path, {"x": x})
    np.testing.assert_array_equal(y, y_src)


def test_new_versions_go_beside_the_old_ones(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(small_model(), path)
    repo = tmp_path / "repo"
    first = write_model_repository(path, repo)
    first_bytes = (first / "model.onnx").read_bytes()
    # Directories Triton does not treat as versions must not count either.
    for ignored in ("0", "007", "latest"):
        (repo / "m" / ignored).mkdir()
    second = write_model_repository(path, repo)
    third = write_model_repository(path, repo, TritonOptions(version=10))
    fourth = write_model_repository(path, repo)
    assert [p.name for p in (first, second, third, fourth)] == ["1", "2", "10", "11"]
    assert (first / "model.onnx").read_bytes() == first_bytes
    assert helpers.hidden_entries(repo) == []


def test_existing_version_needs_force(tmp_path):
    repo = tmp_path / "repo"
    write_model_repository(small_model(), repo, TritonOptions(name="m"))
    before = (repo / "m" / "1" / "model.onnx").read_bytes()
    changed = small_model()
    changed.graph.node[0].op_type = "Sigmoid"
    with pytest.raises(UserError, match=r"version 1 already exists; pass force to replace it"):
        write_model_repository(changed, repo, TritonOptions(name="m", version=1))
    assert (repo / "m" / "1" / "model.onnx").read_bytes() == before

    write_model_repository(changed, repo, TritonOptions(name="m", version=1, force=True))
    assert onnx.load(repo / "m" / "1" / "model.onnx").graph.node[0].op_type == "Sigmoid"
    assert sorted(p.name for p in (repo / "m").iterdir()) == ["1", "config.pbtxt"]
    assert helpers.hidden_entries(repo) == []


def test_a_differing_config_needs_force(tmp_path):
    repo = tmp_path / "repo"
    write_model_repository(small_model(4), repo, TritonOptions(name="m"))
    config_before = (repo / "m" / "config.pbtxt").read_text()
    with pytest.raises(
        UserError,
        match=r"config.pbtxt differs from the config for this model \(input\[0\]\.dims: \[4\], would be \[6\]\); "
        "Triton uses one config for all versions: pass force to replace it or use another name$",
    ):
        write_model_repository(small_model(6), repo, TritonOptions(name="m"))
    assert (repo / "m" / "config.pbtxt").read_text() == config_before
    assert sorted(p.name for p in (repo / "m").iterdir()) == ["1", "config.pbtxt"]

    version_dir = write_model_repository(small_model(6), repo, TritonOptions(name="m", force=True))
    assert version_dir.name == "2"
    config = helpers.parse_config(repo / "m" / "config.pbtxt")
    assert list(config.input[0].dims) == [6]
    helpers.assert_config_matches_graph(config, onnx.load(version_dir / "model.onnx"))


def test_same_config_with_other_serving_options_needs_force(tmp_path):
    repo = tmp_path / "repo"
    write_model_repository(small_model(), repo, TritonOptions(name="m"))
    with pytest.raises(UserError, match=r"\(instance_group\[0\]\.count: 1, would be 3\)"):
        write_model_repository(small_model(), repo, TritonOptions(name="m", instances=3))
    write_model_repository(small_model(), repo, TritonOptions(name="m", instances=3, force=True))
    assert helpers.parse_config(repo / "m" / "config.pbtxt").instance_group[0].count == 3


# What lc-onnx 0.1.0 wrote for small_model(4) named "m": the same config, spelled another way.
OLD_SPELLING = """name: "m"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [
  {
    name: "x"
    data_type: TYPE_FP32
    dims: [ 4 ]
  }
]
output [
  {
    name: "y"
    data_type: TYPE_FP32
    dims: [ 4 ]
  }
]
instance_group [
  {
    kind: KIND_CPU
    count: 1
  }
]
"""


def test_a_config_spelled_another_way_is_the_same_config_and_stays(tmp_path):
    repo = tmp_path / "repo"
    write_model_repository(small_model(), repo, TritonOptions(name="m"))
    config = repo / "m" / "config.pbtxt"
    config.write_text(OLD_SPELLING)
    assert write_model_repository(small_model(), repo, TritonOptions(name="m")).name == "2"
    assert config.read_text() == OLD_SPELLING


def test_fields_lc_onnx_does_not_write_need_force(tmp_path):
    repo = tmp_path / "repo"
    write_model_repository(small_model(), repo, TritonOptions(name="m"))
    config = repo / "m" / "config.pbtxt"
    written = config.read_text()
    edited = written + 'parameters { key: "k" value { string_value: "v" } }\n'
    config.write_text(edited)
    assert helpers.parse_config(config).parameters["k"].string_value == "v"  # valid for Triton
    with pytest.raises(
        UserError,
        match=r'config.pbtxt is not a config lc-onnx writes \(.*no field named "parameters"\); .*pass force',
    ):
        write_model_repository(small_model(), repo, TritonOptions(name="m"))
    assert config.read_text() == edited
    write_model_repository(small_model(), repo, TritonOptions(name="m", force=True))
    assert config.read_text() == written


@pytest.mark.parametrize("external", [True, False], ids=["external", "self-contained"])
def test_the_callers_model_is_left_as_it_was(tmp_path, external):
    # Saving rewrites external-data references; the writer must do that on its own copy.
    path, _ = big_model(tmp_path, external)
    loaded = lc_io.load(path)
    before = loaded.proto.SerializeToString()
    write_model_repository(loaded, tmp_path / "repo")
    assert loaded.proto.SerializeToString() == before
    proto = lc_io.load_model(path)
    before = proto.SerializeToString()
    write_model_repository(proto, tmp_path / "repo", TritonOptions(name="inline"))
    assert proto.SerializeToString() == before


def unloadable_model() -> onnx.ModelProto:
    model = small_model()
    model.graph.node[0].op_type = "NoSuchOp"
    return model


def test_failure_in_a_new_repository_leaves_nothing(tmp_path):
    repo = tmp_path / "repo"
    with pytest.raises(UserError, match=r"^onnxruntime cannot load the model: .*NoSuchOp"):
        write_model_repository(unloadable_model(), repo, TritonOptions(name="m"))
    assert not repo.exists()


def test_failure_in_an_existing_model_keeps_what_was_there(tmp_path):
    repo = tmp_path / "repo"
    write_model_repository(small_model(), repo, TritonOptions(name="m"))
    before = {p.relative_to(repo): p.read_bytes() for p in repo.rglob("*") if p.is_file()}
    for version in (None, 1):
        with pytest.raises(UserError, match=r"^onnxruntime cannot load the model: "):
            write_model_repository(
                unloadable_model(), repo, TritonOptions(name="m", version=version, force=True)
            )
    after = {p.relative_to(repo): p.read_bytes() for p in repo.rglob("*") if p.is_file()}
    assert after == before
    assert helpers.hidden_entries(repo) == []


def test_refuses_to_replace_the_version_holding_the_input(tmp_path):
    repo = tmp_path / "repo"
    version_dir = write_model_repository(small_model(), repo, TritonOptions(name="m"))
    with pytest.raises(UserError, match=r"input model is inside"):
        write_model_repository(
            version_dir / "model.onnx", repo, TritonOptions(name="m", version=1, force=True)
        )
    assert (version_dir / "model.onnx").exists()


@pytest.mark.parametrize("name", ["", "a/b", "..", ".hidden", "-x", "12", "sp ace"])
def test_unusable_names_are_refused(tmp_path, name):
    with pytest.raises(UserError, match=r"model name .* is not usable .*; pass name with letters"):
        write_model_repository(small_model(), tmp_path / "repo", TritonOptions(name=name))
    assert not (tmp_path / "repo").exists()


def test_proto_without_name_uses_graph_name(tmp_path):
    assert write_model_repository(small_model(), tmp_path / "repo").parent.name == "g"


def test_repo_path_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "repo").write_text("not a directory")
    with pytest.raises(UserError, match=r"exists and is not a directory"):
        write_model_repository(small_model(), tmp_path / "repo", TritonOptions(name="m"))


def test_written_files_are_readable_by_a_server_running_as_another_user(tmp_path):
    old = os.umask(0o022)
    try:
        write_model_repository(
            small_model(), tmp_path / "repo", TritonOptions(name="m"), report={"sites": []}
        )
        write_model_repository(
            small_model(), tmp_path / "repo", TritonOptions(name="m"), report={"sites": []}
        )
    finally:
        os.umask(old)
    for p in (tmp_path / "repo").rglob("*"):
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode & 0o044 == 0o044, f"{p} has mode {oct(mode)}"
        if p.is_dir():
            assert mode & 0o011 == 0o011, f"{p} has mode {oct(mode)}"


def test_check_decides_without_writing(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(small_model(), path)
    plan = check_model_repository(path, tmp_path / "repo", TritonOptions(dynamic_batching=True))
    assert (plan.version_dir, plan.config.max_batch_size) == (tmp_path / "repo" / "m" / "1", 8)
    assert helpers.parse_config_text(plan.config_text).HasField("dynamic_batching")
    assert not (tmp_path / "repo").exists()
    with pytest.raises(UserError, match=r"^max_batch_size 8 needs a leading dynamic batch dimension"):
        check_model_repository(
            onnx.parser.parse_model(helpers.HEADER + "g (float[2,4] x) => (float[2,4] y) { y = Relu(x) }"),
            tmp_path / "repo",
            TritonOptions(name="s", max_batch_size=8),
        )
    assert not (tmp_path / "repo").exists()


def test_replacing_a_version_without_a_report_drops_the_old_report(tmp_path):
    repo = tmp_path / "repo"
    write_model_repository(small_model(), repo, TritonOptions(name="m"), report={"sites": []})
    write_model_repository(small_model(), repo, TritonOptions(name="m"), report={"sites": [1]})
    write_model_repository(small_model(), repo, TritonOptions(name="m", version=1, force=True))
    assert sorted(p.name for p in (repo / "m").iterdir()) == ["1", "2", "config.pbtxt", "fuse_report_v2.json"]
