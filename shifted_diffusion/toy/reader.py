"""Read the attributes of a toy-world image from its pixels: the yardstick for generated images.

The world is synthetic, so exact pixel analysis suffices (no training):
* background = the nearest background colour to the median of the border pixels;
* object mask = pixels far from the background, kept to the largest connected blob (stray pixels of a
  generated image are ignored); soft coverage alpha = projection of each pixel on the background -> object line;
* colour = the nearest object colour to the median of the confidently-covered pixels;
* size = the blob's bounding-box extent against the midpoint of the world's small and large diameters;
* position = the bounding-box centre's nearest grid cell;
* shape = the nearest template (the world's own drawing routine at a few rotations), after cropping the soft
  mask to its bounding box and resizing both to a fixed square: scale and position invariant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..data import to_rgb
from .world import ATTRIBUTES, COLOUR_RGB, GRID_FRACTIONS, ToyWorldConfig, _draw_shape

TEMPLATE_SIZE = 20  # side of the normalised mask compared with the shape templates
TEMPLATE_ROTATIONS = (-12.0, -6.0, 0.0, 6.0, 12.0)  # degrees: the world's rotation jitter range
MIN_CONTRAST = 60.0  # RGB distance from the background that counts as "object" for the hard mask


def _palette(names: Sequence[str]) -> np.ndarray:
    return np.array([COLOUR_RGB[n] for n in names], dtype=np.float64)  # (V, 3)


def _nearest(rgb: np.ndarray, palette: np.ndarray) -> int:
    return int(((palette - rgb[None]) ** 2).sum(-1).argmin())


def _dilate(mask: np.ndarray) -> np.ndarray:
    """4-neighbour binary dilation of a (H, W) bool mask."""
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def largest_blob(mask: np.ndarray) -> np.ndarray:
    """The 4-connected component of a (H, W) bool mask with the most pixels (empty mask -> empty)."""
    remaining = mask.copy()
    best = np.zeros_like(mask)
    while remaining.any():
        seed = np.unravel_index(remaining.argmax(), remaining.shape)
        region = np.zeros_like(mask)
        region[seed] = True
        while True:
            grown = _dilate(region) & remaining
            if (grown == region).all():
                break
            region = grown
        if region.sum() > best.sum():
            best = region
        remaining &= ~region
        if best.sum() >= remaining.sum():
            break
    return best


def _resize(array: np.ndarray, size: int) -> np.ndarray:
    """A float (h, w) map in [0, 1] resized to (size, size) (bilinear, via PIL)."""
    image = Image.fromarray((np.clip(array, 0, 1) * 255).astype(np.uint8))
    return np.asarray(image.resize((size, size), Image.BILINEAR), dtype=np.float64) / 255.0


def _crop_to_box(alpha: np.ndarray, blob: np.ndarray) -> tuple:
    """(cropped soft mask, (top, left, bottom, right) inclusive bounding box of the blob)."""
    rows, cols = np.nonzero(blob)
    top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()
    return alpha[top:bottom + 1, left:right + 1] * 1.0, (top, left, bottom, right)


@dataclass(frozen=True)
class ReaderThresholds:
    """Decision constants derived from a world config (documented for the report)."""

    size_extent: float  # bounding-box extent (pixels) above which an object is "large"
    grid_centres: tuple  # pixel coordinates of the three grid rows / columns


class ToyAttributeReader:
    """Pixel analysis of toy-world images -> attribute value indices, in the world config's value order."""

    def __init__(self, world_config: ToyWorldConfig | None = None):
        self.config = world_config or ToyWorldConfig()
        self.values = {a: self.config.values(a) for a in ATTRIBUTES}
        self.object_palette = _palette(self.config.colours)
        self.background_palette = _palette(self.config.backgrounds)
        size = self.config.image_size
        diameters = sorted(self.config.size_diameters)
        # extent of a drawn shape ~ 0.85..1.0 of its diameter: split halfway between the sizes
        midpoints = [0.5 * (a + b) for a, b in zip(diameters[:-1], diameters[1:])]
        self.size_order = np.argsort(self.config.size_diameters)  # value index by increasing diameter
        self.size_extents = [0.93 * m * size for m in midpoints]
        self.thresholds = ReaderThresholds(size_extent=self.size_extents[0] if self.size_extents else float("inf"),
                                           grid_centres=tuple(f * size for f in GRID_FRACTIONS))
        self.templates = self._shape_templates()  # (S, R, T, T)

    def _shape_templates(self) -> np.ndarray:
        """Normalised masks of every shape at every template rotation: (num_shapes, num_rotations, T, T)."""
        big = 128
        out = []
        for shape in self.config.shapes:
            per_rotation = []
            for rotation in TEMPLATE_ROTATIONS:
                image = Image.new("L", (big, big), 0)
                _draw_shape(ImageDraw.Draw(image), shape, big / 2, big / 2, 0.4 * big, math.radians(rotation), 255, 0)
                mask = np.asarray(image, dtype=np.float64) / 255.0
                cropped, _ = _crop_to_box(mask, mask > 0.5)
                per_rotation.append(_resize(cropped, TEMPLATE_SIZE))
            out.append(np.stack(per_rotation))
        return np.stack(out)

    def read_array(self, pixels: np.ndarray) -> dict:
        """One (H, W, 3) uint8/float RGB image -> {attribute: value index}."""
        pixels = np.asarray(pixels, dtype=np.float64)
        if pixels.ndim != 3 or pixels.shape[2] != 3:
            raise ValueError(f"pixels: expected an (H, W, 3) RGB array, got shape {pixels.shape}")
        height, width = pixels.shape[:2]
        scale = self.config.image_size / max(height, width)  # thresholds are in the world's pixel units
        border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])  # (2H + 2W, 3)
        background_rgb = np.median(border, axis=0)
        background = _nearest(background_rgb, self.background_palette)

        distance = np.sqrt(((pixels - background_rgb) ** 2).sum(-1))  # (H, W)
        blob = largest_blob(distance > MIN_CONTRAST)
        if not blob.any():  # no object at all: the most salient pixel decides colour; the rest is a guess
            blob = distance == distance.max()
        core = blob & (distance >= np.percentile(distance[blob], 50))
        object_rgb = np.median(pixels[core], axis=0)
        colour = _nearest(object_rgb, self.object_palette)

        line = object_rgb - background_rgb
        alpha = np.clip(((pixels - background_rgb) @ line) / max(float(line @ line), 1e-6), 0, 1)  # (H, W)
        alpha = alpha * _dilate(_dilate(blob))  # soft edges of this blob only
        cropped, (top, left, bottom, right) = _crop_to_box(alpha, blob)
        query = _resize(cropped, TEMPLATE_SIZE)
        errors = ((self.templates - query) ** 2).sum((-1, -2)).min(1)  # (num_shapes,)
        shape = int(errors.argmin())

        extent = max(bottom - top + 1, right - left + 1) * scale
        size_rank = int(sum(extent > t for t in self.size_extents))
        size = int(self.size_order[size_rank])
        centre_y, centre_x = 0.5 * (top + bottom + 1) * scale, 0.5 * (left + right + 1) * scale
        grid = np.array(self.thresholds.grid_centres)
        row, col = int(np.abs(grid - centre_y).argmin()), int(np.abs(grid - centre_x).argmin())
        return {"shape": shape, "colour": colour, "size": size, "position": 3 * row + col, "background": background}

    def read(self, images: Sequence) -> dict:
        """PIL images (or (H, W, 3) arrays) -> {attribute: LongTensor (B,)} value indices."""
        rows = [self.read_array(np.asarray(to_rgb(im)) if isinstance(im, Image.Image) else im) for im in images]
        return {a: torch.tensor([r[a] for r in rows], dtype=torch.long) for a in ATTRIBUTES}

    def names(self, indices: dict) -> list:
        """{attribute: (B,)} value indices -> B dicts of value names."""
        count = len(next(iter(indices.values())))
        return [{a: self.values[a][int(indices[a][i])] for a in ATTRIBUTES} for i in range(count)]


def reader_accuracy(reader: ToyAttributeReader, world_config: ToyWorldConfig, num_images: int = 500,
                    offset: int = 2_000_003) -> dict:
    """Per-attribute accuracy of the reader on freshly rendered held-out images of the world (and all five)."""
    from .world import render_image, sample_record

    config = world_config.heldout(num_images, offset=offset)
    records = [sample_record(config, i) for i in range(num_images)]
    predicted = reader.read([render_image(config, r) for r in records])
    out = {}
    correct_all = torch.ones(num_images, dtype=torch.bool)
    for a in ATTRIBUTES:
        truth = torch.tensor([r["indices"][a] for r in records])
        hit = predicted[a] == truth
        correct_all &= hit
        out[a] = float(hit.float().mean())
    out["all"] = float(correct_all.float().mean())
    out["num_images"] = int(num_images)
    return out
