// LayerNorm and RMSNorm over the last axis, forward and backward, rows split over the cores.

#include <cmath>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels.h"
#include "support.h"
#include "threads.h"

namespace mlx_aim {

namespace {

// sum_j term(j) over [0, n) as four interleaved vector sums (the quarters of the row), which
// hide the latency of the additions that one running sum would wait on.
template <typename Term>
float row_sum(int64_t n, Term term) {
  const int64_t q = n / 4;
  float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t j = 0; j < q; ++j) {
    s0 += term(j);
    s1 += term(j + q);
    s2 += term(j + 2 * q);
    s3 += term(j + 3 * q);
  }
  for (int64_t j = 4 * q; j < n; ++j) {
    s0 += term(j);
  }
  return (s0 + s1) + (s2 + s3);
}

// (mean, 1 / sqrt(var + eps)) of a row, two-pass in float32; uncentered (RMSNorm): (0, 1 /
// sqrt(mean(x^2) + eps)).
std::pair<float, float> row_moments(const float* x, int64_t n, float eps, bool centered) {
  const float mean =
      centered ? row_sum(n, [=](int64_t j) { return x[j]; }) / static_cast<float>(n) : 0.0f;
  const float squares = row_sum(n, [=](int64_t j) {
    const float d = x[j] - mean;
    return d * d;
  });
  return {mean, 1.0f / std::sqrt(squares / static_cast<float>(n) + eps)};
}

// One row of LayerNorm (bias not null) or RMSNorm (bias null).
void layer_norm_row(
    const float* x,
    const float* weight,
    const float* bias,
    int64_t n,
    float eps,
    float* out) {
  const auto [mean, inv_std] = row_moments(x, n, eps, bias != nullptr);
  if (bias == nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      out[j] = x[j] * inv_std * weight[j];
    }
    return;
  }
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    out[j] = (x[j] - mean) * inv_std * weight[j] + bias[j];
  }
}

// dx = inv_std (g w - mean(g w) - xhat mean(g w xhat)) of one row, without the mean(g w) term
// when uncentered (RMSNorm); adds g xhat to dweight and g to dbias.
void layer_norm_vjp_row(
    const float* x,
    const float* weight,
    const float* g,
    int64_t n,
    float eps,
    bool centered,
    float* dx,
    float* dweight,
    float* dbias) {
  const auto [mean, inv_std] = row_moments(x, n, eps, centered);
  const float sum_gw = centered ? row_sum(n, [=](int64_t j) { return g[j] * weight[j]; }) : 0.0f;
  const float sum_gw_xhat = row_sum(n, [=](int64_t j) {
    return g[j] * weight[j] * ((x[j] - mean) * inv_std);
  });
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    dweight[j] += g[j] * ((x[j] - mean) * inv_std);
    dbias[j] += g[j];
  }
  const float mean_gw = sum_gw / static_cast<float>(n);
  const float mean_gw_xhat = sum_gw_xhat / static_cast<float>(n);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float xhat = (x[j] - mean) * inv_std;
    dx[j] = inv_std * (g[j] * weight[j] - mean_gw - xhat * mean_gw_xhat);
  }
}

}  // namespace

namespace {

// LayerNorm (with a bias) or RMSNorm (without) over the last axis of x, checked: the graph node.
mx::array norm(
    const mx::array& x,
    const mx::array& weight,
    const mx::array* bias,
    float eps,
    const char* op,
    mx::StreamOrDevice s) {
  check_float32(x, op);
  check_float32(weight, op);
  if (bias != nullptr) {
    check_float32(*bias, op);
  }
  if (x.ndim() == 0) {
    throw std::invalid_argument(std::string("[mlx_aim.") + op + "] expects at least one axis");
  }
  const int dim = x.shape().back();
  if (weight.shape() != mx::Shape{dim} || (bias != nullptr && bias->shape() != mx::Shape{dim})) {
    throw std::invalid_argument(
        std::string("[mlx_aim.") + op + "] expects " + (bias ? "weight and bias" : "a weight") +
        " of shape (" + std::to_string(dim) + ",)");
  }
  std::vector<mx::array> inputs = {mx::contiguous(x, false, s), mx::contiguous(weight, false, s)};
  if (bias != nullptr) {
    inputs.push_back(mx::contiguous(*bias, false, s));
  }
  return mx::array(
      x.shape(), mx::float32, std::make_shared<LayerNorm>(mx::to_stream(s), eps), inputs);
}

}  // namespace

mx::array layer_norm(
    const mx::array& x,
    const mx::array& weight,
    const mx::array& bias,
    float eps,
    mx::StreamOrDevice s) {
  return norm(x, weight, &bias, eps, "layer_norm", s);
}

mx::array rms_norm(const mx::array& x, const mx::array& weight, float eps, mx::StreamOrDevice s) {
  return norm(x, weight, nullptr, eps, "rms_norm", s);
}

void LayerNorm::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  const auto& x = inputs[0];
  allocate(out, x);
  auto& encoder = encoder_for(stream(), inputs, out);
  const int64_t n = x.shape().back();
  const int64_t rows = row_count(x);
  encoder.dispatch([x = x.data<float>(),
                    weight = inputs[1].data<float>(),
                    bias = inputs.size() > 2 ? inputs[2].data<float>() : nullptr,
                    out = out.data<float>(),
                    eps = eps_,
                    rows,
                    n] {
    parallel_for(rows, row_grain(n), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        layer_norm_row(x + r * n, weight, bias, n, eps, out + r * n);
      }
    });
  });
}

void LayerNormVJP::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  const auto& x = inputs[0];
  const auto& cotangent = inputs[2];
  allocate(outputs[0], cotangent);
  for (size_t i = 1; i < outputs.size(); ++i) {
    outputs[i].set_data(mx::allocator::malloc(outputs[i].nbytes()));
  }
  auto& encoder = encoder_for(stream(), inputs, outputs);
  const int64_t n = x.shape().back();
  const int64_t rows = row_count(x);
  encoder.dispatch([x = x.data<float>(),
                    weight = inputs[1].data<float>(),
                    g = cotangent.data<float>(),
                    dx = outputs[0].data<float>(),
                    dweight = outputs[1].data<float>(),
                    dbias = outputs.size() > 2 ? outputs[2].data<float>() : nullptr,
                    eps = eps_,
                    rows,
                    n] {
    std::fill(dweight, dweight + n, 0.0f);
    if (dbias != nullptr) {
      std::fill(dbias, dbias + n, 0.0f);
    }
    std::mutex adding;
    parallel_for(rows, row_grain(n), [&](int64_t begin, int64_t end) {
      std::vector<float> partial(2 * n, 0.0f);  // this thread's dweight, then dbias
      for (int64_t r = begin; r < end; ++r) {
        layer_norm_vjp_row(
            x + r * n,
            weight,
            g + r * n,
            n,
            eps,
            dbias != nullptr,
            dx + r * n,
            partial.data(),
            partial.data() + n);
      }
      std::lock_guard<std::mutex> lock(adding);
      for (int64_t j = 0; j < n; ++j) {
        dweight[j] += partial[j];
      }
      if (dbias != nullptr) {
        for (int64_t j = 0; j < n; ++j) {
          dbias[j] += partial[n + j];
        }
      }
    });
  });
}

std::vector<mx::array> LayerNorm::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>&) {
  const auto& weight = primals[1];
  std::vector<mx::Shape> shapes = {primals[0].shape(), weight.shape()};
  if (primals.size() > 2) {
    shapes.push_back(weight.shape());  // dbias
  }
  const auto grads = mx::array::make_arrays(
      shapes,
      std::vector<mx::Dtype>(shapes.size(), mx::float32),
      std::make_shared<LayerNormVJP>(stream(), eps_, primals.size() > 2),
      {primals[0],
       weight,
       float32_cotangent(cotangents[0], stream())});
  return gradients_for(argnums, [&](int arg) { return grads[arg]; });
}

}  // namespace mlx_aim
