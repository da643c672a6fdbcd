/* gpff C++ inference core: mapped force field (MFF), model kind "mff" (docs/mff.md).
 *
 * A local 2-body + 3-body model whose functions g2 and g3 are tabulated as uniform cubic
 * B-splines (1-D for g2, tensor-product tricubic for g3). The energy of a configuration is a sum
 * of local energies of the atoms (centres) i:
 *
 *   eps_i = e0(s_i)
 *         + sum_{j in rho_i, r_ij < r_c}      f_c(r_ij; r_c) g2^{s_i s_j}(r_ij)
 *         + sum_{j<k in rho_i, r_ij, r_ik < r_c3}
 *                 f_c(r_ij; r_c3) f_c(r_ik; r_c3) g3^{s_i s_j s_k}(r_ij, r_ik, r_jk)
 *
 *   f_c(r; r_c) = 1 (r <= r_c - d),  (1 + cos(pi (r - r_c + d)/d))/2 (r_c - d < r < r_c),  0 (r >= r_c)
 *
 * and, in a model with an embedding term (EAM-like, many-body),
 *
 *         + F^{s_i}(rho_i),   rho_i = sum_{j in rho_i, r_ij < r_c} f_c(r_ij; r_c) exp(-beta r_ij)
 *
 * with F^s tabulated as a 1-D cubic B-spline on rho (the end cubics extrapolated outside),
 * with neighbours j, k of i taken over all periodic images (an image of i itself included).
 * The triplet table of (c; j, k) is stored for s_j <= s_k only; when s_j > s_k the core swaps
 * j and k (table axes 0 and 1). Forces are the analytic gradient of the interpolant and of f_c.
 *
 * Units: distances Å, energies in energy_unit() ("eV" or "kcal/mol"), forces energy/Å, virial
 * energy. The model is immutable after construction; every evaluation is const and uses only
 * the caller's Workspace, so one model may be evaluated from many threads at once (one
 * Workspace per thread).
 */
#ifndef GPFF_MFF_H
#define GPFF_MFF_H

#include <cstdint>
#include <string>
#include <vector>

#include "gpff_error.h"

namespace gpff {

class MFFModel {
  struct Impl;    // evaluation kernels (mff.cpp)

 public:
  //! Load and validate `path`. Throws gpff::Error("<path>: <problem>").
  explicit MFFModel(const std::string &path);

  const std::string &path() const { return path_; }
  //! element symbols, model species order (index 0, 1, ...)
  const std::vector<std::string> &species() const { return species_; }
  int n_species() const { return n_species_; }
  //! model species index of an element symbol, -1 if the model does not have it
  int species_index(const std::string &symbol) const;
  //! 2 (2-body) or 3 (2-body + 3-body)
  int order() const { return order_; }
  //! r_c of the 2-body term, Å
  double cutoff() const { return rc2_; }
  //! r_c3 of the 3-body term, Å (0 for an order-2 model)
  double cutoff_3body() const { return order_ == 3 ? rc3_ : 0.0; }
  //! transition width d of f_c, Å
  double cutoff_width() const { return width_; }
  //! whether the local energy has the embedding term F(rho_i)
  bool has_embedding() const { return embedding_; }
  //! beta of the density, 1/Å (0 without the embedding term)
  double density_decay() const { return decay_; }
  //! max(r_c, r_c3): the neighbour cutoff an evaluation needs
  double max_cutoff() const { return rmax_; }
  //! "eV" or "kcal/mol"
  const std::string &energy_unit() const { return energy_unit_; }
  //! one-body energies e0 per species (energy_unit())
  const std::vector<double> &energy_offsets() const { return e0_; }
  //! total number of B-spline coefficients of all tables (memory footprint / 8 bytes)
  int64_t n_coefficients() const { return static_cast<int64_t>(coef_.size()); }

  /*! SIMD variant of the evaluation kernel chosen for this CPU at run time: "avx2" (AVX2 + FMA)
   *  or "baseline" (GPFF_KERNEL=baseline in the environment forces the baseline one). */
  static const char *kernel_isa();

  //! Per-thread scratch of compute_centre() (per-neighbour quantities). Grows to the largest
  //! neighbour count seen; reserve() it once to keep allocations out of an MD loop.
  class Workspace {
   public:
    void reserve(int n_neighbors);

   private:
    friend struct MFFModel::Impl;
    //! a neighbour within r_c3: what the triplet loop reads, packed together
    struct Near {
      double d[3];           // displacement from the centre
      double u[3];           // unit vector d / r
      double r, fc, dfc;     // distance, f_c(r; r_c3), f_c'(r; r_c3)
      double b[4], db[4];    // B-spline basis (and derivative) of r on the shared r_cj/r_ck axis
      int m;                 // its interval
      int index;             // position in the caller's neighbour arrays
      int species;
    };
    int capacity_ = 0;
    std::vector<Near> near_;
    std::vector<double> lanes_;    // SIMD-lane scratch of pair_terms() and of the 3-body loop
    std::vector<double> dphi_;     // per neighbour phi'(r)/r of the embedding density
  };

  /*! Local energy eps_i of one centre atom and the forces its terms exert on its neighbours.
   *
   *  si:        model species index of the centre (0 <= si < n_species()).
   *  n:         number of neighbours.
   *  sj:        (n) model species index of each neighbour (0 <= sj[k] < n_species()).
   *  d:         (3n) displacement d_j = r_j - r_i of each neighbour, Å (x0 y0 z0 x1 ...).
   *             Neighbours beyond max_cutoff() are ignored; periodic images, several images of
   *             one atom and images of i itself are all ordinary neighbours.
   *  f:         (3n) output, overwritten: -d eps_i / d r_j, the force on each neighbour
   *             (energy/Å). The force on the centre is minus their sum.
   *  Returns eps_i = e0(si) + 2-body + 3-body (+ embedding) terms (energy_unit()).
   *  The virial of the centre's terms is sum_j d_j (x) f_j.
   *
   *  pair_terms: false leaves the 2-body terms out (e0 + 3-body + embedding), for callers
   *             that evaluate each pair once with pair_terms(). The embedding term needs all
   *             neighbours within cutoff().
   *
   *  Preconditions (not checked here, for speed; compute() checks them): species indices in
   *  range, finite displacements, no neighbour at distance 0 from the centre or from another
   *  neighbour within r_c3 (coincident atoms). Does not throw unless the workspace cannot grow
   *  (std::bad_alloc).
   */
  double compute_centre(int si, int n, const int *sj, const double *d, double *f, Workspace &ws,
                        bool pair_terms = true) const;

  /*! The 2-body terms of a batch of pairs (i, j), for callers that evaluate each pair once
   *  for both atoms (a half neighbour list). The term phi = f_c(r_ij; r_c) g2^{s_i s_j}(r_ij) is
   *  part of eps_i and, equally, of eps_j (g2 is symmetric), so a pair contributes 2 phi to the
   *  energy.
   *
   *  si:        model species index of atom i; sj: (n) species of each atom j.
   *  rsq:       (n) squared distances r_ij^2, 0 < rsq < cutoff()^2 (not checked).
   *  phi:       (n) output, overwritten: phi of each pair (energy_unit()).
   *  fpair:     (n) output, overwritten: -(d phi / d r) / r, so that -d phi / d r_j =
   *             fpair d_ij (d_ij = r_j - r_i). The pair's force on j is 2 fpair d_ij, on i the
   *             opposite; its virial 2 fpair d_ij (x) d_ij.
   *  The square roots, divisions and cutoff functions of the batch are evaluated in SIMD
   *  lanes, then the tables. Never throws (the workspace is reserve()d to n first).
   */
  void pair_terms(int si, int n, const int *sj, const double *rsq, double *phi, double *fpair,
                  Workspace &ws) const;

  /*! Energy, per-atom energies, forces and virial of a whole configuration, from a neighbour
   *  list (e.g. ase.neighborlist.neighbor_list("ijD", atoms, max_cutoff())).
   *
   *  n_atoms:   N.
   *  species:   (N) model species index of each atom.
   *  n_pairs:   P, entries of the neighbour list.
   *  i, j:      (P) centre and neighbour atom of each entry, 0 <= i, j < N, i non-decreasing
   *             (sorted by centre); j may equal i (an image of the centre).
   *  d:         (3P) d = r_j(image) - r_i of each entry, Å; entries beyond max_cutoff() are
   *             ignored.
   *  energies:  (N) output, overwritten: per-atom energies e0 + eps_i.
   *  forces:    (3N) output, overwritten, energy/Å.
   *  virial:    (6) output, overwritten, if non-null: W = sum over the terms of every centre of
   *             d_j (x) f_j, order xx yy zz xy xz yz (energy). For a periodic cell -W/V is the
   *             stress.
   *  atom_virial: (6N) output, overwritten, if non-null: per-atom virial, each (centre,
   *             neighbour) term d_j (x) f_j split half/half between the two atoms (the split of
   *             LAMMPS' compute stress/atom for this pair style). Sums to `virial`.
   *  Returns the total energy.
   *  Throws gpff::Error on a species index out of range, i or j out of range, i not sorted,
   *  non-finite displacements or coincident atoms (distance 0), naming the entry.
   */
  double compute(int64_t n_atoms, const int32_t *species, int64_t n_pairs, const int64_t *i,
                 const int64_t *j, const double *d, double *energies, double *forces,
                 double *virial = nullptr, double *atom_virial = nullptr) const;

 private:
  //! one uniform B-spline axis: x_m = x0 + m h, m = 0..n-1
  struct Axis {
    double x0 = 0.0, h = 1.0, inv_h = 1.0;
    double m_max = 0.0;    // n - 2 (largest first coefficient index), as a double for clamping
    int n = 0;
  };
  struct PairTable {
    Axis ax;
    int64_t offset = 0;    // first coefficient in coef_
    int64_t poly = 0;      // first of its 4 (n - 1) power-form coefficients in poly_
  };
  struct TripletTable {
    Axis ax[3];
    int64_t offset = 0;
    int64_t stride0 = 0, stride1 = 0;    // (n2+2)(n3+2), n3+2
  };

  std::string path_;
  std::vector<std::string> species_;
  int n_species_ = 0;
  int order_ = 2;
  double rc2_ = 0.0, rc3_ = 0.0, width_ = 0.0, rmax_ = 0.0;
  double rc2sq_ = 0.0, rc3sq_ = 0.0, rmaxsq_ = 0.0;
  double rc2_inner_ = 0.0, rc3_inner_ = 0.0;    // r_c - d, r_c3 - d
  double pi_over_d_ = 0.0, inv_d_ = 0.0;    // pi / d, 1 / d
  std::string energy_unit_;
  std::vector<double> e0_;
  std::vector<double> coef_;              // all B-spline coefficients, table after table
  //! pair tables in power form: per interval m, s = a0 + a1 u + a2 u^2 + a3 u^3 (the same
  //! cubic as the B-spline form, fewer operations to evaluate)
  std::vector<double> poly_;
  std::vector<PairTable> pair_;           // [a * S + b], both orders
  std::vector<TripletTable> triplet_;     // [(c * S + j) * S + k], j <= k filled
  //! embedding term: F^s per centre species s (1-D tables in power form, like pair_)
  bool embedding_ = false;
  double decay_ = 0.0;
  std::vector<PairTable> embed_;
  //! all triplet tables share one grid on axes 0 and 1 (r_cj, r_ck): the per-neighbour basis
  //! on it is computed once per neighbour instead of once per triplet
  bool shared_axis_ = false;
  Axis axis01_;
  //! all triplet tables share one grid on axis 2 (r_jk) as well
  bool shared_axis2_ = false;
  Axis axis2_;

  using CentreFn = double (*)(const MFFModel &, int, int, const int *, const double *, double *,
                              Workspace &, bool);
  CentreFn centre_fn_ = nullptr;
  using PairsFn = void (*)(const MFFModel &, int, int, const int *, const double *, double *,
                           double *, Workspace &);
  PairsFn pairs_fn_ = nullptr;
};

}    // namespace gpff

#endif
