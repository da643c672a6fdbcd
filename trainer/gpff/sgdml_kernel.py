"""The sGDML kernel: exact prediction and the training-set kernel operator (torch, float64).

Sources: papers/sgdml_chapter.txt eqs. 7.22-7.31 (Hessian kernel of a descriptor kernel,
symmetric kernel over the permutational symmetries); papers/md22_iterative_solver.txt (kernel-
vector products on the fly, no stored kernel); docs/model_file.md (the prediction formulas, which
the C++ core implements too).

Notation: M training geometries of N atoms, D = N(N-1)/2 descriptor entries, S symmetries, kernel
k(d) with k₁ = k'/d, k₂ = (k'' − k'/d)/d² (gpff.kernels). Unknowns: force coefficients α (M, N, 3)
and, when energies are trained on, energy coefficients β (M,). The training system is

    [K_FF K_FE] [α]   [F    ]              K_FF[m, n] = Σ_q J_mᵀ H(x_m, x(P_q R_n)) J(P_q R_n) Π_q
    [K_EF K_EE] [β] = [E − c] ,  (+ λ I),  K_EF[m, n] = Σ_q k₁ (J(P_q R_n) Π_q)ᵀ u,  K_EE[m, n] = Σ_q k
    H = ∇_x ∇_x'ᵀ k = −(k₂ u uᵀ + k₁ I),  u = x_m − x(P_q R_n)

and predictions use early contraction v_m = J_m α_m: evaluating the model at the training geometries
is exactly K [α; β]. The iterative solver's K-vector products contract the same way, over the
stored descriptors and Jacobians of the training orderings (TrainingKernel._product), without K.

Rigid-motion reduction. J_m has a null space (translations and rotations of R_m leave the descriptor
unchanged: 6 directions, 5 for a linear molecule), so K_FF = Jᵀ H J is singular there and α's
component in it, fixed by λ alone, never reaches a prediction (it enters only through J_m α_m).
The operator therefore works in an orthonormal basis Q_m (3N × r, r = rank J_m, 3N − 6 for a
nonlinear molecule) of the complement: J_m → J_m Q_m, α_m = Q_m a_m, labels Q_mᵀ F_m. The predictions
are those of the full system; the unknowns shrink by r/3N and the Cholesky work by (r/3N)³
(0.47 for a 9-atom molecule).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

MATVEC_CHUNK = 1 << 22      # entries of one (frames, M·S) kernel-value array in a matvec block


def evaluate(R: torch.Tensor, xm: torch.Tensor, vm: torch.Tensor, beta: torch.Tensor | None,
             perms: torch.Tensor, kernel, sigma: float, descriptor, batch: int = 16):
    """Energy (without the integration constant) and forces of geometries R (docs/model_file.md).

    Args:
        R: (B, N, 3) positions, Å. xm, vm: (M, D) training descriptors and v_m = J_m α_m.
        beta: (M,) energy coefficients or None. perms: (S, N) long, a group, identity first.
        kernel: a function d, σ -> (k, k₁, k₂) (gpff.kernels). sigma: σ.
        descriptor: R (..., N, 3) -> (x (..., D), J (..., D, 3N)) (gpff.descriptor).
    Returns:
        E₀ (B,) and F (B, N, 3) tensors: E = c + E₀, F = −∇_R E.
    """
    inv = torch.argsort(perms, dim=1)
    E, F = [], []
    for start in range(0, len(R), batch):
        r = R[start:start + batch]
        x, J = descriptor(r[:, perms])                              # orderings R[p_q]: (b,S,D), (b,S,D,3N)
        U = x[:, :, None, :] - xm                                   # (b, S, M, D)
        k, k1, k2 = kernel(torch.linalg.vector_norm(U, dim=-1), sigma)
        dot = torch.einsum("bsmd,md->bsm", U, vm)
        e = (k1 * dot).sum((1, 2))
        G = torch.einsum("bsm,bsmd->bsd", k2 * dot, U) + k1 @ vm      # ∇_x E₀ per ordering
        if beta is not None:
            e = e + (k @ beta).sum(1)
            G = G + torch.einsum("bsm,bsmd->bsd", k1 * beta, U)
        F0 = -torch.einsum("bsd,bsdl->bsl", G, J).reshape(x.shape[:2] + r.shape[1:])
        F.append(torch.gather(F0, 2, inv[None, :, :, None].expand_as(F0)).sum(1))   # F[p_q[a]] += F₀[q, a]
        E.append(e)
    return torch.cat(E), torch.cat(F)


def rigid_motion_complement(J: torch.Tensor, rtol: float = 1e-9) -> torch.Tensor:
    """Orthonormal bases Q (M, 3N, r) of the row spaces of the descriptor Jacobians J (M, D, 3N).

    The row space of J_m is the complement of the displacements that leave the descriptor of R_m
    unchanged (rigid motions). Q_m holds the right singular vectors of J_m with singular value
    above `rtol` × the largest; r is the largest such rank over the frames (3N − 6 for a nonlinear
    molecule; frames of lower rank keep a few null directions, which is harmless). Computed
    without gradient: the space does not depend on the exponent p.
    """
    with torch.no_grad():
        _, s, Vh = torch.linalg.svd(J, full_matrices=False)          # r <= min(D, 3N) rows
        r = int((s > rtol * s[:, :1]).sum(1).max())
        return Vh[:, :r].mT.contiguous()


class TrainingKernel:
    """The (3NM [+ M]) × (3NM [+ M]) training kernel matrix K + λI of an sGDML model, as an operator.

    Rows are the force components of each training geometry in its rigid-motion-free basis Q_m
    (module docstring; frame m owns rows m·r .. m·r+r−1, r = ``block``), then, with
    `use_energies`, one energy row per geometry. Right-hand sides come from :meth:`labels`, and
    force coefficients α_m = Q_m a_m. Implements the protocol of
    gpff.solvers.KernelOperator (matvec, columns, diagonal) and dense assembly for Cholesky.

    Args:
        R: (M, N, 3) training positions, Å. perms: (S, N) long symmetries. kernel, sigma,
        descriptor: as in :func:`evaluate`. lam: λ. use_energies: include the energy rows and
        columns. block: frames per block of rows in assembly. cache_bytes: the matvec keeps the
        kernel values k₁, k₂ (and k with energies) of all (frame, training ordering) pairs, which
        do not change between CG iterations, when they fit in this many bytes (default 0: never).
    """

    def __init__(self, R: torch.Tensor, perms: torch.Tensor, kernel, sigma: float, descriptor,
                 lam: float, use_energies: bool = False, block: int = 8, cache_bytes: int = 0):
        self.R, self.perms, self.kernel, self.sigma = R, perms, kernel, sigma
        self.descriptor = descriptor
        self.lam = float(lam)
        self.use_energies = use_energies
        self.rows_per_block = block
        self.m, self.natoms = R.shape[:2]
        self.dtype, self.device = R.dtype, R.device
        s = perms.shape[0]
        x, J = descriptor(R[:, perms])                              # (M, S, D), (M, S, D, 3N)
        inv = torch.argsort(perms, dim=1)                           # Π_q: columns back to R's atoms
        cols = (3 * inv[:, :, None] + torch.arange(3, device=R.device)).reshape(s, 3 * self.natoms)
        JP = torch.gather(J, 3, cols[None, :, None, :].expand_as(J))
        self.Q = rigid_motion_complement(JP[:, 0])                 # (M, 3N, r)
        self.block = self.Q.shape[2]                                # unknowns per training frame
        self.nf = self.block * self.m
        self.n = self.nf + (self.m if use_energies else 0)
        self.x = x
        self.JP = JP @ self.Q[:, None]                              # (M, S, D, r)
        self.x0, self.J0 = x[:, 0], self.JP[:, 0]                  # identity ordering
        # a long descriptor (D >= S r, e.g. FCHL19): every product with JP as a GEMM with JP laid
        # out (D, M·S·r), u = x_f − x_ms expanded (JPᵀu = JPᵀx_f − JPᵀx_ms), instead of (rows, M,
        # S, D) differences and a (rows, M, D, r) k₁-weighted copy of JP per block of rows (same
        # flops when S = 1, far less memory and memory traffic)
        d = x.shape[-1]
        self._cache = [] if 8 * self._n_kernel_values() * self.m * self.m * s <= cache_bytes else None
        self._JPt = self._JPx = None
        if d >= s * self.block:
            self._JPt = self.JP.permute(2, 0, 1, 3).reshape(d, -1).contiguous()
            self._JPx = torch.einsum("msdl,msd->msl", self.JP, x)   # (M, S, r)

    def labels(self, F, E=None) -> torch.Tensor:
        """Right-hand side y (n, 1) of the training system: forces F (M, N, 3) in the basis Q_m,
        then, with `use_energies`, the energies E (M,) less their prior mean."""
        y = self._in_bases(torch.as_tensor(F, dtype=self.dtype, device=self.device))[:, None]
        if self.use_energies:
            y = torch.cat([y, torch.as_tensor(E, dtype=self.dtype, device=self.device)[:, None]])
        return y

    def _in_bases(self, F: torch.Tensor) -> torch.Tensor:
        """Per-frame forces F (M, N, 3) in the bases Q_m, flattened: (nf,)."""
        return torch.einsum("mkr,mk->mr", self.Q, F.reshape(self.m, -1)).reshape(-1)

    def workspace_bytes(self) -> int:
        """Bytes used besides K or the solver's vectors: the expanded training set, the matvec's
        kernel-value cache, one block of kernel rows (assembly, columns) and one block of
        :meth:`_product` (matvec)."""
        m, s, d = self.x.shape
        expansion = self.x.numel() + self.JP.numel() * (1 if self._JPt is None else 2)
        weighted = m * s * self.block ** 2 if self._JPt is not None else m * d * self.block
        rows = self.rows_per_block * (m * s * (d + 2 * self.block) + self.block * self.n
                                      + weighted)
        product = 7 * self._matvec_rows() * m * s + 3 * m * s * d    # one block of matvec
        cache = 0 if self._cache is None else self._n_kernel_values() * m * m * s
        return 8 * (expansion + cache + 2 * max(rows, product))

    # ------------------------------------------------------------------ rows of K
    def _projections(self, frames: torch.Tensor, with_a: bool = True):
        """For u = x_f − x(P_q R_m) of `frames` f against every training ordering: ‖u‖ (b, M, S),
        A = J_fᵀu (b, M, S, r) (None unless `with_a`) and B = JP_mqᵀu (b, M, S, r)."""
        xf = self.x0[frames]
        m, s, d = self.x.shape
        if self._JPt is None:
            U = xf[:, None, None, :] - self.x[None]                 # (b, M, S, D)
            A = torch.einsum("bdk,bmsd->bmsk", self.J0[frames], U) if with_a else None
            return (torch.linalg.vector_norm(U, dim=-1), A,
                    torch.einsum("msdl,bmsd->bmsl", self.JP, U))
        b, r, flat = len(frames), self.block, self.x.reshape(m * s, d)
        dist = torch.cdist(xf, flat, compute_mode="donot_use_mm_for_euclid_dist").reshape(b, m, s)
        B = (xf @ self._JPt).reshape(b, m, s, r) - self._JPx
        A = None
        if with_a:
            Jf = self.J0[frames]                                     # (b, D, r)
            A = (torch.einsum("bdk,bd->bk", Jf, xf)[:, None, None, :]
                 - (Jf.mT @ flat.T).reshape(b, r, m, s).permute(0, 2, 3, 1))
        return dist, A, B

    def force_rows(self, frames: torch.Tensor) -> torch.Tensor:
        """Rows of K (without λ) of the force components of `frames`: (len(frames)·3N, n)."""
        Jf = self.J0[frames]
        dist, A, B = self._projections(frames)
        k, k1, k2 = self.kernel(dist, self.sigma)
        if self._JPt is not None:
            r, (m, s) = self.block, k1.shape[1:]
            P = (Jf.mT.reshape(-1, Jf.shape[1]) @ self._JPt).reshape(len(frames), r, m, s, r)
            rows = torch.einsum("bms,bkmsl->bkml", k1, P)
        else:
            rows = torch.einsum("bdk,bmdl->bkml", Jf, torch.einsum("bms,msdl->bmdl", k1, self.JP))
        rows += torch.einsum("bms,bmsk,bmsl->bkml", k2, A, B)
        out = -rows.reshape(len(frames) * self.block, self.nf)
        if self.use_energies:                                       # Cov(F_f, E_n) = −J_fᵀ Σ_q k₁ u
            fe = -torch.einsum("bms,bmsk->bkm", k1, A)
            out = torch.cat([out, fe.reshape(len(frames) * self.block, self.m)], dim=1)
        return out

    def energy_rows(self, frames: torch.Tensor) -> torch.Tensor:
        """Rows of K (without λ) of the energies of `frames`: (len(frames), n)."""
        dist, _, B = self._projections(frames, with_a=False)
        k, k1, _ = self.kernel(dist, self.sigma)
        ef = torch.einsum("bms,bmsl->bml", k1, B).reshape(len(frames), self.nf)
        return torch.cat([ef, k.sum(-1)], dim=1)

    def assemble(self, progress: bool = True) -> torch.Tensor:
        """Dense K + λI (n, n), filled block of rows by block of rows (no other n² buffer)."""
        K = torch.empty((self.n, self.n), dtype=self.dtype, device=self.device)
        b = self.rows_per_block
        for start in tqdm(range(0, self.m, b), desc=f"kernel {self.n}x{self.n}",
                          disable=not progress, leave=False):
            f = torch.arange(start, min(start + b, self.m), device=self.device)
            K[start * self.block:(start + len(f)) * self.block] = self.force_rows(f)
            if self.use_energies:
                K[self.nf + start:self.nf + start + len(f)] = self.energy_rows(f)
        K.diagonal().add_(self.lam)
        return K

    # ------------------------------------------------------ solver operator protocol
    def columns(self, idx: torch.Tensor) -> torch.Tensor:
        """K[:, idx] without λ, (n, len(idx)); K is symmetric, so these are rows, transposed."""
        idx = torch.as_tensor(idx, device=self.device).long()
        out = torch.empty((len(idx), self.n), dtype=self.dtype, device=self.device)
        is_force = idx < self.nf
        if is_force.any():
            fidx = idx[is_force]
            frames, where = torch.unique(fidx // self.block, return_inverse=True)
            for start in range(0, len(frames), self.rows_per_block):
                chunk = frames[start:start + self.rows_per_block]
                rows = self.force_rows(chunk).reshape(len(chunk), self.block, self.n)
                sel = (where >= start) & (where < start + len(chunk))
                out[torch.nonzero(is_force).squeeze(1)[sel]] = rows[where[sel] - start,
                                                                     fidx[sel] % self.block]
        if (~is_force).any():
            out[~is_force] = self.energy_rows(idx[~is_force] - self.nf)
        return out.T

    def diagonal(self) -> torch.Tensor:
        """diag(K) without λ, (n,): each frame against its own symmetric copies."""
        force, energy = self.diagonal_blocks()
        force = force.diagonal(dim1=-2, dim2=-1).reshape(-1)
        return torch.cat([force, energy]) if self.use_energies else force

    def diagonal_blocks(self):
        """The frames' diagonal blocks of K without λ: force blocks K_FF[m, m] (M, r, r) and the
        energy diagonal K_EE[m, m] (M,) (None without energies); for the block-diagonal part of
        the preconditioner (gpff.solvers.NystromPreconditioner)."""
        force, energy = [], []
        for start in range(0, self.m, self.rows_per_block):
            f = torch.arange(start, min(start + self.rows_per_block, self.m), device=self.device)
            fb, eb = self._frame_blocks(f)
            force.append(fb)
            energy.append(eb)
        return torch.cat(force), (torch.cat(energy) if self.use_energies else None)

    def _frame_blocks(self, f: torch.Tensor):
        """Kernel-dependent part of :meth:`diagonal_blocks` for frames f: the force blocks
        (b, r, r) and the energy diagonal (b,)."""
        U = self.x0[f][:, None, :] - self.x[f]                      # (b, S, D)
        k, k1, k2 = self.kernel(torch.linalg.vector_norm(U, dim=-1), self.sigma)
        JP, Jf = self.JP[f], self.J0[f]                             # (b,S,D,r), (b,D,r)
        d1 = torch.einsum("bs,bdk,bsdl->bkl", k1, Jf, JP)
        A = torch.einsum("bdk,bsd->bsk", Jf, U)
        B = torch.einsum("bsdl,bsd->bsl", JP, U)
        return -(d1 + torch.einsum("bs,bsk,bsl->bkl", k2, A, B)), k.sum(1)

    def _matvec_rows(self) -> int:
        """Frames per block of the matvec: (frames, M·S) arrays of about MATVEC_CHUNK entries."""
        return min(self.m, max(1, MATVEC_CHUNK // (self.m * self.perms.shape[0])))

    def _n_kernel_values(self) -> int:
        """Kernel-value arrays the matvec uses: k₁, k₂, and k with energies."""
        return 3 if self.use_energies else 2

    def _kernel_values(self, block: int, xf: torch.Tensor, xj: torch.Tensor):
        """k, k₁, k₂ (k None without energies) of the matvec's `block`-th block of frames (xf)
        against the training orderings xj, from the cache when there is one (filled on first
        use, block by block in order)."""
        if self._cache is not None and block < len(self._cache):
            return self._cache[block]
        dist = torch.cdist(xf, xj, compute_mode="donot_use_mm_for_euclid_dist")
        k, k1, k2 = self.kernel(dist, self.sigma)
        values = (k if self.use_energies else None, k1, k2)
        if self._cache is not None:
            self._cache.append(values)
        return values

    def matvec(self, V: torch.Tensor) -> torch.Tensor:
        """(K + λI) V for V (n, b), without K (early contraction, papers/md22_iterative_solver.txt:
        kernel-vector products on the fly)."""
        out = torch.empty_like(V)
        for c in range(V.shape[1]):
            a = V[:self.nf, c].reshape(self.m, self.block)
            out[:, c] = self._product(a, V[self.nf:, c] if self.use_energies else None)
        return out + self.lam * V

    def _product(self, a: torch.Tensor, beta: torch.Tensor | None) -> torch.Tensor:
        """K [a; β] without λ, (n,), for force coefficients a (M, r) in the bases Q_m and energy
        coefficients β (M,) or None, from the stored expansion of the training set.

        With j = (n, q) running over the M·S training orderings, v_j = JP_nq a_n, u_fj = x_f − x_j:

            (K a)_F[f] = −J_fᵀ Σ_j [k₁ v_j + (k₂ u_fj·v_j + k₁ β_n) u_fj]
            (K a)_E[f] = Σ_j [k₁ u_fj·v_j + k β_n]

        u_fj·v_j = x_f·v_j − x_j·v_j and Σ_j w_fj u_fj = (Σ_j w_fj) x_f − Σ_j w_fj x_j are GEMMs
        over blocks of frames (the (frames, M·S, D) differences are never formed); the distances
        ‖u_fj‖ are exact differences (torch.cdist without the GEMM expansion).
        """
        m, s, d = self.x.shape
        xj = self.x.reshape(m * s, d)
        v = torch.einsum("msdl,ml->msd", self.JP, a).reshape(m * s, d)
        xv = torch.einsum("jd,jd->j", xj, v)
        bj = None if beta is None else beta.repeat_interleave(s)    # β_n of ordering j = n·S + q
        rows = self._matvec_rows()
        force, energy = [], []
        for block, start in enumerate(range(0, m, rows)):
            xf = self.x0[start:start + rows]
            k, k1, k2 = self._kernel_values(block, xf, xj)
            c = xf @ v.T - xv                                       # u_fj·v_j
            w = k2 * c if bj is None else k2 * c + k1 * bj
            g = w.sum(1, keepdim=True) * xf - w @ xj + k1 @ v
            force.append(-torch.einsum("bdk,bd->bk", self.J0[start:start + rows], g))
            if self.use_energies:
                energy.append((k1 * c).sum(1) + k @ bj)
        return torch.cat([torch.cat(force).reshape(-1)] + energy)
