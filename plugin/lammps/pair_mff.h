/* gpff LAMMPS plugin: pair_style mff (mapped force fields, docs/mff.md, docs/pair_mff.md).
 *
 *   pair_style mff
 *   pair_coeff * * model.gpff Si NULL ...
 *
 * Local 2-body + 3-body energies from the B-spline tables of a gpff `mff` model, evaluated by the
 * gpff core (plugin/core/mff.h): each local atom i of a mapped type gets its local energy
 * e0 + eps_i. 2-body terms are evaluated once per pair (MFFModel::pair_terms: half list for an
 * order-2 model; on the full list of an order-3 model one direction of each pair is kept by the
 * tag rule of LAMMPS' half lists), 3-body terms once per centre over a full list
 * (MFFModel::compute_centre). Forces on ghost atoms are reverse-communicated, which requires
 * `newton_pair on`. Atoms of NULL types are no centres and no neighbours.
 *
 * Tallies: global and per-atom energy (e0 + eps_i to atom i); global virial by F.r over owned and
 * ghost atoms (fdotr), or from the pair terms; per-atom virial: each (centre, neighbour) term
 * d (x) f split half/half between the two atoms (ev_tally_xyz). Units `metal` (eV) and `real`
 * (kcal/mol); a model in the other energy unit is converted.
 */
#ifndef GPFF_PAIR_MFF_H
#define GPFF_PAIR_MFF_H

#include "pair_gpff.h"

#include <memory>
#include <string>
#include <vector>

#include "mff.h"    // gpff core (for MFFModel::Workspace)

namespace LAMMPS_NS {

class PairMFF : public PairGPFF {
 public:
  PairMFF(class LAMMPS *);
  ~PairMFF() override;

  void compute(int, int) override;
  void settings(int, char **) override;
  void coeff(int, char **) override;
  void init_style() override;
  double memory_usage() override;

 protected:
  std::vector<std::string> load_model(const std::string &path, std::string &energy_unit) override;

  std::unique_ptr<gpff::MFFModel> model_;
  bool half_list_ = false;    // order-2 model: half neighbour list
  std::vector<int> map_;      // model species index of each atom type (1..ntypes), -1 = NULL

  // per-centre scratch, grown to the longest neighbour list: p_* the pairs whose 2-body term is
  // evaluated here (once per pair), t_* the neighbours of the centre's own terms (3-body;
  // everything within the largest cutoff without atom IDs)
  gpff::MFFModel::Workspace ws_;
  std::vector<int> p_index_, p_species_, t_index_, t_species_;
  std::vector<double> p_rsq_, p_phi_, p_fpair_, p_d_, t_d_, t_f_;
};

}    // namespace LAMMPS_NS

#endif
