// The activations, forward and backward, elementwise over the cores: the exact (erf) GELU and
// SwiGLU's silu(gate) * value.

#include <cmath>
#include <stdexcept>
#include <vector>

#include "kernels.h"
#include "support.h"
#include "threads.h"
#include "vector_math.h"

namespace mlx_aim {

namespace {

constexpr float kInvSqrt2Pi = 0.3989422804014327f;

// sigmoid(x) from exp(-|x|) (no overflow; NaN stays NaN).
inline float sigmoid(float x) {
  const float e = exp_nonpositive(-std::abs(x));
  const float r = 1.0f / (1.0f + e);
  return x >= 0.0f ? r : e * r;
}

}  // namespace

mx::array gelu(const mx::array& x, mx::StreamOrDevice s) {
  check_float32(x, "gelu");
  return mx::array(
      x.shape(),
      mx::float32,
      std::make_shared<Gelu>(mx::to_stream(s)),
      {mx::contiguous(x, false, s)});
}

namespace {

mx::array gelu_vjp(const mx::array& x, const mx::array& cotangent, mx::Stream s) {
  return mx::array(
      x.shape(),
      mx::float32,
      std::make_shared<GeluVJP>(s),
      {x, float32_cotangent(cotangent, s)});
}

}  // namespace

void Gelu::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  const auto& x = inputs[0];
  allocate(out, x);
  auto& encoder = encoder_for(stream(), inputs, out);
  encoder.dispatch([x = x.data<float>(), out = out.data<float>(), n = int64_t(out.size())] {
    parallel_for(n, kGrain, [=](int64_t begin, int64_t end) {
#pragma omp simd
      for (int64_t i = begin; i < end; ++i) {
        const float a = std::abs(x[i]);
        out[i] = 0.5f * x[i] + a * half_erf(a);  // x erf(x / sqrt 2) = |x| erf(|x| / sqrt 2)
      }
    });
  });
}

void GeluVJP::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  const auto& x = inputs[0];
  const auto& cotangent = inputs[1];
  allocate(out, cotangent);
  auto& encoder = encoder_for(stream(), inputs, out);
  encoder.dispatch([x = x.data<float>(),
                    g = cotangent.data<float>(),
                    out = out.data<float>(),
                    n = int64_t(out.size())] {
    parallel_for(n, kGrain, [=](int64_t begin, int64_t end) {
#pragma omp simd
      for (int64_t i = begin; i < end; ++i) {
        const float cdf = 0.5f + std::copysign(half_erf(std::abs(x[i])), x[i]);
        const float density = exp_nonpositive(-0.5f * x[i] * x[i]) * kInvSqrt2Pi;
        out[i] = g[i] * (cdf + x[i] * density);
      }
    });
  });
}

std::vector<mx::array> Gelu::jvp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& tangents,
    const std::vector<int>&) {
  return {gelu_vjp(primals[0], tangents[0], stream())};  // GELU' x' (elementwise)
}

std::vector<mx::array> Gelu::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>&,
    const std::vector<mx::array>&) {
  return {gelu_vjp(primals[0], cotangents[0], stream())};
}

std::pair<std::vector<mx::array>, std::vector<int>> Gelu::vmap(
    const std::vector<mx::array>& inputs,
    const std::vector<int>& axes) {
  return {{gelu(inputs[0], stream())}, axes};
}

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
       float32_cotangent(cotangents[0], s)});
  return gradients_for(argnums, [&](int arg) { return grads[arg]; });
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
