"""Atomic environments of the n-body GP (docs/mff.md): neighbour lists, the smooth cutoff, and the
pair and triplet features of a frame as torch tensors differentiable with respect to the atomic
positions and to a homogeneous strain of the cell.

Conventions
-----------
- A frame has positions R (N, 3) Å, a cell (3, 3) whose rows are the lattice vectors (zero rows
  for non-periodic directions) and periodic flags. Neighbour lists come from
  ``ase.neighborlist.neighbor_list('ijS')``: every directed pair i -> j + S·cell with
  0 < r_ij < cutoff, periodic images included (a small cell gives several images of one atom,
  and images of the atom itself).
- Pair features (2-body, eq. 5.34): one directed pair per (i, j, S); both i -> j and j -> i are
  listed, so the 2-body energy Σ_i Σ_j f_c g₂ counts every bond twice, as in docs/mff.md.
- Triplet features (3-body): centre i and two distinct neighbours j, k (j before k in the
  neighbour list) with r_ij, r_ik < r_c3; q = (r_ij, r_ik, r_jk), r_jk = |d_ik - d_ij| computed from
  the two displacement vectors d_ij = R_j + S_j·cell - R_i.
- Strain: features are functions of the displacement vectors d, which a homogeneous strain ε
  maps to d (1 + ε); the derivative of the energy at ε = 0 gives the virial -∂E/∂ε.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .errors import DatasetError, SpeciesError

__all__ = ["cutoff_function", "density_function", "neighbor_pairs", "FrameEnvironment",
           "frame_environments", "pair_jacobian_terms", "triplet_jacobian_terms"]


def cutoff_function(r: torch.Tensor, cutoff: float, width: float):
    """Smooth cutoff f_c(r; r_c) of docs/mff.md and its derivative.

    f_c = 1 for r ≤ r_c - d, ½[1 + cos(π (r - r_c + d)/d)] for r_c - d < r < r_c, 0 for r ≥ r_c
    (C¹: value and slope vanish at r_c).

    Args:
        r: distances (any shape), Å, torch tensor.
        cutoff: r_c, Å; width: d (0 < d ≤ r_c), Å.
    Returns:
        (f_c(r), f_c'(r)) with the shape of r (f_c' in 1/Å).
    """
    x = torch.clamp((r - (cutoff - width)) / width, 0.0, 1.0)
    f = 0.5 * (1.0 + torch.cos(math.pi * x))
    df = torch.where((x > 0) & (x < 1), -0.5 * math.pi / width * torch.sin(math.pi * x),
                     torch.zeros_like(r))
    return f, df


def density_function(r: torch.Tensor, cutoff: float, width: float, decay: float):
    """Contribution φ(r) = f_c(r; r_c) exp(-β r) of a neighbour at distance r to the embedding
    density ρ_i = Σ_j φ(r_ij) of docs/mff.md, and its derivative.

    Args:
        r: distances (any shape), Å, torch tensor; cutoff: r_c, Å; width: d, Å; decay: β, 1/Å.
    Returns:
        (φ(r), φ'(r)) with the shape of r (φ' in 1/Å).
    """
    f, df = cutoff_function(r, cutoff, width)
    e = torch.exp(-decay * r)
    return f * e, (df - decay * f) * e


def neighbor_pairs(atoms, cutoff: float):
    """Directed neighbour pairs of one frame within `cutoff` (Å).

    Returns:
        i, j: (P,) int64 atom indices; S: (P, 3) int64 cell shifts (d_ij = R_j + S·cell - R_i);
        sorted by i, then by the order ASE returns them.
    Raises:
        DatasetError: a periodic direction whose cell vector is zero.
    """
    from ase.neighborlist import neighbor_list

    cell = np.asarray(atoms.cell.array, dtype=float)
    for ax in range(3):
        if atoms.pbc[ax] and not np.any(cell[ax]):
            raise DatasetError(f"frame is periodic along axis {ax} but its cell vector is zero")
    i, j, S = neighbor_list("ijS", atoms, float(cutoff))
    order = np.argsort(i, kind="stable")
    return i[order].astype(np.int64), j[order].astype(np.int64), S[order].astype(np.int64)


def _triplet_index(center: np.ndarray, n_atoms: int):
    """All (p1, p2), p1 < p2, of pairs sharing a centre in a centre-sorted pair list."""
    P = len(center)
    if P == 0:
        e = np.zeros(0, dtype=np.int64)
        return e, e
    counts = np.bincount(center, minlength=n_atoms)
    starts = np.cumsum(counts) - counts
    local = np.arange(P) - starts[center]
    n_after = counts[center] - local - 1
    p1 = np.repeat(np.arange(P), n_after)
    offs = np.arange(len(p1)) - np.repeat(np.cumsum(n_after) - n_after, n_after)
    return p1.astype(np.int64), (p1 + 1 + offs).astype(np.int64)


class FrameEnvironment:
    """Neighbour structure of one frame for a model with 2-body cutoff `cutoff` and (optional)
    3-body cutoff `cutoff_3body`, and its features as torch tensors.

    Attributes (numpy):
        n_atoms; species (N,) int species index of every atom (model species order);
        positions (N, 3) Å; cell (3, 3) Å (rows); pbc (3,) bool;
        pair_i, pair_j (P,), pair_S (P, 3): directed pairs with r < cutoff;
        trip_i, trip_j, trip_k (T,), trip_S1, trip_S2 (T, 3): triplets (centre i; j, k) with
        r_ij, r_ik < cutoff_3body (empty without a 3-body cutoff).
    """

    def __init__(self, atoms, species_list, cutoff: float, cutoff_3body: float | None = None):
        symbols = atoms.get_chemical_symbols()
        index = {s: k for k, s in enumerate(species_list)}
        unknown = sorted(set(symbols) - set(index))
        if unknown:
            raise SpeciesError(f"element(s) {', '.join(unknown)} not in the model's species "
                               f"{', '.join(species_list)}")
        self.n_atoms = len(atoms)
        self.species = np.array([index[s] for s in symbols], dtype=np.int64)
        self.positions = np.asarray(atoms.positions, dtype=np.float64)
        self.cell = np.asarray(atoms.cell.array, dtype=np.float64)
        self.pbc = np.asarray(atoms.pbc, dtype=bool)
        if not np.all(np.isfinite(self.positions)) or not np.all(np.isfinite(self.cell)):
            raise DatasetError("positions or cell contain NaN or inf")
        rmax = max(cutoff, cutoff_3body or 0.0)
        i, j, S = neighbor_pairs(atoms, rmax)
        d = self.positions[j] - self.positions[i] + S @ self.cell
        r = np.linalg.norm(d, axis=1)
        if r.size and r.min() < 1e-8:
            raise DatasetError("two atoms sit on top of each other (distance < 1e-8 Å)")
        keep = r < cutoff
        self.pair_i, self.pair_j, self.pair_S = i[keep], j[keep], S[keep]
        if cutoff_3body:
            k3 = r < cutoff_3body
            i3, j3, S3 = i[k3], j[k3], S[k3]
            p1, p2 = _triplet_index(i3, self.n_atoms)
            self.trip_i, self.trip_j, self.trip_k = i3[p1], j3[p1], j3[p2]
            self.trip_S1, self.trip_S2 = S3[p1], S3[p2]
        else:
            e = np.zeros(0, dtype=np.int64)
            self.trip_i = self.trip_j = self.trip_k = e
            self.trip_S1 = self.trip_S2 = np.zeros((0, 3), dtype=np.int64)

    @property
    def n_pairs(self) -> int:
        return len(self.pair_i)

    @property
    def n_triplets(self) -> int:
        return len(self.trip_i)

    @property
    def volume(self) -> float:
        return float(abs(np.linalg.det(self.cell))) if self.pbc.all() else 0.0

    # ------------------------------------------------------------------ torch features
    def tensors(self, device, positions=None, strain=None):
        """Displacement vectors of the pairs and triplet legs as torch tensors.

        Args:
            device: torch device.
            positions: (N, 3) torch positions (e.g. requiring grad); default: the frame's.
            strain: (3, 3) torch strain ε (the vectors become d (1 + ε)); default none.
        Returns:
            dict with ``d2`` (P, 3) pair vectors, ``d_ij``, ``d_ik``, ``d_jk`` (T, 3) triplet legs.
        """
        dt = torch.float64
        R = (torch.as_tensor(self.positions, dtype=dt, device=device) if positions is None
             else positions)
        cell = torch.as_tensor(self.cell, dtype=dt, device=device)
        if strain is not None:
            F = torch.eye(3, dtype=dt, device=device) + strain
            R = R @ F
            cell = cell @ F
        t = lambda a: torch.as_tensor(a, device=device)  # noqa: E731
        d2 = R[t(self.pair_j)] - R[t(self.pair_i)] + t(self.pair_S).to(dt) @ cell
        ri = R[t(self.trip_i)]
        d_ij = R[t(self.trip_j)] - ri + t(self.trip_S1).to(dt) @ cell
        d_ik = R[t(self.trip_k)] - ri + t(self.trip_S2).to(dt) @ cell
        return {"d2": d2, "d_ij": d_ij, "d_ik": d_ik, "d_jk": d_ik - d_ij}

    def pair_features(self, device):
        """Pair distances r (P,) and unit vectors u (P, 3) from i to j (torch, no grad)."""
        d = self.tensors(device)["d2"]
        r = torch.linalg.norm(d, dim=1)
        return r, d / r[:, None]

    def triplet_features(self, device):
        """Triplet distances q (T, 3) = (r_ij, r_ik, r_jk) and unit vectors u_ij, u_ik, u_jk
        (T, 3) each (u_jk points from j to k) (torch, no grad)."""
        g = self.tensors(device)
        r_ij = torch.linalg.norm(g["d_ij"], dim=1)
        r_ik = torch.linalg.norm(g["d_ik"], dim=1)
        r_jk = torch.linalg.norm(g["d_jk"], dim=1)
        q = torch.stack([r_ij, r_ik, r_jk], dim=1)
        return q, g["d_ij"] / r_ij[:, None], g["d_ik"] / r_ik[:, None], g["d_jk"] / r_jk[:, None]


def frame_environments(frames, species_list, cutoff, cutoff_3body=None, where: str = ""):
    """:class:`FrameEnvironment` of every frame; errors name the frame (and `where`)."""
    out = []
    for k, at in enumerate(frames):
        try:
            out.append(FrameEnvironment(at, species_list, cutoff, cutoff_3body))
        except (SpeciesError, DatasetError) as err:
            raise type(err)(f"{where + ': ' if where else ''}frame {k}: {err}") from None
    return out


def pair_jacobian_terms(env: FrameEnvironment, atoms_mask: np.ndarray, u: torch.Tensor):
    """Derivatives of the pair distances with respect to the positions of selected atoms.

    For every directed pair p and each of its two end atoms a that is selected, one entry
    (p, a, J) with J = ∂r_p/∂R_a (3,): -u_p for a = i, +u_p for a = j (a self-image pair, i = j,
    gives two entries that cancel).

    Args:
        env: the frame; atoms_mask: (N,) bool, the selected atoms; u: (P, 3) unit vectors i -> j.
    Returns:
        pair index (E,), atom index (E,) (int64 torch), J (E, 3).
    """
    dev = u.device
    pi = torch.as_tensor(env.pair_i, device=dev)
    pj = torch.as_tensor(env.pair_j, device=dev)
    mask = torch.as_tensor(atoms_mask, device=dev)
    P = len(pi)
    p = torch.arange(P, device=dev)
    sel_i, sel_j = mask[pi], mask[pj]
    idx = torch.cat([p[sel_i], p[sel_j]])
    atom = torch.cat([pi[sel_i], pj[sel_j]])
    J = torch.cat([-u[sel_i], u[sel_j]])
    return idx, atom, J


def triplet_jacobian_terms(env: FrameEnvironment, atoms_mask: np.ndarray, u_ij, u_ik, u_jk):
    """Derivatives of the triplet distances q = (r_ij, r_ik, r_jk) with respect to the positions
    of selected atoms.

    For every triplet t and each of its three atoms (slots i, j, k) that is selected, one entry
    (t, a, J) with J = ∂q/∂R_a (3 distances × 3 components) of that slot: slot i
    [-u_ij, -u_ik, 0], slot j [u_ij, 0, -u_jk], slot k [0, u_ik, u_jk]. An atom in two slots
    (periodic images) gets two entries whose sum is the derivative.

    Returns:
        triplet index (E,), atom index (E,) (int64 torch), J (E, 3, 3) [distance, component].
    """
    dev = u_ij.device
    mask = torch.as_tensor(atoms_mask, device=dev)
    T = u_ij.shape[0]
    t = torch.arange(T, device=dev)
    zero = torch.zeros_like(u_ij)
    out_t, out_a, out_J = [], [], []
    for atoms, rows in ((env.trip_i, (-u_ij, -u_ik, zero)), (env.trip_j, (u_ij, zero, -u_jk)),
                        (env.trip_k, (zero, u_ik, u_jk))):
        a = torch.as_tensor(atoms, device=dev)
        sel = mask[a]
        out_t.append(t[sel])
        out_a.append(a[sel])
        out_J.append(torch.stack(rows, dim=1)[sel])
    return torch.cat(out_t), torch.cat(out_a), torch.cat(out_J)


def triplet_strain_terms(q, u_ij, u_ik, u_jk):
    """Derivatives of the triplet distances q = (r_ij, r_ik, r_jk) with respect to a homogeneous
    strain ε of the frame (vectors d → d (1 + ε)): ∂r/∂ε_αβ = d_α d_β / r = r u_α u_β.

    The six Voigt components are returned as two triples, the normal (xx, yy, zz) and the shear
    (xy, xz, yz) components, so that they have the layout of two atoms' force derivatives in
    :func:`triplet_jacobian_terms`.

    Args:
        q: (T, 3) triplet distances, Å; u_ij, u_ik, u_jk: (T, 3) unit vectors.
    Returns:
        J (T, 2, 3, 3) [triple, distance, component].
    """
    u = torch.stack([u_ij, u_ik, u_jk], dim=1)                        # (T, distance, xyz)
    normal = q[:, :, None] * u * u
    shear = q[:, :, None] * torch.stack([u[..., 0] * u[..., 1], u[..., 0] * u[..., 2],
                                         u[..., 1] * u[..., 2]], dim=-1)
    return torch.stack([normal, shear], dim=1)
