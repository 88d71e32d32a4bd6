// Multithreaded, vectorized float32 CPU primitives for mlx-aim: fused attention, exact GELU,
// SwiGLU's gate, (masked) row softmax, LayerNorm and RMSNorm, each with a native backward pass, and
// the optimizer's AdamW update and sum of squares.

#pragma once

#include <optional>

#include "mlx/ops.h"
#include "mlx/primitives.h"
#include "support.h"

namespace mx = mlx::core;

namespace mlx_aim {

// How the optional mask combines with the scores.
enum class MaskKind { None, Boolean, Additive };

// x Phi(x), the exact (erf) GELU, of a float32 array.
mx::array gelu(const mx::array& x, mx::StreamOrDevice s = {});

// Softmax over the last axis of float32 scores. A boolean mask (True = keep) puts the float32
// minimum where it is False (a fully masked row comes out uniform); any other mask is added.
// The mask broadcasts to the scores' shape.
mx::array softmax(
    const mx::array& scores,
    const std::optional<mx::array>& mask,
    mx::StreamOrDevice s = {});

// LayerNorm over the last axis of float32 x: (x - mean) / sqrt(var + eps) * weight + bias, with
// float32 weight and bias of the last axis' size.
mx::array layer_norm(
    const mx::array& x,
    const mx::array& weight,
    const mx::array& bias,
    float eps,
    mx::StreamOrDevice s = {});

// RMSNorm over the last axis of float32 x: x / sqrt(mean(x^2) + eps) * weight.
mx::array rms_norm(
    const mx::array& x,
    const mx::array& weight,
    float eps,
    mx::StreamOrDevice s = {});

// One AdamW update of float32 (parameter, gradient, m, v), all of one shape: returns the new
// (parameter, m, v). `coefficients` holds float32 (gradient scale, decay, b1, 1 - b1, b2, 1 - b2,
// c1, c2, eps) and the update is, elementwise and in this order (mlx.optimizers.AdamW's ops):
//   g = gradient * scale; m' = b1 m + (1 - b1) g; v' = b2 v + (1 - b2) g^2;
//   parameter' = parameter * decay - (c1 m') / (sqrt(v') c2 + eps).
std::vector<mx::array> adamw_update(
    const mx::array& parameter,
    const mx::array& gradient,
    const mx::array& m,
    const mx::array& v,
    const mx::array& coefficients,
    mx::StreamOrDevice s = {});

// silu(gate) * value = gate sigmoid(gate) value of float32 arrays of one shape (SwiGLU's
// activation), with its gradient.
mx::array silu_gate(const mx::array& gate, const mx::array& value, mx::StreamOrDevice s = {});

// softmax(scale q k^T, masked) v for float32 (B, H, Nq, d) queries and (B, H, Nk, d) keys and
// values, with an optional boolean mask (True = attend) broadcastable to (B, H, Nq, Nk); masked
// scores are the float32 minimum (a fully masked row attends uniformly). With its gradient.
mx::array fused_attention(
    const mx::array& q,
    const mx::array& k,
    const mx::array& v,
    float scale,
    const std::optional<mx::array>& mask,
    mx::StreamOrDevice s = {});

// sum(x^2) of a float32 array as a float32 scalar, summed in fixed blocks (the same result on
// any number of threads).
mx::array sum_of_squares(const mx::array& x, mx::StreamOrDevice s = {});

// What the CPU-only primitives share: eval_gpu refuses (they never run on a GPU stream), and one
// without parameters is equivalent to any other of its class (those with parameters compare them).
// CpuUnaryPrimitive's output has its first input's shape unless a subclass says otherwise.
class CpuUnaryPrimitive : public mx::UnaryPrimitive {
 public:
  using mx::UnaryPrimitive::UnaryPrimitive;

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    no_gpu(name());
  }
  bool is_equivalent(const mx::Primitive&) const override {
    return true;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }
};

class CpuPrimitive : public mx::Primitive {
 public:
  using mx::Primitive::Primitive;

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    no_gpu(name());
  }
  bool is_equivalent(const mx::Primitive&) const override {
    return true;
  }
};

class Gelu : public CpuUnaryPrimitive {
 public:
  explicit Gelu(mx::Stream stream) : CpuUnaryPrimitive(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  std::vector<mx::array> jvp(
      const std::vector<mx::array>& primals,
      const std::vector<mx::array>& tangents,
      const std::vector<int>& argnums) override;
  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals,
      const std::vector<mx::array>& cotangents,
      const std::vector<int>& argnums,
      const std::vector<mx::array>& outputs) override;
  std::pair<std::vector<mx::array>, std::vector<int>> vmap(
      const std::vector<mx::array>& inputs,
      const std::vector<int>& axes) override;
  const char* name() const override {
    return "MlxAimGelu";
  }
};

// cotangent * GELU'(x): inputs (x, cotangent).
class GeluVJP : public CpuUnaryPrimitive {
 public:
  explicit GeluVJP(mx::Stream stream) : CpuUnaryPrimitive(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "MlxAimGeluVJP";
  }
};

// Inputs (scores) or (scores, mask broadcast to the scores' shape).
class Softmax : public CpuUnaryPrimitive {
 public:
  Softmax(mx::Stream stream, MaskKind mask) : CpuUnaryPrimitive(stream), mask_(mask) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals,
      const std::vector<mx::array>& cotangents,
      const std::vector<int>& argnums,
      const std::vector<mx::array>& outputs) override;
  const char* name() const override {
    return "MlxAimSoftmax";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    return mask_ == static_cast<const Softmax&>(other).mask_;
  }

 private:
  MaskKind mask_;
};

// probs * (cotangent - sum(cotangent * probs)) per row: inputs (probs, cotangent) or, for a
// boolean mask, (probs, cotangent, mask), which zeroes the masked entries (the gradient of
// where(mask, scores, min) with respect to the scores).
class SoftmaxVJP : public CpuUnaryPrimitive {
 public:
  explicit SoftmaxVJP(mx::Stream stream) : CpuUnaryPrimitive(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "MlxAimSoftmaxVJP";
  }
};

// Inputs (x, weight, bias): LayerNorm, the mean and variance of each row in float32, two-pass; or
// (x, weight): RMSNorm. All contiguous.
class LayerNorm : public CpuUnaryPrimitive {
 public:
  LayerNorm(mx::Stream stream, float eps) : CpuUnaryPrimitive(stream), eps_(eps) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals,
      const std::vector<mx::array>& cotangents,
      const std::vector<int>& argnums,
      const std::vector<mx::array>& outputs) override;
  const char* name() const override {
    return "MlxAimLayerNorm";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    return eps_ == static_cast<const LayerNorm&>(other).eps_;
  }

 private:
  float eps_;
};

// The gradients of LayerNorm: inputs (x, weight, cotangent), outputs (dx, dweight, dbias), or of
// RMSNorm: outputs (dx, dweight). Each row's moments are recomputed; dweight and dbias are summed
// per thread, then added.
class LayerNormVJP : public CpuPrimitive {
 public:
  LayerNormVJP(mx::Stream stream, float eps, bool centered)
      : CpuPrimitive(stream), eps_(eps), centered_(centered) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override {
    return "MlxAimLayerNormVJP";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& vjp = static_cast<const LayerNormVJP&>(other);
    return eps_ == vjp.eps_ && centered_ == vjp.centered_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    if (!centered_) {
      return {inputs[0].shape(), inputs[1].shape()};
    }
    return {inputs[0].shape(), inputs[1].shape(), inputs[1].shape()};
  }

 private:
  float eps_;
  bool centered_;  // LayerNorm (dbias too), else RMSNorm
};

// Inputs (parameter, gradient, m, v, coefficients), outputs (parameter, m, v): see adamw_update.
// The gradient may be row- or column-major (a transposed weight's); the rest are row-major.
class AdamW : public CpuPrimitive {
 public:
  explicit AdamW(mx::Stream stream) : CpuPrimitive(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override {
    return "MlxAimAdamW";
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape(), inputs[0].shape(), inputs[0].shape()};
  }
};

// sum(x^2) of a row-major float32 array, a scalar. Not differentiable (a gradient norm).
class SumOfSquares : public CpuUnaryPrimitive {
 public:
  explicit SumOfSquares(mx::Stream stream) : CpuUnaryPrimitive(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "MlxAimSumOfSquares";
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>&) override {
    return {mx::Shape{}};
  }
};

// Inputs (q, k, v[, mask broadcast to (B, H, Nq, Nk)]), outputs the attention in (B, Nq, H, d)
// order and each query row's softmax (max, 1 / sum), (B, H, Nq, 2): see attention.cpp.
class FusedAttention : public CpuPrimitive {
 public:
  FusedAttention(mx::Stream stream, float scale) : CpuPrimitive(stream), scale_(scale) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals,
      const std::vector<mx::array>& cotangents,
      const std::vector<int>& argnums,
      const std::vector<mx::array>& outputs) override;
  const char* name() const override {
    return "MlxAimFusedAttention";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    return scale_ == static_cast<const FusedAttention&>(other).scale_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    const auto& q = inputs[0].shape();
    return {{q[0], q[2], q[1], q[3]}, {q[0], q[1], q[2], 2}};
  }

 private:
  float scale_;
};

// Inputs (q, k, v, attention, softmax stats, cotangent of the attention[, mask]), outputs (dq, dk,
// dv) in (B, N, H, d) order.
class FusedAttentionVJP : public CpuPrimitive {
 public:
  FusedAttentionVJP(mx::Stream stream, float scale) : CpuPrimitive(stream), scale_(scale) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override {
    return "MlxAimFusedAttentionVJP";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    return scale_ == static_cast<const FusedAttentionVJP&>(other).scale_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    const auto& q = inputs[0].shape();
    const auto& k = inputs[1].shape();
    return {{q[0], q[2], q[1], q[3]}, {k[0], k[2], k[1], k[3]}, {k[0], k[2], k[1], k[3]}};
  }

 private:
  float scale_;
};

// Inputs (gate, value): silu(gate) * value.
class SiluGate : public CpuUnaryPrimitive {
 public:
  explicit SiluGate(mx::Stream stream) : CpuUnaryPrimitive(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals,
      const std::vector<mx::array>& cotangents,
      const std::vector<int>& argnums,
      const std::vector<mx::array>& outputs) override;
  const char* name() const override {
    return "MlxAimSiluGate";
  }
};

// Inputs (gate, value, cotangent), outputs the gradients (gate, value) of silu(gate) * value.
class SiluGateVJP : public CpuPrimitive {
 public:
  explicit SiluGateVJP(mx::Stream stream) : CpuPrimitive(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override {
    return "MlxAimSiluGateVJP";
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape(), inputs[0].shape()};
  }
};

}  // namespace mlx_aim
