"""Sparse codes -> statistics, all streamed over batches with bounded memory.

- ``reconstruction``: the cross-model R² matrix and self-reconstruction (Table 1);
- ``firing``: per-concept firing counts, co-firing, energy and entropy;
- ``concepts``: selecting and ordering concepts (universal, pairwise, unique);
- ``universality``: the paper's universality measures per concept;
- ``galleries``: top images of a concept, in every model;
- ``consistency``: matching concepts across runs;
- ``groundtruth``: concepts against the toy world's planted factors;
- ``streaming``: every statistic above in one pass over images, without a store.
"""
