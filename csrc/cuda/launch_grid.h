// What the launch plans of the ops share: the size of a grid and the query-head slice width of the
// GQA kernels. Plain C++ (no torch, no CUDA runtime), like the *_launch.h headers that use it.
#pragma once

#include <cstdint>

namespace kcache_ops {

// Blocks of a launch along x, y and z (the launcher turns it into a dim3).
struct GridSize {
  int64_t x = 1, y = 1, z = 1;
};

// GS, the query heads one block of qk_scores_kernel / sparse_attn_v_kernel handles together, for a
// GQA group of `group_size` query heads: 4 for groups up to 4, else 8 (larger groups take several
// slices of 8). The launchers dispatch on it to the kernels' template constant.
constexpr int group_slice_width(int64_t group_size) { return group_size <= 4 ? 4 : 8; }

}  // namespace kcache_ops
