// A register-tiled float32 matrix product for the small matrices of one attention head (a few
// hundred rows and columns), computed in the calling thread: the attention kernels run many of
// them side by side, one per (batch, head), where a BLAS call per head would pay its packing, its
// output scaling and its thread hand-off each time.

#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "vector_math.h"

namespace mlx_aim {

// Rows of C per micro-tile, of two vectors each: 8 x 2 accumulators of AVX-512's 32 registers,
// 6 x 2 of AVX2's 16 (BLIS's 6 x 16 kernel), 4 x 2 otherwise.
constexpr int kTileRows = kLanes == 16 ? 8 : (kLanes == 8 ? 6 : 4);
constexpr int64_t kTileCols = 2 * kLanes;  // columns of C per micro-tile

inline int64_t round_up(int64_t n, int64_t multiple) {
  return (n + multiple - 1) / multiple * multiple;
}

// C = A B, or C = A^T B when TransposeA, for row-major A (M x K, or K x M when transposed; row
// stride lda), B (K x N, ldb) and C (M x N, ldc). M must be a multiple of kTileRows and N of
// kTileCols: callers pad with rows and columns whose results they drop (a transposed A is read up
// to the rounded M, so its rows must be that long).
template <bool TransposeA = false>
inline void gemm(
    int64_t m,
    int64_t n,
    int64_t k,
    const float* a,
    int64_t lda,
    const float* b,
    int64_t ldb,
    float* c,
    int64_t ldc) {
  const int64_t row_step = TransposeA ? 1 : lda;  // from one row of C's tile to the next, in A
  const int64_t depth_step = TransposeA ? lda : 1;  // along the summed axis, in A
  for (int64_t j = 0; j < n; j += kTileCols) {
    for (int64_t i = 0; i < m; i += kTileRows) {
      Vec acc[kTileRows][2] = {};
      const float* a_tile = a + i * row_step;
      const float* bj = b + j;
      for (int64_t p = 0; p < k; ++p) {
        const Vec b0 = load(bj + p * ldb);
        const Vec b1 = load(bj + p * ldb + kLanes);
        const float* a_p = a_tile + p * depth_step;
#pragma GCC unroll 8
        for (int r = 0; r < kTileRows; ++r) {
          const float ar = a_p[r * row_step];
          acc[r][0] += ar * b0;
          acc[r][1] += ar * b1;
        }
      }
#pragma GCC unroll 8
      for (int r = 0; r < kTileRows; ++r) {
        store(c + (i + r) * ldc + j, acc[r][0]);
        store(c + (i + r) * ldc + j + kLanes, acc[r][1]);
      }
    }
  }
}

}  // namespace mlx_aim
