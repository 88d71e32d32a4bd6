// Float32 exp and erf from plain arithmetic, so that loops over them vectorize (no libm calls),
// a vectorized row max and softmax, and a row-parallel loop over the cores this process may use.

#pragma once

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <thread>
#include <utility>
#include <vector>

namespace mlx_aim {

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

// 0.5 erf(a / sqrt 2) for a >= 0 (NaN stays NaN) as a P(a^2) / Q(a^2) on a <= 4 sqrt 2, where
// erf rounds to 1: the degree-5/5 fit of mlx_aim's portable CPU kernels, max abs error 2e-7.
inline float half_erf(float a) {
  a = std::min(a, 5.656854249492380f);
  const float s = a * a;
  const float p =
      0.39894221294521526f +
      s * (0.034696523074525774f +
           s * (0.004726190458421924f +
                s * (0.0001769834746358358f +
                     s * (6.3653764663803644e-06f + s * 2.1817031098618527e-08f))));
  const float q =
      1.0f +
      s * (0.25363686379121675f +
           s * (0.029121619750357867f +
                s * (0.0019308149340320222f +
                     s * (7.603796684841192e-05f + s * 1.1712551652742244e-06f))));
  return a * p / q;
}

// 16 floats; the compiler maps it onto the CPU's vectors (one AVX-512 register, two AVX ones).
typedef float Vec16 __attribute__((vector_size(64)));

inline Vec16 load16(const float* p) {
  Vec16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store16(float* p, Vec16 v) {
  std::memcpy(p, &v, sizeof(v));
}

// max of s[0..n), 16 lanes at a time (GCC does not vectorize a float max reduction by itself).
inline float row_max(const float* s, int64_t n) {
  Vec16 lanes = Vec16{} - std::numeric_limits<float>::infinity();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const Vec16 v = load16(s + j);
    lanes = v > lanes ? v : lanes;
  }
  float max = -std::numeric_limits<float>::infinity();
  for (int lane = 0; lane < 16; ++lane) {
    max = std::max(max, lanes[lane]);
  }
  for (; j < n; ++j) {
    max = std::max(max, s[j]);
  }
  return max;
}

// s[0..n) (in place) becomes its softmax; returns (max, 1 / sum of the exponentials).
inline std::pair<float, float> softmax_in_place(float* s, int64_t n) {
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

// Threads a kernel may use: the cores this process may run on (its affinity mask), at most
// OMP_NUM_THREADS when that is set (the usual knob, which PyTorch and OpenBLAS honor too). Read
// once.
inline int usable_cores() {
  static const int cores = [] {
    int count = std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) {
      count = std::max(1, CPU_COUNT(&set));
    }
    if (const char* limit = std::getenv("OMP_NUM_THREADS")) {
      const int threads = std::atoi(limit);
      if (threads > 0) {
        count = std::min(count, threads);
      }
    }
    return count;
  }();
  return cores;
}

// Calls body(begin, end) on consecutive chunks of [0, n) in parallel, one chunk of at least
// `grain` items per thread. Kernels running at once (several CPU streams) share the cores.
template <typename Body>
void parallel_for(int64_t n, int64_t grain, Body body) {
  static std::atomic<int> running{0};
  const int sharing = running.fetch_add(1) + 1;
  const int64_t by_work = std::max<int64_t>(1, n / std::max<int64_t>(1, grain));
  const int threads = static_cast<int>(
      std::min<int64_t>(by_work, std::max(1, usable_cores() / sharing)));
  const int64_t chunk = (n + threads - 1) / threads;
  std::vector<std::thread> helpers;
  for (int t = 1; t < threads; ++t) {
    const int64_t begin = t * chunk;
    helpers.emplace_back(body, begin, std::min(n, begin + chunk));
  }
  body(0, std::min(n, chunk));
  for (auto& helper : helpers) {
    helper.join();
  }
  running.fetch_sub(1);
}

}  // namespace mlx_aim
