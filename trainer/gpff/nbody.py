"""n-body GP force fields: the exact GP of docs/mff.md (papers/nbody_gp_mff.txt, chapter 5).

The total energy of a configuration is Σ_i [e₀(s_i) + ε_i] with the local energy (eqs. 5.7, 5.34)

    ε_i = Σ_{j, r_ij < r_c} f_c(r_ij; r_c) g₂^{s_i s_j}(r_ij)
        + Σ_{j<k, r_ij, r_ik < r_c3} f_c(r_ij; r_c3) f_c(r_ik; r_c3) g₃^{s_i s_j s_k}(r_ij, r_ik, r_jk)

with independent zero-mean GP priors on g₂ (per unordered species pair, eqs. 5.28/5.36) and g₃
(S₃-symmetrised, eq. 5.37). With ``embedding=True`` the local energy gains an EAM-like many-body
term F^{s_i}(ρ_i) of the density ρ_i = Σ_{j, r_ij < r_c} f_c(r_ij; r_c) exp(-β r_ij), with a
squared-exponential GP prior on each F^s (an additive kernel, eq. 5.9 applied to the scalar
descriptor ρ); it is mapped onto a 1-D spline like g₂.

Observations are total energies and Cartesian force components of a
random subset of atoms; the joint energy/force kernel matrix (eq. 5.14) is solved by Cholesky in
float64, and the forces of the model are the exact -∂E/∂R of its energy (energy conserving).
Orders 5 and "many" replace the local energy by a GP with a many-body kernel built on the 3-body
kernel: the non-unique 5-body kernel k₃² (eq. 5.30, ζ = 2) or the many-body kernel of eq. 5.31
(exact GP only: no g₂/g₃, cannot be mapped). Their kernel entries follow from 3-body covariances
of single environments (see NBodyGP._local_functionals), at a cost that grows with the square
of the number of environments in the training frames.

Kernel algebra: gpff.nbody_kernels; neighbour lists and features: gpff.environments.
"""

from __future__ import annotations

import copy
import math
import os
import time

import numpy as np
import torch
from torch.autograd import forward_ad as fwAD
from tqdm.auto import tqdm

from . import nbody_kernels as nk
from .data import Configurations
from .environments import (FrameEnvironment, cutoff_function, density_function,
                           frame_environments, pair_jacobian_terms, triplet_jacobian_terms,
                           triplet_strain_terms)
from .errors import DatasetError, SpeciesError, TrainingError
from .units import virial_to_stress

ORDERS = (2, 3, 5, "many")
#: the orders whose local-energy kernel is a function of the 3-body kernel (eqs. 5.30, 5.31)
MANY_BODY_ORDERS = (5, "many")
KERNEL_METHODS = ("auto", "grid", "direct")
#: lower extension (Å) of the 3-body quadrature grid below the shortest training distance:
#: g₃ queries down to r_min - 2 × this are evaluated on the grid, lower ones by direct sums
GRID3_EXTENSION = 0.25
#: upper extension (Å) of the 2-body grid beyond the cutoff
GRID2_EXTENSION = 1.0
#: bounds of the hyperparameters during optimisation (ℓ₂, ℓ₃ in Å; signals and noises in the
#: energy unit): outside them the objective is penalised, so that a line-search trial step cannot
#: ask for absurd quadrature grids
HYPERPARAMETER_BOUNDS = {"length_scale_2": (0.05, 20.0), "length_scale_3": (0.05, 20.0),
                         "length_scale_many": (1e-3, 1e3), "length_scale_embedding": (1e-3, 1e2),
                         "sigma_embedding": (1e-8, 1e4), "sigma_2": (1e-8, 1e4),
                         "sigma_3": (1e-8, 1e4), "sigma_many": (1e-8, 1e4),
                         "sigma_energy": (1e-8, 1e4), "sigma_force": (1e-8, 1e4)}
#: upper extension of the embedding quadrature grid beyond the largest training density, as a
#: fraction of the training range of ρ (queries beyond the grid's exact range use direct sums)
GRID_EMBEDDING_EXTENSION = 0.5
#: most force environments the default rule of `gpff train nbody` takes (:func:`n_envs_within`)
N_ENVS_MAX = 2000
#: largest 3-body grid of the posterior mean g₃ (elements); beyond it g₃ uses direct sums
GRID3_MEAN_MAX_ELEMENTS = 6e7
#: largest symmetrised 3-body grid embeddings (elements, float64) the energy blocks keep at once
GRID3_MAX_ELEMENTS = 4e8
#: elements of one streamed chunk of 3-body grid embeddings
GRID3_CHUNK_ELEMENTS = 4e7


def n_envs_within(seconds: float, optimization: dict, n_energies: int, n_max: int) -> int:
    """Force environments of a fit estimated to take at most `seconds` (the default rule of
    `gpff train nbody --n-envs`).

    The fit's cost is dominated by the kernel matrix, whose blocks grow with the square of the
    observation rows (n_energies + 3 n_envs), so it is extrapolated from the timed solve at the
    end of :meth:`NBodyGP.optimize`: t(rows) = solve_seconds · (rows / n_rows)². Since the
    embeddings in the blocks grow only linearly, this overestimates (mlearn Mo: 189 s measured
    for 1994 rows against 320 s estimated from 650 rows), so the rule errs on the short side.

    Args:
        seconds: time allowed for the fit. optimization: the provenance entry "optimization"
            of :meth:`NBodyGP.optimize` ("solve_seconds", "n_rows", "n_envs").
        n_energies: energy observations of the fit. n_max: the most environments to take.
    Returns:
        n_envs, between min(n_max, the optimisation's environments) and n_max.
    """
    t, rows = max(optimization["solve_seconds"], 1e-3), optimization["n_rows"]
    fit_rows = rows * math.sqrt(max(seconds, 0.0) / t)
    n = int((fit_rows - n_energies) // 3)
    return int(min(n_max, max(n, min(n_max, optimization["n_envs"]))))


class _OutOfTime(Exception):
    """Raised inside the marginal-likelihood search when its time limit has passed."""


def _log(progress, msg):
    if progress:
        tqdm.write(msg)


class _LengthScaleKernel(torch.autograd.Function):
    """K(log ℓ₁, log ℓ₂, ...) as a differentiable function: the builder returns K and the
    derivatives dK/dlog ℓ_k (a list, one per entry of log_ells)."""

    @staticmethod
    def forward(ctx, log_ells, builder):
        K, dKs = builder()
        ctx.save_for_backward(torch.stack(list(dKs)))
        return K.clone()

    @staticmethod
    def backward(ctx, grad):
        (dK,) = ctx.saved_tensors
        return (dK * grad).sum((1, 2)), None


def _config_type_sigma(spec) -> dict:
    """{type: (σ_E or None, σ_F or None)} from NBodyGP's `config_type_sigma` argument."""
    out = {}
    for name, value in (spec or {}).items():
        pair = tuple(value) if isinstance(value, (tuple, list)) else (value, None)
        if len(pair) != 2 or all(v is None for v in pair):
            raise ValueError(f"config_type_sigma[{name!r}] must be σ_E or (σ_E, σ_F), got {value!r}")
        values = []
        for label, raw in zip(("σ_E", "σ_F"), pair):
            try:
                v = None if raw is None else float(raw)
            except (TypeError, ValueError):
                v = math.nan
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise ValueError(f"config_type_sigma[{name!r}]: {label} must be a positive "
                                 f"number, got {raw!r}")
            values.append(v)
        out[str(name)] = tuple(values)
    return out


class _Observations:
    """Terms of a set of observations: energy rows (frames) then force rows (3 per env atom)."""

    def __init__(self):
        self.n_E = 0
        self.n_F = 0
        self.pairsE = self.pairsF = self.tripE = self.tripF = None
        self.envs = []             # FrameEnvironment per frame
        self.energy_frames = np.zeros(0, dtype=int)   # frame index of each energy row
        self.n_atoms_E = np.zeros(0)                  # atoms of each energy row
        self.force_index = np.zeros((0, 2), dtype=int)  # (frame, atom) of each force env
        self.energy_noise = None   # (n_E,) σ_E of the row's config type, NaN: the global σ_E
        self.force_noise = None    # (n_F,) σ_F likewise

    @property
    def n_rows(self) -> int:
        return self.n_E + 3 * self.n_F


class _LocalFunctionals:
    """Environment-resolved 3-body functionals of some frames (the building blocks of the
    many-body kernel): `obs` holds one energy group per atomic environment i (its local 3-body
    energy Σ_t w_t g₃(q_t)) and one force group per (environment i, differentiated coordinate
    triple x of its frame) (-∂/∂x of that local energy), as rows of a 3-body kernel."""

    def __init__(self):
        self.obs = _Observations()
        self.frames = []           # frame indices
        self.e_rows = {}           # frame → (n_env,) kernel rows of the local energies
        self.f_rows = {}           # frame → (n_env, n_x, 3) kernel rows of their derivatives

    @property
    def energies(self) -> _Observations:
        """The local energies of `obs` alone."""
        E = _Observations()
        E.n_E, E.tripE = self.obs.n_E, self.obs.tripE
        E.tripF = _cat_terms([], 0, 3, 3, True, self.obs.tripE.q.device)
        return E


def _cat_terms(lst, n_groups, D, c, with_B, dev) -> nk.Terms:
    """The terms of `lst` as one set of n_groups groups (features of dimension D, c components;
    an empty set if `lst` is)."""
    if not lst:
        B = torch.zeros(0, c, D, dtype=torch.float64, device=dev) if with_B else None
        return nk.Terms(torch.zeros(0, D, dtype=torch.float64, device=dev),
                        torch.zeros(0, dtype=torch.long, device=dev),
                        torch.zeros(0, dtype=torch.long, device=dev), n_groups,
                        torch.zeros(0, c, dtype=torch.float64, device=dev), B)
    return nk.Terms.cat(lst, n_groups)


def _numerics(method):
    """Run a public method with denormals flushed to zero (see nbody_kernels.flush_denormal)."""
    import functools

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with nk.flush_denormal():
            return method(*args, **kwargs)
    return wrapper


class NBodyGP:
    """Exact n-body GP force field of docs/mff.md (2-body, 2+3-body, or many-body kernel).

    Args:
        order: 2 (2-body), 3 (2-body + 3-body, kernel sum), 5 (the non-unique 5-body kernel
            σ² k₃(ρ, ρ')² of eq. 5.30) or "many" (eq. 5.31 on the 3-body kernel); orders 5 and
            "many": exact GP only, cost ∝ (environments of the training frames)².
        cutoff: r_c of the 2-body term, Å.
        cutoff_3body: r_c3 of the 3-body term, Å (default: cutoff); orders 3, 5 and "many".
        cutoff_width: d of the smooth cutoff f_c, Å (0 < d ≤ min(r_c, r_c3)).
        length_scale_2, sigma_2: ℓ₂ (Å) and signal σ₂ (energy unit) of the g₂ prior.
        length_scale_3, sigma_3: ℓ₃ (Å) and signal σ₃ of the g₃ prior (orders 5 and "many": ℓ₃
            is the length scale of the inner 3-body kernel).
        length_scale_many, sigma_many: outer length scale ℓ (dimensionless; order "many") and
            signal σ (orders 5 and "many") of the many-body kernel σ² exp(-d_s²/2ℓ²) or σ² k₃².
        embedding: add the embedding term F^{s_i}(ρ_i) to the local energy (orders 2 and 3).
        density_decay: β of the density ρ_i = Σ_j f_c(r_ij; r_c) exp(-β r_ij), 1/Å (≥ 0).
        length_scale_embedding, sigma_embedding: length scale (units of ρ) and signal (energy
            unit) of the prior σ_ρ² exp(-(ρ - ρ')²/2ℓ_ρ²) of F^s.
        sigma_energy: noise of the energy per atom (energy unit); a total energy of N atoms has
            noise N σ_E.
        sigma_force: noise of a force component (energy unit/Å).
        config_type_sigma: noise levels of frames by configuration type (GAP's
            ``config_type_sigma``; :attr:`gpff.data.Configurations.config_types`): {type: σ_E}
            or {type: (σ_E, σ_F)}, σ_E per atom and σ_F as above, either of a pair None to keep
            the global value. They are fixed: the marginal-likelihood search tunes only the
            global σ_E / σ_F of the other frames. E.g. {"Elastic": 0.001} holds the
            near-equilibrium strained crystals that set the lattice constant and elastic moduli
            to 1 meV/atom while the MD frames keep 5.
        kernel_method: "auto" (default), "grid" or "direct": how the 3-body energy-energy and
            energy-force blocks are computed (exact quadrature or direct sums; they agree to
            ~1e-12, "auto" picks the cheaper).
        device: torch device ("cpu", "cuda").
        progress: show progress bars and messages.

    After :meth:`fit`: ``species`` (element symbols), ``energy_offsets`` (symbol -> e₀),
    ``energy_unit``, ``force_envs`` ((n, 2) training (frame, atom) pairs with force
    observations), ``r_min`` (shortest training distance, Å), ``provenance``.
    """

    kind = "mff"

    def __init__(self, order=2, cutoff: float = 5.0, cutoff_3body: float | None = None,
                 cutoff_width: float = 1.0, length_scale_2: float = 0.5, sigma_2: float = 1.0,
                 length_scale_3: float = 1.0, sigma_3: float = 0.5,
                 length_scale_many: float = 1.0, sigma_many: float = 1.0,
                 embedding: bool = False, density_decay: float = 1.0,
                 length_scale_embedding: float = 0.1, sigma_embedding: float = 0.1,
                 sigma_energy: float = 0.002, sigma_force: float = 0.05,
                 config_type_sigma: dict | None = None,
                 kernel_method: str = "auto", device: str = "cpu", progress: bool = True):
        if order not in ORDERS:
            raise ValueError(f"order must be one of 2, 3, 5, 'many', got {order!r}")
        if not cutoff > 0:
            raise ValueError(f"cutoff must be positive, got {cutoff}")
        r3 = cutoff if cutoff_3body is None else float(cutoff_3body)
        if not r3 > 0:
            raise ValueError(f"cutoff_3body must be positive, got {cutoff_3body}")
        uses3 = order in (3, *MANY_BODY_ORDERS)
        if not 0 < cutoff_width <= min(cutoff, r3 if uses3 else cutoff):
            raise ValueError(f"cutoff_width must be in (0, min(r_c, r_c3)], got {cutoff_width}")
        for name, v in (("length_scale_2", length_scale_2), ("sigma_2", sigma_2),
                        ("length_scale_3", length_scale_3), ("sigma_3", sigma_3),
                        ("length_scale_many", length_scale_many), ("sigma_many", sigma_many),
                        ("length_scale_embedding", length_scale_embedding),
                        ("sigma_embedding", sigma_embedding),
                        ("sigma_energy", sigma_energy), ("sigma_force", sigma_force)):
            if not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be positive, got {v}")
        if embedding and order in MANY_BODY_ORDERS:
            raise ValueError(f"the embedding term is for orders 2 and 3, not {order!r}")
        if not (density_decay >= 0 and math.isfinite(density_decay)):
            raise ValueError(f"density_decay must be non-negative, got {density_decay}")
        if kernel_method not in KERNEL_METHODS:
            raise ValueError(f"kernel_method must be one of {KERNEL_METHODS}, got {kernel_method!r}")
        self.config_type_sigma = _config_type_sigma(config_type_sigma)
        self.order = order
        self.cutoff = float(cutoff)
        self.cutoff_3body = r3 if uses3 else None
        self.cutoff_width = float(cutoff_width)
        self.length_scale_2 = float(length_scale_2)
        self.sigma_2 = float(sigma_2)
        self.length_scale_3 = float(length_scale_3)
        self.sigma_3 = float(sigma_3)
        self.length_scale_many = float(length_scale_many)
        self.sigma_many = float(sigma_many)
        self.embedding = bool(embedding)
        self.density_decay = float(density_decay)
        self.length_scale_embedding = float(length_scale_embedding)
        self.sigma_embedding = float(sigma_embedding)
        self.sigma_energy = float(sigma_energy)
        self.sigma_force = float(sigma_force)
        self.kernel_method = kernel_method
        self.device = torch.device(device)
        self.progress = progress
        self.species: list | None = None
        self.energy_offsets: dict = {}
        self.energy_unit = "eV"
        self.force_envs = np.zeros((0, 2), dtype=int)
        self.r_min = None
        self.density_range = None
        self.provenance: dict = {}
        self._train: _Observations | None = None
        self._alpha = None
        self._lml = None
        self._cache = {}

    # ------------------------------------------------------------------ hyperparameters
    @property
    def hyperparameter_names(self) -> list:
        """Names of the hyperparameters, in the order of the log-hyperparameter vector."""
        if self.order in (2, 3):
            return [n for name, ell, sig in self._additive_kernels() for n in (ell, sig)] + [
                "sigma_energy", "sigma_force"]
        if self.order == 5:
            return ["length_scale_3", "sigma_many", "sigma_energy", "sigma_force"]
        return ["length_scale_3", "length_scale_many", "sigma_many", "sigma_energy", "sigma_force"]

    def log_hyperparameters(self) -> np.ndarray:
        """Current log hyperparameters (see :attr:`hyperparameter_names`)."""
        return np.log([getattr(self, n) for n in self.hyperparameter_names])

    def _set_log_hyperparameters(self, values):
        for n, v in zip(self.hyperparameter_names, np.asarray(values, dtype=float)):
            setattr(self, n, float(np.exp(v)))

    @property
    def hyperparameters(self) -> dict:
        """Hyperparameters (ℓ in Å, σ in the energy unit) and the log marginal likelihood."""
        out = {n: getattr(self, n) for n in self.hyperparameter_names}
        out["log_marginal_likelihood"] = self._lml
        return out

    @property
    def n_species(self) -> int:
        return len(self.species)

    def _additive_kernels(self) -> list:
        """(unit kernel, length-scale name, signal name) of the terms of an order-2/3 kernel."""
        out = [("k2", "length_scale_2", "sigma_2")]
        if self.order == 3:
            out.append(("k3", "length_scale_3", "sigma_3"))
        if self.embedding:
            out.append(("kemb", "length_scale_embedding", "sigma_embedding"))
        return out

    def _densities(self, env, r):
        """Embedding densities ρ (N,) of the atoms of a frame from its pair distances r (P,)
        (differentiable in r), and φ'(r) (P,)."""
        phi, dphi = density_function(r, self.cutoff, self.cutoff_width, self.density_decay)
        rho = torch.zeros(env.n_atoms, dtype=torch.float64, device=r.device).index_add(
            0, torch.as_tensor(env.pair_i, device=r.device), phi)
        return rho, dphi

    # ------------------------------------------------------------------ observations
    def _frame_terms(self, env: FrameEnvironment, e_row, force_atoms, f_row0):
        """Pair and triplet terms of one frame: energy terms (group e_row, or none when None)
        and force terms of the atoms `force_atoms` (groups f_row0, f_row0 + 1, ...)."""
        dev = self.device
        n = self.n_species
        sp = torch.as_tensor(env.species, device=dev)
        out = {}
        mask = np.zeros(env.n_atoms, dtype=bool)
        local = np.full(env.n_atoms, -1, dtype=np.int64)
        if len(force_atoms):
            mask[force_atoms] = True
            local[force_atoms] = np.arange(len(force_atoms))
        local_t = torch.as_tensor(local, device=dev)
        if self.order in (2, 3):
            r, u = env.pair_features(dev)
            f, df = cutoff_function(r, self.cutoff, self.cutoff_width)
            code = nk.pair_code(sp[torch.as_tensor(env.pair_i, device=dev)],
                                sp[torch.as_tensor(env.pair_j, device=dev)], n)
            if e_row is not None:
                out["pairsE"] = nk.Terms(r[:, None], code, torch.full_like(code, e_row), 0, f[:, None])
            if len(force_atoms):
                p, atom, J = pair_jacobian_terms(env, mask, u)
                out["pairsF"] = nk.Terms(r[p, None], code[p], f_row0 + local_t[atom], 0,
                                         -df[p, None] * J, (-f[p, None] * J)[:, :, None])
            if self.embedding:
                jac = (p, atom, J) if len(force_atoms) else None
                out.update(self._embedding_terms(env, r, jac, e_row, f_row0 + local_t))
        if self.order == 3 and env.n_triplets:
            q, code, w, dw, u, _ = self._triplets(env)
            if e_row is not None:
                out["tripE"] = nk.Terms(q, code, torch.full_like(code, e_row), 0, w[:, None])
            if len(force_atoms):
                t, atom, J = triplet_jacobian_terms(env, mask, *u)
                A, B = self._derivative_factors(w, dw, t, J)
                out["tripF"] = nk.Terms(q[t], code[t], f_row0 + local_t[atom], 0, A, B)
        return out

    def _embedding_terms(self, env, r, jac, e_row, f_row):
        """Embedding terms of one frame (pair distances r): the energy functional Σ_i F(ρ_i)
        (group e_row, unless None) and the force functionals -∂/∂R_a Σ_i F(ρ_i) =
        Σ_i (-∂ρ_i/∂R_a) F'(ρ_i) of the atoms a of the pair-Jacobian entries jac = (p, atom, J)
        of :func:`pair_jacobian_terms` (group f_row[a]; none when jac is None). One term per
        (centre i, atom a): the feature ρ_i, derivative weight -∂ρ_i/∂R_a."""
        dev = self.device
        sp = torch.as_tensor(env.species, device=dev)
        pi = torch.as_tensor(env.pair_i, device=dev)
        rho, dphi = self._densities(env, r)
        out = {}
        if e_row is not None:
            out["embE"] = nk.Terms(rho[:, None], sp, torch.full_like(sp, e_row), 0,
                                   torch.ones(env.n_atoms, 1, dtype=torch.float64, device=dev))
        if jac is not None:
            p, atom, J = jac
            key = pi[p] * env.n_atoms + atom                    # (centre, differentiated atom)
            uniq, inv = torch.unique(key, return_inverse=True)
            B = torch.zeros(len(uniq), 3, dtype=torch.float64, device=dev).index_add(
                0, inv, -dphi[p, None] * J)
            centre, a = uniq // env.n_atoms, uniq % env.n_atoms
            out["embF"] = nk.Terms(rho[centre, None], sp[centre], f_row[a], 0,
                                   torch.zeros_like(B), B[:, :, None])
        return out

    def _triplets(self, env: FrameEnvironment):
        """Triplet data of a frame: distances q (T, 3) Å, species code (T,), weight
        w = f_c(r_ij) f_c(r_ik) (T,), ∂w/∂q (T, 3), unit vectors (u_ij, u_ik, u_jk) and the
        centre atom of each triplet (T,)."""
        dev = self.device
        sp = torch.as_tensor(env.species, device=dev)
        q, uij, uik, ujk = env.triplet_features(dev)
        f0, df0 = cutoff_function(q[:, 0], self.cutoff_3body, self.cutoff_width)
        f1, df1 = cutoff_function(q[:, 1], self.cutoff_3body, self.cutoff_width)
        w = f0 * f1
        dw = torch.stack([df0 * f1, f0 * df1, torch.zeros_like(w)], dim=1)
        ti = torch.as_tensor(env.trip_i, device=dev)
        code = nk.triple_code(sp[ti], sp[torch.as_tensor(env.trip_j, device=dev)],
                              sp[torch.as_tensor(env.trip_k, device=dev)], self.n_species)
        return q, code, w, dw, (uij, uik, ujk), ti

    @staticmethod
    def _derivative_factors(w, dw, t, J):
        """Factors A (E, 3), B (E, 3 components, 3 distances) of the functional -∂(w g₃)/∂x of
        the entries (triplet t, J = ∂q_t/∂x (E, 3 distances, 3 components))."""
        A = -torch.einsum("em,ema->ea", dw[t], J)
        B = -w[t, None, None] * J.transpose(1, 2)
        return A, B

    def _observations(self, envs, energy_frames, force_index) -> _Observations:
        """Observation terms: one energy row per frame in `energy_frames`, three force rows per
        (frame, atom) in `force_index`."""
        obs = _Observations()
        obs.envs = envs
        obs.energy_frames = np.asarray(energy_frames, dtype=int)
        obs.force_index = np.asarray(force_index, dtype=int).reshape(-1, 2)
        obs.n_E = len(obs.energy_frames)
        obs.n_F = len(obs.force_index)
        obs.n_atoms_E = np.array([envs[c].n_atoms for c in obs.energy_frames], dtype=float)
        if self.order in MANY_BODY_ORDERS:
            return obs
        e_row = {int(c): k for k, c in enumerate(obs.energy_frames)}
        parts = {"pairsE": [], "pairsF": [], "tripE": [], "tripF": [], "embE": [], "embF": []}
        f_row = 0
        for c, env in enumerate(envs):
            atoms = obs.force_index[obs.force_index[:, 0] == c, 1]
            if c not in e_row and not len(atoms):
                continue
            t = self._frame_terms(env, e_row.get(c), atoms, f_row)
            f_row += len(atoms)
            for k, v in t.items():
                parts[k].append(v)
        dev = self.device

        # force rows were numbered frame by frame in force_index order within a frame: reorder
        # force_index to match (frame-major, as collected)
        order = np.lexsort((np.arange(obs.n_F), obs.force_index[:, 0]))
        obs.force_index = obs.force_index[order]
        obs.pairsE = _cat_terms(parts["pairsE"], obs.n_E, 1, 1, False, dev)
        obs.pairsF = _cat_terms(parts["pairsF"], obs.n_F, 1, 3, True, dev)
        obs.tripE = _cat_terms(parts["tripE"], obs.n_E, 3, 1, False, dev)
        obs.tripF = _cat_terms(parts["tripF"], obs.n_F, 3, 3, True, dev)
        obs.embE = _cat_terms(parts["embE"], obs.n_E, 1, 1, False, dev)
        obs.embF = _cat_terms(parts["embF"], obs.n_F, 1, 3, True, dev)
        return obs

    # ------------------------------------------------------------------ grids
    def _grid2(self, ell_value):
        m = nk.MARGIN_ELLS * ell_value
        return nk.Grid(-m, self.cutoff + GRID2_EXTENSION + m, ell_value, nk.POINTS_PER_ELL_2,
                       self.device)

    def _grid3(self, ell_value):
        return nk.Grid3(self._fmin3 - GRID3_EXTENSION, self.cutoff_3body, 2 * self.cutoff_3body,
                        ell_value, nk.POINTS_PER_ELL_3, self.device)

    # ------------------------------------------------------------------ kernel blocks
    @staticmethod
    def _kernel1(X: _Observations, Y: _Observations | None, terms: str, codes, grid, ell):
        """Unit kernel of a 1-D function (g₂: terms "pairs"; F: "emb") between the observations
        of X and Y (Y None: X with itself), by the grid rows (n_rows, n_codes G) of each."""
        def design(obs):
            parts = [nk.design2(getattr(obs, terms + kind), codes, grid, ell)
                     for kind, n in (("E", obs.n_E), ("F", obs.n_F)) if n]
            return torch.cat(parts)
        PX = design(X)
        PY = PX if Y is None else design(Y)
        return grid.weight(ell) * (PX @ PY.T)

    def _kernel2(self, X: _Observations, Y: _Observations | None, ell, ell_value):
        """Unit 2-body kernel between the observations of X and Y (Y None: X with itself)."""
        return self._kernel1(X, Y, "pairs", self._pair_codes, self._grid2(ell_value), ell)

    def _grid_embedding(self, lo: float, hi: float, ell_value):
        """Quadrature grid of the embedding kernel, exact for densities in [lo, hi]."""
        m = nk.MARGIN_ELLS * ell_value
        return nk.Grid(lo - m, hi + m, ell_value, nk.POINTS_PER_ELL_2, self.device)

    @staticmethod
    def _density_range(*obs):
        """(min, max) of the densities ρ in the embedding terms of `obs` ((0, 0) if none)."""
        q = [t.q for o in obs for t in (o.embE, o.embF) if t.n_terms]
        if not q:
            return 0.0, 0.0
        return min(float(x.min()) for x in q), max(float(x.max()) for x in q)

    def _kernel_emb(self, X: _Observations, Y: _Observations | None, ell, ell_value):
        """Unit embedding kernel Σ Σ' ∂∂' exp(-(ρ - ρ')²/2ℓ_ρ²) between the observations of X
        and Y (Y None: X with itself); F^s independent per centre species s."""
        grid = self._grid_embedding(*self._density_range(X, *(() if Y is None else (Y,))),
                                    ell_value)
        return self._kernel1(X, Y, "emb", list(range(self.n_species)), grid, ell)

    def _chunk_rows(self, size: int) -> int:
        """Rows per chunk of 3-body embeddings Z, S Z (two chunks of both are kept at once,
        together at most GRID3_MAX_ELEMENTS)."""
        return max(3, int(GRID3_MAX_ELEMENTS // (4.0 * size * max(1, len(self._tri_codes)))))

    def _method3(self, TX, TY, size: int) -> str:
        """"grid" or "direct" for the 3-body block between term sets TX and TY (cost model in
        seconds on one CPU core, and exactness)."""
        fmin = min([float(t.q.min()) for t in (TX, TY) if t.n_terms] + [np.inf])
        if fmin < self._fmin3 - GRID3_EXTENSION:      # outside the exact range of the grid
            return "direct"
        if self.kernel_method != "auto":
            return self.kernel_method
        G3 = float(size) * len(self._tri_codes)
        forces = int(TX.B is not None) + int(TY.B is not None)
        # direct sums: 6 permutations × (an exponential + (1, 4, 20) rank-one factors) per pair
        # of terms; calibrated on mlearn Si and Ni19 (one core)
        rank = (1, 4, 20)[forces] * TX.c * TY.c
        direct = 6.0 * TX.n_terms * TY.n_terms * (3e-9 + rank * 2 / 3e10)
        # grid: Z, S Z of TY chunk by chunk, Z of TX once per chunk (batched GEMMs, inefficient
        # below ~128 terms per group), then one GEMM
        chunks = math.ceil(TY.n_rows / self._chunk_rows(size))

        def embed(T):
            per_group = max(T.n_terms / max(T.n_groups, 1), 128.0)
            return T.n_groups * per_group * G3 * (18 if T.B is not None else 2) / 1e10

        grid = embed(TY) + chunks * embed(TX) + TX.n_rows * TY.n_rows * G3 * 2 / 3e10
        return "grid" if grid < direct else "direct"

    def _embeddings(self, terms, grid, ell, g0: int, g1: int):
        """Z and S Z of the groups g0..g1 of 3-body `terms`: two ((g1 - g0) c, n_tri · size)."""
        G3 = grid.size * len(self._tri_codes)
        c = terms.c
        step = max(1, int(GRID3_CHUNK_ELEMENTS // (G3 * c)))
        Z = torch.zeros((g1 - g0) * c, G3, dtype=torch.float64, device=self.device) * ell
        SZ = torch.zeros_like(Z)
        for a in range(g0, g1, step):
            b = min(g1, a + step)
            z = nk.embed3(terms.groups_slice(a, b), self._tri_codes, grid, ell)
            Z[(a - g0) * c:(b - g0) * c] = z.reshape((b - a) * c, -1)
            SZ[(a - g0) * c:(b - g0) * c] = nk.symmetrize3(
                z, self._tri_codes, self.n_species).reshape((b - a) * c, -1)
        return Z, SZ

    def _grid_block(self, TX, TY, grid, ell, emb):
        """Z_X S Z_Yᵀ (TX.n_rows, TY.n_rows) for 3-body term sets (TY None: TX with itself),
        chunk by chunk of groups; emb(terms, g0, g1) → (Z, S Z) (cached)."""
        sym = TY is None
        TY = TX if sym else TY
        gx = max(1, self._chunk_rows(grid.size) // TX.c)
        gy = max(1, self._chunk_rows(grid.size) // TY.c)
        cols = []
        for c0 in range(0, TY.n_groups, gy):
            ZY, SZY = emb(TY, c0, min(TY.n_groups, c0 + gy))
            if sym and gx >= TX.n_groups:
                cols.append(ZY @ SZY.T)
                continue
            cols.append(torch.cat([emb(TX, g0, min(TX.n_groups, g0 + gx))[0] @ SZY.T
                                   for g0 in range(0, TX.n_groups, gx)], 0))
        return torch.cat(cols, 1)

    def _kernel3(self, X: _Observations, Y: _Observations | None, ell, ell_value):
        """Unit 3-body kernel between the observations of X and Y (Y None: X with itself).

        Each block (energy-energy, energy-force, force-force) by exact quadrature on the box grid
        (embeddings kept for at most GRID3_MAX_ELEMENTS at a time) or by direct sums, whichever
        the cost model of :meth:`_method3` finds cheaper."""
        sym = Y is None
        Y = X if sym else Y
        n = self.n_species
        grid = self._grid3(ell_value)
        w3 = grid.weight(ell) ** 3
        pbar = (lambda it: tqdm(it, desc="3-body force-force", leave=False)) if self.progress else None
        cache = {}

        def emb(terms, g0, g1):
            """(Z, S Z) of groups g0..g1 of terms (the last chunk is kept: EE then EF reuse it)."""
            key = (id(terms), g0, g1)
            if key not in cache:
                cache.clear()
                cache[key] = self._embeddings(terms, grid, ell, g0, g1)
            return cache[key]

        def block(TX, TY, symmetric, progress=None):
            if self._method3(TX, TY, grid.size) == "grid":
                return w3 * self._grid_block(TX, None if symmetric else TY, grid, ell, emb)
            return nk.direct3(TX, None if symmetric else TY, ell, n, symmetric=symmetric,
                              progress=progress)

        top, bottom = [], []
        if X.n_E and Y.n_E:
            top.append(block(X.tripE, Y.tripE, sym))
        EF = None
        if X.n_E and Y.n_F:
            if self._method3(X.tripE, Y.tripF, grid.size) == "grid":
                # S Z of the energies kept, the force embeddings streamed (not stored)
                step = max(1, self._chunk_rows(grid.size))
                EF = w3 * torch.cat([
                    nk.grid_cross3(emb(X.tripE, g0, min(X.n_E, g0 + step))[1], self._tri_codes,
                                   Y.tripF, grid, ell) for g0 in range(0, X.n_E, step)], 0)
            else:
                EF = nk.direct3(X.tripE, Y.tripF, ell, n)
            top.append(EF)
        if X.n_F and Y.n_E:
            bottom.append(EF.T if sym else block(Y.tripE, X.tripF, False).T)
        if X.n_F and Y.n_F:
            bottom.append(block(X.tripF, Y.tripF, sym, pbar))
        rows = [torch.cat(r, 1) for r in (top, bottom) if r]
        if not rows:
            return torch.zeros(X.n_rows, Y.n_rows, dtype=torch.float64, device=self.device) * ell
        return torch.cat(rows, 0)

    def _unit_kernel(self, name, X, Y, ell_value, tangents=False):
        """Unit kernel "k2", "k3" or "kemb" between X and Y (Y None: X with itself) at length scale
        `ell_value`, and dK/dlog ℓ by forward-mode AD when `tangents`."""
        fn = {"k2": self._kernel2, "k3": self._kernel3, "kemb": self._kernel_emb}[name]
        ell = torch.tensor(ell_value, dtype=torch.float64, device=self.device)
        if not tangents:
            with torch.no_grad():
                return fn(X, Y, ell, ell_value), None
        with torch.no_grad(), fwAD.dual_level():
            dual = fwAD.make_dual(ell, ell.clone())                # d ℓ / d log ℓ = ℓ
            K, dK = fwAD.unpack_dual(fn(X, Y, dual, ell_value))
        return K.clone(), (torch.zeros_like(K) if dK is None else dK.clone())

    def _prior_kernel(self, X, Y=None):
        """Noise-free prior covariance Σ σ² K_unit of the additive kernel (orders 2, 3) between
        the observations of X and Y (Y None: X with itself)."""
        return sum(getattr(self, sig) ** 2 * self._unit_kernel(name, X, Y, getattr(self, ell))[0]
                   for name, ell, sig in self._additive_kernels())

    def _noise_diag(self, obs, sigma_energy, sigma_force):
        """Diagonal noise variances of the rows of `obs`: (N σ_E)² per energy row, σ_F² per force
        row, with the σ of the row's config type where :attr:`config_type_sigma` sets one."""
        dev = self.device

        def per_row(sigma, typed, n):
            s = torch.ones(n, dtype=torch.float64, device=dev) * sigma
            if typed is None:
                return s
            typed = torch.as_tensor(typed, dtype=torch.float64, device=dev)
            return torch.where(torch.isnan(typed), s, typed)

        e = torch.as_tensor(obs.n_atoms_E, dtype=torch.float64, device=dev) * per_row(
            sigma_energy, obs.energy_noise, obs.n_E)
        f = per_row(sigma_force, obs.force_noise, obs.n_F).repeat_interleave(3)
        return torch.cat([e * e, f * f])

    # ------------------------------------------------------------------ many-body kernel
    # A local kernel h(u_ij) of the 3-body kernel of two environments, summed over the
    # environments of a total energy E = Σ_i ε_i, gives Cov(E_A, E_B) = S = Σ_{i∈A, j∈B} h(u_ij)
    # with k_ij = k₃(ρ_i, ρ_j), n_i = k₃(ρ_i, ρ_i), m_j = k₃(ρ_j, ρ_j) and
    #   eq. 5.31 (order "many"): h = exp, u_ij = (2 k_ij - n_i - m_j)/2ℓ²
    #   eq. 5.30 (order 5):      h(u) = u², u_ij = k_ij
    # With D_x = -∂/∂x (a force or virial component) the chain rule gives
    #   D_x S     = Σ h'(u_ij) D_x u_ij          (D_x u_ij = (D_x k_ij - ½ D_x n_i)/ℓ², or D_x k_ij)
    #   D_x D_y S = Σ h''(u_ij) D_x u_ij D_y u_ij + h'(u_ij) D_x D_y u_ij
    # so every entry follows from 3-body covariances of the local energies of single
    # environments and of their derivatives: one 3-body kernel (NBodyGP._kernel3, grid or direct
    # sums) between environment-resolved functionals (:meth:`_local_functionals`), then a cheap
    # combination per frame pair (:meth:`_many_combine`). No automatic differentiation through
    # triplet pairs, so memory stays at the 3-body kernel's.

    def _local_functionals(self, envs, coords: dict) -> _LocalFunctionals:
        """Environment-resolved 3-body functionals of the frames in `coords` (frame → list of
        differentiated coordinate triples: atom indices, and n_atoms / n_atoms + 1 for the normal /
        shear strain components of the virial)."""
        dev = self.device
        L = _LocalFunctionals()
        Es, Fs = [], []
        nE = nF = 0
        f_groups = {}
        for c, xs in coords.items():
            env = envs[c]
            n, nx = env.n_atoms, len(xs)
            L.frames.append(c)
            L.e_rows[c] = torch.arange(nE, nE + n, device=dev)
            f_groups[c] = nF + torch.arange(n * nx, device=dev).reshape(n, nx)
            if env.n_triplets:
                q, code, w, dw, u, ti = self._triplets(env)
                Es.append(nk.Terms(q, code, nE + ti, 0, w[:, None]))
                local = torch.full((n + 2,), -1, dtype=torch.long, device=dev)
                local[torch.as_tensor(list(xs), dtype=torch.long, device=dev)] = torch.arange(nx, device=dev)
                atoms = [x for x in xs if x < n]
                if atoms:
                    mask = np.zeros(n, dtype=bool)
                    mask[atoms] = True
                    t, atom, J = triplet_jacobian_terms(env, mask, *u)
                    A, B = self._derivative_factors(w, dw, t, J)
                    Fs.append(nk.Terms(q[t], code[t], nF + ti[t] * nx + local[atom], 0, A, B))
                if n in xs or n + 1 in xs:
                    t = torch.arange(len(q), device=dev)
                    J = triplet_strain_terms(q, *u)
                    for s in (0, 1):
                        if n + s in xs:
                            A, B = self._derivative_factors(w, dw, t, J[:, s])
                            Fs.append(nk.Terms(q, code, nF + ti * nx + local[n + s], 0, A, B))
            nE += n
            nF += n * nx
        three = torch.arange(3, device=dev)
        L.f_rows = {c: nE + 3 * g[..., None] + three for c, g in f_groups.items()}
        L.obs.n_E, L.obs.n_F = nE, nF
        L.obs.tripE = _cat_terms(Es, nE, 3, 1, False, dev)
        L.obs.tripF = _cat_terms(Fs, nF, 3, 3, True, dev)
        return L

    @staticmethod
    def _local_self(L: _LocalFunctionals, K) -> dict:
        """frame → (n_i (n_env,), D_x n_i (n_env, n_x, 3)) from a 3-body kernel K between all
        functionals of L (rows) and the local energies of L (columns)."""
        out = {}
        for c in L.frames:
            e = L.e_rows[c]
            out[c] = (K[e, e], 2.0 * K[L.f_rows[c], e[:, None, None]])
        return out

    def _local_self_terms(self, L: _LocalFunctionals, ell3: float):
        """:meth:`_local_self` of L at ℓ₃ from the 3-body kernel of L against its local energies
        (None for order 5, which needs no self terms)."""
        if self.order == 5:
            return None
        return self._local_self(L, self._unit_kernel("k3", L.obs, L.energies, ell3)[0])

    @staticmethod
    def _many_coords(rows: dict) -> dict:
        """frame → differentiated coordinates, in the order of the frame's force rows (rows:
        :meth:`_many_rows`)."""
        return {c: [atom for atom, _ in rows["F"].get(c, [])]
                for c in sorted(set(rows["E"]) | set(rows["F"]))}

    def _many_combine(self, LX, LY, K, selfX, selfY, rowsX, rowsY, shape, ellm, symmetric):
        """Unit many-body kernel (shape) between observations with rows rowsX, rowsY (see
        :meth:`_many_rows`) from the 3-body kernel K between the functionals of LX and LY and
        their self terms (the formulas above; None for order 5); `symmetric`: X with itself
        (upper frame pairs, mirrored). K and ellm may carry forward-mode tangents."""
        dev = self.device
        power = self.order == 5
        il2 = 1.0 if power else 1.0 / (ellm * ellm)
        rows, cols, vals = [], [], []

        def put(r, c, v):
            rows.append(r.reshape(-1))
            cols.append(c.reshape(-1))
            vals.append(v.reshape(-1))

        three = torch.arange(3, device=dev)

        def frow(F, c):
            """(n_x, 3) observation rows of the force (or virial) rows of frame c."""
            return torch.tensor([r for _, r in F[c]], device=dev)[:, None] + three

        for a in LX.frames:
            eA = LX.e_rows[a]
            nA, DnA = (None, None) if power else selfX[a]
            rA = rowsX["E"].get(a)
            fa = a in rowsX["F"]
            oA = frow(rowsX["F"], a) if fa else None
            for b in LY.frames:
                if symmetric and b < a:
                    continue
                eB = LY.e_rows[b]
                nB, DnB = (None, None) if power else selfY[b]
                rB = rowsY["E"].get(b)
                fb = b in rowsY["F"]
                oB = frow(rowsY["F"], b) if fb else None
                k = K[eA[:, None], eB[None, :]]
                if power:
                    h0, h1, h2 = k * k, 2.0 * k, torch.full_like(k, 2.0)
                else:
                    h0 = h1 = h2 = torch.exp((2.0 * k - nA[:, None] - nB[None, :]) * (0.5 * il2))
                blocks = []
                if rA is not None and rB is not None:
                    blocks.append((torch.tensor(rA, device=dev), torch.tensor(rB, device=dev), h0.sum()))
                if fa:                                                            # (i, x, α, j)
                    DuA = K[LX.f_rows[a][..., None], eB]
                    if not power:
                        DuA = (DuA - 0.5 * DnA[..., None]) * il2
                if fb:                                                            # (i, j, y, β)
                    DuB = K[eA[:, None, None, None], LY.f_rows[b][None]]
                    if not power:
                        DuB = (DuB - 0.5 * DnB[None]) * il2
                if fa and rB is not None:
                    blocks.append((oA, torch.tensor(rB, device=dev).expand(oA.shape),
                                   torch.einsum("ij,ixaj->xa", h1, DuA)))
                if fb and rA is not None:
                    blocks.append((torch.tensor(rA, device=dev).expand(oB.shape), oB,
                                   torch.einsum("ij,ijyb->yb", h1, DuB)))
                if fa and fb:
                    kFF = K[LX.f_rows[a][:, :, :, None, None, None], LY.f_rows[b][None, None, None]]
                    v = (torch.einsum("ij,ixaj,ijyb->xayb", h2, DuA, DuB)
                         + torch.einsum("ij,ixajyb->xayb", h1, kFF) * il2)
                    blocks.append((oA[:, :, None, None].expand(v.shape), oB[None, None].expand(v.shape), v))
                for r, c, v in blocks:
                    put(r, c, v)
                    if symmetric and b != a:
                        put(c, r, v)
        M = torch.zeros(shape, dtype=torch.float64, device=dev)
        if not vals:
            return M * il2
        return M.index_put((torch.cat(rows), torch.cat(cols)), torch.cat(vals), accumulate=True)

    def _many_kernel(self, X: _Observations, Y: _Observations | None, ell3: float, ellm: float,
                     tangents: bool = False):
        """Unit many-body kernel (eq. 5.31, or eq. 5.30 for order 5; σ = 1) between the
        observations of X and Y (Y None: X with itself; Y is not None: Y must be the training
        observations) at ℓ₃, ℓ (ℓ unused by order 5).

        Returns:
            K (X.n_rows, Y.n_rows); with `tangents` (X with itself only) (K, [dK/dlog ℓ₃,
            dK/dlog ℓ]) by forward-mode AD (order 5: (K, [dK/dlog ℓ₃])).
        """
        dev = self.device
        sym = Y is None
        rowsX = self._many_rows(X)
        LX = self._local_functionals(X.envs, self._many_coords(rowsX))
        shape = (X.n_rows, X.n_rows if sym else Y.n_rows)
        em = torch.tensor(ellm, dtype=torch.float64, device=dev)
        if sym:
            K, dK = self._unit_kernel("k3", LX.obs, None, ell3, tangents=tangents)

            def combine(K, em):
                S = None if self.order == 5 else self._local_self(LX, K)
                return self._many_combine(LX, LX, K, S, S, rowsX, rowsX, shape, em, True)

            if not tangents:
                return combine(K, em)
            with torch.no_grad(), fwAD.dual_level():      # d/dlog ℓ₃ through K's tangent
                M, d3 = fwAD.unpack_dual(combine(fwAD.make_dual(K, dK), em))
                M, d3 = M.clone(), d3.clone()
            if self.order == 5:
                return M, [d3]
            with torch.no_grad(), fwAD.dual_level():      # d ℓ / d log ℓ = ℓ
                dm = fwAD.unpack_dual(combine(K, fwAD.make_dual(em, em.clone())))[1].clone()
            return M, [d3, dm]
        LY, rowsY, selfY = self._many_train_local(ell3)
        with torch.no_grad():
            K = self._unit_kernel("k3", LX.obs, LY.obs, ell3)[0]
            return self._many_combine(LX, LY, K, self._local_self_terms(LX, ell3), selfY, rowsX,
                                      rowsY, shape, em, False)

    def _many_train_local(self, ell3: float):
        """(functionals, rows, self terms (None for order 5)) of the training observations at
        ℓ₃ (cached)."""
        key = ("many-local", ell3)
        if key not in self._cache:
            self._cache = {k: x for k, x in self._cache.items() if k[0] != "many-local"}
            rows = self._many_rows(self._train)
            L = self._local_functionals(self._train.envs, self._many_coords(rows))
            self._cache[key] = (L, rows, self._local_self_terms(L, ell3))
        return self._cache[key]

    @staticmethod
    def _many_rows(obs):
        E = {int(c): k for k, c in enumerate(obs.energy_frames)}
        F = {}
        for k, (c, atom) in enumerate(obs.force_index):
            F.setdefault(int(c), []).append((int(atom), obs.n_E + 3 * k))
        return {"E": E, "F": F}

    # ------------------------------------------------------------------ the joint matrix
    def _covariance(self, log_hp: torch.Tensor | None):
        """Noisy training covariance C(θ) (differentiable in θ = log hyperparameters if given)."""
        obs = self._train
        names = self.hyperparameter_names
        if log_hp is None:
            log_hp = torch.as_tensor(self.log_hyperparameters(), dtype=torch.float64, device=self.device)
        v = {n: torch.exp(log_hp[k]) for k, n in enumerate(names)}
        need = log_hp.requires_grad
        K = 0.0
        if self.order == 5:
            terms = [("many", ("length_scale_3",), "sigma_many")]
        elif self.order == "many":
            terms = [("many", ("length_scale_3", "length_scale_many"), "sigma_many")]
        else:
            terms = [(name, (ell,), sig) for name, ell, sig in self._additive_kernels()]
        for name, keys, sig in terms:
            ells = tuple(float(v[key].detach()) for key in keys)
            ckey = (name, ells, need)
            if ckey not in self._cache:
                self._cache = {k: x for k, x in self._cache.items() if k[0] != name}
                if name == "many":
                    built = self._many_kernel(obs, None, ells[0], self.length_scale_many
                                              if len(ells) == 1 else ells[1], tangents=need)
                    self._cache[ckey] = built if need else (built, None)
                else:
                    Kt, dK = self._unit_kernel(name, obs, None, ells[0], tangents=need)
                    self._cache[ckey] = (Kt, [dK])
            Kt, dKs = self._cache[ckey]
            if need:
                log_ells = torch.stack([log_hp[names.index(key)] for key in keys])
                Kn = _LengthScaleKernel.apply(log_ells, lambda Kt=Kt, dKs=dKs: (Kt, dKs))
            else:
                Kn = Kt
            K = K + v[sig] ** 2 * Kn
        D = self._noise_diag(obs, v["sigma_energy"], v["sigma_force"])
        return K + torch.diag(D)

    def _lml_from_C(self, C, y):
        L, info = torch.linalg.cholesky_ex(C)
        if int(info) != 0:
            raise TrainingError(f"kernel matrix is not positive definite (leading minor {int(info)}) "
                                f"at {self.hyperparameters}; increase sigma_energy/sigma_force")
        a = torch.cholesky_solve(y[:, None], L)[:, 0]
        n = y.numel()
        lml = -0.5 * (y * a).sum() - torch.log(torch.diagonal(L)).sum() - 0.5 * n * math.log(2 * math.pi)
        return lml, L, a

    @_numerics
    def log_marginal_likelihood(self, log_hyperparameters=None) -> torch.Tensor:
        """Log marginal likelihood log p(y | X, θ) of the training data of the last fit (eqs. 5.4,
        5.33): -½ yᵀC⁻¹y - ½ log|C| - n/2 log 2π with C the noisy joint energy/force matrix.

        Args:
            log_hyperparameters: None (the current hyperparameters; the stored value of the last
                fit) or a torch tensor θ of log hyperparameters in the order of
                :attr:`hyperparameter_names`; the result is differentiable with respect to θ.
        Returns:
            0-dim float64 tensor.
        Raises:
            TrainingError: not fitted, or C not positive definite at θ.
        """
        if self._train is None:
            raise TrainingError("model is not trained: call fit() first")
        if log_hyperparameters is None:
            return torch.tensor(self._lml, dtype=torch.float64)
        theta = torch.as_tensor(log_hyperparameters, dtype=torch.float64).to(self.device)
        if theta.shape != (len(self.hyperparameter_names),):
            raise ValueError(f"expected {len(self.hyperparameter_names)} log hyperparameters "
                             f"({', '.join(self.hyperparameter_names)}), got shape {tuple(theta.shape)}")
        C = self._covariance(theta)
        return self._lml_from_C(C, self._y)[0]

    # ------------------------------------------------------------------ training
    def _prepare(self, configs: Configurations, n_envs, seed):
        """Neighbour lists, one-body offsets, observation terms and targets of `configs`."""
        if not isinstance(configs, Configurations):
            raise TypeError("fit expects gpff.data.Configurations (gpff.data.load_configurations)")
        configs.validate()
        where = configs.path or "<configurations>"
        self.species = configs.species
        self.energy_unit = configs.energy_unit
        envs = frame_environments(configs.frames, self.species, self.cutoff, self.cutoff_3body,
                                  where)
        n = self.n_species
        counts = np.array([np.bincount(e.species, minlength=n) for e in envs], dtype=float)
        if configs.energies is not None:
            e0, *_ = np.linalg.lstsq(counts, configs.energies, rcond=None)
            energy_frames = np.arange(len(envs))
        else:
            e0 = np.zeros(n)
            energy_frames = np.zeros(0, dtype=int)
        self.energy_offsets = {s: float(v) for s, v in zip(self.species, e0)}
        self._e0 = np.asarray(e0, dtype=float)
        # force environments
        if configs.forces is not None:
            all_envs = np.array([(c, a) for c, e in enumerate(envs) for a in range(e.n_atoms)], dtype=int)
            if n_envs is not None and int(n_envs) < len(all_envs):
                if int(n_envs) < 0:
                    raise ValueError(f"n_envs must be non-negative, got {n_envs}")
                pick = np.random.default_rng(seed).choice(len(all_envs), int(n_envs), replace=False)
                all_envs = all_envs[np.sort(pick)]
            force_index = all_envs
        else:
            force_index = np.zeros((0, 2), dtype=int)
        if len(energy_frames) + len(force_index) == 0:
            raise DatasetError(f"{where}: no observations (no energies and n_envs = 0)")
        obs = self._observations(envs, energy_frames, force_index)
        if self.config_type_sigma:
            types = configs.config_types
            sig = np.array([self.config_type_sigma.get(t, (None, None)) for t in types],
                           dtype=float).reshape(-1, 2)          # None -> NaN: the global σ
            obs.energy_noise = sig[obs.energy_frames, 0]
            obs.force_noise = sig[obs.force_index[:, 0], 1]
        self.force_envs = obs.force_index.copy()
        self.density_range = self._density_range(obs) if self.embedding else None
        # shortest training distance and the species in use
        rmin = np.inf
        for e in envs:
            if e.n_pairs:
                d = e.positions[e.pair_j] - e.positions[e.pair_i] + e.pair_S @ e.cell
                rmin = min(rmin, float(np.linalg.norm(d, axis=1).min()))
        self.r_min = None if not np.isfinite(rmin) else rmin
        self._pair_codes = sorted({int(nk.pair_code(a, b, n)) for a in range(n) for b in range(a, n)})
        if self.order in (3, *MANY_BODY_ORDERS):
            present = set()
            fmin = np.inf
            for e in envs:
                if e.n_triplets:
                    s = e.species
                    present |= set(np.unique(nk.triple_code(s[e.trip_i], s[e.trip_j], s[e.trip_k], n)).tolist())
            if self.order == 3 and obs.tripE is not None and obs.tripE.n_terms + obs.tripF.n_terms:
                fmin = float(min([t.q.min() for t in (obs.tripE, obs.tripF) if t.n_terms]))
            self._tri_codes = nk.triple_closure(present, n)
            self._fmin3 = fmin if np.isfinite(fmin) else (self.r_min or 1.0)
        else:
            self._tri_codes = []
            self._fmin3 = 1.0
        # targets
        yE = np.zeros(0) if configs.energies is None else configs.energies - counts @ e0
        yF = (np.array([configs.forces[c][a] for c, a in obs.force_index]).reshape(-1)
              if len(obs.force_index) else np.zeros(0))
        self._y = torch.as_tensor(np.concatenate([yE, yF]), dtype=torch.float64, device=self.device)
        self._train = obs
        self._cache = {}
        self._configs_info = {"train_file": os.path.basename(configs.path) if configs.path else "",
                              "train_sha256": configs.sha256,
                              "train_indices": None if configs.indices is None else configs.indices.tolist(),
                              "n_train_frames": len(envs), "n_train_atoms": configs.n_atoms_total,
                              "n_energies": int(obs.n_E), "n_force_envs": int(obs.n_F),
                              "n_observations": int(obs.n_rows), "n_envs_seed": int(seed)}

    def _solve(self):
        """Cholesky solve at the current hyperparameters; posterior-mean representations."""
        t0 = time.perf_counter()
        C = self._covariance(None)
        _log(self.progress, f"Cholesky solve of the {C.shape[0]}x{C.shape[0]} kernel matrix")
        lml, L, a = self._lml_from_C(C, self._y)
        del C
        self._L = L
        self._alpha = a
        self._lml = float(lml)
        self._build_means()
        return time.perf_counter() - t0

    def _build_means(self):
        """θ̄ of g₂ and g₃ on their quadrature grids and the contracted terms for direct sums."""
        obs = self._train
        aE = self._alpha[:obs.n_E, None]
        aF = self._alpha[obs.n_E:].reshape(obs.n_F, 3)
        dev = self.device
        self._means = {}
        if self.order in MANY_BODY_ORDERS:
            return
        with torch.no_grad():
            mean2 = self._contract(obs.pairsE, aE, obs.pairsF, aF)
            ell2 = torch.tensor(self.length_scale_2, dtype=torch.float64, device=dev)
            g2 = self._grid2(self.length_scale_2)
            Phi = sum((nk.design2(t, self._pair_codes, g2, ell2) for t in mean2),
                      torch.zeros(1, len(self._pair_codes) * g2.n, dtype=torch.float64, device=dev))
            theta2 = self.sigma_2 ** 2 * g2.weight(ell2) * Phi.reshape(len(self._pair_codes), g2.n)
            fmin2 = self.r_min if self.r_min is not None else 0.0
            self._means["2"] = {"terms": mean2, "theta": theta2, "grid": g2,
                                "range": g2.exact_range(fmin2, self.cutoff, self.length_scale_2)}
            if self.order == 3:
                mean3 = self._contract(obs.tripE, aE, obs.tripF, aF)
                ell3 = torch.tensor(self.length_scale_3, dtype=torch.float64, device=dev)
                g3 = self._grid3(self.length_scale_3)
                theta3 = None
                if g3.size * max(1, len(self._tri_codes)) <= GRID3_MEAN_MAX_ELEMENTS:
                    Z = sum((nk.embed3(t, self._tri_codes, g3, ell3) for t in mean3),
                            torch.zeros(1, len(self._tri_codes), *g3.shape,
                                        dtype=torch.float64, device=dev))
                    theta3 = (self.sigma_3 ** 2 * g3.weight(ell3) ** 3
                              * nk.symmetrize3(Z, self._tri_codes, self.n_species)[0])
                self._means["3"] = {"terms": mean3, "theta": theta3, "grid": g3,
                                    "range": g3.exact_range(self._fmin3, 2 * self.cutoff_3body,
                                                            self.length_scale_3)}
            if self.embedding:
                meanF = self._contract(obs.embE, aE, obs.embF, aF)
                ellF = torch.tensor(self.length_scale_embedding, dtype=torch.float64, device=dev)
                lo, hi = self.density_range
                gF = self._grid_embedding(lo, hi + GRID_EMBEDDING_EXTENSION * (hi - lo),
                                          self.length_scale_embedding)
                codes = list(range(self.n_species))
                Phi = sum((nk.design2(t, codes, gF, ellF) for t in meanF),
                          torch.zeros(1, len(codes) * gF.n, dtype=torch.float64, device=dev))
                thetaF = (self.sigma_embedding ** 2 * gF.weight(ellF)
                          * Phi.reshape(len(codes), gF.n))
                self._means["emb"] = {"terms": meanF, "theta": thetaF, "grid": gF,
                                      "range": gF.exact_range(lo, hi, self.length_scale_embedding)}

    @staticmethod
    def _contract(TE, aE, TF, aF):
        """The posterior-mean functional Σ_rows α_row L_row as single-group terms: a list with
        the energy terms (no derivative part) and the force terms."""
        parts = []
        if TE is not None and TE.n_terms:
            parts.append(nk.contract_components(TE, aE))
        if TF is not None and TF.n_terms:
            parts.append(nk.contract_components(TF, aF))
        return parts

    def _check_config_types(self, configs: Configurations):
        """Raise DatasetError when :attr:`config_type_sigma` names a type no frame has."""
        if not self.config_type_sigma:
            return
        have = sorted({t for t in configs.config_types or () if t is not None})
        missing = sorted(set(self.config_type_sigma) - set(have))
        if missing:
            raise DatasetError(f"{configs.path or '<configurations>'}: config_type_sigma names "
                               f"config type(s) {missing} that no frame has (the frames' "
                               f"info['config_type']: {have or 'none'})")

    @_numerics
    def fit(self, configs: Configurations, n_envs: int | None = None, seed: int = 0) -> "NBodyGP":
        """Train on all total energies and the forces of `n_envs` random atoms of `configs`.

        Args:
            configs: training frames (gpff.data.Configurations): energies and/or forces.
            n_envs: number of atoms whose three force components are observed, drawn at random
                over all atoms of all frames with `seed` (None: every atom); the chosen
                (frame, atom) pairs are in :attr:`force_envs`.
            seed: random seed of the force-environment draw.
        Returns:
            self.
        Raises:
            DatasetError: invalid data, or a config type of :attr:`config_type_sigma` that no
            frame has; SpeciesError: inconsistent elements;
            TrainingError: kernel matrix not positive definite.
        """
        t0 = time.perf_counter()
        self._check_config_types(configs)
        self._prepare(configs, n_envs, seed)
        _log(self.progress, f"n-body GP (order {self.order}): {self._train.n_E} energies, "
                            f"{self._train.n_F} force environments, {self._train.n_rows} observations")
        self._solve()
        self.provenance.update(self._configs_info)
        self.provenance.update({"train_seconds": round(time.perf_counter() - t0, 2),
                                "log_marginal_likelihood": self._lml})
        return self

    # ------------------------------------------------------------------ hyperparameters
    @_numerics
    def optimize(self, configs: Configurations, n_envs: int | None = None, seed: int = 0,
                 n_frames: int | None = None, fix_noise: bool = False, max_iter: int = 30,
                 fix=(), time_limit: float | None = None) -> "NBodyGP":
        """Maximise the log marginal likelihood (eq. 5.33) over the log hyperparameters with
        torch.optim.LBFGS (strong Wolfe line search), then fit on the same data. The search stays
        inside HYPERPARAMETER_BOUNDS (ℓ between 0.05 and 20 Å, ...). Each evaluation rebuilds the
        kernel with its length-scale derivatives (forward-mode AD, ~2-4 times a plain build);
        small ℓ₃ makes the 3-body quadrature grids large (cost ∝ ℓ₃⁻³).

        Args:
            configs: frames to optimise on (typically a subset of the training set).
            n_envs, seed: force environments as in :meth:`fit`.
            n_frames: use this many random frames of `configs` (seeded by `seed`); None: all.
            fix_noise: keep sigma_energy and sigma_force fixed.
            max_iter: maximum number of L-BFGS function evaluations.
            fix: further hyperparameter names to keep fixed.
            time_limit: seconds; no evaluation starts after that, and the best point evaluated
                so far is kept (None: no limit). With small ℓ₃ and dense 3-body environments
                (bcc metals) one evaluation can take minutes.
        Returns:
            self, with the optimised hyperparameters, fitted on the optimisation data
            (call :meth:`fit` on the full training set afterwards). The provenance entry
            "optimization" records the evaluations, why the search stopped ("stopped": "L-BFGS"
            when the optimiser ended, or "time limit") and the seconds and rows of the final
            solve ("solve_seconds", "n_rows"), from which :func:`n_envs_within` extrapolates.
        """
        self._check_config_types(configs)
        if n_frames is not None and n_frames < len(configs):
            pick = np.sort(np.random.default_rng(seed).choice(len(configs), int(n_frames), replace=False))
            configs = configs.subset(pick)
        self._prepare(configs, n_envs, seed)
        names = self.hyperparameter_names
        fixed = set(fix)
        if fix_noise:
            fixed |= {"sigma_energy", "sigma_force"}
        if self._train.n_E == 0:
            fixed.add("sigma_energy")
        if self._train.n_F == 0:
            fixed.add("sigma_force")
        free = [k for k, n in enumerate(names) if n not in fixed]
        theta0 = torch.as_tensor(self.log_hyperparameters(), dtype=torch.float64, device=self.device)
        x = theta0[free].clone().requires_grad_(True)
        opt = torch.optim.LBFGS([x], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-6, tolerance_change=1e-9)
        nobs = self._y.numel()
        history = []
        best = [math.inf, None]                     # (loss, x) of the best evaluated point
        t0 = time.perf_counter()
        bar = tqdm(total=max_iter, desc="marginal likelihood", leave=False, disable=not self.progress)

        lo = torch.tensor([math.log(HYPERPARAMETER_BOUNDS[names[k]][0]) for k in free],
                          dtype=torch.float64, device=self.device)
        hi = torch.tensor([math.log(HYPERPARAMETER_BOUNDS[names[k]][1]) for k in free],
                          dtype=torch.float64, device=self.device)

        def closure():
            if time_limit is not None and time.perf_counter() - t0 > time_limit and history:
                raise _OutOfTime
            opt.zero_grad()
            outside = torch.relu(lo - x) + torch.relu(x - hi)
            if bool((outside > 0).any()):           # penalty, pointing back inside the bounds
                loss = 1e6 * (1.0 + (outside ** 2).sum())
                loss.backward()
                return loss
            theta = theta0.clone()
            theta[free] = x
            t1 = time.perf_counter()
            try:
                lml = self._lml_from_C(self._covariance(theta), self._y)[0]
            except TrainingError:
                loss = torch.tensor(1e30, dtype=torch.float64) + 0 * x.sum()
                loss.backward()
                return loss
            loss = -lml / nobs
            loss.backward()
            if float(loss.detach()) < best[0]:
                best[:] = [float(loss.detach()), x.detach().clone()]
            hp = dict(zip(names, np.exp(theta.detach().cpu().numpy()).round(6).tolist()))
            value = float(lml.detach())
            history.append({"log_marginal_likelihood": value, **hp,
                            "seconds": round(time.perf_counter() - t1, 2)})
            bar.update(1)
            bar.set_postfix_str(f"lml {value:.1f} " + " ".join(f"{k}={v:.4g}" for k, v in hp.items()))
            return loss

        stopped = "L-BFGS"
        try:
            opt.step(closure)
            final = x.detach()
        except _OutOfTime:                          # mid line search: x may be a trial point
            stopped, final = "time limit", best[1]
        bar.close()
        theta = theta0.clone()
        theta[free] = torch.minimum(torch.maximum(final, lo), hi)
        self._set_log_hyperparameters(theta.cpu().numpy())
        self._cache = {}
        solve_seconds = self._solve()
        self.provenance.update({"optimization": {
            "n_frames": int(len(configs)), "n_envs": int(self._train.n_F), "seed": int(seed),
            "fixed": sorted(fixed), "evaluations": len(history), "history": history,
            "log_marginal_likelihood": self._lml, "stopped": stopped,
            "time_limit": time_limit, "n_rows": int(self._train.n_rows),
            "solve_seconds": round(solve_seconds, 4),
            "seconds": round(time.perf_counter() - t0, 2)}})
        self.provenance.update(self._configs_info)
        return self

    @_numerics
    def select_order(self, configs: Configurations, orders=(2, 3, 5, "many"),
                     **optimize_kwargs) -> dict:
        """Bayesian order selection (eq. 5.33): optimise the hyperparameters of a copy of this
        model for each order and report the maximised log marginal likelihoods.

        Args:
            configs: frames (a small subset: the kernels of orders 5 and "many" cost the
                square of all the environments of the frames with observations).
            orders: orders to compare.
            optimize_kwargs: passed to :meth:`optimize` (n_envs, seed, n_frames, fix_noise, ...).
        Returns:
            {order: maximised log marginal likelihood}; also stored as ``self.order_selection``
            with the hyperparameters of each order.
        """
        out, detail = {}, {}
        for order in orders:           # the many-body orders have no embedding term
            m = self.copy(order=order, embedding=self.embedding and order not in MANY_BODY_ORDERS)
            m.optimize(configs, **optimize_kwargs)
            out[order] = m._lml
            detail[str(order)] = m.hyperparameters
        self.order_selection = detail
        return out

    def copy(self, **changes) -> "NBodyGP":
        """An untrained copy of this model's settings with `changes` applied."""
        kw = dict(order=self.order, cutoff=self.cutoff, cutoff_3body=self.cutoff_3body,
                  cutoff_width=self.cutoff_width, length_scale_2=self.length_scale_2,
                  sigma_2=self.sigma_2, length_scale_3=self.length_scale_3, sigma_3=self.sigma_3,
                  length_scale_many=self.length_scale_many, sigma_many=self.sigma_many,
                  embedding=self.embedding, density_decay=self.density_decay,
                  length_scale_embedding=self.length_scale_embedding,
                  sigma_embedding=self.sigma_embedding, sigma_energy=self.sigma_energy,
                  sigma_force=self.sigma_force, config_type_sigma=self.config_type_sigma,
                  kernel_method=self.kernel_method, device=str(self.device), progress=self.progress)
        kw.update(changes)
        if kw["order"] in (3, *MANY_BODY_ORDERS) and kw["cutoff_3body"] is None:
            kw["cutoff_3body"] = kw["cutoff"]
        return NBodyGP(**kw)

    # ------------------------------------------------------------------ posterior means
    def _check_trained(self):
        if self._alpha is None:
            raise TrainingError("model is not trained: call fit() first")

    def _species_index(self, symbol):
        if symbol not in self.species:
            raise SpeciesError(f"element {symbol} not in the model's species {', '.join(self.species)}")
        return self.species.index(symbol)

    def _mean_torch(self, part, x, code, inside, on_grid, direct):
        """Posterior mean of part "2", "3" or "emb" at features x of species codes `code`: the rows
        `inside` the exact range of the quadrature grid by on_grid(idx), the rest by the direct
        sums direct(terms, idx) × σ² (differentiable in x)."""
        m = self._means[part]
        sigma = {"2": self.sigma_2, "3": self.sigma_3, "emb": self.sigma_embedding}[part]
        out = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        if bool(inside.any()):
            idx = torch.nonzero(inside).reshape(-1)
            out = out.index_add(0, idx, on_grid(idx))
        if not bool(inside.all()):
            idx = torch.nonzero(~inside).reshape(-1)
            val = sum(direct(t, idx) for t in m["terms"])
            out = out.index_add(0, idx, sigma ** 2 * (val + 0 * x.reshape(x.shape[0], -1)[idx, 0]))
        return out

    def _g2_torch(self, r, code, direct=False):
        """Posterior mean ḡ₂ at distances r (P,) of pair codes `code` (differentiable in r); by
        the direct sums everywhere if `direct`."""
        m = self._means["2"]
        ell = torch.tensor(self.length_scale_2, dtype=torch.float64, device=self.device)
        lo, hi = m["range"]
        return self._mean_torch(
            "2", r, code, (r >= lo) & (r <= hi) & (not direct),
            lambda idx: nk.eval_grid2(m["theta"], self._pair_codes, m["grid"], ell, r[idx], code[idx]),
            lambda t, idx: nk.eval_direct2(t, ell, r[idx], code[idx]))

    def _embedding_torch(self, rho, code, direct=False):
        """Posterior mean F̄^s(ρ) at densities ρ (A,) of centre species `code` (differentiable
        in ρ); by the direct sums everywhere if `direct`."""
        m = self._means["emb"]
        ell = torch.tensor(self.length_scale_embedding, dtype=torch.float64, device=self.device)
        lo, hi = m["range"]
        return self._mean_torch(
            "emb", rho, code, (rho >= lo) & (rho <= hi) & (not direct),
            lambda idx: nk.eval_grid2(m["theta"], list(range(self.n_species)), m["grid"], ell,
                                      rho[idx], code[idx]),
            lambda t, idx: nk.eval_direct2(t, ell, rho[idx], code[idx]))

    def _g3_torch(self, q, code, direct=False):
        """Posterior mean ḡ₃ at triplet features q (T, 3) of ordered species codes (differentiable);
        by the direct sums everywhere if `direct`."""
        m = self._means["3"]
        ell = torch.tensor(self.length_scale_3, dtype=torch.float64, device=self.device)
        lo, hi = (torch.as_tensor(v, device=q.device) for v in m["range"])
        inside = (((q >= lo) & (q <= hi)).all(1) if m["theta"] is not None and not direct
                  else torch.zeros_like(code, dtype=torch.bool))
        return self._mean_torch(
            "3", q, code, inside,
            lambda idx: nk.eval_grid3(m["theta"], self._tri_codes, m["grid"], ell, q[idx], code[idx]),
            lambda t, idx: nk.eval_direct3(t, ell, q[idx], code[idx], self.n_species))

    @_numerics
    def g2(self, a: str, b: str, r) -> np.ndarray:
        """Posterior mean of the pair function g₂^{ab}(r) (without f_c), energy unit.

        Args:
            a, b: element symbols (order irrelevant); r: distances, Å (any shape).
        Returns:
            array with the shape of r.
        Raises:
            SpeciesError: unknown element; ValueError: order 5 or "many" (no g₂).
        """
        self._check_trained()
        if self.order in MANY_BODY_ORDERS:
            raise ValueError(f"an order-{self.order!r} model has no pair function g2")
        ia, ib = self._species_index(a), self._species_index(b)
        r = np.asarray(r, dtype=np.float64)
        rt = torch.as_tensor(r.reshape(-1), device=self.device)
        code = torch.full(rt.shape, int(nk.pair_code(ia, ib, self.n_species)), dtype=torch.long,
                          device=self.device)
        with torch.no_grad():
            return self._g2_torch(rt, code).cpu().numpy().reshape(r.shape)

    @_numerics
    def embedding_function(self, s: str, rho) -> np.ndarray:
        """Posterior mean of the embedding function F^s(ρ) of centre element s, energy unit.

        Args:
            s: element symbol; rho: densities ρ = Σ_j f_c(r_ij) exp(-β r_ij) (any shape).
        Returns:
            array with the shape of rho.
        Raises:
            SpeciesError: unknown element; ValueError: a model without the embedding term.
        """
        self._check_trained()
        if not self.embedding:
            raise ValueError("the model has no embedding term (embedding=False)")
        rho = np.asarray(rho, dtype=np.float64)
        x = torch.as_tensor(rho.reshape(-1), device=self.device)
        code = torch.full(x.shape, self._species_index(s), dtype=torch.long, device=self.device)
        with torch.no_grad():
            return self._embedding_torch(x, code).cpu().numpy().reshape(rho.shape)

    @_numerics
    def g3(self, c: str, j: str, k: str, r_cj, r_ck, r_jk) -> np.ndarray:
        """Posterior mean of the triplet function g₃^{c j k}(r_cj, r_ck, r_jk) (without the f_c
        factors), energy unit; centre c, neighbours j and k.

        Args:
            c, j, k: element symbols; r_cj, r_ck, r_jk: distances, Å (broadcast together).
        Returns:
            array of the broadcast shape.
        Raises:
            SpeciesError: unknown element; ValueError: order 2, 5 or "many" (no g₃).
        """
        self._check_trained()
        if self.order != 3:
            raise ValueError(f"an order-{self.order!r} model has no triplet function g3")
        ic, ij, ik = (self._species_index(s) for s in (c, j, k))
        a, b, d = np.broadcast_arrays(np.asarray(r_cj, float), np.asarray(r_ck, float),
                                      np.asarray(r_jk, float))
        q = torch.as_tensor(np.stack([a.reshape(-1), b.reshape(-1), d.reshape(-1)], 1),
                            dtype=torch.float64, device=self.device)
        code = torch.full((q.shape[0],), int(nk.triple_code(ic, ij, ik, self.n_species)),
                          dtype=torch.long, device=self.device)
        with torch.no_grad():
            return self._g3_torch(q, code).cpu().numpy().reshape(a.shape)

    @_numerics
    def g3_on_grid(self, c: str, j: str, k: str, r_cj, r_ck, r_jk) -> np.ndarray:
        """ḡ₃^{c j k} on the tensor-product grid r_cj × r_ck × r_jk (what the mapping tabulates).

        Equal to :meth:`g3` at every node, but the nodes inside the exact range of the quadrature
        grid cost three tensor contractions of θ̄ (G³ n₁ + G² n₁n₂ + G n₁n₂n₃ operations instead
        of G³ per node); the other nodes go through :meth:`g3`.

        Args:
            c, j, k: element symbols; r_cj (n₁,), r_ck (n₂,), r_jk (n₃,): node distances, Å.
        Returns:
            (n₁, n₂, n₃) array, energy unit.
        Raises:
            SpeciesError: unknown element; ValueError: order 2, 5 or "many".
        """
        self._check_trained()
        if self.order != 3:
            raise ValueError(f"an order-{self.order!r} model has no triplet function g3")
        axes = [np.asarray(x, dtype=np.float64).reshape(-1) for x in (r_cj, r_ck, r_jk)]
        code = int(nk.triple_code(*(self._species_index(s) for s in (c, j, k)), self.n_species))
        if code not in self._tri_codes:          # a species triplet the training data never had:
            return np.zeros([len(x) for x in axes])             # the prior mean, g₃ = 0
        m = self._means["3"]
        out = np.empty([len(x) for x in axes])
        inside = [np.zeros(len(x), dtype=bool) for x in axes]
        if m["theta"] is not None:
            lo, hi = m["range"]
            inside = [(x >= lo[a]) & (x <= hi[a]) for a, x in enumerate(axes)]
        if all(s.any() for s in inside):
            theta = m["theta"][self._tri_codes.index(code)]                     # (G, G, G)
            ell = torch.tensor(self.length_scale_3, dtype=torch.float64, device=self.device)
            P = [m["grid"].basis(torch.as_tensor(x[s], device=self.device), ell, axis=a)[0]
                 for a, (x, s) in enumerate(zip(axes, inside))]
            with torch.no_grad():
                T = torch.tensordot(P[0], theta, dims=([1], [0]))                 # (n₁, G, G)
                T = torch.einsum("ubc,vb->uvc", T, P[1])                          # (n₁, n₂, G)
                out[np.ix_(*inside)] = (T @ P[2].T).cpu().numpy()
        rest = ~(inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :])
        if rest.any():
            idx = np.nonzero(rest)
            out[idx] = self.g3(c, j, k, axes[0][idx[0]], axes[1][idx[1]], axes[2][idx[2]])
        return out

    # ------------------------------------------------------------------ prediction
    def _frames_of(self, frames):
        if isinstance(frames, Configurations):
            return list(frames.frames)
        if hasattr(frames, "get_positions"):
            return [frames]
        return list(frames)

    def _energy_torch(self, env, R, strain, direct=False):
        """Model energy of one frame (orders 2, 3) as a differentiable function of R and strain;
        ḡ₂, ḡ₃ by the direct sums if `direct`."""
        dev = self.device
        n = self.n_species
        sp = torch.as_tensor(env.species, device=dev)
        E = torch.as_tensor(self._e0, dtype=torch.float64, device=dev)[sp].sum()
        g = env.tensors(dev, positions=R, strain=strain)
        r = torch.linalg.norm(g["d2"], dim=1)
        if env.n_pairs:
            f, _ = cutoff_function(r, self.cutoff, self.cutoff_width)
            code = nk.pair_code(sp[torch.as_tensor(env.pair_i, device=dev)],
                                sp[torch.as_tensor(env.pair_j, device=dev)], n)
            E = E + (f * self._g2_torch(r, code, direct)).sum()
        if self.embedding:
            E = E + self._embedding_torch(self._densities(env, r)[0], sp, direct).sum()
        if self.order == 3 and env.n_triplets:
            q = torch.stack([torch.linalg.norm(g["d_ij"], dim=1), torch.linalg.norm(g["d_ik"], dim=1),
                             torch.linalg.norm(g["d_jk"], dim=1)], dim=1)
            f0, _ = cutoff_function(q[:, 0], self.cutoff_3body, self.cutoff_width)
            f1, _ = cutoff_function(q[:, 1], self.cutoff_3body, self.cutoff_width)
            code = nk.triple_code(sp[torch.as_tensor(env.trip_i, device=dev)],
                                  sp[torch.as_tensor(env.trip_j, device=dev)],
                                  sp[torch.as_tensor(env.trip_k, device=dev)], n)
            E = E + (f0 * f1 * self._g3_torch(q, code, direct)).sum()
        return E

    def _predict_frame(self, env, direct: bool):
        """Energy, forces (N, 3) and virial (6,) of one frame (orders 2, 3) by differentiating
        the model energy with respect to the positions and a strain."""
        dev = self.device
        R = torch.as_tensor(env.positions, dtype=torch.float64, device=dev).requires_grad_(True)
        eps = torch.zeros(3, 3, dtype=torch.float64, device=dev, requires_grad=True)
        E = self._energy_torch(env, R, 0.5 * (eps + eps.T), direct)
        if E.requires_grad:
            gR, gE = torch.autograd.grad(E, (R, eps), allow_unused=True)
        else:                                    # no neighbours: a constant energy
            gR = gE = None
        gR = torch.zeros_like(R) if gR is None else gR
        W = np.zeros((3, 3)) if gE is None else -gE.detach().cpu().numpy()
        virial = np.array([W[0, 0], W[1, 1], W[2, 2], W[0, 1], W[0, 2], W[1, 2]])
        return float(E.detach()), -gR.detach().cpu().numpy(), virial

    def _predict_many(self, env):
        """Energy, forces (N, 3) and virial (6,) of one frame (orders 5, "many") as posterior means
        of the observations E, -∂E/∂R and -∂E/∂ε: e₀ + σ² k*ᵀα with the cross kernel rows of
        those observations (exact derivatives of the mean energy). For a frame without periodic
        images the virial is Σ_a R_a ⊗ F_a, the same derivative at less cost."""
        n = env.n_atoms
        periodic = bool(env.n_triplets) and bool(np.any(env.trip_S1) or np.any(env.trip_S2))
        xs = list(range(n + 2 if periodic else n))                       # + strain triples
        T = self._observations([env], [0], [(0, x) for x in xs])
        y = self.sigma_many ** 2 * (self._many_kernel(T, self._train, self.length_scale_3,
                                                      self.length_scale_many) @ self._alpha)
        E = float(self._e0[env.species].sum() + y[0])
        rest = y[1:].reshape(len(xs), 3).cpu().numpy()
        F = rest[:n]
        if periodic:
            return E, F, rest[n:].reshape(6)
        W = env.positions.T @ F
        return E, F, np.array([W[0, 0], W[1, 1], W[2, 2], W[0, 1], W[0, 2], W[1, 2]])

    @_numerics
    def predict(self, frames, variance: bool = False, direct: bool = False) -> dict:
        """Energies, forces, virials and stresses of the posterior-mean model.

        Args:
            frames: an ``ase.Atoms``, a list of them or Configurations (any size, periodic or not).
            variance: also return the predictive variance of the total energy (eq. 5.15).
            direct: evaluate ḡ₂, ḡ₃ everywhere by the textbook sums over all training terms
                (eq. 5.15 with the kernels 5.28/5.29), instead of the quadrature-grid expansion of
                the same posterior mean inside its exact range (the same function up to
                rounding: forces within 1.2e-7 eV/Å on the mlearn Si models; much faster).
                For reference and timing; orders 2 and 3.
        Returns:
            dict with ``energy`` (n,) (energy unit), ``forces`` list of (N_c, 3) (energy unit/Å,
            exactly -∂E/∂R), ``virial`` (n, 6) -∂E/∂ε in LAMMPS order xx yy zz xy xz yz (energy
            unit), ``stress`` (n, 6) ASE Voigt order xx yy zz yz xz xy (energy unit/Å³; NaN for
            non-periodic frames) and, with variance=True, ``energy_variance`` (n,).
        Raises:
            TrainingError: not fitted; SpeciesError: an element the model lacks (named);
            DatasetError: NaN/inf positions or cell.
        """
        self._check_trained()
        frames = self._frames_of(frames)
        envs = []
        for k, at in enumerate(frames):
            if not np.all(np.isfinite(at.positions)) or not np.all(np.isfinite(np.asarray(at.cell.array))):
                raise DatasetError(f"frame {k}: positions or cell contain NaN or inf")
            envs.append(FrameEnvironment(at, self.species, self.cutoff, self.cutoff_3body))
        E_out, F_out, W_out, S_out = [], [], [], []
        for env in tqdm(envs, desc="predict", leave=False, disable=not self.progress or len(envs) < 10):
            E, F, virial = (self._predict_many(env) if self.order in MANY_BODY_ORDERS
                            else self._predict_frame(env, direct))
            E_out.append(E)
            F_out.append(F)
            W_out.append(virial)
            S_out.append(virial_to_stress(virial, env.volume) if env.volume > 0 else np.full(6, np.nan))
        out = {"energy": np.array(E_out), "forces": F_out, "virial": np.array(W_out).reshape(-1, 6),
               "stress": np.array(S_out).reshape(-1, 6)}
        if variance:
            out["energy_variance"] = self._energy_variance(envs)
        return out

    def _test_observations(self, envs):
        return self._observations(envs, np.arange(len(envs)), np.zeros((0, 2), dtype=int))

    def _cross_kernel(self, T: _Observations):
        """Noise-free prior covariance between the observations of T and the training ones."""
        if self.order in MANY_BODY_ORDERS:
            return self.sigma_many ** 2 * self._many_kernel(T, self._train, self.length_scale_3,
                                                            self.length_scale_many)
        return self._prior_kernel(T, self._train)

    def _prior_energy_cov(self, T: _Observations):
        """Prior covariance of the energies of T among themselves (n, n)."""
        if self.order in MANY_BODY_ORDERS:
            return self.sigma_many ** 2 * self._many_kernel(T, None, self.length_scale_3,
                                                            self.length_scale_many)
        return self._prior_kernel(T, None)

    def _energy_variance(self, envs):
        T = self._test_observations(envs)
        Ks = self._cross_kernel(T)                         # (n, n_train)
        kss = torch.diagonal(self._prior_energy_cov(T))
        v = torch.linalg.solve_triangular(self._L, Ks.T, upper=False)
        return (kss - (v * v).sum(0)).detach().cpu().numpy()

    @_numerics
    def _predict_energy_kernel(self, frames) -> np.ndarray:
        """GP mean energies e₀ + k*ᵀα through the kernel vector (the exact-GP formula, eq. 5.15),
        independently of the g₂/g₃ representations (for tests)."""
        self._check_trained()
        envs = [FrameEnvironment(at, self.species, self.cutoff, self.cutoff_3body)
                for at in self._frames_of(frames)]
        T = self._test_observations(envs)
        Ks = self._cross_kernel(T)
        e0 = np.array([self._e0[e.species].sum() for e in envs])
        return e0 + (Ks @ self._alpha).cpu().numpy()

    # ------------------------------------------------------------------ report
    def summary(self) -> dict:
        """Settings, hyperparameters and training provenance as a JSON-friendly dict."""
        return {"model": "mff", "order": self.order, "species": self.species,
                "cutoff": self.cutoff, "cutoff_3body": self.cutoff_3body,
                "cutoff_width": self.cutoff_width, "energy_unit": self.energy_unit,
                "embedding": self.embedding,
                "density_decay": self.density_decay if self.embedding else None,
                "density_range": self.density_range,
                "energy_offsets": dict(self.energy_offsets), "r_min": self.r_min,
                "hyperparameters": self.hyperparameters, "kernel_method": self.kernel_method,
                "config_type_sigma": {t: list(v) for t, v in self.config_type_sigma.items()},
                "provenance": copy.deepcopy(self.provenance)}
