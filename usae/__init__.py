"""usae: Universal Sparse Autoencoders (Thasarathan et al., ICML 2025) as a small, fast library.

images -> ``zoo``/``toyworld`` backbones -> ``extract`` tokens -> ``store`` -> ``model`` (``UniversalSAE``,
``SparseCode``) trained by ``train.Trainer`` -> statistics (``reconstruction``, ``firing``, ``universality``,
``concepts``, ``consistency``, ``groundtruth``) -> ``viz`` figures; ``experiment.Experiment`` caches
every artifact for the book.
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
from usae.experiment import Experiment
from usae.stats.reconstruction import r2_matrix, self_reconstruction
from usae.train.trainer import Trainer

__all__ = ["BackboneSpec", "Experiment", "ExperimentConfig", "ExtractConfig", "SparseCode", "ToyWorldConfig",
           "TrainConfig", "Trainer", "USAEConfig", "UniversalSAE", "ZooTrainConfig", "load_official", "preset",
           "r2_matrix", "self_reconstruction", "sparse_decode", "topk_encode"]
