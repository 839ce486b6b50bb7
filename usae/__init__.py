"""usae: Universal Sparse Autoencoders (Thasarathan et al., ICML 2025) as a small, fast library.

images -> ``data`` (toy world or any timm backbone, tokens, the activation store) -> ``core`` (``UniversalSAE``,
``SparseCode``) trained by ``train`` (``Trainer``) -> ``stats`` (R² matrix, firing, universality, concepts,
consistency, ground truth) -> ``cam`` and ``viz`` figures; ``Experiment`` caches every artifact for the book and
``load_run`` opens a trained one.
"""

from usae.config import (
    BackboneSpec,
    ExperimentConfig,
    ExtractConfig,
    ToyWorldConfig,
    TrainConfig,
    USAEConfig,
    ZooTrainConfig,
    preset,
)
from usae.core.model import UniversalSAE
from usae.core.official import load_official
from usae.core.sparse import SparseCode, sparse_decode, topk_encode
from usae.experiment import Experiment, load_run
from usae.side_by_side import Training
from usae.stats.reconstruction import r2_matrix, self_reconstruction
from usae.train.trainer import Trainer

__all__ = ["BackboneSpec", "Experiment", "ExperimentConfig", "ExtractConfig", "SparseCode", "ToyWorldConfig",
           "TrainConfig", "Trainer", "Training", "USAEConfig", "UniversalSAE", "ZooTrainConfig", "load_official",
           "load_run", "preset", "r2_matrix", "self_reconstruction", "sparse_decode", "topk_encode"]
