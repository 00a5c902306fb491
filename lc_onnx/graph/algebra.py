"""The collapse algebra, in float64 numpy with no graph types.

Conventions: a linear layer is `y = x @ W + b` with `W` of shape `[d_in, d_out]` (the MatMul layout; a
Gemm with `transB=1` stores `W.T`). An activation that is linear on the data is a per-channel affine map
`act(h) = a ⊙ h + c` over the last axis, `a` and `c` of shape `[d_h]`.

Two layers joined by such an activation collapse into one:

    y = (a ⊙ (x @ W1 + b1) + c) @ W2 + b2
      = x @ (W1 · diag(a) · W2) + ((a ⊙ b1 + c) @ W2 + b2)

(in the paper's `W x` layout this is `W = W2·diag(a)·W1`, `b = W2·(a⊙b1 + c) + b2`). Chains fold left to
right. Several affine steps in a row (PReLU treated as identity, BatchNorm, Identity, a per-feature
constant Mul/Add) compose into one, and such steps right before or after a layer fold into it
(`with_steps`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Affine:
    """`x -> x @ weight + bias` in float64; `weight` is `[d_in, d_out]`, `bias` is `[d_out]`."""

    weight: np.ndarray
    bias: np.ndarray

    @property
    def d_in(self) -> int:
        return int(self.weight.shape[0])

    @property
    def d_out(self) -> int:
        return int(self.weight.shape[1])


@dataclass(frozen=True)
class ChannelAffine:
    """`h -> scale ⊙ h + shift` per channel of the last axis, both `[d]` float64."""

    scale: np.ndarray
    shift: np.ndarray

    @classmethod
    def identity(cls, d: int) -> ChannelAffine:
        return cls(np.ones(d), np.zeros(d))


def linear(weight: np.ndarray, bias: np.ndarray | None = None) -> Affine:
    """An `Affine` in float64 from a `[d_in, d_out]` weight and an optional bias broadcastable to `[d_out]`."""
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 2:
        raise ValueError(f"weight must be 2-D, got shape {w.shape}")
    return Affine(w, np.zeros(w.shape[1]) if bias is None else vector(bias, w.shape[1]))


def vector(values: np.ndarray | float, d: int) -> np.ndarray:
    """`values` as a float64 `[d]` vector: a single value is repeated, otherwise it must hold `d` values."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 1:
        return np.full(d, v[0])
    if v.size != d:
        raise ValueError(f"expected 1 or {d} values, got {v.size}")
    return v.copy()


def channel_affine(scale: np.ndarray | float, shift: np.ndarray | float, d: int) -> ChannelAffine:
    """`scale ⊙ h + shift` with both given as one value or `d` values (see `vector`)."""
    return ChannelAffine(vector(scale, d), vector(shift, d))


def batchnorm(
    scale: np.ndarray, bias: np.ndarray, mean: np.ndarray, var: np.ndarray, epsilon: float
) -> ChannelAffine:
    """Inference BatchNormalization as `a ⊙ h + c`: `a = scale / sqrt(var + eps)`, `c = bias - mean · a`."""
    a = np.asarray(scale, np.float64) / np.sqrt(np.asarray(var, np.float64) + float(epsilon))
    return ChannelAffine(a, np.asarray(bias, np.float64) - np.asarray(mean, np.float64) * a)


def compose_steps(steps: Sequence[ChannelAffine]) -> ChannelAffine:
    """One `ChannelAffine` equal to applying `steps` in order."""
    if not steps:
        raise ValueError("compose_steps needs at least one step")
    scale, shift = steps[0].scale.copy(), steps[0].shift.copy()
    for step in steps[1:]:
        scale, shift = step.scale * scale, step.scale * shift + step.shift
    return ChannelAffine(scale, shift)


def with_steps(layer: Affine, pre: Sequence[ChannelAffine], post: Sequence[ChannelAffine]) -> Affine:
    """The layer with per-feature steps folded in: `post(pre(x) @ W + b)`.

    With `pre` composed to `s ⊙ x + t` and `post` to `u ⊙ y + v`:
    `W' = diag(s) · W · diag(u)`, `b' = u ⊙ (t @ W + b) + v`.
    """
    w, b = layer.weight, layer.bias
    if pre:
        s = compose_steps(pre)
        w, b = s.scale[:, None] * w, s.shift @ w + b
    if post:
        u = compose_steps(post)
        w, b = w * u.scale[None, :], u.scale * b + u.shift
    return Affine(w, b)


def collapse_pair(first: Affine, act: ChannelAffine, second: Affine) -> Affine:
    """The single layer equal to `second(act(first(x)))`."""
    if first.d_out != act.scale.shape[0] or second.d_in != first.d_out:
        raise ValueError(
            f"shape mismatch: first layer {first.weight.shape}, activation {act.scale.shape}, "
            f"second layer {second.weight.shape}"
        )
    weight = (first.weight * act.scale[None, :]) @ second.weight
    bias = (act.scale * first.bias + act.shift) @ second.weight + second.bias
    return Affine(weight, bias)


def collapse_chain(layers: Sequence[Affine], acts: Sequence[ChannelAffine]) -> Affine:
    """Fold `layers[0], acts[0], layers[1], ..., layers[-1]` into one layer (`len(acts) == len(layers) - 1`)."""
    if len(acts) != len(layers) - 1 or not layers:
        raise ValueError(f"{len(layers)} layers need {len(layers) - 1} activations, got {len(acts)}")
    out = layers[0]
    for act, layer in zip(acts, layers[1:]):
        out = collapse_pair(out, act, layer)
    return out


def apply(layer: Affine, x: np.ndarray) -> np.ndarray:
    """`x @ W + b` on the last axis (reference for tests)."""
    return np.asarray(x, np.float64) @ layer.weight + layer.bias
