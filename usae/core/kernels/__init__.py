"""Sparse kernels of a USAE training step: CPU/torch implementations, Triton kernels for CUDA, and the fused
encoder. ``usae.core.sparse`` dispatches decoding to them; ``usae.core.model.UniversalSAE.encode_train`` uses the rest.

- ``groups``: entries of a code grouped by latent once per step (shared by every backward);
- ``select``: exact TopK with a block-maximum prefilter (CPU);
- ``torch_ops``: gather-sum (decode), sampled dots (value gradient), segmented row sums (weight gradients);
- ``triton_backend``: the same three as Triton kernels (imported only on CUDA, or in tests under
  ``TRITON_INTERPRET=1``);
- ``dispatch``: the one place that imports Triton, and picks the Triton or the torch implementation of a
  primitive for a tensor's device;
- ``encoder``: Linear(+BatchNorm1d) forward with an exact backward that needs no dense weight-gradient GEMM;
- ``dense``: one-GEMM decoding of a masked dense code into all dictionaries (the two auxiliary losses);
- ``reference``: brute-force dense versions, for tests.
"""
