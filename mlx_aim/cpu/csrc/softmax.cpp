// The (masked) softmax over the last axis, forward and backward, rows split over the cores; the
// row itself is vector_math.h's softmax_row, which the fused attention runs too.

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "kernels.h"
#include "support.h"
#include "threads.h"
#include "vector_math.h"

namespace mlx_aim {

namespace {

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
  // Row r of a boolean mask as n contiguous flags (copied into `scratch` when strided), or null
  // without one.
  const bool* keep_row(int64_t r, int64_t n, std::vector<uint8_t>& scratch) const {
    if (kind != MaskKind::Boolean) {
      return nullptr;
    }
    const bool* first = row<bool>(r);
    if (step == 1) {
      return first;
    }
    scratch.resize(n);
    for (int64_t j = 0; j < n; ++j) {
      scratch[j] = first[j * step];
    }
    return reinterpret_cast<const bool*>(scratch.data());
  }
};

// One row of the softmax of scores, masked: the scores plus an additive mask, or with the keys a
// boolean one drops at the float32 minimum.
void masked_softmax_row(
    const float* scores,
    const MaskView& mask,
    int64_t r,
    int64_t n,
    float* out,
    std::vector<uint8_t>& scratch) {
  if (mask.kind == MaskKind::Additive) {
    const float* add = mask.row<float>(r);
    const int64_t step = mask.step;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      out[j] = scores[j] + add[j * step];
    }
  } else {
    std::copy(scores, scores + n, out);
  }
  softmax_row(out, mask.keep_row(r, n, scratch), n);
}

// probs * (cotangent - sum(cotangent * probs)) of one row, 0 where a boolean mask drops the key.
void softmax_vjp_row(
    const float* probs,
    const float* cotangent,
    const MaskView& mask,
    int64_t r,
    int64_t n,
    float* out,
    std::vector<uint8_t>& scratch) {
  float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
  for (int64_t j = 0; j < n; ++j) {
    dot += cotangent[j] * probs[j];
  }
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    out[j] = probs[j] * (cotangent[j] - dot);
  }
  if (const bool* keep = mask.keep_row(r, n, scratch)) {
    fill_masked(out, keep, n, 0.0f);
  }
}


// Calls row(r, scratch) for r in [0, rows), rows of n elements split over the cores; `scratch` is
// the calling thread's own buffer.
template <typename Row>
void for_each_row(int64_t rows, int64_t n, Row row) {
  parallel_for(rows, row_grain(n), [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> scratch;
    for (int64_t r = begin; r < end; ++r) {
      row(r, scratch);
    }
  });
}

}  // namespace

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

void Softmax::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  const auto& scores = inputs[0];
  allocate(out, scores);
  auto& encoder = encoder_for(stream(), inputs, out);
  const int64_t n = scores.shape().back();
  const int64_t rows = row_count(scores);
  encoder.dispatch([scores = scores.data<float>(),
                    mask = MaskView(mask_, inputs.size() > 1 ? &inputs[1] : nullptr),
                    out = out.data<float>(),
                    rows,
                    n] {
    for_each_row(rows, n, [&](int64_t r, std::vector<uint8_t>& scratch) {
      masked_softmax_row(scores + r * n, mask, r, n, out + r * n, scratch);
    });
  });
}

void SoftmaxVJP::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  const auto& probs = inputs[0];
  const auto& cotangent = inputs[1];
  allocate(out, cotangent);
  auto& encoder = encoder_for(stream(), inputs, out);
  const int64_t n = probs.shape().back();
  const int64_t rows = row_count(probs);
  const auto kind = inputs.size() > 2 ? MaskKind::Boolean : MaskKind::None;
  encoder.dispatch([probs = probs.data<float>(),
                    g = cotangent.data<float>(),
                    mask = MaskView(kind, inputs.size() > 2 ? &inputs[2] : nullptr),
                    out = out.data<float>(),
                    rows,
                    n] {
    for_each_row(rows, n, [&](int64_t r, std::vector<uint8_t>& scratch) {
      softmax_vjp_row(probs + r * n, g + r * n, mask, r, n, out + r * n, scratch);
    });
  });
}

std::vector<mx::array> Softmax::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>& outputs) {
  std::vector<mx::array> inputs = {outputs[0], float32_cotangent(cotangents[0], stream())};
  if (mask_ == MaskKind::Boolean) {
    inputs.push_back(primals[1]);
  }
  const auto scores_grad = mx::array(
      outputs[0].shape(), mx::float32, std::make_shared<SoftmaxVJP>(stream()), inputs);
  return gradients_for(argnums, [&](int arg) {  // an additive mask: the scores' gradient
    return arg == 0 || mask_ == MaskKind::Additive ? scores_grad
                                                   : mx::zeros_like(primals[arg], stream());
  });
}

}  // namespace mlx_aim
