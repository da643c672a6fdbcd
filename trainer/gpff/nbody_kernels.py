"""Kernels of the n-body GP (docs/mff.md; papers/nbody_gp_mff.txt eqs. 5.8-5.14, 5.28-5.37).

Every training observation (a total energy, a Cartesian force component) is a linear functional of
the GP functions g₂ (one per unordered species pair) and g₃ (S₃-symmetric), a sum over "terms":
one term per pair or triplet feature q of the configuration,

    L[g] = Σ_t  A_t g(q_t) + B_t · ∇g(q_t)

energies: A = f_c weight, B = 0 (eqs. 5.7, 5.9); force component (a, α): A = -∂w/∂R_aα,
B_m = -w ∂q_m/∂R_aα (eqs. 5.10-5.13), so forces are the exact -∂E/∂R of the model. Covariances
of two functionals follow from the squared-exponential kernel and its first and mixed second
derivatives (:func:`direct3`, :func:`direct2`).

Exact quadrature (the "grid" path). For the Gaussian,

    exp(-(x - x')² / 2ℓ²) = c ∫ exp(-(x - u)²/ℓ²) exp(-(x' - u)²/ℓ²) du,   c = 1/(ℓ √(π/2)),

and the trapezoid rule on nodes of spacing h that extend 5ℓ beyond the midpoints (x + x')/2
reproduces it to exp(-π²ℓ²/2h²) relative (Poisson summation): ~1e-34 for the 2-body grids
(h = ℓ/4), ~4e-14 per axis for the 3-body grids (h = ℓ/2.5, whose cost grows as (ℓ/h)³). A
functional then becomes a vector on the grid: φ_u(x) = exp(-(x - u)²/ℓ²) per axis, tensor
products in 3-D, and covariances become dot products Z · S Z' with S the S₃ symmetriser
(:class:`Grid`, :func:`embed3`, :func:`symmetrize3`). The 2-body kernel is handled entirely in
this way (1-D, a few hundred features); the 3-body energy-energy and energy-force blocks when
cheaper than the direct sums (every pair of triplets of two whole cells). The tests check the two
paths against each other to 1e-10.

Everything is float64 torch and supports forward-mode AD with respect to the length scale
(used for the marginal-likelihood gradient).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

SQRT_HALF_PI = math.sqrt(math.pi / 2.0)
#: nodes per length scale of the quadrature grids (trapezoid error ~ exp(-π² n²/2))
POINTS_PER_ELL_2 = 4.0
POINTS_PER_ELL_3 = 2.5
#: grid margin beyond the feature range, in length scales (truncation error ~ erfc(√2·5)/2)
MARGIN_ELLS = 5.0
#: margin of the 3-body pair axes above r_c3, in length scales (error ≤ exp(-6²) ≈ 2e-16)
BOX_MARGIN_ELLS = 6.0
#: terms per packed batch in the direct sums (memory ~ TERMS_PER_BATCH² × 8 bytes)
TERMS_PER_BATCH = 2048


class flush_denormal:
    """Context in which float denormals are flushed to zero (x86), restored afterwards: the
    Gaussian tails of the kernel sums otherwise produce denormal products that slow BLAS by
    orders of magnitude. Values below 2.2e-308 are far below rounding at float64."""

    depth = 0

    def __enter__(self):
        if flush_denormal.depth == 0:
            torch.set_flush_denormal(True)
        flush_denormal.depth += 1
        return self

    def __exit__(self, *exc):
        flush_denormal.depth -= 1
        if flush_denormal.depth == 0:
            torch.set_flush_denormal(False)
        return False


def _dist_perm(pi):
    pairs = [(0, 1), (0, 2), (1, 2)]
    idx = {frozenset(p): m for m, p in enumerate(pairs)}
    return tuple(idx[frozenset((pi[a], pi[b]))] for a, b in pairs)


#: S₃ acting on a triplet (centre i; j, k): atom-slot permutation π (new slot a = old slot π(a))
#: and the induced permutation σ of q = (r_ij, r_ik, r_jk): (πq)_m = q_σ(m). Identity first.
PERMS3 = [(pi, _dist_perm(pi)) for pi in itertools.permutations(range(3))]


# --------------------------------------------------------------------------- species codes
def pair_code(a, b, n_species: int):
    """Code of the unordered species pair {a, b} (arrays or tensors of species indices)."""
    if isinstance(a, torch.Tensor):
        return torch.minimum(a, b) * n_species + torch.maximum(a, b)
    return np.minimum(a, b) * n_species + np.maximum(a, b)


def triple_code(si, sj, sk, n_species: int):
    """Code of the ordered species triple (s_i, s_j, s_k)."""
    return (si * n_species + sj) * n_species + sk


def triple_decode(code, n_species: int):
    return code // (n_species * n_species), (code // n_species) % n_species, code % n_species


def permuted_triple_code(code, pi, n_species: int):
    """Code of π s for the ordered triple `code`: (π s)_a = s_π(a)."""
    s = triple_decode(code, n_species)
    return triple_code(s[pi[0]], s[pi[1]], s[pi[2]], n_species)


def triple_closure(codes, n_species: int) -> list:
    """Sorted list of the ordered triples in the S₃ orbits of `codes`."""
    out = set()
    for c in set(int(c) for c in codes):
        for pi, _ in PERMS3:
            out.add(int(permuted_triple_code(c, pi, n_species)))
    return sorted(out)


# --------------------------------------------------------------------------- term sets
@dataclass
class Terms:
    """Terms of a set of functionals, sorted by group (one group = one energy, or one atom's
    force with c = 3 components).

    q: (T, D) features (D = 1 pairs, 3 triplets), Å; code: (T,) species code;
    group: (T,) int64 sorted; n_groups; A: (T, c); B: (T, c, D) or None (energies).
    """

    q: torch.Tensor
    code: torch.Tensor
    group: torch.Tensor
    n_groups: int
    A: torch.Tensor
    B: torch.Tensor | None = None

    @staticmethod
    def make(q, code, group, n_groups, A, B=None) -> "Terms":
        order = torch.argsort(group, stable=True)
        return Terms(q[order], code[order], group[order], int(n_groups), A[order],
                     None if B is None else B[order])

    @property
    def n_terms(self) -> int:
        return self.q.shape[0]

    @property
    def c(self) -> int:
        return self.A.shape[1]

    @property
    def n_rows(self) -> int:
        return self.n_groups * self.c

    def select(self, mask) -> "Terms":
        return Terms(self.q[mask], self.code[mask], self.group[mask], self.n_groups, self.A[mask],
                     None if self.B is None else self.B[mask])

    def groups_slice(self, g0: int, g1: int) -> "Terms":
        """The terms of groups g0 <= g < g1, renumbered from 0."""
        lo = int(torch.searchsorted(self.group, torch.tensor(g0, device=self.group.device)))
        hi = int(torch.searchsorted(self.group, torch.tensor(g1, device=self.group.device)))
        return Terms(self.q[lo:hi], self.code[lo:hi], self.group[lo:hi] - g0, g1 - g0,
                     self.A[lo:hi], None if self.B is None else self.B[lo:hi])

    @staticmethod
    def cat(parts, n_groups) -> "Terms":
        parts = [p for p in parts if p is not None]
        B = None if parts[0].B is None else torch.cat([p.B for p in parts])
        return Terms.make(torch.cat([p.q for p in parts]), torch.cat([p.code for p in parts]),
                          torch.cat([p.group for p in parts]), n_groups,
                          torch.cat([p.A for p in parts]), B)


def pack(terms: Terms, max_terms: int = TERMS_PER_BATCH, split: bool = False):
    """Batches of groups for padded batched products.

    Groups are sorted by their number of terms and cut into batches of at most `max_terms`
    padded terms. Every group appears in exactly one row (split=False; empty groups too), or
    groups longer than `max_terms` are split over several rows (split=True, for sums).
    Returns a list of (row_group (n,), index (n, L), valid (n, L)) int64/bool tensors.
    """
    dev = terms.group.device
    counts = torch.bincount(terms.group, minlength=terms.n_groups).cpu().numpy()
    starts = np.cumsum(counts) - counts
    rows = []
    for g in range(terms.n_groups):
        n = int(counts[g])
        if split and n > max_terms:
            for s in range(0, n, max_terms):
                rows.append((g, starts[g] + s, min(max_terms, n - s)))
        elif n or not split:
            rows.append((g, starts[g], n))
    rows.sort(key=lambda r: -r[2])
    out, k = [], 0
    while k < len(rows):
        L = max(1, rows[k][2])
        n = max(1, max_terms // L)
        batch = rows[k:k + n]
        k += len(batch)
        g = torch.tensor([r[0] for r in batch], dtype=torch.long, device=dev)
        st = torch.tensor([r[1] for r in batch], dtype=torch.long, device=dev)
        ln = torch.tensor([r[2] for r in batch], dtype=torch.long, device=dev)
        ar = torch.arange(L, device=dev)
        valid = ar[None, :] < ln[:, None]
        idx = torch.where(valid, st[:, None] + ar[None, :], torch.zeros_like(valid, dtype=torch.long))
        out.append((g, idx, valid))
    return out


def _gather(terms: Terms, idx, valid):
    vf = valid.to(terms.A.dtype)
    A = terms.A[idx] * vf[..., None]
    B = None if terms.B is None else terms.B[idx] * vf[..., None, None]
    code = torch.where(valid, terms.code[idx], torch.full_like(idx, -1))
    return terms.q[idx], code, A, B


# --------------------------------------------------------------------------- direct sums, 3-body
def _left_factors(q, A, B, right_is_force: bool):
    """ℓ-free left factors U (n, L, c, R) of the covariance expansion (see direct3).

    energy x energy: [w]; energy x force: [w, w q_m]; force x force:
    [A, A q_m (3), c, B_m (3), c q_n (3), B_m q_n (9)] with c_α = Σ_m B_αm q_m."""
    if B is None:
        if not right_is_force:
            return A[..., None]
        return torch.stack([A[..., 0], *[A[..., 0] * q[:, :, m] for m in range(3)]], dim=-1)[:, :, None, :]
    c = (B * q[:, :, None, :]).sum(-1)               # (n, L, 3)
    parts = [A, *[A * q[:, :, None, m] for m in range(3)], c, *[B[..., m] for m in range(3)],
             *[c * q[:, :, None, n] for n in range(3)],
             *[B[..., m] * q[:, :, None, n] for m in range(3) for n in range(3)]]
    return torch.stack(parts, dim=-1)


def _right_factors(qp, A, B, left_is_force: bool):
    """ℓ-free right factors for permuted features q'' and permuted B'', grouped by the power p of
    ℓ^-2p that multiplies them: list of (p, left rank indices, V (n, L, c, R_p))."""
    if B is None:                                    # right side is energies (left is too)
        return [(0, [0], A[..., None])]
    cp = (B * qp[:, :, None, :]).sum(-1)             # c'_β = Σ_m B''_βm q''_m
    if not left_is_force:                            # left energies: w k [A' + B''·(q - q'')/ℓ²]
        return [(0, [0], A[..., None]),
                (1, [0, 1, 2, 3], torch.stack([-cp, *[B[..., m] for m in range(3)]], dim=-1))]
    Bm = [B[..., m] for m in range(3)]
    qm = [qp[:, :, None, m] for m in range(3)]
    p1 = [-cp, *Bm, -A, *[qm[m] * A + Bm[m] for m in range(3)]]
    p2 = [*[-Bm[n] for n in range(3)], cp, *[qm[m] * Bm[n] for m in range(3) for n in range(3)],
          *[-qm[m] * cp for m in range(3)]]
    return [(0, [0], A[..., None]),
            (1, [0, 1, 2, 3, 4, 5, 6, 7], torch.stack(p1, dim=-1)),
            (2, [8, 9, 10, 4, *range(11, 20), 5, 6, 7], torch.stack(p2, dim=-1))]


class _GaussMatrix(torch.autograd.Function):
    """exp(-|qa - qb|²/2ℓ²) (Na, Nb) through one augmented GEMM; forward-mode derivative in ℓ
    analytically, dK = K |d|²/ℓ³ dℓ (qa, qb are constants)."""

    @staticmethod
    def forward(qa, qb, ell):
        ell2 = ell * ell
        one_a = torch.ones_like(qa[:, :1])
        one_b = torch.ones_like(qb[:, :1])
        xa = torch.cat([qa / ell2, -(qa * qa).sum(1, keepdim=True) / (2 * ell2), one_a], dim=1)
        xb = torch.cat([qb, one_b, -(qb * qb).sum(1, keepdim=True) / (2 * ell2)], dim=1)
        E = xa @ xb.T                                  # -|d|²/2ℓ² ≤ 0 up to rounding
        return torch.exp(E), E

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_forward(output[0], output[1], inputs[2])
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)

    @staticmethod
    def jvp(ctx, dqa, dqb, dell):
        if dqa is not None or dqb is not None:
            raise NotImplementedError("forward-mode derivatives of the Gaussian matrix are "
                                      "implemented for the length scale only")
        K, E, ell = ctx.saved_tensors
        return K * E * (-2.0 * dell / ell), None

    @staticmethod
    def backward(ctx, gK, gE):
        raise NotImplementedError("reverse-mode derivatives of the direct 3-body sums are not "
                                  "implemented (the length-scale derivative uses forward mode)")


def _gauss_matrix(qa, qb, ell):
    if not isinstance(ell, torch.Tensor):
        ell = torch.tensor(float(ell), dtype=qa.dtype, device=qa.device)
    return _GaussMatrix.apply(qa, qb, ell)[0]


def _block3(X, Y, bx, by, ell, center, multispecies, n_species):
    """Covariance block between the packed rows bx of X and by of Y (3-body), summed over S₃.

    The left factors U and right factors V are independent of ℓ; ℓ enters through the Gaussian
    matrix K and scalar powers ℓ^-2p, so a forward-mode ℓ tangent costs one extra GEMM pass."""
    gx, ix, vx = bx
    gy, iy, vy = by
    qx, cx_code, Ax, Bx = _gather(X, ix, vx)
    qy, cy_code, Ay, By = _gather(Y, iy, vy)
    qx = qx - center
    qy = qy - center
    na, La = ix.shape
    nb, Lb = iy.shape
    U = _left_factors(qx, Ax, Bx, right_is_force=By is not None)
    cX, R = U.shape[2], U.shape[3]
    cY = Ay.shape[2]
    Ut = U.reshape(na, La, cX * R).transpose(1, 2)              # (na, cX R, La)
    out = 0.0
    qxf = qx.reshape(na * La, 3)
    ell2 = ell * ell
    for pi, sg in PERMS3:
        qp = qy[..., list(sg)]
        Bp = None if By is None else By[..., list(sg)]
        K = _gauss_matrix(qxf, qp.reshape(nb * Lb, 3), ell)
        if multispecies:
            pc = torch.where(vy, permuted_triple_code(cy_code, pi, n_species), -2)
            K = K * (cx_code.reshape(-1, 1) == pc.reshape(1, -1)).to(K.dtype)
        tmp = torch.bmm(Ut, K.reshape(na, La, nb * Lb)).reshape(na, cX, R, nb, Lb)
        for power, rows, V in _right_factors(qp, Ay, Bp, left_is_force=Bx is not None):
            Rp = len(rows)
            t = tmp[:, :, rows] if Rp < R or rows != list(range(R)) else tmp
            t = t.permute(3, 0, 1, 2, 4).reshape(nb, na * cX, Rp * Lb)
            Vr = V.permute(0, 3, 1, 2).reshape(nb, Rp * Lb, cY)
            blk = torch.bmm(t, Vr).permute(1, 0, 2).reshape(na * cX, nb * cY)
            out = out + (blk if power == 0 else blk / ell2 ** power)
    return out


def _assemble(blocks, row_perm, col_perm):
    """Dense matrix from a grid of blocks in packed order, then rows/cols to natural order."""
    M = torch.cat([torch.cat(row, dim=1) for row in blocks], dim=0)
    return M[torch.argsort(row_perm)][:, torch.argsort(col_perm)]


def _rows_of(batches, c):
    return torch.cat([(g[:, None] * c + torch.arange(c, device=g.device)[None, :]).reshape(-1)
                      for g, _, _ in batches])


def direct3(X: Terms, Y: Terms | None, ell, n_species: int, symmetric: bool = False,
            progress=None) -> torch.Tensor:
    """Covariance matrix between the functionals of X and Y under the unit-amplitude 3-body kernel
    k((s,q),(s',q')) = Σ_{π∈S₃} [s = π s'] exp(-|q - π q'|²/2ℓ²) (eq. 5.37), by direct sums.

    Args:
        X, Y: triplet terms (energies: c = 1, B None; forces: c = 3, B (T, 3, 3)); Y None with
            symmetric=True for X against itself (only the upper block triangle is computed).
        ell: length scale ℓ₃ (0-dim tensor, may carry a forward-AD tangent).
    Returns:
        (X.n_rows, Y.n_rows) matrix; row g*c + α is component α of group g.

    With d = q - q'' (q'' = π q', B'' = π B'), a pair of terms contributes
    k [A A' + A (B''·d)/ℓ² - (B·d) A'/ℓ² + B·B''/ℓ² - (B·d)(B''·d)/ℓ⁴], evaluated as a sum of
    rank-one products ℓ^-2p U_r(t) K(t, t') V_r(t') with ℓ-free U, V (:func:`_left_factors`,
    :func:`_right_factors`) so that the work is batched matrix products. Rows are padded per
    group (:func:`pack`); the Gaussian matrix is one augmented GEMM of exponents.
    """
    if symmetric:
        Y = X
    if X.n_terms == 0 or Y.n_terms == 0:
        return torch.zeros(X.n_rows, Y.n_rows, dtype=X.A.dtype, device=X.A.device) * ell
    if Y.B is None and X.B is not None:
        return direct3(Y, X, ell, n_species).T
    allq = torch.cat([X.q.reshape(-1), Y.q.reshape(-1)])
    center = 0.5 * (allq.min() + allq.max())
    multi = n_species > 1
    bX = pack(X)
    bY = bX if symmetric else pack(Y)
    blocks = [[None] * len(bY) for _ in bX]
    pairs = [(a, b) for a in range(len(bX)) for b in range(len(bY)) if not symmetric or b >= a]
    it = progress(pairs) if progress is not None else pairs
    for a, b in it:
        blocks[a][b] = _block3(X, Y, bX[a], bY[b], ell, center, multi, n_species)
        if symmetric and a != b:
            blocks[b][a] = blocks[a][b].T
    return _assemble(blocks, _rows_of(bX, X.c), _rows_of(bY, Y.c))


# --------------------------------------------------------------------------- direct sums, 2-body
def direct2(X: Terms, Y: Terms, ell) -> torch.Tensor:
    """Covariance matrix between the functionals of X and Y under the unit-amplitude 2-body
    kernel [{a,b} = {a',b'}] exp(-(r - r')²/2ℓ²) (eqs. 5.28, 5.36), by direct sums over all pairs
    of terms (the reference for the quadrature path; O(T_X T_Y) memory).
    """
    r, rp = X.q[:, 0], Y.q[:, 0]
    d = r[:, None] - rp[None, :]
    ell2 = ell * ell
    k = torch.exp(-d * d / (2 * ell2)) * (X.code[:, None] == Y.code[None, :]).to(r.dtype)
    A, Ap = X.A, Y.A
    Bx = torch.zeros_like(A) if X.B is None else X.B[..., 0]
    By = torch.zeros_like(Ap) if Y.B is None else Y.B[..., 0]
    # Cov = A A' k + A B' ∂'k + B A' ∂k + B B' ∂∂'k
    k1 = d / ell2 * k                       # ∂k/∂r'
    k2 = (1.0 / ell2 - d * d / (ell2 * ell2)) * k
    M = (torch.einsum("ta,tu,ub->taub", A, k, Ap) + torch.einsum("ta,tu,ub->taub", A, k1, By)
         - torch.einsum("ta,tu,ub->taub", Bx, k1, Ap) + torch.einsum("ta,tu,ub->taub", Bx, k2, By))
    rows = X.group[:, None] * X.c + torch.arange(X.c, device=r.device)[None, :]
    cols = Y.group[:, None] * Y.c + torch.arange(Y.c, device=r.device)[None, :]
    M = M.reshape(X.n_terms * X.c, Y.n_terms * Y.c)
    out = torch.zeros(X.n_rows, Y.n_terms * Y.c, dtype=r.dtype, device=r.device)
    out = out.index_add(0, rows.reshape(-1), M)
    res = torch.zeros(X.n_rows, Y.n_rows, dtype=r.dtype, device=r.device)
    return res.index_add(1, cols.reshape(-1), out)


# --------------------------------------------------------------------------- quadrature grids
class Grid:
    """Uniform quadrature nodes u_0 + m h (m = 0..G-1) for the Gaussian of length scale ℓ.

    φ_u(x) = exp(-(x - u)²/ℓ²);  exp(-(x - x')²/2ℓ²) = w Σ_u φ_u(x) φ_u(x'),  w = h/(ℓ √(π/2)),
    exact to exp(-π² points_per_ell²/2) relative when (x + x')/2 lies in [lo + 5ℓ, hi - 5ℓ]
    (h = ℓ/points_per_ell).
    """

    def __init__(self, lo: float, hi: float, ell_value: float, points_per_ell: float, device):
        self.h = ell_value / points_per_ell
        self.n = int(math.ceil((hi - lo) / self.h)) + 1
        self.lo = lo
        self.nodes = lo + self.h * torch.arange(self.n, dtype=torch.float64, device=device)

    def weight(self, ell):
        return self.h / (ell * SQRT_HALF_PI)

    def basis(self, x, ell, derivative: bool = False):
        """φ (…, G) at x (…) and, if asked, ∂φ/∂x."""
        return Grid.basis_on(self.nodes, x, ell, derivative)

    @staticmethod
    def basis_on(nodes, x, ell, derivative: bool = False):
        """φ_u(x) = exp(-(x - u)²/ℓ²) (…, len(nodes)) and, if asked, ∂φ/∂x. Values below e^-200
        are set to zero (far below rounding; their products would be slow denormal numbers)."""
        d = x[..., None] - nodes
        a = d * d / (ell * ell)
        phi = torch.where(a < 200.0, torch.exp(-a), torch.zeros_like(a))
        if not derivative:
            return phi, None
        return phi, -2.0 * d / (ell * ell) * phi

    def exact_range(self, fmin: float, fmax: float, ell_value: float):
        """Queries x whose midpoints with every training feature in [fmin, fmax] are covered."""
        m = MARGIN_ELLS * ell_value
        return 2 * (self.lo + m) - fmin, 2 * (self.lo + self.h * (self.n - 1) - m) - fmax


class Grid3:
    """3-body quadrature nodes on the box [lo, lo + (n01-1)h]² × [lo, lo + (n-1)h] of the axes
    (r_ij, r_ik, r_jk): the pair axes stop BOX_MARGIN_ELLS ℓ above the 3-body cutoff, the r_jk
    axis MARGIN_ELLS ℓ above 2 r_c3 (nodes lo + m h shared by all axes, so the S₃ permutations of
    :func:`symmetrize3` map nodes onto nodes).

    A functional of triplets whose pair distances are ≤ r_c3 has no weight beyond the box, so
    Σ_π k(q, π q') = w³ Σ_{u ∈ box} φ_u(q) (S φ(q'))_u with an error ≤ exp(-BOX_MARGIN_ELLS²)
    relative (the worst case is π q' with a pair coordinate ≈ r_c3 + BOX_MARGIN_ELLS ℓ), and
    the box has ~(r_c3 / 2 r_c3)² of the cube's nodes.
    """

    def __init__(self, fmin: float, fmax01: float, fmax2: float, ell_value: float,
                 points_per_ell: float, device):
        self.h = ell_value / points_per_ell
        self.lo = fmin - MARGIN_ELLS * ell_value
        self.n = int(math.ceil((fmax2 + MARGIN_ELLS * ell_value - self.lo) / self.h)) + 1
        self.n01 = min(self.n, int(math.ceil((fmax01 + BOX_MARGIN_ELLS * ell_value - self.lo)
                                             / self.h)) + 1)
        self.nodes = self.lo + self.h * torch.arange(self.n, dtype=torch.float64, device=device)
        self.shape = (self.n01, self.n01, self.n)
        self.size = self.n01 * self.n01 * self.n

    def weight(self, ell):
        return self.h / (ell * SQRT_HALF_PI)

    def basis(self, x, ell, derivative: bool = False, axis: int = 2):
        """φ (…, n01 or n) at x (…) on the nodes of `axis` (0, 1: pair axes; 2: r_jk), and ∂φ/∂x."""
        nodes = self.nodes if axis == 2 else self.nodes[:self.n01]
        return Grid.basis_on(nodes, x, ell, derivative)

    def exact_range(self, fmin: float, fmax: float, ell_value: float):
        """(lo (3,), hi (3,)): queries q with lo ≤ q ≤ hi per axis are evaluated exactly against
        training features in [fmin, fmax] (midpoints covered; pair axes up to the box margin)."""
        m = MARGIN_ELLS * ell_value
        lo = 2 * (self.lo + m) - fmin
        hi01 = self.lo + self.h * (self.n01 - 1) - BOX_MARGIN_ELLS * ell_value
        hi2 = 2 * (self.lo + self.h * (self.n - 1) - m) - fmax
        return np.array([lo, lo, lo]), np.array([hi01, hi01, hi2])


def design2(terms: Terms, codes: list, grid: Grid, ell, chunk: int = 1 << 22) -> torch.Tensor:
    """Grid representation of 2-body functionals: (n_rows, n_codes * G) with
    row g*c + α, column (code, u) = Σ_t A_tα φ_u(r_t) + B_tα φ'_u(r_t) (only code-matching terms).
    The unit 2-body kernel between two sets is then w Φ_X Φ_Yᵀ (:meth:`Grid.weight`)."""
    G = grid.n
    ncol = len(codes) * G
    dev = terms.q.device
    top = max([int(c) for c in codes] + [int(terms.code.max()) if terms.n_terms else 0]) + 1
    lut = torch.full((top,), -1, dtype=torch.long, device=dev)
    if codes:
        lut[torch.tensor(codes, device=dev)] = torch.arange(len(codes), device=dev)
    out = torch.zeros(terms.n_rows * ncol, dtype=torch.float64, device=dev) * ell
    c = terms.c
    step = max(1, chunk // (G * c))
    ar = torch.arange(G, device=dev)
    for s in range(0, terms.n_terms, step):
        r = terms.q[s:s + step, 0]
        phi, dphi = grid.basis(r, ell, derivative=terms.B is not None)
        vals = terms.A[s:s + step, :, None] * phi[:, None, :]
        if terms.B is not None:
            vals = vals + terms.B[s:s + step, :, 0, None] * dphi[:, None, :]
        ci = lut[terms.code[s:s + step]]
        ok = ci >= 0                                  # species pairs outside `codes`: g₂ = 0
        row = terms.group[s:s + step, None] * c + torch.arange(c, device=dev)[None, :]
        flat = (row[:, :, None] * ncol + ci[:, None, None] * G + ar[None, None, :])[ok]
        out.index_add_(0, flat.reshape(-1), vals[ok].reshape(-1))
    return out.reshape(terms.n_rows, ncol)


# --------------------------------------------------------------------------- 3-body grid
def _embed_batches(sel: Terms, grid: Grid, ell, max_elements: int, split: bool):
    """Grid embeddings of the groups of `sel` (one species triple) batch by batch: yields
    (group ids (n,), Z (n, c, G³)) with Z[g, α] = Σ_t A_tα φ(q_t0)⊗φ(q_t1)⊗φ(q_t2) + B_tα·∇(...).

    The derivative terms share three Khatri-Rao products (φ0⊗φ1, φ0'⊗φ1, φ0⊗φ1') and the
    coefficients ride on the last axis, so the work is one batched GEMM per batch."""
    G, P = grid.n, grid.n01 * grid.n01
    c = sel.c
    deriv = sel.B is not None
    kr = 3 if deriv else 1
    for g, idx, valid in pack(sel, max_terms=max(16, max_elements // (kr * P)), split=split):
        q, _, A, B = _gather(sel, idx, valid)
        n, L = idx.shape
        p0, d0 = grid.basis(q[..., 0], ell, deriv, axis=0)
        p1, d1 = grid.basis(q[..., 1], ell, deriv, axis=1)
        p2, d2 = grid.basis(q[..., 2], ell, deriv, axis=2)
        if deriv:
            left = torch.stack([p0, d0, p0], dim=1)                        # (n, 3, L, G)
            right = torch.stack([p1, p1, d1], dim=1)
            KR = (left[..., :, None] * right[..., None, :]).reshape(n, 3 * L, P)
            # right factors per α: [A_α φ2 + B_α2 φ2' ; B_α0 φ2 ; B_α1 φ2]
            f0 = A[..., :, None] * p2[:, :, None, :] + B[..., 2, None] * d2[:, :, None, :]
            f1 = B[..., 0, None] * p2[:, :, None, :]
            f2 = B[..., 1, None] * p2[:, :, None, :]
            Rf = torch.cat([f0, f1, f2], dim=1).reshape(n, 3 * L, c * G)   # (n, 3L, c G)
        else:
            KR = (p0[..., :, None] * p1[..., None, :]).reshape(n, L, P)
            Rf = (A[..., :, None] * p2[:, :, None, :]).reshape(n, L, c * G)
        Zb = torch.bmm(KR.transpose(1, 2), Rf)                              # (n, n01², c G)
        yield g, Zb.reshape(n, P, c, G).permute(0, 2, 1, 3).reshape(n, c, P * G)


def embed3(terms: Terms, tri_codes: list, grid: Grid3, ell,
           max_elements: int = 1 << 23) -> torch.Tensor:
    """Grid representation of 3-body functionals: (n_rows, n_tri, n01, n01, n) with, for the
    term species slot s, Σ_t A_t φ(q_t0)⊗φ(q_t1)⊗φ(q_t2) + B_t · ∇(...) (row g*c + α). Species
    codes not in `tri_codes` are dropped (their functions are zero)."""
    ntri = len(tri_codes)
    c = terms.c
    out = torch.zeros(terms.n_groups, c, ntri, grid.size, dtype=torch.float64,
                      device=terms.q.device) * ell
    for si, code in enumerate(tri_codes):
        sel = terms.select(terms.code == code)
        if sel.n_terms == 0:
            continue
        for g, Zb in _embed_batches(sel, grid, ell, max_elements, split=True):
            out[:, :, si].index_add_(0, g, Zb)
    return out.reshape(terms.n_rows, ntri, *grid.shape)


def grid_cross3(SZ: torch.Tensor, tri_codes: list, terms: Terms, grid: Grid3, ell,
                max_elements: int = 1 << 23) -> torch.Tensor:
    """(SZ_flat) · embedding of every row of `terms`, without storing the embeddings:
    SZ (n, n_tri · grid.size) (symmetrised, e.g. energies); returns (n, terms.n_rows)."""
    G3 = grid.size
    out = torch.zeros(SZ.shape[0], terms.n_groups, terms.c, dtype=torch.float64,
                      device=SZ.device) * ell
    SZ = SZ.reshape(SZ.shape[0], len(tri_codes), G3)
    for si, code in enumerate(tri_codes):
        sel = terms.select(terms.code == code)
        if sel.n_terms == 0:
            continue
        for g, Zb in _embed_batches(sel, grid, ell, max_elements, split=False):
            blk = SZ[:, si] @ Zb.reshape(-1, G3).T                          # (n, n_g c)
            out.index_add_(1, g, blk.reshape(SZ.shape[0], g.numel(), terms.c))
    return out.reshape(SZ.shape[0], terms.n_rows)


def symmetrize3(Z: torch.Tensor, tri_codes: list, n_species: int) -> torch.Tensor:
    """S Z = Σ_π π·Z: the species slot π s' receives Z[s'] with its grid axes permuted by σ_π
    (`tri_codes` must be closed under S₃), restricted to the box of :class:`Grid3`: a permuted
    r_jk axis is cut to the n01 pair-axis nodes, a permuted pair axis is zero beyond them.
    Z: (n, n_tri, n01, n01, n)."""
    pos = {c: k for k, c in enumerate(tri_codes)}
    n01, n = Z.shape[2], Z.shape[4]
    out = torch.zeros_like(Z)
    for pi, sg in PERMS3:
        dst = [pos[int(permuted_triple_code(c, pi, n_species))] for c in tri_codes]
        moved = Z.permute(0, 1, 2 + sg[0], 2 + sg[1], 2 + sg[2])[:, :, :n01, :n01]
        if moved.shape[4] < n:
            moved = torch.nn.functional.pad(moved, (0, n - moved.shape[4]))
        out.index_add_(1, torch.tensor(dst, device=Z.device), moved)
    return out


def eval_grid3(theta: torch.Tensor, tri_codes: list, grid: Grid3, ell, q, code, chunk: int = 2048):
    """Σ_u θ[s, u] φ_u(q) for triplet features q (T, 3) of species codes `code` (T,) (zero for
    codes not in `tri_codes`); differentiable with respect to q."""
    n01, G = grid.n01, grid.n
    out = torch.zeros(q.shape[0], dtype=torch.float64, device=q.device)
    for si, c in enumerate(tri_codes):
        idx = torch.nonzero(code == c).reshape(-1)
        if idx.numel() == 0:
            continue
        th = theta[si].reshape(n01, n01 * G)
        for s in range(0, idx.numel(), chunk):
            ii = idx[s:s + chunk]
            qq = q[ii]
            p0, _ = grid.basis(qq[:, 0], ell, axis=0)
            p1, _ = grid.basis(qq[:, 1], ell, axis=1)
            p2, _ = grid.basis(qq[:, 2], ell, axis=2)
            m = (p0 @ th).reshape(-1, n01, G)
            m = (m * p1[:, :, None]).sum(1)
            out = out.index_add(0, ii, (m * p2).sum(1))
    return out


def eval_grid2(theta: torch.Tensor, codes: list, grid: Grid, ell, r, code):
    """Σ_u θ[code, u] φ_u(r) for pair distances r (P,) (zero for unknown codes)."""
    out = torch.zeros(r.shape[0], dtype=torch.float64, device=r.device)
    for si, c in enumerate(codes):
        idx = torch.nonzero(code == c).reshape(-1)
        if idx.numel():
            phi, _ = grid.basis(r[idx], ell)
            out = out.index_add(0, idx, phi @ theta[si])
    return out


# --------------------------------------------------------------------------- posterior means, direct
class _DirectSum(torch.autograd.Function):
    """Σ_t of a chunked term sum and its analytic gradient wrt the query features, both
    accumulated chunk by chunk in the forward pass: no graph over (query, term) pairs is kept,
    memory is one chunk plus the (Q, D) gradient."""

    @staticmethod
    def forward(ctx, q, chunk_terms, n_terms, step):
        val = torch.zeros(q.shape[0], dtype=torch.float64, device=q.device)
        grad = torch.zeros_like(q)
        for s in range(0, n_terms, step):
            v, g = chunk_terms(q, s, min(s + step, n_terms))
            val += v
            grad += g
        ctx.save_for_backward(grad)
        return val

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        g = grad_out[:, None] * grad if grad.dim() == 2 else grad_out * grad
        return g, None, None, None


def eval_direct3(mean: Terms, ell, q, code, n_species: int, chunk: int = 1 << 22):
    """Σ_t Cov(g₃^s(q), L_t) for single-component terms `mean` (A (T,1), B (T,1,3) or None):
    the unit-amplitude posterior-mean sum of eq. 5.15 by direct sums, in chunks of `chunk`
    (query, term) pairs; differentiable wrt q (analytic gradient, no per-pair graph)."""
    if mean.n_terms == 0 or q.shape[0] == 0:
        return torch.zeros(q.shape[0], dtype=torch.float64, device=q.device)
    ell2 = float(ell) ** 2

    def chunk_terms(q, s, stop):
        # term t, ordering π: k = exp(−|d|²/2ℓ²), d = q − π q_t; value k (A + d·πB/ℓ²);
        # ∂/∂q = k (πB − d (A + d·πB/ℓ²)) / ℓ²
        qt, at, ct = mean.q[s:stop], mean.A[s:stop, 0], mean.code[s:stop]
        bt = None if mean.B is None else mean.B[s:stop, 0]
        val = torch.zeros(q.shape[0], dtype=torch.float64, device=q.device)
        grad = torch.zeros_like(q)
        for pi, sg in PERMS3:
            d = q[:, None, :] - qt[:, list(sg)][None, :, :]
            k = torch.exp(-(d * d).sum(-1) / (2 * ell2))
            if n_species > 1:
                k = k * (code[:, None] == permuted_triple_code(ct, pi, n_species)[None, :]).to(k.dtype)
            v = at[None, :]
            if bt is not None:
                b = bt[:, list(sg)]
                v = v + (d * b[None]).sum(-1) / ell2
                grad += k @ b / ell2
            kv = k * v
            val += kv.sum(1)
            grad -= torch.einsum("qt,qtd->qd", kv, d) / ell2
        return val, grad
    return _DirectSum.apply(q, chunk_terms, mean.n_terms, max(1, chunk // max(1, q.shape[0])))


def eval_direct2(mean: Terms, ell, r, code, chunk: int = 1 << 22):
    """Σ_t Cov(g₂^code(r), L_t) for single-component pair terms (unit amplitude), direct sums in
    chunks of `chunk` (query, term) pairs; differentiable wrt r (analytic gradient)."""
    if mean.n_terms == 0 or r.shape[0] == 0:
        return torch.zeros(r.shape[0], dtype=torch.float64, device=r.device)
    ell2 = float(ell) ** 2

    def chunk_terms(r, s, stop):
        d = r[:, None] - mean.q[None, s:stop, 0]
        k = torch.exp(-d * d / (2 * ell2)) * (code[:, None] == mean.code[None, s:stop]).to(r.dtype)
        v = mean.A[None, s:stop, 0]
        grad = torch.zeros_like(r)
        if mean.B is not None:
            b = mean.B[None, s:stop, 0, 0]
            v = v + d * b / ell2
            grad += (k * b).sum(1) / ell2
        kv = k * v
        return kv.sum(1), grad - (kv * d).sum(1) / ell2
    return _DirectSum.apply(r, chunk_terms, mean.n_terms, max(1, chunk // max(1, r.shape[0])))


def contract_components(terms: Terms, weights: torch.Tensor) -> Terms:
    """Single-component terms Σ_α weights[g, α] (A_tα, B_tα) (weights (n_groups, c)): the
    functional Σ_rows weight · L_row as one group."""
    w = weights[terms.group]                                  # (T, c)
    A = (terms.A * w).sum(1, keepdim=True)
    B = None if terms.B is None else (terms.B * w[:, :, None]).sum(1, keepdim=True)
    return Terms(terms.q, terms.code, torch.zeros_like(terms.group), 1, A, B)
