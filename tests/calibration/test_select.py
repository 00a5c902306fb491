"""Selection under a budget: what collapses, and the error measured independently in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import lc_onnx
from lc_onnx.calibration.data import split
from lc_onnx.testing import op_types, ort_outputs, rel_l2
from tests.calibration.models import feeds, mlp

SLOPES = np.random.default_rng(3).uniform(0.8, 0.95, 64)
SLOPES32 = SLOPES[:32]
ACTS = ("act0", "act1", "act2")


def held_out(data: list) -> list:
    """The feeds the calibrated fuse holds out (every fourth), to measure on the same data."""
    fit, held = split(iter(data), None)
    for _ in fit:
        pass
    return held


def collapsed_steps(report) -> list[str]:
    """The activation steps inside collapsed sites (a chain collapse covers several)."""
    return [n for s in report.sites if s.decision == "collapsed" for n in s.nodes if n in ACTS]


def measured(original: onnx.ModelProto, fused: onnx.ModelProto, data: list) -> float:
    """Worst relative L2 error over the feeds, computed here, not taken from the report."""
    ref = np.concatenate([ort_outputs(original, f)[0] for f in data])
    got = np.concatenate([ort_outputs(fused, f)[0] for f in data])
    return rel_l2(got, ref)


def test_prelu_slopes_outside_the_rule_collapse_within_the_budget():
    model = mlp([SLOPES], [16, 64, 16])
    data = feeds(model, 8, rows=32)
    # The 0.05 slope rule leaves this site alone.
    assert lc_onnx.fuse(model, threshold=0.05).collapsed == 0
    result = lc_onnx.fuse(model, data=data, fit_method="channel", max_error=0.05)
    assert result.collapsed == 1 and op_types(result.model) == ["Gemm"]
    [site] = result.report.sites
    entry = site.extra["calibration"]["act0"]
    assert entry["decision"] == "applied" and entry["measured_error"] <= 0.05
    assert entry["fit_error"] > 0 and entry["estimated_error"] > 0
    error = measured(model, result.model, held_out(data))
    assert 0 < error <= 0.05
    assert error == pytest.approx(result.report.verification.worst_rel_l2, rel=1e-3)
    onnx.checker.check_model(result.model, full_check=True)


def test_max_abs_budget_is_measured_on_every_element():
    model = mlp([SLOPES], [16, 64, 16])
    data = feeds(model, 8, rows=32)
    loose = lc_onnx.fuse(model, data=data, fit_method="channel", max_error=0.05)
    worst_abs = max(
        float(np.max(np.abs(ort_outputs(loose.model, f)[0] - ort_outputs(model, f)[0])))
        for f in held_out(data)
    )
    assert worst_abs > 0
    tight = lc_onnx.fuse(model, data=data, fit_method="channel", max_error=0.05, max_abs_error=worst_abs / 2)
    assert tight.collapsed == 0
    assert "max abs error" in tight.report.sites[0].extra["calibration"]["act0"]["reason"]
    enough = lc_onnx.fuse(
        model, data=data, fit_method="channel", max_error=0.05, max_abs_error=worst_abs * 1.01
    )
    assert enough.collapsed == 1
    assert enough.report.verification.worst_max_abs == pytest.approx(worst_abs, rel=1e-5)


def test_budget_zero_collapses_only_exactly_linear_sites():
    model = mlp([1.0, SLOPES32, "Gelu"], [32] * 5)
    data = feeds(model, 8, rows=32)
    result = lc_onnx.fuse(model, data=data, fit_method="channel", max_error=0.0)
    assert collapsed_steps(result.report) == ["act0"]
    assert all(s.extra["exact"] for s in result.report.collapsed)
    skipped = {s.activation: s.reason for s in result.report.sites if s.decision == "skipped"}
    assert skipped.keys() == {"PRelu", "Gelu"}
    assert all("fit rejected: measured relative L2 error" in r for r in skipped.values())
    assert measured(model, result.model, held_out(data)) < 1e-6


def test_greedy_keeps_cheap_sites_and_rejects_costly_ones():
    model = mlp([SLOPES32, "Gelu"], [32] * 4)
    result = lc_onnx.fuse(model, data=feeds(model, 8, rows=32), fit_method="channel", max_error=0.08)
    by_act = {s.activation: s for s in result.report.sites}
    assert by_act["PRelu"].decision == "collapsed" and by_act["Gelu"].decision == "skipped"
    gelu = by_act["Gelu"].extra["calibration"]["act1"]
    assert gelu["decision"] == "rejected" and gelu["measured_error"] > 0.08
    assert gelu["estimated_error"] > by_act["PRelu"].extra["calibration"]["act0"]["estimated_error"]


def test_fits_beat_the_slope_rule_at_an_equal_budget():
    rng = np.random.default_rng(5)
    acts = [rng.uniform(0.95, 0.99, 32), rng.uniform(0.96, 1.0, 32), rng.uniform(0.85, 0.9, 32)]
    model = mlp(acts, [32] * 5)
    data = feeds(model, 8, rows=32)
    check = held_out(data)
    rule = lc_onnx.fuse(model, threshold=0.05, max_error=1.0)
    rule_error = measured(model, rule.model, check)
    assert collapsed_steps(rule.report) == ["act0", "act1"] and rule_error > 0

    calibrated = lc_onnx.fuse(model, data=data, fit_method="channel", max_error=rule_error)
    assert len(collapsed_steps(calibrated.report)) >= 2
    assert measured(model, calibrated.model, check) <= rule_error

    # The same two sites, collapsed with their fitted a, c instead of a pretended slope of 1.
    cal = lc_onnx.calibrate(model, data)
    same = lc_onnx.fuse(model, threshold=0.0, fits=cal.affines({"act0", "act1"}), max_error=1.0)
    assert collapsed_steps(same.report) == ["act0", "act1"]
    assert measured(model, same.model, check) < rule_error


def test_metric_budget(tmp_path):
    model = mlp([SLOPES32, "Gelu"], [32] * 4)
    data = feeds(model, 8, rows=32)
    probe = feeds(model, 1, rows=64, seed=9)[0]
    reference = ort_outputs(model, probe)[0]

    def agreement(run) -> float:  # higher is better: 1 - relative error on a fixed probe batch
        return 1.0 - rel_l2(run(probe)["fc2_out"], reference)

    result = lc_onnx.fuse(model, data=data, fit_method="channel", metric=agreement, max_drop=0.08)
    by_act = {s.activation: s for s in result.report.sites}
    assert by_act["PRelu"].decision == "collapsed" and by_act["Gelu"].decision == "skipped"
    assert 1.0 - agreement(lambda f: {"fc2_out": ort_outputs(result.model, f)[0]}) <= 0.08
    assert by_act["PRelu"].extra["calibration"]["act0"]["metric"] >= 0.92
