"""Choosing sGDML hyperparameters: σ grid by validation, gradient-based σ and p, cross-validation.

Sources: the σ grid search of sgdml (papers/sgdml_chapter.txt §7.6); gradient-based optimisation
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
    y = torch.as_tensor(train.F, device=device).reshape(-1, 1)
    if use_energies:
        y = torch.cat([y, torch.as_tensor(train.E - train.E.mean(), device=device)[:, None]])
    K = op.assemble(progress=False)
    a = torch.cholesky_solve(y, torch.linalg.cholesky(K))
    alpha = a[:op.nf].reshape(len(R), -1)
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
        loss = validation_loss(train, valid, perms, kernel, log_s.exp(), log_p.exp(), lam,
                               use_energies, device)
        s, pp, rmse = float(log_s.exp()), float(log_p.exp()), math.sqrt(float(loss.detach()))
        history.append({"sigma": s, "p": pp, "force_rmse": rmse})
        if rmse < best[0]:
            best = (rmse, s, pp)
        loss.backward()
        opt.step()
    return best[1], best[2], history


def choose_hyperparameters(data: Dataset, perms, kernel: str = "matern52",
                           use_energies: bool = False, lam: float = 1e-10,
                           sigmas=(2.0, 4.0, 8.0, 16.0, 32.0, 64.0), n_sub: int = 200,
                           n_valid: int = 200, n_grad: int = 100, steps: int = 15,
                           optimize_p: bool = True, p: float = 1.0, seed: int = 0, device="cpu",
                           progress: bool = True) -> dict:
    """The defaults' hyperparameter search on training frames only (no test data).

    Hold-out validation inside `data`: a σ grid (sgdml's search) at exponent `p`, fitted on `n_sub`
    frames and validated on `n_valid` others; then `steps` Adam steps on (log σ, log p) (p fixed
    unless `optimize_p`) from the best grid point, fitted on the first `n_grad` of those frames
    (the backward pass through the kernel costs ~n_grad²). The caller refits on all frames with
    the result. Returns {"sigma", "p", "grid", "gradient", sizes}.
    """
    n_sub = min(n_sub, max(1, data.n_frames // 2))
    n_valid = min(n_valid, data.n_frames - n_sub)
    sub_idx, val_idx = split_indices(data.n_frames, [n_sub, n_valid], seed)
    sub, val = data.subset(sub_idx), data.subset(val_idx)
    perms_t = torch.as_tensor(perms, dtype=torch.long, device=device)
    grid = []
    for s in tqdm(sigmas, desc="σ grid", disable=not progress, leave=False):
        with torch.no_grad():
            loss = validation_loss(sub, val, perms_t, kernel, float(s), p, lam, use_energies, device)
        grid.append({"sigma": float(s), "p": p, "force_rmse": math.sqrt(float(loss))})
    start = min(grid, key=lambda g: g["force_rmse"])
    grad_sub = sub.subset(np.arange(min(n_grad, sub.n_frames)))
    sigma, p_opt, history = optimize_sigma_p(grad_sub, val, perms_t, kernel, start["sigma"], p, lam,
                                             use_energies, steps=steps, optimize_p=optimize_p,
                                             device=device, progress=progress)
    return {"sigma": sigma, "p": p_opt, "grid": grid, "gradient": history,
            "n_sub": int(n_sub), "n_valid": int(n_valid), "n_grad": int(grad_sub.n_frames)}
