/* gpff LAMMPS plugin: pair_style mff (see pair_mff.h and docs/pair_mff.md). */

#include "pair_mff.h"

#include "atom.h"
#include "comm.h"
#include "error.h"
#include "force.h"
#include "memory.h"
#include "neigh_list.h"
#include "neighbor.h"
#include "update.h"

#include <cmath>
#include <cstring>
#include <exception>
#include <new>
#include <set>

using namespace LAMMPS_NS;

namespace {
// 1 kcal/mol in eV: ASE's default (CODATA 2014) units.kcal / units.mol, the value of
// pair_style sgdml and gpff.units
constexpr double KCALMOL_IN_EV = 0.04336410390059322;
}    // namespace

/* ---------------------------------------------------------------------- */

PairMFF::PairMFF(LAMMPS *lmp) : Pair(lmp)
{
  single_enable = 0;
  restartinfo = 0;
  one_coeff = 1;
  manybody_flag = 1;
  // the per-atom virial splits each (centre, neighbour) term half/half: not a centroid stress
  centroidstressflag = CENTROID_NOTAVAIL;
}

/* ---------------------------------------------------------------------- */

PairMFF::~PairMFF()
{
  if (allocated) {
    memory->destroy(setflag);
    memory->destroy(cutsq);
  }
}

/* ---------------------------------------------------------------------- */

void PairMFF::allocate()
{
  allocated = 1;
  const int n = atom->ntypes + 1;
  memory->create(setflag, n, n, "pair:setflag");
  for (int i = 0; i < n; i++)
    for (int j = 0; j < n; j++) setflag[i][j] = 0;
  memory->create(cutsq, n, n, "pair:cutsq");
  map_.assign(n, -1);
}

/* ----------------------------------------------------------------------
   factor that converts the model's energy unit into the LAMMPS unit style's
------------------------------------------------------------------------- */

double PairMFF::unit_factor(const std::string &unit_style) const
{
  const std::string &model_unit = model_->energy_unit();
  double model_in_ev;
  if (model_unit == "eV")
    model_in_ev = 1.0;
  else if (model_unit == "kcal/mol")
    model_in_ev = KCALMOL_IN_EV;
  else
    error->all(FLERR, "pair_style mff: model {} has energy unit '{}'; supported: kcal/mol, eV",
               model_path_, model_unit);
  if (unit_style == "metal") return model_in_ev;
  if (unit_style == "real") return model_in_ev / KCALMOL_IN_EV;
  error->all(FLERR,
             "pair_style mff supports units metal (eV, Angstrom) and real (kcal/mol, Angstrom) "
             "only, not units {}",
             unit_style);
}

/* ----------------------------------------------------------------------
   pair_style mff   (no arguments)
------------------------------------------------------------------------- */

void PairMFF::settings(int narg, char ** /*arg*/)
{
  if (narg != 0) error->all(FLERR, "Illegal pair_style mff command: expected 'pair_style mff'");
  const std::string units = update->unit_style;
  if (units != "real" && units != "metal")
    error->all(FLERR,
               "pair_style mff supports units metal (eV, Angstrom) and real (kcal/mol, "
               "Angstrom) only, not units {}",
               units);
}

/* ----------------------------------------------------------------------
   pair_coeff * * model.gpff elem1 ... elemN   (one element or NULL per atom type)
------------------------------------------------------------------------- */

void PairMFF::coeff(int narg, char **arg)
{
  if (!allocated) allocate();
  const int ntypes = atom->ntypes;
  if (narg != 3 + ntypes)
    error->all(FLERR,
               "pair_coeff for pair_style mff: expected 'pair_coeff * * model.gpff' followed by "
               "one element (or NULL) for each of the {} atom types, got {} arguments",
               ntypes, narg);
  if (strcmp(arg[0], "*") != 0 || strcmp(arg[1], "*") != 0)
    error->all(FLERR, "pair_coeff for pair_style mff must be 'pair_coeff * * model.gpff ...'");

  model_path_ = arg[2];
  model_.reset();
  try {
    model_ = std::make_unique<gpff::MFFModel>(model_path_);
  } catch (std::exception &e) {
    error->all(FLERR, "pair_style mff: cannot load model: {}", e.what());
  }

  std::string listed;
  for (const auto &s : model_->species()) listed += (listed.empty() ? "" : " ") + s;

  int nmapped = 0;
  for (int i = 1; i <= ntypes; i++) {
    const std::string elem = arg[2 + i];
    if (elem == "NULL") {
      map_[i] = -1;
      continue;
    }
    const int s = model_->species_index(elem);
    if (s < 0)
      error->all(FLERR,
                 "pair_coeff for pair_style mff: element {} (atom type {}) is not in model {} "
                 "(model species: {})",
                 elem, i, model_path_, listed);
    map_[i] = s;
    ++nmapped;
  }
  if (nmapped == 0) error->all(FLERR, "pair_coeff for pair_style mff: every atom type is NULL");

  for (int i = 1; i <= ntypes; i++)
    for (int j = i; j <= ntypes; j++) setflag[i][j] = (map_[i] >= 0 && map_[j] >= 0) ? 1 : 0;

  escale_ = unit_factor(update->unit_style);
}

/* ---------------------------------------------------------------------- */

void PairMFF::init_style()
{
  if (!model_) error->all(FLERR, "pair_style mff: pair_coeff has not been given");
  escale_ = unit_factor(update->unit_style);
  if (force->newton_pair == 0) error->all(FLERR, "pair_style mff requires newton pair on");
  // 2-body only: a half list (newton on), each pair once; with 3-body terms: a full list
  half_list_ = model_->order() == 2;
  if (half_list_)
    neighbor->add_request(this);
  else
    neighbor->add_request(this, NeighConst::REQ_FULL);
}

/* ---------------------------------------------------------------------- */

double PairMFF::init_one(int i, int j)
{
  if (setflag[i][j] == 0) error->all(FLERR, "All pair coeffs are not set");
  return model_->max_cutoff();
}

/* ---------------------------------------------------------------------- */

void PairMFF::compute(int eflag, int vflag)
{
  ev_init(eflag, vflag);

  double **x = atom->x;
  double **f = atom->f;
  const int *type = atom->type;
  const tagint *tag = atom->tag;
  const int nlocal = atom->nlocal;
  const int inum = list->inum;
  const int *ilist = list->ilist;
  const int *numneigh = list->numneigh;
  int **firstneigh = list->firstneigh;
  const double escale = escale_;
  const bool three = model_->order() == 3;
  const double rc2sq = model_->cutoff() * model_->cutoff();
  const double rc3sq = three ? model_->cutoff_3body() * model_->cutoff_3body() : 0.0;
  const double rmaxsq = rc2sq > rc3sq ? rc2sq : rc3sq;
  // an order-2 model runs on a half list (every pair once, as any pair potential); an order-3
  // model on a full list, where with atom IDs every pair is still evaluated once (see below),
  // without from both sides
  const bool half = half_list_;
  const bool once = half || atom->tag_enable != 0;
  const auto &e0 = model_->energy_offsets();

  for (int ii = 0; ii < inum; ii++) {
    const int i = ilist[ii];
    const int si = map_[type[i]];
    if (si < 0) continue;
    const int *jlist = firstneigh[i];
    const int jnum = numneigh[i];
    if (jnum > (int) t_index_.size()) {
      try {
        for (auto *v : {&p_index_, &p_species_, &t_index_, &t_species_}) v->resize(jnum);
        for (auto *v : {&p_rsq_, &p_phi_, &p_fpair_}) v->resize(jnum);
        for (auto *v : {&p_d_, &t_d_, &t_f_}) v->resize(3 * (size_t) jnum);
        ws_.reserve(jnum);
      } catch (std::bad_alloc &) {
        error->one(FLERR, "pair_style mff: out of memory for {} neighbours", jnum);
      }
    }

    /* neighbours of mapped types: the pairs within r_c whose 2-body term is evaluated here, once for
       both atoms (on a half list every pair is there once; on a full list the pair (i, j) is
       kept for a local j > i, and for a ghost j by the tag and coordinate rule of LAMMPS' half
       lists with newton on, so that of the two directions (i, j) and (j, i') of a pair, on
       whichever ranks they are, exactly one is kept); the neighbours within r_c3 are collected
       for the 3-body term of centre i */
    const double xi = x[i][0], yi = x[i][1], zi = x[i][2];
    const tagint itag = tag[i];
    int np = 0, nt = 0;
    for (int jj = 0; jj < jnum; jj++) {
      const int j = jlist[jj] & NEIGHMASK;
      const int sj = map_[type[j]];
      if (sj < 0) continue;
      const double dx = x[j][0] - xi;
      const double dy = x[j][1] - yi;
      const double dz = x[j][2] - zi;
      const double rsq = dx * dx + dy * dy + dz * dz;
      if (rsq >= rmaxsq) continue;
      if (rsq == 0.0)
        error->one(FLERR, "pair_style mff: atoms {} and {} coincide (distance 0)", tag[i], tag[j]);
      if (once && rsq < rc2sq) {
        bool keep;
        if (half) {
          keep = true;
        } else if (j < nlocal) {
          keep = j > i;
        } else {
          const tagint jtag = tag[j];
          if (itag > jtag)
            keep = ((itag + jtag) % 2) != 0;
          else if (itag < jtag)
            keep = ((itag + jtag) % 2) == 0;
          else    // an image of i itself: the one "above" i
            keep = dz > 0.0 || (dz == 0.0 && (dy > 0.0 || (dy == 0.0 && dx > 0.0)));
        }
        if (keep) {
          p_index_[np] = j;
          p_species_[np] = sj;
          p_rsq_[np] = rsq;
          p_d_[3 * np] = dx;
          p_d_[3 * np + 1] = dy;
          p_d_[3 * np + 2] = dz;
          ++np;
        }
      }
      if (rsq < rc3sq || !once) {
        t_index_[nt] = j;
        t_species_[nt] = sj;
        t_d_[3 * nt] = dx;
        t_d_[3 * nt + 1] = dy;
        t_d_[3 * nt + 2] = dz;
        ++nt;
      }
    }

    double fix = 0.0, fiy = 0.0, fiz = 0.0;
    double ei = 0.0;

    // ---- 2-body: the pairs kept above; phi is part of eps_i and of eps_j ----
    if (np) {
      model_->pair_terms(si, np, p_species_.data(), p_rsq_.data(), p_phi_.data(),
                         p_fpair_.data(), ws_);
      const double s2 = 2.0 * escale;
      for (int k = 0; k < np; k++) {
        const int j = p_index_[k];
        const double fpair = s2 * p_fpair_[k];    // force on j = fpair d, on i the opposite
        const double dx = p_d_[3 * k], dy = p_d_[3 * k + 1], dz = p_d_[3 * k + 2];
        const double fx = fpair * dx, fy = fpair * dy, fz = fpair * dz;
        f[j][0] += fx;
        f[j][1] += fy;
        f[j][2] += fz;
        fix -= fx;
        fiy -= fy;
        fiz -= fz;
        if (eflag) {
          const double phi = escale * p_phi_[k];
          ei += phi;
          if (eflag_global) eng_vdwl += phi;    // j's share
          if (eflag_atom) eatom[j] += phi;
        }
        if (vflag_either) ev_tally_xyz(i, j, nlocal, 1, 0.0, 0.0, fx, fy, fz, dx, dy, dz);
      }
    }

    // ---- 3-body terms of centre i (and its 2-body terms when not done above) ----
    double ec = 0.0;
    if (three || !once) {
      // without IDs t_* holds every neighbour within the largest cutoff: 2-body terms too
      const int *idx = t_index_.data();
      const double *d = t_d_.data();
      ec = model_->compute_centre(si, nt, t_species_.data(), d, t_f_.data(), ws_, !once) - e0[si];
      for (int k = 0; k < nt; k++) {
        const int j = idx[k];
        const double fx = escale * t_f_[3 * k];
        const double fy = escale * t_f_[3 * k + 1];
        const double fz = escale * t_f_[3 * k + 2];
        f[j][0] += fx;
        f[j][1] += fy;
        f[j][2] += fz;
        fix -= fx;
        fiy -= fy;
        fiz -= fz;
        if (vflag_either)
          ev_tally_xyz(i, j, nlocal, 1, 0.0, 0.0, fx, fy, fz, d[3 * k], d[3 * k + 1],
                       d[3 * k + 2]);
      }
    }
    f[i][0] += fix;
    f[i][1] += fiy;
    f[i][2] += fiz;

    if (eflag) {
      ei += escale * (e0[si] + ec);
      if (eflag_global) eng_vdwl += ei;
      if (eflag_atom) eatom[i] += ei;
    }
  }

  if (vflag_fdotr) virial_fdotr_compute();
}

/* ---------------------------------------------------------------------- */

double PairMFF::memory_usage()
{
  double bytes = Pair::memory_usage();
  bytes += (double) (t_index_.capacity() + t_species_.capacity()) * sizeof(int);
  bytes += (double) (t_d_.capacity() + t_f_.capacity()) * sizeof(double);
  if (model_) bytes += (double) model_->n_coefficients() * sizeof(double);
  return bytes;
}
