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


def training_rows(descriptor, R: torch.Tensor, alpha: torch.Tensor, batch: int = 32):
    """The training rows of an sGDML model from its geometries and force coefficients.

    Args:
        descriptor: a descriptor with ``jvp(R, dR) -> (x, J dR)`` (gpff.fchl19.FCHL19Descriptor).
        R: (M, N, 3) training positions, Å. alpha: (M, N, 3) Cartesian force coefficients α_m.
        batch: frames per descriptor call.
    Returns:
        x_m = x(R_m) and v_m = J(R_m) α_m, (M, D) each: what a reader of an fchl19 model file
        recomputes (docs/model_file.md).
    Raises:
        ValueError: a geometry the descriptor refuses (a collinear FCHL19 triplet), naming the
        first such frame.
    """
    x, v = [], []
    for start in range(0, len(R), batch):
        Rb, ab = R[start:start + batch], alpha[start:start + batch]
        try:
            xb, vb = descriptor.jvp(Rb, ab)
        except ValueError:                          # name the first frame it refuses
            for k in range(len(Rb)):
                try:
                    descriptor.jvp(Rb[k:k + 1], ab[k:k + 1])
                except ValueError as err:
                    raise ValueError(f"frame {start + k}: {err}") from None
            raise
        x.append(xb)
        v.append(vb)
    return torch.cat(x), torch.cat(v)


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
