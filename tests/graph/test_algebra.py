"""The collapse algebra against direct evaluation, in float64."""

from __future__ import annotations

import numpy as np
import pytest

from lc_onnx.graph import algebra


def rand_layer(rng, d_in, d_out):
    return algebra.linear(rng.standard_normal((d_in, d_out)), rng.standard_normal(d_out))


def act_apply(act: algebra.ChannelAffine, h):
    return act.scale * h + act.shift


@pytest.mark.parametrize("dims", [(3, 5, 2), (8, 8, 8), (1, 4, 1), (6, 2, 9)])
def test_collapse_pair_equals_sequential_application(dims):
    rng = np.random.default_rng(0)
    first, second = rand_layer(rng, *dims[:2]), rand_layer(rng, *dims[1:])
    act = algebra.ChannelAffine(rng.uniform(0.5, 2, dims[1]), rng.standard_normal(dims[1]))
    x = rng.standard_normal((7, dims[0]))
    expected = algebra.apply(second, act_apply(act, algebra.apply(first, x)))
    got = algebra.apply(algebra.collapse_pair(first, act, second), x)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_collapse_chain_of_four():
    rng = np.random.default_rng(1)
    dims = [4, 7, 3, 9, 2]
    layers = [rand_layer(rng, a, b) for a, b in zip(dims, dims[1:])]
    acts = [algebra.ChannelAffine(rng.uniform(0.5, 2, d), rng.standard_normal(d)) for d in dims[1:-1]]
    x = rng.standard_normal((5, 4))
    h = x
    for i, layer in enumerate(layers):
        h = algebra.apply(layer, h)
        if i < len(acts):
            h = act_apply(acts[i], h)
    collapsed = algebra.collapse_chain(layers, acts)
    assert collapsed.weight.shape == (4, 2)
    np.testing.assert_allclose(algebra.apply(collapsed, x), h, rtol=1e-11, atol=1e-11)


def test_batchnorm_matches_formula():
    rng = np.random.default_rng(2)
    scale, bias, mean, var = (
        rng.uniform(0.5, 2, 6),
        rng.standard_normal(6),
        rng.standard_normal(6),
        rng.uniform(0.1, 2, 6),
    )
    h = rng.standard_normal((10, 6))
    bn = algebra.batchnorm(scale, bias, mean, var, 1e-3)
    np.testing.assert_allclose(act_apply(bn, h), scale * (h - mean) / np.sqrt(var + 1e-3) + bias, rtol=1e-12)


def test_compose_steps_applies_in_order():
    rng = np.random.default_rng(3)
    steps = [algebra.ChannelAffine(rng.standard_normal(4), rng.standard_normal(4)) for _ in range(3)]
    h = rng.standard_normal((5, 4))
    expected = h
    for step in steps:
        expected = act_apply(step, expected)
    np.testing.assert_allclose(act_apply(algebra.compose_steps(steps), h), expected, rtol=1e-12)


@pytest.mark.parametrize(
    "value,d,expected", [(2.0, 3, [2, 2, 2]), ([[1.0, 2.0]], 2, [1, 2]), (np.ones((1, 1, 4)), 4, [1] * 4)]
)
def test_vector_broadcasts_single_values_and_flattens(value, d, expected):
    np.testing.assert_array_equal(algebra.vector(value, d), expected)


def test_vector_rejects_wrong_length_and_chain_rejects_mismatch():
    with pytest.raises(ValueError, match="expected 1 or 3 values, got 2"):
        algebra.vector([1.0, 2.0], 3)
    rng = np.random.default_rng(4)
    with pytest.raises(ValueError, match="shape mismatch"):
        algebra.collapse_pair(rand_layer(rng, 2, 3), algebra.ChannelAffine.identity(3), rand_layer(rng, 4, 2))
    with pytest.raises(ValueError, match="2 layers need 1 activations, got 0"):
        algebra.collapse_chain([rand_layer(rng, 2, 3), rand_layer(rng, 3, 2)], [])
