"""The embedded toy world: procedural RGB images with ground-truth concept labels per patch.

Every image is a textured, coloured background with 1-3 flat-coloured objects on it. The factors and their
values are listed in :data:`FACTORS`. One object per image, the *primary* one, is clearly the largest and
is drawn on top; the others are smaller and placed away from each other where possible.

Image ``i`` of split ``s`` depends only on ``(cfg, s, i)``: all random draws come from a counter-based hash
of ``(seed, split, index, draw)``, so a batch renders the same pixels however it is sliced.

Splits (:data:`SPLITS`):

- ``"zoo"``, ``"train"``, ``"val"``: the training distribution. Textures come from :data:`TRAIN_TEXTURES`
  and no object has a colour x texture pair from :data:`HELDOUT_COMBOS`.
- ``"ood_combos"``: training textures, but *every* object's (colour, texture) pair is held out.
- ``"ood_textures"``: the background texture is :data:`OOD_TEXTURE` (``"waves"``), never seen in training;
  its label is the last value of ``FACTORS["texture"]``.

Per-patch labels use the majority of the patch's pixels: a patch is an *object* patch when more than half
of its pixels belong to objects, and then takes the shape and colour of the object covering most of it
(-1 otherwise). ``texture`` and ``bg_color`` always describe the image background.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from usae.config import ToyWorldConfig

FACTORS: dict[str, tuple[str, ...]] = {
    "shape": ("circle", "square", "triangle", "cross", "ring", "diamond"),
    "color": ("red", "green", "blue", "yellow", "magenta", "cyan"),
    "texture": ("plain", "stripes", "checker", "dots", "waves"),
    "bg_color": ("charcoal", "navy", "brown", "forest"),
}
SPLITS: tuple[str, ...] = ("zoo", "train", "val", "ood_combos", "ood_textures")
TRAIN_TEXTURES: tuple[str, ...] = ("plain", "stripes", "checker", "dots")
OOD_TEXTURE = "waves"
# colour i is never seen on texture i % 4 outside the "ood_combos" split
HELDOUT_COMBOS: frozenset[tuple[str, str]] = frozenset(
    (c, TRAIN_TEXTURES[i % len(TRAIN_TEXTURES)]) for i, c in enumerate(FACTORS["color"])
)

OBJECT_RGB = np.array([
    [0.92, 0.10, 0.10],  # red
    [0.10, 0.82, 0.15],  # green
    [0.15, 0.35, 1.00],  # blue
    [0.95, 0.90, 0.10],  # yellow
    [0.90, 0.12, 0.90],  # magenta
    [0.10, 0.90, 0.90],  # cyan
], dtype=np.float32)
BACKGROUND_RGB = np.array([
    [0.22, 0.22, 0.22],  # charcoal
    [0.10, 0.12, 0.33],  # navy
    [0.33, 0.20, 0.10],  # brown
    [0.10, 0.28, 0.14],  # forest
], dtype=np.float32)
TEXTURE_AMPLITUDE = 0.15        # texture pattern pixels are the background colour plus this
PRIMARY_SIZE = (22.0, 30.0)     # object extent in pixels at image_size 64 (scaled with the image)
SECONDARY_SIZE = (13.0, 19.0)
VISIBLE_FRACTION = 0.4          # an object counts as present when this much of it is visible
_N_CANDIDATES = 8               # candidate centres tried per secondary object
_IMAGE_DRAWS = 16               # random draws per image, then _SLOT_DRAWS per object slot
_SLOT_DRAWS = 8 + 2 * _N_CANDIDATES
_CHUNK = 256                    # images rendered at once (bounds memory; results do not depend on it)
_SPLIT_ID = {name: i + 1 for i, name in enumerate(SPLITS)}


@dataclass
class ToyBatch:
    """A batch of toy images with their ground truth.

    images: [N, 3, H, W] float32 in [0, 1].
    patch_labels: factor -> [N, G, G] int64 for "shape", "color" (-1 on background patches), "texture",
        "bg_color", and "object" (1 where the patch is mostly object pixels, else 0).
    image_labels: "shape_present" [N, n_shapes] and "color_present" [N, n_colors] float multi-hot (visible
        objects), "texture" [N], "bg_color" [N], "largest_shape" [N], "largest_color" [N], "n_objects" [N]
        (visible objects) int64.
    pixel_labels: only when asked for: "shape", "color" and "instance" (object slot; 0 is the primary, the
        largest object) [N, H, W] int64, -1 on background pixels.
    """

    images: Tensor
    patch_labels: dict[str, Tensor]
    image_labels: dict[str, Tensor]
    pixel_labels: dict[str, Tensor] | None = None

    def __len__(self) -> int:
        return self.images.shape[0]


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, elementwise on uint64 (wrapping arithmetic)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _index_of(names: tuple[str, ...], value: str) -> int:
    return names.index(value)


class ToyWorld:
    """Renders the toy world described in the module docstring (see ``batch``)."""

    def __init__(self, cfg: ToyWorldConfig) -> None:
        if not isinstance(cfg, ToyWorldConfig):
            raise ValueError(f"ToyWorld: cfg = {cfg!r} is not valid; expected a ToyWorldConfig")
        self.cfg = cfg
        self.n_draws = _IMAGE_DRAWS + _SLOT_DRAWS * cfg.max_objects
        n_col = len(FACTORS["color"])
        train_tex = [_index_of(FACTORS["texture"], t) for t in TRAIN_TEXTURES]
        held = np.zeros((len(FACTORS["texture"]), n_col), dtype=bool)
        for c, t in HELDOUT_COMBOS:
            held[_index_of(FACTORS["texture"], t), _index_of(FACTORS["color"], c)] = True
        # per split: allowed textures, and per texture the allowed colours (padded table + counts)
        self._textures: dict[str, np.ndarray] = {}
        self._colours: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for split in SPLITS:
            if split == "ood_textures":
                textures = [_index_of(FACTORS["texture"], OOD_TEXTURE)]
                allowed = np.ones_like(held)
            elif split == "ood_combos":
                textures, allowed = train_tex, held
            else:
                textures, allowed = train_tex, ~held
            table = np.zeros((len(FACTORS["texture"]), n_col), dtype=np.int64)
            counts = np.zeros(len(FACTORS["texture"]), dtype=np.int64)
            for t in textures:
                ok = np.flatnonzero(allowed[t])
                table[t, : len(ok)], counts[t] = ok, len(ok)
            self._textures[split] = np.array(textures, dtype=np.int64)
            self._colours[split] = (table, counts)
        side = cfg.image_size
        self._ys, self._xs = np.meshgrid(np.arange(side, dtype=np.float32) + 0.5,
                                         np.arange(side, dtype=np.float32) + 0.5, indexing="ij")

    # ------------------------------------------------------------------------------------------------------
    def uniforms(self, split: str, indices: np.ndarray) -> np.ndarray:
        """Uniform [0, 1) draws per image: [len(indices), n_draws], a pure function of (seed, split, index)."""
        base = _splitmix64(np.array([self.cfg.seed * 64 + _SPLIT_ID[split]], dtype=np.uint64))
        counter = (indices.astype(np.uint64)[:, None] * np.uint64(self.n_draws)
                   + np.arange(self.n_draws, dtype=np.uint64)[None, :])
        bits = _splitmix64(counter ^ base) >> np.uint64(11)
        return (bits.astype(np.float64) * (1.0 / 2**53)).astype(np.float32)

    def batch(self, split: str, start: int, count: int, pixels: bool = False) -> ToyBatch:
        """Images ``start .. start+count-1`` of ``split`` with their labels (see :class:`ToyBatch`).

        pixels: also return per-pixel labels (memory: 3 x N x H x W int64).
        """
        if split not in SPLITS:
            raise ValueError(f"ToyWorld.batch: split = {split!r} is not valid; expected one of {list(SPLITS)}")
        for name, value, low in (("start", start, 0), ("count", count, 1)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
                raise ValueError(f"ToyWorld.batch: {name} = {value!r} is not valid; expected an int >= {low}")
        side = self.cfg.image_size
        images = torch.empty((count, 3, side, side), dtype=torch.float32)
        parts = []
        for lo in range(start, start + count, _CHUNK):
            u = self.uniforms(split, np.arange(lo, min(lo + _CHUNK, start + count)))
            scene = self._scene(split, u)
            image, owner, full_area = self._render(scene, u)
            images[lo - start: lo - start + len(u)] = torch.from_numpy(image)
            parts.append(self._labels(scene, owner, full_area, pixels))
        if len(parts) == 1:
            return ToyBatch(images, parts[0].patch_labels, parts[0].image_labels, parts[0].pixel_labels)
        return ToyBatch(
            images=images,
            patch_labels={k: torch.cat([b.patch_labels[k] for b in parts]) for k in parts[0].patch_labels},
            image_labels={k: torch.cat([b.image_labels[k] for b in parts]) for k in parts[0].image_labels},
            pixel_labels={k: torch.cat([b.pixel_labels[k] for b in parts]) for k in parts[0].pixel_labels}
            if pixels else None,
        )

    # ------------------------------------------------------------------------------------------------------
    def _scene(self, split: str, u: np.ndarray) -> dict[str, np.ndarray]:
        """Per-image and per-slot scene parameters from the draws ``u`` [N, n_draws]."""
        cfg, n = self.cfg, u.shape[0]
        scale = cfg.image_size / 64.0
        textures = self._textures[split]
        tex = textures[np.minimum((u[:, 0] * len(textures)).astype(np.int64), len(textures) - 1)]
        span = cfg.max_objects - cfg.min_objects + 1
        n_obj = cfg.min_objects + np.minimum((u[:, 1] * span).astype(np.int64), span - 1)
        n_bg = len(FACTORS["bg_color"])
        bg = np.minimum((u[:, 2] * n_bg).astype(np.int64), n_bg - 1)
        slots = u[:, _IMAGE_DRAWS:].reshape(n, cfg.max_objects, _SLOT_DRAWS)
        n_shapes = len(FACTORS["shape"])
        shape = np.minimum((slots[:, :, 0] * n_shapes).astype(np.int64), n_shapes - 1)
        table, counts = self._colours[split]
        k = np.minimum((slots[:, :, 1] * counts[tex][:, None]).astype(np.int64), counts[tex][:, None] - 1)
        colour = table[tex[:, None], k]
        lo, hi = np.where(np.arange(cfg.max_objects)[None, :] == 0, PRIMARY_SIZE[0], SECONDARY_SIZE[0]), \
            np.where(np.arange(cfg.max_objects)[None, :] == 0, PRIMARY_SIZE[1], SECONDARY_SIZE[1])
        size = (lo + (hi - lo) * slots[:, :, 2]) * scale
        rotation = (slots[:, :, 3] - 0.5) * np.deg2rad(24.0)
        # centres: the primary uniformly inside the image; each other object takes the candidate that is
        # furthest (relative to the two sizes) from the objects already placed
        side = cfg.image_size
        cand = slots[:, :, 8:].reshape(n, cfg.max_objects, _N_CANDIDATES, 2)
        half = size[:, :, None, None] / 2
        cand = half + cand * (side - 2 * half)
        centre = np.zeros((n, cfg.max_objects, 2), dtype=np.float32)
        centre[:, 0] = cand[:, 0, 0]
        for s in range(1, cfg.max_objects):
            d = np.linalg.norm(cand[:, s, :, None, :] - centre[:, None, :s, :], axis=-1)  # [N, C, s]
            d = d / (size[:, None, None, s] + size[:, None, :s]) * 2
            best = d.min(axis=2).argmax(axis=1)
            centre[:, s] = cand[np.arange(n), s, best]
        active = np.arange(cfg.max_objects)[None, :] < n_obj[:, None]
        return {"texture": tex, "bg_color": bg, "n_obj": n_obj, "shape": shape, "color": colour,
                "size": size.astype(np.float32), "rotation": rotation, "centre": centre, "active": active}

    def _texture_pattern(self, tex: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Background pattern in {0, 1}: [N, H, W] float32 from texture ids [N] and the image draws."""
        ys, xs = self._ys[None], self._xs[None]
        scale = self.cfg.image_size / 64.0

        def stripes(p: np.ndarray) -> np.ndarray:       # one of four orientations, period 6-10 px
            angle = np.floor(p[:, 0] * 4) * (np.pi / 4) + (p[:, 1] - 0.5) * 0.2
            period = (6 + 4 * p[:, 2]) * scale
            return np.mod((xs * np.cos(angle) + ys * np.sin(angle)) / period + p[:, 3], 1.0) < 0.5

        def checker(p: np.ndarray) -> np.ndarray:       # cells of 5-9 px, random offset
            cell = (5 + 4 * p[:, 2]) * scale
            return (np.floor(xs / cell + p[:, 3]) + np.floor(ys / cell + p[:, 4])) % 2 == 1

        def dots(p: np.ndarray) -> np.ndarray:          # square lattice, spacing 8-12 px, radius 1.6-2.6 px
            spacing = (8 + 4 * p[:, 2]) * scale
            dx = np.mod(xs / spacing + p[:, 3], 1.0) - 0.5
            dy = np.mod(ys / spacing + p[:, 4], 1.0) - 0.5
            return np.hypot(dx, dy) * spacing <= (1.6 + p[:, 5]) * scale

        def waves(p: np.ndarray) -> np.ndarray:         # stripes bent by a sine (the held-out texture)
            along, across = np.where(p[:, 0] < 0.5, xs, ys), np.where(p[:, 0] < 0.5, ys, xs)
            wavelength = (16 + 12 * p[:, 6]) * scale
            bent = across + (2 + 2 * p[:, 5]) * scale * np.sin(2 * np.pi * (along / wavelength + p[:, 7]))
            return np.mod(bent / ((6 + 4 * p[:, 2]) * scale) + p[:, 3], 1.0) < 0.5

        out = np.zeros((tex.shape[0],) + self._ys.shape, dtype=np.float32)
        for label, pattern in (("stripes", stripes), ("checker", checker), ("dots", dots), ("waves", waves)):
            sel = np.flatnonzero(tex == _index_of(FACTORS["texture"], label))
            if sel.size:
                out[sel] = pattern(u[sel, 4:12, None, None])
        return out

    def _object_masks(self, scene: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Unoccluded object masks [N, S, H, W] bool (False for inactive slots) and their areas [N, S].

        Each shape is evaluated only in a window around its centre that covers it at any size/rotation.
        """
        side = self.cfg.image_size
        win = int(np.ceil(1.3 * PRIMARY_SIZE[1] * side / 64.0)) + 2         # > 2 x 1.25 x max radius
        n_idx, s_idx = np.nonzero(scene["active"])
        cx, cy = scene["centre"][n_idx, s_idx, 0], scene["centre"][n_idx, s_idx, 1]
        r = scene["size"][n_idx, s_idx] / 2
        x0 = np.floor(cx).astype(np.int64) - win // 2
        y0 = np.floor(cy).astype(np.int64) - win // 2
        offs = np.arange(win)
        dx = ((x0[:, None] + offs + 0.5).astype(np.float32) - cx[:, None]) / r[:, None]   # [K, win]
        dy = ((y0[:, None] + offs + 0.5).astype(np.float32) - cy[:, None]) / r[:, None]
        rot = scene["rotation"][n_idx, s_idx].astype(np.float32)
        cos, sin = np.cos(rot)[:, None, None], np.sin(rot)[:, None, None]
        a = cos * dx[:, None, :] + sin * dy[:, :, None]                    # [K, win(y), win(x)]
        b = cos * dy[:, :, None] - sin * dx[:, None, :]
        shape = scene["shape"][n_idx, s_idx]
        local = np.zeros(a.shape, dtype=bool)
        for i, name in enumerate(FACTORS["shape"]):
            sel = np.flatnonzero(shape == i)
            if not sel.size:
                continue
            sa, sb = a[sel], b[sel]
            if name == "circle":
                m = sa * sa + sb * sb <= 1.0
            elif name == "square":
                m = np.maximum(np.abs(sa), np.abs(sb)) <= 0.82
            elif name == "triangle":
                m = (sb <= 0.75) & (np.abs(sa) <= (sb + 1.0) * 0.55)
            elif name == "cross":
                m = ((np.abs(sa) <= 0.3) | (np.abs(sb) <= 0.3)) & (np.maximum(np.abs(sa), np.abs(sb)) <= 1.0)
            elif name == "ring":
                rad2 = sa * sa + sb * sb
                m = (rad2 <= 1.0) & (rad2 >= 0.55 ** 2)
            else:  # diamond
                m = np.abs(sa) + np.abs(sb) <= 1.0
            local[sel] = m
        n, n_slots = scene["active"].shape
        canvas = np.zeros((n, n_slots, side + 2 * win, side + 2 * win), dtype=bool)
        canvas[n_idx[:, None, None], s_idx[:, None, None],
               (y0 + win)[:, None, None] + offs[None, :, None], (x0 + win)[:, None, None] + offs[None, None, :]] = local
        masks = canvas[:, :, win: win + side, win: win + side]
        area = np.zeros((n, n_slots), dtype=np.int64)
        area[n_idx, s_idx] = masks[n_idx, s_idx].sum(axis=(1, 2))
        return masks, area

    def _render(self, scene: dict[str, np.ndarray], u: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Images [N, 3, H, W] float32, the pixel owner map [N, H, W] int64 (-1 background, else slot) and
        each object's unoccluded area in pixels [N, S]."""
        n, n_slots = u.shape[0], self.cfg.max_objects
        pattern = self._texture_pattern(scene["texture"], u)
        image = BACKGROUND_RGB[scene["bg_color"]][:, :, None, None] + TEXTURE_AMPLITUDE * pattern[:, None]
        masks, area = self._object_masks(scene)
        owner = np.full(pattern.shape, -1, dtype=np.int64)
        for s in list(range(1, n_slots)) + [0]:                            # the primary object on top
            owner[masks[:, s]] = s
        slots = u[:, _IMAGE_DRAWS:].reshape(n, n_slots, _SLOT_DRAWS)
        rgb = OBJECT_RGB[scene["color"]] + (slots[:, :, 4:7] - 0.5) * 0.1   # [N, S, 3]
        ni, yi, xi = np.nonzero(owner >= 0)
        image[ni, :, yi, xi] = rgb[ni, owner[ni, yi, xi]]
        image *= (0.88 + 0.2 * u[:, 3])[:, None, None, None]              # brightness jitter
        return np.clip(image, 0.0, 1.0, out=image), owner, area

    def _labels(self, scene: dict[str, np.ndarray], owner: np.ndarray, full: np.ndarray,
                pixels: bool) -> ToyBatch:
        """Patch, image and (optionally) pixel labels from the owner map [N, H, W] and full areas [N, S]."""
        n, side, g = owner.shape[0], self.cfg.image_size, self.cfg.grid
        p, n_slots = side // g, self.cfg.max_objects
        blocks = owner.reshape(n, g, p, g, p)
        counts = np.stack([(blocks == s).sum(axis=(2, 4)) for s in range(n_slots)], axis=1)  # [N, S, G, G]
        is_object = counts.sum(axis=1) * 2 > p * p
        top = counts.argmax(axis=1)
        rows = np.arange(n)[:, None, None]
        patch = {
            "shape": np.where(is_object, scene["shape"][rows, top], -1),
            "color": np.where(is_object, scene["color"][rows, top], -1),
            "texture": np.broadcast_to(scene["texture"][:, None, None], (n, g, g)),
            "bg_color": np.broadcast_to(scene["bg_color"][:, None, None], (n, g, g)),
            "object": is_object.astype(np.int64),
        }
        visible_px = np.stack([(owner == s).sum(axis=(1, 2)) for s in range(n_slots)], axis=1)
        visible = scene["active"] & (visible_px >= VISIBLE_FRACTION * np.maximum(full, 1))
        present = {}
        for factor in ("shape", "color"):
            hot = np.zeros((n, len(FACTORS[factor])), dtype=np.float32)
            for s in range(n_slots):
                hot[np.flatnonzero(visible[:, s]), scene[factor][visible[:, s], s]] = 1.0
            present[f"{factor}_present"] = hot
        image_labels = {**present, "texture": scene["texture"], "bg_color": scene["bg_color"],
                        "largest_shape": scene["shape"][:, 0], "largest_color": scene["color"][:, 0],
                        "n_objects": visible.sum(axis=1)}
        pixel_labels = None
        if pixels:
            safe = np.maximum(owner, 0)
            pixel_labels = {f: torch.from_numpy(np.where(owner >= 0, np.take_along_axis(
                scene[f], safe.reshape(n, -1), axis=1).reshape(owner.shape), -1)) for f in ("shape", "color")}
            pixel_labels["instance"] = torch.from_numpy(owner)
        return ToyBatch(
            images=torch.empty(0),
            patch_labels={k: torch.from_numpy(np.ascontiguousarray(v).astype(np.int64)) for k, v in patch.items()},
            image_labels={k: torch.from_numpy(np.ascontiguousarray(v)) if v.dtype == np.float32
                          else torch.from_numpy(np.ascontiguousarray(v).astype(np.int64))
                          for k, v in image_labels.items()},
            pixel_labels=pixel_labels,
        )


def patch_frequencies(batch: ToyBatch) -> dict[str, dict[str, float]]:
    """Fraction of patches carrying each value of ``shape``, ``color``, ``texture`` and ``bg_color``
    (``factor -> {value name: fraction}``; patches where the factor is absent, -1, count in the total)."""
    out = {}
    for factor, names in FACTORS.items():
        labels = batch.patch_labels[factor].flatten()
        counts = torch.bincount(labels[labels >= 0], minlength=len(names)).double() / max(labels.numel(), 1)
        out[factor] = {name: float(c) for name, c in zip(names, counts)}
    return out
