// SwiGLU's activation silu(gate) * value, forward and backward, elementwise over the cores.

#include <cmath>
#include <vector>

#include "kernels.h"
#include "support.h"
#include "vector_math.h"

namespace mlx_aim {

namespace {

// sigmoid(x) from exp(-|x|) (no overflow; NaN stays NaN).
inline float sigmoid(float x) {
  const float e = exp_nonpositive(-std::abs(x));
  const float r = 1.0f / (1.0f + e);
  return x >= 0.0f ? r : e * r;
}

}  // namespace

mx::array silu_gate(const mx::array& gate, const mx::array& value, mx::StreamOrDevice s) {
  check_float32(gate, "silu_gate");
  check_float32(value, "silu_gate");
  if (gate.shape() != value.shape()) {
    throw std::invalid_argument("[mlx_aim.silu_gate] expects the gate and value in one shape");
  }
  return mx::array(
      gate.shape(),
      mx::float32,
      std::make_shared<SiluGate>(mx::to_stream(s)),
      {mx::contiguous(gate, false, s), mx::contiguous(value, false, s)});
}

void SiluGate::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  allocate(out, inputs[0]);
  auto& encoder = encoder_for(stream(), inputs, out);
  encoder.dispatch([gate = inputs[0].data<float>(),
                    value = inputs[1].data<float>(),
                    out = out.data<float>(),
                    n = int64_t(out.size())] {
    parallel_for(n, kGrain, [=](int64_t begin, int64_t end) {
#pragma omp simd
      for (int64_t i = begin; i < end; ++i) {
        out[i] = gate[i] * sigmoid(gate[i]) * value[i];
      }
    });
  });
}

std::vector<mx::array> SiluGate::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>&) {
  const auto s = stream();
  const auto grads = mx::array::make_arrays(
      {primals[0].shape(), primals[0].shape()},
      {mx::float32, mx::float32},
      std::make_shared<SiluGateVJP>(s),
      {primals[0],
       primals[1],
       mx::contiguous(mx::astype(cotangents[0], mx::float32, s), false, s)});
  std::vector<mx::array> vjps;
  for (int arg : argnums) {
    vjps.push_back(grads[arg]);
  }
  return vjps;
}

void SiluGateVJP::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  allocate(outputs[0], inputs[2]);
  outputs[1].set_data(mx::allocator::malloc(outputs[1].nbytes()));
  auto& encoder = encoder_for(stream(), inputs, outputs);
  encoder.dispatch([gate = inputs[0].data<float>(),
                    value = inputs[1].data<float>(),
                    g = inputs[2].data<float>(),
                    d_gate = outputs[0].data<float>(),
                    d_value = outputs[1].data<float>(),
                    n = int64_t(inputs[0].size())] {
    parallel_for(n, kGrain, [=](int64_t begin, int64_t end) {
#pragma omp simd
      for (int64_t i = begin; i < end; ++i) {
        const float sig = sigmoid(gate[i]);
        const float silu = gate[i] * sig;
        const float gi = g[i];
        d_value[i] = gi * silu;
        d_gate[i] = gi * value[i] * (sig + silu * (1.0f - sig));  // silu' = sig (1 + x (1 - sig))
      }
    });
  });
}

}  // namespace mlx_aim
