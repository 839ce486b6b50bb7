"""The embedded toy world: procedural RGB images with ground-truth concept labels per patch.

Every image is a textured, coloured background with 1-3 flat-coloured *things* on it. A thing is either a
simple **shape** (circle, square, ...) or a composed **object** made of two **parts** (a house is a roof on a
wall, a car a body on two wheels, a snowman a head on a belly, a tree a canopy on a trunk; the second part is
drawn in a darker shade of the thing's colour). The factors and their values are listed in :data:`FACTORS`,
grouped by level of abstraction in :data:`LEVELS`. One thing per image, the *primary* one, is clearly the
largest and is drawn on top; the others are smaller and placed away from each other where possible.

Image ``i`` of split ``s`` depends only on ``(cfg, s, i)``: all random draws come from a counter-based hash
of ``(seed, split, index, draw)``, so a batch renders the same pixels however it is sliced.

Splits (:data:`SPLITS`):

- ``"zoo"``, ``"train"``, ``"val"``: the training distribution. Textures come from :data:`TRAIN_TEXTURES`
  and no object has a colour x texture pair from :data:`HELDOUT_COMBOS`.
- ``"ood_combos"``: training textures, but *every* object's (colour, texture) pair is held out.
- ``"ood_textures"``: the background texture is :data:`OOD_TEXTURE` (``"waves"``), never seen in training;
  its label is the last value of ``FACTORS["texture"]``.

Per-patch labels use the majority of the patch's pixels: a patch is a *foreground* patch when more than half
of its pixels belong to things, and then takes the colour of the thing covering most of it, its shape (when
that thing is a simple shape) or its object and the part covering most of that thing's pixels in the patch
(when it is a composed object); -1 otherwise. ``texture`` and ``bg_color`` always describe the image
background.
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
    "object": ("house", "car", "snowman", "tree"),
    "part": ("wall", "roof", "body", "wheel", "belly", "head", "trunk", "canopy"),
}
# each object's two parts, in drawing order (the second is drawn over the first, in a darker shade)
OBJECT_PARTS: dict[str, tuple[str, str]] = {"house": ("wall", "roof"), "car": ("body", "wheel"),
                                            "snowman": ("belly", "head"), "tree": ("trunk", "canopy")}
# levels of abstraction of the per-patch factors (the paper: from colours and textures to parts and objects)
LEVELS: dict[str, tuple[str, ...]] = {"low": ("color", "texture", "bg_color"), "mid": ("shape",),
                                      "high": ("object", "part")}
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
PRIMARY_SIZE = (22.0, 30.0)     # a shape's extent in pixels at image_size 64 (scaled with the image)
SECONDARY_SIZE = (13.0, 19.0)
OBJECT_PRIMARY_SIZE = (32.0, 40.0)    # a composed object's extent (its parts need room on an 8 px patch grid)
OBJECT_SECONDARY_SIZE = (20.0, 26.0)
OBJECT_SHARE = 0.5              # share of things that are composed objects rather than simple shapes
PART_SHADE = 0.7                # the second part of an object is its colour times this
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
    patch_labels: factor -> [N, G, G] int64 for every factor of :data:`FACTORS` ("shape", "color", "object",
        "part": -1 where absent; "texture", "bg_color" everywhere) and "foreground" (1 where the patch is
        mostly pixels of things, else 0).
    image_labels: "shape_present" [N, n_shapes], "color_present" [N, n_colors] and "object_present"
        [N, n_objects] float multi-hot (visible things), "texture" [N], "bg_color" [N] and "n_objects" [N]
        (visible things) int64.
    pixel_labels: only when asked for: "shape", "color", "object", "part" and "instance" (thing slot; 0 is
        the primary, the largest thing) [N, H, W] int64, -1 where absent.
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


def _shape_mask(name: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pixels of a simple shape at local coordinates (a right, b down; the shape's half-size is 1)."""
    if name == "circle":
        return a * a + b * b <= 1.0
    if name == "square":
        return np.maximum(np.abs(a), np.abs(b)) <= 0.82
    if name == "triangle":
        return (b <= 0.75) & (np.abs(a) <= (b + 1.0) * 0.55)
    if name == "cross":
        return ((np.abs(a) <= 0.3) | (np.abs(b) <= 0.3)) & (np.maximum(np.abs(a), np.abs(b)) <= 1.0)
    if name == "ring":
        rad2 = a * a + b * b
        return (rad2 <= 1.0) & (rad2 >= 0.55 ** 2)
    return np.abs(a) + np.abs(b) <= 1.0                                      # diamond


def _part_mask(name: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pixels of one part of a composed object at local coordinates (as :func:`_shape_mask`)."""
    if name == "wall":                                                        # house: a wall under a roof
        return (np.abs(a) <= 0.72) & (b >= -0.15) & (b <= 0.95)
    if name == "roof":
        return (b <= -0.05) & (np.abs(a) <= (b + 1.0) * 1.0)
    if name == "body":                                                        # car: a body on two wheels
        return (np.abs(a) <= 1.0) & (b >= -0.55) & (b <= 0.3)
    if name == "wheel":
        return (np.abs(a) - 0.55) ** 2 + (b - 0.45) ** 2 <= 0.34 ** 2
    if name == "belly":                                                       # snowman: a head on a belly
        return a * a + (b - 0.38) ** 2 <= 0.6 ** 2
    if name == "head":
        return a * a + (b + 0.5) ** 2 <= 0.47 ** 2
    if name == "trunk":                                                       # tree: a canopy on a trunk
        return (np.abs(a) <= 0.32) & (b >= 0.1) & (b <= 1.0)
    return a * a + (b + 0.35) ** 2 <= 0.65 ** 2                              # canopy


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
            image, owner, part, full_area = self._render(scene, u)
            images[lo - start: lo - start + len(u)] = torch.from_numpy(image)
            parts.append(self._labels(scene, owner, part, full_area, pixels))
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
        composed = slots[:, :, 7] < OBJECT_SHARE
        n_shapes, n_objects = len(FACTORS["shape"]), len(FACTORS["object"])
        shape = np.where(composed, -1, np.minimum((slots[:, :, 0] * n_shapes).astype(np.int64), n_shapes - 1))
        obj = np.where(composed, np.minimum((slots[:, :, 0] * n_objects).astype(np.int64), n_objects - 1), -1)
        table, counts = self._colours[split]
        k = np.minimum((slots[:, :, 1] * counts[tex][:, None]).astype(np.int64), counts[tex][:, None] - 1)
        colour = table[tex[:, None], k]
        primary = np.arange(cfg.max_objects)[None, :] == 0
        sizes = {(p, c): (OBJECT_PRIMARY_SIZE if c else PRIMARY_SIZE) if p else
                 (OBJECT_SECONDARY_SIZE if c else SECONDARY_SIZE) for p in (True, False) for c in (True, False)}
        lo = np.select([primary & composed, primary & ~composed, ~primary & composed],
                       [sizes[True, True][0], sizes[True, False][0], sizes[False, True][0]], sizes[False, False][0])
        hi = np.select([primary & composed, primary & ~composed, ~primary & composed],
                       [sizes[True, True][1], sizes[True, False][1], sizes[False, True][1]], sizes[False, False][1])
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
        return {"texture": tex, "bg_color": bg, "n_obj": n_obj, "shape": shape, "object": obj, "color": colour,
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

    def _object_masks(self, scene: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Unoccluded thing masks [N, S, H, W] bool (False for inactive slots), their areas [N, S] and the part
        of each pixel of a composed object [N, S, H, W] int8 (index into ``FACTORS["part"]``, -1 elsewhere).

        Each thing is evaluated only in a window around its centre that covers it at any size/rotation.
        """
        side = self.cfg.image_size
        biggest = max(PRIMARY_SIZE[1], OBJECT_PRIMARY_SIZE[1])
        win = int(np.ceil(1.3 * biggest * side / 64.0)) + 2                 # > 2 x 1.25 x max radius
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
        a = cos * dx[:, None, :] + sin * dy[:, :, None]                    # [K, win(y), win(x)]; b points down
        b = cos * dy[:, :, None] - sin * dx[:, None, :]
        shape, obj = scene["shape"][n_idx, s_idx], scene["object"][n_idx, s_idx]
        local = np.zeros(a.shape, dtype=bool)
        part = np.full(a.shape, -1, dtype=np.int8)
        for i, name in enumerate(FACTORS["shape"]):
            sel = np.flatnonzero(shape == i)
            if sel.size:
                local[sel] = _shape_mask(name, a[sel], b[sel])
        for i, name in enumerate(FACTORS["object"]):
            sel = np.flatnonzero(obj == i)
            if not sel.size:
                continue
            for part_name in OBJECT_PARTS[name]:                          # later parts are drawn on top
                m = _part_mask(part_name, a[sel], b[sel])
                local[sel] |= m
                part[sel] = np.where(m, FACTORS["part"].index(part_name), part[sel])
        n, n_slots = scene["active"].shape
        big = (n, n_slots, side + 2 * win, side + 2 * win)
        rows = (n_idx[:, None, None], s_idx[:, None, None], (y0 + win)[:, None, None] + offs[None, :, None],
                (x0 + win)[:, None, None] + offs[None, None, :])
        canvas = np.zeros(big, dtype=bool)
        canvas[rows] = local
        part_canvas = np.full(big, -1, dtype=np.int8)
        part_canvas[rows] = part
        masks = canvas[:, :, win: win + side, win: win + side]
        parts = part_canvas[:, :, win: win + side, win: win + side]
        area = np.zeros((n, n_slots), dtype=np.int64)
        area[n_idx, s_idx] = masks[n_idx, s_idx].sum(axis=(1, 2))
        return masks, area, parts

    def _render(self, scene: dict[str, np.ndarray],
                u: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Images [N, 3, H, W] float32, the pixel owner map [N, H, W] int64 (-1 background, else slot), the
        pixel part map [N, H, W] int64 (-1 off composed objects) and each thing's unoccluded area [N, S]."""
        n, n_slots = u.shape[0], self.cfg.max_objects
        pattern = self._texture_pattern(scene["texture"], u)
        image = BACKGROUND_RGB[scene["bg_color"]][:, :, None, None] + TEXTURE_AMPLITUDE * pattern[:, None]
        masks, area, parts = self._object_masks(scene)
        owner = np.full(pattern.shape, -1, dtype=np.int64)
        part = np.full(pattern.shape, -1, dtype=np.int64)
        for s in list(range(1, n_slots)) + [0]:                            # the primary thing on top
            owner[masks[:, s]] = s
            part[masks[:, s]] = parts[:, s][masks[:, s]]
        slots = u[:, _IMAGE_DRAWS:].reshape(n, n_slots, _SLOT_DRAWS)
        rgb = OBJECT_RGB[scene["color"]] + (slots[:, :, 4:7] - 0.5) * 0.1   # [N, S, 3]
        ni, yi, xi = np.nonzero(owner >= 0)
        shade = np.where(part[ni, yi, xi] % 2 == 1, PART_SHADE, 1.0).astype(np.float32)   # an object's 2nd part
        image[ni, :, yi, xi] = rgb[ni, owner[ni, yi, xi]] * shade[:, None]
        image *= (0.88 + 0.2 * u[:, 3])[:, None, None, None]              # brightness jitter
        return np.clip(image, 0.0, 1.0, out=image), owner, part, area

    def _labels(self, scene: dict[str, np.ndarray], owner: np.ndarray, part: np.ndarray, full: np.ndarray,
                pixels: bool) -> ToyBatch:
        """Patch, image and (optionally) pixel labels from the owner and part maps [N, H, W] and the full
        areas [N, S]."""
        n, side, g = owner.shape[0], self.cfg.image_size, self.cfg.grid
        p, n_slots = side // g, self.cfg.max_objects
        blocks = owner.reshape(n, g, p, g, p)
        counts = np.stack([(blocks == s).sum(axis=(2, 4)) for s in range(n_slots)], axis=1)  # [N, S, G, G]
        is_fg = counts.sum(axis=1) * 2 > p * p
        top = counts.argmax(axis=1)                                          # [N, G, G]
        # the part covering most of the top thing's pixels in the patch
        top_px = np.repeat(np.repeat(top, p, axis=1), p, axis=2)
        part_blocks = np.where(owner == top_px, part, -1).reshape(n, g, p, g, p)
        part_counts = np.stack([(part_blocks == q).sum(axis=(2, 4)) for q in range(len(FACTORS["part"]))], axis=1)
        rows = np.arange(n)[:, None, None]
        top_object = scene["object"][rows, top]
        patch = {
            "shape": np.where(is_fg, scene["shape"][rows, top], -1),
            "color": np.where(is_fg, scene["color"][rows, top], -1),
            "texture": np.broadcast_to(scene["texture"][:, None, None], (n, g, g)),
            "bg_color": np.broadcast_to(scene["bg_color"][:, None, None], (n, g, g)),
            "object": np.where(is_fg, top_object, -1),
            "part": np.where(is_fg & (top_object >= 0) & (part_counts.max(axis=1) > 0), part_counts.argmax(axis=1), -1),
            "foreground": is_fg.astype(np.int64),
        }
        visible_px = np.stack([(owner == s).sum(axis=(1, 2)) for s in range(n_slots)], axis=1)
        visible = scene["active"] & (visible_px >= VISIBLE_FRACTION * np.maximum(full, 1))
        present = {}
        for factor in ("shape", "color", "object"):
            hot = np.zeros((n, len(FACTORS[factor])), dtype=np.float32)
            for s in range(n_slots):
                ok = visible[:, s] & (scene[factor][:, s] >= 0)
                hot[np.flatnonzero(ok), scene[factor][ok, s]] = 1.0
            present[f"{factor}_present"] = hot
        image_labels = {**present, "texture": scene["texture"], "bg_color": scene["bg_color"],
                        "n_objects": visible.sum(axis=1)}
        pixel_labels = None
        if pixels:
            safe = np.maximum(owner, 0)
            pixel_labels = {f: torch.from_numpy(np.where(owner >= 0, np.take_along_axis(
                scene[f], safe.reshape(n, -1), axis=1).reshape(owner.shape), -1))
                for f in ("shape", "color", "object")}
            pixel_labels["part"] = torch.from_numpy(part)
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
    """Fraction of patches carrying each value of every factor of :data:`FACTORS`
    (``factor -> {value name: fraction}``; patches where the factor is absent, -1, count in the total)."""
    out = {}
    for factor, names in FACTORS.items():
        labels = batch.patch_labels[factor].flatten()
        counts = torch.bincount(labels[labels >= 0], minlength=len(names)).double() / max(labels.numel(), 1)
        out[factor] = {name: float(c) for name, c in zip(names, counts)}
    return out


def mixed_images(batch: ToyBatch) -> Tensor:
    """Indices [n] of the images whose patch labels hold both a simple shape and a composed object."""
    pl = batch.patch_labels
    return torch.nonzero((pl["shape"] >= 0).flatten(1).any(1) & (pl["object"] >= 0).flatten(1).any(1)).reshape(-1)
