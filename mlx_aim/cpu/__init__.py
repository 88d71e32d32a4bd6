"""Speed machinery for MLX's CPU backend, one module per mechanism.

- ``blas``: load an optimized BLAS before ``mlx.core`` (the wheel bundles netlib's reference BLAS);
- ``streams``: split inference batches over CPU streams;
- ``kernels``: float32-accurate GELU and softmax attention that ``mx.compile`` vectorizes;
- ``native``: the same two ops as C++ MLX primitives (``csrc/``), built once per machine.

The model reaches the kernels only through ``mlx_aim.models.ops``. This ``__init__`` imports
nothing: ``blas`` must run before anything loads ``mlx.core``.
"""
