// What every primitive of mlx-aim's CPU kernels shares: the dtype check, the output buffer (donated
// where MLX allows), the command encoder, the work grain of a thread, the error for a GPU stream,
// and the graph-side pieces of a gradient (the cotangent's cast, the gradients picked by argnums).

#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"

namespace mx = mlx::core;

namespace mlx_aim {

constexpr int64_t kGrain = 16384;  // elements a thread gets at least: smaller work stays serial

// Rows of an array's last axis (0 when it has no elements).
inline int64_t row_count(const mx::array& a) {
  const int64_t n = a.shape().back();
  return n == 0 ? 0 : int64_t(a.size()) / n;
}

// Rows a thread gets at least, for rows of n elements.
inline int64_t row_grain(int64_t n) {
  return std::max<int64_t>(1, kGrain / std::max<int64_t>(1, n));
}

inline void check_float32(const mx::array& a, const char* op) {
  if (a.dtype() != mx::float32) {
    throw std::invalid_argument(std::string("[mlx_aim.") + op + "] expects float32 input");
  }
}

// `out`'s buffer: that of `donor` when nothing else holds it, else a new one.
inline void allocate(mx::array& out, const mx::array& donor) {
  if (donor.is_donatable() && donor.flags().row_contiguous && donor.size() == out.size()) {
    out.copy_shared_buffer(donor);
  } else {
    out.set_data(mx::allocator::malloc(out.nbytes()));
  }
}

// The stream's command encoder with a primitive's inputs and outputs registered (MLX keeps them
// alive until the work dispatched on it has run).
inline mx::cpu::CommandEncoder& encoder_for(
    mx::Stream stream,
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  auto& encoder = mx::cpu::get_command_encoder(stream);
  for (const auto& input : inputs) {
    encoder.set_input_array(input);
  }
  for (auto& output : outputs) {
    encoder.set_output_array(output);
  }
  return encoder;
}

inline mx::cpu::CommandEncoder&
encoder_for(mx::Stream stream, const std::vector<mx::array>& inputs, mx::array& output) {
  std::vector<mx::array> outputs = {output};  // an array is a handle: the same buffer
  return encoder_for(stream, inputs, outputs);
}

[[noreturn]] inline void no_gpu(const char* name) {
  throw std::runtime_error(std::string("[mlx_aim.") + name + "] runs on MLX's CPU backend only");
}

// A cotangent as a backward primitive's input: float32, row-contiguous.
inline mx::array float32_cotangent(const mx::array& cotangent, mx::Stream s) {
  return mx::contiguous(mx::astype(cotangent, mx::float32, s), false, s);
}

// A vjp's result: gradient(arg) for each of the argnums asked for, in their order.
template <typename Gradient>
std::vector<mx::array> gradients_for(const std::vector<int>& argnums, Gradient gradient) {
  std::vector<mx::array> vjps;
  vjps.reserve(argnums.size());
  for (int arg : argnums) {
    vjps.push_back(gradient(arg));
  }
  return vjps;
}

}  // namespace mlx_aim
