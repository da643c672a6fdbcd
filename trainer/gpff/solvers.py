"""Iterative solver of the sGDML training system (K + λI) α = y without storing K.

Source: Chmiela et al., "Accurate global machine learning force fields for molecules with
hundreds of atoms", Sci. Adv. 9, eadf0873 (2023) (papers/md22_iterative_solver.txt), eqs. 2-13
and Materials and Methods:

* preconditioned conjugate gradient (CG, eqs. 4-6) with K + λI applied on the fly
  (:class:`KernelOperator`, one ``matvec`` per iteration);
* Nyström preconditioner P = K̃ + λI, K̃ = K_nk K_kk⁻¹ K_kn (eq. 7) from k inducing columns,
  inverted by the Woodbury identity (eq. 8) through the numerically robust route of eq. 12/13:
  K_kk = L Lᵀ, K̄ = K_nk L⁻ᵀ, thin QR [K̄; √λ I] = Q [Dᵀ; 0] (Q never stored), so
  P⁻¹ = λ⁻¹ (I − K̄ D⁻ᵀ D⁻¹ K̄ᵀ); memory O(n k). Our addition: λI may be replaced by the part of
  each frame's diagonal kernel block that K̃ misses, Δ = blockdiag(K − K̃) + λI, which the same
  route inverts (4–5× fewer iterations on malonaldehyde's Matérn sGDML kernel);
* inducing columns sampled by approximate λ-ridge leverage scores (eqs. 10-11) computed from a
  second Nyström approximation on uniformly sampled columns;
* initial guess α₀ = 0 (Methods, "Initial guess");
* restarts from the latest α when the residual stalls, with a larger preconditioner before each
  restart (Methods, "CG solver restarts").

Everything heavy runs in torch on ``op.device`` (CPU or CUDA) in ``op.dtype`` (float64).
Shapes: n is the system size; vectors are (n, 1) columns (a single right-hand side).
"""

from __future__ import annotations

import io
import math
import os
import time
import warnings
from typing import Callable, Protocol, runtime_checkable

import numpy as np
import torch

from .errors import TrainingError

__all__ = ["KernelOperator", "NystromPreconditioner", "ridge_leverage_scores", "pcg", "solve",
           "frame_columns", "n_frames", "preconditioner_bytes", "DEFAULT_TOL"]

#: Default relative residual ‖y − (K+λI)α‖/‖y‖. The paper (Fig. 4) and the sGDML reference code
#: (``solver_tol=1e-4``) train to 1e-4: the training-force residual is then ~1e-4 of the force
#: scale, far below any test error. Pass a smaller `tol` when α itself must match Cholesky.
DEFAULT_TOL = 1e-4


@runtime_checkable
class KernelOperator(Protocol):
    """What the solvers need of the training kernel: K + λI as an operator (duck-typed).

    Attributes:
        n: system size (3N·M force components, + M energies when trained on energies).
        lam: λ > 0, the regularisation added to the diagonal.
        dtype, device: of every tensor returned (float64 expected).
        block: columns per training frame (3N); frame m owns columns m·block .. m·block+block−1.

    Optional attributes used when present: ``n_frames`` (or ``m``): number of training frames M;
    ``frame_columns(frames) -> LongTensor``: all columns owned by `frames` (default: the force
    columns above plus, when n = (block+1)·M, the energy column block·M + m of frame m);
    ``diagonal_blocks() -> (force blocks (M, block, block), energy diagonal (M,) or None)``: the
    frames' diagonal blocks of K, for the block-diagonal part of :class:`NystromPreconditioner`.
    """

    n: int
    lam: float
    dtype: torch.dtype
    device: torch.device
    block: int

    def matvec(self, V: torch.Tensor) -> torch.Tensor:
        """(K + λI) V for V of shape (n, b); returns (n, b)."""
        ...

    def columns(self, idx: torch.Tensor) -> torch.Tensor:
        """K[:, idx] without λ, shape (n, len(idx)); cost ∝ distinct frames touched."""
        ...

    def diagonal(self) -> torch.Tensor:
        """diag(K) without λ, shape (n,)."""
        ...


# ----------------------------------------------------------------------------- frames


def n_frames(op: KernelOperator) -> int:
    """Number of training frames M of `op` (``op.n_frames``, ``op.m``, or inferred from n)."""
    for name in ("n_frames", "m"):
        v = getattr(op, name, None)
        if isinstance(v, (int, np.integer)) and v > 0:
            return int(v)
    if op.n % op.block == 0:
        return op.n // op.block
    if op.n % (op.block + 1) == 0:
        return op.n // (op.block + 1)
    raise ValueError(f"cannot infer the number of frames from n = {op.n}, block = {op.block}; "
                     f"give the operator an `n_frames` attribute")


def frame_columns(op: KernelOperator, frames: torch.Tensor) -> torch.Tensor:
    """All column indices owned by `frames` (LongTensor on op.device), sorted.

    Force columns f·block .. f·block+block−1 and, when the system includes energies
    (n = block·M + M), the energy column block·M + f.
    """
    frames = torch.as_tensor(frames, dtype=torch.long, device=op.device).reshape(-1)
    if hasattr(op, "frame_columns"):
        return torch.as_tensor(op.frame_columns(frames), dtype=torch.long, device=op.device)
    m = n_frames(op)
    cols = (frames[:, None] * op.block + torch.arange(op.block, device=op.device)).reshape(-1)
    if op.n == (op.block + 1) * m:
        cols = torch.cat([cols, op.block * m + frames])
    elif op.n != op.block * m:
        raise ValueError(f"n = {op.n} is neither block·M nor (block+1)·M "
                         f"(block = {op.block}, M = {m}); give the operator `frame_columns`")
    return torch.sort(cols).values


def _columns_per_frame(op: KernelOperator) -> int:
    return op.n // n_frames(op)


# ----------------------------------------------------------------------------- Nyström


def _chunk(n: int, k: int) -> int:
    """Rows of K̄ processed at a time (TSQR and triangular solves): O(k·chunk) workspace."""
    return int(min(n, max(k, 1024)))


def preconditioner_bytes(n: int, k: int, itemsize: int = 8, block: int = 0) -> int:
    """Peak bytes to build and hold a k-column Nyström preconditioner for an n-system.

    The k columns (n × k, transformed in place to K̄), D (k × k), the Cholesky factor of K_kk and
    the TSQR workspace (two (k + chunk) × k blocks); with a block-diagonal Δ of blocks of `block`
    rows, the diagonal blocks, their factors and one temporary (3 n · block).
    """
    c = _chunk(n, k)
    return itemsize * (n * k + 2 * k * k + 2 * (k + c) * k + 3 * n * block)


class _BlockDiagonalFactor:
    """Lower Cholesky factor L of the block-diagonal matrix Δ of :class:`NystromPreconditioner`.

    Either λI (``blocks`` None: L = √λ I) or the force blocks of the frames, (M, r, r) factors for
    the rows m·r .. m·r+r−1, followed by 1 × 1 energy entries (M,) for the last rows, if any.
    """

    def __init__(self, lam: float, blocks: torch.Tensor | None = None,
                 energy: torch.Tensor | None = None):
        self.sqrt_lam = math.sqrt(lam)
        self.blocks, self.energy = blocks, energy

    def solve(self, X: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """L⁻¹ X (or L⁻ᵀ X) for X (n, b), a new tensor."""
        if self.blocks is None:
            return X / self.sqrt_lam
        m, r = self.blocks.shape[:2]
        L = self.blocks.mT if transpose else self.blocks
        out = torch.empty_like(X)
        out[:m * r] = torch.linalg.solve_triangular(L, X[:m * r].reshape(m, r, -1),
                                                    upper=transpose).reshape(m * r, -1)
        if self.energy is not None:
            out[m * r:] = X[m * r:] / self.energy[:, None]
        return out

    def multiply(self, X: torch.Tensor) -> torch.Tensor:
        """L X for X (n, b), a new tensor."""
        if self.blocks is None:
            return X * self.sqrt_lam
        m, r = self.blocks.shape[:2]
        out = torch.empty_like(X)
        out[:m * r] = (self.blocks @ X[:m * r].reshape(m, r, -1)).reshape(m * r, -1)
        if self.energy is not None:
            out[m * r:] = X[m * r:] * self.energy[:, None]
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.blocks, self.energy)
                   if t is not None)


class NystromPreconditioner:
    """P⁻¹ = (K̃ + Δ)⁻¹, the Nyström approximation K̃ = K_nk (K_kk + δI)⁻¹ K_kn (eqs. 7, 8) plus a
    block-diagonal Δ.

    Δ = λI is the paper's preconditioner. With `block_diagonal` (and an operator with
    ``diagonal_blocks``), Δ = blockdiag(K − K̃) + λI over the frames' force blocks (and the energy
    entries): the part of each frame's own kernel block that the inducing columns miss. It is
    exact on the diagonal blocks, where the sGDML kernel is most ill-conditioned (each frame's
    stiff and soft internal coordinates), and cuts the CG iterations 4–5× at the same k
    (malonaldehyde × 1000, Matérn σ = 10: 73 instead of 399 iterations with 10 % of the frames).
    Since K̃ ≼ K, Δ is positive definite.

    Built by the QR route of eqs. 12-13, generalised: K_kk + δI = L Lᵀ (Cholesky), K̄ = K_nk L⁻ᵀ
    (in place, by row chunks), Δ = L_Δ L_Δᵀ (blockwise Cholesky), B = L_Δ⁻¹ K̄ (in place), then the R
    factor of the thin QR of the stacked (n + k) × k matrix [B; I] = Q [Dᵀ; 0] by a streamed
    (TSQR) factorisation that never forms Q, the stacked matrix or BᵀB (which would square the
    condition number). Then I + BᵀB = D Dᵀ and

        P⁻¹ V = L_Δ⁻ᵀ (W − B D⁻ᵀ D⁻¹ Bᵀ W),  W = L_Δ⁻¹ V                        (eq. 12)

    which for Δ = λI is the paper's λ⁻¹ (V − K̄ D̃⁻ᵀ D̃⁻¹ K̄ᵀ V) with D̃ D̃ᵀ = λI + K̄ᵀK̄. It costs two
    (n × k) products, two k × k and two block triangular solves; memory n·k + k² + M·r² floats.

    δ is a diagonal shift of K_kk (``self.jitter``): δ = max(λ, 8·k·ε·max diag K_kk), raised ×10
    until the Cholesky factorisation succeeds. K_kk is singular in practice (the fast spectral
    decay of the kernel), and the shift keeps K̃ ≼ K, so P⁻¹(K + λI) keeps its spectrum ≥ 1
    (for Δ = λI); with δ ≤ λ the directions spanned by the inducing columns lose at most a factor
    2 in preconditioning quality.

    Args:
        op: the kernel operator (λ = op.lam must be > 0).
        idx: (k,) long, distinct inducing column indices.
        block_diagonal: Δ from the frames' diagonal blocks (needs ``op.diagonal_blocks()``
            returning the force blocks (M, r, r), r = op.block, and the energy diagonal (M,) or
            None, both without λ); False: Δ = λI.

    Attributes:
        size: k, the number of inducing columns. idx: the indices. jitter: δ.
        block_diagonal: whether Δ holds the diagonal blocks. nbytes: bytes held.

    Raises:
        ValueError: λ ≤ 0, an empty / out-of-range idx, or block_diagonal for an operator
            without ``diagonal_blocks``.
        TrainingError: K_kk is not positive semidefinite even after shifting (bad kernel).
    """

    def __init__(self, op: KernelOperator, idx: torch.Tensor, block_diagonal: bool = False):
        lam = float(op.lam)
        if not lam > 0:
            raise ValueError(f"the Nyström preconditioner needs λ > 0, got {lam}")
        if block_diagonal and not hasattr(op, "diagonal_blocks"):
            raise ValueError("block_diagonal needs an operator with diagonal_blocks()")
        idx = torch.as_tensor(idx, dtype=torch.long, device=op.device).reshape(-1)
        k = len(idx)
        if k == 0 or int(idx.min()) < 0 or int(idx.max()) >= op.n:
            raise ValueError(f"inducing indices must be non-empty and in [0, {op.n})")
        if len(torch.unique(idx)) != k:
            raise ValueError("inducing indices must be distinct")
        self.n, self.lam, self.idx, self.size = op.n, lam, idx, k
        self.block_diagonal = bool(block_diagonal)
        C = op.columns(idx)                                       # (n, k), K[:, idx]
        if C.shape != (op.n, k):
            raise ValueError(f"op.columns returned shape {tuple(C.shape)}, expected {(op.n, k)}")
        # We store G = K̄ᵀ (k, n); for the sGDML operator C is a transposed view, so Cᵀ is free.
        G = C.T if C.T.is_contiguous() else C.T.contiguous()
        del C
        Kkk = G[:, idx].clone()
        Kkk = 0.5 * (Kkk + Kkk.T)
        scale = float(Kkk.diagonal().max())
        if not (math.isfinite(scale) and scale > 0):
            raise TrainingError(f"the kernel diagonal at the inducing columns is {scale}: the "
                                f"kernel is not positive definite")
        delta = max(lam, 8.0 * k * torch.finfo(G.dtype).eps * scale)
        eye = torch.eye(k, dtype=G.dtype, device=G.device)
        for _ in range(12):
            L, info = torch.linalg.cholesky_ex(Kkk + delta * eye)
            if int(info) == 0:
                break
            delta *= 10.0
        else:
            raise TrainingError(f"the {k}x{k} kernel block of the inducing columns is not "
                                f"positive semidefinite (Cholesky fails with shift {delta:.1e})")
        del Kkk
        self.jitter = delta
        c = _chunk(op.n, k)
        # K̄ᵀ = L⁻¹ K_kn, chunk by chunk of columns, in place.
        for s in range(0, op.n, c):
            G[:, s:s + c] = torch.linalg.solve_triangular(L, G[:, s:s + c], upper=False)
        del L
        self.delta = (_block_factor(op, G, lam) if self.block_diagonal
                      else _BlockDiagonalFactor(lam))
        # Bᵀ = K̄ᵀ L_Δ⁻ᵀ, chunk by chunk of rows (within the TSQR workspace), in place.
        rows = max(1, k * c // op.n)
        for s in range(0, k, rows):
            G[s:s + rows] = self.delta.solve(G[s:s + rows].T).T
        # Streamed thin QR (TSQR) of [B; I]: R of [R_prev; next rows] is R of all rows so far.
        R = eye
        for s in range(0, op.n, c):
            R = torch.linalg.qr(torch.cat([R, G[:, s:s + c].T]), mode="r").R
        self.G = G                                                # Bᵀ, (k, n)
        self.D = R.mT.contiguous()                                # I + BᵀB = D Dᵀ (eq. 13)
        self.nbytes = G.element_size() * (G.numel() + self.D.numel()) + self.delta.nbytes

    def apply(self, V: torch.Tensor) -> torch.Tensor:
        """P⁻¹ V = (K̃ + Δ)⁻¹ V for V (n, b) (or (n,)); same shape as V (eq. 12)."""
        squeeze = V.dim() == 1
        W = self.delta.solve(V[:, None] if squeeze else V)       # L_Δ⁻¹ V
        Z = self.G @ W                                            # Bᵀ W   (k, b)
        Z = torch.linalg.solve_triangular(self.D, Z, upper=False)
        Z = torch.linalg.solve_triangular(self.D.mT, Z, upper=True)
        out = self.delta.solve(W - self.G.T @ Z, transpose=True)
        return out[:, 0] if squeeze else out

    __call__ = apply

    def leverage_scores(self) -> torch.Tensor:
        """τ̃_i = b_iᵀ (BᵀB + λI)⁻¹ b_i with B = K̄ (eq. 11), shape (n,), each in [0, 1).

        Raises ValueError for a block-diagonal preconditioner (its Δ is not λI)."""
        if self.block_diagonal:
            raise ValueError("λ-ridge leverage scores need Δ = λI (block_diagonal=False)")
        out = torch.empty(self.n, dtype=self.G.dtype, device=self.G.device)
        c = _chunk(self.n, self.size)
        for s in range(0, self.n, c):       # with B̃ = K̄/√λ: b̃ᵀ(I + B̃ᵀB̃)⁻¹b̃ = bᵀ(λI + BᵀB)⁻¹b
            X = torch.linalg.solve_triangular(self.D, self.G[:, s:s + c], upper=False)
            out[s:s + c] = (X * X).sum(0)
        return out

    def nystrom_factor(self) -> torch.Tensor:
        """K̄ (n, k), with K̃ = K̄ K̄ᵀ = K_nk (K_kk + δI)⁻¹ K_kn (a new tensor: L_Δ B)."""
        return self.delta.multiply(self.G.T)


def _block_factor(op: KernelOperator, G: torch.Tensor, lam: float,
                  frames_per_chunk: int = 64) -> _BlockDiagonalFactor:
    """Cholesky factor of Δ = blockdiag(K − K̃) + λI from op.diagonal_blocks() and K̄ᵀ = G (k, n).

    A block that is not numerically positive definite (round-off where K̃ ≈ K, at the inducing
    frames) gets its shift λ raised ×10 until it factorises."""
    blocks, energy = op.diagonal_blocks()
    m, r = blocks.shape[:2]
    if m * r + (0 if energy is None else m) != op.n:
        raise ValueError(f"diagonal_blocks gives {m} blocks of {r} and "
                         f"{0 if energy is None else m} energies, the operator has n = {op.n}")
    k = G.shape[0]
    Gf = G[:, :m * r].reshape(k, m, r)
    for a in range(0, m, frames_per_chunk):                     # K_mm − K̄_m K̄_mᵀ
        Gc = Gf[:, a:a + frames_per_chunk].permute(1, 2, 0)       # (b, r, k)
        blocks[a:a + frames_per_chunk] -= Gc @ Gc.mT
    blocks = 0.5 * (blocks + blocks.mT)
    eye = torch.eye(r, dtype=blocks.dtype, device=blocks.device)
    shift = torch.full((m, 1, 1), lam, dtype=blocks.dtype, device=blocks.device)
    for _ in range(12):
        L, info = torch.linalg.cholesky_ex(blocks + shift * eye)
        bad = info != 0
        if not bool(bad.any()):
            break
        shift[bad] *= 10.0
    else:
        raise TrainingError("the diagonal blocks of K − K̃ are not positive semidefinite: the "
                            "kernel is not positive definite")
    if energy is not None:
        energy = torch.sqrt((energy - (G[:, m * r:] ** 2).sum(0)).clamp_min(0.0) + lam)
    return _BlockDiagonalFactor(lam, L, energy)


# ----------------------------------------------------------------------------- leverage scores


def _generator(generator: torch.Generator | None) -> torch.Generator:
    if generator is None:
        generator = torch.Generator()
        generator.manual_seed(0)
    return generator


def ridge_leverage_scores(op: KernelOperator, n_sketch: int,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """Approximate λ-ridge leverage scores τ̃ (eq. 11) of K, shape (n,), on op.device.

    τ_i(λ) = [K (K + λI)⁻¹]_ii (eq. 10) would need K⁻¹; instead a Nyström approximation
    B Bᵀ = K_ns K_ss⁻¹ K_sn on ≈ `n_sketch` uniformly sampled columns gives
    τ̃_i = b_iᵀ (BᵀB + λI)⁻¹ b_i (eq. 11), computed stably as the squared row norms of K̄ D⁻ᵀ
    (the top block of Q in eq. 13). Since K̃ ≼ K, τ̃_i ≤ τ_i (a lower estimate); Σ τ̃ ≤ s.

    Sampling is frame-granular: whole training frames are drawn uniformly (without replacement)
    until at least `n_sketch` columns are covered, because ``op.columns`` costs the same for one
    column of a frame as for all of them. Cost: one ``columns`` call for those frames and
    O(n s²) flops; memory ≈ :func:`preconditioner_bytes` (n, s).

    Args:
        op: kernel operator; n_sketch: number of columns in the sketch (≥ 1);
        generator: CPU torch.Generator for the uniform draw (default: seeded with 0).
    """
    gen = _generator(generator)
    m = n_frames(op)
    f = max(1, min(m, math.ceil(n_sketch / _columns_per_frame(op))))
    frames = torch.randperm(m, generator=gen)[:f].sort().values
    return NystromPreconditioner(op, frame_columns(op, frames)).leverage_scores()


def _column_owner(op: KernelOperator) -> torch.Tensor:
    """Frame owning each column, (n,) long on op.device."""
    m = n_frames(op)
    if hasattr(op, "frame_columns"):
        owner = torch.full((op.n,), -1, dtype=torch.long, device=op.device)
        for f in range(m):
            owner[frame_columns(op, torch.tensor([f], device=op.device))] = f
        if bool((owner < 0).any()):
            raise ValueError("op.frame_columns does not cover every column")
        return owner
    c = torch.arange(op.n, device=op.device)
    nf = op.block * m
    return torch.where(c < nf, c // op.block, c - nf)


def _frame_scores(op: KernelOperator, scores: torch.Tensor) -> torch.Tensor:
    """Sum of the column scores owned by each frame, (M,) float64 on the CPU."""
    out = torch.zeros(n_frames(op), dtype=torch.float64, device=op.device)
    out.index_add_(0, _column_owner(op), scores.to(torch.float64))
    return out.cpu()


def _sample_frames(weights: torch.Tensor, count: int, exclude: torch.Tensor,
                   gen: torch.Generator) -> torch.Tensor:
    """`count` distinct frames not in `exclude`, drawn ∝ weights (CPU float64), sorted."""
    w = weights.clone().clamp_min(0.0)
    w[exclude] = 0.0
    avail = int((w > 0).sum())
    # frames with zero score (possible for a lower estimate) stay available, at a tiny weight
    floor = 1e-12 * float(w.max()) if avail else 1.0
    w = torch.where(w > 0, w, torch.full_like(w, floor))
    w[exclude] = 0.0
    count = min(count, int((w > 0).sum()))
    if count <= 0:
        return torch.empty(0, dtype=torch.long)
    return torch.multinomial(w, count, replacement=False, generator=gen).sort().values


# ----------------------------------------------------------------------------- CG


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum())


def pcg(op: KernelOperator, y: torch.Tensor, precond=None, x0: torch.Tensor | None = None, *,
        tol: float = DEFAULT_TOL, max_iter: int = 1000,
        callback: Callable[[int, torch.Tensor, float], bool | None] | None = None,
        stall_window: int | None = None, stall_factor: float = 0.5):
    """Preconditioned conjugate gradient for (K + λI) x = y (eqs. 4-6).

    Args:
        op: kernel operator. y: (n, 1) (or (n,)) right-hand side.
        precond: object with ``apply(V)`` (or a callable) returning P⁻¹ V; None: no preconditioner.
        x0: initial guess, same shape as y (default 0, as in the paper; costs no matvec).
        tol: stop when the *true* relative residual ‖y − (K+λI)x‖/‖y‖ ≤ tol. The recursively
            updated residual is checked every iteration; when it reaches tol the true residual
            is computed (one extra matvec) and, if it is still above tol, CG continues from the
            true residual (residual replacement).
        max_iter: maximum number of CG iterations (each one ``op.matvec``).
        callback: called as callback(iteration, x, rel_residual) after every iteration (x is the
            live iterate: copy it to keep it); returning True stops with status "stopped".
        stall_window, stall_factor: status "stalled" when the smallest residual of the last
            `stall_window` iterations is above `stall_factor` × the smallest one before them
            (None: never).

    Returns:
        (x, info): x has y's shape; info dict with status ("converged", "max_iter", "stalled",
        "stopped", "breakdown"), iterations, matvecs, residual (relative; the true one when
        converged), residuals (per-iteration recursive relative residuals, [0] the initial one),
        replacements.
    """
    shape = y.shape
    y = y.reshape(op.n, 1)
    M = (lambda v: v) if precond is None else getattr(precond, "apply", precond)
    ynorm = float(torch.linalg.vector_norm(y))
    info = {"status": "converged", "iterations": 0, "matvecs": 0, "residual": 0.0,
            "residuals": [], "replacements": 0}
    if ynorm == 0.0:
        return torch.zeros_like(y).reshape(shape), info
    if x0 is None:
        x = torch.zeros_like(y)
        r = y.clone()
    else:
        x = x0.reshape(op.n, 1).to(dtype=y.dtype, device=y.device).clone()
        r = y - op.matvec(x)
        info["matvecs"] += 1
    rel = float(torch.linalg.vector_norm(r)) / ynorm
    hist = [rel]
    prefmin = [rel]
    info["residual"] = rel
    if rel <= tol:
        info["residuals"] = hist
        return x.reshape(shape), info
    z = M(r)
    p = z.clone()
    rz = _dot(r, z)
    status = "max_iter"
    it = 0
    while it < max_iter:
        if not (rz > 0 and math.isfinite(rz)):
            status = "breakdown"                                  # P⁻¹ not positive definite
            break
        q = op.matvec(p)
        info["matvecs"] += 1
        pq = _dot(p, q)
        if not (pq > 0 and math.isfinite(pq)):
            status = "breakdown"                                  # K + λI not positive definite
            break
        a = rz / pq
        x.add_(p, alpha=a)
        r.sub_(q, alpha=a)
        it += 1
        rel = float(torch.linalg.vector_norm(r)) / ynorm
        if callback is not None and callback(it, x, rel):
            hist.append(rel)
            status = "stopped"
            break
        if rel <= tol:
            r = y - op.matvec(x)                                  # true residual
            info["matvecs"] += 1
            rel = float(torch.linalg.vector_norm(r)) / ynorm
            hist.append(rel)
            prefmin.append(min(prefmin[-1], rel))
            if rel <= tol:
                status = "converged"
                break
            info["replacements"] += 1                             # restart from the true residual
            z = M(r)
            p = z.clone()
            rz = _dot(r, z)
            continue
        hist.append(rel)
        prefmin.append(min(prefmin[-1], rel))
        if stall_window is not None and len(hist) > stall_window + 1 and \
                min(hist[-stall_window:]) > stall_factor * prefmin[-stall_window - 1]:
            status = "stalled"
            break
        z = M(r)
        rz_new = _dot(r, z)
        p.mul_(rz_new / rz).add_(z)
        rz = rz_new
    info.update(status=status, iterations=it, residual=rel, residuals=hist)
    return x.reshape(shape), info


# ----------------------------------------------------------------------------- checkpoints


def _fingerprint(op: KernelOperator, y: torch.Tensor, with_kernel: bool) -> tuple:
    """(‖y‖, Σ w y, Σ w diag K) with fixed weights w: a checkpoint resumes only the system it was
    written for (the diagonal changes with the kernel, σ, p and the symmetries). The diagonal
    is only evaluated `with_kernel` (when there is a checkpoint); else the last entry is None."""
    y = y.reshape(-1).to(torch.float64)
    w = torch.linspace(0.5, 1.5, len(y), dtype=torch.float64, device=y.device)
    k_check = None
    if with_kernel:
        diag = op.diagonal().reshape(-1).to(device=y.device, dtype=torch.float64)
        k_check = float((w * diag).sum())
    return float(torch.linalg.vector_norm(y)), float((w * y).sum()), k_check


def _save_checkpoint(path, state: dict) -> None:
    """Write `state` (tensors / numbers) to `path` (.npz or torch .pt) atomically (temp + os.replace)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            if path.endswith(".npz"):
                np.savez(fh, **{k: (v.detach().cpu().numpy() if torch.is_tensor(v)
                                    else np.asarray(v)) for k, v in state.items()})
            else:
                torch.save({k: (v.detach().cpu() if torch.is_tensor(v) else v)
                            for k, v in state.items()}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _load_checkpoint(path) -> dict:
    path = os.fspath(path)
    try:
        if path.endswith(".npz"):
            with np.load(path) as z:
                return {k: (torch.from_numpy(z[k].copy()) if z[k].ndim else z[k].item())
                        for k in z.files}
        with open(path, "rb") as fh:
            data = torch.load(io.BytesIO(fh.read()), map_location="cpu", weights_only=True)
        return {k: (v.item() if torch.is_tensor(v) and v.ndim == 0 and k != "rng_state" else v)
                for k, v in data.items()}
    except Exception as e:                                        # noqa: BLE001
        raise TrainingError(f"{path}: cannot read the CG checkpoint ({e}); delete it or run "
                            f"without resume") from e


# ----------------------------------------------------------------------------- solve


def _available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _max_frames(op: KernelOperator, budget: int, block: int = 0) -> int:
    """Largest number of inducing frames whose preconditioner fits `budget` bytes."""
    per = _columns_per_frame(op)
    lo, hi = 0, n_frames(op)
    item = torch.empty((), dtype=op.dtype).element_size()
    while lo < hi:                                                # bytes grow with k: bisect
        mid = (lo + hi + 1) // 2
        if preconditioner_bytes(op.n, mid * per, item, block) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _slow(trace: list, probe: int, tol: float, rebuild: float) -> bool:
    """Whether CG, at the rate of its last `probe` iterations (trace: (time, smallest relative
    residual so far) per iteration), needs more than `rebuild` seconds to reach tol."""
    (t0, r0), (t1, r1) = trace[-1 - probe], trace[-1]
    if r1 <= tol:
        return False
    if not r1 < r0:
        return True
    rate = math.log(r1 / r0) / probe                              # log residual per iteration
    return math.log(tol / r1) / rate * (t1 - t0) / probe > rebuild


def solve(op: KernelOperator, y: torch.Tensor, *, tol: float = DEFAULT_TOL, max_iter: int = 5000,
          n_inducing: int | None = None, inducing_fraction: float = 0.1,
          block_diagonal: bool | None = None,
          max_memory_bytes: int | None = None, n_sketch: int | None = None,
          checkpoint=None, resume: bool = False, checkpoint_every: float = 180.0,
          progress: bool = True, generator: torch.Generator | None = None,
          stall_window: int = 50, stall_factor: float = 0.5, growth: float = 1.5,
          grow_ratio: float | None = 1.5, probe: int = 20,
          callback: Callable[[int, torch.Tensor, float], None] | None = None):
    """Solve (K + λI) α = y by Nyström-preconditioned CG with restarts (the paper's method).

    Steps: (1) approximate λ-ridge leverage scores (eq. 11) from a uniform frame sketch of
    `n_sketch` columns; (2) inducing frames drawn ∝ their summed scores, without replacement;
    (3) Nyström preconditioner by the QR route (eqs. 12-13); (4) CG from α₀ = 0 (Methods); (5)
    when the residual stalls (less than a factor `stall_factor` over `stall_window` iterations)
    or CG breaks down, restart from the latest α with `growth`× more inducing frames (up to the
    memory budget and all frames; Methods, "CG solver restarts"). A restart also comes when CG
    is merely slow: after `probe` iterations, the residual's rate over the last `probe` ones
    predicts the time left to `tol`; when that exceeds `grow_ratio` × the time the larger
    preconditioner would take to build (the last build's time × `growth`², its O(n k²) cost),
    the larger one pays for itself. So the first preconditioner can be small: build and
    iterations stay balanced whatever the conditioning.

    Inducing columns are chosen by whole training frames: ``op.columns`` costs the same for one
    column of a frame as for all of its columns; a frame's score is the sum of its column scores
    (the trace of its diagonal block of K(K+λI)⁻¹, i.e. its joint leverage); and the rank
    deficiency this can bring into K_kk is handled by the shift δ of
    :class:`NystromPreconditioner`.

    Args:
        op: the kernel operator (:class:`KernelOperator`), λ = op.lam > 0.
        y: (n, 1) (or (n,)) right-hand side (forces, then energies), on op.device.
        tol: target relative residual ‖y − (K+λI)α‖/‖y‖ (default 1e-4 as in the paper's Fig. 4
            and sGDML; test force errors do not improve below it). Use ~1e-8 to reproduce the
            Cholesky coefficients.
        max_iter: CG iterations allowed in this call (a resumed run gets a fresh allowance).
        n_inducing: initial preconditioner size in columns, rounded up to whole frames (default
            `inducing_fraction` · n; the paper finds ≳2.5 % converges reliably and ≈10 % beats the
            closed-form solver in time and memory, Fig. 4). Capped by the memory budget.
        block_diagonal: add the frames' diagonal blocks to the preconditioner (Δ of
            :class:`NystromPreconditioner`); None (default): when the operator has
            ``diagonal_blocks``.
        max_memory_bytes: budget for the preconditioner (:func:`preconditioner_bytes`, K̄ stored
            as n × k float64 plus k² terms and the build workspace); also caps the sketch.
            Default: a quarter of the free memory of op.device.
        n_sketch: columns of the uniform leverage-score sketch (default: half the initial
            preconditioner).
        checkpoint: path (.npz, else torch .pt) to which α, iteration counts, the residual, the
            inducing indices, the leverage scores and the generator state are written atomically
            (temp file + os.replace) every `checkpoint_every` seconds, at the end, and when the
            run fails or is interrupted (KeyboardInterrupt included).
        resume: if True and `checkpoint` exists, warm-start CG from its α with its inducing
            columns and scores (the same system is checked: n, λ and a fingerprint of y). A
            resumed run converges to the same α as an uninterrupted one, to the tolerance.
        progress: tqdm bar over CG iterations with the relative residual.
        generator: CPU torch.Generator for the sampling (default: seeded with 0, so runs repeat).
        stall_window, stall_factor, growth, grow_ratio, probe: restart policy (see above;
            grow_ratio None: restarts on stalls and breakdowns only).
        callback: called as callback(total_iteration, α, rel_residual) after every iteration.

    Returns:
        (alpha, info): alpha with y's shape; info dict: iterations (this call),
        total_iterations (including a resumed checkpoint's), restarts, n_inducing (columns),
        n_inducing_frames, preconditioner_bytes, residual (final true relative residual), tol,
        block_diagonal, matvecs, seconds, resumed, inducing (column indices, CPU LongTensor).

    Raises:
        TrainingError: no convergence within max_iter (with the residual reached and what to
            try), a breakdown (K + λI not positive definite), a budget too small for even one
            inducing frame, or a checkpoint of a different system.
        ValueError: λ ≤ 0 or y of the wrong size.
    """
    t0 = time.perf_counter()
    lam = float(op.lam)
    if not lam > 0:
        raise ValueError(f"the iterative solver needs λ > 0, got {lam}")
    if y.numel() != op.n:
        raise ValueError(f"y has {y.numel()} entries, the operator has n = {op.n}")
    shape = y.shape
    y = y.reshape(op.n, 1).to(dtype=op.dtype, device=op.device)
    gen = _generator(generator)
    m = n_frames(op)
    per = _columns_per_frame(op)
    budget = int(max_memory_bytes) if max_memory_bytes is not None else \
        _available_memory(op.device) // 4
    if block_diagonal is None:
        block_diagonal = hasattr(op, "diagonal_blocks")
    block = op.block if block_diagonal else 0
    f_max = _max_frames(op, budget, block)
    if f_max < 1:
        raise TrainingError(
            f"the memory budget of {budget / 1e6:.1f} MB cannot hold a preconditioner of one "
            f"training frame ({preconditioner_bytes(op.n, per, block=block) / 1e6:.1f} MB for "
            f"n = {op.n}); raise the memory budget")
    fprint = _fingerprint(op, y, with_kernel=checkpoint is not None)

    state = None
    if resume and checkpoint is not None and os.path.exists(checkpoint):
        state = _load_checkpoint(checkpoint)
        if (int(state["n"]) != op.n or not math.isclose(float(state["lam"]), lam, rel_tol=1e-12)
                or not all(k in state and math.isclose(float(state[k]), v, rel_tol=1e-10,
                                                       abs_tol=1e-300)
                           for k, v in zip(("y_norm", "y_check", "k_check"), fprint))):
            raise TrainingError(
                f"{checkpoint}: the checkpoint was written for a different system (n = "
                f"{int(state['n'])}, λ = {float(state['lam'])}, or other labels, kernel, σ, p or "
                f"symmetries); delete it or run without resume")

    if state is not None:
        x = state["alpha"].to(dtype=op.dtype, device=op.device).reshape(op.n, 1)
        scores = state["scores"].to(dtype=torch.float64)
        inducing_frames = state["inducing_frames"].long()
        gen.set_state(state["rng_state"].to(torch.uint8))
        total0 = int(state["total_iterations"])
        restarts = int(state["restarts"])
        if len(inducing_frames) > f_max:                          # smaller budget this time
            inducing_frames = inducing_frames[:f_max]
    else:
        x = None
        total0, restarts = 0, 0
        k0 = int(n_inducing) if n_inducing is not None else math.ceil(inducing_fraction * op.n)
        f0 = max(1, min(m, math.ceil(k0 / per)))
        if f0 > f_max:
            warnings.warn(f"{f0 * per} inducing columns do not fit the memory budget of "
                          f"{budget / 1e6:.1f} MB; using {f_max * per}", stacklevel=2)
            f0 = f_max
        s = n_sketch if n_sketch is not None else max(per, (f0 * per) // 2)
        s = min(max(1, int(s)), f_max * per)
        if f0 >= m:                                               # exact preconditioner: no sketch
            scores = torch.ones(m, dtype=torch.float64)
        else:
            scores = _frame_scores(op, ridge_leverage_scores(op, s, gen))
        inducing_frames = _sample_frames(scores, f0, torch.zeros(0, dtype=torch.long), gen)

    iters = 0
    matvecs = 0
    residual = float("nan")
    last_save = time.monotonic()
    # the live iterate (pcg updates it in place), for periodic and failure checkpoints
    live = {"x": x, "done": 0, "rel": residual}

    def snapshot() -> dict:
        return {"alpha": live["x"].reshape(-1), "total_iterations": total0 + live["done"],
                "restarts": restarts, "residual": live["rel"], "tol": tol,
                "inducing_frames": inducing_frames, "scores": scores,
                "rng_state": gen.get_state(), "n": op.n, "lam": lam,
                "y_norm": fprint[0], "y_check": fprint[1], "k_check": fprint[2]}

    from tqdm.auto import tqdm
    bar = tqdm(total=max_iter, desc="CG", unit="it", disable=not progress, leave=False)
    P = None
    breakdowns = 0
    window = stall_window
    try:
        while True:
            P = None                                              # free the old one first
            t_build = time.perf_counter()
            P = NystromPreconditioner(op, frame_columns(op, inducing_frames.to(op.device)),
                                      block_diagonal)
            t_build = time.perf_counter() - t_build
            bar.set_description(f"CG (k={P.size})")
            can_grow = grow_ratio is not None and min(f_max, m) > len(inducing_frames)
            trace = [(time.perf_counter(), math.inf)]            # (time, smallest residual so far)

            def cb(it, xk, rel, _base=iters):
                nonlocal last_save
                trace.append((time.perf_counter(), min(rel, trace[-1][1])))
                live.update(x=xk, done=_base + it, rel=rel)
                bar.update(1)
                bar.set_postfix_str(f"res={rel:.2e}", refresh=False)
                if callback is not None:
                    callback(total0 + _base + it, xk, rel)
                if checkpoint is not None and time.monotonic() - last_save >= checkpoint_every:
                    _save_checkpoint(checkpoint, snapshot())
                    last_save = time.monotonic()
                return can_grow and it > probe and _slow(trace, probe, tol, grow_ratio * t_build
                                                         * growth ** 2)

            x, pinfo = pcg(op, y, P, x0=x, tol=tol, max_iter=max_iter - iters, callback=cb,
                           stall_window=window, stall_factor=stall_factor)
            iters += pinfo["iterations"]
            matvecs += pinfo["matvecs"]
            residual = pinfo["residual"]
            live.update(x=x, done=iters, rel=residual)
            status = pinfo["status"]
            if status == "converged":
                break
            if status == "breakdown":
                breakdowns += 1
                if breakdowns >= 3:
                    raise TrainingError(
                        f"CG broke down {breakdowns} times (relative residual {residual:.2e}): "
                        f"K + λI is not numerically positive definite at λ = {lam:.1e}; "
                        f"increase λ")
            else:
                breakdowns = 0
            if iters >= max_iter or status == "max_iter":
                r = y - op.matvec(x)
                matvecs += 1
                residual = float(torch.linalg.vector_norm(r)) / fprint[0]
                live["rel"] = residual
                raise TrainingError(
                    f"CG did not converge within {max_iter} iterations: relative residual "
                    f"{residual:.2e} > tol {tol:.1e} after {restarts} restart(s) with "
                    f"{P.size} inducing columns ({len(inducing_frames)} of {m} frames, "
                    f"budget {budget / 1e6:.0f} MB). Try a larger max_iter, a larger "
                    f"preconditioner (n_inducing / max_memory_bytes), a larger λ (better "
                    f"conditioned), or a looser tol"
                    + (f"; or continue from {checkpoint} with resume=True" if checkpoint else ""))
            # stalled or broke down: restart from the latest α with a stronger preconditioner
            restarts += 1
            f_new = min(f_max, m, max(len(inducing_frames) + 1,
                                      math.ceil(growth * len(inducing_frames))))
            if f_new > len(inducing_frames):
                extra = _sample_frames(scores, f_new - len(inducing_frames), inducing_frames, gen)
                inducing_frames = torch.cat([inducing_frames, extra]).sort().values
            else:
                # the preconditioner cannot grow (budget or all frames): restarting only resets
                # the Krylov space, so wait twice as long before the next restart
                window *= 2
            if progress:
                bar.write(f"CG restart {restarts} at residual {residual:.2e} "
                          f"({'slow' if status == 'stopped' else status}); "
                          f"{len(inducing_frames) * per} inducing columns")
    except BaseException:
        if checkpoint is not None and live["x"] is not None:
            try:
                _save_checkpoint(checkpoint, snapshot())
            except Exception:                                     # noqa: BLE001
                pass
        raise
    finally:
        bar.close()
    if checkpoint is not None:
        _save_checkpoint(checkpoint, snapshot())
    info = {"iterations": iters, "total_iterations": total0 + iters, "restarts": restarts,
            "n_inducing": P.size, "n_inducing_frames": len(inducing_frames),
            "preconditioner_bytes": P.nbytes, "block_diagonal": block_diagonal,
            "residual": residual, "tol": tol,
            "matvecs": matvecs, "seconds": time.perf_counter() - t0, "resumed": state is not None,
            "inducing": P.idx.cpu()}
    return x.reshape(shape), info
