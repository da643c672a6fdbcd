"""Choosing sGDML hyperparameters: kernel, σ and p grid by validation, then gradient-based σ and p.

Sources: the σ grid search of sgdml (papers/sgdml_chapter.txt §7.6); the RBF kernel with a tuned
descriptor exponent, sGDML[RBF,p] (papers/ad_kernels.txt Tables 1 and SIII); gradient-based optimisation
of kernel hyperparameters and the descriptor exponent on a validation loss by differentiating
through the solve (papers/ad_kernels.txt, SI §D). The validation loss is the mean squared force
error; its gradient with respect to log σ and log p flows through the Cholesky solve by autograd.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import Dataset, split_indices
from .errors import TrainingError
from .ad_kernels import kernel_backend
from .descriptor import InverseDistance, make_descriptor


def validation_loss(train: Dataset, valid: Dataset, perms: torch.Tensor, kernel,
                    sigma, descriptor, lam: float, use_energies: bool = False,
                    device="cpu") -> torch.Tensor:
    """Mean squared validation force error of the model fitted on `train` (dense Cholesky).

    descriptor: R -> (x, J) (gpff.descriptor). sigma and the exponent p of an InverseDistance
    descriptor may be tensors that require grad: the loss is differentiable in both.
    Returns a 0-d tensor in (energy unit/Å)².
    """
    R = torch.as_tensor(train.R, device=device)
    _, operator, evaluate, kernel_fn = kernel_backend(kernel)
    op = operator(R, perms, kernel_fn, sigma, descriptor, lam, use_energies)
    y = op.labels(train.F, train.E - train.E.mean() if use_energies else None)
    K = op.assemble(progress=False)
    a = torch.cholesky_solve(y, torch.linalg.cholesky(K))
    alpha = a[:op.nf].reshape(op.m, op.block)
    x, J = op.x0, op.J0
    v = torch.einsum("mdl,ml->md", J, alpha)
    beta = a[op.nf:, 0] if use_energies else None
    _, F = evaluate(torch.as_tensor(valid.R, device=device), x, v, beta, perms, kernel_fn, sigma,
                    descriptor)
    return torch.mean((F - torch.as_tensor(valid.F, device=device)) ** 2)


def optimize_sigma_p(train: Dataset, valid: Dataset, perms, kernel: str, sigma0: float,
                     p0: float = 1.0, lam: float = 1e-10, use_energies: bool = False,
                     steps: int = 20, lr: float = 0.1, optimize_p: bool = True, device="cpu",
                     progress: bool = True, descriptor=None):
    """Gradient-based optimisation of σ and the descriptor exponent p (ad_kernels SI §D).

    Adam on (log σ, log p) (log σ only unless `optimize_p`) minimising :func:`validation_loss`,
    with the inverse-distance descriptor 1/r^p, or on log σ alone with a fixed `descriptor`
    (FCHL19; p0 and optimize_p are then ignored).
    Returns (σ, p, history) with the best point seen; history is a list of {"sigma", "p",
    "force_rmse"}, the first entry being the starting point.
    """
    perms = torch.as_tensor(perms, dtype=torch.long, device=device)
    log_s = torch.tensor(math.log(sigma0), dtype=torch.float64, requires_grad=True)
    optimize_p = optimize_p and descriptor is None
    log_p = torch.tensor(math.log(p0), dtype=torch.float64, requires_grad=optimize_p)
    opt = torch.optim.Adam([log_s, log_p] if optimize_p else [log_s], lr=lr)
    history, best = [], (np.inf, sigma0, p0)
    for _ in tqdm(range(steps), desc="σ, p gradient search", disable=not progress, leave=False):
        opt.zero_grad()
        try:
            desc = InverseDistance(log_p.exp()) if descriptor is None else descriptor
            loss = validation_loss(train, valid, perms, kernel, log_s.exp(), desc, lam,
                                   use_energies, device)
        except torch.linalg.LinAlgError:                # stepped out of the positive definite range
            break
        s, pp = float(log_s.detach().exp()), float(log_p.detach().exp())
        rmse = math.sqrt(float(loss.detach()))
        history.append({"sigma": s, "p": pp if descriptor is None else None, "force_rmse": rmse})
        if rmse < best[0]:
            best = (rmse, s, pp)
        loss.backward()
        opt.step()
    return best[1], best[2], history


#: σ grid of each kernel at a fixed exponent p. Matérn 5/2: sgdml's grid. RBF: σ ∝ p, since for
#: small p the descriptor 1/r^p ≈ 1 − p ln r and σ/p is the length scale in ln r; on rMD17 the
#: validation optimum is σ/p ≈ 2.5–4 for p from 0.05 to 1 (ethanol, malonaldehyde, uracil,
#: toluene, naphthalene at 200 frames).
MATERN_SIGMAS = (2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
RBF_SIGMA_PER_P = (2.0, 3.5, 6.0)
#: descriptor exponents of the RBF grid when p is searched (p = 0.1 is the optimum found by
#: ad_kernels Table SIII for ethanol, 0.24 malonaldehyde, 0.75 uracil)
RBF_EXPONENTS = (0.05, 0.15, 0.4, 1.0)
#: γ of σ*(n) ∝ n^−γ: the validation-optimal σ shrinks as the training set grows (the frames
#: sample the configuration space more densely). Measured on rMD17 ethanol (RBF, p = 0.1, force
#: RMSE on held-out frames): σ* ≈ 0.35 at 200 frames, 0.28 at 500, 0.2 at 1000.
SIGMA_SIZE_EXPONENT = 1.0 / 3.0
#: σ grid of the FCHL19 descriptor (RBF and Matérn 5/2). rMD17 uracil, 200/200 hold-out frames
#: with energies, force RMSE (kcal/mol/Å): RBF 2.82, 0.64, 0.50, 0.48; Matérn 4.2, 1.35, 0.78,
#: 0.63 (the inverse-distance grid's best: 0.60)
FCHL19_SIGMAS = (1.0, 3.0, 10.0, 30.0)
#: FCHL19 points of the "auto" grid, where the descriptor competes with the inverse distance
FCHL19_AUTO_SIGMAS = (10.0, 30.0)
#: share of the memory budget the FCHL19 training-set expansion may take in the "auto" search
FCHL19_MEMORY_SHARE = 0.5
#: λ values of the search's last stage (the kernels' diagonals are O(1) for the grid's σ). On
#: rMD17 malonaldehyde (RBF, σ = 0.33, p = 0.27, 1000 frames) λ = 1e-8 gives a force MAE of 7.77
#: meV/Å against 8.32 at sgdml's 1e-10 and 9.87 at 1e-6; the 200-frame hold-out picks 1e-8 too.
#: A larger λ also conditions the system better for the iterative solver. Naphthalene × 1000: the
#: scan's 1e-9 gives 2.90 meV/Å against 3.02 at 1e-10, and CG needs 154 iterations instead of
#: 391. Uracil × 1000 is the counterexample: the scan's 1e-8 (hold-out 2.7 % better than 1e-10)
#: gives 5.74 meV/Å against 5.48 at 1e-10.
LAMBDAS = (1e-10, 1e-9, 1e-8, 1e-7, 1e-6)


def search_grid(kernels=("rbf", "matern52"), p: float | None = None, sigmas=None,
                descriptor: str = "inverse_distance"):
    """The (kernel, σ, p) points of the defaults' grid stage; p None marks a point on the
    FCHL19 descriptor (which has no p).

    Inverse distance, p None: the RBF grid spans RBF_EXPONENTS × σ/p ∈ RBF_SIGMA_PER_P and
    Matérn 5/2 is taken at p = 1; a given p fixes the exponent of every point. `sigmas` replaces
    the σ grid of every kernel. "fchl19": every kernel on the σ grid FCHL19_SIGMAS. "auto": the
    inverse-distance grid plus the first kernel on the FCHL19 descriptor at FCHL19_AUTO_SIGMAS.
    Returns a list of (kernel name, σ, p).
    """
    points = []
    if descriptor == "auto":
        points = [(kernels[0], float(s), None) for s in (sigmas or FCHL19_AUTO_SIGMAS)]
    for kernel in kernels:
        if descriptor == "fchl19":
            points += [(kernel, float(s), None) for s in (sigmas or FCHL19_SIGMAS)]
            continue
        if p is not None:
            exps = [p]
        elif kernel == "rbf":
            exps = RBF_EXPONENTS
        else:
            exps = [1.0]
        for e in exps:
            if sigmas is not None:
                grid = sigmas
            elif kernel == "rbf":
                grid = [r * e for r in RBF_SIGMA_PER_P]
            else:
                grid = MATERN_SIGMAS
            points += [(kernel, float(s), float(e)) for s in grid]
    return points


def fchl19_fits(desc, n_perms: int, n_frames: int, max_memory: float | None = None,
                device="cpu") -> bool:
    """Whether the FCHL19 training-set expansion of `n_frames` frames, the Jacobians JP in the
    rigid-motion-free bases and their (D, M·S·r) copy (gpff.sgdml_kernel.TrainingKernel),
    2 · 8 · M · S · D · (3N − 6) bytes, fits FCHL19_MEMORY_SHARE of the budget `max_memory` (GB;
    default 80 % of the device's memory)."""
    from .sgdml import default_memory_bytes

    budget = (max_memory * 1e9 if max_memory is not None
              else default_memory_bytes(torch.device(device)))
    n = len(desc.element)
    need = 16 * n_frames * n_perms * n * desc.nrep * max(1, 3 * n - 6)
    return need <= FCHL19_MEMORY_SHARE * budget


def choose_hyperparameters(data: Dataset, perms, kernels=("rbf", "matern52"),
                           use_energies: bool = False, lam: float | None = None, sigmas=None,
                           n_sub: int = 200, n_valid: int = 200, n_grad: int = 100,
                           steps: int = 15, p: float | None = None, n_target: int | None = None,
                           descriptor: str = "inverse_distance", fchl19: dict | None = None,
                           max_memory: float | None = None, seed: int = 0, device="cpu",
                           progress: bool = True) -> dict:
    """The defaults' hyperparameter search on training frames only (no test data).

    Hold-out validation inside `data`: the grid of :func:`search_grid` over `kernels`, σ and p
    (p fixed when given; σ alone for the FCHL19 `descriptor`, parameters `fchl19`; "auto": both
    descriptors, FCHL19 only where its training-set expansion fits, :func:`fchl19_fits`), each
    point fitted on `n_sub` frames and validated on `n_valid` others; the best point fixes the
    descriptor;
    then, for the best grid point's kernel, `steps` Adam steps on (log σ, log p) (log σ only when
    p is given) from that point, fitted on the first `n_grad` of those frames (the backward pass
    through the kernel costs ~n_grad²). The σ found there is optimal for n_grad training frames;
    it is scaled to the `n_target` frames (default all of `data`) the caller refits on by
    (n_target / n_grad)^−SIGMA_SIZE_EXPONENT. With `lam` None, λ is then chosen among LAMBDAS by
    the same hold-out validation, at σ scaled to `n_sub` frames (the grid and the gradient stage
    run at λ = 1e-10); a given `lam` is used throughout. Returns {"kernel", "sigma" (scaled),
    "p" (None on FCHL19), "descriptor", "lam", "sigma_validated" (at n_grad), "grid",
    "gradient", "lambda_scan" (or None), sizes}; each grid or scan entry holds its point and
    validation force RMSE.

    Raises:
        TrainingError: no grid point has a positive definite kernel matrix.
    """
    lam_search = lam is None
    lam = 1e-10 if lam_search else float(lam)
    n_sub = min(n_sub, max(1, data.n_frames // 2))
    n_valid = min(n_valid, data.n_frames - n_sub)
    sub_idx, val_idx = split_indices(data.n_frames, [n_sub, n_valid], seed)
    sub, val = data.subset(sub_idx), data.subset(val_idx)
    perms_t = torch.as_tensor(perms, dtype=torch.long, device=device)
    n_target = data.n_frames if n_target is None else n_target
    fchl = (make_descriptor("fchl19", data.z, fchl19=fchl19)
            if descriptor in ("fchl19", "auto") else None)
    if descriptor == "auto" and (p is not None or not fchl19_fits(fchl, len(perms), n_target,
                                                                  max_memory, device)):
        descriptor = "inverse_distance"                  # a given p means the inverse distance

    def rmse(kernel, s, e, lam):
        desc = InverseDistance(e) if e is not None else fchl
        try:
            with torch.no_grad():
                return math.sqrt(float(validation_loss(sub, val, perms_t, kernel, s, desc, lam,
                                                       use_energies, device)))
        except torch.linalg.LinAlgError:                # not positive definite at this point
            return math.inf

    grid = [{"kernel": kernel, "sigma": s, "p": e,
             "descriptor": "inverse_distance" if e is not None else "fchl19",
             "force_rmse": rmse(kernel, s, e, lam)}
            for kernel, s, e in tqdm(search_grid(kernels, p, sigmas, descriptor),
                                     desc="kernel, σ, p grid",
                                     disable=not progress, leave=False)]
    start = min(grid, key=lambda g: g["force_rmse"])
    if not math.isfinite(start["force_rmse"]):
        raise TrainingError(f"{data.path}: the kernel matrix is not positive definite at any "
                            f"point of the σ, p grid (raise λ = {lam})")
    fixed = fchl if start["p"] is None else None
    grad_sub = sub.subset(np.arange(min(n_grad, sub.n_frames)))
    sigma, p_opt, history = optimize_sigma_p(grad_sub, val, perms_t, start["kernel"],
                                             start["sigma"], start["p"] or 1.0, lam, use_energies,
                                             steps=steps, optimize_p=p is None, device=device,
                                             progress=progress, descriptor=fixed)
    if fixed is not None:
        p_opt = None
    scan = None
    if lam_search:
        s_sub = sigma * (n_sub / grad_sub.n_frames) ** -SIGMA_SIZE_EXPONENT
        scan = [{"lam": v, "sigma": s_sub, "force_rmse": rmse(start["kernel"], s_sub, p_opt, v)}
                for v in tqdm(LAMBDAS, desc="λ", disable=not progress, leave=False)]
        lam = min(scan, key=lambda g: g["force_rmse"])["lam"]
    scale = (n_target / grad_sub.n_frames) ** -SIGMA_SIZE_EXPONENT
    return {"kernel": start["kernel"], "sigma": sigma * scale, "p": p_opt,
            "descriptor": start["descriptor"], "lam": lam,
            "sigma_validated": sigma, "sigma_size_exponent": SIGMA_SIZE_EXPONENT, "grid": grid,
            "gradient": history, "lambda_scan": scan, "n_sub": int(n_sub), "n_valid": int(n_valid),
            "n_grad": int(grad_sub.n_frames), "n_target": int(n_target)}
