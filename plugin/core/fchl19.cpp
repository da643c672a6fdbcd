/* gpff C++ inference core: global FCHL19 descriptor (see fchl19.h and docs/model_file.md). */

#include "fchl19.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

namespace gpff {

static constexpr double PI = 3.14159265358979323846;

FCHL19::FCHL19(const FCHL19Params &params, const std::vector<int> &z) : p_(params)
{
  const auto positive = [](double v) { return std::isfinite(v) && v > 0.0; };
  if (p_.n_rs2 < 1 || p_.n_rs3 < 1 || p_.n_fourier < 1 || !positive(p_.eta2) ||
      !positive(p_.eta3) || !(std::isfinite(p_.zeta) && p_.zeta >= 0.0) || !positive(p_.rcut) ||
      !positive(p_.acut) || !positive(p_.two_body_decay) || !positive(p_.three_body_decay) ||
      !positive(p_.three_body_weight))
    throw Error("invalid FCHL19 parameters");
  n_ = static_cast<int>(z.size());
  elements_ = z;
  std::sort(elements_.begin(), elements_.end());
  elements_.erase(std::unique(elements_.begin(), elements_.end()), elements_.end());
  n_elem_ = static_cast<int>(elements_.size());
  elem_.resize(n_);
  for (int a = 0; a < n_; ++a)
    elem_[a] = static_cast<int>(std::lower_bound(elements_.begin(), elements_.end(), z[a]) - elements_.begin());
  const long long e = n_elem_;
  nrep_ = e * p_.n_rs2 + e * (e + 1) / 2 * p_.n_rs3 * (2LL * p_.n_fourier);
  pair_block_.resize(static_cast<size_t>(n_elem_) * n_elem_);
  for (int ej = 0; ej < n_elem_; ++ej)
    for (int ek = 0; ek < n_elem_; ++ek) {
      const int p = std::min(ej, ek), q = std::max(ej, ek);
      pair_block_[ej * n_elem_ + ek] = -(p * (p + 1)) / 2 + q + n_elem_ * p;
    }
  for (int k = 0; k < p_.n_rs2; ++k) {
    const double rs = p_.rcut * (k + 1) / p_.n_rs2;
    log_rs2_.push_back(std::log(rs));
    inv_rs2_.push_back(1.0 / rs);
  }
  for (int l = 0; l < p_.n_rs3; ++l) rs3_.push_back(p_.acut * (l + 1) / p_.n_rs3);
  for (int f = 0; f < p_.n_fourier; ++f) {
    const double zo = p_.zeta * (2 * f + 1);
    ang_w_.push_back(2.0 * std::exp(-0.5 * zo * zo));
  }
  // the Axilrod-Teller weight as qml's generate_fchl_acsf scales it
  w3_ = p_.three_body_weight * std::sqrt(p_.eta3 / PI);
}

size_t FCHL19::work_size() const
{
  const size_t n = n_, npair = n * (n - 1) / 2;
  return 5 * n * n + npair * p_.n_rs2 + 2 * static_cast<size_t>(p_.n_rs3) + 4 * static_cast<size_t>(p_.n_fourier);
}

namespace {
/* Dual number v + d eps (eps^2 = 0) for forward-mode differentiation (jvp()): the arithmetic and
 * the elementary functions evaluate() uses propagate the tangent d by the chain rule; comparisons
 * and value() look at the value only. */
struct Dual {
  double v = 0.0, d = 0.0;
  Dual() = default;
  Dual(double value_, double tangent = 0.0) : v(value_), d(tangent) {}
  Dual &operator+=(const Dual &b)
  {
    v += b.v;
    d += b.d;
    return *this;
  }
  Dual &operator*=(const Dual &b)
  {
    d = d * b.v + v * b.d;
    v *= b.v;
    return *this;
  }
};

inline Dual operator+(const Dual &a, const Dual &b) { return {a.v + b.v, a.d + b.d}; }
inline Dual operator-(const Dual &a, const Dual &b) { return {a.v - b.v, a.d - b.d}; }
inline Dual operator-(const Dual &a) { return {-a.v, -a.d}; }
inline Dual operator*(const Dual &a, const Dual &b) { return {a.v * b.v, a.d * b.v + a.v * b.d}; }
inline Dual operator/(const Dual &a, const Dual &b)
{
  const double q = a.v / b.v;
  return {q, (a.d - q * b.d) / b.v};
}
inline bool operator<=(const Dual &a, double b) { return a.v <= b; }
inline bool operator>(const Dual &a, double b) { return a.v > b; }
inline Dual sqrt(const Dual &a)
{
  const double s = std::sqrt(a.v);
  return {s, 0.5 * a.d / s};
}
inline Dual exp(const Dual &a)
{
  const double e = std::exp(a.v);
  return {e, e * a.d};
}
inline Dual log(const Dual &a) { return {std::log(a.v), a.d / a.v}; }
inline Dual log1p(const Dual &a) { return {std::log1p(a.v), a.d / (1.0 + a.v)}; }
inline Dual cos(const Dual &a) { return {std::cos(a.v), -std::sin(a.v) * a.d}; }
inline Dual sin(const Dual &a) { return {std::sin(a.v), std::cos(a.v) * a.d}; }
inline Dual pow(const Dual &a, double p) { return {std::pow(a.v, p), p * std::pow(a.v, p - 1.0) * a.d}; }

inline double value(double a) { return a; }
inline double value(const Dual &a) { return a.v; }
//! a cosine clipped to [-1, 1] (qml clips before acos); the clipped value has no tangent
inline double clip_cos(double c) { return std::min(1.0, std::max(-1.0, c)); }
inline Dual clip_cos(const Dual &c) { return c.v > 1.0 ? Dual(1.0) : c.v < -1.0 ? Dual(-1.0) : c; }

//! the scratch areas of forward()/backward()/jvp() (see work_size()), of T = double or Dual
template <class T> struct Work {
  T *dist, *idist, *fc3, *dfc3, *ld3, *dg2, *rad, *radd, *ang, *dang;
  Work(T *w, int n, int nr2, int nr3, int na)
  {
    const size_t nn = static_cast<size_t>(n) * n, npair = static_cast<size_t>(n) * (n - 1) / 2;
    dist = w;
    idist = dist + nn;    // 1 / r_ij (0 on the diagonal)
    fc3 = idist + nn;     // fc(r_ij; acut) (r_ij <= acut)
    dfc3 = fc3 + nn;      // d fc(r_ij; acut) / dr
    ld3 = dfc3 + nn;      // r_ij^-three_body_decay (all pairs)
    dg2 = ld3 + nn;       // (npair, n_rs2): d g_k / dr of the two-body terms
    rad = dg2 + npair * nr2;
    radd = rad + nr3;
    ang = radd + nr3;
    dang = ang + na;
  }
};

/* e_l = exp(-eta3 (m - Rs3_l)^2) on the uniform grid Rs3_l = h (l + 1) (h = acut/n_rs3), by
 * recurrence from the grid point c nearest m (the largest e_l): e_{l+1} = e_l exp(-eta3 (h^2 -
 * 2 h (m - Rs3_l))) upwards, e_{l-1} = e_l exp(-eta3 (h^2 + 2 h (m - Rs3_l))) downwards, and each
 * factor is the previous one times B = exp(-2 eta3 h^2). Three exp() instead of n_rs3; the
 * factors are <= 1 (nothing overflows; far tails underflow to 0 as they should); relative error
 * ~ n_rs3 ulp. */
template <class T>
inline void gaussians3(T m, double eta3, double h, double b, const double *rs3, int nr3, T *e)
{
  using std::exp;
  const int c = static_cast<int>(std::min<double>(nr3 - 1, std::max(0.0, std::nearbyint(value(m) / h - 1.0))));
  const T dm = m - rs3[c];
  e[c] = exp(-eta3 * dm * dm);
  if (c + 1 < nr3) {
    T f = exp(-eta3 * h * (h - 2.0 * dm));
    for (int l = c + 1; l < nr3; ++l, f *= b) e[l] = e[l - 1] * f;
  }
  if (c > 0) {
    T f = exp(-eta3 * h * (h + 2.0 * dm));
    for (int l = c - 1; l >= 0; --l, f *= b) e[l] = e[l + 1] * f;
  }
}

//! blk (nr3 x na) += rad (nr3) (x) ang (na)
template <class T>
inline void add_outer(T *__restrict blk, const T *__restrict rad, const T *__restrict ang, int nr3, int na)
{
  for (int l = 0; l < nr3; ++l)
    for (int s = 0; s < na; ++s) blk[l * na + s] += rad[l] * ang[s];
}

//! angles of the triplet (j, i, k) at its centre i (dot and cross products of the positions)
template <class T> struct Triplet {
  T a, b, c;             // r_ij, r_ik, r_jk
  T ia, ib, ic;          // their inverses
  T ci, si, cj, ck;      // cos/sin of the angle at i, cos at j and k
};

template <class T>
inline Triplet<T> triplet(const T *pos, const T *dist, const T *idist, int n, int i, int j, int k)
{
  using std::sqrt;
  Triplet<T> t;
  t.a = dist[i * n + j];
  t.b = dist[i * n + k];
  t.c = dist[j * n + k];
  t.ia = idist[i * n + j];
  t.ib = idist[i * n + k];
  t.ic = idist[j * n + k];
  const T *ri = pos + 3 * i, *rj = pos + 3 * j, *rk = pos + 3 * k;
  const T u0 = rj[0] - ri[0], u1 = rj[1] - ri[1], u2 = rj[2] - ri[2];
  const T v0 = rk[0] - ri[0], v1 = rk[1] - ri[1], v2 = rk[2] - ri[2];
  const T uv = u0 * v0 + u1 * v1 + u2 * v2;
  const T w0 = u1 * v2 - u2 * v1, w1 = u2 * v0 - u0 * v2, w2 = u0 * v1 - u1 * v0;
  const T inv_ab = t.ia * t.ib;
  t.ci = clip_cos(uv * inv_ab);
  t.si = sqrt(w0 * w0 + w1 * w1 + w2 * w2) * inv_ab;
  t.cj = (t.a * t.a - uv) * (t.ia * t.ic);    // (r_i - r_j).(r_k - r_j) / (r_ij r_jk)
  t.ck = (t.b * t.b - uv) * (t.ib * t.ic);    // (r_i - r_k).(r_j - r_k) / (r_ik r_jk)
  return t;
}
}    // namespace

void FCHL19::forward(const double *pos, double *x, double *work) const
{
  evaluate(pos, x, work);
}

void FCHL19::jvp(const double *pos, const double *dpos, double *x, double *dx) const
{
  const size_t n3 = 3 * static_cast<size_t>(n_), d = static_cast<size_t>(size());
  std::vector<Dual> buf(n3 + d + work_size());
  Dual *pd = buf.data(), *xd = pd + n3;
  for (size_t k = 0; k < n3; ++k) pd[k] = Dual(pos[k], dpos[k]);
  evaluate(pd, xd, xd + d);
  for (size_t k = 0; k < d; ++k) {
    x[k] = xd[k].v;
    dx[k] = xd[k].d;
  }
}

/* forward() (T = double) and jvp() (T = Dual): the unqualified elementary functions are std::'s
 * for double and the Dual overloads above (found by argument-dependent lookup) for Dual. In the
 * Dual instantiation the backward() factors in `work` (dfc3, dg2) carry tangents nobody reads. */
template <class T>
void FCHL19::evaluate(const T *pos, T *x, T *work) const
{
  using std::cos;
  using std::exp;
  using std::log;
  using std::log1p;
  using std::pow;
  using std::sin;
  using std::sqrt;
  const int n = n_, nr2 = p_.n_rs2, nr3 = p_.n_rs3, nf = p_.n_fourier, na = 2 * nf, ne = n_elem_;
  const long long nrep = nrep_;
  Work<T> w(work, n, nr2, nr3, na);
  std::fill(x, x + n * nrep, T(0.0));

  // distances and per-pair factors
  const double rcut = p_.rcut, acut = p_.acut, dec2 = p_.two_body_decay, dec3 = p_.three_body_decay;
  for (int i = 0; i < n; ++i) w.dist[i * n + i] = w.idist[i * n + i] = 0.0;
  for (int i = 1; i < n; ++i)
    for (int j = 0; j < i; ++j) {
      const T dx = pos[3 * i] - pos[3 * j], dy = pos[3 * i + 1] - pos[3 * j + 1],
              dz = pos[3 * i + 2] - pos[3 * j + 2];
      const T r = sqrt(dx * dx + dy * dy + dz * dz);
      w.dist[i * n + j] = w.dist[j * n + i] = r;
      w.idist[i * n + j] = w.idist[j * n + i] = 1.0 / r;
      T fc = 0.0, dfc = 0.0;
      if (r <= acut) {
        fc = 0.5 * (cos(PI * r / acut) + 1.0);
        dfc = -0.5 * PI / acut * sin(PI * r / acut);
      }
      w.fc3[i * n + j] = w.fc3[j * n + i] = fc;
      w.dfc3[i * n + j] = w.dfc3[j * n + i] = dfc;
      w.ld3[i * n + j] = w.ld3[j * n + i] = pow(r, -dec3);
    }

  // two-body terms, and their derivatives d g_k / dr for backward()
  const double eta2 = p_.eta2, inv_sqrt_2pi = 1.0 / std::sqrt(2.0 * PI);
  for (int i = 1, pr = 0; i < n; ++i)
    for (int j = 0; j < i; ++j, ++pr) {
      T *dg = w.dg2 + static_cast<size_t>(pr) * nr2;
      const T r = w.dist[i * n + j];
      if (r > rcut) {
        std::fill(dg, dg + nr2, T(0.0));
        continue;
      }
      const T u = eta2 / (r * r);
      const T s2 = log1p(u), mu = log(r) - 0.5 * s2;
      const T ds2 = -2.0 * u / (r * (1.0 + u)), dmu = 1.0 / r - 0.5 * ds2;
      const T inv_s2 = 1.0 / s2;
      const T fc = 0.5 * (cos(PI * r / rcut) + 1.0);
      const T dfc = -0.5 * PI / rcut * sin(PI * r / rcut);
      const T rd = pow(r, -dec2);
      const T h = fc * rd, dh = dfc * rd - dec2 * h / r;    // fc r^-dec2 and its derivative
      const T pre = inv_sqrt_2pi / sqrt(s2);
      T *xi = x + i * nrep + elem_[j] * nr2, *xj = x + j * nrep + elem_[i] * nr2;
      for (int k = 0; k < nr2; ++k) {
        const T t = log_rs2_[k] - mu;
        const T amp = pre * inv_rs2_[k] * exp(-0.5 * t * t * inv_s2);
        const T g = amp * h;
        xi[k] += g;
        xj[k] += g;
        // d ln(amp)/dr = -ds2/(2 s2) + t dmu/s2 + t^2 ds2/(2 s2^2)
        const T dlog = inv_s2 * (-0.5 * ds2 + t * dmu + 0.5 * t * t * ds2 * inv_s2);
        dg[k] = amp * (h * dlog + dh);
      }
    }

  // three-body terms
  const double eta3 = p_.eta3, w3 = w3_, h3 = acut / nr3;
  const double b3 = std::exp(-2.0 * eta3 * h3 * h3);
  const long long off3 = static_cast<long long>(ne) * nr2, blk_size = static_cast<long long>(nr3) * na;
  for (int i = 0; i < n; ++i) {
    T *x3 = x + i * nrep + off3;
    for (int j = 0; j < n; ++j) {
      if (j == i || w.dist[i * n + j] > acut) continue;
      for (int k = j + 1; k < n; ++k) {
        if (k == i || w.dist[i * n + k] > acut) continue;
        const Triplet<T> t = triplet(pos, w.dist, w.idist, n, i, j, k);
        if (!(t.si > 0.0))
          throw Error("model atoms " + std::to_string(j) + ", " + std::to_string(i) + ", " + std::to_string(k) +
                      " (0-based) are collinear (angle at atom " + std::to_string(i) +
                      " is 0 or 180 degrees): the FCHL19 three-body term has no derivative there");
        const T ksi = w3 * (1.0 + 3.0 * t.ci * t.cj * t.ck) * w.ld3[i * n + j] * w.ld3[i * n + k] *
                      w.ld3[j * n + k];
        const T scale = ksi * w.fc3[i * n + j] * w.fc3[i * n + k];
        gaussians3(0.5 * (t.a + t.b), eta3, h3, b3, rs3_.data(), nr3, w.rad);
        for (int l = 0; l < nr3; ++l) w.rad[l] *= scale;
        // cos(o theta), sin(o theta), o = 1, 3, 5, ...: rotate by 2 theta
        const T c2 = t.ci * t.ci - t.si * t.si, s2 = 2.0 * t.ci * t.si;
        T co = t.ci, so = t.si;
        for (int f = 0; f < nf; ++f) {
          w.ang[2 * f] = ang_w_[f] * co;
          w.ang[2 * f + 1] = ang_w_[f] * so;
          const T cn = co * c2 - so * s2;
          so = so * c2 + co * s2;
          co = cn;
        }
        add_outer(x3 + pair_block_[elem_[j] * ne + elem_[k]] * blk_size, w.rad, w.ang, nr3, na);
      }
    }
  }
}

void FCHL19::backward(const double *pos, const double *g, double *dedr, double *work) const
{
  const int n = n_, nr2 = p_.n_rs2, nr3 = p_.n_rs3, nf = p_.n_fourier, na = 2 * nf, ne = n_elem_;
  const long long nrep = nrep_;
  Work<double> w(work, n, nr2, nr3, na);
  const auto pidx = [](int i, int j) { return i > j ? i * (i - 1) / 2 + j : j * (j - 1) / 2 + i; };

  // two-body: dE/dr_ij = sum_k (G[i, e(j), k] + G[j, e(i), k]) d g_k / dr
  for (int i = 1, pr = 0; i < n; ++i)
    for (int j = 0; j < i; ++j, ++pr) {
      const double *dg = w.dg2 + static_cast<size_t>(pr) * nr2;
      const double *gi = g + i * nrep + elem_[j] * nr2, *gj = g + j * nrep + elem_[i] * nr2;
      double sum = 0.0;
      for (int k = 0; k < nr2; ++k) sum += (gi[k] + gj[k]) * dg[k];
      dedr[pr] = sum;
    }

  /* three-body: term = ang_s(cos_i) rad_l(a, b) ksi(a, b, c), rad_l = e_l fc(a) fc(b),
   * e_l = exp(-eta3 (m - Rs3_l)^2), m = (a + b)/2. With H_l = sum_s G_ls ang_s and
   * H'_l = sum_s G_ls d ang_s / d cos_i:
   *   P0 = sum_l e_l H_l,  P1 = sum_l e_l (-eta3 (m - Rs3_l)) H_l (= d/da = d/db of P0),
   *   PA = sum_l e_l H'_l,  F = fc(a) fc(b)
   *   dE/da = PA F ksi dci/da + (P1 F + P0 fc'(a) fc(b)) ksi + P0 F dksi/da   (b alike)
   *   dE/dc = PA F ksi dci/dc + P0 F dksi/dc
   * with the law-of-cosines derivatives of cos_i, cos_j, cos_k in (a, b, c). */
  const double acut = p_.acut, eta3 = p_.eta3, w3 = w3_, dec3 = p_.three_body_decay;
  const double h3 = acut / nr3, b3 = std::exp(-2.0 * eta3 * h3 * h3);
  const long long off3 = static_cast<long long>(ne) * nr2, blk_size = static_cast<long long>(nr3) * na;
  for (int i = 0; i < n; ++i) {
    const double *g3 = g + i * nrep + off3;
    for (int j = 0; j < n; ++j) {
      if (j == i || w.dist[i * n + j] > acut) continue;
      for (int k = j + 1; k < n; ++k) {
        if (k == i || w.dist[i * n + k] > acut) continue;
        const Triplet<double> t = triplet(pos, w.dist, w.idist, n, i, j, k);    // t.si > 0: checked by forward()
        const double a = t.a, b = t.b, c = t.c, ia = t.ia, ib = t.ib, ic = t.ic;
        const double ci = t.ci, cj = t.cj, ck = t.ck;
        const double m = 0.5 * (a + b);
        gaussians3(m, eta3, h3, b3, rs3_.data(), nr3, w.rad);
        for (int l = 0; l < nr3; ++l) w.radd[l] = -eta3 * (m - rs3_[l]) * w.rad[l];
        // ang and d ang / d cos_i: d cos(o theta)/d cos = o sin(o theta)/sin theta,
        // d sin(o theta)/d cos = -o cos(o theta)/sin theta
        const double inv_si = 1.0 / t.si;
        const double c2 = ci * ci - t.si * t.si, s2 = 2.0 * ci * t.si;
        double co = ci, so = t.si;
        for (int f = 0; f < nf; ++f) {
          const double o = 2 * f + 1, wf = ang_w_[f];
          w.ang[2 * f] = wf * co;
          w.ang[2 * f + 1] = wf * so;
          w.dang[2 * f] = wf * o * so * inv_si;
          w.dang[2 * f + 1] = -wf * o * co * inv_si;
          const double cn = co * c2 - so * s2;
          so = so * c2 + co * s2;
          co = cn;
        }
        const double *blk = g3 + pair_block_[elem_[j] * ne + elem_[k]] * blk_size;
        double p0 = 0.0, p1 = 0.0, pa = 0.0;
        for (int l = 0; l < nr3; ++l) {
          double h = 0.0, hd = 0.0;
          for (int s = 0; s < na; ++s) {
            h += blk[l * na + s] * w.ang[s];
            hd += blk[l * na + s] * w.dang[s];
          }
          p0 += w.rad[l] * h;
          p1 += w.radd[l] * h;
          pa += w.rad[l] * hd;
        }
        const double fa = w.fc3[i * n + j], fb = w.fc3[i * n + k];
        const double dfa = w.dfc3[i * n + j], dfb = w.dfc3[i * n + k];
        const double f2 = fa * fb;
        const double kk = w3 * w.ld3[i * n + j] * w.ld3[i * n + k] * w.ld3[j * n + k];
        const double ksi = kk * (1.0 + 3.0 * ci * cj * ck);
        // law of cosines: cos_i = (a^2 + b^2 - c^2)/(2ab), cos_j = (a^2 + c^2 - b^2)/(2ac),
        // cos_k = (b^2 + c^2 - a^2)/(2bc)
        const double dci_da = ib - ci * ia, dci_db = ia - ci * ib, dci_dc = -c * ia * ib;
        const double dcj_da = ic - cj * ia, dcj_db = -b * ia * ic, dcj_dc = ia - cj * ic;
        const double dck_da = -a * ib * ic, dck_db = ic - ck * ib, dck_dc = ib - ck * ic;
        const double k3 = 3.0 * kk, dk = dec3 * ksi;
        const double dksi_da = k3 * (dci_da * cj * ck + ci * dcj_da * ck + ci * cj * dck_da) - dk * ia;
        const double dksi_db = k3 * (dci_db * cj * ck + ci * dcj_db * ck + ci * cj * dck_db) - dk * ib;
        const double dksi_dc = k3 * (dci_dc * cj * ck + ci * dcj_dc * ck + ci * cj * dck_dc) - dk * ic;
        const double pak = pa * f2 * ksi, p0f = p0 * f2;
        dedr[pidx(i, j)] += pak * dci_da + (p1 * f2 + p0 * dfa * fb) * ksi + p0f * dksi_da;
        dedr[pidx(i, k)] += pak * dci_db + (p1 * f2 + p0 * fa * dfb) * ksi + p0f * dksi_db;
        dedr[pidx(j, k)] += pak * dci_dc + p0f * dksi_dc;
      }
    }
  }
}

}    // namespace gpff
