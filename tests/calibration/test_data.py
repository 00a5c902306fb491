"""Calibration data sources and their one-line errors, through the API and the CLI."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import lc_onnx
from lc_onnx import cli
from lc_onnx.errors import UserError
from tests.calibration.models import feeds, mlp

GOOD = np.zeros((4, 8), np.float32)


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(mlp([0.9], [8, 16, 4]), path)
    return path


@pytest.mark.parametrize(
    "data,message",
    [
        ([{"y": GOOD}], "calibration feed 0: 'y' is not an input of the model (inputs: x)"),
        ([{}], "calibration feed 0: input 'x' is missing"),
        ([{"x": GOOD.astype(np.float64)}], "input 'x' has dtype float64, the model expects float32"),
        ([{"x": np.zeros((4, 9), np.float32)}], "input 'x' has shape 4x9, the model expects ?x8"),
        ([{"x": np.zeros((8,), np.float32)}], "input 'x' has shape 8, the model expects ?x8"),
        ([{"x": GOOD}, {"x": [[0.0] * 8]}], "calibration feed 1: input 'x' is a list, not a numpy array"),
        ([], "the calibration data is empty"),
        (iter([]), "the calibration data is empty"),
        ({"x": GOOD}, "got one dict"),
        (3, "got int"),
    ],
)
def test_bad_data_is_a_one_line_user_error(data, message):
    with pytest.raises(UserError) as info:
        lc_onnx.calibrate(mlp([0.9], [8, 16, 4]), data)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "write,spec,message",
    [
        (None, "{d}/nope.py:load", "no such file"),
        ("def load():\n    return []\n", "{d}/data.py:load", "the calibration data is empty"),
        (
            "def load():\n    yield {'y': __import__('numpy').zeros((2, 8), 'float32')}\n",
            "{d}/data.py:load",
            "'y' is not an input",
        ),
        (
            "def load():\n    raise RuntimeError('no images here')\n",
            "{d}/data.py:load",
            "RuntimeError: no images here",
        ),
        ("x = 1\n", "{d}/data.py:load", "defines no function 'load'"),
        ("import not_a_module\n", "{d}/data.py:load", "importing"),
        (None, "{d}/empty", "no .npz files"),
        (None, "{d}/missing", "no such file or directory"),
    ],
)
def test_cli_bad_data_exits_2_with_one_line(model_path, capsys, write, spec, message):
    d = model_path.parent
    (d / "empty").mkdir()
    if write is not None:
        (d / "data.py").write_text(write)
    for argv in (["calibrate", str(model_path)], ["fuse", str(model_path), "--max-error", "0.5"]):
        assert cli.main([*argv, "--data", spec.format(d=d)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0] and err[0].startswith(f"lc-onnx {argv[0]}: error: ")
    assert sorted(p.name for p in d.iterdir() if p.suffix == ".onnx") == ["m.onnx"]
    assert not list(d.glob("*.json"))


def test_npz_directory_and_script_give_the_same_fits(model_path, tmp_path, capsys):
    data = feeds(onnx.load(model_path), 4)
    (tmp_path / "npz").mkdir()
    for i, feed in enumerate(data):
        np.savez(tmp_path / "npz" / f"{i:03d}.npz", **feed)
    script = tmp_path / "data.py"
    script.write_text(
        "import numpy as np\n\ndef load():\n"
        "    rng = np.random.default_rng(1)\n    return [{'x': rng.standard_normal((16, 8)).astype(np.float32)} for _ in range(4)]\n"
    )
    assert (
        cli.main(
            ["calibrate", str(model_path), "--data", str(tmp_path / "npz"), "-o", str(tmp_path / "a.json")]
        )
        == 0
    )
    assert (
        cli.main(["calibrate", str(model_path), "--data", f"{script}:load", "-o", str(tmp_path / "b.json")])
        == 0
    )
    out = capsys.readouterr().out
    assert "1 activation(s) fitted on 4 batch(es)" in out and "act0 [PRelu, 16 channels]" in out
    a, b = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "b.json"))
    assert a == b and a["fits"]["act0"]["rows"] == 64


def test_cli_calibrate_then_fuse_with_fits(model_path, tmp_path, capsys):
    script = tmp_path / "data.py"
    script.write_text(
        "import numpy as np\n\ndef load():\n    rng = np.random.default_rng(2)\n"
        "    for _ in range(8):\n        yield {'x': rng.standard_normal((16, 8)).astype(np.float32)}\n"
    )
    fits = tmp_path / "fits.json"
    assert cli.main(["calibrate", str(model_path), "--data", f"{script}:load", "-o", str(fits)]) == 0
    report = tmp_path / "r.json"
    argv = ["fuse", str(model_path), "--fits", str(fits), "--data", f"{script}:load", "--max-error", "0.1"]
    assert cli.main([*argv, "--report", str(report)]) == 0
    assert "1 of 1 site(s) collapsed" in capsys.readouterr().out
    [site] = json.loads(report.read_text())["sites"]
    entry = site["calibration"]["act0"]
    assert entry["decision"] == "applied" and 0 < entry["measured_error"] <= 0.1
    assert set(entry) >= {"op", "fit_error", "estimated_error", "measured_error", "decision", "reason"}
    assert cli.main(["fuse", str(model_path), "--metric", f"{script}:load"]) == 2
    assert "need --data" in capsys.readouterr().err
