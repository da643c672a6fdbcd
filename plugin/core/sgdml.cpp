/* gpff C++ inference core: sGDML model (see sgdml.h and docs/model_file.md for the equations;
 * the FCHL19 descriptor is in fchl19.cpp). */

#include "sgdml.h"

#include "model_file.h"
#include "gpff_simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include <unistd.h>

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

/* FCHL19 parameters of a model with descriptor "fchl19" (docs/model_file.md): flat metadata keys
 * fchl19_*, all required; integers >= 1, reals finite and > 0 (zeta finite and >= 0). */
static FCHL19Params read_fchl19_params(const ModelFile &mf)
{
  const auto require = [&](const char *key) {
    if (!mf.has_key(key))
      throw mf.error(std::string("metadata key '") + key + "' is missing (required by descriptor 'fchl19')");
  };
  const auto integer = [&](const char *key) {
    require(key);
    const int64_t v = mf.meta_int(key);    // a JSON integer
    if (v < 1 || v > 10000)
      throw mf.error(std::string(key) + " must be an integer >= 1 (at most 10000), got " + std::to_string(v));
    return static_cast<int>(v);
  };
  const auto real = [&](const char *key, bool zero_ok) {
    require(key);
    const double v = mf.meta_double(key);    // a number, finite
    if (zero_ok ? !(v >= 0.0) : !(v > 0.0))
      throw mf.error(std::string(key) + (zero_ok ? " must be >= 0" : " must be > 0") + ", got " + number_text(v));
    return v;
  };
  FCHL19Params p;
  p.n_rs2 = integer("fchl19_n_rs2");
  p.n_rs3 = integer("fchl19_n_rs3");
  p.n_fourier = integer("fchl19_n_fourier");
  p.eta2 = real("fchl19_eta2", false);
  p.eta3 = real("fchl19_eta3", false);
  p.zeta = real("fchl19_zeta", true);
  p.rcut = real("fchl19_rcut", false);
  p.acut = real("fchl19_acut", false);
  p.two_body_decay = real("fchl19_two_body_decay", false);
  p.three_body_decay = real("fchl19_three_body_decay", false);
  p.three_body_weight = real("fchl19_three_body_weight", false);
  return p;
}

/* Training geometries R_train or force coefficients alpha of a fchl19 model (docs/model_file.md):
 * tensor `name`, float64 of shape (M, N, 3), finite; M = n_train. */
static std::vector<double> read_frames(const ModelFile &mf, const char *name, int64_t m, int64_t n)
{
  const auto &info = mf.tensor_info(name);
  const bool frames = info.shape.size() == 3 && info.shape[1] == n && info.shape[2] == 3;
  if (!frames || info.shape[0] != m)
    throw mf.error((frames ? "metadata n_train = " + std::to_string(m) + " but " : std::string()) + "tensor '" +
                   name + "' has shape " + shape_string(info.shape) + ", expected (M, N, 3) = " +
                   shape_string({m, n, 3}));
  auto values = mf.f64(name, {m, n, 3});
  for (double value : values)
    if (!std::isfinite(value)) throw mf.error(std::string("tensor '") + name + "' contains non-finite values");
  return values;
}

SGDMLModel::SGDMLModel(const std::string &path) : path_(path)
{
  ModelFile mf(path);

  const std::string kind = mf.model_kind();
  if (kind != "sgdml") throw mf.error("model kind '" + kind + "' is not 'sgdml'");
  kernel_name_ = mf.meta_string("kernel");
  if (kernel_name_ == "matern52")
    kernel_kind_ = 0;
  else if (kernel_name_ == "rbf")
    kernel_kind_ = 1;
  else
    throw mf.error("unsupported kernel '" + kernel_name_ +
                   "' (the C++ core evaluates matern52 and rbf)");
  descriptor_ = mf.meta_string("descriptor");
  if (descriptor_ == "inverse_distance")
    desc_kind_ = 0;
  else if (descriptor_ == "fchl19")
    desc_kind_ = 1;
  else
    throw mf.error("descriptor '" + descriptor_ +
                   "' is not supported (the C++ core evaluates 'inverse_distance' and 'fchl19')");

  energy_unit_ = mf.energy_unit();

  // inverse distance: exponent p (optional, default 1); fchl19: its parameters (all required;
  // a descriptor_exponent key is ignored)
  FCHL19Params fchl_params;
  if (desc_kind_ == 0 && mf.has_key("descriptor_exponent")) {
    desc_exp_ = mf.meta_double("descriptor_exponent");    // a number, finite
    if (!(desc_exp_ > 0.0))
      throw mf.error("descriptor_exponent must be > 0, got " + number_text(desc_exp_));
  }
  desc_exp_kind_ = desc_exp_ == 1.0 ? 1 : desc_exp_ == 2.0 ? 2 : 0;
  if (desc_kind_ == 1) fchl_params = read_fchl19_params(mf);

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
  const auto z32 = mf.i32("z", {n});
  z_.assign(z32.begin(), z32.end());
  {
    int64_t n_desc = n * (n - 1) / 2;    // also the number of pairs, which must fit an int
    if (n_desc > std::numeric_limits<int>::max())
      throw mf.error("tensor 'z': " + std::to_string(n) + " atoms have more than 2^31 - 1 pairs");
    if (desc_kind_ == 1) {
      for (int i = 0; i < n_atoms_; ++i)
        if (z_[i] < 1 || z_[i] >= N_ELEMENTS)
          throw mf.error("tensor 'z': z[" + std::to_string(i) + "] = " + std::to_string(z_[i]) +
                         " is not an atomic number");
      fchl_ = FCHL19(fchl_params, z_);
      n_desc = n * fchl_.rep_size();    // < 2^63: N <= 1e5, nrep <= 118^2 * 1e4 * 2e4
    }
    if (n_desc > std::numeric_limits<int>::max())
      throw mf.error("descriptor size D = " + std::to_string(n_desc) + " is too large (more than 2^31 - 1 entries)");
    n_desc_ = static_cast<int>(n_desc);
  }
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

  // permutations: S rows, row 0 the identity, each a permutation of 0..N-1 within elements,
  // pairwise distinct and closed under composition (a finite group)
  const auto &pinfo = mf.tensor_info("perms");
  if (pinfo.shape.size() != 2 || pinfo.shape[1] != n || pinfo.shape[0] < 1)
    throw mf.error("tensor 'perms' has shape " + shape_string(pinfo.shape) + ", expected (S, " +
                   std::to_string(n) + ") with S >= 1");
  const int64_t s = pinfo.shape[0];
  if (s > 100000) throw mf.error("tensor 'perms': " + std::to_string(s) + " permutations (more than 100000)");
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
  for (int i = 0; i < n_atoms_; ++i)
    if (perms[i] != i) throw mf.error("perms row 0 is not the identity");
  n_perms_ = static_cast<int>(s);
  if (mf.meta_int("n_perms") != s)
    throw mf.error("metadata n_perms = " + std::to_string(mf.meta_int("n_perms")) +
                   " but tensor 'perms' has " + std::to_string(s) + " rows");
  {
    // rows sorted for binary search; O(S^2 N log S), S <= a few hundred in practice
    using Row = std::vector<int32_t>;
    std::vector<std::pair<Row, int64_t>> rows;
    rows.reserve(s);
    for (int64_t q = 0; q < s; ++q) rows.emplace_back(Row(perms.begin() + q * n, perms.begin() + (q + 1) * n), q);
    std::sort(rows.begin(), rows.end());
    for (size_t k = 1; k < rows.size(); ++k)
      if (rows[k].first == rows[k - 1].first)
        throw mf.error("perms rows " + std::to_string(std::min(rows[k - 1].second, rows[k].second)) +
                       " and " + std::to_string(std::max(rows[k - 1].second, rows[k].second)) +
                       " are equal: perms do not form a group");
    Row comp(n);
    for (int64_t q = 0; q < s; ++q)
      for (int64_t r = 0; r < s; ++r) {
        for (int i = 0; i < n_atoms_; ++i) comp[i] = perms[q * n + perms[r * n + i]];
        auto it = std::lower_bound(rows.begin(), rows.end(), std::make_pair(comp, int64_t(-1)));
        if (it == rows.end() || it->first != comp)
          throw mf.error("perms do not form a group: row " + std::to_string(q) + " composed with row " +
                         std::to_string(r) + " is not a row");
      }
  }
  /* training rows x_m, v_m: (M, D) each, M = metadata n_train. Inverse distance: stored as
   * R_desc and R_d_desc_alpha. fchl19: the file stores the training geometries R_train and force
   * coefficients alpha, (M, N, 3) each, and the rows are recomputed below. A file holding the
   * other layout's tensors is refused. */
  const int64_t m = mf.meta_int("n_train");
  if (m < 1 || m > (int64_t(1) << 31) - 1)
    throw mf.error("metadata n_train = " + std::to_string(m) + " out of range (>= 1)");
  const auto refuse = [&](const char *name, const char *layout) {
    if (mf.has_tensor(name))
      throw mf.error("tensor '" + std::string(name) + "' does not belong in a model with descriptor '" +
                     descriptor_ + "', whose file stores " + layout + " (docs/model_file.md)");
  };
  if (desc_kind_ == 1)
    for (const char *name : {"R_desc", "R_d_desc_alpha"})
      refuse(name, "the training geometries R_train and force coefficients alpha, (M, N, 3) each");
  else
    for (const char *name : {"R_train", "alpha"})
      refuse(name, "the training rows R_desc and R_d_desc_alpha, (M, D) each");
  std::vector<double> x_m, v_m, r_train, alpha;
  if (desc_kind_ == 0) {
    for (const char *name : {"R_desc", "R_d_desc_alpha"}) {
      const auto &info = mf.tensor_info(name);
      if (info.shape.size() != 2 || info.shape[1] != n_desc_ || info.shape[0] != m) {
        std::string problem = "tensor '" + std::string(name) + "' has shape " + shape_string(info.shape) +
                              ", expected (M, D) = " + shape_string({m, n_desc_});
        if (info.shape.size() == 2 && info.shape[1] == n_desc_ && s > 1 && info.shape[0] == m * s)
          problem += " (it has M*S rows: the expanded layout of older files; re-save the model)";
        else if (info.shape.size() == 2 && info.shape[1] == n_desc_)
          problem = "metadata n_train = " + std::to_string(m) + " but " + problem;
        throw mf.error(problem);
      }
    }
    x_m = mf.f64("R_desc", {m, n_desc_});
    v_m = mf.f64("R_d_desc_alpha", {m, n_desc_});
    for (double value : x_m)
      if (!std::isfinite(value)) throw mf.error("tensor 'R_desc' contains non-finite values");
    for (double value : v_m)
      if (!std::isfinite(value)) throw mf.error("tensor 'R_d_desc_alpha' contains non-finite values");
  } else {
    r_train = read_frames(mf, "R_train", m, n);
    alpha = read_frames(mf, "alpha", m, n);
    for (int64_t f = 0; f < m; ++f) {
      const double *r = r_train.data() + f * 3 * n;
      for (int i = 1; i < n_atoms_; ++i)
        for (int j = 0; j < i; ++j) {
          const double dx = r[3 * i] - r[3 * j], dy = r[3 * i + 1] - r[3 * j + 1], dz = r[3 * i + 2] - r[3 * j + 2];
          if (!(dx * dx + dy * dy + dz * dz > 0.0))
            throw mf.error("tensor 'R_train': atoms " + std::to_string(i) + " and " + std::to_string(j) +
                           " of frame " + std::to_string(f) + " coincide (r_ij = 0)");
        }
    }
    /* the recomputed rows (and the descriptor permutations) are not backed by the file, so
     * absurd FCHL19 parameters could ask for any amount of memory: refuse more than the machine
     * has */
    const double need = 8.0 * n_desc_ * (2.0 * BLOCK * ((m + BLOCK - 1) / BLOCK) + 0.5 * s) +
                        16.0 * fchl_.work_size();
    const double have = static_cast<double>(sysconf(_SC_PHYS_PAGES)) * static_cast<double>(sysconf(_SC_PAGE_SIZE));
    if (have > 0.0 && need > have) {
      char text[160];
      std::snprintf(text, sizeof text, "%.3g GB to rebuild the training rows, more than this machine's %.3g GB",
                    need * 1e-9, have * 1e-9);
      throw mf.error("descriptor 'fchl19' with D = N * nrep = " + std::to_string(n_atoms_) + " * " +
                     std::to_string(fchl_.rep_size()) + " and M = " + std::to_string(m) + " needs " + text);
    }
  }
  std::vector<double> beta;
  if (mf.has_tensor("alpha_E")) {
    beta = mf.f64("alpha_E", {m});
    for (double value : beta)
      if (!std::isfinite(value)) throw mf.error("tensor 'alpha_E' contains non-finite values");
  }
  n_train_ = static_cast<int>(m);

  /* descriptor-entry permutations, x_q[k] = x[desc_perm_[q*D + k]] for the query ordering
   * R[p_q] (after the tensor shapes are checked, so that D is backed by the file):
   *   inverse distance: pair (a, b), a > b, of R[p_q] is pair (p_q[a], p_q[b]) of R;
   *   fchl19: atom a of R[p_q] is atom p_q[a] of R (same element), x_q[a*nrep + t] = x[p_q[a]*nrep + t] */
  desc_perm_.resize(static_cast<size_t>(s) * n_desc_);
  if (desc_kind_ == 0) {
    for (int64_t q = 0; q < s; ++q)
      for (int a = 1, k = 0; a < n_atoms_; ++a)
        for (int b = 0; b < a; ++b, ++k) {
          int i = perms[q * n + a], j = perms[q * n + b];
          if (i < j) std::swap(i, j);
          desc_perm_[q * n_desc_ + k] = i * (i - 1) / 2 + j;
        }
  } else {
    const int nrep = static_cast<int>(fchl_.rep_size());
    for (int64_t q = 0; q < s; ++q)
      for (int a = 0; a < n_atoms_; ++a)
        for (int t = 0; t < nrep; ++t)
          desc_perm_[q * n_desc_ + static_cast<int64_t>(a) * nrep + t] = perms[q * n + a] * nrep + t;
  }

  /* interleave into blocks of BLOCK rows (see sgdml.h). fchl19: x_m = x(R_m) and
   * v_m = J(R_m) alpha_m, the directional derivative of the descriptor along alpha_m, by
   * forward-mode differentiation (FCHL19::jvp), frame by frame (x_m and v_m then hold one row) */
  const size_t d = n_desc_;
  n_blocks_ = static_cast<int>((m + BLOCK - 1) / BLOCK);
  data_.assign(static_cast<size_t>(n_blocks_) * 2 * d, Lanes{});
  if (desc_kind_ == 1) {
    x_m.resize(d);
    v_m.resize(d);
  }
  for (int64_t row = 0; row < m; ++row) {
    const double *xr = x_m.data(), *vr = v_m.data();
    if (desc_kind_ == 0) {
      xr += row * d;
      vr += row * d;
    } else {
      const size_t f = static_cast<size_t>(row) * 3 * n_atoms_;
      try {
        fchl_.jvp(r_train.data() + f, alpha.data() + f, x_m.data(), v_m.data());
      } catch (const Error &e) {
        throw mf.error("tensor 'R_train', frame " + std::to_string(row) + ": " + e.what());
      }
      for (size_t j = 0; j < d; ++j)
        if (!std::isfinite(xr[j]) || !std::isfinite(vr[j]))
          throw mf.error("frame " + std::to_string(row) +
                         " of tensors 'R_train' and 'alpha' gives non-finite x_m or v_m (values out of range)");
    }
    const size_t b = row / BLOCK, l = row % BLOCK;
    Lanes *xb = data_.data() + 2 * b * d, *vb = xb + d;
    for (size_t j = 0; j < d; ++j) {
      xb[j].v[l] = xr[j];
      vb[j].v[l] = vr[j];
    }
  }
  if (!beta.empty()) {
    beta_.assign(static_cast<size_t>(n_blocks_), Lanes{});
    for (int64_t row = 0; row < m; ++row) beta_[row / BLOCK].v[row % BLOCK] = beta[row];
  }
}

// ---- the kernel sum ----------------------------------------------------------------------------

/* The kernel below is written once over a vector type V (gpff_simd.h) and instantiated per ISA
 * with V of the native width (a vector wider than the ISA's registers is lowered badly, through
 * the stack): v8d for AVX-512, v4d for AVX2+FMA, v2d for baseline x86-64 (and other
 * architectures). A block of BLOCK = 8 rows is 8 / W vectors of W lanes. */

template <class V>
static GPFF_INLINE V load(const double *p)
{
  return *reinterpret_cast<const V *>(p);
}
template <class V>
static GPFF_INLINE void store(double *p, V v)
{
  *reinterpret_cast<V *>(p) = v;
}

/* exp(-t) for t >= 0, branch-free so that the compiler vectorises it (std::exp is a scalar libm
 * call): Cody-Waite reduction -t = k ln2 + r, |r| <= ln2/2, exp(r) by its degree-13 Taylor
 * polynomial (truncation < 2e-17 relative), 2^k assembled in the exponent bits. Accurate to a
 * few ulp. t is clamped to 708 (exp(-708) ~ 3e-308, the smallest normal double is 2.2e-308),
 * so terms that would underflow contribute at most ~1e-307 instead of 0. */
static GPFF_INLINE double exp_neg(double t)
{
  const double y = -(t > 708.0 ? 708.0 : t);    // a select (NaN passes through), not std::min
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
  const uint64_t bits = __builtin_bit_cast(uint64_t, kf + (shifter + 1023.0)) << 52;
  return p * __builtin_bit_cast(double, bits);
}

/* Parameters of the kernel functions (see kernel_params()):
 *   matern52: a = sqrt(5)/sigma, c1 = a^2/3,  c2 = a^4/3
 *   rbf:      a = 1/(2 sigma^2), c1 = 1/sigma^2, c2 = 1/sigma^4 */
struct KParams {
  double a, c1, c2;
};
enum { MATERN52 = 0, RBF = 1 };

/* One block of BLOCK training rows (xb, vb: D x BLOCK each; betab: BLOCK energy coefficients if
 * BETA) against Q query orderings (xq: Q rows of D, stride d), accumulating lane-wise into gacc
 * (Q x D x BLOCK) and energy. Pass 1 keeps its 2Q(BLOCK/W) accumulators in registers; the block
 * is read from L1. */
template <class V, int Q, int KIND, bool BETA>
static GPFF_INLINE void block_chunk(const double *__restrict xb, const double *__restrict vb,
                                    const double *__restrict betab, int d,
                                    const double *__restrict xq, double *__restrict gacc,
                                    const KParams kp, V *energy)
{
  constexpr int B = SGDMLModel::BLOCK, W = sizeof(V) / sizeof(double), H = B / W;
  // U partial sums over j so that >= 8 independent FMA chains hide the FMA latency when Q*H
  // is small (S = 1, 2): 2 FMA ports x 4 cycles
  constexpr int U = (4 + Q * H - 1) / (Q * H);
  V d2[U][Q][H], dot[U][Q][H];
  for (int k = 0; k < U; ++k)
    for (int t = 0; t < Q; ++t)
      for (int h = 0; h < H; ++h) d2[k][t][h] = dot[k][t][h] = V{};
  int j = 0;
  for (; j + U <= d; j += U)
    for (int k = 0; k < U; ++k)
      for (int h = 0; h < H; ++h) {
        const V x = load<V>(xb + (j + k) * B + h * W), v = load<V>(vb + (j + k) * B + h * W);
        for (int t = 0; t < Q; ++t) {
          const V u = xq[t * d + j + k] - x;
          d2[k][t][h] += u * u;
          dot[k][t][h] += u * v;
        }
      }
  for (; j < d; ++j)
    for (int h = 0; h < H; ++h) {
      const V x = load<V>(xb + j * B + h * W), v = load<V>(vb + j * B + h * W);
      for (int t = 0; t < Q; ++t) {
        const V u = xq[t * d + j] - x;
        d2[0][t][h] += u * u;
        dot[0][t][h] += u * v;
      }
    }
  for (int k = 1; k < U; ++k)
    for (int t = 0; t < Q; ++t)
      for (int h = 0; h < H; ++h) {
        d2[0][t][h] += d2[k][t][h];
        dot[0][t][h] += dot[k][t][h];
      }

  // scalars of the Q*B (ordering, row) pairs, dot = u.v_m:
  //   sv = k1,  su = k2 dot (+ k1 beta),  se = k1 dot (+ beta k)
  alignas(64) double sd2[Q * B], sdot[Q * B], su[Q * B], sv[Q * B], se[Q * B];
  alignas(64) double sbeta[BETA ? Q * B : 1];
  for (int t = 0; t < Q; ++t)
    for (int h = 0; h < H; ++h) {
      store<V>(sd2 + t * B + h * W, d2[0][t][h]);
      store<V>(sdot + t * B + h * W, dot[0][t][h]);
      if constexpr (BETA) store<V>(sbeta + t * B + h * W, load<V>(betab + h * W));
    }
#pragma omp simd
  for (int l = 0; l < Q * B; ++l) {
    double k1, k2, kk = 0.0;
    if constexpr (KIND == MATERN52) {
      const double ad = kp.a * std::sqrt(sd2[l]);
      const double e = exp_neg(ad);
      k1 = -kp.c1 * (1.0 + ad) * e;
      k2 = kp.c2 * e;
      if constexpr (BETA) kk = (1.0 + ad + ad * ad * (1.0 / 3.0)) * e;
    } else {
      const double e = exp_neg(kp.a * sd2[l]);
      k1 = -kp.c1 * e;
      k2 = kp.c2 * e;
      kk = e;
    }
    sv[l] = k1;
    if constexpr (BETA) {
      su[l] = k2 * sdot[l] + k1 * sbeta[l];
      se[l] = k1 * sdot[l] + sbeta[l] * kk;
    } else {
      su[l] = k2 * sdot[l];
      se[l] = k1 * sdot[l];
    }
  }
  for (int k = 0; k < Q * H; ++k) energy[k % H] += load<V>(se + k * W);

  // pass 2: G_q += su (x_q - x_m) + sv v_m, lane-wise
  for (int j = 0; j < d; ++j)
    for (int h = 0; h < H; ++h) {
      const V x = load<V>(xb + j * B + h * W), v = load<V>(vb + j * B + h * W);
      for (int t = 0; t < Q; ++t) {
        double *acc = gacc + (static_cast<size_t>(t) * d + j) * B + h * W;
        const V u = xq[t * d + j] - x;
        store<V>(acc, load<V>(acc) + load<V>(su + t * B + h * W) * u +
                          load<V>(sv + t * B + h * W) * v);
      }
    }
}

/* Sum over the M training rows (n_blocks blocks, layout in sgdml.h) and the S query orderings.
 *   beta: (n_blocks*BLOCK) energy coefficients, read only if BETA
 *   xq:   (S, D) descriptors of the query orderings
 *   gq:   (S, D) output G_q = dE/dx_q
 *   gacc: (S*D*BLOCK) scratch, 64-byte aligned
 * Returns sum_q sum_m [beta_m k(d_qm) + k1(d_qm) (x_q - x_m).v_m] (the energy without c).
 * The orderings are taken in chunks of at most QMAX (pass 1 accumulators in registers); every
 * block of rows is loaded from memory once and reused from L1 for all chunks. */
template <class V, int QMAX, int KIND, bool BETA>
static GPFF_INLINE double kernel_sum_impl(const double *__restrict data,
                                          const double *__restrict beta, int n_blocks, int d,
                                          int s, const double *__restrict xq, const KParams kp,
                                          double *__restrict gq, double *__restrict gacc)
{
  static_assert(QMAX >= 1 && QMAX <= 6, "chunk sizes 1..6 are instantiated");
  constexpr int B = SGDMLModel::BLOCK, W = sizeof(V) / sizeof(double), H = B / W;
  std::fill(gacc, gacc + static_cast<size_t>(s) * d * B, 0.0);
  const int n_chunks = (s + QMAX - 1) / QMAX, base = s / n_chunks, extra = s % n_chunks;
  V energy[H];
  for (int h = 0; h < H; ++h) energy[h] = V{};

  for (int b = 0; b < n_blocks; ++b) {
    const double *xb = data + static_cast<size_t>(2 * b) * d * B;
    const double *vb = xb + static_cast<size_t>(d) * B;
    const double *bb = BETA ? beta + static_cast<size_t>(b) * B : nullptr;
    for (int c = 0, q0 = 0; c < n_chunks; ++c) {
      const int nq = base + (c < extra ? 1 : 0);
      const double *xc = xq + static_cast<size_t>(q0) * d;
      double *gc = gacc + static_cast<size_t>(q0) * d * B;
#define GPFF_CHUNK(Q) block_chunk<V, (QMAX >= Q ? Q : 1), KIND, BETA>(xb, vb, bb, d, xc, gc, kp, energy)
      switch (nq) {
        case 1: GPFF_CHUNK(1); break;
        case 2: GPFF_CHUNK(2); break;
        case 3: GPFF_CHUNK(3); break;
        case 4: GPFF_CHUNK(4); break;
        case 5: GPFF_CHUNK(5); break;
        default: block_chunk<V, QMAX, KIND, BETA>(xb, vb, bb, d, xc, gc, kp, energy); break;
      }
#undef GPFF_CHUNK
      q0 += nq;
    }
  }

  for (size_t k = 0; k < static_cast<size_t>(s) * d; ++k) {
    double sum = 0.0;
    for (int l = 0; l < B; ++l) sum += gacc[k * B + l];
    gq[k] = sum;
  }
  double e = 0.0;
  for (int h = 0; h < H; ++h)
    for (int l = 0; l < W; ++l) e += energy[h][l];
  return e;
}

/* Runtime ISA dispatch (one portable build, no -march=native needed): AVX-512 (x86-64-v4:
 * 32 zmm registers, chunks of up to 6 orderings), AVX2+FMA (x86-64-v3: 16 ymm, up to 3),
 * baseline (SSE2 on x86-64, or the target's own 128-bit vectors elsewhere: up to 2).
 * Each ISA has one instantiation per kernel and with/without the beta term. */
#define GPFF_KERNEL_ARGS                                                                    \
  const double *__restrict data, const double *__restrict beta, int n_blocks, int d, int s, \
      const double *__restrict xq, const KParams kp, double *__restrict gq,                \
      double *__restrict gacc
#define GPFF_KERNEL_PASS data, beta, n_blocks, d, s, xq, kp, gq, gacc
using KernelFn = double (*)(GPFF_KERNEL_ARGS);

//! the kernel-sum functions of one ISA, indexed [kernel kind][has beta]
struct KernelTable {
  KernelFn fn[2][2];
};

template <int KIND, bool BETA>
static double kernel_sum_base(GPFF_KERNEL_ARGS)
{
  return kernel_sum_impl<v2d, 2, KIND, BETA>(GPFF_KERNEL_PASS);
}
static const KernelTable TABLE_BASE = {{{kernel_sum_base<MATERN52, false>, kernel_sum_base<MATERN52, true>},
                                        {kernel_sum_base<RBF, false>, kernel_sum_base<RBF, true>}}};

#if defined(__x86_64__) && defined(__GNUC__) && !defined(GPFF_NO_MULTIVERSION)
#define GPFF_X86_DISPATCH 1
template <int KIND, bool BETA>
__attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx512cd,avx2,fma,bmi,bmi2")))
static double kernel_sum_avx512(GPFF_KERNEL_ARGS)
{
  return kernel_sum_impl<v8d, 6, KIND, BETA>(GPFF_KERNEL_PASS);
}
static const KernelTable TABLE_AVX512 = {
    {{kernel_sum_avx512<MATERN52, false>, kernel_sum_avx512<MATERN52, true>},
     {kernel_sum_avx512<RBF, false>, kernel_sum_avx512<RBF, true>}}};

template <int KIND, bool BETA>
__attribute__((target("avx2,fma,bmi,bmi2"))) static double kernel_sum_avx2(GPFF_KERNEL_ARGS)
{
  return kernel_sum_impl<v4d, 3, KIND, BETA>(GPFF_KERNEL_PASS);
}
static const KernelTable TABLE_AVX2 = {{{kernel_sum_avx2<MATERN52, false>, kernel_sum_avx2<MATERN52, true>},
                                        {kernel_sum_avx2<RBF, false>, kernel_sum_avx2<RBF, true>}}};
#endif

static const KernelTable *select_kernel(const char **name)
{
#ifdef GPFF_X86_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx2") &&
      __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2")) {
    *name = "avx512";
    return &TABLE_AVX512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2")) {
    *name = "avx2";
    return &TABLE_AVX2;
  }
#endif
  *name = "baseline";
  return &TABLE_BASE;
}

/* GPFF_KERNEL=baseline|avx2|avx512 in the environment forces a kernel (tests, benchmarks); an
 * ISA the CPU lacks is ignored. */
static const KernelTable *kernel_for_this_cpu(const char **chosen)
{
  static const char *name = nullptr;
  static const KernelTable *const table = [] {
    const char *best_name = nullptr;
    const KernelTable *best = select_kernel(&best_name);
    name = best_name;
    const char *want = std::getenv("GPFF_KERNEL");
    if (!want) return best;
    const std::string w = want;
    if (w == "baseline") {
      name = "baseline";
      return &TABLE_BASE;
    }
#ifdef GPFF_X86_DISPATCH
    if (w == "avx2" && std::string(best_name) != "baseline") {
      name = "avx2";
      return &TABLE_AVX2;
    }
#endif
    return best;
  }();
  if (chosen) *chosen = name;
  return table;
}

const char *SGDMLModel::kernel_isa()
{
  const char *name = nullptr;
  kernel_for_this_cpu(&name);
  return name;
}

double SGDMLModel::flops_per_call() const
{
  return static_cast<double>(n_train_) * n_perms_ * (10.0 * n_desc_ + 40.0);
}

// ---- energy, forces, virial --------------------------------------------------------------------

namespace {
//! per-thread scratch of compute(): grows to the largest model evaluated on the thread
struct Scratch {
  std::vector<double> buf;
  double *get(size_t n)
  {
    if (buf.size() < n + 8) buf.resize(n + 8);
    // 64-byte aligned start
    const auto addr = reinterpret_cast<uintptr_t>(buf.data());
    return buf.data() + ((64 - addr % 64) % 64) / sizeof(double);
  }
};
thread_local Scratch scratch_tls;
}    // namespace

double SGDMLModel::compute(const double *x, double *f, double *virial, double *atom_virial) const
{
  const int n = n_atoms_, d = n_desc_, s = n_perms_;
  const int n_pairs = n * (n - 1) / 2;
  for (int i = 0; i < 3 * n; ++i)
    if (!std::isfinite(x[i]))
      throw Error(path_ + ": non-finite position of atom " + std::to_string(i / 3));

  // scratch: gacc (S*D*BLOCK, first: 64-byte aligned), xq, gq (S*D), desc, grad (D),
  // jac (pairs; inverse distance: p / r_ij^{p+2}, then the pair factor), rvec (3 x pairs),
  // fchl19: dedr (pairs), its work area
  const size_t sd = static_cast<size_t>(s) * d;
  const size_t fchl_work = desc_kind_ == 1 ? fchl_.work_size() : 0;
  double *gacc = scratch_tls.get(sd * BLOCK + 2 * sd + 2 * static_cast<size_t>(d) +
                                 5 * static_cast<size_t>(n_pairs) + fchl_work);
  double *xq = gacc + sd * BLOCK;
  double *gq = xq + sd;
  double *desc = gq + sd;
  double *grad = desc + d;
  double *jac = grad + d;          // F_i = sum_j jac_ij (r_i - r_j): the pair factor -g_ij / r_ij
  double *rvec = jac + n_pairs;    // (pairs, 3) r_i - r_j
  double *dedr = rvec + 3 * static_cast<size_t>(n_pairs);    // fchl19: g_ij = dE/dr_ij
  double *work = dedr + n_pairs;                              // fchl19: FCHL19 work area

  // r_i - r_j of the pairs (i > j) row-major lower triangle; inverse distance: the descriptor
  // x_ij = 1/r_ij^p and the Jacobian factor p/r^{p+2} (p == 1: 1/r, 1/r^3; p == 2: 1/r^2,
  // 2/r^4; else std::pow)
  const int pk = desc_exp_kind_;
  const double pexp = desc_exp_;
  const bool inverse_distance = desc_kind_ == 0;
  for (int i = 1, p = 0; i < n; ++i)
    for (int j = 0; j < i; ++j, ++p) {
      const double dx = x[3 * i] - x[3 * j], dy = x[3 * i + 1] - x[3 * j + 1],
                   dz = x[3 * i + 2] - x[3 * j + 2];
      const double r2 = dx * dx + dy * dy + dz * dz;
      if (!(r2 > 0.0))
        throw Error(path_ + ": atoms " + std::to_string(i) + " and " + std::to_string(j) +
                    " coincide (r_ij = 0)");
      if (!inverse_distance) {
        jac[p] = std::sqrt(r2);    // r_ij, for the pair factor below
      } else if (pk == 1) {
        const double r = std::sqrt(r2);
        desc[p] = 1.0 / r;
        jac[p] = 1.0 / (r2 * r);
      } else if (pk == 2) {
        const double inv_r2 = 1.0 / r2;
        desc[p] = inv_r2;
        jac[p] = 2.0 * inv_r2 * inv_r2;
      } else {
        const double xp = std::pow(r2, -0.5 * pexp);    // r^-p
        desc[p] = xp;
        jac[p] = pexp * xp / r2;
      }
      rvec[3 * p] = dx;
      rvec[3 * p + 1] = dy;
      rvec[3 * p + 2] = dz;
    }
  if (!inverse_distance) {
    try {
      fchl_.forward(x, desc, work);
    } catch (const Error &e) {
      throw Error(path_ + ": " + e.what());
    }
  }

  // descriptors of the query orderings R[p_q]; kernel sum; G = sum_q P_q^T G_q
  const int *pp = desc_perm_.data();
  for (size_t k = 0; k < sd; ++k) xq[k] = desc[pp[k]];
  KParams kp;
  if (kernel_kind_ == 0) {
    kp.a = std::sqrt(5.0) / sigma_;
    kp.c1 = kp.a * kp.a / 3.0;
    kp.c2 = kp.a * kp.a * kp.a * kp.a / 3.0;
  } else {
    kp.a = 0.5 / (sigma_ * sigma_);
    kp.c1 = 1.0 / (sigma_ * sigma_);
    kp.c2 = kp.c1 * kp.c1;
  }
  const bool has_beta = !beta_.empty();
  const KernelFn fn = kernel_for_this_cpu(nullptr)->fn[kernel_kind_][has_beta ? 1 : 0];
  const double energy =
      c_ + fn(data_.data()->v, has_beta ? beta_.data()->v : nullptr, n_blocks_, d, s, xq, kp, gq, gacc);
  std::fill(grad, grad + d, 0.0);
  for (size_t k = 0; k < sd; ++k) grad[pp[k]] += gq[k];

  // pair factors jac_ij = -(dE/dr_ij) / r_ij: inverse distance G_ij p / r_ij^{p+2} (in the loop
  // below); fchl19 from the pullback of G to the distances
  if (!inverse_distance) {
    fchl_.backward(x, grad, dedr, work);
    for (int p = 0; p < n_pairs; ++p) jac[p] = -dedr[p] / jac[p];
  }

  // F_i = sum_{j != i} jac_ij (r_i - r_j) ; W = sum_{i>j} jac_ij r_ij (x) r_ij
  std::fill(f, f + 3 * n, 0.0);
  double w[6] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  if (atom_virial) std::fill(atom_virial, atom_virial + 6 * static_cast<size_t>(n), 0.0);
  for (int i = 1, p = 0; i < n; ++i)
    for (int j = 0; j < i; ++j, ++p) {
      const double sc = inverse_distance ? grad[p] * jac[p] : jac[p];
      const double *r = rvec + 3 * p;
      const double fx = sc * r[0], fy = sc * r[1], fz = sc * r[2];
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
