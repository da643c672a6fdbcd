/* gpff C++ inference core: symmetric gradient-domain machine learning (sGDML) model.
 *
 * Evaluates a trained sGDML model stored in a `.gpff` file (docs/model_file.md, "Prediction"):
 * one global model of one molecule of N atoms, kernel k(d) (Matérn 5/2 or RBF) of the
 * descriptor distance d = |x - x'| (the composite kernel k(D(x), D(x')) of
 * papers/ad_kernels.txt eq. 7), M training rows (x_m, v_m, optional energy coefficient beta_m)
 * and S permutational symmetries p_q (a group, row 0 the identity). Two descriptors x = D(R):
 *
 *   "inverse_distance": x_ij = 1/r_ij^p (pairs i > j, row-major lower triangle,
 *                       D = N(N-1)/2, p = descriptor_exponent, default 1);
 *   "fchl19":           global FCHL19 (fchl19.h): the per-atom FCHL19 representations of the
 *                       N atoms concatenated in model atom order, x[a*nrep + t], D = N*nrep.
 *                       Its file stores the training geometries R_m and force coefficients
 *                       alpha_m, (M, N, 3) each, instead of the long rows; the loader rebuilds
 *                       x_m = x(R_m) and v_m = J(R_m) alpha_m (FCHL19::jvp).
 *
 * The S symmetric orderings of the QUERY, R_q = R[p_q], are evaluated against the M rows; x_q is
 * a permutation of the entries of x (desc_perm_). With u = x_q - x_m, d = |u|,
 * k1(d) = k'(d)/d, k2(d) = (k''(d) - k'(d)/d)/d^2:
 *
 *   E(R) = c + sum_q sum_m [ beta_m k(d) + k1(d) u.v_m ]
 *   G_q  = dE/dx_q = sum_m [ (k2(d) u.v_m + k1(d) beta_m) u + k1(d) v_m ]
 *   G    = dE/dx   = sum_q P_q^T G_q       (x_q = P_q x)
 *   g_ij = dE/dr_ij  (inverse distance: -p G_ij / r_ij^{p+1}; fchl19: FCHL19::backward)
 *   F_i  = -sum_{j != i} g_ij (r_i - r_j) / r_ij                      (= -dE/dr_i exactly)
 *   W    = -sum_{i>j} g_ij (r_i - r_j) (x) (r_i - r_j) / r_ij         (virial, xx yy zz xy xz yz)
 *
 *   matern52 (a = sqrt(5)/sigma): k = (1 + a d + a^2 d^2/3) e^{-a d},
 *                                 k1 = -(a^2/3)(1 + a d) e^{-a d},  k2 = (a^4/3) e^{-a d}
 *   rbf:                          k = e^{-d^2/(2 sigma^2)}, k1 = -k/sigma^2, k2 = k/sigma^4
 *
 * The hot loop takes the training rows in blocks of BLOCK rows (interleaved, one SIMD vector of
 * rows per descriptor entry); each block is loaded once per call and used for all S query
 * orderings, whose S x D descriptor block stays in L1, so the loop is compute-bound. It is
 * instantiated per kernel and with/without the beta term (a force-only model pays nothing for it)
 * and does not depend on the descriptor.
 *
 * Units: positions Å, energy in energy_unit() ("kcal/mol" or "eV"), forces energy/Å,
 * virial energy. The model is immutable after construction; compute() is const and uses only
 * thread-local scratch, so one model may be evaluated from many threads at once.
 */
#ifndef GPFF_SGDML_H
#define GPFF_SGDML_H

#include <string>
#include <vector>

#include "fchl19.h"
#include "gpff_error.h"

namespace gpff {

class SGDMLModel {
 public:
  /*! Load and validate `path` (fchl19: rebuilds the training rows from R_train and alpha, see
   *  above). Throws gpff::Error("<path>: <problem>"), e.g. for a fchl19 training frame with two
   *  coincident atoms or a collinear triplet. */
  explicit SGDMLModel(const std::string &path);

  int n_atoms() const { return n_atoms_; }
  //! atomic numbers, model atom order (N)
  const std::vector<int> &atomic_numbers() const { return z_; }
  //! element symbols, model atom order (N)
  const std::vector<std::string> &species() const { return species_; }
  //! "kcal/mol" or "eV"
  const std::string &energy_unit() const { return energy_unit_; }
  //! largest interatomic distance in the training geometries, Å
  double molecule_extent() const { return molecule_extent_; }
  int n_perms() const { return n_perms_; }
  int n_train() const { return n_train_; }
  //! kernel length scale sigma (descriptor units: Å^-p for inverse distance)
  double sigma() const { return sigma_; }
  //! "matern52" or "rbf"
  const std::string &kernel() const { return kernel_name_; }
  //! "inverse_distance" or "fchl19"
  const std::string &descriptor() const { return descriptor_; }
  //! D, number of descriptor entries (N(N-1)/2 for inverse distance, N*nrep for fchl19)
  int n_desc() const { return n_desc_; }
  //! p of the inverse-distance descriptor x_ij = 1/r_ij^p (1 unless the file says otherwise;
  //! 1 and meaningless for the fchl19 descriptor)
  double descriptor_exponent() const { return desc_exp_; }
  //! the FCHL19 descriptor (its parameters); meaningful only when descriptor() == "fchl19"
  const FCHL19 &fchl19() const { return fchl_; }
  //! whether the file has energy coefficients beta_m (tensor alpha_E)
  bool has_energy_coefficients() const { return !beta_.empty(); }
  //! integration constant c (energy_unit())
  double integration_constant() const { return c_; }
  const std::string &path() const { return path_; }

  /*! Energy, forces and virial of one molecule.
   *
   *  x:           (3N) positions in Å, model atom order (x0 y0 z0 x1 ...), any origin, the
   *               molecule unwrapped (no periodic images are taken).
   *  f:           (3N) output forces, energy_unit()/Å (overwritten).
   *  virial:      (6) output virial W = sum_i r_i (x) F_i, order xx yy zz xy xz yz,
   *               energy_unit() (overwritten), if non-null.
   *  atom_virial: (6N) output per-atom virial, each pair term split half/half between its two
   *               atoms, same order (overwritten), if non-null. Sums to `virial`.
   *  Returns the energy in energy_unit().
   *  Throws gpff::Error on non-finite positions, coincident atoms (r_ij == 0), for the fchl19
   *  descriptor a collinear triplet of atoms within its three-body cutoff (the FCHL19 angular
   *  term has no derivative there, see fchl19.h), or a non-finite result; the outputs are then
   *  unspecified.
   */
  double compute(const double *x, double *f, double *virial = nullptr,
                 double *atom_virial = nullptr) const;

  /*! Nominal flop count of the kernel sum of one compute() call (for benchmarks; the same
   *  count for both kernels and with or without the beta term):
   *  M * S * (10 D + 40): per training row, query ordering and descriptor entry 10 flops
   *  (pass 1: u = x_q - x_m, d^2 += u*u, dot += u*v_m; pass 2: u again, G_q += c1 u - g v_m;
   *  an FMA counts 2), plus ~40 per (row, ordering) for sqrt, exp and the scalar factors.
   *  The descriptor, its permutations and the forces/virial (O(S D)) are not counted, nor the
   *  FCHL19 descriptor and its pullback (O(N^3 n_rs3 n_fourier), small next to the kernel sum:
   *  D = N*nrep is large, e.g. N = 12, 4 elements: D = 5952 against 66 for inverse distance). */
  double flops_per_call() const;

  /*! SIMD kernel chosen for this CPU at run time: "avx512", "avx2" or "baseline"
   *  (GPFF_KERNEL=baseline|avx2 in the environment forces a narrower one). */
  static const char *kernel_isa();

  //! training rows per interleaved block (one 8-double SIMD vector, see data_)
  static constexpr int BLOCK = 8;

 private:
  struct alignas(64) Lanes {
    double v[BLOCK];
  };
  std::string path_;
  int n_atoms_ = 0, n_desc_ = 0, n_perms_ = 0, n_train_ = 0, n_blocks_ = 0;
  std::vector<int> z_;
  std::vector<std::string> species_;
  std::string energy_unit_;
  double molecule_extent_ = 0.0, sigma_ = 0.0, c_ = 0.0;
  std::string kernel_name_;
  int kernel_kind_ = 0;       // 0 matern52, 1 rbf
  std::string descriptor_;
  int desc_kind_ = 0;         // 0 inverse_distance, 1 fchl19
  double desc_exp_ = 1.0;     // inverse distance: descriptor exponent p
  int desc_exp_kind_ = 1;     // 1: p == 1, 2: p == 2, 0: any other p (std::pow)
  FCHL19 fchl_;               // fchl19: the descriptor
  /* Training rows, interleaved in blocks of BLOCK rows: block b holds
   *   x_m[j]: data_[(2b)   * D + j].v[l]
   *   v_m[j]: data_[(2b+1) * D + j].v[l]        for m = b*BLOCK + l, j = 0..D-1.
   * Padding rows (m >= M) have x_m = 0, v_m = 0 (and beta_m = 0) and contribute exactly nothing. */
  std::vector<Lanes> data_;
  //! energy coefficients beta_m, beta_[b].v[l] for m = b*BLOCK + l; empty when the file has none
  std::vector<Lanes> beta_;
  /* Descriptor-entry permutations: the query ordering R_q = R[p_q] has descriptor
   * x_q[k] = x[desc_perm_[q*D + k]]. Inverse distance: pair (a, b) of R_q is pair
   * (p_q[a], p_q[b]) of R. fchl19: block a of x_q is the representation of atom p_q[a] of R,
   * x_q[a*nrep + t] = x[p_q[a]*nrep + t] (p_q maps atoms onto atoms of the same element). */
  std::vector<int> desc_perm_;
};

//! atomic number of an element symbol ("H" -> 1), 0 if unknown
int atomic_number(const std::string &symbol);
//! element symbol of an atomic number (1 -> "H"), "" if out of range
std::string element_symbol(int z);

}    // namespace gpff

#endif
