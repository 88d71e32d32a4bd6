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

// Rows of C per micro-tile: 8 x 2 vector accumulators fit AVX-512's 32 registers, 4 x 2 the rest.
#ifdef __AVX512F__
constexpr int kTileRows = 8;
#else
constexpr int kTileRows = 4;
#endif
constexpr int64_t kTileCols = 32;  // columns of C per micro-tile (two 16-float vectors)

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
      Vec16 acc[kTileRows][2] = {};
      const float* a_tile = a + i * row_step;
      const float* bj = b + j;
      for (int64_t p = 0; p < k; ++p) {
        const Vec16 b0 = load16(bj + p * ldb);
        const Vec16 b1 = load16(bj + p * ldb + 16);
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
        store16(c + (i + r) * ldc + j, acc[r][0]);
        store16(c + (i + r) * ldc + j + 16, acc[r][1]);
      }
    }
  }
}

}  // namespace mlx_aim
