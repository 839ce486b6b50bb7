"""Rows -> sparse codes and back.

- ``sparse``: ``SparseCode`` (TopK values and indices), ``topk_encode``, ``sparse_decode`` and its backends;
- ``model``: ``UniversalSAE`` (one encoder and one decoder per model around one shared code);
- ``losses``: the reconstruction and auxiliary losses of a training step;
- ``official``: a loader for the authors' checkpoints;
- ``kernels``: the sparse primitives (torch for CPU, Triton for CUDA) behind ``sparse`` and ``model``.
"""
