"""The least-squares sums of the block fit: batch-independent, exact on exactly linear data, finite on
degenerate data, and scored on held-out rows from the sums alone."""

from __future__ import annotations

import numpy as np
import pytest

from lc_onnx.calibration.gram import DEFAULT_RIDGE, Gram, best_fit
from lc_onnx.graph.algebra import Affine


def _data(rows: int, seed: int = 0, noise: float = 0.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 6)) * np.array([1, 2, 3, 0.5, 0.1, 4]) + 3.0
    a, c = rng.normal(size=(6, 4)), rng.normal(size=4)
    return x, x @ a + c + noise * rng.normal(size=(rows, 4)), Affine(a, c)


def test_one_batch_or_ten_give_the_same_sums():
    x, y, _ = _data(1000)
    whole, parts = Gram(6, 4), Gram(6, 4)
    whole.update(x, y)
    for chunk in np.array_split(np.arange(1000), 10):
        parts.update(x[chunk], y[chunk])
    assert whole.n == parts.n == 1000
    for name in ("mean_x", "mean_y", "cxx", "cxy"):
        np.testing.assert_allclose(getattr(parts, name), getattr(whole, name), rtol=1e-12, atol=1e-9)
    assert parts.syy == pytest.approx(whole.syy, rel=1e-12)


def test_an_exactly_linear_relation_is_recovered_to_float_precision():
    x, y, truth = _data(500)
    held_x, held_y, _ = _data(200, seed=1)
    held_y = held_x @ truth.weight + truth.bias
    fitted, held = Gram(6, 4), Gram(6, 4)
    fitted.update(x, y)
    held.update(held_x, held_y)
    fit, ridge = best_fit(fitted, held)
    assert ridge == 0.0  # the held-out rows choose no ridge: nothing to regularise
    np.testing.assert_allclose(fit.weight, truth.weight, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(fit.bias, truth.bias, rtol=1e-6, atol=1e-6)
    assert held.relative_error(fit) < 1e-6


def test_squared_error_from_the_sums_is_the_direct_one():
    x, y, _ = _data(300, noise=0.5)
    gram = Gram(6, 4)
    gram.update(x, y)
    fit = Affine(np.ones((6, 4)) * 0.1, np.arange(4.0))
    direct = float(((y - (x @ fit.weight + fit.bias)) ** 2).sum())
    assert gram.squared_error(fit) == pytest.approx(direct, rel=1e-9)
    assert gram.energy() == pytest.approx(float((y**2).sum()), rel=1e-12)


def test_constant_and_rank_deficient_inputs_give_finite_weights():
    gram = Gram(3, 2)
    gram.update(np.ones((50, 3)), np.random.default_rng(0).normal(size=(50, 2)))
    fit = gram.solve()
    assert np.all(np.isfinite(fit.weight)) and np.all(fit.weight == 0)  # constant input: A = 0, c = mean
    np.testing.assert_allclose(fit.bias, gram.mean_y)
    x = np.random.default_rng(1).normal(size=(50, 1)) @ np.ones((1, 3))  # three equal columns
    gram = Gram(3, 2)
    gram.update(x, x[:, :2] * 2.0)
    fit = gram.solve(DEFAULT_RIDGE)
    assert np.all(np.isfinite(fit.weight)) and gram.relative_error(fit) < 1e-3


def test_without_held_out_rows_the_default_ridge_is_used():
    x, y, _ = _data(100)
    gram = Gram(6, 4)
    gram.update(x, y)
    assert best_fit(gram, None)[1] == DEFAULT_RIDGE
    assert best_fit(gram, Gram(6, 4))[1] == DEFAULT_RIDGE
