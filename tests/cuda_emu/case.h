// A test case as the harness sees it: an op name, scalar options and input tensors given as a
// storage buffer plus sizes, strides and offset (so strided views reach the kernels as they are);
// outputs come back contiguous. Read and written by case_io.cpp, run by harness.cpp.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace emu {

enum class DType { kF32, kF16, kBF16, kI32, kU8 };

size_t dtype_size(DType d);

// Owns its storage (allocated 64-byte aligned, exactly `bytes` long, so that the address sanitizer
// sees a read past its end).
struct Tensor {
  DType dtype = DType::kF32;
  std::vector<int64_t> sizes, strides;  // strides in elements
  int64_t offset = 0;                   // in elements
  std::shared_ptr<char> storage;
  size_t bytes = 0;

  void* data() const { return storage.get() + offset * static_cast<int64_t>(dtype_size(dtype)); }
  // at::Tensor's names, so the launch headers' *_args functions pack a call from either
  void* data_ptr() const { return data(); }
  size_t element_size() const { return dtype_size(dtype); }
  int64_t numel() const;
  int64_t stride(int d) const { return strides.at(d); }
  int64_t size(int d) const { return sizes.at(d); }
};

// A contiguous tensor of `sizes`, every byte set to `poison`.
Tensor make_tensor(DType dtype, std::vector<int64_t> sizes, unsigned char poison);

struct Case {
  std::string op;
  std::map<std::string, double> scalars;
  std::map<std::string, Tensor> inputs;

  double scalar(const std::string& name) const;
  // the scalar `name`, or `fallback` when the case has none (an argument with a default)
  double scalar(const std::string& name, double fallback) const {
    auto it = scalars.find(name);
    return it == scalars.end() ? fallback : it->second;
  }
  const Tensor& input(const std::string& name) const;
  bool has_input(const std::string& name) const { return inputs.count(name) != 0; }
};

using Outputs = std::vector<std::pair<std::string, Tensor>>;

// Runs the case's op on the emulator (harness.cpp); outputs in a fixed order.
Outputs run_case(const Case& c);

}  // namespace emu
