// The harness's command line and its files: reads a case (case.h) written by emu.py, runs it under
// each requested schedule seed, checks that all seeds give bit-identical outputs, writes them.
//
//   emu_harness CASE OUT [--seeds 1,2,3] [--skip-barrier FILE:LINE] [--no-race-check]
//
// --skip-barrier: calls of the __syncthreads at FILE:LINE do nothing (a mutant with that barrier
// removed); the number of skipped calls is printed. --no-race-check: no shared-memory shadow.
//
// Exit status 0: outputs written; 3: the emulator found an error (message on stderr); 2: bad use.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "case.h"
#include "emu.h"

namespace emu {

extern std::string g_skip_file;  // runtime.cpp
extern int g_skip_line;
extern long g_skip_hits;
extern bool g_race_check;

size_t dtype_size(DType d) {
  if (d == DType::kU8) return 1;
  return d == DType::kF16 || d == DType::kBF16 ? 2 : 4;
}

int64_t Tensor::numel() const {
  int64_t n = 1;
  for (int64_t s : sizes) n *= s;
  return n;
}

Tensor make_tensor(DType dtype, std::vector<int64_t> sizes, unsigned char poison) {
  Tensor t;
  t.dtype = dtype;
  t.sizes = std::move(sizes);
  t.strides.assign(t.sizes.size(), 1);
  for (int d = static_cast<int>(t.sizes.size()) - 2; d >= 0; --d)
    t.strides[d] = t.strides[d + 1] * t.sizes[d + 1];
  t.bytes = static_cast<size_t>(t.numel()) * dtype_size(dtype);
  void* p = nullptr;
  if (posix_memalign(&p, 64, t.bytes ? t.bytes : 1) != 0) throw std::runtime_error("out of memory");
  memset(p, poison, t.bytes);
  t.storage.reset(static_cast<char*>(p), free);
  return t;
}

double Case::scalar(const std::string& name) const {
  auto it = scalars.find(name);
  if (it == scalars.end()) throw std::runtime_error("case has no scalar " + name);
  return it->second;
}

const Tensor& Case::input(const std::string& name) const {
  auto it = inputs.find(name);
  if (it == inputs.end()) throw std::runtime_error("case has no input " + name);
  return it->second;
}

namespace {

struct Reader {
  FILE* f;
  template <typename T>
  T get() {
    T v;
    if (fread(&v, sizeof v, 1, f) != 1) throw std::runtime_error("truncated case file");
    return v;
  }
  std::string str() {
    std::string s(get<uint32_t>(), '\0');
    if (!s.empty() && fread(s.data(), 1, s.size(), f) != s.size())
      throw std::runtime_error("truncated case file");
    return s;
  }
};

// Layout (little endian): "KEMUCASE", op, scalars (name, f64), tensors (name, dtype, ndim, sizes,
// strides, offset, storage bytes, storage); strings are u32 length + bytes.
Case read_case(const char* path) {
  FILE* f = fopen(path, "rb");
  if (!f) throw std::runtime_error(std::string("cannot open ") + path);
  Reader r{f};
  char magic[8];
  if (fread(magic, 1, 8, f) != 8 || memcmp(magic, "KEMUCASE", 8) != 0)
    throw std::runtime_error("not a case file");
  Case c;
  c.op = r.str();
  for (uint32_t i = 0, n = r.get<uint32_t>(); i < n; ++i) {
    std::string name = r.str();
    c.scalars[name] = r.get<double>();
  }
  for (uint32_t i = 0, n = r.get<uint32_t>(); i < n; ++i) {
    std::string name = r.str();
    Tensor t;
    t.dtype = static_cast<DType>(r.get<uint32_t>());
    const uint32_t ndim = r.get<uint32_t>();
    for (uint32_t d = 0; d < ndim; ++d) t.sizes.push_back(r.get<int64_t>());
    for (uint32_t d = 0; d < ndim; ++d) t.strides.push_back(r.get<int64_t>());
    t.offset = r.get<int64_t>();
    t.bytes = r.get<uint64_t>();
    void* p = nullptr;
    if (posix_memalign(&p, 64, t.bytes ? t.bytes : 1) != 0)
      throw std::runtime_error("out of memory");
    t.storage.reset(static_cast<char*>(p), free);
    if (t.bytes && fread(p, 1, t.bytes, f) != t.bytes)
      throw std::runtime_error("truncated case file");
    c.inputs[name] = std::move(t);
  }
  fclose(f);
  return c;
}

void write_outputs(const char* path, const Outputs& outs) {
  FILE* f = fopen(path, "wb");
  if (!f) throw std::runtime_error(std::string("cannot write ") + path);
  auto put = [&](const void* p, size_t n) { fwrite(p, 1, n, f); };
  put("KEMUOUT1", 8);
  const uint32_t count = static_cast<uint32_t>(outs.size());
  put(&count, 4);
  for (const auto& [name, t] : outs) {
    const uint32_t len = static_cast<uint32_t>(name.size()), dtype = static_cast<uint32_t>(t.dtype),
                   ndim = static_cast<uint32_t>(t.sizes.size());
    put(&len, 4);
    put(name.data(), len);
    put(&dtype, 4);
    put(&ndim, 4);
    put(t.sizes.data(), 8 * ndim);
    const uint64_t bytes = t.bytes;
    put(&bytes, 8);
    put(t.storage.get(), t.bytes);
  }
  fclose(f);
}

}  // namespace
}  // namespace emu

int main(int argc, char** argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: %s CASE OUT [--seeds 1,2,3] [--skip-barrier FILE:LINE] "
            "[--no-race-check]\n", argv[0]);
    return 2;
  }
  std::string seeds = "1";
  for (int i = 3; i < argc; i += 2) {
    if (!strcmp(argv[i], "--no-race-check")) {
      emu::g_race_check = false;
      --i;
    } else if (i + 1 == argc) {
      fprintf(stderr, "option %s needs a value\n", argv[i]);
      return 2;
    } else if (!strcmp(argv[i], "--seeds")) {
      seeds = argv[i + 1];
    } else if (!strcmp(argv[i], "--skip-barrier")) {
      const std::string site = argv[i + 1];
      const size_t colon = site.rfind(':');
      emu::g_skip_file = site.substr(0, colon);
      emu::g_skip_line = atoi(site.c_str() + colon + 1);
    } else {
      fprintf(stderr, "unknown option %s\n", argv[i]);
      return 2;
    }
  }
  try {
    const emu::Case c = emu::read_case(argv[1]);
    emu::Outputs first;
    unsigned long long first_seed = 0;
    for (size_t pos = 0; pos < seeds.size();) {
      size_t end = seeds.find(',', pos);
      if (end == std::string::npos) end = seeds.size();
      const unsigned long long seed = strtoull(seeds.c_str() + pos, nullptr, 10);
      pos = end + 1;
      emu::set_schedule(seed);
      emu::Outputs outs = emu::run_case(c);
      if (first.empty()) {
        first = std::move(outs);
        first_seed = seed;
        continue;
      }
      for (size_t i = 0; i < outs.size(); ++i) {
        if (memcmp(outs[i].second.storage.get(), first[i].second.storage.get(),
                   outs[i].second.bytes) != 0) {
          fprintf(stderr, "EMU-ERROR nondeterministic: output %s differs between seeds %llu and "
                  "%llu\n", outs[i].first.c_str(), first_seed, seed);
          return 3;
        }
      }
    }
    emu::write_outputs(argv[2], first);
    printf("skip-hits %ld\n", emu::g_skip_hits);
  } catch (const std::exception& e) {
    fprintf(stderr, "emu_harness: %s\n", e.what());
    return 2;
  }
  return 0;
}
