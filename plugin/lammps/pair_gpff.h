/* gpff LAMMPS plugin: PairGPFF, the base class of pair_style sgdml and pair_style mff.
 *
 *   pair_coeff * * model.gpff elem1 ... elemN   (one element or NULL per atom type)
 *
 * What both styles share: the flags of a many-body style with one pair_coeff line, setflag and
 * cutsq, pair_coeff (the model is loaded by the derived class's load_model(), atom types are
 * mapped to elements of the model, NULL types are left out), the unit styles `real` (kcal/mol)
 * and `metal` (eV) with the model's energy unit converted into the one in use (escale_), and
 * init_one() returning the one global cutoff cut_global_ that the derived init_style() sets.
 */
#ifndef GPFF_PAIR_GPFF_H
#define GPFF_PAIR_GPFF_H

#include "pair.h"

#include <string>
#include <vector>

namespace LAMMPS_NS {

class PairGPFF : public Pair {
 public:
  //! style: the pair style's name ("sgdml", "mff"), for messages
  PairGPFF(class LAMMPS *, const char *style);
  ~PairGPFF() override;

  void coeff(int, char **) override;
  void init_style() override;
  double init_one(int, int) override;

 protected:
  /*! Load the model of `path`, replacing the one before; return the elements it knows (in the
   *  order pair_coeff's error message lists them) and set `energy_unit` to its energy unit
   *  ("kcal/mol" or "eV"). Throws (std::exception) when the model cannot be loaded. */
  virtual std::vector<std::string> load_model(const std::string &path,
                                              std::string &energy_unit) = 0;

  void allocate();
  double lammps_energy_in_ev() const;
  double unit_factor() const;

  const std::string style_;
  std::string model_path_;
  std::string model_unit_;      // energy unit of the loaded model, "" while none is loaded
  double escale_ = 1.0;         // model energy unit -> LAMMPS energy unit
  double cut_global_ = 0.0;     // cutoff in use
  std::vector<std::string> type_element_;    // element of each type (index 1..ntypes), "" = NULL
};

}    // namespace LAMMPS_NS

#endif
