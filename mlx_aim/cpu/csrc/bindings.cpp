// Python bindings of the mlx-aim CPU kernels (module mlx_aim_kernels).

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/variant.h>

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
}
