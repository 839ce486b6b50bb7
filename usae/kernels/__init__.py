"""Sparse kernels of a USAE training step: CPU/torch implementations, Triton kernels for CUDA, and the fused
encoder. ``usae.sparse`` dispatches decoding to them; ``usae.model.UniversalSAE.encode_train`` uses the rest.

- ``groups``: entries of a code grouped by latent once per step (shared by every backward);
- ``select``: exact TopK with a block-maximum prefilter (CPU);
- ``torch_ops``: gather-sum (decode), sampled dots (value gradient), segmented row sums (weight gradients);
- ``triton_backend``: the same three as Triton kernels (imported only on CUDA, or in tests under
  ``TRITON_INTERPRET=1``);
- ``dispatch``: picks the Triton or the torch implementation of a primitive for a tensor's device;
- ``encoder``: Linear(+BatchNorm1d) forward with an exact backward that needs no dense weight-gradient GEMM;
- ``dense``: one-GEMM decoding of a masked dense code into all dictionaries (the two auxiliary losses);
- ``reference``: brute-force dense versions, for tests.
"""

from usae.kernels.encoder import EncoderPass, dense_pre, encoder_forward, gather_pre
from usae.kernels.groups import LatentGroups, group_by_latent
from usae.kernels.select import topk_indices

__all__ = ["EncoderPass", "LatentGroups", "dense_pre", "encoder_forward", "gather_pre", "group_by_latent",
           "topk_indices"]
