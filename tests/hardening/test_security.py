"""Nothing is unpickled, and external data stays inside the model's directory on read and on write.

- `lc-onnx demo`, `inspect`, `fuse` (with external data) and `.npz` calibration data run in a subprocess
  under an audit hook that records every `pickle.find_class` (the step every code-running pickle needs);
  a deliberate unpickle at the end proves the hook sees one.
- A torch checkpoint and an `.npz` file carrying a code-running pickle are refused with a `UserError`
  and the code does not run.
- External-data locations are checked in every tensor of the model (Constant attributes, subgraph
  initializers), and writing never follows a link out of the output directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import lc_onnx
from lc_onnx.errors import UserError
from lc_onnx.testing import ort_outputs, rel_l2
from tests.hardening.corpus import external
from tests.hardening.graphs import mlp

REPO = Path(__file__).resolve().parents[2]


class Payload:
    """Unpickling this creates `marker` (standing in for any code an attacker would run)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


AUDITED = """
import json, sys
from pathlib import Path
events = []
sys.addaudithook(lambda event, args: events.append(list(map(str, args))) if event == "pickle.find_class" else None)
import numpy as np
from lc_onnx import cli
from lc_onnx.calibration.data import from_spec
work = Path(sys.argv[1])
codes = [cli.main(["demo", "--out", str(work)]),
         cli.main(["inspect", str(work / "demo.onnx")]),
         cli.main(["fuse", str(work / "demo.onnx"), "-o", str(work / "a.onnx")]),
         cli.main(["fuse", sys.argv[2], "-o", str(work / "b.onnx")])]
np.savez(work / "feed.npz", x=np.ones((2, 4), np.float32))
feeds = [sorted(f) for f in from_spec(str(work / "feed.npz"))]
clean = list(events)
import pickle
pickle.loads(pickle.dumps(Path("x")))  # the control: one real unpickle must be seen
print(json.dumps({"codes": codes, "feeds": feeds, "events": clean, "control": events[len(clean):]}))
"""


def test_no_command_unpickles_anything(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    model = external(tmp_path / "ext", data_dir=tmp_path / "ext")

    proc = subprocess.run(
        [sys.executable, "-c", AUDITED, str(work), str(model)],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip

    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["codes"] == [0, 0, 0, 0]
    assert result["feeds"] == [["x"]]
    assert result["events"] == []
    assert result["control"], "the audit hook did not see a real unpickle"


def test_torch_checkpoint_with_code_is_refused(tmp_path):
    torch = pytest.importorskip("torch")
    from lc_onnx.torch.blocks.checkpoint import load_checkpoint

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "structure": {"prelu": [], "collapsed": []}, "x": Payload(marker)}, path)

    with pytest.raises(UserError, match="not a readable lc-onnx checkpoint"):
        load_checkpoint(path, torch.nn.Linear(2, 2))
    assert not marker.exists()


def test_npz_with_pickled_objects_is_refused(tmp_path):
    from lc_onnx.calibration.data import from_spec

    marker = tmp_path / "pwned"
    np.savez(tmp_path / "evil.npz", x=np.array([Payload(marker)], dtype=object))
    assert not marker.exists()

    with pytest.raises(UserError, match="not a readable .npz"):
        list(from_spec(str(tmp_path / "evil.npz")))
    assert not marker.exists()


def _pointing_at(name: str, size: int, location: str) -> TensorProto:
    """A float tensor of `size` elements whose data is said to be in the external file `location`."""
    t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[size])
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value=location)
    return t


def _escaping_constant() -> onnx.ModelProto:
    """A Constant node whose value tensor points at `../secret`."""
    m = mlp()
    t = _pointing_at("c", 4, "../secret")
    m.graph.node.insert(0, helper.make_node("Constant", [], ["c"], value=t))
    m.graph.node[1].input[0] = "xc"
    m.graph.node.insert(1, helper.make_node("Add", ["x", "c"], ["xc"]))
    return m


def _escaping_subgraph() -> onnx.ModelProto:
    """An If branch with an initializer at `/etc/passwd`."""
    m = mlp()
    t = _pointing_at("k", 4, "/etc/passwd")
    branch = helper.make_graph(
        [helper.make_node("Add", ["y0", "k"], ["z"])], "b", [],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], [t],
    )  # fmt: skip
    m.graph.node[-1].output[0] = "y0"
    m.graph.node.append(helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch))
    m.graph.input.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
    return m


def _escaping_sparse() -> onnx.ModelProto:
    """A sparse initializer whose values point at `../secret`."""
    m = mlp()
    values = _pointing_at("s", 1, "../secret")
    indices = helper.make_tensor("s.idx", TensorProto.INT64, [1], np.zeros(1, np.int64))
    m.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [4]))
    m.graph.node[-1].output[0] = "y0"
    m.graph.node.append(helper.make_node("Add", ["y0", "s"], ["y"]))
    return m


@pytest.mark.parametrize("build", [_escaping_constant, _escaping_subgraph, _escaping_sparse])
def test_external_data_is_confined_in_every_tensor(tmp_path, build):
    (tmp_path / "secret").write_bytes(b"\0" * 16)
    inside = tmp_path / "model"
    inside.mkdir()
    path = inside / "m.onnx"
    path.write_bytes(build().SerializeToString())

    with pytest.raises(UserError, match="escapes the model's directory"):
        lc_onnx.fuse(path, output=inside / "out.onnx")
    assert sorted(os.listdir(inside)) == ["m.onnx"]


def test_external_data_in_a_subdirectory_is_read(tmp_path):
    """Confinement means inside the model's directory, subdirectories included."""
    model = mlp((16, 32, 16))
    (tmp_path / "weights").mkdir()
    onnx.save(model, str(tmp_path / "m.onnx"), save_as_external_data=True, location="weights/m.data",
              size_threshold=0)  # fmt: skip

    (tmp_path / "out").mkdir()
    result = lc_onnx.fuse(tmp_path / "m.onnx", output=tmp_path / "out" / "fused.onnx")

    assert result.collapsed == 1
    # Written beside the output, not into the source's weights directory.
    assert sorted(os.listdir(tmp_path / "out")) == ["fused.onnx", "fused.onnx.data"]
    assert sorted(os.listdir(tmp_path / "weights")) == ["m.data"]
    fused = onnx.load(str(tmp_path / "out" / "fused.onnx"), load_external_data=False)
    locations = {e.value for t in fused.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"fused.onnx.data"}


def test_writing_replaces_a_link_instead_of_following_it(tmp_path):
    """A symlink at the output's data-file name (or the output name) pointing elsewhere is replaced,
    never written through."""
    model = external(tmp_path / "src", data_dir=tmp_path / "src")
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "victim").write_bytes(b"keep me")
    (target / "victim.onnx").write_bytes(b"keep me too")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "fused.onnx.data").symlink_to(target / "victim")
    (out_dir / "fused.onnx").symlink_to(target / "victim.onnx")

    lc_onnx.fuse(model, output=out_dir / "fused.onnx")

    assert (target / "victim").read_bytes() == b"keep me"
    assert (target / "victim.onnx").read_bytes() == b"keep me too"
    for name in ("fused.onnx", "fused.onnx.data"):
        assert not (out_dir / name).is_symlink()
    x = np.random.default_rng(0).standard_normal((2, 16)).astype(np.float32)
    expected = ort_outputs(str(model), {"x": x})[0]
    assert rel_l2(ort_outputs(str(out_dir / "fused.onnx"), {"x": x})[0], expected) <= 1e-5
