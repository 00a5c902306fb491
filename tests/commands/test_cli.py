"""The command line: outputs, report schema, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from lc_onnx import cli
from lc_onnx.testing import GraphBuilder, op_types

SITE_KEYS = {"nodes", "activation", "decision", "reason", "params_before", "params_after"}
REPORT_KEYS = {
    "sites",
    "params_before",
    "params_after",
    "macs_before",
    "macs_after",
    "verification",
    "seconds",
}


@pytest.fixture
def mlp(tmp_path) -> Path:
    g = GraphBuilder()
    h = g.gemm(g.input("x", ["N", 16]), 16, 64, name="fc1")
    g.output(g.gemm(g.prelu(h, 0.97, name="act"), 64, 8, name="fc2"), ["N", 8])
    path = tmp_path / "mlp.onnx"
    onnx.save(g.model(), path)
    return path


def files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_fuse_writes_default_output_and_report(mlp, capsys):
    assert cli.main(["fuse", str(mlp), "--report", str(mlp.parent / "r.json"), "--max-error", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "1 of 1 site(s) collapsed" in out and "wrote" in out
    assert files(mlp.parent) == ["mlp.collapsed.onnx", "mlp.onnx", "r.json"]
    assert op_types(onnx.load(mlp.parent / "mlp.collapsed.onnx")) == ["Gemm"]
    report = json.loads((mlp.parent / "r.json").read_text())
    assert set(report) == REPORT_KEYS
    assert set(report["sites"][0]) >= SITE_KEYS and report["sites"][0]["decision"] == "collapsed"
    assert report["params_before"] - report["params_after"] == 16 * 64 + 64 + 1 + 64 * 8 + 8 - (16 * 8 + 8)
    assert report["macs_before"] == 2 * (16 * 64 + 64 * 8) and report["macs_after"] == 2 * 16 * 8
    err = report["verification"]["outputs"]["fc2_out"]
    assert 0 < err["rel_l2"] < 0.1 and err["max_abs"] > 0


def test_dry_run_writes_no_model(mlp, capsys):
    assert cli.main(["fuse", str(mlp), "--dry-run", "--max-error", "0.1"]) == 0
    assert "dry run: no model written" in capsys.readouterr().out
    assert files(mlp.parent) == ["mlp.onnx"]


@pytest.mark.parametrize(
    "budget,message",
    [
        (["--max-error", "1e-6"], "relative L2 error"),
        (["--max-error", "0.1", "--max-abs-error", "1e-6"], "max abs error"),
    ],
)
def test_verification_failure_exits_1_and_writes_nothing(mlp, capsys, budget, message):
    before = mlp.read_bytes()
    assert cli.main(["fuse", str(mlp), *budget]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lc-onnx fuse: error: fused model differs from the original")
    assert message in err[0] and "'fc2_out'" in err[0]
    assert files(mlp.parent) == ["mlp.onnx"] and mlp.read_bytes() == before


def test_max_abs_error_within_budget_passes(mlp):
    report = mlp.parent / "r.json"
    assert (
        cli.main(["fuse", str(mlp), "--max-error", "0.1", "--max-abs-error", "10", "--report", str(report)])
        == 0
    )
    assert 0 < json.loads(report.read_text())["verification"]["outputs"]["fc2_out"]["max_abs"] <= 10


@pytest.mark.parametrize(
    "args,message",
    [
        (["fuse", "{d}/missing.onnx"], "missing.onnx: no such file"),
        (["fuse", "{d}"], "is a directory"),
        (["fuse", "{d}/mlp.onnx", "-o", "{d}/mlp.onnx"], "output would overwrite the input model"),
        (["fuse", "{d}/mlp.onnx", "-o", "{d}/nodir/out.onnx"], "does not exist"),
        (["fuse", "{d}/mlp.onnx", "--input-shape", "x:2xQ"], "expected NAME:DxDx..."),
        (["fuse", "{d}/mlp.onnx", "--input-shape", "nope:2x16"], "unknown input(s): nope"),
        (["inspect", "{d}/missing.onnx"], "no such file"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(mlp, capsys, args, message):
    before = mlp.read_bytes()
    argv = [a.format(d=mlp.parent) for a in args]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith(f"lc-onnx {argv[0]}: error: ")
    assert files(mlp.parent) == ["mlp.onnx"] and mlp.read_bytes() == before


@pytest.mark.parametrize(
    "args,message",
    [
        ([], "lc-onnx: error: the following arguments are required: COMMAND"),
        (["fuse"], "lc-onnx fuse: error: the following arguments are required: model"),
        (["fuse", "m.onnx", "--bogus"], "lc-onnx fuse: error: unrecognized arguments: --bogus"),
        (
            ["fuse", "m.onnx", "--threshold", "abc"],
            "lc-onnx fuse: error: argument --threshold: invalid float",
        ),
        (["nope"], "lc-onnx: error: argument COMMAND: invalid choice: 'nope'"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(capsys, args, message):
    with pytest.raises(SystemExit) as exc:
        cli.main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message), err


def test_no_traceback_reaches_the_terminal(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model at all")
    proc = subprocess.run(
        [sys.executable, "-m", "lc_onnx.cli", "fuse", str(bad)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("lc-onnx fuse: error: ") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_inspect_lists_sites_and_reasons(mlp, capsys):
    assert cli.main(["inspect", str(mlp)]) == 0
    out = capsys.readouterr().out
    assert "[0] fc1 -> act -> fc2" in out and "slopes of act: 0.97..0.97" in out and "would collapse" in out
    assert cli.main(["inspect", str(mlp), "--threshold", "0.01", "--json"]) == 0
    sites = json.loads(capsys.readouterr().out)
    assert (
        sites[0]["decision"] == "skipped"
        and sites[0]["reason"] == "PRelu act: slopes 0.97..0.97 are not within 0.01 of 1"
    )


def test_demo_collapses_and_verifies(tmp_path, capsys):
    assert cli.main(["demo", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    decisions = sorted((s["decision"], s["activation"]) for s in report["sites"])
    assert decisions == [
        ("collapsed", "PRelu,BatchNormalization"),
        ("collapsed", "none;PRelu;none;PRelu"),
        ("skipped", "Gelu"),
    ]
    assert max(o["rel_l2"] for o in report["verification"]["outputs"].values()) < 1e-2
    assert files(tmp_path) == ["demo.collapsed.onnx", "demo.onnx", "report.json"]
    out = capsys.readouterr().out  # the summary, as `fuse` prints it, not the JSON report
    assert out.startswith("2 of 3 site(s) collapsed\n") and "verified on 2 feed(s) at tokens[2,16,32]" in out
    assert report["verification"]["feed_shapes"] == {"tokens": [2, 16, 32]}
    exact = next(s for s in report["sites"] if s["reason_kind"] == "exact")
    assert (
        exact["site_error"]["rel_l2"] <= 1e-5 and f"(site rel_l2={exact['site_error']['rel_l2']:.3g})" in out
    )
    assert '"sites"' not in out


def test_demo_json_prints_the_report_and_nothing_else(tmp_path, capsys):
    assert cli.main(["demo", "--out", str(tmp_path), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "report.json").read_text())
    assert sorted((s["decision"], s["reason_kind"]) for s in printed["sites"]) == [
        ("collapsed", "exact"),
        ("collapsed", "near_linear"),
        ("skipped", "not_linear"),
    ]
