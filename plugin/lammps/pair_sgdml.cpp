/* gpff LAMMPS plugin: pair_style sgdml (see pair_sgdml.h and docs). */

#include "pair_sgdml.h"

#include "atom.h"
#include "comm.h"
#include "domain.h"
#include "error.h"
#include "force.h"
#include "neighbor.h"
#include "utils.h"

#include "sgdml.h"    // gpff core

#include <algorithm>
#include <array>
#include <cmath>
#include <exception>
#include <set>

using namespace LAMMPS_NS;

namespace {
// extra distance added to the model's molecule extent for the default cutoff, Å
constexpr double EXTENT_MARGIN = 2.0;
}    // namespace

/* ---------------------------------------------------------------------- */

PairSGDML::PairSGDML(LAMMPS *lmp) : PairGPFF(lmp, "sgdml")
{
  // the global virial comes from the core (pair form), never from f.r over atoms
  no_virial_fdotr_compute = 1;
}

/* ---------------------------------------------------------------------- */

PairSGDML::~PairSGDML() = default;

/* ----------------------------------------------------------------------
   load the model of pair_coeff (see PairGPFF::coeff); its elements, sorted
------------------------------------------------------------------------- */

std::vector<std::string> PairSGDML::load_model(const std::string &path, std::string &energy_unit)
{
  model_.reset();
  model_ = std::make_unique<gpff::SGDMLModel>(path);
  energy_unit = model_->energy_unit();
  const auto &species = model_->species();
  const std::set<std::string> elements(species.begin(), species.end());
  return std::vector<std::string>(elements.begin(), elements.end());
}

/* ----------------------------------------------------------------------
   pair_style sgdml [cutoff]
------------------------------------------------------------------------- */

void PairSGDML::settings(int narg, char **arg)
{
  if (narg > 1)
    error->all(FLERR, "Illegal pair_style sgdml command: expected 'pair_style sgdml [cutoff]'");
  lammps_energy_in_ev();    // units real or metal
  cut_user_ = 0.0;
  if (narg == 1) {
    cut_user_ = utils::numeric(FLERR, arg[0], false, lmp);
    if (!(cut_user_ > 0.0))
      error->all(FLERR, "pair_style sgdml: cutoff must be positive, got {}", arg[0]);
  }
}

/* ---------------------------------------------------------------------- */

void PairSGDML::init_style()
{
  PairGPFF::init_style();
  if (atom->tag_enable == 0) error->all(FLERR, "pair_style sgdml requires atom IDs");
  if (atom->map_style == Atom::MAP_NONE)
    error->all(FLERR, "pair_style sgdml requires an atom map, see atom_modify map yes");
  if (force->newton_pair == 0) error->all(FLERR, "pair_style sgdml requires newton pair on");

  // a default list keeps the ghost cutoff machinery in place; compute() does not use it
  neighbor->add_request(this);

  cut_global_ = (cut_user_ > 0.0) ? cut_user_ : model_->molecule_extent() + EXTENT_MARGIN;
  build_molecules();
}

/* ----------------------------------------------------------------------
   group the handled atoms into molecules (molecule ID, or all of them), each in model atom
   order (ascending tag), and check the elements against the model. Membership is fixed
   during a run, so this is done once per init.
------------------------------------------------------------------------- */

void PairSGDML::build_molecules()
{
  const int n = model_->n_atoms();
  const int nlocal = atom->nlocal;
  const int *type = atom->type;
  const tagint *tag = atom->tag;
  const bool have_mol = atom->molecule_flag && atom->molecule;

  std::vector<tagint> mine;
  mine.reserve(3 * (size_t) nlocal);
  for (int i = 0; i < nlocal; i++) {
    if (type_element_[type[i]].empty()) continue;
    mine.push_back(have_mol ? atom->molecule[i] : 0);
    mine.push_back(tag[i]);
    mine.push_back(type[i]);
  }

  int nme = (int) mine.size();
  std::vector<int> counts(comm->nprocs), displs(comm->nprocs);
  MPI_Allgather(&nme, 1, MPI_INT, counts.data(), 1, MPI_INT, world);
  bigint total = 0;
  for (int p = 0; p < comm->nprocs; p++) {
    displs[p] = (int) total;
    total += counts[p];
  }
  if (total > MAXSMALLINT)
    error->all(FLERR, "pair_style sgdml: too many atoms of the mapped types ({})", total / 3);
  std::vector<tagint> all((size_t) total);
  MPI_Allgatherv(mine.data(), nme, MPI_LMP_TAGINT, all.data(), counts.data(), displs.data(),
                 MPI_LMP_TAGINT, world);

  const size_t natoms = all.size() / 3;
  std::vector<std::array<tagint, 3>> rows(natoms);
  for (size_t a = 0; a < natoms; a++) rows[a] = {all[3 * a], all[3 * a + 1], all[3 * a + 2]};
  std::sort(rows.begin(), rows.end());

  const auto &species = model_->species();
  mol_id_.clear();
  mol_tags_.clear();
  size_t a = 0;
  while (a < natoms) {
    size_t b = a;
    while (b < natoms && rows[b][0] == rows[a][0]) ++b;
    const tagint mol = rows[a][0];
    const size_t count = b - a;
    if (count != (size_t) n) {
      if (have_mol)
        error->all(FLERR,
                   "pair_style sgdml: molecule {} has {} atoms of the types mapped in pair_coeff, "
                   "but model {} has {} atoms",
                   mol, count, model_path_, n);
      else
        error->all(FLERR,
                   "pair_style sgdml: the system has {} atoms of the types mapped in pair_coeff "
                   "(natoms {}) and no molecule IDs, but model {} has {} atoms; use an atom style "
                   "with molecule IDs for several molecules",
                   count, atom->natoms, model_path_, n);
    }
    for (int k = 0; k < n; k++) {
      const auto &r = rows[a + k];
      const std::string &found = type_element_[r[2]];
      if (found != species[k]) {
        if (have_mol)
          error->all(FLERR,
                     "pair_style sgdml: molecule {}: atom ID {} (type {}) is {}, but model atom {} "
                     "is {} (expected {}, found {}); atoms are matched to the model atom order by "
                     "ascending atom ID",
                     mol, r[1], r[2], found, k + 1, species[k], species[k], found);
        else
          error->all(FLERR,
                     "pair_style sgdml: atom ID {} (type {}) is {}, but model atom {} is {} "
                     "(expected {}, found {}); atoms are matched to the model atom order by "
                     "ascending atom ID",
                     r[1], r[2], found, k + 1, species[k], species[k], found);
      }
      mol_tags_.push_back(r[1]);
    }
    mol_id_.push_back(mol);
    a = b;
  }
  n_mol_ = (int) mol_id_.size();

  if (n_mol_ == 0 && comm->me == 0)
    error->warning(FLERR, "pair_style sgdml: no atoms of the types mapped in pair_coeff");

  pos_.assign(3 * (size_t) n, 0.0);
  frc_.assign(3 * (size_t) n, 0.0);
  avir_.assign(6 * (size_t) n, 0.0);
  idx_.assign(n, -1);
}

/* ---------------------------------------------------------------------- */

void PairSGDML::compute(int eflag, int vflag)
{
  ev_init(eflag, vflag);

  const int n = model_->n_atoms();
  const int nlocal = atom->nlocal;
  double **x = atom->x;
  double **f = atom->f;
  const double cutsq_mol = cut_global_ * cut_global_;
  const bool have_mol = atom->molecule_flag && atom->molecule;
  double vir[6];

  for (int m = 0; m < n_mol_; m++) {
    const tagint *tags = &mol_tags_[(size_t) m * n];
    const int i0 = atom->map(tags[0]);
    if (i0 < 0 || i0 >= nlocal) continue;    // evaluated by the owner of the lowest tag
    idx_[0] = i0;
    for (int k = 1; k < n; k++) {
      int j = atom->map(tags[k]);
      if (j < 0) {
        if (have_mol)
          error->one(FLERR,
                     "pair_style sgdml: molecule {}: atom tag {} not found within the ghost "
                     "cutoff of atom tag {} (pair cutoff {} + neighbor skin)",
                     mol_id_[m], tags[k], tags[0], cut_global_);
        else
          error->one(FLERR,
                     "pair_style sgdml: atom tag {} not found within the ghost cutoff of atom tag "
                     "{} (pair cutoff {} + neighbor skin)",
                     tags[k], tags[0], cut_global_);
      }
      j = domain->closest_image(i0, j);
      const double dx = x[j][0] - x[i0][0];
      const double dy = x[j][1] - x[i0][1];
      const double dz = x[j][2] - x[i0][2];
      const double rsq = dx * dx + dy * dy + dz * dz;
      if (rsq > cutsq_mol)
        error->one(FLERR,
                   "pair_style sgdml: molecule {}: atom tag {} is {:.4g} Angstrom from atom tag "
                   "{}, beyond the pair cutoff {} (the molecule is broken apart, or set a larger "
                   "cutoff with 'pair_style sgdml <cutoff>')",
                   have_mol ? mol_id_[m] : (tagint) 0, tags[k], std::sqrt(rsq), tags[0],
                   cut_global_);
      idx_[k] = j;
    }
    for (int k = 0; k < n; k++)
      for (int d = 0; d < 3; d++) pos_[3 * k + d] = x[idx_[k]][d];

    double e = 0.0;
    try {
      e = model_->compute(pos_.data(), frc_.data(), vflag_global ? vir : nullptr,
                          vflag_atom ? avir_.data() : nullptr);
    } catch (std::exception &ex) {
      error->one(FLERR, "pair_style sgdml: molecule {} (atom tags {}..): {}",
                 have_mol ? mol_id_[m] : (tagint) 0, tags[0], ex.what());
    }

    for (int k = 0; k < n; k++) {
      double *fi = f[idx_[k]];
      fi[0] += escale_ * frc_[3 * k];
      fi[1] += escale_ * frc_[3 * k + 1];
      fi[2] += escale_ * frc_[3 * k + 2];
    }
    if (eflag_global) eng_vdwl += escale_ * e;
    if (eflag_atom) {
      const double ea = escale_ * e / n;
      for (int k = 0; k < n; k++) eatom[idx_[k]] += ea;
    }
    if (vflag_global)
      for (int c = 0; c < 6; c++) virial[c] += escale_ * vir[c];
    if (vflag_atom)
      for (int k = 0; k < n; k++)
        for (int c = 0; c < 6; c++) vatom[idx_[k]][c] += escale_ * avir_[6 * k + c];
  }
}

/* ---------------------------------------------------------------------- */

double PairSGDML::memory_usage()
{
  double bytes = Pair::memory_usage();
  bytes += (double) (mol_id_.capacity() + mol_tags_.capacity()) * sizeof(tagint);
  bytes += (double) (pos_.capacity() + frc_.capacity() + avir_.capacity()) * sizeof(double);
  return bytes;
}
