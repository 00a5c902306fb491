"""Atomic writes: all or nothing, permissions of a plain open(), one-line errors."""

from __future__ import annotations

import os
import stat

import pytest

from lc_onnx.errors import UserError
from lc_onnx.model import files, io
from tests.model.graphs import big_model


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


def test_written_files_get_the_umask_permissions_not_the_temp_files(tmp_path, umask_027):
    files.write_text(tmp_path / "r.json", "{}\n")
    io.save_model(big_model(), tmp_path / "m.onnx", external=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data", "r.json"]
    assert {p.name: mode(p) for p in tmp_path.iterdir()} == {
        n: 0o640 for n in ("m.onnx", "m.onnx.data", "r.json")
    }


def test_failed_block_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "r.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), files.atomic_open(target) as f:
        f.write("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.txt"]


@pytest.mark.parametrize(
    ("target", "message"),
    [("missing/r.txt", "does not exist"), (".", "is a directory")],
)
def test_bad_targets_are_one_line_user_errors(tmp_path, target, message):
    with pytest.raises(UserError, match=message) as info:
        files.write_text(tmp_path / target, "x")
    assert "\n" not in str(info.value)


def test_staging_dir_is_removed_afterwards(tmp_path):
    with files.staging_dir(tmp_path) as stage:
        (stage / "f").write_text("x")
        assert stage.parent == tmp_path
    assert list(tmp_path.iterdir()) == []
