/* gpff C++ inference core: reader of `.gpff` model files (see model_file.h, docs/model_file.md). */

#include "model_file.h"
#include "model_file_json.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <sstream>

namespace gpff {

const char *dtype_name(ModelFile::DType dtype)
{
  return dtype == ModelFile::DType::F64 ? "F64" : "I32";
}

std::string shape_string(const std::vector<int64_t> &shape)
{
  std::ostringstream out;
  out << "(";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) out << ", ";
    if (shape[i] < 0)
      out << "*";
    else
      out << shape[i];
  }
  if (shape.size() == 1) out << ",";
  out << ")";
  return out.str();
}

std::string number_text(double x)
{
  char buf[32];
  for (int prec = 1; prec <= 17; ++prec) {
    std::snprintf(buf, sizeof buf, "%.*g", prec, x);
    if (std::strtod(buf, nullptr) == x) break;
  }
  return buf;
}

static bool host_is_little_endian()
{
  const uint16_t one = 1;
  unsigned char first;
  std::memcpy(&first, &one, 1);
  return first == 1;
}

ModelFile::ModelFile(const std::string &path) : path_(path), meta_(new Meta)
{
  if (!host_is_little_endian()) throw error("big-endian hosts are not supported");

  // ---- read the whole file ----
  std::ifstream in(path, std::ios::binary);
  if (!in) throw error("cannot open model file (missing or unreadable)");
  std::vector<unsigned char> bytes((std::istreambuf_iterator<char>(in)),
                                   std::istreambuf_iterator<char>());
  if (in.bad()) throw error("read error");
  const uint64_t file_size = bytes.size();

  // ---- header length ----
  if (file_size < 8)
    throw error("truncated file: " + std::to_string(file_size) +
                " bytes, shorter than the 8-byte safetensors header length");
  uint64_t header_len = 0;
  for (int b = 7; b >= 0; --b) header_len = (header_len << 8) | bytes[b];
  if (header_len > file_size - 8)
    throw error("header length " + std::to_string(header_len) + " larger than the file (" +
                std::to_string(file_size) + " bytes): truncated or not a safetensors file");
  if (header_len == 0) throw error("empty safetensors header");

  // ---- JSON header ----
  json header;
  try {
    header = json::parse(bytes.begin() + 8, bytes.begin() + 8 + header_len);
  } catch (const json::exception &e) {
    throw error(std::string("invalid JSON in safetensors header: ") + e.what());
  }
  if (!header.is_object()) throw error("invalid safetensors header: not a JSON object");

  buffer_.assign(bytes.begin() + 8 + header_len, bytes.end());
  bytes.clear();
  bytes.shrink_to_fit();
  const uint64_t buffer_size = buffer_.size();

  // ---- metadata ----
  auto meta_it = header.find("__metadata__");
  if (meta_it == header.end() || !meta_it->is_object())
    throw error("no __metadata__ object in the safetensors header: not a gpff model file");
  auto gpff_it = meta_it->find("gpff");
  if (gpff_it == meta_it->end() || !gpff_it->is_string())
    throw error("no __metadata__.gpff entry in the safetensors header: not a gpff model file");
  try {
    meta_->doc = json::parse(gpff_it->get<std::string>());
  } catch (const json::exception &e) {
    throw error(std::string("invalid JSON in __metadata__.gpff: ") + e.what());
  }
  if (!meta_->doc.is_object()) throw error("invalid __metadata__.gpff: not a JSON object");
  auto fv = meta_->doc.find("format_version");
  if (fv == meta_->doc.end()) throw error("metadata has no format_version");
  if (!fv->is_number_integer())
    throw error("format_version is not an integer: " + fv->dump());
  if (fv->get<int64_t>() != MODEL_FORMAT_VERSION)
    throw error("unsupported format_version " + fv->dump() + " (this reader understands format_version " +
                std::to_string(MODEL_FORMAT_VERSION) + ")");

  // ---- tensor table ----
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string &name = it.key();
    if (name == "__metadata__") continue;
    const json &t = it.value();
    const std::string where = "tensor '" + name + "': ";
    if (!t.is_object()) throw error(where + "header entry is not a JSON object");
    TensorInfo info;
    auto dt = t.find("dtype");
    if (dt == t.end() || !dt->is_string()) throw error(where + "missing dtype");
    const std::string dts = dt->get<std::string>();
    size_t itemsize;
    if (dts == "F64") {
      info.dtype = DType::F64;
      itemsize = 8;
    } else if (dts == "I32") {
      info.dtype = DType::I32;
      itemsize = 4;
    } else {
      throw error(where + "unsupported dtype " + dts + " (gpff files hold F64 and I32 tensors)");
    }
    auto sh = t.find("shape");
    if (sh == t.end() || !sh->is_array()) throw error(where + "missing shape");
    // number of elements, checked against the buffer size so it cannot overflow
    uint64_t count = 1;
    bool zero = false;
    for (const auto &e : *sh) {
      if (!e.is_number_integer() || e.get<int64_t>() < 0)
        throw error(where + "shape entries must be non-negative integers, got " + sh->dump());
      const uint64_t n = e.get<uint64_t>();
      info.shape.push_back(static_cast<int64_t>(n));
      if (n == 0) zero = true;
      if (!zero) {
        if (n > buffer_size / itemsize || count > (buffer_size / itemsize) / n)
          throw error(where + "shape " + shape_string(info.shape) + " does not fit in the " +
                      std::to_string(buffer_size) + "-byte data buffer (shape/offset mismatch)");
        count *= n;
      }
    }
    if (zero) count = 0;
    auto off = t.find("data_offsets");
    if (off == t.end() || !off->is_array() || off->size() != 2 || !(*off)[0].is_number_unsigned() ||
        !(*off)[1].is_number_unsigned())
      throw error(where + "data_offsets must be two non-negative integers");
    info.begin = (*off)[0].get<uint64_t>();
    info.end = (*off)[1].get<uint64_t>();
    if (info.begin > info.end || info.end > buffer_size)
      throw error(where + "data_offsets [" + std::to_string(info.begin) + ", " +
                  std::to_string(info.end) + ") outside the " + std::to_string(buffer_size) +
                  "-byte data buffer (truncated file?)");
    if (count * itemsize != info.end - info.begin)
      throw error(where + "shape " + shape_string(info.shape) + " x " + std::to_string(itemsize) +
                  " bytes does not match data_offsets span of " +
                  std::to_string(info.end - info.begin) + " bytes (shape/offset mismatch)");
    tensors_.emplace(name, std::move(info));
  }

  // ---- no two tensors overlap ----
  std::vector<std::pair<const std::string *, const TensorInfo *>> order;
  for (const auto &kv : tensors_)
    if (kv.second.end > kv.second.begin) order.emplace_back(&kv.first, &kv.second);
  std::sort(order.begin(), order.end(),
            [](const auto &a, const auto &b) { return a.second->begin < b.second->begin; });
  for (size_t i = 1; i < order.size(); ++i)
    if (order[i].second->begin < order[i - 1].second->end)
      throw error("tensors '" + *order[i - 1].first + "' and '" + *order[i].first +
                  "' overlap in the data buffer");
}

ModelFile::~ModelFile() = default;

// ---- metadata getters ------------------------------------------------------------------------

bool ModelFile::has_key(const std::string &key) const
{
  return meta_->doc.contains(key);
}

static const json &get_key(const ModelFile &mf, const json &doc, const std::string &key)
{
  auto it = doc.find(key);
  if (it == doc.end()) throw mf.error("metadata key '" + key + "' is missing");
  return *it;
}

std::string ModelFile::model_kind() const
{
  return meta_string("model");
}

std::string ModelFile::meta_string(const std::string &key) const
{
  const json &v = get_key(*this, meta_->doc, key);
  if (!v.is_string()) throw error("metadata key '" + key + "' must be a string, got " + v.dump());
  return v.get<std::string>();
}

double ModelFile::meta_double(const std::string &key) const
{
  const json &v = get_key(*this, meta_->doc, key);
  if (!v.is_number()) throw error("metadata key '" + key + "' must be a number, got " + v.dump());
  const double x = v.get<double>();
  if (!std::isfinite(x)) throw error("metadata key '" + key + "' is not finite");
  return x;
}

int64_t ModelFile::meta_int(const std::string &key) const
{
  const json &v = get_key(*this, meta_->doc, key);
  if (!v.is_number_integer())
    throw error("metadata key '" + key + "' must be an integer, got " + v.dump());
  return v.get<int64_t>();
}

std::vector<std::string> ModelFile::meta_string_list(const std::string &key) const
{
  const json &v = get_key(*this, meta_->doc, key);
  if (!v.is_array()) throw error("metadata key '" + key + "' must be a list of strings");
  std::vector<std::string> out;
  for (const auto &e : v) {
    if (!e.is_string()) throw error("metadata key '" + key + "' must be a list of strings");
    out.push_back(e.get<std::string>());
  }
  return out;
}

std::string ModelFile::meta_object_string(const std::string &key, const std::string &member) const
{
  const json &v = get_key(*this, meta_->doc, key);
  if (!v.is_object()) throw error("metadata key '" + key + "' must be an object");
  auto it = v.find(member);
  if (it == v.end() || !it->is_string())
    throw error("metadata key '" + key + "." + member + "' is missing or not a string");
  return it->get<std::string>();
}

std::string ModelFile::energy_unit() const
{
  const std::string energy = meta_object_string("units", "energy");
  if (energy != "kcal/mol" && energy != "eV")
    throw error("energy unit '" + energy + "' is not supported (use 'kcal/mol' or 'eV')");
  const std::string length = meta_object_string("units", "length");
  if (length != "Angstrom")
    throw error("length unit '" + length + "' is not supported (only 'Angstrom')");
  return energy;
}

// ---- tensors -----------------------------------------------------------------------------

bool ModelFile::has_tensor(const std::string &name) const
{
  return tensors_.count(name) != 0;
}

const ModelFile::TensorInfo &ModelFile::tensor_info(const std::string &name) const
{
  auto it = tensors_.find(name);
  if (it == tensors_.end()) throw error("missing tensor '" + name + "'");
  return it->second;
}

void ModelFile::check_shape(const std::string &name, const TensorInfo &info, DType dtype,
                            const std::vector<int64_t> &expected_shape) const
{
  if (info.dtype != dtype)
    throw error("tensor '" + name + "' has dtype " + dtype_name(info.dtype) + ", expected " +
                dtype_name(dtype));
  bool ok = info.shape.size() == expected_shape.size();
  for (size_t i = 0; ok && i < expected_shape.size(); ++i)
    if (expected_shape[i] >= 0 && expected_shape[i] != info.shape[i]) ok = false;
  if (!ok)
    throw error("tensor '" + name + "' has shape " + shape_string(info.shape) + ", expected " +
                shape_string(expected_shape));
}

std::vector<double> ModelFile::f64(const std::string &name,
                                   const std::vector<int64_t> &expected_shape) const
{
  const TensorInfo &info = tensor_info(name);
  check_shape(name, info, DType::F64, expected_shape);
  std::vector<double> out((info.end - info.begin) / sizeof(double));
  if (!out.empty()) std::memcpy(out.data(), buffer_.data() + info.begin, info.end - info.begin);
  return out;
}

std::vector<int32_t> ModelFile::i32(const std::string &name,
                                    const std::vector<int64_t> &expected_shape) const
{
  const TensorInfo &info = tensor_info(name);
  check_shape(name, info, DType::I32, expected_shape);
  std::vector<int32_t> out((info.end - info.begin) / sizeof(int32_t));
  if (!out.empty()) std::memcpy(out.data(), buffer_.data() + info.begin, info.end - info.begin);
  return out;
}

}    // namespace gpff
