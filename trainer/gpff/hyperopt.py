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


def validation_loss(train: Dataset, valid: Dataset, perms: torch.Tensor, kernel,
                    sigma, p, lam: float, use_energies: bool = False,
                    device="cpu") -> torch.Tensor:
    """Mean squared validation force error of the model fitted on `train` (dense Cholesky).

    sigma and p may be tensors that require grad: the loss is differentiable in both.
    Returns a 0-d tensor in (energy unit/Å)².
    """
    R = torch.as_tensor(train.R, device=device)
    _, operator, evaluate, kernel_fn = kernel_backend(kernel)
    op = operator(R, perms, kernel_fn, sigma, p, lam, use_energies)
    y = op.labels(train.F, train.E - train.E.mean() if use_energies else None)
    K = op.assemble(progress=False)
    a = torch.cholesky_solve(y, torch.linalg.cholesky(K))
    alpha = a[:op.nf].reshape(op.m, op.block)
    x, J = op.x0, op.J0
    v = torch.einsum("mdl,ml->md", J, alpha)
    beta = a[op.nf:, 0] if use_energies else None
    _, F = evaluate(torch.as_tensor(valid.R, device=device), x, v, beta, perms, kernel_fn, sigma, p)
    return torch.mean((F - torch.as_tensor(valid.F, device=device)) ** 2)


def optimize_sigma_p(train: Dataset, valid: Dataset, perms, kernel: str, sigma0: float,
                     p0: float = 1.0, lam: float = 1e-10, use_energies: bool = False,
                     steps: int = 20, lr: float = 0.1, optimize_p: bool = True, device="cpu",
                     progress: bool = True):
    """Gradient-based optimisation of σ and the descriptor exponent p (ad_kernels SI §D).

    Adam on (log σ, log p) (log σ only unless `optimize_p`) minimising :func:`validation_loss`.
    Returns (σ, p, history) with the best point seen; history is a list of {"sigma", "p",
    "force_rmse"}, the first entry being the starting point.
    """
    perms = torch.as_tensor(perms, dtype=torch.long, device=device)
    log_s = torch.tensor(math.log(sigma0), dtype=torch.float64, requires_grad=True)
    log_p = torch.tensor(math.log(p0), dtype=torch.float64, requires_grad=optimize_p)
    opt = torch.optim.Adam([log_s, log_p] if optimize_p else [log_s], lr=lr)
    history, best = [], (np.inf, sigma0, p0)
    for _ in tqdm(range(steps), desc="σ, p gradient search", disable=not progress, leave=False):
        opt.zero_grad()
        try:
            loss = validation_loss(train, valid, perms, kernel, log_s.exp(), log_p.exp(), lam,
                                   use_energies, device)
        except torch.linalg.LinAlgError:                # stepped out of the positive definite range
            break
        s, pp = float(log_s.detach().exp()), float(log_p.detach().exp())
        rmse = math.sqrt(float(loss.detach()))
        history.append({"sigma": s, "p": pp, "force_rmse": rmse})
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
#: λ values of the search's last stage (the kernels' diagonals are O(1) for the grid's σ). On
#: rMD17 malonaldehyde (RBF, σ = 0.33, p = 0.27, 1000 frames) λ = 1e-8 gives a force MAE of 7.77
#: meV/Å against 8.32 at sgdml's 1e-10 and 9.87 at 1e-6; the 200-frame hold-out picks 1e-8 too.
#: A larger λ also conditions the system better for the iterative solver. Naphthalene × 1000: the
#: scan's 1e-9 gives 2.90 meV/Å against 3.02 at 1e-10, and CG needs 154 iterations instead of
#: 391. Uracil × 1000 is the counterexample: the scan's 1e-8 (hold-out 2.7 % better than 1e-10)
#: gives 5.74 meV/Å against 5.48 at 1e-10.
LAMBDAS = (1e-10, 1e-9, 1e-8, 1e-7, 1e-6)


def search_grid(kernels=("rbf", "matern52"), p: float | None = None, sigmas=None):
    """The (kernel, σ, p) points of the defaults' grid stage.

    p None: the RBF grid spans RBF_EXPONENTS × σ/p ∈ RBF_SIGMA_PER_P and Matérn 5/2 is taken at
    p = 1; a given p fixes the exponent of every point. `sigmas` replaces the σ grid of every
    kernel. Returns a list of (kernel name, σ, p).
    """
    points = []
    for kernel in kernels:
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


def choose_hyperparameters(data: Dataset, perms, kernels=("rbf", "matern52"),
                           use_energies: bool = False, lam: float | None = None, sigmas=None,
                           n_sub: int = 200, n_valid: int = 200, n_grad: int = 100,
                           steps: int = 15, p: float | None = None, n_target: int | None = None,
                           seed: int = 0, device="cpu", progress: bool = True) -> dict:
    """The defaults' hyperparameter search on training frames only (no test data).

    Hold-out validation inside `data`: the grid of :func:`search_grid` over `kernels`, σ and p
    (p fixed when given), each point fitted on `n_sub` frames and validated on `n_valid` others;
    then, for the best grid point's kernel, `steps` Adam steps on (log σ, log p) (log σ only when
    p is given) from that point, fitted on the first `n_grad` of those frames (the backward pass
    through the kernel costs ~n_grad²). The σ found there is optimal for n_grad training frames;
    it is scaled to the `n_target` frames (default all of `data`) the caller refits on by
    (n_target / n_grad)^−SIGMA_SIZE_EXPONENT. With `lam` None, λ is then chosen among LAMBDAS by
    the same hold-out validation, at σ scaled to `n_sub` frames (the grid and the gradient stage
    run at λ = 1e-10); a given `lam` is used throughout. Returns {"kernel", "sigma" (scaled),
    "p", "lam", "sigma_validated" (at n_grad), "grid", "gradient", "lambda_scan" (or None),
    sizes}; each grid or scan entry holds its point and validation force RMSE.

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

    def rmse(kernel, s, e, lam):
        try:
            with torch.no_grad():
                return math.sqrt(float(validation_loss(sub, val, perms_t, kernel, s, e, lam,
                                                       use_energies, device)))
        except torch.linalg.LinAlgError:                # not positive definite at this point
            return math.inf

    grid = [{"kernel": kernel, "sigma": s, "p": e, "force_rmse": rmse(kernel, s, e, lam)}
            for kernel, s, e in tqdm(search_grid(kernels, p, sigmas), desc="kernel, σ, p grid",
                                     disable=not progress, leave=False)]
    start = min(grid, key=lambda g: g["force_rmse"])
    if not math.isfinite(start["force_rmse"]):
        raise TrainingError(f"{data.path}: the kernel matrix is not positive definite at any "
                            f"point of the σ, p grid (raise λ = {lam})")
    grad_sub = sub.subset(np.arange(min(n_grad, sub.n_frames)))
    sigma, p_opt, history = optimize_sigma_p(grad_sub, val, perms_t, start["kernel"],
                                             start["sigma"], start["p"], lam, use_energies,
                                             steps=steps, optimize_p=p is None, device=device,
                                             progress=progress)
    scan = None
    if lam_search:
        s_sub = sigma * (n_sub / grad_sub.n_frames) ** -SIGMA_SIZE_EXPONENT
        scan = [{"lam": v, "sigma": s_sub, "force_rmse": rmse(start["kernel"], s_sub, p_opt, v)}
                for v in tqdm(LAMBDAS, desc="λ", disable=not progress, leave=False)]
        lam = min(scan, key=lambda g: g["force_rmse"])["lam"]
    n_target = data.n_frames if n_target is None else n_target
    scale = (n_target / grad_sub.n_frames) ** -SIGMA_SIZE_EXPONENT
    return {"kernel": start["kernel"], "sigma": sigma * scale, "p": p_opt, "lam": lam,
            "sigma_validated": sigma, "sigma_size_exponent": SIGMA_SIZE_EXPONENT, "grid": grid,
            "gradient": history, "lambda_scan": scan, "n_sub": int(n_sub), "n_valid": int(n_valid),
            "n_grad": int(grad_sub.n_frames), "n_target": int(n_target)}
