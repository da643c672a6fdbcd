"""Uniform cubic B-splines on regular grids: interpolation (1-D and tensor-product 3-D) and evaluation.

The representation is the one the C++ core evaluates (docs/mff.md, "Uniform cubic B-spline"):
an axis with grid x_m = x0 + m h (m = 0 .. n-1, n >= 4) has n + 2 coefficients c_0 .. c_{n+1} and

    t = (x - x0)/h,  m = clamp(floor(t), 0, n - 2),  u = t - m
    s(x) = sum_{a=0..3} c_{m+a} b_a(u)

with the uniform cubic B-spline basis b_a. Interpolation conditions s(x_m) = y_m plus the
not-a-knot conditions (third derivative continuous at x_1 and x_{n-2}) fix the coefficients; the
interpolation error is O(h^4) in the value and O(h^3) in the derivative.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Axis:
    """A uniform grid x_m = start + m * spacing, m = 0 .. n_points - 1 (Å)."""

    start: float
    spacing: float
    n_points: int

    @classmethod
    def spanning(cls, lo: float, hi: float, n_points: int) -> "Axis":
        """The grid of `n_points` (>= 4) nodes from `lo` to `hi` inclusive."""
        if n_points < 4 or not hi > lo:
            raise ValueError(f"a spline axis needs n_points >= 4 and hi > lo (got {n_points}, "
                             f"[{lo}, {hi}])")
        return cls(float(lo), float(hi - lo) / (n_points - 1), int(n_points))

    @property
    def nodes(self) -> np.ndarray:
        return self.start + self.spacing * np.arange(self.n_points)

    @property
    def stop(self) -> float:
        return self.start + self.spacing * (self.n_points - 1)

    def to_json(self) -> dict:
        return {"min": self.start, "spacing": self.spacing, "n_points": self.n_points}


def _interpolation_operator(n: int) -> np.ndarray:
    """(n + 2, n) matrix P with c = P y: coefficients of the not-a-knot interpolant of y."""
    M = np.zeros((n + 2, n + 2))
    for m in range(n):
        M[m, m:m + 3] = (1.0 / 6.0, 4.0 / 6.0, 1.0 / 6.0)
    M[n, 0:5] = (1.0, -4.0, 6.0, -4.0, 1.0)
    M[n + 1, n - 3:n + 2] = (1.0, -4.0, 6.0, -4.0, 1.0)
    return np.linalg.inv(M)[:, :n]


def interpolate(values: np.ndarray) -> np.ndarray:
    """Coefficients of the tensor-product interpolant of grid `values`.

    values: (n1,) or (n1, n2, n3) samples at the grid nodes (each n >= 4).
    Returns: (n1 + 2,) or (n1 + 2, n2 + 2, n3 + 2) coefficients.
    """
    coef = np.asarray(values, dtype=np.float64)
    for axis in range(coef.ndim):
        P = _interpolation_operator(coef.shape[axis])
        coef = np.moveaxis(np.tensordot(P, coef, axes=([1], [axis])), 0, axis)
    return np.ascontiguousarray(coef)


def _basis(axis: Axis, x: np.ndarray):
    """First coefficient index m (P,), basis values b (P, 4) and derivatives db/dx (P, 4)."""
    t = (np.asarray(x, dtype=np.float64) - axis.start) / axis.spacing
    m = np.clip(np.floor(t), 0, axis.n_points - 2).astype(np.int64)
    u = t - m
    u2, u3 = u * u, u * u * u
    b = np.stack([(1 - u) ** 3, 3 * u3 - 6 * u2 + 4, -3 * u3 + 3 * u2 + 3 * u + 1, u3], -1) / 6.0
    db = np.stack([-(1 - u) ** 2 / 2, 1.5 * u2 - 2 * u, -1.5 * u2 + u + 0.5, u2 / 2], -1)
    return m, b, db / axis.spacing


def evaluate_1d(coef: np.ndarray, axis: Axis, x: np.ndarray):
    """Value s(x) and derivative s'(x), each (P,), of a 1-D spline at points x (P,)."""
    m, b, db = _basis(axis, x)
    c = coef[m[:, None] + np.arange(4)]
    return np.einsum("pa,pa->p", c, b), np.einsum("pa,pa->p", c, db)


def evaluate_3d(coef: np.ndarray, axes, X: np.ndarray):
    """Value (P,) and gradient (P, 3) of a tricubic spline at points X (P, 3)."""
    X = np.asarray(X, dtype=np.float64)
    (m1, b1, d1), (m2, b2, d2), (m3, b3, d3) = (_basis(a, X[:, k]) for k, a in enumerate(axes))
    r = np.arange(4)
    C = coef[(m1[:, None] + r)[:, :, None, None], (m2[:, None] + r)[:, None, :, None],
             (m3[:, None] + r)[:, None, None, :]]
    value = np.einsum("pabc,pa,pb,pc->p", C, b1, b2, b3)
    grad = np.stack([np.einsum("pabc,pa,pb,pc->p", C, d1, b2, b3),
                     np.einsum("pabc,pa,pb,pc->p", C, b1, d2, b3),
                     np.einsum("pabc,pa,pb,pc->p", C, b1, b2, d3)], -1)
    return value, grad
