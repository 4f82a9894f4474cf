"""A tiny open_clip CLIP trained from scratch on the toy world with open_clip's contrastive loss."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data import open_rgb
from ..threads import torch_threads
from .world import ATTRIBUTES, caption_for, load_world_config, sample_mentioned

TRAIN_CONFIG_FILE = "toy_clip_train.json"
# open_clip's default preprocessing statistics (PreprocessCfg), used by MultiCLIP's preprocess too
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ToyClipConfig:
    """Tiny open_clip model (ViT + text transformer) and its contrastive training recipe."""

    embed_dim: int = 64
    image_size: int = 64  # should equal the world's image_size (no resizing in or out of training)
    # vision tower: ModifiedResNet stage depths (vision_width = its stem width), or None for a ViT
    # (patch_size, vision_layers, vision_head_width, vision_pool_type, vision_pos_embed_type).
    # Measured: a ResNet learns shape/position far faster per CPU second than a ViT of similar cost.
    vision_resnet_layers: Optional[tuple] = (1, 1, 1, 1)
    vision_width: int = 16
    patch_size: int = 8
    vision_layers: int = 3
    vision_head_width: int = 32
    vision_pool_type: str = "tok"  # open_clip ViT pooling: "tok" (class token) or "avg" (mean of patches)
    vision_pos_embed_type: str = "learnable"  # or "sin_cos_2d" (fixed)
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 2
    context_length: int = 20  # >= the longest toy caption in BPE tokens + 2
    batch_size: int = 128
    steps: int = 800
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_frac: float = 0.1  # one-cycle: linear warmup then cosine decay
    # per-attribute mention probability of the captions drawn for training (ATTRIBUTES order);
    # None = train on the world's own metadata captions. Shape and position are mentioned most:
    # the contrastive loss only learns what tells the captions of a batch apart. Measured (seed 0,
    # 20k world, 1000 held-out images): shape .77 colour 1.0 size .99 position 1.0 background 1.0
    # (seed 1: shape .66 colour .99 size .97 position 1.0 background 1.0);
    # with (0.8, 0.5, 0.5, 0.6, 0.3) shape stayed at chance (.21): shape learning is fragile.
    caption_mention_probs: Optional[tuple] = (0.8, 0.3, 0.5, 0.8, 0.3)
    seed: int = 0
    num_threads: int = 2

    def __post_init__(self):
        if self.vision_resnet_layers is not None:
            object.__setattr__(self, "vision_resnet_layers", tuple(self.vision_resnet_layers))
        if self.caption_mention_probs is not None:
            object.__setattr__(self, "caption_mention_probs", tuple(self.caption_mention_probs))
            if len(self.caption_mention_probs) != len(ATTRIBUTES):
                raise ValueError(f"caption_mention_probs needs {len(ATTRIBUTES)} entries {ATTRIBUTES}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")

    def model_cfg(self) -> dict:
        """The open_clip model config (what `open_clip_config.json` stores as `model_cfg`)."""
        if self.vision_resnet_layers is not None:
            vision_cfg = {"image_size": self.image_size, "layers": list(self.vision_resnet_layers), "width": self.vision_width}
        else:
            vision_cfg = {
                "image_size": self.image_size,
                "patch_size": self.patch_size,
                "width": self.vision_width,
                "layers": self.vision_layers,
                "head_width": self.vision_head_width,
                "pool_type": self.vision_pool_type,
                "pos_embed_type": self.vision_pos_embed_type,
            }
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": vision_cfg,
            "text_cfg": {
                "context_length": self.context_length,
                "vocab_size": 49408,
                "width": self.text_width,
                "heads": self.text_heads,
                "layers": self.text_layers,
            },
        }

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("num_threads")  # never changes the result
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def build_model(config: ToyClipConfig) -> torch.nn.Module:
    """A freshly initialised open_clip CLIP from the config (seeded by config.seed)."""
    import open_clip

    torch.manual_seed(config.seed)
    return open_clip.model.CLIP(**config.model_cfg())


def load_world_tensors(world_folder) -> tuple:
    """All images of a world as uint8 (N, 3, H, W), their attribute indices (N, 5) and captions."""
    world_config = load_world_config(world_folder)
    values = {a: world_config.values(a) for a in ATTRIBUTES}
    records = [json.loads(line) for line in open(Path(world_folder) / "metadata.jsonl")]
    images = np.stack([np.asarray(open_rgb(Path(world_folder) / r["file_name"])) for r in records])
    attributes = np.array([[values[a].index(r["attributes"][a]) for a in ATTRIBUTES] for r in records], dtype=np.int64)
    texts = [r["text"] for r in records]
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(attributes), texts


def normalize_images(images_uint8: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float (B, 3, S, S), CLIP mean/std normalised."""
    x = images_uint8.float() / 255.0
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bicubic", align_corners=False)
    mean = torch.tensor(IMAGE_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class CaptionTokenizer:
    """open_clip's BPE tokenizer at the model's context length, memoised per caption."""

    def __init__(self, context_length: int):
        import open_clip

        self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=context_length)
        self.cache = {}

    def __call__(self, texts) -> torch.Tensor:
        missing = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if missing:
            for t, row in zip(missing, self.tokenizer(missing)):
                self.cache[t] = row
        return torch.stack([self.cache[t] for t in texts])


def training_captions(attribute_idx: torch.Tensor, world_config, mention_probs, rng: np.random.Generator) -> list:
    """Fresh captions for a batch of images (attribute indices (B, 5)), each attribute mentioned w.p. its prob."""
    values = [world_config.values(a) for a in ATTRIBUTES]
    captions = []
    for row in attribute_idx.tolist():
        attributes = {a: values[j][row[j]] for j, a in enumerate(ATTRIBUTES)}
        captions.append(caption_for(attributes, sample_mentioned(mention_probs, rng), rng))
    return captions


def one_cycle_lr(step: int, total: int, peak: float, warmup_frac: float) -> float:
    """Linear warmup to `peak`, then cosine decay to 0."""
    warmup = max(1, int(round(warmup_frac * total)))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_clip_model(
    world_folder,
    config: ToyClipConfig,
    *,
    data: Optional[tuple] = None,
    callback: Optional[Callable[[int, float, torch.nn.Module], None]] = None,
    log_every: int = 0,
    progress: bool = False,
) -> tuple:
    """Train a tiny CLIP with open_clip.ClipLoss; returns (model, losses list)."""
    import open_clip

    with torch_threads(config.num_threads):
        world_config = load_world_config(world_folder)
        images, attribute_idx, texts = data if data is not None else load_world_tensors(world_folder)
        model = build_model(config)
        model.train()
        tokenizer = CaptionTokenizer(config.context_length)
        loss_fn = open_clip.ClipLoss()
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n and "logit" not in n]
        no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n and "logit" not in n)]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.lr, betas=(0.9, 0.98), eps=1e-6,
        )
        generator = torch.Generator().manual_seed(config.seed)
        rng = np.random.default_rng([config.seed, 1])
        n = images.shape[0]
        batch_size = min(config.batch_size, n)
        losses = []
        order = torch.randperm(n, generator=generator)
        cursor = 0
        start = time.time()
        bar = tqdm(range(config.steps), desc="toy CLIP training", disable=not progress)
        for step in bar:
            if cursor + batch_size > n:
                order, cursor = torch.randperm(n, generator=generator), 0
            idx = order[cursor: cursor + batch_size]
            cursor += batch_size
            if config.caption_mention_probs is None:
                captions = [texts[i] for i in idx.tolist()]
            else:
                captions = training_captions(attribute_idx[idx], world_config, config.caption_mention_probs, rng)
            for group in optimizer.param_groups:
                group["lr"] = one_cycle_lr(step, config.steps, config.lr, config.warmup_frac)
            image_features, text_features, logit_scale = model(
                normalize_images(images[idx], config.image_size), tokenizer(captions))[:3]  # (B, E), (B, E), ()
            loss = loss_fn(image_features, text_features, logit_scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
            if log_every and (step + 1) % log_every == 0:
                print(f"step {step + 1}/{config.steps} loss {np.mean(losses[-log_every:]):.4f} "
                      f"{time.time() - start:.1f}s", flush=True)
            if callback is not None:
                callback(step, losses[-1], model)
        model.eval()
        return model, losses


def clip_is_cached(out_dir, config: ToyClipConfig, world_folder) -> bool:
    """True if out_dir holds a finished model trained with the same config on the same world."""
    path = Path(out_dir) / TRAIN_CONFIG_FILE
    if not path.is_file():
        return False
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError:
        return False
    world = json.loads((Path(world_folder) / "toy_world.json").read_text())["config"]
    return saved.get("config") == config.to_dict() and saved.get("world") == world and saved.get("complete")


def train_toy_clip(
    world_folder, out_dir, config: Optional[ToyClipConfig] = None, *, log_every: int = 0, eval_images: int = 1000,
    progress: bool = False,
) -> str:
    """Train (or reuse, if cached) a tiny CLIP on the world and save it with encoders.save_open_clip.

    Beside the open_clip files, toy_clip_train.json records the config, the world's config, timings and
    (if eval_images > 0) the zero-shot attribute accuracy on that many held-out images.
    """
    from ..encoders import save_open_clip

    config = config or ToyClipConfig()
    out_dir = str(out_dir)
    if clip_is_cached(out_dir, config, world_folder):
        return out_dir
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    marker = Path(out_dir) / TRAIN_CONFIG_FILE
    if marker.exists():
        marker.unlink()
    start, start_cpu = time.time(), time.process_time()
    model, losses = train_clip_model(world_folder, config, log_every=log_every, progress=progress)
    train_seconds, train_cpu_seconds = time.time() - start, time.process_time() - start_cpu
    save_open_clip(model, config.model_cfg(), out_dir)
    world = json.loads((Path(world_folder) / "toy_world.json").read_text())["config"]
    info = {
        "config": config.to_dict(),
        "world": world,
        "model_cfg": config.model_cfg(),
        "num_params": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(train_seconds, 1),
        "train_cpu_seconds": round(train_cpu_seconds, 1),
        "final_loss": float(np.mean(losses[-20:])),
        "complete": True,
    }
    if eval_images > 0:
        from .evaluate import zero_shot_accuracy

        info["zero_shot_images"] = eval_images
        info["zero_shot_accuracy"] = zero_shot_accuracy(out_dir, world_folder, n=eval_images)
    marker.write_text(json.dumps(info, indent=1))
    return out_dir
