// NumPy .npy files of float32 (format 1.0 and 2.0, little-endian, C order): written for numpy.load,
// read from numpy.save. Used by both examples.
#pragma once

#include <cstdint>
#include <cstring>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/torch.h>

namespace npy {

inline void save_float32(const std::string& path, const torch::Tensor& tensor) {
  const auto data = tensor.detach().to(torch::kCPU, torch::kFloat32).contiguous();
  std::string shape = fmt::format("{}", fmt::join(data.sizes(), ", "));
  if (data.dim() == 1) shape += ",";
  std::string header =
      fmt::format("{{'descr': '<f4', 'fortran_order': False, 'shape': ({}), }}", shape);
  // magic (6) + version (2) + length (2) + header + '\n' is padded to a multiple of 64.
  header.append(63 - (10 + header.size()) % 64, ' ');
  header += '\n';
  std::ofstream out(path, std::ios::binary);
  out.write("\x93NUMPY\x01\x00", 8);
  const uint16_t length = static_cast<uint16_t>(header.size());
  out.write(reinterpret_cast<const char*>(&length), 2);
  out.write(header.data(), static_cast<std::streamsize>(header.size()));
  out.write(static_cast<const char*>(data.data_ptr()),
            static_cast<std::streamsize>(data.numel() * 4));
  if (!out) throw std::runtime_error("npy: writing " + path + " failed");
}

/// Reads a little-endian float32 array in C order; anything else is a clear error.
inline torch::Tensor load_float32(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("npy: cannot open " + path);
  const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const auto fail = [&](const std::string& why) -> torch::Tensor {
    throw std::runtime_error("npy: " + path + ": " + why);
  };
  if (bytes.size() < 10 || bytes.compare(0, 6, "\x93NUMPY") != 0) return fail("not a .npy file");
  const int major = static_cast<unsigned char>(bytes[6]);
  std::size_t length = 0, start = 0;
  if (major == 1) {
    length = static_cast<unsigned char>(bytes[8]) | static_cast<unsigned char>(bytes[9]) << 8;
    start = 10;
  } else if (major == 2 || major == 3) {
    if (bytes.size() < 12) return fail("truncated header");
    uint32_t length32 = 0;
    std::memcpy(&length32, bytes.data() + 8, 4);
    length = length32;
    start = 12;
  } else {
    return fail("unknown format version " + std::to_string(major));
  }
  if (bytes.size() < start + length) return fail("truncated header");
  const std::string header = bytes.substr(start, length);
  if (header.find("'descr': '<f4'") == std::string::npos) return fail("not little-endian float32");
  if (header.find("'fortran_order': False") == std::string::npos) return fail("not in C order");
  const auto open = header.find("'shape': (");
  const auto close = header.find(')', open);
  if (open == std::string::npos || close == std::string::npos) return fail("no shape");
  std::vector<int64_t> shape;
  std::string dims = header.substr(open + 10, close - open - 10);
  for (std::size_t pos = 0; pos < dims.size();) {
    const auto comma = dims.find(',', pos);
    const auto item =
        dims.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    if (item.find_first_not_of(' ') != std::string::npos) shape.push_back(std::stoll(item));
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  auto tensor = torch::empty(shape, torch::kFloat32);
  if (bytes.size() - start - length != tensor.nbytes()) {
    return fail(fmt::format("holds {} bytes of data, shape [{}] needs {}",
                            bytes.size() - start - length, fmt::join(shape, ", "),
                            tensor.nbytes()));
  }
  std::memcpy(tensor.data_ptr(), bytes.data() + start + length, tensor.nbytes());
  return tensor;
}

}  // namespace npy
