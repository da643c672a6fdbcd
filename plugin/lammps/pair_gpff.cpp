/* gpff LAMMPS plugin: PairGPFF, the base class of pair_style sgdml and mff (see pair_gpff.h). */

#include "pair_gpff.h"

#include "atom.h"
#include "error.h"
#include "force.h"
#include "memory.h"
#include "update.h"

#include <algorithm>
#include <cstring>
#include <exception>

using namespace LAMMPS_NS;

namespace {
// 1 kcal/mol in eV: ASE's default (CODATA 2014) units.kcal / units.mol, the value gpff.units uses
// (tests/test_lammps_sgdml.py checks that they agree). CODATA 2018 would give 0.04336410424180094.
constexpr double KCALMOL_IN_EV = 0.04336410390059322;
}    // namespace

/* ---------------------------------------------------------------------- */

PairGPFF::PairGPFF(LAMMPS *lmp, const char *style) : Pair(lmp), style_(style)
{
  single_enable = 0;
  restartinfo = 0;
  one_coeff = 1;
  manybody_flag = 1;
  // the per-atom virial splits each (centre, neighbour) term half/half: not a centroid stress
  centroidstressflag = CENTROID_NOTAVAIL;
}

/* ---------------------------------------------------------------------- */

PairGPFF::~PairGPFF()
{
  if (allocated) {
    memory->destroy(setflag);
    memory->destroy(cutsq);
  }
}

/* ---------------------------------------------------------------------- */

void PairGPFF::allocate()
{
  allocated = 1;
  const int n = atom->ntypes + 1;
  memory->create(setflag, n, n, "pair:setflag");
  for (int i = 0; i < n; i++)
    for (int j = 0; j < n; j++) setflag[i][j] = 0;
  memory->create(cutsq, n, n, "pair:cutsq");
  type_element_.assign(n, std::string());
}

/* ----------------------------------------------------------------------
   one energy unit of the LAMMPS unit style in eV: units real and metal only
------------------------------------------------------------------------- */

double PairGPFF::lammps_energy_in_ev() const
{
  const std::string units = update->unit_style;
  if (units == "metal") return 1.0;
  if (units == "real") return KCALMOL_IN_EV;
  error->all(FLERR,
             "pair_style {} supports units real (kcal/mol, Angstrom) and metal (eV, Angstrom) "
             "only, not units {}",
             style_, units);
}

/* ----------------------------------------------------------------------
   factor that converts the model's energy unit into the LAMMPS unit style's
------------------------------------------------------------------------- */

double PairGPFF::unit_factor() const
{
  double model_in_ev;
  if (model_unit_ == "eV")
    model_in_ev = 1.0;
  else if (model_unit_ == "kcal/mol")
    model_in_ev = KCALMOL_IN_EV;
  else
    error->all(FLERR, "pair_style {}: model {} has energy unit '{}'; supported: kcal/mol, eV",
               style_, model_path_, model_unit_);
  return model_in_ev / lammps_energy_in_ev();
}

/* ----------------------------------------------------------------------
   pair_coeff * * model.gpff elem1 ... elemN   (one element or NULL per atom type)
------------------------------------------------------------------------- */

void PairGPFF::coeff(int narg, char **arg)
{
  if (!allocated) allocate();
  const int ntypes = atom->ntypes;
  if (narg != 3 + ntypes)
    error->all(FLERR,
               "pair_coeff for pair_style {}: expected 'pair_coeff * * model.gpff' followed by "
               "one element (or NULL) for each of the {} atom types, got {} arguments",
               style_, ntypes, narg);
  if (strcmp(arg[0], "*") != 0 || strcmp(arg[1], "*") != 0)
    error->all(FLERR, "pair_coeff for pair_style {} must be 'pair_coeff * * model.gpff ...'",
               style_);

  model_path_ = arg[2];
  model_unit_.clear();
  std::vector<std::string> elements;
  try {
    elements = load_model(model_path_, model_unit_);
  } catch (std::exception &e) {
    error->all(FLERR, "pair_style {}: cannot load model: {}", style_, e.what());
  }

  std::string listed;
  for (const auto &s : elements) listed += (listed.empty() ? "" : " ") + s;

  int nmapped = 0;
  for (int i = 1; i <= ntypes; i++) {
    const std::string elem = arg[2 + i];
    if (elem == "NULL") {
      type_element_[i].clear();
      continue;
    }
    if (std::find(elements.begin(), elements.end(), elem) == elements.end())
      error->all(FLERR,
                 "pair_coeff for pair_style {}: element {} (atom type {}) is not in model {} "
                 "(model elements: {})",
                 style_, elem, i, model_path_, listed);
    type_element_[i] = elem;
    ++nmapped;
  }
  if (nmapped == 0)
    error->all(FLERR, "pair_coeff for pair_style {}: every atom type is NULL", style_);

  for (int i = 1; i <= ntypes; i++)
    for (int j = i; j <= ntypes; j++)
      setflag[i][j] = (!type_element_[i].empty() && !type_element_[j].empty()) ? 1 : 0;

  escale_ = unit_factor();
}

/* ----------------------------------------------------------------------
   the part of init_style() both styles share: a model is loaded, and its energy unit is
   converted into the unit style in use
------------------------------------------------------------------------- */

void PairGPFF::init_style()
{
  if (model_unit_.empty())
    error->all(FLERR, "pair_style {}: pair_coeff has not been given", style_);
  escale_ = unit_factor();
}

/* ---------------------------------------------------------------------- */

double PairGPFF::init_one(int i, int j)
{
  if (setflag[i][j] == 0) error->all(FLERR, "All pair coeffs are not set");
  return cut_global_;
}
