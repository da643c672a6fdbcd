/* gpff C++ inference core: symmetric gradient-domain machine learning (sGDML) model.
 *
 * Evaluates a trained sGDML model stored in a `.gpff` file (docs/model_file.md): one global
 * model of one molecule of N atoms, Matérn 5/2 kernel on the inverse-distance descriptor
 * x_ij = 1/r_ij (pairs i > j, row-major lower triangle, D = N(N-1)/2), with the M training
 * geometries expanded over their S permutational symmetries into K = M·S expansion points
 * (x_k, v_k) (sgdml_chapter eqs. 7.22-7.31). With a = sqrt(5)/sigma and d_k = |x - x_k|:
 *
 *   E(R) = c + sum_k g(d_k) (x_k - x).v_k ,           g(d) = (a^2/3)(1 + a d) exp(-a d)
 *   G    = dE/dx = sum_k [ (a^4/3) exp(-a d_k) ((x - x_k).v_k) (x - x_k) - g(d_k) v_k ]
 *   F_i  = sum_{j != i} G_ij (r_i - r_j) / r_ij^3                 (= -dE/dr_i exactly)
 *   W    = sum_{i>j} G_ij (r_i - r_j) (x) (r_i - r_j) / r_ij^3   (virial, xx yy zz xy xz yz)
 *
 * Units: positions Å, energy in energy_unit() ("kcal/mol" or "eV"), forces energy/Å,
 * virial energy. The model is immutable after construction; compute() is const and uses only
 * local scratch, so one model may be evaluated from many threads at once.
 */
#ifndef GPFF_SGDML_H
#define GPFF_SGDML_H

#include <string>
#include <vector>

#include "gpff_error.h"

namespace gpff {

class SGDMLModel {
 public:
  //! Load and validate `path`. Throws gpff::Error("<path>: <problem>").
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
  //! kernel length scale sigma (descriptor units, 1/Å)
  double sigma() const { return sigma_; }
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
   *  Throws gpff::Error on non-finite positions, coincident atoms (r_ij == 0) or a
   *  non-finite result; the outputs are then unspecified.
   */
  double compute(const double *x, double *f, double *virial = nullptr,
                 double *atom_virial = nullptr) const;

  //! flop count of the kernel sum of one compute() call (for benchmarks)
  double flops_per_call() const;

  //! expansion points per interleaved block (see data_)
  static constexpr int BLOCK = 32;

 private:
  std::string path_;
  int n_atoms_ = 0, n_desc_ = 0, n_perms_ = 0, n_train_ = 0, n_points_ = 0, n_blocks_ = 0;
  std::vector<int> z_;
  std::vector<std::string> species_;
  std::string energy_unit_;
  double molecule_extent_ = 0.0, sigma_ = 0.0, c_ = 0.0;
  /* Expansion points, interleaved in blocks of BLOCK points so that the hot loop runs over
   * contiguous lanes with no horizontal reductions: block b holds
   *   x_k: data_[(2b)   * D*BLOCK + j*BLOCK + l]
   *   v_k: data_[(2b+1) * D*BLOCK + j*BLOCK + l]       for k = b*BLOCK + l, j = 0..D-1.
   * Padding points (k >= K) have x_k = 0, v_k = 0 and contribute nothing. */
  std::vector<double> data_;
};

//! atomic number of an element symbol ("H" -> 1), 0 if unknown
int atomic_number(const std::string &symbol);
//! element symbol of an atomic number (1 -> "H"), "" if out of range
std::string element_symbol(int z);

}    // namespace gpff

#endif
