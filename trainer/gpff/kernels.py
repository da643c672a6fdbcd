"""Radial kernels k(d) of the descriptor distance d = ‖x − x'‖ and their derivative factors.

For a kernel k(d), the operator (Hessian) kernel needs k₁(d) = k'(d)/d and
k₂(d) = (k''(d) − k'(d)/d)/d², because ∇_x k = k₁ u and ∇_x ∇_x'ᵀ k = −k₂ u uᵀ − k₁ I (u = x − x').
Source: papers/sgdml_chapter.txt eqs. 7.23-7.26 (Matérn 5/2); papers/ad_kernels.txt (RBF vs
Matérn); the table in docs/model_file.md, which the C++ core implements too.
"""

from __future__ import annotations

import math

import torch


def matern52(d: torch.Tensor, sigma: float):
    """Matérn 5/2: k = (1 + a d + a²d²/3) e^{−a d}, a = √5/σ. Returns (k, k₁, k₂), each d's shape."""
    a = math.sqrt(5.0) / sigma
    e = torch.exp(-a * d)
    ad = a * d
    return (1.0 + ad + ad * ad / 3.0) * e, -(a * a / 3.0) * (1.0 + ad) * e, (a ** 4 / 3.0) * e


def rbf(d: torch.Tensor, sigma: float):
    """Squared-exponential (RBF): k = exp(−d²/(2σ²)). Returns (k, k₁, k₂), each d's shape."""
    k = torch.exp(-0.5 * (d / sigma) ** 2)
    s2 = sigma * sigma
    return k, -k / s2, k / (s2 * s2)


#: kernels the C++ core evaluates too (name stored in the model file)
RADIAL_KERNELS = {"matern52": matern52, "rbf": rbf}


def get_kernel(name: str):
    """The radial kernel function called `name`; ValueError for an unknown name."""
    try:
        return RADIAL_KERNELS[name]
    except KeyError:
        raise ValueError(f"unknown kernel {name!r}; known: {', '.join(RADIAL_KERNELS)}") from None
