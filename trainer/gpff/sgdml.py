"""sGDML: symmetric gradient-domain machine learning of one molecule (exact GP, torch).

Sources (papers/sgdml_chapter.txt): inverse-distance descriptor (eq. 7.22), Hessian (force-force)
kernel of a Matérn 5/2 kernel on the descriptor (eqs. 7.23-7.26), integration constant,
symmetric kernel summed over the permutational symmetries (eqs. 7.28-7.31).

Notation (see docs/model_file.md): M training geometries of N atoms, D = N(N-1)/2, S symmetries,
a = sqrt(5)/σ. For training geometries R_m with forces F_m the coefficients α solve

    (K + λ I) α = F,   K[m, n] = Σ_q J_m^T H(x_m, x(P_q R_n)) J(P_q R_n) Π_q    (3NM x 3NM)
    H(x, x') = ∇_x ∇_x'^T k = (a²/3) e^{-a d} [(1 + a d) I - a² u u^T],  u = x - x', d = |u|

and the energy / force predictor uses early contraction v_k = J(P_q R_m) Π_q α_m (one D-vector per
expansion point k = (m, q)), so a prediction costs O(M S D), not O(M S D N).
"""

from __future__ import annotations

import math
import os
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import Dataset
from .descriptor import inverse_distance, inverse_distance_jacobian, pair_indices
from .errors import DatasetError, SpeciesError, TrainingError
from .symmetry import find_permutations


def _matern_coefficients(d: torch.Tensor, sigma: float):
    """c1 = (a²/3)(1 + a d) e^{-a d} and c2 = (a⁴/3) e^{-a d} of the Matérn 5/2 Hessian kernel."""
    a = math.sqrt(5.0) / sigma
    e = torch.exp(-a * d)
    return (a * a / 3.0) * (1.0 + a * d) * e, (a ** 4 / 3.0) * e


class _Expansion:
    """Training geometries expanded over the symmetries: descriptors and Jacobians of P_q R_m.

    x: (M, S, D); JP: (M, S, D, 3N) = J(P_q R_m) Π_q (columns back in the original atom labels).
    """

    def __init__(self, R: torch.Tensor, perms: torch.Tensor):
        m, n = R.shape[:2]
        s = perms.shape[0]
        Rp = R[:, perms]                                            # (M, S, N, 3): atom a <- p[a]
        x, J = inverse_distance_jacobian(Rp)                        # (M,S,D), (M,S,D,3N)
        inv = torch.argsort(perms, dim=1)                           # p^{-1}
        cols = (3 * inv[:, :, None] + torch.arange(3, device=R.device)).reshape(s, 3 * n)
        self.x = x
        self.JP = torch.gather(J, 3, cols[None, :, None, :].expand_as(J))


def _kernel_rows(xr: torch.Tensor, Jr: torch.Tensor, ex: _Expansion, sigma: float) -> torch.Tensor:
    """Rows of the symmetric Hessian kernel between geometries (xr, Jr) and the training set.

    xr: (B, D), Jr: (B, D, 3N). Returns (B, 3N, M, 3N).
    """
    U = xr[:, None, None, :] - ex.x[None]                           # (B, M, S, D)
    c1, c2 = _matern_coefficients(torch.linalg.vector_norm(U, dim=-1), sigma)
    rows = torch.einsum("bdk,bmdl->bkml", Jr, torch.einsum("bms,msdl->bmdl", c1, ex.JP))
    A = torch.einsum("bdk,bmsd->bmsk", Jr, U)
    Bv = torch.einsum("msdl,bmsd->bmsl", ex.JP, U)
    rows -= torch.einsum("bms,bmsk,bmsl->bkml", c2, A, Bv)
    return rows


def assemble_kernel(R: torch.Tensor, perms: torch.Tensor, sigma: float, lam: float,
                    block: int = 8, progress: bool = True) -> torch.Tensor:
    """K + λI for training geometries R (M, N, 3), assembled block-row by block-row in place.

    Returns a (3NM, 3NM) float64 tensor; peak extra memory is one block of rows.
    """
    ex = _Expansion(R, perms)
    m, n = R.shape[:2]
    dim = 3 * n * m
    K = torch.empty((dim, dim), dtype=R.dtype, device=R.device)
    x0, J0 = ex.x[:, 0], ex.JP[:, 0]                                # identity is perms[0]
    for start in tqdm(range(0, m, block), desc=f"kernel {dim}x{dim}", disable=not progress,
                      leave=False):
        stop = min(start + block, m)
        K[3 * n * start:3 * n * stop] = _kernel_rows(x0[start:stop], J0[start:stop], ex,
                                                      sigma).reshape(-1, dim)
    K.diagonal().add_(lam)
    return K


def _cholesky_solve_inplace(K: torch.Tensor, y: torch.Tensor, where: str, sigma: float,
                            lam: float) -> torch.Tensor:
    """Solve K α = y by Cholesky, factorising K in place (K is destroyed).

    K (n, n) is symmetric, so its transpose view is the same matrix in column-major layout, which
    LAPACK factorises without the copy torch makes of a row-major input; the triangular solves use
    the factor in place too: the peak memory stays at one kernel matrix. Raises TrainingError if K is not positive definite.
    """
    Kt = K.mT
    info = torch.empty((), dtype=torch.int32, device=K.device)
    L, info = torch.linalg.cholesky_ex(Kt, out=(Kt, info))
    if int(info) != 0:
        raise TrainingError(f"{where}: kernel matrix is not positive definite at σ = {sigma}, "
                            f"λ = {lam} (leading minor {int(info)}); increase λ (--lam)")
    # two triangular solves: torch.cholesky_solve would copy L
    z = torch.linalg.solve_triangular(L, y, upper=False)
    return torch.linalg.solve_triangular(L.mT, z, upper=True)


def _check_perms(perms: np.ndarray, z: np.ndarray):
    n = len(z)
    if perms.ndim != 2 or perms.shape[1] != n or not np.array_equal(perms[0], np.arange(n)):
        raise ValueError(f"perms must be (S, {n}) with the identity first")
    for p in perms:
        if not np.array_equal(np.sort(p), np.arange(n)) or not np.array_equal(z[p], z):
            raise ValueError(f"{p.tolist()} is not a permutation of equal elements")


class SGDML:
    """Symmetric GDML force field of one molecule (exact GP).

    Args:
        sigma: length scale σ of the Matérn 5/2 kernel on the inverse-distance descriptor (1/Å).
        lam: regularisation λ added to the kernel diagonal.
        use_sym: recover permutational symmetries (False: plain GDML).
        perms: (S, N) symmetries to use instead of recovering them (identity first).
        device: torch device for training and prediction ("cpu", "cuda").
        block: training geometries per block of kernel rows.
        progress: show progress bars.

    After :meth:`fit`: ``z`` (N,), ``perms`` (S, N), ``R_desc`` and ``R_d_desc_alpha`` (M·S, D),
    ``integration_constant`` (energy unit), ``energy_unit``, ``molecule_extent`` (Å),
    ``provenance`` (dict).
    """

    kind = "sgdml"

    def __init__(self, sigma: float = 10.0, lam: float = 1e-10, use_sym: bool = True,
                 perms=None, device: str = "cpu", block: int = 8, progress: bool = True):
        if not sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        if not lam >= 0:
            raise ValueError(f"lam must be non-negative, got {lam}")
        self.sigma = float(sigma)
        self.lam = float(lam)
        self.use_sym = bool(use_sym)
        self.perms = None if perms is None else np.asarray(perms, dtype=np.int32)
        self.device = torch.device(device)
        self.block = int(block)
        self.progress = progress
        self.z = None
        self.provenance: dict = {}

    # ---------------------------------------------------------------- training
    def fit(self, train: Dataset) -> "SGDML":
        """Train on the geometries and forces of `train` (energies, if present, fix the constant).

        Raises:
            DatasetError: no frames, or forces missing.
            TrainingError: the kernel matrix is not positive definite (raise λ).
        """
        train.validate()
        t0 = time.perf_counter()
        z = np.asarray(train.z)
        if self.perms is None:
            self.perms = (find_permutations(train.R, z, progress=self.progress) if self.use_sym
                          else np.arange(len(z), dtype=np.int32)[None])
        _check_perms(self.perms, z)
        R = torch.as_tensor(train.R, dtype=torch.float64, device=self.device)
        perms = torch.as_tensor(self.perms, dtype=torch.long, device=self.device)
        y = torch.as_tensor(train.F, dtype=torch.float64, device=self.device).reshape(-1, 1)

        K = assemble_kernel(R, perms, self.sigma, self.lam, self.block, self.progress)
        if self.progress:
            tqdm.write(f"Cholesky solve of the {K.shape[0]}x{K.shape[0]} kernel matrix")
        alpha = _cholesky_solve_inplace(K, y, train.path, self.sigma, self.lam).reshape(R.shape)
        del K

        x, J = inverse_distance_jacobian(R)                           # (M, D), (M, D, 3N)
        v = torch.einsum("mdl,ml->md", J, alpha.reshape(len(R), -1))  # v_m = J_m α_m
        self.z = z.astype(np.int32)
        self.R_desc = x.cpu().numpy()
        self.R_d_desc_alpha = v.cpu().numpy()
        self.energy_unit = train.energy_unit
        self.integration_constant = 0.0
        if train.E is not None:
            e0, _ = self.predict(train.R)
            self.integration_constant = float(np.mean(train.E - e0))  # least squares for c
        i, j = pair_indices(len(z))
        self.molecule_extent = float(np.linalg.norm(train.R[:, i] - train.R[:, j], axis=-1).max())
        self.provenance.update({
            "train_file": os.path.basename(train.path), "train_sha256": train.sha256,
            "train_indices": None if train.indices is None else train.indices.tolist(),
            "n_train": int(len(R)), "n_perms": int(len(self.perms)),
            "train_seconds": round(time.perf_counter() - t0, 2),
        })
        return self

    @property
    def n_atoms(self) -> int:
        return len(self.z)

    @property
    def n_train(self) -> int:
        return self.R_desc.shape[0]

    # -------------------------------------------------------------- prediction
    def predict(self, R, batch: int = 16):
        """Energy and forces of geometries R.

        Args:
            R: (N, 3) or (B, N, 3) positions in Å, model atom order.
        Returns:
            E: float or (B,) energies (model energy unit); F: (N, 3) or (B, N, 3) forces
            (energy unit / Å). F = -∇E exactly (docs/model_file.md).
        Raises:
            SpeciesError: wrong number of atoms. DatasetError: NaN/inf positions.
        """
        if self.z is None:
            raise TrainingError("model is not trained: call fit() or gpff.load()")
        R = np.asarray(R, dtype=np.float64)
        single = R.ndim == 2
        Rb = R[None] if single else R
        if Rb.ndim != 3 or Rb.shape[1:] != (self.n_atoms, 3):
            raise SpeciesError(f"positions must have shape (B, {self.n_atoms}, 3) for this "
                               f"{self.n_atoms}-atom model, got {R.shape}")
        if not np.all(np.isfinite(Rb)):
            raise DatasetError("positions contain NaN or inf")
        xm = torch.as_tensor(self.R_desc, device=self.device)
        vm = torch.as_tensor(self.R_d_desc_alpha, device=self.device)
        perms = torch.as_tensor(self.perms, dtype=torch.long, device=self.device)
        inv = torch.argsort(perms, dim=1)
        E, F = [], []
        for start in range(0, len(Rb), batch):
            r = torch.as_tensor(Rb[start:start + batch], device=self.device)
            x, J = inverse_distance_jacobian(r[:, perms])             # orderings R[p_q]: (b,S,D), (b,S,D,3N)
            U = x[:, :, None, :] - xm                                 # (b, S, M, D)
            c1, c2 = _matern_coefficients(torch.linalg.vector_norm(U, dim=-1), self.sigma)
            dot = torch.einsum("bsmd,md->bsm", U, vm)
            E.append(self.integration_constant - (c1 * dot).sum((1, 2)))
            G = torch.einsum("bsm,bsmd->bsd", c2 * dot, U) - c1 @ vm     # ∇_x E₀ per ordering
            F0 = -torch.einsum("bsd,bsdl->bsl", G, J).reshape(x.shape[:2] + r.shape[1:])
            idx = inv[None, :, :, None].expand_as(F0)                 # F[p_q[a]] += F₀[q, a]
            F.append(torch.gather(F0, 2, idx).sum(1))
        E = torch.cat(E).cpu().numpy()
        F = torch.cat(F).cpu().numpy()
        return (float(E[0]), F[0]) if single else (E, F)

    # ----------------------------------------------------------------- file I/O
    def save(self, path) -> None:
        """Write the model to a `.gpff` file atomically (docs/model_file.md)."""
        from .modelfile import save_sgdml
        save_sgdml(self, path)


def train_sgdml(train: Dataset, valid: Dataset | None = None, sigmas=(10.0,), **kwargs) -> SGDML:
    """Train one model per σ in `sigmas` and keep the one with the lowest validation force MAE.

    Args:
        train: training frames; valid: validation frames (required when len(sigmas) > 1).
        sigmas: candidate length scales σ; kwargs: further :class:`SGDML` arguments.
    Returns:
        the chosen model; its ``provenance`` records every σ tried with its validation errors
        (the σ grid search of sgdml).
    Raises:
        DatasetError: a σ grid without validation frames, or validation atoms differ from training.
    """
    from .evaluate import error_metrics

    sigmas = [float(s) for s in sigmas]
    if len(sigmas) > 1 and (valid is None or valid.n_frames == 0):
        raise DatasetError("a σ grid needs validation frames (--n-valid or --valid)")
    if valid is not None and not np.array_equal(valid.z, train.z):
        raise DatasetError(f"{valid.path}: validation atoms {valid.z.tolist()} differ from the "
                           f"training atoms {train.z.tolist()}")
    best, best_mae, grid, perms = None, np.inf, [], kwargs.pop("perms", None)
    for sigma in tqdm(sigmas, desc="σ grid", disable=len(sigmas) == 1 or not kwargs.get("progress", True)):
        model = SGDML(sigma=sigma, perms=perms, **kwargs).fit(train)
        perms = model.perms                                   # recover the symmetries once
        if valid is not None and valid.n_frames:
            E, F = model.predict(valid.R)
            err = error_metrics(E, F, valid.E, valid.F)
            grid.append({"sigma": sigma, **{k: err[k] for k in ("energy_mae", "force_mae")}})
            if err["force_mae"] < best_mae:
                best, best_mae = model, err["force_mae"]
                best.provenance["validation"] = {**err, "file": os.path.basename(valid.path)}
        else:
            best = model
    if grid:
        best.provenance["sigma_grid"] = grid
    return best
