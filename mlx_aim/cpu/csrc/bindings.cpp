// Python bindings of the mlx-aim CPU kernels (module mlx_aim_kernels).

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "kernels.h"

namespace nb = nanobind;
using namespace nb::literals;

NB_MODULE(mlx_aim_kernels, m) {
  m.doc() = "Multithreaded float32 CPU kernels of mlx-aim for MLX";
  m.def(
      "gelu",
      &mlx_aim::gelu,
      "x"_a,
      nb::kw_only(),
      "stream"_a = nb::none(),
      "Exact (erf) GELU x Phi(x) of a float32 array, with its gradient.");
  m.def(
      "softmax",
      &mlx_aim::softmax,
      "scores"_a,
      "mask"_a = nb::none(),
      nb::kw_only(),
      "stream"_a = nb::none(),
      "Softmax over the last axis of float32 scores; a boolean mask (True = keep) or an\n"
      "additive one broadcasts to the scores. With its gradient.");
  m.def(
      "layer_norm",
      &mlx_aim::layer_norm,
      "x"_a,
      "weight"_a,
      "bias"_a,
      "eps"_a,
      nb::kw_only(),
      "stream"_a = nb::none(),
      "LayerNorm over the last axis of float32 x with float32 weight and bias, and its\n"
      "gradients (x, weight, bias).");
  m.def(
      "rms_norm",
      &mlx_aim::rms_norm,
      "x"_a,
      "weight"_a,
      "eps"_a,
      nb::kw_only(),
      "stream"_a = nb::none(),
      "RMSNorm over the last axis of float32 x with a float32 weight, and its gradients\n"
      "(x, weight).");
  m.def(
      "adamw_update",
      &mlx_aim::adamw_update,
      "parameter"_a,
      "gradient"_a,
      "m"_a,
      "v"_a,
      "coefficients"_a,
      nb::kw_only(),
      "stream"_a = nb::none(),
      "One AdamW update of float32 (parameter, gradient, m, v): the new (parameter, m, v).\n"
      "coefficients: float32 (gradient scale, decay, b1, 1 - b1, b2, 1 - b2, c1, c2, eps).");
  m.def(
      "sum_of_squares",
      &mlx_aim::sum_of_squares,
      "x"_a,
      nb::kw_only(),
      "stream"_a = nb::none(),
      "sum(x^2) of a float32 array, a float32 scalar summed in a fixed order.");
  m.def(
      "attention",
      &mlx_aim::fused_attention,
      "q"_a,
      "k"_a,
      "v"_a,
      "scale"_a,
      "mask"_a = nb::none(),
      nb::kw_only(),
      "stream"_a = nb::none(),
      "softmax(scale q k^T, masked) v for float32 (B, H, N, d) arrays, fused per head; an\n"
      "optional boolean mask (True = attend). With its gradient.");
  m.def(
      "silu_gate",
      &mlx_aim::silu_gate,
      "gate"_a,
      "value"_a,
      nb::kw_only(),
      "stream"_a = nb::none(),
      "silu(gate) * value of float32 arrays of one shape (SwiGLU's activation), with its\n"
      "gradient.");
}
