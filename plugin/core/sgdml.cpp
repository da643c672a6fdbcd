/* gpff C++ inference core: sGDML model (see sgdml.h and docs/model_file.md for the equations). */

#include "sgdml.h"

#include "model_file.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace gpff {

// ---- periodic table ----------------------------------------------------------------------------

static const char *const ELEMENTS[] = {
    "",   "H",  "He", "Li", "Be", "B",  "C",  "N",  "O",  "F",  "Ne", "Na", "Mg", "Al", "Si",
    "P",  "S",  "Cl", "Ar", "K",  "Ca", "Sc", "Ti", "V",  "Cr", "Mn", "Fe", "Co", "Ni", "Cu",
    "Zn", "Ga", "Ge", "As", "Se", "Br", "Kr", "Rb", "Sr", "Y",  "Zr", "Nb", "Mo", "Tc", "Ru",
    "Rh", "Pd", "Ag", "Cd", "In", "Sn", "Sb", "Te", "I",  "Xe", "Cs", "Ba", "La", "Ce", "Pr",
    "Nd", "Pm", "Sm", "Eu", "Gd", "Tb", "Dy", "Ho", "Er", "Tm", "Yb", "Lu", "Hf", "Ta", "W",
    "Re", "Os", "Ir", "Pt", "Au", "Hg", "Tl", "Pb", "Bi", "Po", "At", "Rn", "Fr", "Ra", "Ac",
    "Th", "Pa", "U",  "Np", "Pu", "Am", "Cm", "Bk", "Cf", "Es", "Fm", "Md", "No", "Lr", "Rf",
    "Db", "Sg", "Bh", "Hs", "Mt", "Ds", "Rg", "Cn", "Nh", "Fl", "Mc", "Lv", "Ts", "Og"};
static constexpr int N_ELEMENTS = sizeof(ELEMENTS) / sizeof(ELEMENTS[0]);    // 119 (0 unused)

int atomic_number(const std::string &symbol)
{
  for (int z = 1; z < N_ELEMENTS; ++z)
    if (symbol == ELEMENTS[z]) return z;
  return 0;
}

std::string element_symbol(int z)
{
  return (z >= 1 && z < N_ELEMENTS) ? ELEMENTS[z] : "";
}

// ---- loading -----------------------------------------------------------------------------------

SGDMLModel::SGDMLModel(const std::string &path) : path_(path)
{
  ModelFile mf(path);

  const std::string kind = mf.model_kind();
  if (kind != "sgdml") throw mf.error("model kind '" + kind + "' is not 'sgdml'");
  const std::string kernel = mf.meta_string("kernel");
  if (kernel != "matern52") throw mf.error("kernel '" + kernel + "' is not supported (only 'matern52')");
  const std::string descriptor = mf.meta_string("descriptor");
  if (descriptor != "inverse_distance")
    throw mf.error("descriptor '" + descriptor + "' is not supported (only 'inverse_distance')");

  energy_unit_ = mf.meta_object_string("units", "energy");
  if (energy_unit_ != "kcal/mol" && energy_unit_ != "eV")
    throw mf.error("energy unit '" + energy_unit_ + "' is not supported (use 'kcal/mol' or 'eV')");
  const std::string length_unit = mf.meta_object_string("units", "length");
  if (length_unit != "Angstrom")
    throw mf.error("length unit '" + length_unit + "' is not supported (only 'Angstrom')");

  sigma_ = mf.meta_double("sigma");
  if (!(sigma_ > 0.0)) throw mf.error("sigma must be > 0, got " + std::to_string(sigma_));
  c_ = mf.meta_double("integration_constant");
  molecule_extent_ = mf.meta_double("molecule_extent");
  if (molecule_extent_ < 0.0) throw mf.error("molecule_extent must be >= 0");

  // atoms
  const auto &zinfo = mf.tensor_info("z");
  if (zinfo.shape.size() != 1)
    throw mf.error("tensor 'z' has shape " + shape_string(zinfo.shape) + ", expected (N,)");
  const int64_t n = zinfo.shape[0];
  if (n < 2 || n > 100000) throw mf.error("tensor 'z': number of atoms " + std::to_string(n) + " out of range (2..100000)");
  n_atoms_ = static_cast<int>(n);
  n_desc_ = n_atoms_ * (n_atoms_ - 1) / 2;
  const auto z32 = mf.i32("z", {n});
  z_.assign(z32.begin(), z32.end());
  if (mf.meta_int("n_atoms") != n)
    throw mf.error("metadata n_atoms = " + std::to_string(mf.meta_int("n_atoms")) +
                   " but tensor 'z' has " + std::to_string(n) + " atoms");
  species_ = mf.meta_string_list("species");
  if (static_cast<int64_t>(species_.size()) != n)
    throw mf.error("species has " + std::to_string(species_.size()) + " entries, expected N = " +
                   std::to_string(n));
  for (int i = 0; i < n_atoms_; ++i) {
    const int zi = atomic_number(species_[i]);
    if (zi == 0) throw mf.error("species[" + std::to_string(i) + "] = '" + species_[i] + "' is not an element symbol");
    if (zi != z_[i])
      throw mf.error("species[" + std::to_string(i) + "] = '" + species_[i] + "' (Z = " + std::to_string(zi) +
                     ") does not match z[" + std::to_string(i) + "] = " + std::to_string(z_[i]));
  }

  // permutations
  const auto &pinfo = mf.tensor_info("perms");
  if (pinfo.shape.size() != 2 || pinfo.shape[1] != n || pinfo.shape[0] < 1)
    throw mf.error("tensor 'perms' has shape " + shape_string(pinfo.shape) + ", expected (S, " +
                   std::to_string(n) + ") with S >= 1");
  const int64_t s = pinfo.shape[0];
  const auto perms = mf.i32("perms", {s, n});
  std::vector<char> seen(n_atoms_);
  for (int64_t q = 0; q < s; ++q) {
    std::fill(seen.begin(), seen.end(), 0);
    for (int i = 0; i < n_atoms_; ++i) {
      const int32_t p = perms[q * n + i];
      if (p < 0 || p >= n_atoms_ || seen[p])
        throw mf.error("perms row " + std::to_string(q) + " is not a permutation of 0.." +
                       std::to_string(n_atoms_ - 1));
      seen[p] = 1;
      if (z_[p] != z_[i])
        throw mf.error("perms row " + std::to_string(q) + " maps atom " + std::to_string(i) +
                       " onto atom " + std::to_string(p) + " of another element");
    }
  }
  n_perms_ = static_cast<int>(s);
  if (mf.meta_int("n_perms") != s)
    throw mf.error("metadata n_perms = " + std::to_string(mf.meta_int("n_perms")) +
                   " but tensor 'perms' has " + std::to_string(s) + " rows");

  // expansion points
  const auto &rinfo = mf.tensor_info("R_desc");
  if (rinfo.shape.size() != 2 || rinfo.shape[1] != n_desc_ || rinfo.shape[0] < 1 ||
      rinfo.shape[0] % s != 0)
    throw mf.error("tensor 'R_desc' has shape " + shape_string(rinfo.shape) + ", expected (M*S, " +
                   std::to_string(n_desc_) + ") with S = " + std::to_string(s));
  const int64_t k = rinfo.shape[0];
  if (k > (int64_t(1) << 31) - 1) throw mf.error("too many expansion points");
  const auto x_k = mf.f64("R_desc", {k, n_desc_});
  const auto v_k = mf.f64("R_d_desc_alpha", {k, n_desc_});
  for (double value : x_k)
    if (!std::isfinite(value)) throw mf.error("tensor 'R_desc' contains non-finite values");
  for (double value : v_k)
    if (!std::isfinite(value)) throw mf.error("tensor 'R_d_desc_alpha' contains non-finite values");
  n_points_ = static_cast<int>(k);
  n_train_ = static_cast<int>(k / s);
  if (mf.meta_int("n_train") != n_train_)
    throw mf.error("metadata n_train = " + std::to_string(mf.meta_int("n_train")) + " but " +
                   std::to_string(k) + " expansion points / " + std::to_string(s) +
                   " permutations = " + std::to_string(n_train_));

  // interleave into blocks (see sgdml.h)
  const int d = n_desc_;
  n_blocks_ = (n_points_ + BLOCK - 1) / BLOCK;
  data_.assign(static_cast<size_t>(n_blocks_) * 2 * d * BLOCK, 0.0);
  for (int p = 0; p < n_points_; ++p) {
    const int b = p / BLOCK, l = p % BLOCK;
    double *xb = data_.data() + static_cast<size_t>(2 * b) * d * BLOCK;
    double *vb = xb + static_cast<size_t>(d) * BLOCK;
    for (int j = 0; j < d; ++j) {
      xb[j * BLOCK + l] = x_k[static_cast<size_t>(p) * d + j];
      vb[j * BLOCK + l] = v_k[static_cast<size_t>(p) * d + j];
    }
  }
}

// ---- the kernel sum ----------------------------------------------------------------------------

/* Function multiversioning: one build runs AVX-512 / AVX2+FMA code where the CPU has it and
 * plain x86-64 code elsewhere (no -march=native needed). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && (__GNUC__ >= 12) && \
    defined(__GLIBC__) && !defined(GPFF_NO_MULTIVERSION)
#define GPFF_TARGET_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define GPFF_TARGET_CLONES
#endif

/* exp(-t) for t >= 0, written so that the compiler vectorises it (std::exp is a scalar libm
 * call): Cody-Waite reduction -t = k ln2 + r, |r| <= ln2/2, exp(r) by its degree-13 Taylor
 * polynomial (truncation < 2e-17 relative), 2^k assembled in the exponent bits. Accurate to a
 * few ulp. t is clamped to 708 (exp(-708) ~ 3e-308, the smallest normal double is 2.2e-308),
 * so terms that would underflow contribute at most ~1e-307 instead of 0. */
static inline double exp_neg(double t)
{
  const double y = -std::min(t, 708.0);
  const double shifter = 6755399441055744.0;    // 1.5 * 2^52: adding it rounds to an integer
  const double kf = (y * 1.4426950408889634 + shifter) - shifter;    // round(y / ln2)
  const double r = (y - kf * 6.93147180369123816490e-01) - kf * 1.90821492927058770002e-10;
  double p = 1.0 / 6227020800.0;    // 1/13!
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  // 2^k: k + 1023 sits in the low mantissa bits of kf + shifter + 1023
  const double biased = kf + (shifter + 1023.0);
  uint64_t bits;
  std::memcpy(&bits, &biased, sizeof(bits));
  bits <<= 52;
  double scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

/* Sum over the K expansion points (blocks of BLOCK points, layout in sgdml.h).
 *   x:    (D) descriptor of the query geometry
 *   g:    (D) output G = dE/dx
 *   gacc: (D*BLOCK) scratch
 * Returns sum_k g(d_k) (x_k - x).v_k (the energy without c).
 * The lanes l of a block are independent, so every inner loop is a plain vector loop; BLOCK
 * lanes give enough independent FMA chains to hide their latency. */
GPFF_TARGET_CLONES
static double kernel_sum(const double *__restrict data, int n_blocks, int d, const double *__restrict x,
                         double a, double *__restrict g, double *__restrict gacc)
{
  constexpr int B = SGDMLModel::BLOCK;
  const double a2_3 = a * a / 3.0, a4_3 = a * a * a * a / 3.0;
  double energy = 0.0;
  std::fill(gacc, gacc + static_cast<size_t>(d) * B, 0.0);

  for (int b = 0; b < n_blocks; ++b) {
    const double *__restrict xb = data + static_cast<size_t>(2 * b) * d * B;
    const double *__restrict vb = xb + static_cast<size_t>(d) * B;

    // pass 1: d_k^2 = |x - x_k|^2 and dot_k = (x - x_k).v_k for the BLOCK lanes
    double d2[B] = {}, dot[B] = {};
    for (int j = 0; j < d; ++j) {
      const double xj = x[j];
      for (int l = 0; l < B; ++l) {
        const double diff = xj - xb[j * B + l];
        d2[l] += diff * diff;
        dot[l] += diff * vb[j * B + l];
      }
    }

    // scalars: c1_k = (a^4/3) e^{-a d} dot_k, g_k = (a^2/3)(1 + a d) e^{-a d}
    double c1[B], gk[B], eb[B];
    for (int l = 0; l < B; ++l) {
      const double ad = a * std::sqrt(d2[l]);
      const double e = exp_neg(ad);
      gk[l] = a2_3 * (1.0 + ad) * e;
      c1[l] = a4_3 * e * dot[l];
      eb[l] = gk[l] * dot[l];
    }
    for (int l = 0; l < B; ++l) energy -= eb[l];    // g(d_k) (x_k - x).v_k

    // pass 2: G += c1_k (x - x_k) - g_k v_k, lane-wise (reduced over lanes at the end)
    for (int j = 0; j < d; ++j) {
      const double xj = x[j];
      for (int l = 0; l < B; ++l)
        gacc[j * B + l] += c1[l] * (xj - xb[j * B + l]) - gk[l] * vb[j * B + l];
    }
  }

  for (int j = 0; j < d; ++j) {
    double s = 0.0;
    for (int l = 0; l < B; ++l) s += gacc[j * B + l];
    g[j] = s;
  }
  return energy;
}

double SGDMLModel::flops_per_call() const
{
  // per point and descriptor entry: pass 1 sub + 2 fma (5), pass 2 sub + mul + fma + add (5);
  // per point ~20 for sqrt/exp/scalars (exp counted as 1), descriptor and forces negligible
  return static_cast<double>(n_blocks_) * BLOCK * (10.0 * n_desc_ + 20.0);
}

// ---- energy, forces, virial --------------------------------------------------------------------

double SGDMLModel::compute(const double *x, double *f, double *virial, double *atom_virial) const
{
  const int n = n_atoms_, d = n_desc_;
  for (int i = 0; i < 3 * n; ++i)
    if (!std::isfinite(x[i]))
      throw Error(path_ + ": non-finite position of atom " + std::to_string(i / 3));

  // descriptor x_ij = 1/r_ij, pairs (i > j) row-major lower triangle; keep r_ij and 1/r^3
  std::vector<double> scratch(static_cast<size_t>(d) * (2 + 4 + BLOCK));
  double *desc = scratch.data();
  double *grad = desc + d;
  double *rvec = grad + d;        // (D, 3) r_i - r_j
  double *inv_r3 = rvec + 3 * d;  // (D)
  double *gacc = inv_r3 + d;      // (D*BLOCK)
  for (int i = 1, p = 0; i < n; ++i)
    for (int j = 0; j < i; ++j, ++p) {
      const double dx = x[3 * i] - x[3 * j], dy = x[3 * i + 1] - x[3 * j + 1],
                   dz = x[3 * i + 2] - x[3 * j + 2];
      const double r2 = dx * dx + dy * dy + dz * dz;
      if (!(r2 > 0.0))
        throw Error(path_ + ": atoms " + std::to_string(i) + " and " + std::to_string(j) +
                    " coincide (r_ij = 0)");
      const double r = std::sqrt(r2);
      desc[p] = 1.0 / r;
      inv_r3[p] = 1.0 / (r2 * r);
      rvec[3 * p] = dx;
      rvec[3 * p + 1] = dy;
      rvec[3 * p + 2] = dz;
    }

  const double a = std::sqrt(5.0) / sigma_;
  const double energy = c_ + kernel_sum(data_.data(), n_blocks_, d, desc, a, grad, gacc);

  // F_i = sum_{j != i} G_ij (r_i - r_j) / r_ij^3 ; W = sum_{i>j} G_ij r_ij (x) r_ij / r_ij^3
  std::fill(f, f + 3 * n, 0.0);
  double w[6] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  if (atom_virial) std::fill(atom_virial, atom_virial + 6 * static_cast<size_t>(n), 0.0);
  for (int i = 1, p = 0; i < n; ++i)
    for (int j = 0; j < i; ++j, ++p) {
      const double s = grad[p] * inv_r3[p];
      const double *r = rvec + 3 * p;
      const double fx = s * r[0], fy = s * r[1], fz = s * r[2];
      f[3 * i] += fx;
      f[3 * i + 1] += fy;
      f[3 * i + 2] += fz;
      f[3 * j] -= fx;
      f[3 * j + 1] -= fy;
      f[3 * j + 2] -= fz;
      const double wp[6] = {r[0] * fx, r[1] * fy, r[2] * fz, r[0] * fy, r[0] * fz, r[1] * fz};
      for (int c = 0; c < 6; ++c) w[c] += wp[c];
      if (atom_virial)
        for (int c = 0; c < 6; ++c) {
          atom_virial[6 * i + c] += 0.5 * wp[c];
          atom_virial[6 * j + c] += 0.5 * wp[c];
        }
    }
  if (virial) std::copy(w, w + 6, virial);

  bool finite = std::isfinite(energy);
  for (int i = 0; finite && i < 3 * n; ++i) finite = std::isfinite(f[i]);
  if (!finite) throw Error(path_ + ": non-finite energy or forces (positions out of range?)");
  return energy;
}

}    // namespace gpff
