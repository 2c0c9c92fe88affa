// Writes a float32 tensor as a NumPy .npy file (format version 1.0), for numpy.load.
#pragma once

#include <fstream>
#include <stdexcept>
#include <string>

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

}  // namespace npy
