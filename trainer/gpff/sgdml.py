"""sGDML: symmetric gradient-domain machine learning of one molecule (exact GP, torch).

Sources (papers/sgdml_chapter.txt): inverse-distance descriptor (eq. 7.22; or the global FCHL19
descriptor, papers/ad_kernels.txt eq. 7 and Table 1, gpff.fchl19), Hessian (force-force)
kernel of a kernel on the descriptor (eqs. 7.23-7.26), integration constant, symmetric kernel
summed over the permutational symmetries (eqs. 7.28-7.31); energy-constraint variant (joint GP of
energies and forces); papers/md22_iterative_solver.txt for the iterative solver. The kernel algebra
lives in gpff.sgdml_kernel, the solvers in gpff.solvers.

Notation (see docs/model_file.md): M training geometries of N atoms, D descriptor entries
(N(N-1)/2 inverse distances, or N × nrep FCHL19 entries), S symmetries.
A trained model stores x_m (M, D), v_m = J_m α_m (M, D), the energy coefficients β_m (M,) when
trained with energies, and the integration constant c (the file of an fchl19 model stores the
geometries R_m and coefficients α_m instead, and readers rebuild x_m and v_m).
"""

from __future__ import annotations

import math
import os
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import Dataset
from .descriptor import DESCRIPTORS, make_descriptor, pair_indices, training_rows
from .errors import DatasetError, GpffError, SpeciesError, TrainingError
from .sgdml_kernel import TrainingKernel
from .ad_kernels import kernel_backend
from .symmetry import find_permutations

SOLVERS = ("auto", "cholesky", "cg")
#: share of the kernel's columns in the CG solver's first Nyström preconditioner (solve() grows
#: it when CG is slow)
PRECONDITIONER_FRACTION = 0.05
MATVEC_CACHE_SHARE = 8      # CG keeps the matvec's kernel values when they fit 1/8 of the budget


def default_memory_bytes(device: torch.device) -> int:
    """80 % of the device's memory (physical RAM for the CPU)."""
    if device.type == "cuda":
        return int(0.8 * torch.cuda.mem_get_info(device)[1])
    return int(0.8 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


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
        sigma: length scale σ of the kernel on the descriptor (descriptor units: Å^-p for
            inverse distances).
        lam: regularisation λ added to the kernel diagonal.
        use_sym: recover permutational symmetries (False: plain GDML).
        perms: (S, N) symmetries to use instead of recovering them (identity first).
        kernel: "matern52" (default) or "rbf" (hand-derived fast path, gpff.kernels), or a
            gpff.ad_kernels.ScalarKernel written as a scalar function of two descriptors, whose
            Hessian kernel and predictions are derived by AD (such a model predicts in Python;
            the .gpff format and the C++ core know matern52 and rbf).
        p: descriptor exponent, x_ij = 1/r_ij^p (default 1; inverse-distance descriptor only).
        descriptor: "inverse_distance" (sGDML's, default) or "fchl19" (the global FCHL19
            descriptor of ad_kernels Table 1, symmetrised by `perms`: sFCHL19; gpff.fchl19).
        fchl19: FCHL19 parameters (gpff.fchl19.DEFAULTS, qml's values where not given).
        use_energies: train on energies too (joint energy/force GP, energy-constraint variant;
            on rMD17 ethanol it lowers both energy and force errors); None (default): when the
            training data has energies. Without it energies only fix the integration constant.
        solver: "cholesky" (exact, dense K in place), "cg" (Nyström-preconditioned conjugate
            gradient, K never stored; gpff.solvers) or "auto" (Cholesky when it fits `max_memory`).
        max_memory: memory budget in GB for the solve (default 80 % of the device's memory).
        tol: relative residual at which CG stops.
        checkpoint: file where CG saves α every few minutes; resume: continue from it.
        device: torch device for training and prediction ("cpu", "cuda").
        block: training geometries per block of kernel rows.
        progress: show progress bars.

    After :meth:`fit`: ``z`` (N,), ``perms`` (S, N), ``R_desc`` and ``R_d_desc_alpha`` (M, D),
    ``alpha_E`` (M,) or None, ``integration_constant`` (energy unit), ``energy_unit``,
    ``molecule_extent`` (Å), ``provenance`` (dict, including the solver's report), and
    ``R_train`` (M, N, 3) Å and ``alpha`` (M, N, 3) energy unit·Å: the training geometries and
    the Cartesian force coefficients α_m, R_d_desc_alpha[m] = J(R_m) α_m (what the file of an
    fchl19 model stores; a model loaded from an inverse-distance file has None).
    """

    kind = "sgdml"

    def __init__(self, sigma: float = 10.0, lam: float = 1e-10, use_sym: bool = True,
                 perms=None, kernel: str = "matern52", p: float = 1.0,
                 descriptor: str = "inverse_distance", fchl19: dict | None = None,
                 use_energies: bool | None = None,
                 solver: str = "auto", max_memory: float | None = None, tol: float = 1e-4,
                 checkpoint=None, resume: bool = False, device: str = "cpu", block: int = 8,
                 progress: bool = True):
        if not sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        if not lam >= 0:
            raise ValueError(f"lam must be non-negative, got {lam}")
        if not p > 0:
            raise ValueError(f"descriptor exponent p must be positive, got {p}")
        if descriptor not in DESCRIPTORS:
            raise ValueError(f"descriptor must be one of {', '.join(DESCRIPTORS)}, got {descriptor!r}")
        if descriptor == "fchl19":
            from .fchl19 import check_params

            fchl19 = check_params(fchl19)
        elif fchl19 is not None:
            raise ValueError("FCHL19 parameters given for the inverse-distance descriptor")
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
        if max_memory is not None and not max_memory > 0:
            raise ValueError(f"max_memory must be positive (GB), got {max_memory}")
        self.kernel, self._operator, self._evaluate, self.kernel_fn = kernel_backend(kernel)
        self.sigma = float(sigma)
        self.lam = float(lam)
        self.p = float(p)
        self.descriptor = descriptor
        self.fchl19 = fchl19
        self.use_sym = bool(use_sym)
        self.use_energies = use_energies
        self.perms = None if perms is None else np.asarray(perms, dtype=np.int32)
        self.solver = solver
        self.max_memory = max_memory
        self.tol = float(tol)
        self.checkpoint = checkpoint
        self.resume = bool(resume)
        self.device = torch.device(device)
        self.block = int(block)
        self.progress = progress
        self.z = None
        self.alpha_E = None
        self.provenance: dict = {}

    # ---------------------------------------------------------------- training
    def _choose_solver(self, op, budget: int) -> str:
        """Cholesky when the dense kernel and the workspace fit the budget, else CG."""
        if self.solver != "auto":
            return self.solver
        return "cholesky" if 8 * op.n ** 2 + op.workspace_bytes() <= budget else "cg"

    def fit(self, train: Dataset) -> "SGDML":
        """Train on the geometries and forces (and energies) of `train`.

        Raises:
            DatasetError: energies requested but missing.
            TrainingError: the kernel matrix is not positive definite (raise λ), CG did not
            converge, or the dense kernel does not fit the memory budget with solver="cholesky".
        """
        train.validate()
        if self.use_energies is None:
            self.use_energies = train.E is not None
        if self.use_energies and train.E is None:
            raise DatasetError(f"{train.path}: use_energies needs energies, the dataset has none")
        t0 = time.perf_counter()
        z = np.asarray(train.z)
        if self.perms is None:
            self.perms = (find_permutations(train.R, z, progress=self.progress) if self.use_sym
                          else np.arange(len(z), dtype=np.int32)[None])
        _check_perms(self.perms, z)
        R = torch.as_tensor(train.R, dtype=torch.float64, device=self.device)
        perms = torch.as_tensor(self.perms, dtype=torch.long, device=self.device)
        budget = (int(self.max_memory * 1e9) if self.max_memory is not None
                  else default_memory_bytes(self.device))
        op = self._operator(R, perms, self.kernel_fn, self.sigma, self.descriptor_fn(z), self.lam,
                            self.use_energies, self.block, budget // MATVEC_CACHE_SHARE)
        c = float(np.mean(train.E)) if self.use_energies else 0.0   # prior mean of the energy
        y = op.labels(train.F, None if train.E is None else train.E - c)
        solver = self._choose_solver(op, budget)
        info = {"solver": solver, "n": op.n}
        if solver == "cholesky":
            if 8 * op.n ** 2 + op.workspace_bytes() > budget:
                raise TrainingError(
                    f"{train.path}: the {op.n}x{op.n} kernel matrix needs "
                    f"{(8 * op.n ** 2 + op.workspace_bytes()) / 1e9:.1f} GB, over the "
                    f"{budget / 1e9:.1f} GB budget: use --solver cg or auto")
            K = op.assemble(self.progress)
            if self.progress:
                tqdm.write(f"Cholesky solve of the {op.n}x{op.n} kernel matrix")
            a = _cholesky_solve_inplace(K, y, train.path, self.sigma, self.lam)
            del K
        else:
            from .solvers import preconditioner_bytes, solve

            # a Nyström preconditioner of 5 % of the columns (papers/md22 Fig. 4: ≳ 2.5 %
            # converges reliably), within the budget; solve() grows it when CG is slow or stalls.
            # 10 % of the budget is left for what the fit allocates besides the solve
            spare = int(0.9 * budget) - op.workspace_bytes() - 16 * 8 * op.n
            k = math.ceil(PRECONDITIONER_FRACTION * op.n)
            while k > op.block and preconditioner_bytes(op.n, k, block=op.block) > spare:
                k = int(0.8 * k)
            a, cg_info = solve(op, y, tol=self.tol, n_inducing=k, max_memory_bytes=spare,
                               checkpoint=self.checkpoint, resume=self.resume,
                               progress=self.progress)
            info.update(cg_info)
        alpha = a[:op.nf].reshape(op.m, op.block)                   # in the bases Q_m
        self.z = z.astype(np.int32)
        alpha_cart = torch.einsum("mkr,mr->mk", op.Q, alpha).reshape(R.shape)   # α_m = Q_m a_m
        self.R_train, self.alpha = np.array(train.R, dtype=np.float64), alpha_cart.cpu().numpy()
        if self.descriptor == "fchl19":      # the rows as every reader of its file rebuilds them
            x, v = training_rows(self.descriptor_fn(z), R, alpha_cart)
        else:                                # identity ordering: x(R_m), J(R_m) Q_m a_m
            x, v = op.x0, torch.einsum("mdl,ml->md", op.J0, alpha)
        self.R_desc, self.R_d_desc_alpha = x.cpu().numpy(), v.cpu().numpy()
        self.alpha_E = a[op.nf:, 0].cpu().numpy() if self.use_energies else None
        self.energy_unit = train.energy_unit
        self.integration_constant = c
        if train.E is not None:
            e0, _ = self.predict(train.R)
            self.integration_constant = c + float(np.mean(train.E - e0))   # least squares for c
        i, j = pair_indices(len(z))
        self.molecule_extent = float(np.linalg.norm(train.R[:, i] - train.R[:, j], axis=-1).max())
        self.provenance.update({
            "train_file": os.path.basename(train.path), "train_sha256": train.sha256,
            "train_indices": None if train.indices is None else train.indices.tolist(),
            "n_train": int(len(R)), "n_perms": int(len(self.perms)),
            "use_energies": self.use_energies, "solver": _jsonable(info),
            "train_seconds": round(time.perf_counter() - t0, 2),
        })
        return self

    def descriptor_fn(self, z=None):
        """The descriptor callable R -> (x, J) of this model (gpff.descriptor.make_descriptor)
        for atomic numbers z (default the model's)."""
        return make_descriptor(self.descriptor, self.z if z is None else z, self.p, self.fchl19)

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
        dev = self.device
        beta = None if self.alpha_E is None else torch.as_tensor(self.alpha_E, device=dev)
        E, F = self._evaluate(torch.as_tensor(Rb, device=dev), torch.as_tensor(self.R_desc, device=dev),
                        torch.as_tensor(self.R_d_desc_alpha, device=dev), beta,
                        torch.as_tensor(self.perms, dtype=torch.long, device=dev),
                        self.kernel_fn, self.sigma, self.descriptor_fn(), batch)
        E = (E + self.integration_constant).cpu().numpy()
        F = F.cpu().numpy()
        return (float(E[0]), F[0]) if single else (E, F)

    # ----------------------------------------------------------------- file I/O
    def save(self, path) -> None:
        """Write the model to a `.gpff` file atomically (docs/model_file.md).

        Raises GpffError for a model with a user (AD) kernel, which the file format cannot hold.
        """
        from .modelfile import save_sgdml

        if self._operator is not TrainingKernel:
            raise GpffError(f"{os.fspath(path)}: kernel {self.kernel!r} is a Python function; "
                            "model files hold the matern52 and rbf kernels the C++ core "
                            "evaluates: predict this model with model.predict")
        save_sgdml(self, path)


def _jsonable(info: dict) -> dict:
    """The solver report with numbers as plain Python numbers (for the model's metadata)."""
    out = {}
    for key, value in info.items():
        if isinstance(value, (np.generic, torch.Tensor)):
            value = value.item() if getattr(value, "ndim", 0) == 0 else value.tolist()
        if isinstance(value, (int, float, str, bool, type(None), list)):
            out[key] = value
    return out


def train_sgdml(train: Dataset, valid: Dataset | None = None, sigmas=None, **kwargs) -> SGDML:
    """Train an sGDML model, choosing the hyperparameters.

    Args:
        train: training frames; valid: validation frames (required for a σ grid).
        sigmas: None (the default search: a kernel, σ and p grid, then gradient-based σ and
            descriptor exponent p (σ only for FCHL19), then λ, by hold-out validation on
            training frames only,
            gpff.hyperopt.choose_hyperparameters, then a refit on all of `train`), one σ, or
            several σ chosen by validation force MAE on `valid` (the σ grid search of sgdml).
        kwargs: further :class:`SGDML` arguments. With sigmas=None, `p`, `kernel`, `lam` and
            the descriptor are searched unless given (the kernel between "rbf" and "matern52";
            descriptor "auto", the default here: the inverse distance or FCHL19, whichever wins
            the hold-out grid); otherwise kernel defaults to "matern52" (sgdml's), p to 1, λ to
            1e-10 and the descriptor ("auto" too) to the inverse distance.
    Returns:
        the chosen model; its ``provenance`` records the search (every point with its errors).
    Raises:
        DatasetError: a σ grid without validation frames, or validation atoms differ from training.
    """
    from .evaluate import error_metrics
    from .hyperopt import choose_hyperparameters

    if valid is not None and not np.array_equal(valid.z, train.z):
        raise DatasetError(f"{valid.path}: validation atoms {valid.z.tolist()} differ from the "
                           f"training atoms {train.z.tolist()}")
    perms = kwargs.pop("perms", None)
    if perms is None:
        perms = (find_permutations(train.R, train.z, progress=kwargs.get("progress", True))
                 if kwargs.get("use_sym", True) else np.arange(train.n_atoms, dtype=np.int32)[None])
    search = None
    if sigmas is None:
        kernel = kwargs.get("kernel")
        search = choose_hyperparameters(
            train, perms, kernels=("rbf", "matern52") if kernel is None else (kernel,),
            use_energies=(kwargs.get("use_energies") is not False and train.E is not None),
            lam=kwargs.get("lam"), p=kwargs.get("p"),
            descriptor=kwargs.get("descriptor", "auto"), fchl19=kwargs.get("fchl19"),
            max_memory=kwargs.get("max_memory"), device=kwargs.get("device", "cpu"), progress=kwargs.get("progress", True))
        sigmas, kwargs["kernel"] = [search["sigma"]], search["kernel"]
        kwargs["descriptor"] = search["descriptor"]
        if search["p"] is not None:                      # None: the FCHL19 descriptor has no p
            kwargs["p"] = search["p"]
        kwargs["lam"] = search["lam"]
    else:
        if kwargs.get("lam") is None:
            kwargs.pop("lam", None)                      # SGDML's default, sgdml's 1e-10
        if kwargs.get("descriptor") == "auto":           # sgdml's, without a search
            kwargs["descriptor"] = "inverse_distance"
    sigmas = [float(s) for s in np.atleast_1d(sigmas)]
    if len(sigmas) > 1 and (valid is None or valid.n_frames == 0):
        raise DatasetError("a σ grid needs validation frames (--n-valid or --valid)")
    best, best_mae, grid = None, np.inf, []
    for sigma in tqdm(sigmas, desc="σ grid", disable=len(sigmas) == 1 or not kwargs.get("progress", True)):
        model = SGDML(sigma=sigma, perms=perms, **kwargs).fit(train)
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
    if search is not None:
        best.provenance["hyperparameter_search"] = search
    return best
