// The optimizer's kernels: the AdamW update and the sum of squares of a gradient norm.
//
// Built with -ffp-contract=off (CMakeLists.txt): no multiply-add is fused, so every operation
// rounds as MLX's own ops do and the update equals mlx.optimizers.AdamW's bit for bit.

#include <cmath>
#include <vector>

#include "kernels.h"
#include "support.h"
#include "threads.h"

namespace mlx_aim {

namespace {

constexpr int64_t kTile = 64;  // a column-major gradient is read in kTile x kTile tiles
constexpr int64_t kSquaresBlock = 8192;  // sum_of_squares adds blocks of this many, in order

struct AdamWCoefficients {
  float scale, decay, b1, one_minus_b1, b2, one_minus_b2, c1, c2, eps;
};

struct AdamWBuffers {
  const float* param;
  const float* grad;  // row-major, or column-major (rows x cols) when transposed
  const float* m;
  const float* v;
  float* param_out;  // each output may be its input's buffer
  float* m_out;
  float* v_out;
};

// The update of the n elements from `offset` on, with their gradient at `grad`.
void adamw_span(
    const AdamWCoefficients& c,
    const AdamWBuffers& b,
    const float* grad,
    int64_t offset,
    int64_t n) {
  const float* param = b.param + offset;
  const float* m = b.m + offset;
  const float* v = b.v + offset;
  float* param_out = b.param_out + offset;
  float* m_out = b.m_out + offset;
  float* v_out = b.v_out + offset;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float g = grad[i] * c.scale;
    const float m_new = c.b1 * m[i] + c.one_minus_b1 * g;
    const float v_new = c.b2 * v[i] + c.one_minus_b2 * (g * g);
    const float decayed = param[i] * c.decay;
    m_out[i] = m_new;
    v_out[i] = v_new;
    param_out[i] = decayed - (c.c1 * m_new) / (std::sqrt(v_new) * c.c2 + c.eps);
  }
}

// Rows [row_begin, row_end) of a (rows x cols) update whose gradient is column-major: each tile
// of the gradient is transposed into a row-major buffer first.
void adamw_rows_transposed(
    const AdamWCoefficients& c,
    const AdamWBuffers& b,
    int64_t rows,
    int64_t cols,
    int64_t row_begin,
    int64_t row_end) {
  float tile[kTile * kTile];
  for (int64_t r0 = row_begin; r0 < row_end; r0 += kTile) {
    const int64_t height = std::min(kTile, row_end - r0);
    for (int64_t c0 = 0; c0 < cols; c0 += kTile) {
      const int64_t width = std::min(kTile, cols - c0);
      for (int64_t j = 0; j < width; ++j) {
        const float* column = b.grad + (c0 + j) * rows + r0;
        for (int64_t i = 0; i < height; ++i) {
          tile[i * kTile + j] = column[i];
        }
      }
      for (int64_t i = 0; i < height; ++i) {
        adamw_span(c, b, tile + i * kTile, (r0 + i) * cols + c0, width);
      }
    }
  }
}

float squares_of_block(const float* x, int64_t n) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    sum += x[i] * x[i];
  }
  return sum;
}

}  // namespace

std::vector<mx::array> adamw_update(
    const mx::array& parameter,
    const mx::array& gradient,
    const mx::array& m,
    const mx::array& v,
    const mx::array& coefficients,
    mx::StreamOrDevice s) {
  for (const auto* a : {&parameter, &gradient, &m, &v, &coefficients}) {
    check_float32(*a, "adamw_update");
  }
  for (const auto* a : {&gradient, &m, &v}) {
    if (a->shape() != parameter.shape()) {
      throw std::invalid_argument(
          "[mlx_aim.adamw_update] expects the gradient, m and v in the parameter's shape");
    }
  }
  if (coefficients.shape() != mx::Shape{9}) {
    throw std::invalid_argument("[mlx_aim.adamw_update] expects 9 coefficients");
  }
  const bool transposable = parameter.ndim() == 2;  // a weight's gradient comes transposed
  return mx::array::make_arrays(
      {parameter.shape(), parameter.shape(), parameter.shape()},
      {mx::float32, mx::float32, mx::float32},
      std::make_shared<AdamW>(mx::to_stream(s)),
      {mx::contiguous(parameter, false, s),
       mx::contiguous(gradient, transposable, s),
       mx::contiguous(m, false, s),
       mx::contiguous(v, false, s),
       mx::contiguous(coefficients, false, s)});
}

mx::array sum_of_squares(const mx::array& x, mx::StreamOrDevice s) {
  check_float32(x, "sum_of_squares");
  return mx::array(
      mx::Shape{},
      mx::float32,
      std::make_shared<SumOfSquares>(mx::to_stream(s)),
      {mx::contiguous(x, true, s)});  // any dense layout: the order of the terms is fixed
}

void AdamW::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  const auto& gradient = inputs[1];
  allocate(outputs[0], inputs[0]);
  allocate(outputs[1], inputs[2]);
  allocate(outputs[2], inputs[3]);
  auto& encoder = encoder_for(stream(), inputs, outputs);
  const bool transposed = !gradient.flags().row_contiguous;  // then column-major, 2-D
  const int64_t rows = transposed ? gradient.shape(0) : 1;
  const int64_t size = gradient.size();
  const int64_t cols = rows > 0 ? size / rows : 0;
  encoder.dispatch([coefficients = inputs[4].data<float>(),
                    b = AdamWBuffers{
                        inputs[0].data<float>(),
                        gradient.data<float>(),
                        inputs[2].data<float>(),
                        inputs[3].data<float>(),
                        outputs[0].data<float>(),
                        outputs[1].data<float>(),
                        outputs[2].data<float>()},
                    transposed,
                    rows,
                    cols,
                    size] {
    const float* k = coefficients;
    const AdamWCoefficients c{k[0], k[1], k[2], k[3], k[4], k[5], k[6], k[7], k[8]};
    if (!transposed) {
      parallel_for(size, kGrain, [&](int64_t begin, int64_t end) {
        adamw_span(c, b, b.grad + begin, begin, end - begin);
      });
      return;
    }
    parallel_for(rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(1, cols)),
                 [&](int64_t begin, int64_t end) {
                   adamw_rows_transposed(c, b, rows, cols, begin, end);
                 });
  });
}

void SumOfSquares::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  const auto& x = inputs[0];
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = encoder_for(stream(), inputs, out);
  encoder.dispatch([x = x.data<float>(), out = out.data<float>(), n = int64_t(x.size())] {
    const int64_t blocks = (n + kSquaresBlock - 1) / kSquaresBlock;
    std::vector<float> sums(blocks);
    parallel_for(blocks, std::max<int64_t>(1, kGrain / kSquaresBlock), [&](int64_t begin,
                                                                           int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const int64_t first = k * kSquaresBlock;
        sums[k] = squares_of_block(x + first, std::min(kSquaresBlock, n - first));
      }
    });
    float total = 0.0f;
    for (float sum : sums) {
      total += sum;
    }
    *out = total;
  });
}

}  // namespace mlx_aim
