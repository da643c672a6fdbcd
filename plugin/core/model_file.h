/* gpff C++ inference core: reader of `.gpff` model files (safetensors containers).
 *
 * Layout (docs/model_file.md): 8-byte little-endian header length H, H bytes of JSON header,
 * then the raw little-endian tensor buffer. The header maps tensor names to
 * {"dtype", "shape", "data_offsets": [begin, end)} (offsets relative to the start of the buffer)
 * and holds "__metadata__": {"gpff": "<JSON document>"}.
 *
 * Everything is validated when the file is opened, before any tensor data is touched:
 * header length vs file size, JSON syntax, __metadata__.gpff present and itself a JSON object,
 * format_version == 1, and for every tensor: known dtype (F64, I32), shape entries >= 0,
 * prod(shape) * itemsize == end - begin, 0 <= begin <= end <= buffer size, no two tensors
 * overlapping. The typed accessors then check the expected dtype and shape.
 * All failures throw gpff::Error("<path>: <problem>").
 *
 * The nlohmann::json type of the metadata is kept out of this header (pimpl) so that users of the
 * core do not need nlohmann/json.hpp on their include path; the core's own sources reach the
 * parsed document through metadata() and model_file_json.h.
 */
#ifndef GPFF_MODEL_FILE_H
#define GPFF_MODEL_FILE_H

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "gpff_error.h"

namespace gpff {

//! format_version understood by this reader
constexpr int MODEL_FORMAT_VERSION = 1;

class ModelFile {
 public:
  enum class DType { F64, I32 };

  struct TensorInfo {
    DType dtype;
    std::vector<int64_t> shape;
    uint64_t begin, end;    // byte offsets into the data buffer, [begin, end)
  };

  //! Read and validate the whole file. Throws gpff::Error("<path>: <problem>").
  explicit ModelFile(const std::string &path);
  ~ModelFile();
  ModelFile(const ModelFile &) = delete;
  ModelFile &operator=(const ModelFile &) = delete;

  const std::string &path() const { return path_; }

  // ---- metadata document (__metadata__["gpff"]) -------------------------------------------
  //! "model" key (e.g. "sgdml"); checked to be a string
  std::string model_kind() const;
  bool has_key(const std::string &key) const;
  //! Typed getters; throw gpff::Error naming the key when missing or of the wrong type.
  std::string meta_string(const std::string &key) const;
  double meta_double(const std::string &key) const;    // any JSON number, must be finite
  int64_t meta_int(const std::string &key) const;      // JSON integer
  std::vector<std::string> meta_string_list(const std::string &key) const;
  //! string member `member` of the object `key` (e.g. units.energy)
  std::string meta_object_string(const std::string &key, const std::string &member) const;
  //! units.energy, checked to be "kcal/mol" or "eV"; units.length is checked to be "Angstrom"
  //! (the units the core evaluates in)
  std::string energy_unit() const;
  //! The whole parsed document, for nested entries the getters above do not cover (defined in
  //! model_file_json.h, which needs nlohmann/json: for the core's own sources only).
  struct Meta;
  const Meta &metadata() const { return *meta_; }

  // ---- tensors ---------------------------------------------------------------------------
  bool has_tensor(const std::string &name) const;
  //! Throws gpff::Error if the tensor is missing.
  const TensorInfo &tensor_info(const std::string &name) const;
  /*! Copy tensor `name` out as float64 / int32. `expected_shape` entries >= 0 must match
   *  exactly, -1 matches any extent; the rank must match. Throws gpff::Error on a missing
   *  tensor, wrong dtype or wrong shape. Values are NOT checked for finiteness here. */
  std::vector<double> f64(const std::string &name, const std::vector<int64_t> &expected_shape) const;
  std::vector<int32_t> i32(const std::string &name, const std::vector<int64_t> &expected_shape) const;

  //! gpff::Error with message "<path>: <problem>"
  Error error(const std::string &problem) const { return Error(path_ + ": " + problem); }

 private:
  std::string path_;
  std::vector<unsigned char> buffer_;    // tensor data (everything after the header)
  std::map<std::string, TensorInfo> tensors_;
  std::unique_ptr<Meta> meta_;

  void check_shape(const std::string &name, const TensorInfo &info, DType dtype,
                   const std::vector<int64_t> &expected_shape) const;
};

const char *dtype_name(ModelFile::DType dtype);
std::string shape_string(const std::vector<int64_t> &shape);
//! shortest round-trip text of a double ("0", "-1.5", "0.1"), for error messages
std::string number_text(double x);

}    // namespace gpff

#endif
