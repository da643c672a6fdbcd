/* gpff C++ inference core: mapped force field (see mff.h and docs/mff.md). */

#include "mff.h"

#include "gpff_simd.h"
#include "model_file.h"
#include "model_file_json.h"
#include "sgdml.h"    // atomic_number

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <utility>

namespace gpff {

namespace {

constexpr double PI = 3.14159265358979323846;
//! largest n_points of one spline axis (keeps every index and size far from overflow)
constexpr int64_t MAX_POINTS = 1 << 24;

//! finite JSON number `key` of object `obj`, or throw naming `what`
double json_number(const ModelFile &mf, const json &obj, const char *key, const std::string &what)
{
  auto it = obj.find(key);
  if (it == obj.end()) throw mf.error(what + ": '" + key + "' is missing");
  if (!it->is_number()) throw mf.error(what + ": '" + key + "' must be a number, got " + it->dump());
  const double x = it->get<double>();
  if (!std::isfinite(x)) throw mf.error(what + ": '" + key + "' is not finite");
  return x;
}

int64_t json_integer(const ModelFile &mf, const json &obj, const char *key, const std::string &what)
{
  auto it = obj.find(key);
  if (it == obj.end()) throw mf.error(what + ": '" + key + "' is missing");
  if (!it->is_number_integer())
    throw mf.error(what + ": '" + key + "' must be an integer, got " + it->dump());
  if (it->is_number_unsigned() &&
      it->get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
    return std::numeric_limits<int64_t>::max();
  return it->get<int64_t>();
}

//! B-spline basis values b_a(u) and derivatives b_a'(u)/h at x; first coefficient index m
GPFF_INLINE void basis(double x0, double inv_h, double m_max, double x, int &m, double *b, double *db)
{
  const double t = (x - x0) * inv_h;
  double fm = std::floor(t);
  fm = fm < 0.0 ? 0.0 : (fm > m_max ? m_max : fm);    // clamp before the int conversion
  m = static_cast<int>(fm);
  const double u = t - fm;
  const double u2 = u * u, u3 = u2 * u, v = 1.0 - u;
  constexpr double s = 1.0 / 6.0;
  b[0] = s * v * v * v;
  b[1] = s * (3.0 * u3 - 6.0 * u2 + 4.0);
  b[2] = s * (-3.0 * u3 + 3.0 * u2 + 3.0 * u + 1.0);
  b[3] = s * u3;
  db[0] = -0.5 * v * v * inv_h;
  db[1] = (1.5 * u2 - 2.0 * u) * inv_h;
  db[2] = (-1.5 * u2 + u + 0.5) * inv_h;
  db[3] = 0.5 * u2 * inv_h;
}

}    // namespace

int MFFModel::species_index(const std::string &symbol) const
{
  for (int a = 0; a < n_species_; ++a)
    if (species_[a] == symbol) return a;
  return -1;
}

void MFFModel::Workspace::reserve(int n)
{
  if (n < 1) n = 1;
  if (capacity_ >= n) return;
  near_.resize(n);
  lanes_.resize(7 * static_cast<size_t>(n));
  dphi_.resize(n);
  capacity_ = n;
}

// ---- evaluation kernels ------------------------------------------------------------------------

namespace {

/* One row of 4 tricubic coefficients along the contiguous axis (r_jk) is one v4d (AVX2) or two
 * v2d (baseline), gpff_simd.h. */

template <class V>
GPFF_INLINE V loadu(const double *p)
{
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

//! c[0] + c[1] t + ... + c[10] t^10 by Estrin's scheme (t2 = t^2, t4 = t^4, t8 = t^8)
GPFF_INLINE double estrin10(const double *c, double t, double t2, double t4, double t8)
{
  return ((c[0] + t * c[1]) + t2 * (c[2] + t * c[3])) +
      t4 * ((c[4] + t * c[5]) + t2 * (c[6] + t * c[7])) + t8 * ((c[8] + t * c[9]) + t2 * c[10]);
}

/* cos(pi x) and sin(pi x) for 0 <= x <= 1, as -sin(z) and cos(z) of z = pi (x - 1/2) in
 * [-pi/2, pi/2], by their Taylor polynomials through z^21 and z^20 (truncation below 2e-17):
 * a few ulp from libm's sincos, without its call and range reduction. The polynomials in
 * t = z^2 (degree 10) are evaluated by Estrin's scheme (4 dependent levels instead of 10). */
GPFF_INLINE void cos_sin_pi(double x, double &cos_pix, double &sin_pix)
{
  // sin z = z P(t), P = sum_k (-1)^k t^k / (2k+1)!;  cos z = Q(t), Q = sum_k (-1)^k t^k / (2k)!
  static constexpr double P[11] = {
      1.0, -1.0 / 6.0, 1.0 / 120.0, -1.0 / 5040.0, 1.0 / 362880.0, -1.0 / 39916800.0,
      1.0 / 6227020800.0, -1.0 / 1307674368000.0, 1.0 / 355687428096000.0,
      -1.0 / 121645100408832000.0, 1.0 / 51090942171709440000.0};
  static constexpr double Q[11] = {
      1.0, -0.5, 1.0 / 24.0, -1.0 / 720.0, 1.0 / 40320.0, -1.0 / 3628800.0,
      1.0 / 479001600.0, -1.0 / 87178291200.0, 1.0 / 20922789888000.0,
      -1.0 / 6402373705728000.0, 1.0 / 2432902008176640000.0};
  const double z = 3.14159265358979323846 * (x - 0.5);
  const double t = z * z, t2 = t * t, t4 = t2 * t2, t8 = t4 * t4;
  cos_pix = -z * estrin10(P, t, t2, t4, t8);
  sin_pix = estrin10(Q, t, t2, t4, t8);
}

//! f_c(r) and f_c'(r) of cutoff rc for r < rc, inner = rc - d, pi_d = pi/d, inv_d = 1/d,
//! without branches (the transition polynomial is always evaluated and masked: f_c = 1 and
//! f_c' = 0 exactly for r <= inner; r >= rc is never passed in, f_c -> 0 there by continuity)
GPFF_INLINE void cutoff_fn(double r, double inner, double pi_d, double inv_d, double &fc,
                               double &dfc)
{
  const double x0 = (r - inner) * inv_d;
  const double m = x0 > 0.0 ? 1.0 : 0.0;
  const double x = x0 > 0.0 ? (x0 < 1.0 ? x0 : 1.0) : 0.0;
  double c, s;
  cos_sin_pi(x, c, s);
  fc = 1.0 - 0.5 * m * (1.0 - c);
  dfc = -0.5 * pi_d * m * s;
}

/* exp(x) for -0.35 * 2^M <= x <= 0 without a libm call (branch-free, vectorisable):
 * e^x = (e^t)^(2^M) with t = x / 2^M, e^t by its Taylor polynomial through t^13 (truncation
 * below 1e-17 for |t| <= 0.35), then M squarings (relative error ~ 2^M ulp: 4e-15 for M = 5,
 * 5e-13 for M = 11). */
template <int M>
GPFF_INLINE double exp_nonpositive(double x)
{
  static constexpr double C[14] = {
      1.0, 1.0, 1.0 / 2.0, 1.0 / 6.0, 1.0 / 24.0, 1.0 / 120.0, 1.0 / 720.0, 1.0 / 5040.0,
      1.0 / 40320.0, 1.0 / 362880.0, 1.0 / 3628800.0, 1.0 / 39916800.0, 1.0 / 479001600.0,
      1.0 / 6227020800.0};
  const double t = x * (1.0 / (1 << M));
  double p = C[13];
  for (int k = 12; k >= 0; --k) p = p * t + C[k];
  for (int k = 0; k < M; ++k) p *= p;
  return p;
}

//! value and derivative of a 1-D table in power form (poly: its 4 (n - 1) coefficients)
GPFF_INLINE void spline1(double x0, double inv_h, double m_max, const double *poly, double x,
                         double &g, double &dg)
{
  const double t = (x - x0) * inv_h;
  double fm = std::floor(t);
  fm = fm < 0.0 ? 0.0 : (fm > m_max ? m_max : fm);
  const double u = t - fm;
  const double *a = poly + 4 * static_cast<int64_t>(fm);
  g = ((a[3] * u + a[2]) * u + a[1]) * u + a[0];
  dg = ((3.0 * a[3] * u + 2.0 * a[2]) * u + a[1]) * inv_h;
}

/* Basis of a B-spline axis as two vectors: b_a(u) and b_a'(u)/h, a = 0..3 (the same polynomials
 * as basis(), each b_a = ((A_a u + B_a) u + C_a) u + D_a, evaluated lane-wise), in interval fm
 * (returned as an int) at offset u. */
template <class V, int W>
GPFF_INLINE int basis_u(double fm, double u, double inv_h, V *b, V *db)
{
  alignas(32) static constexpr double A[4] = {-1.0 / 6.0, 0.5, -0.5, 1.0 / 6.0};
  alignas(32) static constexpr double B[4] = {0.5, -1.0, 0.5, 0.0};
  alignas(32) static constexpr double C[4] = {-0.5, 0.0, 0.5, 0.0};
  alignas(32) static constexpr double D[4] = {1.0 / 6.0, 2.0 / 3.0, 1.0 / 6.0, 0.0};
  for (int h = 0; h < 4 / W; ++h) {
    const V a = loadu<V>(A + h * W), bb = loadu<V>(B + h * W), c = loadu<V>(C + h * W);
    b[h] = ((a * u + bb) * u + c) * u + loadu<V>(D + h * W);
    db[h] = ((3.0 * a * u + 2.0 * bb) * u + c) * inv_h;
  }
  return static_cast<int>(fm);
}

//! basis_u() at x on the axis (x0, 1/h, n - 2)
template <class V, int W>
GPFF_INLINE int basis_vec(double x0, double inv_h, double m_max, double x, V *b, V *db)
{
  const double t = (x - x0) * inv_h;
  double fm = std::floor(t);
  fm = fm < 0.0 ? 0.0 : (fm > m_max ? m_max : fm);
  return basis_u<V, W>(fm, t - fm, inv_h, b, db);
}

//! horizontal sums of four vectors (a transposing reduction: 3 shuffle-add levels for v4d)
GPFF_INLINE void reduce4(v4d a, v4d b, v4d c, v4d d, double &sa, double &sb, double &sc,
                         double &sd)
{
  typedef long long v4i __attribute__((vector_size(32)));
  const v4d ab = __builtin_shuffle(a, b, v4i{0, 4, 2, 6}) + __builtin_shuffle(a, b, v4i{1, 5, 3, 7});
  const v4d cd = __builtin_shuffle(c, d, v4i{0, 4, 2, 6}) + __builtin_shuffle(c, d, v4i{1, 5, 3, 7});
  const v4d s = __builtin_shuffle(ab, cd, v4i{0, 1, 4, 5}) + __builtin_shuffle(ab, cd, v4i{2, 3, 6, 7});
  sa = s[0];
  sb = s[1];
  sc = s[2];
  sd = s[3];
}
GPFF_INLINE void reduce4(v2d a, v2d b, v2d c, v2d d, double &sa, double &sb, double &sc,
                         double &sd)
{
  typedef long long v2i __attribute__((vector_size(16)));
  const v2d ab = __builtin_shuffle(a, b, v2i{0, 2}) + __builtin_shuffle(a, b, v2i{1, 3});
  const v2d cd = __builtin_shuffle(c, d, v2i{0, 2}) + __builtin_shuffle(c, d, v2i{1, 3});
  sa = ab[0];
  sb = ab[1];
  sc = cd[0];
  sd = cd[1];
}

/* Tricubic value g and gradient (g0, g1, g2) from the 4x4x4 coefficient block at C (strides
 * s0, s1, 1), the basis values/derivatives b1, d1 (axis 0), b2, d2 (axis 1) and the axis-2
 * basis as vectors b3, d3. The contiguous axis 2 is held in SIMD lanes (4/W vectors of W
 * lanes); axes 1 and 0 are contracted into three accumulators (for g and g2, for g0, for g1),
 * reduced against the axis-2 basis at the end. */
template <class V, int W>
GPFF_INLINE void tricubic(const double *C, int64_t s0, int64_t s1, const double *b1,
                          const double *d1, const double *b2, const double *d2, const V *b3,
                          const V *d3, double &g, double &g0, double &g1, double &g2)
{
  constexpr int H = 4 / W;
  V av[H], a0[H], a1[H];
  for (int h = 0; h < H; ++h) av[h] = a0[h] = a1[h] = V{};
  for (int p = 0; p < 4; ++p) {
    const double *Cp = C + p * s0;
    V tv[H], td[H];
    for (int h = 0; h < H; ++h) {
      const V c0 = loadu<V>(Cp + h * W), c1 = loadu<V>(Cp + s1 + h * W);
      const V c2 = loadu<V>(Cp + 2 * s1 + h * W), c3 = loadu<V>(Cp + 3 * s1 + h * W);
      tv[h] = c0 * b2[0] + c1 * b2[1] + c2 * b2[2] + c3 * b2[3];
      td[h] = c0 * d2[0] + c1 * d2[1] + c2 * d2[2] + c3 * d2[3];
    }
    for (int h = 0; h < H; ++h) {
      av[h] += tv[h] * b1[p];
      a0[h] += tv[h] * d1[p];
      a1[h] += td[h] * b1[p];
    }
  }
  V sv = av[0] * b3[0], sd = av[0] * d3[0], s0v = a0[0] * b3[0], s1v = a1[0] * b3[0];
  for (int h = 1; h < H; ++h) {
    sv += av[h] * b3[h];
    sd += av[h] * d3[h];
    s0v += a0[h] * b3[h];
    s1v += a1[h] * b3[h];
  }
  reduce4(sv, sd, s0v, s1v, g, g2, g0, g1);
}

}    // namespace

struct MFFModel::Impl {
  /* eps_i and the forces on the neighbours of one centre (MFFModel::compute_centre), with the
   * tricubic kernel on vectors V of W lanes. */
  template <class V, int W>
  static GPFF_INLINE double centre(const MFFModel &M, int si, int n, const int *sj,
                                   const double *d, double *f, Workspace &ws, bool with_pairs)
  {
    using Near = Workspace::Near;
    ws.reserve(n);
    Near *near = ws.near_.data();
    const double *coef = M.coef_.data();
    const double *poly = M.poly_.data();
    const int S = M.n_species_;
    const PairTable *prow = M.pair_.data() + static_cast<size_t>(si) * S;
    const bool three = M.order_ == 3;
    const bool shared = M.shared_axis_;
    const double rc2sq = with_pairs ? M.rc2sq_ : 0.0, rc3sq = three ? M.rc3sq_ : 0.0;
    const double rmaxsq = std::max(rc2sq, rc3sq);
    const double pi_d = M.pi_over_d_, inv_d = 1.0 / M.width_;

    // ---- per neighbour: 2-body term; the neighbours within r_c3 for the 3-body term ----
    double e2 = 0.0;
    int n3 = 0;
    for (int k = 0; k < n; ++k) {
      double *fk = f + 3 * k;
      fk[0] = fk[1] = fk[2] = 0.0;
      const double dx = d[3 * k], dy = d[3 * k + 1], dz = d[3 * k + 2];
      const double rsq = dx * dx + dy * dy + dz * dz;
      if (!(rsq < rmaxsq)) continue;    // beyond every cutoff (or NaN)
      const double rk = std::sqrt(rsq);
      const double inv = 1.0 / rk;
      const double ux = dx * inv, uy = dy * inv, uz = dz * inv;
      if (rsq < rc2sq) {
        const PairTable &T = prow[sj[k]];
        double g, dg, fc, dfc;
        spline1(T.ax.x0, T.ax.inv_h, T.ax.m_max, poly + T.poly, rk, g, dg);
        cutoff_fn(rk, M.rc2_inner_, pi_d, inv_d, fc, dfc);
        e2 += fc * g;
        const double de = dfc * g + fc * dg;    // d eps / d r
        fk[0] = -de * ux;
        fk[1] = -de * uy;
        fk[2] = -de * uz;
      }
      if (rsq < rc3sq) {
        Near &q = near[n3++];
        q.d[0] = dx;
        q.d[1] = dy;
        q.d[2] = dz;
        q.u[0] = ux;
        q.u[1] = uy;
        q.u[2] = uz;
        q.r = rk;
        q.index = k;
        q.species = sj[k];
        cutoff_fn(rk, M.rc3_inner_, pi_d, inv_d, q.fc, q.dfc);
        if (shared) basis(M.axis01_.x0, M.axis01_.inv_h, M.axis01_.m_max, rk, q.m, q.b, q.db);
      }
    }
    const double eF = M.embedding_ ? embedding(M, si, n, d, f, ws) : 0.0;
    if (!three || n3 < 2) return M.e0_[si] + e2 + eF;

    // ---- 3-body: every pair (A, B) of neighbours within r_c3 ----
    // the distances r_AB of A to every later B, and 1/r_AB, in SIMD lanes first
    const size_t cap = static_cast<size_t>(ws.capacity_);
    double *__restrict nx = ws.lanes_.data();
    double *__restrict ny = nx + cap;
    double *__restrict nz = ny + cap;
    double *__restrict rab = nz + cap;
    double *__restrict irab = rab + cap;
    double *__restrict mab = irab + cap;    // shared axis 2: interval of r_AB (as a double)
    double *__restrict uab = mab + cap;     // and the offset u in it
    const bool shared2 = M.shared_axis2_;
    const double x02 = M.axis2_.x0, ih2 = M.axis2_.inv_h, mm2 = M.axis2_.m_max;
    for (int a = 0; a < n3; ++a) {
      nx[a] = near[a].d[0];
      ny[a] = near[a].d[1];
      nz[a] = near[a].d[2];
    }
    double e3 = 0.0;
    const TripletTable *trow = M.triplet_.data() + static_cast<size_t>(si) * S * S;
    for (int a = 0; a < n3 - 1; ++a) {
      const Near &A = near[a];
      double fax = 0.0, fay = 0.0, faz = 0.0;
      {
        const double ax = nx[a], ay = ny[a], az = nz[a];
#pragma omp simd
        for (int bb = a + 1; bb < n3; ++bb) {
          const double x = nx[bb] - ax, y = ny[bb] - ay, z = nz[bb] - az;
          const double rr = std::sqrt(x * x + y * y + z * z);
          rab[bb] = rr;
          irab[bb] = 1.0 / rr;
          const double t = (rr - x02) * ih2;
          double fm = std::floor(t);
          fm = fm < 0.0 ? 0.0 : (fm > mm2 ? mm2 : fm);
          mab[bb] = fm;
          uab[bb] = t - fm;
        }
      }
      for (int bb = a + 1; bb < n3; ++bb) {
        const Near &B = near[bb];
        // the table of (c; j <= k): X on axis 0 (r_cj), Y on axis 1 (r_ck)
        const bool swap = A.species > B.species;
        const Near &X = swap ? B : A;
        const Near &Y = swap ? A : B;
        const TripletTable &T = trow[X.species * S + Y.species];
        const double jkx = B.d[0] - A.d[0];
        const double jky = B.d[1] - A.d[1];
        const double jkz = B.d[2] - A.d[2];
        const double rjk = rab[bb];
        const double inv_rjk = irab[bb];

        V b3[4 / W], d3[4 / W];
        const int m3 = shared2 ? basis_u<V, W>(mab[bb], uab[bb], T.ax[2].inv_h, b3, d3)
                               : basis_vec<V, W>(T.ax[2].x0, T.ax[2].inv_h, T.ax[2].m_max, rjk,
                                                 b3, d3);
        double g, gx, gy, g2;
        if (shared) {
          const double *C = coef + T.offset + X.m * T.stride0 + Y.m * T.stride1 + m3;
          tricubic<V, W>(C, T.stride0, T.stride1, X.b, X.db, Y.b, Y.db, b3, d3, g, gx, gy, g2);
        } else {
          int mx, my;
          double bx[4], dbx[4], by[4], dby[4];
          basis(T.ax[0].x0, T.ax[0].inv_h, T.ax[0].m_max, X.r, mx, bx, dbx);
          basis(T.ax[1].x0, T.ax[1].inv_h, T.ax[1].m_max, Y.r, my, by, dby);
          const double *C = coef + T.offset + mx * T.stride0 + my * T.stride1 + m3;
          tricubic<V, W>(C, T.stride0, T.stride1, bx, dbx, by, dby, b3, d3, g, gx, gy, g2);
        }
        const double ga = swap ? gy : gx;    // d g / d r_cA
        const double gb = swap ? gx : gy;    // d g / d r_cB

        const double w = A.fc * B.fc;
        e3 += w * g;
        const double dea = A.dfc * B.fc * g + w * ga;    // d eps / d r_cA
        const double deb = A.fc * B.dfc * g + w * gb;    // d eps / d r_cB
        const double dejk = w * g2 * inv_rjk;            // d eps / d r_AB, over r_AB
        // grad_A = dea u_A - dejk (d_B - d_A), grad_B = deb u_B + dejk (d_B - d_A)
        fax -= dea * A.u[0] - dejk * jkx;
        fay -= dea * A.u[1] - dejk * jky;
        faz -= dea * A.u[2] - dejk * jkz;
        double *fb = f + 3 * B.index;
        fb[0] -= deb * B.u[0] + dejk * jkx;
        fb[1] -= deb * B.u[1] + dejk * jky;
        fb[2] -= deb * B.u[2] + dejk * jkz;
      }
      double *fa = f + 3 * A.index;
      fa[0] += fax;
      fa[1] += fay;
      fa[2] += faz;
    }
    return M.e0_[si] + e2 + e3 + eF;
  }

  /* The embedding term F(rho_i) of a centre, and its forces -F'(rho_i) phi'(r_j) d_j / r_j
   * added to f: densities and phi'(r)/r of all neighbours in SIMD lanes (beyond r_c masked). */
  static GPFF_INLINE double embedding(const MFFModel &M, int si, int n, const double *d,
                                      double *f, Workspace &ws)
  {
    // exp(-beta r) for r < r_c: beta r_c <= 700 (checked on loading) <= 0.35 * 2^11
    const double rho = M.decay_ * M.rc2_ <= 0.35 * 32 ? density<5>(M, n, d, ws)
                                                      : density<11>(M, n, d, ws);
    const double *dphi = ws.dphi_.data();
    const PairTable &T = M.embed_[si];
    double F, dF;
    spline1(T.ax.x0, T.ax.inv_h, T.ax.m_max, M.poly_.data() + T.poly, rho, F, dF);
#pragma omp simd
    for (int k = 0; k < n; ++k) {
      const double s = -dF * dphi[k];
      f[3 * k] += s * d[3 * k];
      f[3 * k + 1] += s * d[3 * k + 1];
      f[3 * k + 2] += s * d[3 * k + 2];
    }
    return F;
  }

  //! rho_i = sum_j phi(r_j) of a centre, and phi'(r_j)/r_j in ws.dphi_ (0 beyond r_c)
  template <int SQ>
  static GPFF_INLINE double density(const MFFModel &M, int n, const double *d, Workspace &ws)
  {
    double *__restrict dphi = ws.dphi_.data();
    const double inner = M.rc2_inner_, pi_d = M.pi_over_d_, inv_d = M.inv_d_;
    const double rc2sq = M.rc2sq_, beta = M.decay_;
    double rho = 0.0;
#pragma omp simd reduction(+ : rho)
    for (int k = 0; k < n; ++k) {
      const double x = d[3 * k], y = d[3 * k + 1], z = d[3 * k + 2];
      const double rsq = x * x + y * y + z * z;
      const double inside = rsq < rc2sq ? 1.0 : 0.0;
      const double r = std::sqrt(rsq < rc2sq ? rsq : rc2sq);
      double fc, dfc;
      cutoff_fn(r, inner, pi_d, inv_d, fc, dfc);
      const double ex = inside * exp_nonpositive<SQ>(-beta * r);
      rho += fc * ex;
      dphi[k] = (dfc - beta * fc) * ex / r;
    }
    return rho;
  }

  //! MFFModel::pair_terms: square roots, divisions and cutoff functions in SIMD lanes (a loop
  //! without tables), then the table lookups
  static GPFF_INLINE void pairs(const MFFModel &M, int si, int n, const int *sj,
                                const double *rsq, double *phi, double *fpair, Workspace &ws)
  {
    ws.reserve(n);
    const size_t cap = static_cast<size_t>(ws.capacity_);
    double *__restrict r = ws.lanes_.data();
    double *__restrict ri = r + cap;
    double *__restrict fc = ri + cap;
    double *__restrict dfc = fc + cap;
    const double inner = M.rc2_inner_, pi_d = M.pi_over_d_, inv_d = M.inv_d_;
#pragma omp simd
    for (int k = 0; k < n; ++k) {
      const double rk = std::sqrt(rsq[k]);
      r[k] = rk;
      ri[k] = 1.0 / rk;
      cutoff_fn(rk, inner, pi_d, inv_d, fc[k], dfc[k]);
    }
    const PairTable *prow = M.pair_.data() + static_cast<size_t>(si) * M.n_species_;
    const double *poly = M.poly_.data();
    for (int k = 0; k < n; ++k) {
      const PairTable &T = prow[sj[k]];
      double g, dg;
      spline1(T.ax.x0, T.ax.inv_h, T.ax.m_max, poly + T.poly, r[k], g, dg);
      phi[k] = fc[k] * g;
      fpair[k] = -(dfc[k] * g + fc[k] * dg) * ri[k];
    }
  }

  static void pairs_base(const MFFModel &M, int si, int n, const int *sj, const double *rsq,
                         double *phi, double *fpair, Workspace &ws)
  {
    pairs(M, si, n, sj, rsq, phi, fpair, ws);
  }

  static double centre_base(const MFFModel &M, int si, int n, const int *sj, const double *d,
                            double *f, Workspace &ws, bool with_pairs)
  {
    return centre<v2d, 2>(M, si, n, sj, d, f, ws, with_pairs);
  }
#if defined(__x86_64__) && defined(__GNUC__) && !defined(GPFF_NO_MULTIVERSION)
#define GPFF_MFF_X86_DISPATCH 1
  __attribute__((target("avx2,fma"))) static double centre_avx2(const MFFModel &M, int si, int n,
                                                                const int *sj, const double *d,
                                                                double *f, Workspace &ws,
                                                                bool with_pairs)
  {
    return centre<v4d, 4>(M, si, n, sj, d, f, ws, with_pairs);
  }
  __attribute__((target("avx2,fma"))) static void pairs_avx2(const MFFModel &M, int si, int n,
                                                             const int *sj, const double *rsq,
                                                             double *phi, double *fpair,
                                                             Workspace &ws)
  {
    pairs(M, si, n, sj, rsq, phi, fpair, ws);
  }
#endif

  struct Kernels {
    CentreFn centre;
    PairsFn pairs;
    const char *name;
  };

  //! the kernels for this CPU (GPFF_KERNEL=baseline in the environment forces the baseline ones)
  static const Kernels &select()
  {
    static const Kernels k = [] {
      const char *want = std::getenv("GPFF_KERNEL");
      const bool force_base = want && std::string(want) == "baseline";
#ifdef GPFF_MFF_X86_DISPATCH
      __builtin_cpu_init();
      if (!force_base && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return Kernels{&centre_avx2, &pairs_avx2, "avx2"};
#endif
      (void) force_base;
      return Kernels{&centre_base, &pairs_base, "baseline"};
    }();
    return k;
  }
};

const char *MFFModel::kernel_isa()
{
  return Impl::select().name;
}

// ---- loading -----------------------------------------------------------------------------------

MFFModel::MFFModel(const std::string &path) : path_(path)
{
  ModelFile mf(path);

  const std::string kind = mf.model_kind();
  if (kind != "mff") throw mf.error("model kind '" + kind + "' is not 'mff'");

  energy_unit_ = mf.energy_unit();

  // species
  species_ = mf.meta_string_list("species");
  if (species_.empty()) throw mf.error("species is empty");
  if (species_.size() > 118) throw mf.error("species has more than 118 entries");
  n_species_ = static_cast<int>(species_.size());
  for (int a = 0; a < n_species_; ++a) {
    if (atomic_number(species_[a]) == 0)
      throw mf.error("species[" + std::to_string(a) + "] = '" + species_[a] +
                     "' is not an element symbol");
    for (int b = 0; b < a; ++b)
      if (species_[a] == species_[b])
        throw mf.error("species '" + species_[a] + "' is listed twice");
  }
  std::string species_text;
  for (const auto &s : species_) species_text += (species_text.empty() ? "" : " ") + s;

  // order, cutoffs
  const int64_t order = mf.meta_int("order");
  if (order != 2 && order != 3)
    throw mf.error("order " + std::to_string(order) + " is not supported (2 or 3)");
  order_ = static_cast<int>(order);
  rc2_ = mf.meta_double("cutoff");
  if (!(rc2_ > 0.0)) throw mf.error("cutoff must be > 0, got " + number_text(rc2_));
  rc3_ = 0.0;
  if (order_ == 3) {
    rc3_ = mf.meta_double("cutoff_3body");
    if (!(rc3_ > 0.0)) throw mf.error("cutoff_3body must be > 0, got " + number_text(rc3_));
  }
  width_ = mf.meta_double("cutoff_width");
  const double rc_min = order_ == 3 ? std::min(rc2_, rc3_) : rc2_;
  if (!(width_ > 0.0 && width_ <= rc_min))
    throw mf.error("cutoff_width must be in (0, " + number_text(rc_min) +
                   "] (0 < d <= the smallest cutoff), got " + number_text(width_));
  rmax_ = order_ == 3 ? std::max(rc2_, rc3_) : rc2_;
  rc2sq_ = rc2_ * rc2_;
  rc3sq_ = rc3_ * rc3_;
  rmaxsq_ = rmax_ * rmax_;
  rc2_inner_ = rc2_ - width_;
  rc3_inner_ = rc3_ - width_;
  pi_over_d_ = PI / width_;
  inv_d_ = 1.0 / width_;

  // the rest of the document (nested objects) straight from the JSON
  const json &doc = mf.metadata().doc;

  // energy offsets
  {
    auto it = doc.find("energy_offsets");
    if (it == doc.end()) throw mf.error("metadata key 'energy_offsets' is missing");
    if (!it->is_array() || it->size() != species_.size())
      throw mf.error("energy_offsets must be a list of " + std::to_string(n_species_) +
                     " numbers (one per species), got " + it->dump().substr(0, 200));
    for (const auto &e : *it) {
      if (!e.is_number()) throw mf.error("energy_offsets must be numbers, got " + e.dump());
      const double x = e.get<double>();
      if (!std::isfinite(x)) throw mf.error("energy_offsets contains a non-finite value");
      e0_.push_back(x);
    }
  }

  auto species_of = [&](const json &entry, size_t arity, const std::string &what) {
    auto it = entry.find("species");
    if (it == entry.end() || !it->is_array() || it->size() != arity)
      throw mf.error(what + ": 'species' must be a list of " + std::to_string(arity) +
                     " element symbols");
    std::vector<int> idx;
    for (const auto &s : *it) {
      if (!s.is_string())
        throw mf.error(what + ": 'species' must be a list of " + std::to_string(arity) +
                       " element symbols, got " + it->dump());
      const int k = species_index(s.get<std::string>());
      if (k < 0)
        throw mf.error(what + ": species '" + s.get<std::string>() +
                       "' is not one of the model's species (" + species_text + ")");
      idx.push_back(k);
    }
    return idx;
  };
  auto axis_of = [&](const json &spec, const char *min_key, const std::string &what) {
    if (!spec.is_object()) throw mf.error(what + ": grid axis must be an object");
    Axis ax;
    ax.x0 = json_number(mf, spec, min_key, what);
    ax.h = json_number(mf, spec, "spacing", what);
    const int64_t n = json_integer(mf, spec, "n_points", what);
    if (n < 4 || n > MAX_POINTS)
      throw mf.error(what + ": n_points " + std::to_string(n) + " out of range (4.." +
                     std::to_string(MAX_POINTS) + ")");
    if (!(ax.h > 0.0)) throw mf.error(what + ": spacing must be > 0, got " + number_text(ax.h));
    ax.inv_h = 1.0 / ax.h;
    ax.n = static_cast<int>(n);
    ax.m_max = static_cast<double>(n - 2);
    if (!std::isfinite(ax.inv_h) || !std::isfinite(ax.x0 + ax.h * (n - 1)))
      throw mf.error(what + ": grid min " + number_text(ax.x0) + ", spacing " +
                     number_text(ax.h) + " is out of range");
    return ax;
  };
  // coefficient tensor of a table entry, appended to coef_ once per tensor name; returns its
  // offset in coef_ (a tensor shared by two tables, with the same shape, is stored once)
  std::map<std::string, int64_t> loaded;
  auto coefficients = [&](const json &entry, const std::vector<int64_t> &shape,
                          const std::string &what) {
    auto it = entry.find("tensor");
    if (it == entry.end() || !it->is_string())
      throw mf.error(what + ": 'tensor' (the name of its coefficient tensor) is missing");
    const std::string name = it->get<std::string>();
    if (!mf.has_tensor(name)) throw mf.error(what + ": missing tensor '" + name + "'");
    const std::vector<double> c = mf.f64(name, shape);    // checks dtype and shape
    auto done = loaded.find(name);
    if (done != loaded.end()) return done->second;
    for (double x : c)
      if (!std::isfinite(x)) throw mf.error("tensor '" + name + "' contains non-finite values");
    const int64_t offset = static_cast<int64_t>(coef_.size());
    coef_.insert(coef_.end(), c.begin(), c.end());
    loaded.emplace(name, offset);
    return offset;
  };
  auto name2 = [&](int a, int b) { return species_[a] + "-" + species_[b]; };
  auto name3 = [&](int c, int a, int b) {
    return species_[c] + "-" + species_[a] + "-" + species_[b];
  };

  // the power form of a 1-D table (its coefficients already in coef_), appended to poly_
  auto power_form = [&](const PairTable &t) {
    const auto first = static_cast<int64_t>(poly_.size());
    for (int m = 0; m + 1 < t.ax.n; ++m) {
      const double *c = coef_.data() + t.offset + m;
      poly_.push_back((c[0] + 4.0 * c[1] + c[2]) / 6.0);
      poly_.push_back(0.5 * (c[2] - c[0]));
      poly_.push_back(0.5 * (c[0] - 2.0 * c[1] + c[2]));
      poly_.push_back((-c[0] + 3.0 * c[1] - 3.0 * c[2] + c[3]) / 6.0);
    }
    return first;
  };

  // pair tables: one per unordered species pair a <= b
  const int S = n_species_;
  pair_.assign(static_cast<size_t>(S) * S, PairTable());
  {
    auto it = doc.find("pair_tables");
    if (it == doc.end()) throw mf.error("metadata key 'pair_tables' is missing");
    if (!it->is_array()) throw mf.error("pair_tables must be a list");
    std::vector<char> seen(static_cast<size_t>(S) * S, 0);
    size_t count = 0;
    for (const auto &entry : *it) {
      std::string what = "pair_tables[" + std::to_string(count++) + "]";
      if (!entry.is_object()) throw mf.error(what + " must be an object");
      const auto sp = species_of(entry, 2, what);
      what = "pair table " + name2(sp[0], sp[1]);
      if (sp[0] > sp[1])
        throw mf.error(what + ": species must be in model order (" + name2(sp[1], sp[0]) + ")");
      if (seen[sp[0] * S + sp[1]]) throw mf.error("two pair tables for " + name2(sp[0], sp[1]));
      seen[sp[0] * S + sp[1]] = 1;
      PairTable t;
      t.ax = axis_of(entry, "r_min", what);
      t.offset = coefficients(entry, {int64_t(t.ax.n) + 2}, what);
      t.poly = power_form(t);
      pair_[sp[0] * S + sp[1]] = t;
      pair_[sp[1] * S + sp[0]] = t;
    }
    for (int a = 0; a < S; ++a)
      for (int b = a; b < S; ++b)
        if (!seen[a * S + b]) throw mf.error("no pair table for species pair " + name2(a, b));
  }

  // triplet tables: one per (c; j <= k)
  if (order_ == 3) {
    auto it = doc.find("triplet_tables");
    if (it == doc.end()) throw mf.error("metadata key 'triplet_tables' is missing (order 3)");
    if (!it->is_array()) throw mf.error("triplet_tables must be a list");
    std::vector<std::pair<size_t, TripletTable>> found;
    std::vector<char> seen(static_cast<size_t>(S) * S * S, 0);
    size_t count = 0;
    for (const auto &entry : *it) {
      std::string what = "triplet_tables[" + std::to_string(count++) + "]";
      if (!entry.is_object()) throw mf.error(what + " must be an object");
      const auto sp = species_of(entry, 3, what);
      what = "triplet table " + name3(sp[0], sp[1], sp[2]);
      if (sp[1] > sp[2])
        throw mf.error(what + ": the two neighbour species must be in model order (" +
                       name3(sp[0], sp[2], sp[1]) + ")");
      const size_t key = (static_cast<size_t>(sp[0]) * S + sp[1]) * S + sp[2];
      if (seen[key]) throw mf.error("two triplet tables for " + name3(sp[0], sp[1], sp[2]));
      seen[key] = 1;
      auto g = entry.find("grid");
      if (g == entry.end() || !g->is_array() || g->size() != 3)
        throw mf.error(what + ": 'grid' must be a list of 3 axes (r_cj, r_ck, r_jk)");
      TripletTable t;
      for (int a = 0; a < 3; ++a)
        t.ax[a] = axis_of((*g)[a], "min", what + " axis " + std::to_string(a));
      const int64_t n1 = t.ax[0].n + 2, n2 = t.ax[1].n + 2, n3 = t.ax[2].n + 2;
      // the product is checked against the file's buffer size by ModelFile::f64 below; guard
      // the multiplication itself first
      if (n1 > (int64_t(1) << 40) / n2 / n3)
        throw mf.error(what + ": grid of " + std::to_string(n1 - 2) + " x " +
                       std::to_string(n2 - 2) + " x " + std::to_string(n3 - 2) +
                       " points is too large");
      t.offset = coefficients(entry, {n1, n2, n3}, what);
      t.stride1 = n3;
      t.stride0 = n2 * n3;
      found.emplace_back(key, t);
    }
    for (int c = 0; c < S; ++c)
      for (int a = 0; a < S; ++a)
        for (int b = a; b < S; ++b)
          if (!seen[(static_cast<size_t>(c) * S + a) * S + b])
            throw mf.error("no triplet table for species triplet " + name3(c, a, b) +
                           " (centre " + species_[c] + ")");
    // every table is present: S^2 (S+1)/2 tables of >= 6^3 coefficients each are in the file,
    // so the S^3 lookup array is small next to it
    triplet_.assign(static_cast<size_t>(S) * S * S, TripletTable());
    for (const auto &kv : found) triplet_[kv.first] = kv.second;

    // one grid shared by axes 0 and 1 of every triplet table (the usual case: the mapping uses
    // the same r_cj and r_ck grid everywhere)
    const Axis &first = found.front().second.ax[0];
    auto same = [&](const Axis &x) { return x.x0 == first.x0 && x.h == first.h && x.n == first.n; };
    shared_axis_ = true;
    for (const auto &kv : found) shared_axis_ = shared_axis_ && same(kv.second.ax[0]) && same(kv.second.ax[1]);
    axis01_ = first;
    // and one grid on axis 2 (r_jk) too: its interval and offset are computed in SIMD lanes
    const Axis &first2 = found.front().second.ax[2];
    shared_axis2_ = true;
    for (const auto &kv : found) {
      const Axis &x = kv.second.ax[2];
      shared_axis2_ = shared_axis2_ && x.x0 == first2.x0 && x.h == first2.h && x.n == first2.n;
    }
    axis2_ = first2;
  }

  // embedding tables (optional): one per species
  if (auto it = doc.find("embedding"); it != doc.end()) {
    if (!it->is_object()) throw mf.error("embedding must be an object");
    decay_ = json_number(mf, *it, "density_decay", "embedding");
    if (!(decay_ >= 0.0)) throw mf.error("embedding: density_decay must be >= 0");
    if (decay_ * rc2_ > 700.0)
      throw mf.error("embedding: density_decay " + number_text(decay_) +
                     " is too large (exp(-density_decay cutoff) underflows)");
    auto tables = it->find("tables");
    if (tables == it->end() || !tables->is_array())
      throw mf.error("embedding: 'tables' must be a list");
    embed_.assign(S, PairTable());
    std::vector<char> seen(S, 0);
    size_t count = 0;
    for (const auto &entry : *tables) {
      std::string what = "embedding.tables[" + std::to_string(count++) + "]";
      if (!entry.is_object()) throw mf.error(what + " must be an object");
      const int a = species_of(entry, 1, what)[0];
      what = "embedding table " + species_[a];
      if (seen[a]) throw mf.error("two embedding tables for " + species_[a]);
      seen[a] = 1;
      PairTable t;
      t.ax = axis_of(entry, "rho_min", what);
      t.offset = coefficients(entry, {int64_t(t.ax.n) + 2}, what);
      t.poly = power_form(t);
      embed_[a] = t;
    }
    for (int a = 0; a < S; ++a)
      if (!seen[a]) throw mf.error("no embedding table for species " + species_[a]);
    embedding_ = true;
  }

  centre_fn_ = Impl::select().centre;
  pairs_fn_ = Impl::select().pairs;
}

double MFFModel::compute_centre(int si, int n, const int *sj, const double *d, double *f,
                                Workspace &ws, bool pair_terms) const
{
  return centre_fn_(*this, si, n, sj, d, f, ws, pair_terms);
}

void MFFModel::pair_terms(int si, int n, const int *sj, const double *rsq, double *phi,
                          double *fpair, Workspace &ws) const
{
  pairs_fn_(*this, si, n, sj, rsq, phi, fpair, ws);
}

double MFFModel::compute(int64_t n_atoms, const int32_t *species, int64_t n_pairs,
                         const int64_t *pi, const int64_t *pj, const double *d, double *energies,
                         double *forces, double *virial, double *atom_virial) const
{
  if (n_atoms < 0 || n_pairs < 0) throw Error(path_ + ": negative number of atoms or pairs");
  for (int64_t a = 0; a < n_atoms; ++a)
    if (species[a] < 0 || species[a] >= n_species_)
      throw Error(path_ + ": atom " + std::to_string(a) + " has species index " +
                  std::to_string(species[a]) + ", the model has " + std::to_string(n_species_) +
                  " species (0.." + std::to_string(n_species_ - 1) + ")");
  int max_count = 0;
  for (int64_t p = 0, start = 0; p < n_pairs; ++p) {
    const int64_t a = pi[p], b = pj[p];
    if (a < 0 || a >= n_atoms || b < 0 || b >= n_atoms)
      throw Error(path_ + ": neighbour list entry " + std::to_string(p) + " (" +
                  std::to_string(a) + ", " + std::to_string(b) + ") is out of range for " +
                  std::to_string(n_atoms) + " atoms");
    if (p > 0 && a < pi[p - 1])
      throw Error(path_ + ": the neighbour list is not sorted by centre atom i (entry " +
                  std::to_string(p) + ")");
    if (p > 0 && a != pi[p - 1]) start = p;
    if (p - start + 1 > std::numeric_limits<int>::max() / 4)
      throw Error(path_ + ": too many neighbours of atom " + std::to_string(a));
    max_count = std::max(max_count, static_cast<int>(p - start + 1));
    const double *dp = d + 3 * p;
    if (!std::isfinite(dp[0]) || !std::isfinite(dp[1]) || !std::isfinite(dp[2]))
      throw Error(path_ + ": neighbour list entry " + std::to_string(p) + " (" +
                  std::to_string(a) + ", " + std::to_string(b) +
                  ") has a non-finite displacement");
    if (dp[0] == 0.0 && dp[1] == 0.0 && dp[2] == 0.0)
      throw Error(path_ + ": atoms " + std::to_string(a) + " and " + std::to_string(b) +
                  " coincide (neighbour list entry " + std::to_string(p) + " has distance 0)");
  }

  std::fill(energies, energies + n_atoms, 0.0);
  std::fill(forces, forces + 3 * n_atoms, 0.0);
  double w[6] = {0, 0, 0, 0, 0, 0};
  if (atom_virial) std::fill(atom_virial, atom_virial + 6 * n_atoms, 0.0);

  Workspace ws;
  ws.reserve(max_count);
  std::vector<int> sj(std::max(max_count, 1));
  std::vector<double> fj(3 * static_cast<size_t>(std::max(max_count, 1)));
  double energy = 0.0;
  int64_t p0 = 0;
  for (int64_t c = 0; c < n_atoms; ++c) {
    int64_t p1 = p0;
    while (p1 < n_pairs && pi[p1] == c) ++p1;
    const int cnt = static_cast<int>(p1 - p0);
    for (int k = 0; k < cnt; ++k) sj[k] = species[pj[p0 + k]];
    const double e = compute_centre(species[c], cnt, sj.data(), d + 3 * p0, fj.data(), ws);
    energies[c] = e;
    energy += e;
    double *fc = forces + 3 * c;
    for (int k = 0; k < cnt; ++k) {
      const double *fk = fj.data() + 3 * k;
      if (fk[0] == 0.0 && fk[1] == 0.0 && fk[2] == 0.0) continue;
      const int64_t b = pj[p0 + k];
      const double *dk = d + 3 * (p0 + k);
      double *fb = forces + 3 * b;
      for (int x = 0; x < 3; ++x) {
        fb[x] += fk[x];
        fc[x] -= fk[x];
      }
      const double v[6] = {dk[0] * fk[0], dk[1] * fk[1], dk[2] * fk[2],
                           dk[0] * fk[1], dk[0] * fk[2], dk[1] * fk[2]};
      for (int x = 0; x < 6; ++x) w[x] += v[x];
      if (atom_virial)
        for (int x = 0; x < 6; ++x) {
          atom_virial[6 * c + x] += 0.5 * v[x];
          atom_virial[6 * b + x] += 0.5 * v[x];
        }
    }
    p0 = p1;
  }
  if (virial) std::copy(w, w + 6, virial);

  bool finite = std::isfinite(energy);
  for (int64_t x = 0; finite && x < 3 * n_atoms; ++x) finite = std::isfinite(forces[x]);
  if (!finite)
    throw Error(path_ + ": non-finite energy or forces (coincident atoms, or distances far "
                        "outside the tables)");
  return energy;
}

}    // namespace gpff
