"""Running sums for a least-squares linear map `y ≈ x @ A + c`, batch by batch, in float64.

Per batch of rows only the means and the centred sums are kept and merged into the running ones (Chan et
al.'s pairwise update, as `stats.Moments` does per channel, here for whole matrices):

    n, mean_x, mean_y, Cxx = Σ(x − mean_x)ᵀ(x − mean_x), Cxy = Σ(x − mean_x)ᵀ(y − mean_y), Syy = Σ‖y − mean_y‖²

so memory is `O(d_in·(d_in + d_out))` whatever the number of rows. The fit is the ridge solution
`A = (Cxx + λI)⁻¹ Cxy`, `c = mean_y − mean_x @ A`, with `λ` relative to Cxx's mean diagonal (a constant
or rank-deficient input gives finite weights). The squared error of any map on the rows summed is known
from the same sums, so a fit is scored on other rows (held out) without seeing them again:

    Σ‖y − x @ A − c‖² = Syy − 2·tr(Aᵀ Cxy) + tr(Aᵀ Cxx A) + n·‖mean_y − mean_x @ A − c‖²
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from lc_onnx.graph.algebra import Affine

RIDGES = (0.0, 1e-9, 1e-7, 1e-5, 1e-4, 1e-3, 1e-2)  # λ / mean diag(Cxx) tried against held-out rows
DEFAULT_RIDGE = 1e-3  # without held-out rows to choose by


@dataclass
class Gram:
    """The running sums of `(x, y)` row pairs; see the module docstring."""

    d_in: int
    d_out: int
    n: int = 0
    mean_x: np.ndarray = field(default=None)
    mean_y: np.ndarray = field(default=None)
    cxx: np.ndarray = field(default=None)
    cxy: np.ndarray = field(default=None)
    syy: float = 0.0

    def __post_init__(self) -> None:
        if self.mean_x is None:
            self.mean_x, self.mean_y = np.zeros(self.d_in), np.zeros(self.d_out)
            self.cxx, self.cxy = np.zeros((self.d_in, self.d_in)), np.zeros((self.d_in, self.d_out))

    def update(self, x: np.ndarray, y: np.ndarray) -> None:
        """Add the rows of `x` `[rows, d_in]` and `y` `[rows, d_out]`."""
        x = np.asarray(x, dtype=np.float64).reshape(-1, self.d_in)
        y = np.asarray(y, dtype=np.float64).reshape(-1, self.d_out)
        if x.shape[0] != y.shape[0]:
            raise AssertionError(f"{x.shape[0]} input rows, {y.shape[0]} output rows")
        if x.shape[0] == 0:
            return
        bx, by = x.mean(axis=0), y.mean(axis=0)
        dx, dy = x - bx, y - by
        batch = Gram(self.d_in, self.d_out, x.shape[0], bx, by, dx.T @ dx, dx.T @ dy, float(np.vdot(dy, dy)))
        self.merge(batch)

    def merge(self, other: Gram) -> None:
        if other.n == 0:
            return
        n, nb = self.n, other.n
        total = n + nb
        dx, dy = other.mean_x - self.mean_x, other.mean_y - self.mean_y
        weight = n * nb / total
        self.cxx = self.cxx + other.cxx + weight * np.outer(dx, dx)
        self.cxy = self.cxy + other.cxy + weight * np.outer(dx, dy)
        self.syy = self.syy + other.syy + weight * float(dy @ dy)
        self.mean_x = self.mean_x + dx * (nb / total)
        self.mean_y = self.mean_y + dy * (nb / total)
        self.n = total

    def solve(self, ridge: float = DEFAULT_RIDGE) -> Affine:
        """The ridge least-squares map (`ridge` relative to Cxx's mean diagonal)."""
        scale = float(np.trace(self.cxx)) / self.d_in if self.n else 0.0
        lam = ridge * scale if scale > 0 else 1.0  # a constant input: any A fits, take A = 0
        if lam == 0.0 and np.linalg.cond(self.cxx) > 1e12:
            lam = 1e-12 * scale  # too close to singular to solve without a ridge
        system = self.cxx + lam * np.eye(self.d_in)
        try:
            weight = np.linalg.solve(system, self.cxy)
        except np.linalg.LinAlgError:
            weight = np.linalg.lstsq(system, self.cxy, rcond=None)[0]
        return Affine(weight, self.mean_y - self.mean_x @ weight)

    def squared_error(self, fit: Affine) -> float:
        """`Σ‖y − x @ A − c‖²` over these rows (clipped at 0 against rounding)."""
        if self.n == 0:
            return 0.0
        a = fit.weight
        offset = self.mean_y - self.mean_x @ a - fit.bias
        sse = (
            self.syy
            - 2.0 * float(np.vdot(a, self.cxy))
            + float(np.vdot(a, self.cxx @ a))
            + self.n * float(offset @ offset)
        )
        return max(sse, 0.0)

    def energy(self) -> float:
        """`Σ‖y‖²` over these rows."""
        return self.syy + self.n * float(self.mean_y @ self.mean_y)

    def relative_error(self, fit: Affine) -> float:
        """`‖y − (x @ A + c)‖ / ‖y‖` over these rows (0 without rows)."""
        energy = self.energy()
        if energy <= 0:
            return 0.0 if self.squared_error(fit) == 0 else math.inf
        return math.sqrt(self.squared_error(fit) / energy)


def best_fit(fitted: Gram, held: Gram | None, ridges: Sequence[float] = RIDGES) -> tuple[Affine, float]:
    """The fit on `fitted` whose ridge gives the smallest error on `held` (held-out rows), and that ridge;
    `DEFAULT_RIDGE` without held-out rows."""
    if held is None or held.n == 0:
        return fitted.solve(DEFAULT_RIDGE), DEFAULT_RIDGE
    scored = []
    for ridge in ridges:
        fit = fitted.solve(ridge)
        error = held.squared_error(fit)
        if np.all(np.isfinite(fit.weight)) and np.all(np.isfinite(fit.bias)) and math.isfinite(error):
            scored.append((error, -ridge, fit))
    if not scored:
        return fitted.solve(DEFAULT_RIDGE), DEFAULT_RIDGE
    error, neg_ridge, fit = min(scored, key=lambda t: (t[0], t[1]))
    return fit, -neg_ridge
