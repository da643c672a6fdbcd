"""Kernels written once as scalar functions k(x, x'; σ); everything else by AD (torch.func).

Source: papers/ad_kernels.txt (Schmitz, Müller, Chmiela, JPCL 2022): operator kernels by
algorithmic differentiation, with early contraction (eq. 6, SI §A–C): the right operator is applied
to the coefficients first, so a prediction needs one Jacobian-vector product of the scalar kernel
per training point instead of a D × D Hessian block.

A :class:`ScalarKernel` wraps ``fn(x, x_prime, sigma) -> 0-d tensor`` of two single descriptor
vectors x, x' (D,). From it:

* :func:`ad_evaluate` — the model's energy and forces (same signature and meaning as
  :func:`gpff.sgdml_kernel.evaluate`), with, per query ordering x_q = x(R[p_q]),

      E₀(R) = Σ_q Σ_m [ β_m k(x_q, x_m) − ∇_{x'} k(x_q, x')|_{x'=x_m} · v_m ],   v_m = J_m α_m,

  the directional derivative taken by ``torch.func.jvp`` in the direction v_m (early
  contraction; for a radial kernel −∇_{x'}k · v = k₁ u·v, u = x − x', as in docs/model_file.md),
  and F = −∇_R E: ∇_x E₀ by ``torch.func.grad``, then the chain rule through the descriptor.
* :class:`ADTrainingKernel` — the training kernel operator of :class:`gpff.sgdml_kernel.
  TrainingKernel` (it subclasses it: expansion, assembly loop, columns and matvec are shared) with
  the Hessian blocks H = ∇_x ∇_{x'}ᵀ k applied to the descriptor Jacobians by forward-over-reverse
  AD (H·J(P_q R_n)Π_q column by column, never the D × D block), and matvec = :func:`ad_evaluate`
  at the training geometries.

A user kernel must be symmetric, k(x, x') = k(x', x), and invariant under a simultaneous
permutation of the descriptor entries, k(Px, Px') = k(x, x') (true for any function of ‖x − x'‖
or of x·x'): the symmetric model sums over the orderings of the query at prediction time and over
the orderings of the training geometries in the training kernel, which agree only then. Its
derivatives up to second order must be finite where it is evaluated, including x = x' (the
diagonal of the training kernel); see :func:`matern52_scalar` for a norm that is safe there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch.func import grad, grad_and_value, jvp, vmap

from .sgdml_kernel import TrainingKernel

_SQRT5 = math.sqrt(5.0)
#: Matérn 5/2 switches to its Taylor series in t² = (a d)² below t = 1e-4: the series' error
#: (−t⁵/45 in k) is ~t³/3 ≈ 3e-13 relative in the Hessian, and the closed form's cancellation
#: (k'(t) ∝ t is a difference of O(1) product-rule terms) is ~3e-16/t ≈ 3e-12 relative above it.
_MATERN_T2_SERIES = 1e-8


@dataclass(frozen=True)
class ScalarKernel:
    """A kernel written once as a scalar function of two descriptors.

    Args:
        fn: ``fn(x, x_prime, sigma) -> 0-d tensor`` for single descriptors x, x' (D,), written
            with differentiable torch operations (no in-place ops, no data-dependent Python
            control flow: it is transformed by torch.func.vmap/grad/jvp). Further
            hyperparameters can be bound with a closure or functools.partial.
        name: a name for the kernel (stored in model files; "matern52" and "rbf" are the
            kernels the C++ core evaluates too).
    """

    fn: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    name: str

    def __call__(self, x: torch.Tensor, x_prime: torch.Tensor, sigma: float) -> torch.Tensor:
        return self.fn(x, x_prime, sigma)


def matern52_scalar(x: torch.Tensor, x_prime: torch.Tensor, sigma: float) -> torch.Tensor:
    """Matérn 5/2, k = (1 + t + t²/3) e^{−t}, t = √5 ‖x − x'‖ / σ.

    The norm needs care at x = x': with a plain (or ε-shifted) square root, AD evaluates
    k'(d) as a difference of O(1) terms that cancel to 0 (not ≈ −a²d/3), and the Hessian there
    comes out 0 instead of a²/3·I. So for t² < 1e-8 the kernel is its Taylor series in t²,
    1 − t²/6 + t⁴/24 (exact up to O(t⁵)), selected with the double-where trick, so that both
    branches and all their derivatives are finite everywhere.
    """
    a = _SQRT5 / sigma
    t2 = a * a * ((x - x_prime) ** 2).sum()
    small = t2 < _MATERN_T2_SERIES
    t = torch.sqrt(torch.where(small, torch.ones_like(t2), t2))
    closed = (1.0 + t + t * t / 3.0) * torch.exp(-t)
    series = 1.0 - t2 / 6.0 + t2 * t2 / 24.0
    return torch.where(small, series, closed)


def rbf_scalar(x: torch.Tensor, x_prime: torch.Tensor, sigma: float) -> torch.Tensor:
    """Squared exponential (RBF), k = exp(−‖x − x'‖² / (2σ²)) (no square root needed)."""
    return torch.exp(-0.5 * ((x - x_prime) ** 2).sum() / (sigma * sigma))


MATERN52 = ScalarKernel(matern52_scalar, "matern52")
RBF = ScalarKernel(rbf_scalar, "rbf")
#: built-in scalar kernels by name (the same names as gpff.kernels.RADIAL_KERNELS)
SCALAR_KERNELS = {"matern52": MATERN52, "rbf": RBF}


def get_scalar_kernel(kernel) -> ScalarKernel:
    """`kernel` if it is a :class:`ScalarKernel`, else the built-in one of that name."""
    if isinstance(kernel, ScalarKernel):
        return kernel
    try:
        return SCALAR_KERNELS[kernel]
    except (KeyError, TypeError):
        raise ValueError(f"unknown kernel {kernel!r}; known: {', '.join(SCALAR_KERNELS)}, "
                         "or a gpff.ad_kernels.ScalarKernel") from None


# ---------------------------------------------------------------------- derived functions
def _energy_fn(kernel: ScalarKernel, sigma: float, xm, vm, beta):
    """E₀(x) = Σ_m [β_m k(x, x_m) − ∇_{x'}k(x, x_m)·v_m] of one query descriptor x (D,)."""
    def term(x, x_m, v_m, b_m):                        # one training point: a JVP along v_m
        k, dk = jvp(lambda xp: kernel.fn(x, xp, sigma), (x_m,), (v_m,))
        return b_m * k - dk

    over_m = vmap(term, in_dims=(None, 0, 0, 0))
    return lambda x: over_m(x, xm, vm, beta).sum()


def ad_evaluate(R: torch.Tensor, xm: torch.Tensor, vm: torch.Tensor, beta: torch.Tensor | None,
                perms: torch.Tensor, kernel: ScalarKernel, sigma: float, descriptor,
                batch: int = 16):
    """Energy (without the integration constant) and forces of geometries R, by AD.

    Same arguments and results as :func:`gpff.sgdml_kernel.evaluate`, except that `kernel` is a
    :class:`ScalarKernel` (or a built-in kernel's name). E₀ and G = ∇_x E₀ of every query
    ordering x(R[p_q]) come from ``vmap(grad_and_value(E₀))``; the forces are then the chain rule
    through the descriptor, F₀ = −J(R[p_q])ᵀ G, mapped back to R's atoms and summed over q.
    (Pulling G back by ``torch.func.vjp`` of the descriptor gives the same forces to 1e-15 but is
    2–3× slower on CPU, and vmapping grad over geometries slower still.)

    Args:
        R: (B, N, 3) positions, Å. xm, vm: (M, D) training descriptors and v_m = J_m α_m.
        beta: (M,) energy coefficients or None. perms: (S, N) long, a group, identity first.
        kernel: the scalar kernel. sigma: σ. descriptor: R -> (x, J) (gpff.descriptor).
        batch: geometries per pass.
    Returns:
        E₀ (B,) and F (B, N, 3): E = c + E₀, F = −∇_R E.
    """
    kernel = get_scalar_kernel(kernel)
    if beta is None:
        beta = xm.new_zeros(xm.shape[0])
    grad_energy = vmap(grad_and_value(_energy_fn(kernel, sigma, xm, vm, beta)))
    inv = torch.argsort(perms, dim=1)
    E, F = [], []
    for start in range(0, len(R), batch):
        r = R[start:start + batch]
        x, J = descriptor(r[:, perms])                              # (b, S, D), (b, S, D, 3N)
        G, e = grad_energy(x.reshape(-1, x.shape[-1]))
        F0 = -torch.einsum("bsd,bsdl->bsl", G.reshape(x.shape), J).reshape(x.shape[:2] + r.shape[1:])
        F.append(torch.gather(F0, 2, inv[None, :, :, None].expand_as(F0)).sum(1))   # F[p_q[a]] += F₀[q, a]
        E.append(e.reshape(x.shape[:2]).sum(1))
    if not E:
        return R.new_zeros(0), R.new_zeros(R.shape)
    return torch.cat(E), torch.cat(F)


def _over(fn, dims):
    """fn vmapped over successive leading dimensions; dims: in_dims of each level, outermost
    first."""
    for d in reversed(dims):
        fn = vmap(fn, in_dims=d)
    return fn


class ADTrainingKernel(TrainingKernel):
    """:class:`gpff.sgdml_kernel.TrainingKernel` with the kernel blocks derived by AD from a
    :class:`ScalarKernel` (same constructor, attributes and methods).

    With H = ∇_x ∇_{x'}ᵀ k(x_f, x'), x_nq = x(P_q R_n) and JP_nq = J(P_q R_n) Π_q:

        K_FF[f, n] = J_fᵀ Σ_q H(x_f, x_nq) JP_nq           (forward-over-reverse, per column of JP)
        K_FE[f, n] = −J_fᵀ Σ_q ∇_x k(x_f, x_nq)             Cov(F_f, E_n), F = −∇_R E
        K_EF[f, n] = −Σ_q JP_nqᵀ ∇_{x'} k(x_f, x_nq)        Cov(E_f, F_n)
        K_EE[f, n] = Σ_q k(x_f, x_nq)

    and matvec evaluates the model by :func:`ad_evaluate` at the training geometries.
    """

    def __init__(self, R: torch.Tensor, perms: torch.Tensor, kernel: ScalarKernel, sigma: float,
                 descriptor, lam: float, use_energies: bool = False, block: int = 8,
                 cache_bytes: int = 0):
        kernel = get_scalar_kernel(kernel)
        # cache_bytes unused: the AD matvec evaluates the model (ad_evaluate), it keeps no values
        super().__init__(R, perms, kernel, sigma, descriptor, lam, use_energies, block, 0)
        k = lambda x, xp: kernel.fn(x, xp, sigma)                  # noqa: E731
        grad_x = grad(k, argnums=0)

        def hess_cols(x, xp, Jc):                                   # H(x, x') Jc, Jc (D, L)
            hvp = lambda t: jvp(lambda y: grad_x(x, y), (xp,), (t,))[1]   # noqa: E731
            return vmap(hvp, in_dims=1, out_dims=1)(Jc)

        # frames (b) against all training geometries (m) and their orderings (s)
        self._hess_rows = _over(hess_cols, [(0, None, None), (None, 0, 0), (None, 0, 0)])
        self._grad_x_rows = _over(grad_x, [(0, None), (None, 0), (None, 0)])
        self._grad_xp_rows = _over(grad_and_value(k, argnums=1), [(0, None), (None, 0), (None, 0)])
        # frames (b) against their own orderings (s)
        self._hess_diag = _over(hess_cols, [(0, 0, 0), (None, 0, 0)])
        self._k_diag = _over(k, [(0, 0), (None, 0)])

    def workspace_bytes(self) -> int:
        """As TrainingKernel's, plus the AD intermediates of one block of rows: a few
        (block, M, S, D, 3N) tensors of Hessian-Jacobian products and their tangents."""
        m, s, d = self.x.shape
        return super().workspace_bytes() + 8 * 4 * self.rows_per_block * m * s * d * self.block

    def force_rows(self, frames: torch.Tensor) -> torch.Tensor:
        """Rows of K (without λ) of the force components of `frames`: (len(frames)·3N, n)."""
        Jf, xf = self.J0[frames], self.x0[frames]
        HJ = self._hess_rows(xf, self.x, self.JP).sum(2)           # (b, M, D, 3N)
        out = torch.einsum("bdk,bmdl->bkml", Jf, HJ).reshape(len(frames) * self.block, self.nf)
        if self.use_energies:
            G = self._grad_x_rows(xf, self.x).sum(2)               # (b, M, D)
            fe = -torch.einsum("bdk,bmd->bkm", Jf, G)
            out = torch.cat([out, fe.reshape(len(frames) * self.block, self.m)], dim=1)
        return out

    def energy_rows(self, frames: torch.Tensor) -> torch.Tensor:
        """Rows of K (without λ) of the energies of `frames`: (len(frames), n)."""
        G, k = self._grad_xp_rows(self.x0[frames], self.x)         # (b, M, S, D), (b, M, S)
        ef = -torch.einsum("msdl,bmsd->bml", self.JP, G).reshape(len(frames), self.nf)
        return torch.cat([ef, k.sum(-1)], dim=1)

    def _frame_blocks(self, f: torch.Tensor):
        HJ = self._hess_diag(self.x0[f], self.x[f], self.JP[f])    # (b, S, D, r)
        fb = torch.einsum("bdk,bsdl->bkl", self.J0[f], HJ)
        return fb, self._k_diag(self.x0[f], self.x[f]).sum(1)

    def _product(self, a: torch.Tensor, beta: torch.Tensor | None) -> torch.Tensor:
        """K [a; β] without λ, (n,): the model with v_m = J_m Q_m a_m and β evaluated by
        :func:`ad_evaluate` at the training geometries."""
        v = torch.einsum("mdl,ml->md", self.J0, a)
        e0, f = ad_evaluate(self.R, self.x0, v, beta, self.perms, self.kernel, self.sigma,
                            self.descriptor)
        return torch.cat([self._in_bases(f)] + ([e0] if self.use_energies else []))


def kernel_backend(kernel):
    """(name, training-operator class, evaluate function, kernel object) for `kernel`.

    A built-in name ("matern52", "rbf") or built-in :class:`ScalarKernel` uses the hand-derived
    fast path (gpff.kernels, gpff.sgdml_kernel; tested against the AD path to 1e-10); any other
    :class:`ScalarKernel` is trained and evaluated by AD. Raises ValueError for an unknown name.
    """
    from .kernels import RADIAL_KERNELS
    from .sgdml_kernel import evaluate

    if isinstance(kernel, ScalarKernel) and SCALAR_KERNELS.get(kernel.name) is kernel:
        kernel = kernel.name
    if isinstance(kernel, str):
        if kernel not in RADIAL_KERNELS:
            get_scalar_kernel(kernel)                   # raises the ValueError naming the choices
        return kernel, TrainingKernel, evaluate, RADIAL_KERNELS[kernel]
    kernel = get_scalar_kernel(kernel)
    return kernel.name, ADTrainingKernel, ad_evaluate, kernel
