"""The global FCHL19 descriptor of a molecule and its Jacobian (torch, float64).

Sources: papers/ad_kernels.txt eq. 7 (a kernel on any descriptor D(x), k̃(x, x') = k(D(x),
D(x'))) and Table 1 ("global-FCHL19": the concatenated FCHL19 atomic representations as one
descriptor, "sFCHL19" with the sGDML symmetries); FCHL19 is Christensen, Bratholm, Faber and
von Lilienfeld, J. Chem. Phys. 152, 044107 (2020), as its reference implementation computes it
(qml ``generate_fchl_acsf``, with its default parameters). docs/model_file.md gives the formulas,
which the C++ core implements too.

Per atom i, with E elements (the sorted atomic numbers present), e(a) the element index of atom a:

- two-body, E × n_rs2 entries: Σ_j over atoms of element e, log-normal radial functions of r_ij
  on the grid Rs2 = rcut·(1..n_rs2)/n_rs2, damped by fc(r) / r^two_body_decay;
- three-body, E(E+1)/2 × n_rs3 × 2·n_fourier entries: Σ over pairs {j, k} of neighbours with
  elements (e, e'), Gaussians of (r_ij + r_ik)/2 on Rs3 = acut·(1..n_rs3)/n_rs3 times
  fc(r_ij) fc(r_ik), the Fourier terms 2 cos(oθ) e^{−(ζo)²/2}, 2 sin(oθ) e^{−(ζo)²/2}
  (o = 1, 3, ..) of the angle θ at i, and the Axilrod-Teller weight
  w₃ (1 + 3 cos θ_i cos θ_j cos θ_k) / (r_ij r_ik r_jk)^three_body_decay, where
  w₃ = three_body_weight · sqrt(eta3 / π) (qml scales the weight so);

fc(r) = (cos(π r / r_c) + 1) / 2 for r ≤ r_c, 0 beyond. The descriptor is the atoms'
representations in model atom order, D = N × nrep. It depends on the interatomic distances only,
and atom a of R[p] is atom p[a] of R, so a permutation of equal atoms permutes its atom blocks.
Collinear triplets (θ = 0 or π) have an infinite derivative of sin θ (as in qml): such a geometry
is refused with a ValueError.
"""

from __future__ import annotations

import math
import numbers

import torch

#: the parameters of qml's generate_fchl_acsf (the FCHL19 paper's optimised values)
DEFAULTS = {"n_rs2": 24, "n_rs3": 20, "n_fourier": 1, "eta2": 0.32, "eta3": 2.7,
            "zeta": math.pi, "rcut": 8.0, "acut": 8.0, "two_body_decay": 1.8,
            "three_body_decay": 0.57, "three_body_weight": 13.4}
_INTEGERS = ("n_rs2", "n_rs3", "n_fourier")


def check_params(params: dict | None) -> dict:
    """The full parameter set: DEFAULTS updated by `params`. Raises ValueError naming a bad
    or unknown parameter."""
    out = dict(DEFAULTS)
    for key, value in (params or {}).items():
        if key not in DEFAULTS:
            raise ValueError(f"unknown FCHL19 parameter {key!r}; known: {', '.join(DEFAULTS)}")
        if key in _INTEGERS:
            if not (isinstance(value, numbers.Integral) and not isinstance(value, bool)
                    and value >= 1):
                raise ValueError(f"FCHL19 parameter {key} must be an integer >= 1, got {value!r}")
            value = int(value)
        else:
            number = isinstance(value, numbers.Real) and not isinstance(value, bool)
            if not (number and math.isfinite(value) and (value > 0 or (value == 0 and key == "zeta"))):
                raise ValueError(f"FCHL19 parameter {key} must be a finite number > 0 "
                                 f"(zeta >= 0), got {value!r}")
            value = float(value)
        out[key] = value
    return out


def representation_size(n_elements: int, params: dict) -> int:
    """nrep, the length of one atom's representation."""
    e = n_elements
    return e * params["n_rs2"] + e * (e + 1) // 2 * params["n_rs3"] * 2 * params["n_fourier"]


class FCHL19Descriptor:
    """The global FCHL19 descriptor x(R) (D = N·nrep) of molecules with atomic numbers `z`.

    Args:
        z: (N,) atomic numbers, model atom order.
        params: FCHL19 parameters (keys of DEFAULTS); missing ones take qml's defaults.
    Raises:
        ValueError: bad parameters (:func:`check_params`).
    """

    name = "fchl19"

    def __init__(self, z, params: dict | None = None):
        self.params = check_params(params)
        z = torch.as_tensor(z, dtype=torch.long)
        self.elements = torch.unique(z)                           # sorted
        self.element = torch.searchsorted(self.elements, z)       # (N,) element index e(a)
        n_el = len(self.elements)
        self.nrep = representation_size(n_el, self.params)
        onehot = torch.nn.functional.one_hot(self.element, n_el).double()
        self._onehot = onehot                                      # (N, E)
        lo = torch.minimum(self.element[:, None], self.element[None, :])
        hi = torch.maximum(self.element[:, None], self.element[None, :])
        block = -(lo * (lo + 1)) // 2 + hi + n_el * lo            # (N, N) species-pair block
        self._pair_onehot = torch.nn.functional.one_hot(block, n_el * (n_el + 1) // 2).double()

    def metadata(self) -> dict:
        """The model-file metadata of this descriptor (docs/model_file.md)."""
        return {"descriptor": self.name, **{f"fchl19_{k}": v for k, v in self.params.items()}}

    def __call__(self, R: torch.Tensor, chunk: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        """Descriptor and its Jacobian (analytic, through the interatomic distances).

        Args:
            R: (..., N, 3) positions, Å.
        Returns:
            x: (..., D) descriptor; J: (..., D, 3N), J[q, 3a + c] = ∂x_q/∂R[a, c] (per Å).
        """
        lead, n = R.shape[:-2], R.shape[-2]
        flat = R.reshape(-1, n, 3)
        out = [self._batch(flat[s:s + chunk]) for s in range(0, len(flat), chunk)]
        d = n * self.nrep
        x = torch.cat([o[0] for o in out]) if out else flat.new_zeros(0, d)
        J = torch.cat([o[1] for o in out]) if out else flat.new_zeros(0, d, 3 * n)
        return x.reshape(lead + (d,)), J.reshape(lead + (d, 3 * n))

    def jvp(self, R: torch.Tensor, dR: torch.Tensor, chunk: int = 32):
        """Descriptor and its directional derivative along dR, without the Jacobian (forward
        mode through the distances: dx = Σ_ij ∂x/∂r_ij ṙ_ij, ṙ_ij = u_ij·(dR_j − dR_i)).

        Args:
            R: (B, N, 3) positions, Å. dR: (B, N, 3) displacements (any unit).
        Returns:
            x (B, D) and dx = J(R) dR (B, D), as J @ dR.flatten(1) from :meth:`__call__`.
        """
        out = [self._batch(R[s:s + chunk], dR[s:s + chunk]) for s in range(0, len(R), chunk)]
        return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])

    def _batch(self, R: torch.Tensor, dR: torch.Tensor | None = None):
        """x (B, D) and J (B, D, 3N) of geometries R (B, N, 3); with dR (B, N, 3), x and J dR
        (B, D) instead of J."""
        prm, (b, n, _) = self.params, R.shape
        dt, dev = R.dtype, R.device
        eye = torch.eye(n, dtype=torch.bool, device=dev)
        diff = R[:, None, :, :] - R[:, :, None, :]                # r_j − r_i: (B, N, N, 3)
        r = torch.sqrt((diff * diff).sum(-1) + eye.to(dt))        # 1 on the diagonal (masked)
        u = diff / r[..., None]                                    # ∂r_ij/∂r_j = u_ij = −∂r_ij/∂r_i
        onehot = self._onehot.to(device=dev)
        pair_onehot = self._pair_onehot.to(device=dev)

        # two-body terms: g_k(r) = LN_k(r) fc(r) / r^decay, and dg_k/dr
        rs2 = prm["rcut"] * torch.arange(1, prm["n_rs2"] + 1, dtype=dt, device=dev) / prm["n_rs2"]
        rr = r[..., None]
        s2 = torch.log1p(prm["eta2"] / rr ** 2)
        t = torch.log(rs2) - torch.log(rr) + 0.5 * s2              # ln Rs − μ
        ln = torch.exp(-t * t / (2 * s2)) / (torch.sqrt(2 * math.pi * s2) * rs2)
        ds2 = -2 * prm["eta2"] / (rr ** 3 + prm["eta2"] * rr)      # ds²/dr
        dln = ln * (-(t / s2) * (-1 / rr + 0.5 * ds2) + (t * t / (2 * s2 * s2) - 1 / (2 * s2)) * ds2)
        fc, dfc = _cutoff(r, prm["rcut"])
        keep2 = ~eye & (r <= prm["rcut"])
        w = torch.where(keep2, fc / r ** prm["two_body_decay"], 0.0)
        dw = torch.where(keep2, (dfc - prm["two_body_decay"] * fc / r) / r ** prm["two_body_decay"], 0.0)
        g = ln * w[..., None]
        dg = dln * w[..., None] + ln * dw[..., None]                # (B, N, N, K)
        two = torch.einsum("bijk,je->biek", g, onehot)

        # three-body terms: centre i, neighbours j ≠ k (ordered pairs, halved)
        rs3 = prm["acut"] * torch.arange(1, prm["n_rs3"] + 1, dtype=dt, device=dev) / prm["n_rs3"]
        f3, df3 = _cutoff(r, prm["acut"])
        keep3 = ~eye & (r <= prm["acut"])
        f3, df3 = torch.where(keep3, f3, 0.0), torch.where(keep3, df3, 0.0)
        valid = ~(eye[:, :, None] | eye[:, None, :] | eye[None, :, :])
        rij, rik, rjk = r[:, :, :, None], r[:, :, None, :], r[:, None, :, :]
        ci = (rij ** 2 + rik ** 2 - rjk ** 2) / (2 * rij * rik)   # law of cosines: angle at i
        cj = (rij ** 2 + rjk ** 2 - rik ** 2) / (2 * rij * rjk)
        ck = (rik ** 2 + rjk ** 2 - rij ** 2) / (2 * rik * rjk)
        ci = torch.where(valid, ci, 0.0).clamp(-1.0, 1.0)
        cj, ck = torch.where(valid, cj, 0.0), torch.where(valid, ck, 0.0)
        # ∂c/∂(r_ij, r_jk) of each cosine (∂/∂r_ik follows from the j <-> k symmetry of the sum)
        dci_ij, dci_jk = 1 / rik - ci / rij, -rjk / (rij * rik)
        dcj_ij, dcj_jk = 1 / rjk - cj / rij, 1 / rij - cj / rjk
        dck_ij, dck_jk = -rij / (rik * rjk), 1 / rik - ck / rjk
        weight = prm["three_body_weight"] * math.sqrt(prm["eta3"] / math.pi)    # as qml scales it
        q = weight / (rij * rik * rjk) ** prm["three_body_decay"]
        prod = ci * cj * ck
        atm = q * (1 + 3 * prod)
        datm_ij = 3 * q * (dci_ij * cj * ck + ci * dcj_ij * ck + ci * cj * dck_ij) \
            - prm["three_body_decay"] * atm / rij
        datm_jk = 3 * q * (dci_jk * cj * ck + ci * dcj_jk * ck + ci * cj * dck_jk) \
            - prm["three_body_decay"] * atm / rjk
        fij, fik = f3[:, :, :, None], f3[:, :, None, :]
        cut = fij * fik
        a = torch.where(valid, atm * cut, 0.0)
        da_ij = torch.where(valid, datm_ij * cut + atm * df3[:, :, :, None] * fik, 0.0)
        da_jk = torch.where(valid, datm_jk * cut, 0.0)
        dev_l = 0.5 * (rij + rik)[..., None] - rs3
        rad = torch.exp(-prm["eta3"] * dev_l ** 2)                 # (B, N, N, N, L)
        drad = -prm["eta3"] * dev_l * rad                           # ∂/∂r_ij (= ∂/∂r_ik)
        sin_i = torch.sqrt(torch.where(valid, 1 - ci * ci, 1.0))
        flat = (sin_i == 0) & (cut > 0)
        if flat.any():
            _, i, j, k = (int(v) for v in torch.nonzero(flat)[0])
            raise ValueError(f"atoms {j}, {i}, {k} (0-based) are collinear within the FCHL19 "
                             "three-body cutoff: the descriptor has no derivative there")
        theta = torch.acos(ci)[..., None]
        orders = torch.arange(1, 2 * prm["n_fourier"], 2, dtype=dt, device=dev)
        damp = 2 * torch.exp(-(prm["zeta"] * orders) ** 2 / 2)
        cos_o, sin_o = torch.cos(orders * theta), torch.sin(orders * theta)
        ang = torch.stack([cos_o * damp, sin_o * damp], -1).flatten(-2)          # (..., A)
        dang = (torch.stack([orders * sin_o * damp, -orders * cos_o * damp], -1).flatten(-2)
                / sin_i[..., None])                                 # ∂/∂cos θ_i
        T = torch.einsum("bijk,bijkl,bijka->bijkla", a, rad, ang)
        Gij = (torch.einsum("bijk,bijkl,bijka->bijkla", da_ij, rad, ang)
               + torch.einsum("bijk,bijkl,bijka->bijkla", a, drad, ang)
               + torch.einsum("bijk,bijkl,bijka->bijkla", a * dci_ij, rad, dang))
        Gjk = (torch.einsum("bijk,bijkl,bijka->bijkla", da_jk, rad, ang)
               + torch.einsum("bijk,bijkl,bijka->bijkla", a * dci_jk, rad, dang))
        three = 0.5 * torch.einsum("bijkla,jkp->bipla", T, pair_onehot)
        x = torch.cat([two.reshape(b, n, -1), three.reshape(b, n, -1)], dim=2).reshape(b, -1)
        if dR is not None:          # ṙ_ij; ∂T_ijk/∂r_ik is G_ij at (i, k, j) (j <-> k symmetry)
            rdot = torch.einsum("bijc,bijc->bij", u, dR[:, None, :, :] - dR[:, :, None, :])
            dtwo = torch.einsum("bijk,bij,je->biek", dg, rdot, onehot)
            dthree = (torch.einsum("jkp,bijkla,bij->bipla", pair_onehot, Gij, rdot)
                      + 0.5 * torch.einsum("jkp,bijkla,bjk->bipla", pair_onehot, Gjk, rdot))
            return x, torch.cat([dtwo.reshape(b, n, -1), dthree.reshape(b, n, -1)], 2).reshape(b, -1)
        J2 = torch.einsum("ae,biak,biac->biekac", onehot, dg, u)
        J2 = J2 - torch.einsum("je,bijk,bijc->biekc", onehot, dg, u)[:, :, :, :, None] \
            * eye[None, :, None, None, :, None]
        # ∂x3/∂r_m = Σ_jk P_jk [G_ij (δ_mj − δ_mi) u_ij + G_jk δ_mk u_jk]   (j <-> k symmetry)
        J3 = (torch.einsum("mkp,bimkla,bimc->biplamc", pair_onehot, Gij, u)
              + torch.einsum("jmp,bijmla,bjmc->biplamc", pair_onehot, Gjk, u))
        J3 = J3 - torch.einsum("jkp,bijkla,bijc->biplac", pair_onehot, Gij, u)[:, :, :, :, :, None] \
            * eye[None, :, None, None, None, :, None]

        J = torch.cat([J2.reshape(b, n, -1, n * 3), J3.reshape(b, n, -1, n * 3)], dim=2)
        return x, J.reshape(b, -1, 3 * n)


def _cutoff(r: torch.Tensor, rc: float):
    """fc(r) = (cos(π r / r_c) + 1) / 2 and fc'(r) (the caller zeroes r > r_c)."""
    return 0.5 * (torch.cos(math.pi * r / rc) + 1.0), -0.5 * math.pi / rc * torch.sin(math.pi * r / rc)
