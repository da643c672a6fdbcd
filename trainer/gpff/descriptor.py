"""The inverse-distance descriptor of sGDML and its Jacobian (sgdml_chapter eq. 7.22).

Pairs are ordered as the row-major lower triangle: (i, j) with i > j, i = 1..N-1, j = 0..i-1
(``torch.tril_indices(N, N, -1)``), D = N(N-1)/2; x_ij = 1 / ||r_i - r_j||.
"""

from __future__ import annotations

import torch


def pair_indices(n_atoms: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(i, j) index tensors, each (D,), of the descriptor's atom pairs (i > j)."""
    ij = torch.tril_indices(n_atoms, n_atoms, offset=-1, device=device)
    return ij[0], ij[1]


def inverse_distance(R: torch.Tensor) -> torch.Tensor:
    """Inverse-distance descriptor x (..., D) of positions R (..., N, 3) in Å (x in 1/Å)."""
    i, j = pair_indices(R.shape[-2], R.device)
    return 1.0 / torch.linalg.vector_norm(R[..., i, :] - R[..., j, :], dim=-1)


def inverse_distance_jacobian(R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Descriptor and its Jacobian.

    Args:
        R: (..., N, 3) positions, Å.
    Returns:
        x: (..., D) descriptor, 1/Å.
        J: (..., D, 3N) with J[p, 3a + c] = dx_p / dR[a, c] (1/Å²).
    """
    n = R.shape[-2]
    i, j = pair_indices(n, R.device)
    diff = R[..., i, :] - R[..., j, :]                       # (..., D, 3)
    inv = 1.0 / torch.linalg.vector_norm(diff, dim=-1)        # (..., D)
    g = diff * (inv ** 3).unsqueeze(-1)                        # d x_ij / d r_j  = +diff / r^3
    J = R.new_zeros(R.shape[:-2] + (i.numel(), n, 3))
    p = torch.arange(i.numel(), device=R.device)
    J[..., p, i, :] = -g
    J[..., p, j, :] = g
    return inv, J.reshape(R.shape[:-2] + (i.numel(), 3 * n))
