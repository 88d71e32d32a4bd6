// Fused softmax attention, forward and backward, one (batch, head) at a time per thread.
//
// Per head the forward pass computes S = (scale q) k^T, P = softmax(S) over the keys (masked keys
// at the float32 minimum, as mx.fast does) and O = P v in thread-local buffers, with the small
// products of small_gemm.h; it keeps each row's (max, 1 / sum) for the backward pass, which
// recomputes P from them instead of storing it: dV = P^T dO, dS = P (dO v^T - rowsum(dO O)),
// dq = scale dS k, dk = dS^T (scale q). Blocks of keys a (prefix-)causal mask hides from a whole
// tile of query rows are skipped (KeyLimits). The outputs are written in (B, N, H, d) order, the
// layout the model's output projection reads.

#include <cmath>
#include <cstring>
#include <memory>
#include <tuple>
#include <vector>

#include "kernels.h"
#include "small_gemm.h"
#include "support.h"
#include "threads.h"
#include "vector_math.h"

namespace mlx_aim {

namespace {

using bool_t = uint8_t;  // a bool's storage, for a contiguous copy of a mask row
static_assert(sizeof(bool) == sizeof(bool_t));

// Rows of a 4-D float32 array: row(b, h, n) with the batch, head and token axes at the given
// positions. An array whose last axis is not contiguous is packed first (a copy).
struct Rows {
  std::shared_ptr<std::vector<float>> packed;
  const float* data;
  int64_t batch_stride, head_stride, token_stride;

  Rows(const mx::array& a, int batch_axis, int head_axis, int token_axis) : data(a.data<float>()) {
    mx::Strides strides = a.strides();
    if (strides[3] != 1 && a.shape(3) > 1) {
      packed = std::make_shared<std::vector<float>>(a.size());
      const auto& shape = a.shape();
      int64_t index = 0;
      for (int64_t i0 = 0; i0 < shape[0]; ++i0) {
        for (int64_t i1 = 0; i1 < shape[1]; ++i1) {
          for (int64_t i2 = 0; i2 < shape[2]; ++i2) {
            for (int64_t i3 = 0; i3 < shape[3]; ++i3) {
              (*packed)[index++] =
                  data[i0 * strides[0] + i1 * strides[1] + i2 * strides[2] + i3 * strides[3]];
            }
          }
        }
      }
      data = packed->data();
      strides = {shape[1] * shape[2] * shape[3], shape[2] * shape[3], shape[3], 1};
    }
    batch_stride = strides[batch_axis];
    head_stride = strides[head_axis];
    token_stride = strides[token_axis];
  }
  const float* row(int64_t b, int64_t h, int64_t n) const {
    return data + b * batch_stride + h * head_stride + n * token_stride;
  }
};

// The boolean mask broadcast to (B, H, Nq, Nk), or none.
struct KeepMask {
  const bool* data = nullptr;
  mx::Strides strides;

  explicit KeepMask(const mx::array* mask) {
    if (mask != nullptr) {
      data = mask->data<bool>();
      strides = mask->strides();
    }
  }
  // Row (b, h, i) as nk contiguous flags (copied into `scratch` when strided), or null: keep all.
  const bool* row(int64_t b, int64_t h, int64_t i, int64_t nk, std::vector<bool_t>& scratch) const {
    if (data == nullptr) {
      return nullptr;
    }
    const bool* first = data + b * strides[0] + h * strides[1] + i * strides[2];
    if (strides[3] == 1) {
      return first;
    }
    scratch.resize(nk);
    for (int64_t j = 0; j < nk; ++j) {
      scratch[j] = first[j * strides[3]];
    }
    return reinterpret_cast<const bool*>(scratch.data());
  }
};

// The sizes of one head's problem and of its zero-padded buffers.
struct HeadShape {
  int64_t nq, nk, d;
  int64_t mq;  // nq rounded up to kTileRows
  int64_t nkr;  // nk rounded up to kTileRows
  int64_t nkc;  // nkr rounded up to kTileCols: a transposed product reads nkr columns of a row
  int64_t dc;  // d rounded up to kTileCols

  HeadShape(int64_t nq_, int64_t nk_, int64_t d_)
      : nq(nq_),
        nk(nk_),
        d(d_),
        mq(round_up(nq_, kTileRows)),
        nkr(round_up(nk_, kTileRows)),
        nkc(round_up(round_up(nk_, kTileRows), kTileCols)),
        dc(round_up(d_, kTileCols)) {}
};

// One thread's buffer for one head's matrix, zeroed when made: every head writes the same region of it,
// and what lies outside (the padding) only feeds rows and columns of products that are dropped.
using Buffer = std::vector<float>;

// The keys each query row needs: row i attends no key at or past limit[i], and the kTileRows rows
// of tile t compute their scores up to column cols[t] (their largest limit, rounded up to
// kTileCols): a causal or prefix-causal mask skips the blocks it masks fully (about a sixth of a
// prefix-causal head). Where the tiles' columns do not grow with the rows (another mask), or
// without a mask, every row takes every key. A fully masked row takes every key (it attends
// uniformly).
struct KeyLimits {
  std::vector<int64_t> limit, cols;

  void compute(const KeepMask& mask, int64_t b, int64_t h, const HeadShape& n,
               std::vector<bool_t>& scratch) {
    limit.assign(n.nq, n.nk);
    cols.assign(n.mq / kTileRows, n.nkc);
    if (mask.data == nullptr) {
      return;
    }
    for (int64_t i = 0; i < n.nq; ++i) {
      const bool* keep = mask.row(b, h, i, n.nk, scratch);
      int64_t end = n.nk;
      while (end > 0 && !keep[end - 1]) {
        --end;
      }
      limit[i] = end > 0 ? end : n.nk;
    }
    for (size_t t = 0; t < cols.size(); ++t) {
      const int64_t first = t * kTileRows;
      const int64_t last = std::min<int64_t>(n.nq, first + kTileRows);
      const int64_t widest = *std::max_element(limit.begin() + first, limit.begin() + last);
      cols[t] = round_up(widest, kTileCols);
      if (t > 0 && cols[t] < cols[t - 1]) {  // not growing: no skipping
        limit.assign(n.nq, n.nk);
        cols.assign(cols.size(), n.nkc);
        return;
      }
    }
  }
  // The first query row whose tile reaches key column j: no row before it needs that key, and
  // every row from there on has it computed (the columns grow with the rows).
  int64_t first_row(int64_t j, int64_t nq) const {
    size_t t = 0;
    while (t < cols.size() && cols[t] <= j) {
      ++t;
    }
    return std::min<int64_t>(nq, t * kTileRows);
  }
};

// The scores of each row tile, (scale q) k^T up to the tile's columns.
void tile_scores(const HeadShape& n, const KeyLimits& lim, const float* q, const float* kt,
                 float* s) {
  for (size_t t = 0; t < lim.cols.size(); ++t) {
    const int64_t i0 = t * kTileRows;
    gemm(kTileRows, lim.cols[t], n.d, q + i0 * n.dc, n.dc, kt, n.nkc, s + i0 * n.nkc, n.nkc);
  }
}

// C = A B per row tile of A (row stride lda), the sum over the tile's keys only: A's entries past
// a row's limit (up to the tile's columns) are 0.
void tile_times_keys(const HeadShape& n, const KeyLimits& lim, const float* a, int64_t lda,
                     const float* b, float* c) {
  for (size_t t = 0; t < lim.cols.size(); ++t) {
    const int64_t i0 = t * kTileRows;
    const int64_t depth = std::min(lim.cols[t], n.nk);
    gemm(kTileRows, n.dc, depth, a + i0 * lda, lda, b, n.dc, c + i0 * n.dc, n.dc);
  }
}

// C = A^T B per tile of keys (C's rows), summed over the queries that reach them: A (nq x nkc,
// row stride n.nkc) and B (nq x dc).
void keys_times_tiles(const HeadShape& n, const KeyLimits& lim, const float* a, const float* b,
                      float* c) {
  for (int64_t j0 = 0; j0 < n.nkr; j0 += kTileRows) {
    const int64_t p0 = lim.first_row(j0, n.nq);
    gemm<true>(kTileRows, n.dc, n.nq - p0, a + p0 * n.nkc + j0, n.nkc, b + p0 * n.dc, n.dc,
               c + j0 * n.dc, n.dc);
  }
}

// Zeroes row i's entries from its limit to its tile's columns, rounded up to whole key tiles of
// keys_times_tiles (what the products above read).
void clear_past_limit(float* row, const KeyLimits& lim, const HeadShape& n, int64_t i) {
  const int64_t end = std::min(round_up(lim.cols[i / kTileRows], kTileRows), n.nkc);
  std::fill(row + lim.limit[i], row + end, 0.0f);
}

// rows x cols of `src` (row(b, h, r)) into dst (row stride ld), times `scale`.
void gather(
    const Rows& src,
    int64_t b,
    int64_t h,
    int64_t rows,
    int64_t cols,
    float scale,
    float* dst,
    int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* from = src.row(b, h, r);
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) {
      dst[r * ld + c] = from[c] * scale;
    }
  }
}

// The transpose of rows x cols of `src` into dst (cols x ld), in blocks of 16 rows so that the
// writes are contiguous.
void gather_transposed(
    const Rows& src,
    int64_t b,
    int64_t h,
    int64_t rows,
    int64_t cols,
    float* dst,
    int64_t ld) {
  constexpr int64_t kBlock = 16;
  const float* from[kBlock];
  for (int64_t r0 = 0; r0 < rows; r0 += kBlock) {
    const int64_t height = std::min(kBlock, rows - r0);
    for (int64_t r = 0; r < height; ++r) {
      from[r] = src.row(b, h, r0 + r);
    }
    for (int64_t c = 0; c < cols; ++c) {
      float* to = dst + c * ld + r0;
      for (int64_t r = 0; r < height; ++r) {
        to[r] = from[r][c];
      }
    }
  }
}

// rows x cols of src (row stride ld) into out(b, n, h, :) of a (B, N, H, d) array, times scale.
void scatter(
    const float* src,
    int64_t ld,
    int64_t rows,
    int64_t cols,
    float scale,
    float* out,
    int64_t b,
    int64_t h,
    int64_t heads,
    int64_t tokens) {
  for (int64_t r = 0; r < rows; ++r) {
    float* to = out + ((b * tokens + r) * heads + h) * cols;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) {
      to[c] = src[r * ld + c] * scale;
    }
  }
}

struct ForwardArgs {
  Rows q, k, v;
  KeepMask mask;
  float scale;
  int64_t batch, heads;
  HeadShape shape;
  float* out;  // (B, Nq, H, d)
  float* stats;  // (B, H, Nq, 2): max, 1 / sum
};

struct ForwardBuffers {
  Buffer q, kt, s, v, o;
  std::vector<bool_t> keep;
  KeyLimits limits;
  explicit ForwardBuffers(const HeadShape& n)
      : q(n.mq * n.dc), kt(n.d * n.nkc), s(n.mq * n.nkc), v(n.nk * n.dc), o(n.mq * n.dc) {}
};

void forward_head(const ForwardArgs& a, int64_t b, int64_t h, ForwardBuffers& w) {
  const HeadShape& n = a.shape;
  gather(a.q, b, h, n.nq, n.d, a.scale, w.q.data(), n.dc);
  gather_transposed(a.k, b, h, n.nk, n.d, w.kt.data(), n.nkc);
  w.limits.compute(a.mask, b, h, n, w.keep);
  tile_scores(n, w.limits, w.q.data(), w.kt.data(), w.s.data());
  float* stats = a.stats + (b * a.heads + h) * n.nq * 2;
  for (int64_t i = 0; i < n.nq; ++i) {
    const bool* keep = a.mask.row(b, h, i, n.nk, w.keep);
    float* row = w.s.data() + i * n.nkc;
    std::tie(stats[2 * i], stats[2 * i + 1]) = softmax_row(row, keep, w.limits.limit[i]);
    clear_past_limit(row, w.limits, n, i);
  }
  gather(a.v, b, h, n.nk, n.d, 1.0f, w.v.data(), n.dc);
  tile_times_keys(n, w.limits, w.s.data(), n.nkc, w.v.data(), w.o.data());
  scatter(w.o.data(), n.dc, n.nq, n.d, 1.0f, a.out, b, h, a.heads, n.nq);
}

struct BackwardArgs {
  Rows q, k, v, out, dout;  // out and dout: (B, Nq, H, d) order
  KeepMask mask;
  const float* stats;
  float scale;
  int64_t batch, heads;
  HeadShape shape;
  float* dq;  // (B, Nq, H, d)
  float* dk;  // (B, Nk, H, d)
  float* dv;
};

struct BackwardBuffers {
  Buffer q, kt, s, dout, vt, dp, k, result;
  std::vector<bool_t> keep;
  KeyLimits limits;
  explicit BackwardBuffers(const HeadShape& n)
      : q(n.mq * n.dc),
        kt(n.d * n.nkc),
        s(n.mq * n.nkc),
        dout(n.mq * n.dc),
        vt(n.d * n.nkc),
        dp(n.mq * n.nkc),
        k(n.nk * n.dc),
        result(std::max(n.mq, n.nkr) * n.dc) {}
};

// rowsum(dO O) per query: the softmax backward's correction term.
std::vector<float> output_dots(const BackwardArgs& a, int64_t b, int64_t h) {
  std::vector<float> dots(a.shape.nq);
  for (int64_t i = 0; i < a.shape.nq; ++i) {
    const float* o = a.out.row(b, h, i);
    const float* g = a.dout.row(b, h, i);
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t c = 0; c < a.shape.d; ++c) {
      dot += o[c] * g[c];
    }
    dots[i] = dot;
  }
  return dots;
}

// P (in w.s) and dS = P (dP - rowsum(dO O)) (in w.dp), masked entries 0.
void probabilities_and_score_grads(
    const BackwardArgs& a,
    int64_t b,
    int64_t h,
    BackwardBuffers& w) {
  const HeadShape& n = a.shape;
  const float* stats = a.stats + (b * a.heads + h) * n.nq * 2;
  const std::vector<float> dots = output_dots(a, b, h);
  for (int64_t i = 0; i < n.nq; ++i) {
    float* p = w.s.data() + i * n.nkc;
    float* ds = w.dp.data() + i * n.nkc;
    const bool* keep = a.mask.row(b, h, i, n.nk, w.keep);
    const int64_t limit = w.limits.limit[i];
    probabilities_row(p, keep, limit, stats[2 * i], stats[2 * i + 1]);
    const float dot = dots[i];
#pragma omp simd
    for (int64_t j = 0; j < limit; ++j) {
      ds[j] = p[j] * (ds[j] - dot);
    }
    if (keep != nullptr) {  // p is 0 where masked, unless the whole row is (then uniform)
      fill_masked(ds, keep, limit, 0.0f);
    }
    clear_past_limit(p, w.limits, n, i);
    clear_past_limit(ds, w.limits, n, i);
  }
}

void backward_head(const BackwardArgs& a, int64_t b, int64_t h, BackwardBuffers& w) {
  const HeadShape& n = a.shape;
  gather(a.q, b, h, n.nq, n.d, a.scale, w.q.data(), n.dc);
  gather_transposed(a.k, b, h, n.nk, n.d, w.kt.data(), n.nkc);
  w.limits.compute(a.mask, b, h, n, w.keep);
  tile_scores(n, w.limits, w.q.data(), w.kt.data(), w.s.data());
  gather(a.dout, b, h, n.nq, n.d, 1.0f, w.dout.data(), n.dc);
  gather_transposed(a.v, b, h, n.nk, n.d, w.vt.data(), n.nkc);
  tile_scores(n, w.limits, w.dout.data(), w.vt.data(), w.dp.data());
  probabilities_and_score_grads(a, b, h, w);

  // dq = scale dS k
  gather(a.k, b, h, n.nk, n.d, 1.0f, w.k.data(), n.dc);
  tile_times_keys(n, w.limits, w.dp.data(), n.nkc, w.k.data(), w.result.data());
  scatter(w.result.data(), n.dc, n.nq, n.d, a.scale, a.dq, b, h, a.heads, n.nq);

  // dv = P^T dO, dk = dS^T (scale q): P and dS read transposed (rows up to nkr <= nkc)
  keys_times_tiles(n, w.limits, w.s.data(), w.dout.data(), w.result.data());
  scatter(w.result.data(), n.dc, n.nk, n.d, 1.0f, a.dv, b, h, a.heads, n.nk);
  keys_times_tiles(n, w.limits, w.dp.data(), w.q.data(), w.result.data());
  scatter(w.result.data(), n.dc, n.nk, n.d, 1.0f, a.dk, b, h, a.heads, n.nk);
}

// The (B, H, N, d) view of a (B, N, H, d) array.
mx::array heads_first(const mx::array& a, mx::StreamOrDevice s) {
  return mx::swapaxes(a, 1, 2, s);
}

// This thread's buffers for heads of `shape`, kept from call to call: buffers this size allocated
// anew are fresh pages the kernel zeroes, every call (8% of an aim-tiny training step). Made anew
// (zeroed) when the shape changes.
template <typename Buffers>
Buffers& thread_buffers(const HeadShape& shape) {
  thread_local std::unique_ptr<Buffers> buffers;
  thread_local HeadShape built(0, 0, 0);
  if (!buffers || built.nq != shape.nq || built.nk != shape.nk || built.d != shape.d) {
    buffers.reset();
    buffers = std::make_unique<Buffers>(shape);
    built = shape;
  }
  return *buffers;
}

// Calls body(b, h, buffers) for every (batch, head) pair, the pairs split over the cores.
template <typename Buffers, typename Body>
void for_each_head(int64_t batch, int64_t heads, const HeadShape& shape, Body body) {
  parallel_for(batch * heads, 1, [&](int64_t begin, int64_t end) {
    Buffers& buffers = thread_buffers<Buffers>(shape);
    for (int64_t bh = begin; bh < end; ++bh) {
      body(bh / heads, bh % heads, buffers);
    }
  });
}

}  // namespace

mx::array fused_attention(
    const mx::array& q,
    const mx::array& k,
    const mx::array& v,
    float scale,
    const std::optional<mx::array>& mask,
    mx::StreamOrDevice s) {
  for (const auto* a : {&q, &k, &v}) {
    check_float32(*a, "attention");
    if (a->ndim() != 4) {
      throw std::invalid_argument("[mlx_aim.attention] expects (B, H, N, d) queries, keys, values");
    }
  }
  const auto& qs = q.shape();
  if (k.shape() != v.shape() || k.shape(0) != qs[0] || k.shape(1) != qs[1] ||
      k.shape(3) != qs[3]) {
    throw std::invalid_argument(
        "[mlx_aim.attention] expects keys and values of shape (B, H, Nk, d) for queries "
        "(B, H, Nq, d)");
  }
  std::vector<mx::array> inputs = {q, k, v};  // any strides: see Rows
  if (mask) {
    if (mask->dtype() != mx::bool_) {
      throw std::invalid_argument("[mlx_aim.attention] expects a boolean mask");
    }
    inputs.push_back(mx::broadcast_to(*mask, {qs[0], qs[1], qs[2], k.shape(2)}, s));
  }
  auto outputs = mx::array::make_arrays(
      {{qs[0], qs[2], qs[1], qs[3]}, {qs[0], qs[1], qs[2], 2}},
      {mx::float32, mx::float32},
      std::make_shared<FusedAttention>(mx::to_stream(s), scale),
      std::move(inputs));
  return heads_first(outputs[0], s);
}

void FusedAttention::eval_cpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  for (auto& output : outputs) {
    output.set_data(mx::allocator::malloc(output.nbytes()));
  }
  auto& encoder = encoder_for(stream(), inputs, outputs);
  encoder.dispatch([inputs, out = outputs[0].data<float>(), stats = outputs[1].data<float>(),
                    scale = scale_] {
    const auto& q = inputs[0];
    const ForwardArgs args{
        Rows(q, 0, 1, 2),
        Rows(inputs[1], 0, 1, 2),
        Rows(inputs[2], 0, 1, 2),
        KeepMask(inputs.size() > 3 ? &inputs[3] : nullptr),
        scale,
        q.shape(0),
        q.shape(1),
        HeadShape(q.shape(2), inputs[1].shape(2), q.shape(3)),
        out,
        stats};
    for_each_head<ForwardBuffers>(
        args.batch, args.heads, args.shape, [&](int64_t b, int64_t h, auto& w) {
          forward_head(args, b, h, w);
        });
  });
}

std::vector<mx::array> FusedAttention::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>& outputs) {
  const auto s = stream();
  std::vector<mx::array> inputs = {
      primals[0],
      primals[1],
      primals[2],
      outputs[0],
      outputs[1],
      float32_cotangent(cotangents[0], s)};
  if (primals.size() > 3) {
    inputs.push_back(primals[3]);
  }
  const auto& k = primals[1];
  const auto grads = mx::array::make_arrays(
      {outputs[0].shape(),
       {k.shape(0), k.shape(2), k.shape(1), k.shape(3)},
       {k.shape(0), k.shape(2), k.shape(1), k.shape(3)}},
      {mx::float32, mx::float32, mx::float32},
      std::make_shared<FusedAttentionVJP>(s, scale_),
      std::move(inputs));
  return gradients_for(argnums, [&](int arg) {
    return arg < 3 ? heads_first(grads[arg], s) : mx::zeros_like(primals[arg], s);
  });
}

void FusedAttentionVJP::eval_cpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  for (auto& output : outputs) {
    output.set_data(mx::allocator::malloc(output.nbytes()));
  }
  auto& encoder = encoder_for(stream(), inputs, outputs);
  encoder.dispatch([inputs,
                    dq = outputs[0].data<float>(),
                    dk = outputs[1].data<float>(),
                    dv = outputs[2].data<float>(),
                    scale = scale_] {
    const auto& q = inputs[0];
    const BackwardArgs args{
        Rows(q, 0, 1, 2),
        Rows(inputs[1], 0, 1, 2),
        Rows(inputs[2], 0, 1, 2),
        Rows(inputs[3], 0, 2, 1),
        Rows(inputs[5], 0, 2, 1),
        KeepMask(inputs.size() > 6 ? &inputs[6] : nullptr),
        inputs[4].data<float>(),
        scale,
        q.shape(0),
        q.shape(1),
        HeadShape(q.shape(2), inputs[1].shape(2), q.shape(3)),
        dq,
        dk,
        dv};
    for_each_head<BackwardBuffers>(
        args.batch, args.heads, args.shape, [&](int64_t b, int64_t h, auto& w) {
          backward_head(args, b, h, w);
        });
  });
}

}  // namespace mlx_aim
