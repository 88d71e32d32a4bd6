// The CPU kernels and the graph-side rules (gradients, vmap) of the primitives in kernels.h.

#include "kernels.h"

#include <cmath>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <string>

#include "support.h"
#include "vector_math.h"

namespace mlx_aim {

namespace {

constexpr float kInvSqrt2Pi = 0.3989422804014327f;
constexpr float kLowest = std::numeric_limits<float>::lowest();

// Rows a thread gets at least, for rows of n elements.
int64_t row_grain(int64_t n) {
  return std::max<int64_t>(1, kGrain / std::max<int64_t>(1, n));
}

// Offset of row `row` (an index over all but the last axis) in an array of `shape`, `strides`.
int64_t row_offset(int64_t row, const mx::Shape& shape, const mx::Strides& strides) {
  int64_t offset = 0;
  for (int axis = static_cast<int>(shape.size()) - 2; axis >= 0; --axis) {
    offset += (row % shape[axis]) * strides[axis];
    row /= shape[axis];
  }
  return offset;
}

// The mask of a softmax (or its backward pass) as raw pointers: one row of it starts at
// data + row_offset(row, shape, strides) and steps by `step` along the keys.
struct MaskView {
  MaskKind kind = MaskKind::None;
  const void* data = nullptr;
  mx::Shape shape;
  mx::Strides strides;
  int64_t step = 0;

  MaskView(MaskKind kind_, const mx::array* mask) : kind(kind_) {
    if (mask != nullptr) {
      data = mask->data<void>();
      shape = mask->shape();
      strides = mask->strides();
      step = mask->strides().back();
    }
  }
  template <typename T>
  const T* row(int64_t r) const {
    return static_cast<const T*>(data) + row_offset(r, shape, strides);
  }
};

void softmax_row(const float* scores, const MaskView& mask, int64_t r, int64_t n, float* out) {
  const int64_t step = mask.step;
  if (mask.kind == MaskKind::Boolean) {
    const bool* keep = mask.row<bool>(r);
    for (int64_t j = 0; j < n; ++j) {
      out[j] = keep[j * step] ? scores[j] : kLowest;
    }
  } else if (mask.kind == MaskKind::Additive) {
    const float* add = mask.row<float>(r);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      out[j] = scores[j] + add[j * step];
    }
  } else {
    std::copy(scores, scores + n, out);
  }
  softmax_in_place(out, n);
}

void softmax_vjp_row(
    const float* probs,
    const float* cotangent,
    const MaskView& mask,
    int64_t r,
    int64_t n,
    float* out) {
  float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
  for (int64_t j = 0; j < n; ++j) {
    dot += cotangent[j] * probs[j];
  }
  if (mask.kind == MaskKind::Boolean) {
    const bool* keep = mask.row<bool>(r);
    const int64_t step = mask.step;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      out[j] = keep[j * step] ? probs[j] * (cotangent[j] - dot) : 0.0f;
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      out[j] = probs[j] * (cotangent[j] - dot);
    }
  }
}

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

mx::array gelu(const mx::array& x, mx::StreamOrDevice s) {
  check_float32(x, "gelu");
  return mx::array(
      x.shape(),
      mx::float32,
      std::make_shared<Gelu>(mx::to_stream(s)),
      {mx::contiguous(x, false, s)});
}

mx::array gelu_vjp(const mx::array& x, const mx::array& cotangent, mx::Stream s) {
  return mx::array(
      x.shape(),
      mx::float32,
      std::make_shared<GeluVJP>(s),
      {x, mx::contiguous(mx::astype(cotangent, mx::float32, s), false, s)});
}

mx::array softmax(
    const mx::array& scores,
    const std::optional<mx::array>& mask,
    mx::StreamOrDevice s) {
  check_float32(scores, "softmax");
  if (scores.ndim() == 0) {
    throw std::invalid_argument("[mlx_aim.softmax] expects at least one axis");
  }
  std::vector<mx::array> inputs = {mx::contiguous(scores, false, s)};
  MaskKind kind = MaskKind::None;
  if (mask) {
    kind = mask->dtype() == mx::bool_ ? MaskKind::Boolean : MaskKind::Additive;
    const auto values = kind == MaskKind::Boolean ? *mask : mx::astype(*mask, mx::float32, s);
    inputs.push_back(mx::broadcast_to(values, scores.shape(), s));
  }
  return mx::array(
      scores.shape(),
      mx::float32,
      std::make_shared<Softmax>(mx::to_stream(s), kind),
      std::move(inputs));
}

mx::array layer_norm(
    const mx::array& x,
    const mx::array& weight,
    const mx::array& bias,
    float eps,
    mx::StreamOrDevice s) {
  for (const auto* a : {&x, &weight, &bias}) {
    check_float32(*a, "layer_norm");
  }
  if (x.ndim() == 0) {
    throw std::invalid_argument("[mlx_aim.layer_norm] expects at least one axis");
  }
  const int dim = x.shape().back();
  if (weight.shape() != mx::Shape{dim} || bias.shape() != mx::Shape{dim}) {
    throw std::invalid_argument(
        "[mlx_aim.layer_norm] expects weight and bias of shape (" + std::to_string(dim) + ",)");
  }
  return mx::array(
      x.shape(),
      mx::float32,
      std::make_shared<LayerNorm>(mx::to_stream(s), eps),
      {mx::contiguous(x, false, s),
       mx::contiguous(weight, false, s),
       mx::contiguous(bias, false, s)});
}

mx::array rms_norm(const mx::array& x, const mx::array& weight, float eps, mx::StreamOrDevice s) {
  check_float32(x, "rms_norm");
  check_float32(weight, "rms_norm");
  if (x.ndim() == 0) {
    throw std::invalid_argument("[mlx_aim.rms_norm] expects at least one axis");
  }
  const int dim = x.shape().back();
  if (weight.shape() != mx::Shape{dim}) {
    throw std::invalid_argument(
        "[mlx_aim.rms_norm] expects a weight of shape (" + std::to_string(dim) + ",)");
  }
  return mx::array(
      x.shape(),
      mx::float32,
      std::make_shared<LayerNorm>(mx::to_stream(s), eps),
      {mx::contiguous(x, false, s), mx::contiguous(weight, false, s)});
}

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

void Softmax::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  const auto& scores = inputs[0];
  allocate(out, scores);
  auto& encoder = encoder_for(stream(), inputs, out);
  const int64_t n = scores.shape().back();
  const int64_t rows = n == 0 ? 0 : int64_t(scores.size()) / n;
  encoder.dispatch([scores = scores.data<float>(),
                    mask = MaskView(mask_, inputs.size() > 1 ? &inputs[1] : nullptr),
                    out = out.data<float>(),
                    rows,
                    n] {
    parallel_for(rows, row_grain(n), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        softmax_row(scores + r * n, mask, r, n, out + r * n);
      }
    });
  });
}

void SoftmaxVJP::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  const auto& probs = inputs[0];
  const auto& cotangent = inputs[1];
  allocate(out, cotangent);
  auto& encoder = encoder_for(stream(), inputs, out);
  const int64_t n = probs.shape().back();
  const int64_t rows = n == 0 ? 0 : int64_t(probs.size()) / n;
  const auto kind = inputs.size() > 2 ? MaskKind::Boolean : MaskKind::None;
  encoder.dispatch([probs = probs.data<float>(),
                    g = cotangent.data<float>(),
                    mask = MaskView(kind, inputs.size() > 2 ? &inputs[2] : nullptr),
                    out = out.data<float>(),
                    rows,
                    n] {
    parallel_for(rows, row_grain(n), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        softmax_vjp_row(probs + r * n, g + r * n, mask, r, n, out + r * n);
      }
    });
  });
}

void LayerNorm::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  const auto& x = inputs[0];
  allocate(out, x);
  auto& encoder = encoder_for(stream(), inputs, out);
  const int64_t n = x.shape().back();
  const int64_t rows = n == 0 ? 0 : int64_t(x.size()) / n;
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
  const int64_t rows = n == 0 ? 0 : int64_t(x.size()) / n;
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

std::vector<mx::array> Softmax::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>& outputs) {
  std::vector<mx::array> inputs = {
      outputs[0],
      mx::contiguous(mx::astype(cotangents[0], mx::float32, stream()), false, stream())};
  if (mask_ == MaskKind::Boolean) {
    inputs.push_back(primals[1]);
  }
  const auto scores_grad = mx::array(
      outputs[0].shape(), mx::float32, std::make_shared<SoftmaxVJP>(stream()), inputs);
  std::vector<mx::array> vjps;
  for (int arg : argnums) {  // an additive mask gets the scores' gradient, a boolean one none
    vjps.push_back(
        arg == 0 || mask_ == MaskKind::Additive ? scores_grad
                                                : mx::zeros_like(primals[arg], stream()));
  }
  return vjps;
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
       mx::contiguous(mx::astype(cotangents[0], mx::float32, stream()), false, stream())});
  std::vector<mx::array> vjps;
  for (int arg : argnums) {
    vjps.push_back(grads[arg]);
  }
  return vjps;
}

}  // namespace mlx_aim
