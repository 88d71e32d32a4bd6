// Float32 exp and erf from plain arithmetic, so that loops over them vectorize (no libm calls), and
// the vectorized row max, masked fill and (masked) softmax of one row.

#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>

namespace mlx_aim {

constexpr float kLowest = std::numeric_limits<float>::lowest();  // a masked score

// exp(y) for y <= 0 (NaN stays NaN, exp(-inf) = 0): y = n ln2 + r with |r| <= ln2 / 2
// (Cody-Waite: ln 2 in two parts so that n * kLn2Hi is exact), exp(r) by its degree-7 Taylor
// polynomial (truncation below 1e-8 relative), 2^n written into the exponent bits.
inline float exp_nonpositive(float y) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693145751953125f;
  constexpr float kLn2Lo = 1.428606765330187e-06f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds
  y = std::max(y, -88.0f);  // from here down n = -127: 2^n and the result are 0
  const float n = (y * kLog2e + kRound) - kRound;
  const float r = (y - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(float));
  return p * two_n;
}

#define HALF_ERF_P(...) constexpr float kHalfErfP[] = {__VA_ARGS__};
#define ERF_Q(...) constexpr float kErfQ[] = {__VA_ARGS__};
#include "erf_fit.inc"
#undef HALF_ERF_P
#undef ERF_Q

// c[0] + c[1] s + ... + c[N-1] s^(N-1), by Horner's rule.
template <size_t N>
inline float polynomial(const float (&c)[N], float s) {
  float sum = c[N - 1];
  for (size_t i = N - 1; i-- > 0;) {
    sum = sum * s + c[i];
  }
  return sum;
}

// 0.5 erf(a / sqrt 2) for a >= 0 (NaN stays NaN) as a P(a^2) / Q(a^2) on a <= 4 sqrt 2, where
// erf rounds to 1 (erf_fit.inc, shared with the portable kernels), max abs error 2e-7.
inline float half_erf(float a) {
  a = std::min(a, 5.656854249492380f);
  const float s = a * a;
  return a * polynomial(kHalfErfP, s) / polynomial(kErfQ, s);
}

// Floats in one of the CPU's vector registers. A wider generic vector than the hardware's is not
// split cleanly: GCC 12 builds an AVX-512-wide one lane by lane through memory on an AVX2 CPU,
// which made the attention 13x slower there.
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;  // SSE, NEON
#endif
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));

inline Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store(float* p, Vec v) {
  std::memcpy(p, &v, sizeof(v));
}

// max of s[0..n), a vector at a time (GCC does not vectorize a float max reduction by itself).
inline float row_max(const float* s, int64_t n) {
  Vec lanes = Vec{} - std::numeric_limits<float>::infinity();
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const Vec v = load(s + j);
    lanes = v > lanes ? v : lanes;
  }
  float max = -std::numeric_limits<float>::infinity();
  for (int lane = 0; lane < kLanes; ++lane) {
    max = std::max(max, lanes[lane]);
  }
  for (; j < n; ++j) {
    max = std::max(max, s[j]);
  }
  return max;
}

typedef uint8_t Flags __attribute__((vector_size(kLanes)));
typedef int32_t Ints __attribute__((vector_size(kLanes * sizeof(int32_t))));

// s[j] = fill where keep[j] is false, a vector at a time (GCC does not vectorize this select by
// itself).
inline void fill_masked(float* s, const bool* keep, int64_t n, float fill) {
  const Vec fills = Vec{} + fill;
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    Flags flags;
    std::memcpy(&flags, keep + j, sizeof(flags));
    const Ints kept = __builtin_convertvector(flags, Ints) != 0;
    store(s + j, kept ? load(s + j) : fills);
  }
  for (; j < n; ++j) {
    s[j] = keep[j] ? s[j] : fill;
  }
}

// A row of scores s[0..n) (in place) becomes its softmax, the keys where `keep` is false (when
// not null) at the float32 minimum, as mx.fast does (a fully masked row comes out uniform);
// returns the row's (max, 1 / sum of the exponentials).
inline std::pair<float, float> softmax_row(float* s, const bool* keep, int64_t n) {
  if (keep != nullptr) {
    fill_masked(s, keep, n, kLowest);
  }
  const float max = row_max(s, n);
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    s[j] = exp_nonpositive(s[j] - max);
    sum += s[j];
  }
  const float inv_sum = 1.0f / sum;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    s[j] *= inv_sum;
  }
  return {max, inv_sum};
}

// A row of probabilities from its scores s (in place) and softmax_row's (max, 1 / sum): the same
// operations, so the same values.
inline void probabilities_row(float* s, const bool* keep, int64_t n, float max, float inv_sum) {
  if (keep != nullptr) {
    fill_masked(s, keep, n, kLowest);
  }
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    s[j] = exp_nonpositive(s[j] - max) * inv_sum;
  }
}

}  // namespace mlx_aim
