/* gpff LAMMPS plugin: pair_style mff (see pair_mff.h and docs/pair_mff.md). */

#include "pair_mff.h"

#include "atom.h"
#include "comm.h"
#include "error.h"
#include "force.h"
#include "neigh_list.h"
#include "neighbor.h"

#include <cmath>
#include <new>

using namespace LAMMPS_NS;

/* ---------------------------------------------------------------------- */

PairMFF::PairMFF(LAMMPS *lmp) : PairGPFF(lmp, "mff") {}

/* ---------------------------------------------------------------------- */

PairMFF::~PairMFF() = default;

/* ----------------------------------------------------------------------
   load the model of pair_coeff (see PairGPFF::coeff); its species, in model order
------------------------------------------------------------------------- */

std::vector<std::string> PairMFF::load_model(const std::string &path, std::string &energy_unit)
{
  model_.reset();
  model_ = std::make_unique<gpff::MFFModel>(path);
  energy_unit = model_->energy_unit();
  return model_->species();
}

/* ----------------------------------------------------------------------
   pair_style mff   (no arguments)
------------------------------------------------------------------------- */

void PairMFF::settings(int narg, char ** /*arg*/)
{
  if (narg != 0) error->all(FLERR, "Illegal pair_style mff command: expected 'pair_style mff'");
  lammps_energy_in_ev();    // units real or metal
}

/* ----------------------------------------------------------------------
   pair_coeff * * model.gpff elem1 ... elemN (PairGPFF::coeff), then the model species index
   of each atom type
------------------------------------------------------------------------- */

void PairMFF::coeff(int narg, char **arg)
{
  PairGPFF::coeff(narg, arg);
  map_.assign(atom->ntypes + 1, -1);
  for (int i = 1; i <= atom->ntypes; i++)
    if (!type_element_[i].empty()) map_[i] = model_->species_index(type_element_[i]);
}

/* ---------------------------------------------------------------------- */

void PairMFF::init_style()
{
  PairGPFF::init_style();
  if (force->newton_pair == 0) error->all(FLERR, "pair_style mff requires newton pair on");
  // 2-body only: a half list (newton on), each pair once; with 3-body or embedding terms (a
  // function of all neighbours of a centre): a full list
  half_list_ = model_->order() == 2 && !model_->has_embedding();
  if (half_list_)
    neighbor->add_request(this);
  else
    neighbor->add_request(this, NeighConst::REQ_FULL);
  cut_global_ = model_->max_cutoff();
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
  const bool embed = model_->has_embedding();
  const double rc2sq = model_->cutoff() * model_->cutoff();
  const double rc3sq = three ? model_->cutoff_3body() * model_->cutoff_3body() : 0.0;
  // the neighbours compute_centre() needs: within r_c3 (3-body), within r_c (embedding)
  const double rcsq_centre = embed && rc2sq > rc3sq ? rc2sq : rc3sq;
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
       whichever ranks they are, exactly one is kept); the neighbours within r_c3 (and within
       r_c with an embedding term) are collected for the centre terms of i */
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
      // append j to a list of neighbours (index, species, d) of length n
      auto append = [&](std::vector<int> &index, std::vector<int> &species,
                        std::vector<double> &d, int &n) {
        index[n] = j;
        species[n] = sj;
        d[3 * n] = dx;
        d[3 * n + 1] = dy;
        d[3 * n + 2] = dz;
        ++n;
      };
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
          p_rsq_[np] = rsq;
          append(p_index_, p_species_, p_d_, np);
        }
      }
      if (rsq < rcsq_centre || !once) append(t_index_, t_species_, t_d_, nt);
    }

    double fix = 0.0, fiy = 0.0, fiz = 0.0;
    double ei = 0.0;
    // force (fx, fy, fz) of a term on neighbour j at displacement (dx, dy, dz), the opposite on i
    auto apply = [&](int j, double fx, double fy, double fz, double dx, double dy, double dz) {
      f[j][0] += fx;
      f[j][1] += fy;
      f[j][2] += fz;
      fix -= fx;
      fiy -= fy;
      fiz -= fz;
      if (vflag_either) ev_tally_xyz(i, j, nlocal, 1, 0.0, 0.0, fx, fy, fz, dx, dy, dz);
    };

    // ---- 2-body: the pairs kept above; phi is part of eps_i and of eps_j ----
    if (np) {
      model_->pair_terms(si, np, p_species_.data(), p_rsq_.data(), p_phi_.data(),
                         p_fpair_.data(), ws_);
      const double s2 = 2.0 * escale;
      for (int k = 0; k < np; k++) {
        const int j = p_index_[k];
        const double fpair = s2 * p_fpair_[k];    // force on j = fpair d, on i the opposite
        const double dx = p_d_[3 * k], dy = p_d_[3 * k + 1], dz = p_d_[3 * k + 2];
        apply(j, fpair * dx, fpair * dy, fpair * dz, dx, dy, dz);
        if (eflag) {
          const double phi = escale * p_phi_[k];
          ei += phi;
          if (eflag_global) eng_vdwl += phi;    // j's share
          if (eflag_atom) eatom[j] += phi;
        }
      }
    }

    // ---- 3-body and embedding terms of centre i (and its 2-body terms when not done above) ----
    double ec = 0.0;
    if (three || embed || !once) {
      // without IDs t_* holds every neighbour within the largest cutoff: 2-body terms too
      const int *idx = t_index_.data();
      const double *d = t_d_.data();
      ec = model_->compute_centre(si, nt, t_species_.data(), d, t_f_.data(), ws_, !once) - e0[si];
      for (int k = 0; k < nt; k++)
        apply(idx[k], escale * t_f_[3 * k], escale * t_f_[3 * k + 1], escale * t_f_[3 * k + 2],
              d[3 * k], d[3 * k + 1], d[3 * k + 2]);
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
