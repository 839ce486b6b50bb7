"""Where images come from: an image folder, the toy world, a tensor, as ``ImageSource`` chunks.

``as_source`` turns any of them into an :class:`ImageSource`; ``folder_sources`` splits a folder (or ImageNet's
``train/``/``val/`` layout) into the ``train``/``val`` sources an experiment extracts; ``toy_source`` yields the
toy world's images with their per-patch truth.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from usae.config import ExperimentConfig

__all__ = ["IMAGE_EXTENSIONS", "ImageFolder", "ImageSource", "SourceLike", "TRUTH_FACTORS", "as_source",
           "folder_sources", "toy_source", "with_images"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


# ------------------------------------------------------------------------------------------------ images
class ImageFolder:
    """All images under ``root`` (recursive, sorted paths; files with other extensions are ignored).

    ``image_size``: resize every image to ``image_size x image_size`` (bicubic with antialias, squash: no
    crop); ``None`` keeps the native size, which must then be the same for all images. ``shuffle``: a
    seeded permutation of the sorted paths (so that "the first n images" is a random sample, as the paper's
    standardisation statistics need for class-sorted folders such as ImageNet).
    """

    def __init__(self, root: str | Path, image_size: int | None = None, shuffle: bool = False,
                 seed: int = 0, workers: int = 4) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"image folder {str(self.root)!r} does not exist or is not a folder")
        if image_size is not None and (not isinstance(image_size, int) or image_size <= 0):
            raise ValueError(f"image_size = {image_size!r} is not valid; expected None or a positive integer")
        files = [p for p in self.root.rglob("*") if p.is_file() and not p.name.startswith(".")]
        paths = sorted(p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not paths:
            raise ValueError(f"image folder {str(self.root)!r} has no images (found {len(files)} other files); "
                             f"expected files ending in {list(IMAGE_EXTENSIONS)}")
        if shuffle:
            paths = [paths[i] for i in np.random.default_rng(seed).permutation(len(paths))]
        self.paths: list[Path] = paths
        self.image_size = image_size
        self.workers = max(1, int(workers))
        self._size: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def _read(self, path: Path) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                if self.image_size is not None and im.size != (self.image_size, self.image_size):
                    im = im.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
                return np.asarray(im, dtype=np.uint8)
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise ValueError(f"{str(path)!r} is not a readable image ({type(exc).__name__}: {exc})") from None

    def load(self, indices: Sequence[int] | range) -> Tensor:
        """Images ``indices`` as float ``[N, 3, S, S]`` in [0, 1] (decoded in a few threads)."""
        indices = list(indices)
        for i in indices:
            if not isinstance(i, (int, np.integer)) or not 0 <= i < len(self.paths):
                raise ValueError(f"image index {i!r} is out of range; the folder has {len(self.paths)} images")
        paths = [self.paths[i] for i in indices]
        if self.workers > 1 and len(paths) > 1:
            with ThreadPoolExecutor(min(self.workers, len(paths))) as pool:
                arrays = list(pool.map(self._read, paths))
        else:
            arrays = [self._read(p) for p in paths]
        for p, a in zip(paths, arrays):
            if self._size is None:
                self._size, self._first = a.shape[:2], p
            elif a.shape[:2] != self._size:
                raise ValueError(f"images have different sizes: {str(self._first)!r} is {self._size[1]}x"
                                 f"{self._size[0]} but {str(p)!r} is {a.shape[1]}x{a.shape[0]}; pass "
                                 "image_size= to resize them")
        if not arrays:
            return torch.empty(0, 3, *(self._size or (self.image_size or 0,) * 2))
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        return batch.float().div_(255.0)


@dataclass(frozen=True)
class ImageSource:
    """``n_images`` images read in contiguous chunks: ``load(start, count)`` returns images
    ``[count, 3, H, W]`` in [0, 1], or ``(images, labels)`` with per-patch integer labels
    ``{factor: [count, G, G] or [count, G*G]}`` on the store's grid (e.g. the toy world's truth)."""

    n_images: int
    load: Callable[[int, int], Union[Tensor, tuple[Tensor, Mapping[str, Any]]]]

    def __post_init__(self) -> None:
        if not isinstance(self.n_images, int) or self.n_images <= 0:
            raise ValueError(f"ImageSource.n_images = {self.n_images!r} is not valid; expected > 0")
        if not callable(self.load):
            raise ValueError("ImageSource.load must be callable as load(start, count)")


SourceLike = Union[ImageSource, ImageFolder, Tensor, str, Path]


def as_source(source: SourceLike, image_size: int | None = None) -> ImageSource:
    """An :class:`ImageSource` from an ImageSource, an ImageFolder, a folder path (resized to
    ``image_size``) or an image tensor ``[N, 3, H, W]``."""
    if isinstance(source, ImageSource):
        return source
    if isinstance(source, (str, Path)):
        source = ImageFolder(source, image_size=image_size)
    if isinstance(source, ImageFolder):
        folder = source
        return ImageSource(len(folder), lambda start, count: folder.load(range(start, start + count)))
    if isinstance(source, Tensor):
        if source.dim() != 4 or source.shape[1] != 3 or len(source) == 0:
            raise ValueError(f"an image tensor of shape {tuple(source.shape)} is not valid; expected "
                             "[N > 0, 3, H, W]")
        images = source
        return ImageSource(len(images), lambda start, count: images[start:start + count])
    raise ValueError(f"cannot read images from {type(source).__name__}; expected an ImageSource, an "
                     "ImageFolder, a folder path or a [N, 3, H, W] tensor")



TRUTH_FACTORS = ("shape", "color", "texture", "bg_color", "object", "part", "foreground")


def with_images(config: ExperimentConfig, images: str | Path) -> ExperimentConfig:
    """``config`` reading its images from the folder ``images`` (absolute path, so the artifact hash does not
    depend on the working directory); ValueError for toy-world configs or a missing folder."""
    if config.source == "toy":
        raise ValueError(f"images = {str(images)!r} is not valid for config {config.name!r}: it runs on the toy "
                         "world (source='toy', toy backbones); give images with the 'paper' preset or a config "
                         "whose backbones are real usae.data.zoo models")
    path = Path(images).expanduser()
    if not path.is_dir():
        raise ValueError(f"images = {str(images)!r} is not a folder; expected an image folder such as the "
                         "ImageNet root holding train/<class>/*.JPEG and val/<class>/*.JPEG")
    return config.replace(source=str(path.resolve()))


def toy_source(world, split: str, n_images: int):
    """An ``ImageSource`` over the first ``n_images`` of a toy-world split, yielding per-patch truth labels."""
    def load(start: int, count: int):
        batch = world.batch(split, start, count)
        return batch.images, {f: batch.patch_labels[f] for f in TRUTH_FACTORS}

    return ImageSource(n_images, load)


def folder_sources(root: Path, image_size: int, n_val: int) -> dict:
    """``train``/``val`` sources of an image folder. With ``train/`` and ``val/`` subfolders (ImageNet's
    layout) those are used, the training images in a seeded random order so that the first images (used
    for standardisation statistics) are a random sample; otherwise the folder's images are shuffled
    (seeded) and the first ``n_val`` become ``val``."""
    if not root.is_dir():
        raise ValueError(f"source = {str(root)!r} is not a folder of images; give 'toy' or an existing folder (for "
                         "the paper preset: Experiment('paper', images=FOLDER), papermill -p images FOLDER, or "
                         "$USAE_IMAGES in the chapters)")
    if (root / "train").is_dir() and (root / "val").is_dir():
        return {"train": as_source(ImageFolder(root / "train", image_size=image_size, shuffle=True, seed=0)),
                "val": as_source(ImageFolder(root / "val", image_size=image_size))}
    folder = ImageFolder(root, image_size=image_size, shuffle=True, seed=0)
    if len(folder) < 2:
        raise ValueError(f"{root} holds {len(folder)} image(s); need at least 2 to split into train and val")
    n_val = min(n_val, len(folder) // 2)
    return {"val": ImageSource(n_val, lambda s, c: folder.load(range(s, s + c))),
            "train": ImageSource(len(folder) - n_val, lambda s, c: folder.load(range(n_val + s, n_val + s + c)))}
