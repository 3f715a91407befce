// kcache_ops::reuse_rows on the CPU: KCache's pool of reused V rows, one decode step (the schema's
// comment in ../registration.cpp). One task per (sequence, KV head): hash maps give each position
// its first entry and the slot holding it, a partial sort the least recently used slots.
#include <algorithm>
#include <cstring>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "../named_op.h"
#include "../shape_checks.h"
#include "../value_checks.h"
#include "common.h"

namespace kcache_ops::cpu {
namespace {

constexpr char kOp[] = "reuse_rows";  // first in each error the op raises (named_op.h)

// The order in which slots are refilled: ascending (step last read + 1, at least 0), then slot; a
// slot found by this step (kFoundKey | slot, above every int32 step) never. The CUDA kernel sorts
// the same 64-bit keys (reuse_rows_kernel.cuh).
constexpr uint64_t kFoundKey = uint64_t{0xffffffff} << 32;
inline uint64_t refill_key(int64_t last_read, int64_t slot) {
  return static_cast<uint64_t>(std::max<int64_t>(last_read + 1, 0)) << 32 |
         static_cast<uint64_t>(slot);
}

std::tuple<at::Tensor, at::Tensor> reuse_rows_cpu(
    const at::Tensor& indices,  // [B, Hq, N] int32
    const at::Tensor& v_host,   // [B, Hkv, S, D]
    const at::Tensor& new_pos,  // [B] int32
    const at::Tensor& rows,     // [B, Hkv, C, D], updated
    const at::Tensor& held,     // [B, Hkv, C] int32, updated
    const at::Tensor& used,     // [B, Hkv, C] int32, updated
    const at::Tensor& step,     // [1] int32
    bool group_select, bool /*check_values*/) {  // indices on the host: checked
  const ReuseRowsDims d =
      check_reuse_rows_args(indices, v_host, new_pos, rows, held, used, step, group_select);
  KC_CHECK_CPU(indices);
  KC_CHECK_CPU(v_host);
  KC_CHECK_CPU(new_pos);
  KC_CHECK_CPU(rows);
  KC_CHECK_CPU(held);
  KC_CHECK_CPU(used);
  KC_CHECK_CPU(step);
  check_host_output(bytes_of({d.B, d.Hq, d.N}, 4), [&] {  // indices expanded with stride 0
    return c10::str("pool_indices [", d.B, ", ", d.Hq, ", ", d.N, "] int32");
  });
  check_index_values(indices, d.S, "v_host");
  at::Tensor pool_indices = at::empty({d.B, d.Hq, d.N}, indices.options());  // [B, Hq, N]
  at::Tensor counts = at::empty({d.B, d.Hkv, 2}, indices.options());       // [B, Hkv, 2]
  if (d.N == 0) {  // no entry: nothing is read, and indices may have no storage
    counts.zero_();
    return {pool_indices, counts};
  }
  const int32_t now = step.data_ptr<int32_t>()[0];
  const int64_t elem = static_cast<int64_t>(v_host.element_size());
  const int64_t row_bytes = d.D * elem;
  const char* v_p = static_cast<const char*>(v_host.data_ptr());
  char* rows_p = static_cast<char*>(rows.data_ptr());
  const int64_t ix_sb = indices.stride(0), ix_sh = indices.stride(1), ix_sn = indices.stride(2);

  parallel_for(0, d.B * d.Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> pos(d.E), first(d.E), slot(d.E);  // per entry
    std::vector<uint64_t> keys(d.C);
    std::unordered_map<int32_t, int32_t> first_of, slot_of;  // position -> entry, slot
    for (int64_t bk = begin; bk < end; ++bk) {
      const int64_t b = bk / d.Hkv, kv = bk % d.Hkv;
      const int32_t* ix = indices.data_ptr<int32_t>() + b * ix_sb + kv * d.G * ix_sh;
      auto index = [&](int64_t g, int64_t i) {  // head g of the group, entry i; -1 padding
        const int32_t j = ix[g * ix_sh + i * ix_sn];
        return j >= 0 && j < d.S ? j : -1;
      };
      for (int64_t e = 0; e < d.E; ++e) {
        int32_t p = -1;
        if (group_select) {
          for (int64_t g = 0; g < d.G; ++g) p = std::max(p, index(g, e));
        } else {
          p = index(e / d.N, e % d.N);
        }
        pos[e] = p;
      }
      int32_t* held_p = held.data_ptr<int32_t>() + bk * d.C;
      int32_t* used_p = used.data_ptr<int32_t>() + bk * d.C;
      slot_of.clear();
      for (int64_t c = d.C - 1; c >= 0; --c)  // the first slot holding a position wins
        if (held_p[c] >= 0) slot_of[held_p[c]] = static_cast<int32_t>(c);
      first_of.clear();
      int32_t reads = 0, hits = 0;
      for (int64_t e = 0; e < d.E; ++e) {
        first[e] = static_cast<int32_t>(e);
        slot[e] = -1;  // not read by this entry, or read from v_host
        if (pos[e] < 0) continue;
        const auto [it, fresh] = first_of.emplace(pos[e], static_cast<int32_t>(e));
        first[e] = it->second;
        if (!fresh) continue;
        ++reads;
        const auto found = slot_of.find(pos[e]);
        if (found != slot_of.end()) {
          slot[e] = found->second;
          ++hits;
        }
      }
      const int32_t new_p = new_pos.data_ptr<int32_t>()[b * new_pos.stride(0)];
      if (reads > hits) {  // the misses take the least recently used slots this step does not read
        for (int64_t c = 0; c < d.C; ++c) keys[c] = refill_key(used_p[c], c);
        for (int64_t e = 0; e < d.E; ++e)
          if (first[e] == e && slot[e] >= 0) keys[slot[e]] = kFoundKey | slot[e];
        std::partial_sort(keys.begin(), keys.begin() + (reads - hits), keys.end());
        int64_t victim = 0;
        for (int64_t e = 0; e < d.E; ++e) {
          if (pos[e] < 0 || first[e] != e || slot[e] >= 0) continue;
          slot[e] = static_cast<int32_t>(keys[victim++] & 0xffffffffu);
          std::memcpy(rows_p + (bk * d.C + slot[e]) * row_bytes,
                      v_p + (b * v_host.stride(0) + kv * v_host.stride(1) +
                             pos[e] * v_host.stride(2)) * elem,
                      row_bytes);
          held_p[slot[e]] = pos[e] == new_p ? -1 : pos[e];  // the new token's: this step only
        }
      }
      for (int64_t e = 0; e < d.E; ++e)
        if (pos[e] >= 0 && first[e] == e)
          used_p[slot[e]] = pos[e] == new_p ? -1 : now;
      int32_t* out = pool_indices.data_ptr<int32_t>() + (b * d.Hq + kv * d.G) * d.N;
      for (int64_t g = 0; g < d.G; ++g)
        for (int64_t i = 0; i < d.N; ++i, ++out)
          *out = index(g, i) < 0 ? -1 : slot[first[group_select ? i : g * d.N + i]];
      int32_t* count = counts.data_ptr<int32_t>() + bk * 2;
      count[0] = reads;
      count[1] = hits;
    }
  });
  return {pool_indices, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(kcache_ops, CPU, m) { m.impl(kOp, &NamedOp<kOp, &reuse_rows_cpu>::call); }

}  // namespace kcache_ops::cpu
