/* gpff C++ inference core: the global FCHL19 descriptor of one molecule (sGDML descriptor
 * "fchl19", docs/model_file.md).
 *
 * FCHL19 (Christensen, Bratholm, Faber, von Lilienfeld, J. Chem. Phys. 152, 044107 (2020)) as
 * implemented by qml's fgenerate_fchl_acsf for a molecule (no periodic images); used as the
 * descriptor D(x) of the composite kernel k(D(x), D(x')) of papers/ad_kernels.txt eq. 7
 * ("global-FCHL19", Table 1): the per-atom representations are concatenated in model atom order,
 * x[a*nrep + t], so the descriptor is global (not summed over atoms).
 *
 * Elements: the sorted unique atomic numbers of the molecule (E of them); e(a) is the index of
 * atom a's element. Per-atom size nrep = E*n_rs2 + E(E+1)/2 * n_rs3 * 2*n_fourier.
 *
 *   Rs2[k] = rcut (k+1)/n_rs2,  Rs3[l] = acut (l+1)/n_rs3,  fc(r; rc) = (cos(pi r/rc) + 1)/2,
 *   terms with a distance r > rc (of their cutoff) are left out.
 *
 *   two-body, each pair {i, j} with r = r_ij <= rcut, added to atom i's entry e(j)*n_rs2 + k and
 *   to atom j's entry e(i)*n_rs2 + k:
 *     s2 = ln(1 + eta2/r^2),  mu = ln r - s2/2,
 *     g_k = exp(-(ln Rs2[k] - mu)^2 / (2 s2)) / (sqrt(2 pi s2) Rs2[k]) fc(r; rcut) / r^two_body_decay
 *
 *   three-body, each centre i and pair j < k (both != i) with r_ij, r_ik <= acut; a = r_ij,
 *   b = r_ik, c = r_jk (no cutoff on c); cos_i, cos_j, cos_k the triangle's angles at i, j, k;
 *   theta = acos(cos_i); o = 2f - 1 (f = 1..n_fourier):
 *     radial_l = exp(-eta3 ((a + b)/2 - Rs3[l])^2) fc(a; acut) fc(b; acut)
 *     ksi      = w3 (1 + 3 cos_i cos_j cos_k) / (a b c)^three_body_decay,
 *                w3 = three_body_weight sqrt(eta3 / pi)  (qml scales the weight so)
 *     ang      = [2 cos(o theta) e^{-(zeta o)^2/2}, 2 sin(o theta) e^{-(zeta o)^2/2}]_f
 *     x[i*nrep + E*n_rs2 + (blk*n_rs3 + l)*2 n_fourier + t] += ang_t radial_l ksi,
 *     blk = -p(p+1)/2 + q + E p,  p = min(e(j), e(k)), q = max(e(j), e(k)).
 *
 * Evaluation: cos_i, cos_j, cos_k from dot products of the position differences (equal to the
 * law-of-cosines expressions in the distances, more accurate near collinearity), sin(theta) from
 * the cross product, cos(o theta) and sin(o theta) by repeated rotation by 2 theta, and the
 * three-body Gaussians on the uniform Rs3 grid by a recurrence (three exp() per triplet).
 *
 * Every term is a function of the interatomic distances only, so the pullback of a gradient
 * G = dE/dx is computed in distance space, dE/dr_ij (backward()); the caller turns it into
 * forces and virials with F_i = -sum_j dE/dr_ij (r_i - r_j)/r_ij.
 *
 * Forward mode (jvp()): the directional derivative dx = J(R) dR of the descriptor along a
 * displacement dR, by the same evaluation code run on dual numbers (value, tangent) instead of
 * doubles: every arithmetic operation and elementary function also propagates the tangent by the
 * chain rule, so dx is exact up to rounding (no finite differences). The model loader uses it to
 * rebuild v_m = J(R_m) alpha_m from the training geometries and force coefficients.
 *
 * Collinear triplets: the angular sin(o theta) terms have an infinite derivative with respect to
 * the distances where sin(theta) = 0 (theta = 0 or pi; the same holds for qml's definition), so
 * forward() throws gpff::Error for a triplet within the cutoffs whose angle at the centre is
 * exactly 0 or 180 degrees (sin(theta) computed from the cross product, so only for exactly
 * collinear positions).
 *
 * The object is immutable after construction; forward() and backward() are const and work
 * only in the caller's scratch, jvp() in its own, so one object may be used from many threads
 * at once.
 */
#ifndef GPFF_FCHL19_H
#define GPFF_FCHL19_H

#include <cstddef>
#include <vector>

#include "gpff_error.h"

namespace gpff {

//! FCHL19 hyperparameters (defaults: qml's generate_fchl_acsf)
struct FCHL19Params {
  int n_rs2 = 24, n_rs3 = 20, n_fourier = 1;
  double eta2 = 0.32, eta3 = 2.7, zeta = 3.14159265358979323846, rcut = 8.0, acut = 8.0;
  double two_body_decay = 1.8, three_body_decay = 0.57, three_body_weight = 13.4;
};

class FCHL19 {
 public:
  FCHL19() = default;
  /*! Descriptor of a molecule with atomic numbers z (model atom order). The parameters must be
   *  valid (integers >= 1, reals finite and > 0, zeta finite and >= 0): the caller checks them
   *  and names the offending key; this constructor only re-checks them (gpff::Error). */
  FCHL19(const FCHL19Params &params, const std::vector<int> &z);

  const FCHL19Params &params() const { return p_; }
  int n_atoms() const { return n_; }
  //! E, number of distinct elements
  int n_elements() const { return n_elem_; }
  //! sorted unique atomic numbers (E)
  const std::vector<int> &elements() const { return elements_; }
  //! nrep, size of one atom's representation
  long long rep_size() const { return nrep_; }
  //! D = N * nrep
  long long size() const { return static_cast<long long>(n_) * nrep_; }
  //! doubles of scratch that forward() and backward() need (`work`)
  size_t work_size() const;

  /*! Descriptor of the positions pos (3N, Å): x (D, overwritten). Fills `work` (work_size()
   *  doubles) with the distances and per-pair factors that backward() reuses. The caller has
   *  checked that no two atoms coincide. Throws gpff::Error (message without a file name) on a
   *  collinear triplet within the cutoffs (see above). */
  void forward(const double *pos, double *x, double *work) const;

  /*! Pullback of g = dE/dx (D) to the distances: dedr (N(N-1)/2, overwritten) = dE/dr_ij for
   *  the pairs i > j, row-major lower triangle (index i(i-1)/2 + j). `work` must hold what
   *  forward() left for the same positions. */
  void backward(const double *pos, const double *g, double *dedr, double *work) const;

  /*! Descriptor of the positions pos (3N, Å) and its directional derivative along dpos (3N):
   *  x (D) = x(pos) and dx (D) = J(pos) dpos, both overwritten (dx in descriptor units per Å
   *  times the unit of dpos). Forward-mode differentiation of forward()'s evaluation, exact up
   *  to rounding; allocates its own scratch. Same preconditions and gpff::Error as forward(). */
  void jvp(const double *pos, const double *dpos, double *x, double *dx) const;

 private:
  /* the evaluation of forward() for T = double, and of jvp() for T = a dual number (value,
   * tangent); work holds work_size() T */
  template <class T> void evaluate(const T *pos, T *x, T *work) const;

  FCHL19Params p_;
  int n_ = 0, n_elem_ = 0;
  long long nrep_ = 0;
  std::vector<int> elements_, elem_;    // sorted unique Z (E); element index of each atom (N)
  std::vector<int> pair_block_;         // three-body block of elements (e_j, e_k): E x E
  std::vector<double> log_rs2_, inv_rs2_, rs3_;
  std::vector<double> ang_w_;           // 2 exp(-(zeta o)^2/2), o = 2f - 1, f = 1..n_fourier
  double w3_ = 0.0;                     // three_body_weight sqrt(eta3 / pi)
};

}    // namespace gpff

#endif
