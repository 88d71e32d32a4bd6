"""Speed machinery for MLX's CPU backend, one module per mechanism.

- ``blas``: load an optimized BLAS before ``mlx.core`` (the wheel bundles netlib's reference BLAS);
- ``streams``: split inference batches over CPU streams;
- ``memory``: let MLX's CPU allocator reuse freed buffers, as Metal's does;
- ``kernels``: float32-accurate GELU and softmax attention that ``mx.compile`` vectorizes;
- ``native``: C++ MLX primitives (``csrc/``: attention, GELU, SwiGLU's gate, the norms, AdamW),
  built once per machine with the tools ``toolchain`` finds.

The model and the optimizer reach the kernels only through ``mlx_aim.models.ops``. This
``__init__`` imports nothing: ``blas`` must run before anything loads ``mlx.core``.
"""
