"""`lc-onnx fuse` on the bad-input corpus: a correct model or one error line, never a traceback, the input
untouched and nothing half-written left behind."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest

from lc_onnx import cli
from lc_onnx.commands.common import parse_input_shapes
from lc_onnx.model import runtime
from tests.hardening.corpus import ERRORS, OUTPUTS, Invocation

REPO = Path(__file__).resolve().parents[2]
# Accepted relative L2 error of an exact collapse, by the output's dtype.
TOLERANCE = {
    np.dtype(np.float16): 3e-3,
    np.dtype(ml_dtypes.bfloat16): 3e-2,
    np.dtype(np.float32): 1e-5,
    np.dtype(np.float64): 1e-12,
}


def snapshot(root: Path) -> dict[str, str]:
    """Every path under `root` (hidden ones included) with its content hash, link target or kind."""
    found = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            found[key] = "-> " + str(path.readlink())
        elif path.is_dir():
            found[key] = "dir"
        else:
            found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def fuse_argv(inv: Invocation, out: Path, *extra: str) -> list[str]:
    return ["fuse", str(inv.model), "-o", str(out), *inv.args, *extra]


@pytest.mark.parametrize(("build", "code", "message"), [pytest.param(b, c, m, id=i) for i, b, c, m in ERRORS])
def test_bad_input_is_one_error_line_and_changes_nothing(tmp_path, capsys, build, code, message):
    inv = build(tmp_path)
    out = inv.output or tmp_path / "fused.onnx"
    before = snapshot(tmp_path)

    rc = cli.main(fuse_argv(inv, out))

    captured = capsys.readouterr()
    assert rc == code
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("lc-onnx fuse: error: ")
    assert message in lines[0]
    assert "Traceback" not in captured.out + captured.err
    assert snapshot(tmp_path) == before  # input byte-identical, no output, no staging dir, no .tmp file


@pytest.mark.parametrize(("build", "collapsed"), [pytest.param(b, c, id=i) for i, b, c in OUTPUTS])
def test_odd_input_gives_a_correct_model(tmp_path, capsys, build, collapsed):
    inv = build(tmp_path)
    out, report = tmp_path / "fused.onnx", tmp_path / "report.json"
    before = snapshot(tmp_path)

    rc = cli.main(fuse_argv(inv, out, "--report", str(report)))

    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "Traceback" not in captured.out + captured.err
    after = snapshot(tmp_path)
    new = set(after) - set(before)
    external = out.with_name(out.name + ".data")
    assert new == {out.name, report.name} | ({external.name} if external.exists() else set())
    assert {k: after[k] for k in before} == before
    sites = json.loads(report.read_text())["sites"]
    assert sum(s["decision"] == "collapsed" for s in sites) == collapsed

    original = onnx.load(str(inv.model))
    fused = onnx.load(str(out))
    if collapsed == 0 and not external.exists():
        assert fused == original
    if _passes_checker(original):
        onnx.checker.check_model(fused, full_check=True)
    feeds = runtime.random_feeds(original, runtime.input_shapes(original, _shapes(inv.args)), seed=1)
    expected, actual = _run(original, feeds), _run(fused, feeds)
    for e, a in zip(expected, actual, strict=True):
        assert e.shape == a.shape and e.dtype == a.dtype
        if collapsed == 0:
            assert np.array_equal(e, a, equal_nan=True)
        else:
            err = np.linalg.norm(a.astype(np.float64) - e) / max(np.linalg.norm(e.astype(np.float64)), 1e-30)
            assert err <= TOLERANCE[e.dtype], err


def _passes_checker(model: onnx.ModelProto) -> bool:
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError):
        return False  # e.g. sparse initializers, which onnx's own type check does not accept as inputs
    return True


def _shapes(args: list[str]) -> dict[str, tuple[int, ...]]:
    specs = [args[i + 1] for i, a in enumerate(args) if a == "--input-shape"]
    return parse_input_shapes(specs)


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """onnxruntime, or onnx's reference evaluator where onnxruntime has no kernel (bf16, custom domains)."""
    try:
        session = runtime.session(model.SerializeToString(), optimization="disable")
    except Exception:
        from onnx.reference import ReferenceEvaluator

        if any(op.domain not in ("", "ai.onnx") for op in model.opset_import if op.domain != "local"):
            return []  # nothing can run an unknown domain; the checker above is what we can assert
        return [np.asarray(o) for o in ReferenceEvaluator(model).run(None, feeds)]
    return session.run(None, feeds)


SUBPROCESS_CASES = ["binary_garbage", "missing_path", "output_equals_input", "external_data_escapes_with_dotdot",
                    "cycle_reaching_output", "verification_fails"]  # fmt: skip


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_no_traceback_reaches_the_terminal(tmp_path, case):
    build, code, message = next((b, c, m) for i, b, c, m in ERRORS if i == case)
    inv = build(tmp_path)
    before = snapshot(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "lc_onnx.cli", *fuse_argv(inv, inv.output or tmp_path / "fused.onnx")],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert proc.returncode == code
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("lc-onnx fuse: error: ") and message in proc.stderr
    assert snapshot(tmp_path) == before
