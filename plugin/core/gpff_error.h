/* gpff C++ inference core: the one exception type of the core's public API.
 *
 * Every message names the file (where there is one) and the problem, e.g.
 *   "ethanol.gpff: tensor 'R_desc' has dtype F32, expected F64".
 *
 * (Named gpff_error.h, not error.h, so that it can never shadow LAMMPS' own "error.h" on a
 * pair style's include path.)
 */
#ifndef GPFF_ERROR_H
#define GPFF_ERROR_H

#include <stdexcept>

namespace gpff {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}    // namespace gpff

#endif
