"""Coordinated Activation Maximization (paper Sec. 3.3) as four separable pieces.

- parameterisations (``usae.cam.params``): pixel, Fourier (Lucid), MACO (fixed magnitude, optimised phase),
  built on image statistics computed by our own code (``usae.cam.spectrum``);
- transforms (``usae.cam.transforms``): MACO's random crops with noise, jitter, scale, rotation, fused into
  one affine resampling per model at the model's own resolution;
- objectives (``usae.cam.objectives``): token-aware pre-TopK concept activations, regularisers, composable
  with ``+`` and scalar ``*``;
- the render loop (``usae.cam.render``): seeded, with a progress bar, returning the image and MACO's
  transparency map; the coordinated (one image per model) and consensus (one image for all) modes.

``usae.cam.study`` measures CAM images against dataset exemplars; ``usae.viz.cam`` draws them.
"""

from usae.cam.objectives import Objective, concept, concept_activation, concept_head, l2, reduce_tokens, total_variation
from usae.cam.params import FourierImage, ImageParam, MacoImage, PixelImage, make_param
from usae.cam.render import (
    CamContext,
    CamResult,
    CamSettings,
    cam_settings,
    consensus,
    coordinated,
    pixel_range,
    render,
)
from usae.cam.spectrum import Spectrum, compute_spectrum, folder_spectrum, load_spectrum, toy_spectrum
from usae.cam.transforms import Crops, Jitter, Noise, Rotate, Scale, Views, views_from

__all__ = ["CamContext", "CamResult", "CamSettings", "Crops", "FourierImage", "ImageParam", "Jitter",
           "MacoImage", "Noise", "Objective", "PixelImage", "Rotate", "Scale", "Spectrum", "Views", "cam_settings",
           "compute_spectrum", "concept", "concept_activation", "concept_head", "consensus", "coordinated",
           "folder_spectrum", "l2", "load_spectrum", "make_param", "pixel_range", "reduce_tokens", "render",
           "toy_spectrum", "total_variation", "views_from"]
