/* gpff LAMMPS plugin: pair_style sgdml.
 *
 *   pair_style sgdml [cutoff]
 *   pair_coeff * * model.gpff C H O NULL ...
 *
 * Each molecule (molecule ID, or all handled atoms when the atom style has no molecule IDs) is
 * one evaluation of a global sGDML model (gpff core, plugin/core/sgdml.h). Atoms of a molecule
 * are matched to the model's atom order by ascending atom ID (tag) and checked element by
 * element. A molecule is evaluated on the rank that owns its lowest-tag atom; its other atoms
 * are taken as the images closest to that atom (local or ghost), so the ghost cutoff must cover
 * a whole molecule: the default cutoff is the model's molecule_extent + 2 Å. Forces on ghost
 * atoms are reverse-communicated, which requires `newton_pair on`.
 *
 * Tallies: global energy E per molecule; per-atom energy E/N to each atom of the molecule;
 * global virial and per-atom virial (pair terms split half/half) from the core. Units `real`
 * (kcal/mol) and `metal` (eV); a model in the other energy unit is converted.
 */
#ifndef GPFF_PAIR_SGDML_H
#define GPFF_PAIR_SGDML_H

#include "pair_gpff.h"

#include <memory>
#include <string>
#include <vector>

namespace gpff {
class SGDMLModel;
}

namespace LAMMPS_NS {

class PairSGDML : public PairGPFF {
 public:
  PairSGDML(class LAMMPS *);
  ~PairSGDML() override;

  void compute(int, int) override;
  void settings(int, char **) override;
  void init_style() override;
  double memory_usage() override;

 protected:
  std::vector<std::string> load_model(const std::string &path, std::string &energy_unit) override;
  void build_molecules();

  std::unique_ptr<gpff::SGDMLModel> model_;
  double cut_user_ = 0.0;       // cutoff from pair_style (0: model extent + 2 Å)

  // molecules: tags of each molecule in model atom order (= ascending tag order)
  std::vector<tagint> mol_id_;
  std::vector<tagint> mol_tags_;    // n_mol * N, row-major
  int n_mol_ = 0;

  // per-evaluation scratch
  std::vector<double> pos_, frc_, avir_;
  std::vector<int> idx_;
};

}    // namespace LAMMPS_NS

#endif
