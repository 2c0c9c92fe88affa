// libFuzzer target: the safetensors reader the examples use on checkpoints they did not make.
// A forged header must end in a CheckpointError, never in an out-of-bounds read, a huge
// allocation or a crash: every indexed tensor's bytes must lie inside the input.
#include <cstddef>
#include <cstdint>

#include "safetensors.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size) {
  checkpoint::Entries entries;
  try {
    checkpoint::index_safetensors_bytes(data, size, "fuzz.safetensors", nullptr, entries);
  } catch (const checkpoint::CheckpointError&) {
    return 0;
  }
  for (const auto& [name, entry] : entries) {
    const std::size_t bytes = static_cast<std::size_t>(c10::elementSize(entry.dtype)) *
                              static_cast<std::size_t>(c10::multiply_integers(entry.shape));
    const auto offset = static_cast<std::size_t>(entry.data - data);
    if (entry.data < data || offset > size || bytes > size - offset) __builtin_trap();
    // Read the whole range through a view: ASan reports any byte outside the input.
    if (bytes > 0 && bytes <= (1u << 20)) (void)entry.view().sum();
  }
  return 0;
}
