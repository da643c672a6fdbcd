"""sGDML descriptors: the inverse-distance descriptor and its Jacobian (sgdml_chapter eq. 7.22),
and the choice between it and the global FCHL19 descriptor (gpff.fchl19).

Pairs are ordered as the row-major lower triangle: (i, j) with i > j, i = 1..N-1, j = 0..i-1
(``torch.tril_indices(N, N, -1)``), D = N(N-1)/2; x_ij = 1 / ||r_i - r_j||^p (p = 1 in sGDML;
the exponent is a hyperparameter in papers/ad_kernels.txt SI §D).
"""

from __future__ import annotations

import torch


def pair_indices(n_atoms: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(i, j) index tensors, each (D,), of the descriptor's atom pairs (i > j)."""
    ij = torch.tril_indices(n_atoms, n_atoms, offset=-1, device=device)
    return ij[0], ij[1]


def inverse_distance_jacobian(R: torch.Tensor, p: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Descriptor and its Jacobian.

    Args:
        R: (..., N, 3) positions, Å.
        p: exponent of x_ij = r_ij^-p.
    Returns:
        x: (..., D) descriptor, Å^-p.
        J: (..., D, 3N) with J[q, 3a + c] = dx_q / dR[a, c] (Å^-p-1).
    """
    n = R.shape[-2]
    i, j = pair_indices(n, R.device)
    diff = R[..., i, :] - R[..., j, :]                       # (..., D, 3)
    r = torch.linalg.vector_norm(diff, dim=-1)                # (..., D)
    x = r ** (-p)
    g = diff * (p * x / (r * r)).unsqueeze(-1)               # d x_ij / d r_j = +p diff / r^(p+2)
    J = R.new_zeros(R.shape[:-2] + (i.numel(), n, 3))
    q = torch.arange(i.numel(), device=R.device)
    J[..., q, i, :] = -g
    J[..., q, j, :] = g
    return x, J.reshape(R.shape[:-2] + (i.numel(), 3 * n))


class InverseDistance:
    """The inverse-distance descriptor x_ij = 1/r_ij^p as a callable R -> (x, J).

    p may be a tensor that requires grad (gpff.hyperopt differentiates through it).
    """

    name = "inverse_distance"

    def __init__(self, p=1.0):
        self.p = p

    def __call__(self, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return inverse_distance_jacobian(R, self.p)

    def metadata(self) -> dict:
        """The model-file metadata of this descriptor (docs/model_file.md)."""
        return {"descriptor": self.name, "descriptor_exponent": float(self.p)}


#: descriptor names of SGDML(descriptor=...) and the model file's "descriptor" field
DESCRIPTORS = ("inverse_distance", "fchl19")


def make_descriptor(name: str, z, p: float = 1.0, fchl19: dict | None = None):
    """The descriptor callable R (..., N, 3) -> (x (..., D), J (..., D, 3N)) of molecules with
    atomic numbers z (N,): :class:`InverseDistance` (exponent p) or the global FCHL19 descriptor
    (gpff.fchl19, parameters `fchl19`). Raises ValueError for an unknown name or bad parameters."""
    if name == "inverse_distance":
        return InverseDistance(p)
    if name == "fchl19":
        from .fchl19 import FCHL19Descriptor

        return FCHL19Descriptor(z, fchl19)
    raise ValueError(f"unknown descriptor {name!r}; known: {', '.join(DESCRIPTORS)}")
