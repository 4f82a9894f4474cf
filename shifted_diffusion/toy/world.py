"""The toy world: seeded images of one coloured shape with captions that mention some attributes."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm.auto import tqdm
from PIL import Image, ImageDraw

ATTRIBUTES = ("shape", "colour", "size", "position", "background")

# Saturated object colours, far apart in RGB and from every background below.
COLOUR_RGB = {
    "red": (220, 30, 30),
    "orange": (250, 135, 20),
    "yellow": (245, 220, 30),
    "green": (30, 170, 50),
    "cyan": (30, 205, 215),
    "blue": (35, 70, 225),
    "purple": (140, 45, 205),
    "pink": (250, 115, 195),
    # neutral tones, used as backgrounds by default
    "white": (240, 240, 240),
    "black": (20, 20, 20),
    "grey": (125, 125, 125),
    "brown": (105, 65, 30),
}

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")

# Position index = 3 * row + column; rows top..bottom, columns left..right.
POSITION_NAMES = (
    "top left", "top centre", "top right",
    "middle left", "centre", "middle right",
    "bottom left", "bottom centre", "bottom right",
)
GRID_FRACTIONS = (0.25, 0.5, 0.75)  # object centre, as a fraction of the image side

CAPTION_VERSION = 1


@dataclass(frozen=True)
class ToyWorldConfig:
    """Everything that determines a toy world: same config -> identical images and captions."""

    num_images: int = 20000
    image_size: int = 64
    seed: int = 0
    shapes: tuple = SHAPES
    colours: tuple = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
    backgrounds: tuple = ("white", "black", "grey", "brown")
    sizes: tuple = ("small", "large")
    size_diameters: tuple = (0.24, 0.42)  # object diameter per size, fraction of the image side
    # probability that a caption mentions each attribute, in ATTRIBUTES order (at least one always is)
    mention_probs: tuple = (0.6, 0.6, 0.4, 0.5, 0.4)
    position_jitter: float = 0.03  # uniform +- fraction of the image side
    size_jitter: float = 0.08  # relative, uniform +-
    rotation_jitter: float = 12.0  # degrees, uniform +-
    colour_jitter: int = 12  # per channel, uniform +-, object and background
    supersample: int = 4  # draw at this multiple of image_size, then downsample (anti-aliasing)
    num_workers: int = 0  # 0: one process; parallelism never changes the output

    def __post_init__(self):
        for name in ("shapes", "colours", "backgrounds", "sizes", "size_diameters", "mention_probs"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        unknown_shapes = set(self.shapes) - set(SHAPES)
        if unknown_shapes:
            raise ValueError(f"unknown shapes {sorted(unknown_shapes)}; known: {SHAPES}")
        unknown_colours = set(self.colours + self.backgrounds) - set(COLOUR_RGB)
        if unknown_colours:
            raise ValueError(f"unknown colours {sorted(unknown_colours)}; known: {sorted(COLOUR_RGB)}")
        if len(self.size_diameters) != len(self.sizes):
            raise ValueError(f"size_diameters needs one entry per size {self.sizes}, got {self.size_diameters}")
        if len(self.mention_probs) != len(ATTRIBUTES):
            raise ValueError(f"mention_probs needs {len(ATTRIBUTES)} entries {ATTRIBUTES}, got {self.mention_probs}")
        if len(self.backgrounds) < 2 and set(self.backgrounds) <= set(self.colours):
            raise ValueError("need a background colour that differs from every object colour")
        if self.num_images < 1 or self.image_size < 8:
            raise ValueError(f"need num_images >= 1 and image_size >= 8, got {self.num_images}, {self.image_size}")

    def values(self, attribute: str) -> tuple:
        """The possible values of one attribute, in index order."""
        return {
            "shape": self.shapes,
            "colour": self.colours,
            "size": self.sizes,
            "position": POSITION_NAMES,
            "background": self.backgrounds,
        }[attribute]

    def heldout(self, num_images: int, offset: int = 1_000_003) -> "ToyWorldConfig":
        """A disjoint sample of the same world (another seed), e.g. for evaluation."""
        return dataclasses.replace(self, num_images=num_images, seed=self.seed + offset)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("num_workers")  # never changes the output
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "ToyWorldConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in fields})


# ----------------------------------------------------------------------------------------------
# captions


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_variants(attributes: dict, mentioned) -> list:
    """Every template's caption naming exactly the `mentioned` attributes (values given by name)."""
    mentioned = set(mentioned)
    if not mentioned:
        raise ValueError("a caption must mention at least one attribute")
    unknown = mentioned - set(ATTRIBUTES)
    if unknown:
        raise ValueError(f"unknown attributes {sorted(unknown)}; known: {ATTRIBUTES}")
    words = [attributes[a] for a in ("size", "colour") if a in mentioned]
    words.append(attributes["shape"] if "shape" in mentioned else "shape")
    obj = " ".join(words)
    obj = f"{_article(obj)} {obj}"
    where = f" in the {attributes['position']}" if "position" in mentioned else ""
    bg = attributes["background"] if "background" in mentioned else None
    on_bg = f" on a {bg} background" if bg else ""
    variants = [f"{obj}{where}{on_bg}", f"a picture of {obj}{where}{on_bg}"]
    if where and on_bg:
        variants.append(f"{obj}{on_bg}{where}")
    if bg:
        variants.append(f"{_article(bg)} {bg} background with {obj}{where}")
    if where:
        variants.append(f"in the {attributes['position']}, {obj}{on_bg}")
    return variants


def caption_for(attributes: dict, mentioned, rng: np.random.Generator) -> str:
    """One caption, template drawn by `rng`, naming exactly the `mentioned` attributes of one image."""
    variants = caption_variants(attributes, mentioned)
    return variants[int(rng.integers(len(variants)))]


def sample_mentioned(mention_probs, rng: np.random.Generator) -> list:
    """Each attribute independently with its probability; if none came up, one drawn by probability."""
    probs = np.asarray(mention_probs, dtype=np.float64)
    chosen = rng.random(len(ATTRIBUTES)) < probs
    if not chosen.any():
        p = probs / probs.sum() if probs.sum() > 0 else np.full(len(probs), 1.0 / len(probs))
        chosen[rng.choice(len(ATTRIBUTES), p=p)] = True
    return [a for a, c in zip(ATTRIBUTES, chosen) if c]


# ----------------------------------------------------------------------------------------------
# drawing


def _polygon(cx, cy, radii, angles):
    return [(cx + r * math.cos(a), cy + r * math.sin(a)) for r, a in zip(radii, angles)]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx, cy, r, rot, fill, background):
    """Draw one shape of circumradius ~r centred at (cx, cy), rotated by rot radians."""
    up = -math.pi / 2 + rot
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        ri = 0.55 * r
        draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=background)
    elif shape == "square":
        rs = 0.85 * r * math.sqrt(2)  # corner radius: a square of half-side 0.85 r
        draw.polygon(_polygon(cx, cy, [rs] * 4, [rot + math.pi / 4 + k * math.pi / 2 for k in range(4)]), fill=fill)
    elif shape == "triangle":
        # centred on its bounding box rather than its centroid, so it fills the cell like the others
        pts = _polygon(cx, cy + 0.2 * r, [1.15 * r] * 3, [up + k * 2 * math.pi / 3 for k in range(3)])
        draw.polygon(pts, fill=fill)
    elif shape == "star":
        radii = [r if k % 2 == 0 else 0.42 * r for k in range(10)]
        draw.polygon(_polygon(cx, cy, radii, [up + k * math.pi / 5 for k in range(10)]), fill=fill)
    elif shape == "cross":
        w = 0.34 * r  # half-width of an arm
        corners = [(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r), (-w, -r), (-w, -w), (-r, -w), (-r, w), (-w, w), (-w, r)]
        c, s = math.cos(rot), math.sin(rot)
        draw.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in corners], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _jittered(rgb, amount: int, rng: np.random.Generator) -> tuple:
    return tuple(int(np.clip(v + rng.integers(-amount, amount + 1), 0, 255)) for v in rgb)


def sample_record(config: ToyWorldConfig, index: int) -> dict:
    """Attributes, caption and nuisance parameters of image `index` (seeded by (seed, index) only)."""
    rng = np.random.default_rng([config.seed, index])
    values = {a: config.values(a) for a in ATTRIBUTES}
    idx = {a: int(rng.integers(len(values[a]))) for a in ("shape", "colour", "size", "position")}
    colour = values["colour"][idx["colour"]]
    allowed_bg = [i for i, b in enumerate(config.backgrounds) if b != colour]
    idx["background"] = int(allowed_bg[rng.integers(len(allowed_bg))])
    attributes = {a: values[a][idx[a]] for a in ATTRIBUTES}
    mentioned = sample_mentioned(config.mention_probs, rng)
    text = caption_for(attributes, mentioned, rng)
    render = {
        "dx": float(rng.uniform(-1, 1) * config.position_jitter),
        "dy": float(rng.uniform(-1, 1) * config.position_jitter),
        "scale": float(1 + rng.uniform(-1, 1) * config.size_jitter),
        "rotation": float(rng.uniform(-1, 1) * config.rotation_jitter),
        "fill": _jittered(COLOUR_RGB[colour], config.colour_jitter, rng),
        "background": _jittered(COLOUR_RGB[attributes["background"]], config.colour_jitter, rng),
    }
    return {"attributes": attributes, "indices": idx, "mentioned": mentioned, "text": text, "render": render}


def render_image(config: ToyWorldConfig, record: dict) -> Image.Image:
    """Draw the record's object on its background (supersampled, then box-downsampled)."""
    size = config.image_size
    big = size * config.supersample
    r = record["render"]
    image = Image.new("RGB", (big, big), r["background"])
    draw = ImageDraw.Draw(image)
    pos = record["indices"]["position"]
    row, col = divmod(pos, 3)
    cx = (GRID_FRACTIONS[col] + r["dx"]) * big
    cy = (GRID_FRACTIONS[row] + r["dy"]) * big
    radius = 0.5 * config.size_diameters[record["indices"]["size"]] * r["scale"] * big
    _draw_shape(draw, record["attributes"]["shape"], cx, cy, radius, math.radians(r["rotation"]), r["fill"], r["background"])
    if config.supersample > 1:
        image = image.resize((size, size), Image.BOX)
    return image


def file_name_for(index: int) -> str:
    return f"{index:06d}.png"


def _render_and_save(args):
    config, folder, start, stop = args
    lines = []
    for i in range(start, stop):
        record = sample_record(config, i)
        render_image(config, record).save(os.path.join(folder, file_name_for(i)), compress_level=1)
        lines.append(
            {"file_name": file_name_for(i), "text": record["text"], "attributes": record["attributes"], "mentioned": record["mentioned"]}
        )
    return lines


WORLD_CONFIG_FILE = "toy_world.json"


def world_is_cached(folder, config: ToyWorldConfig) -> bool:
    """True if `folder` holds a finished world generated from the same config (and caption version)."""
    path = Path(folder) / WORLD_CONFIG_FILE
    if not path.is_file() or not (Path(folder) / "metadata.jsonl").is_file():
        return False
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError:
        return False
    return saved.get("config") == config.to_dict() and saved.get("caption_version") == CAPTION_VERSION and saved.get("complete")


def generate_world(folder, config: Optional[ToyWorldConfig] = None) -> str:
    """Write `config.num_images` PNGs + metadata.jsonl (HF imagefolder) + toy_world.json; skip if cached."""
    config = config or ToyWorldConfig()
    folder = str(folder)
    if world_is_cached(folder, config):
        return folder
    os.makedirs(folder, exist_ok=True)
    marker = Path(folder) / WORLD_CONFIG_FILE
    if marker.exists():
        marker.unlink()  # stale world: invalidate before overwriting
    chunk = 500
    jobs = [(config, folder, s, min(s + chunk, config.num_images)) for s in range(0, config.num_images, chunk)]
    if config.num_workers > 0 and len(jobs) > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(config.num_workers) as pool:
            parts = pool.map(_render_and_save, jobs)
    else:
        parts = [_render_and_save(job) for job in tqdm(jobs, desc=f"toy world ({config.num_images} images)", unit="chunk")]
    tmp = Path(folder) / "metadata.jsonl.tmp"
    with open(tmp, "w") as f:
        for part in parts:
            for line in part:
                f.write(json.dumps(line) + "\n")
    os.replace(tmp, Path(folder) / "metadata.jsonl")
    info = {"config": config.to_dict(), "caption_version": CAPTION_VERSION, "attributes": list(ATTRIBUTES),
            "values": {a: list(config.values(a)) for a in ATTRIBUTES}, "complete": True}
    marker.write_text(json.dumps(info, indent=1))
    return folder


def load_world_config(folder) -> ToyWorldConfig:
    """The config a world folder was generated from."""
    path = Path(folder) / WORLD_CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {folder} is not a generated toy world")
    return ToyWorldConfig.from_dict(json.loads(path.read_text())["config"])
