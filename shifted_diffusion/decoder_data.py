"""The decoder's training data: image files, their frozen multi-CLIP image embeddings, the empty embedding.

Images are resized (shorter side) and cropped to the training resolution; 16-bit images are scaled to 8
bits, not clipped (``data.open_rgb``). Embeddings come from a matching prior embedding cache
(``--embedding_cache``), from the decoder's own file in its output folder (a resumed or repeated run,
matched by the CLIP weights and each image's path, size and modification time), or are computed once by
the main process. Captions are ignored.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .data import list_image_files, open_rgb
from .decoder import load_embedding

logger = logging.getLogger(__name__)

EMBEDDINGS_NAME = "train_image_embeddings.safetensors"


def load_training_image(path: Path, resolution: int, center_crop: bool) -> torch.Tensor:
    """Resize (shorter side, bilinear) and crop to resolution -> (3, H, W) in [-1, 1]."""
    image = open_rgb(path)  # 16-bit images scaled to 8 bits
    width, height = image.size
    scale = resolution / min(width, height)
    new_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    image = image.resize(new_size, resample=Image.Resampling.BILINEAR)
    if center_crop:
        left, top = (new_size[0] - resolution) // 2, (new_size[1] - resolution) // 2
    else:
        left, top = random.randint(0, new_size[0] - resolution), random.randint(0, new_size[1] - resolution)
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)  # (3, H, W)
    return pixels / 127.5 - 1.0


class ImageEmbeddingDataset(torch.utils.data.Dataset):
    """(pixel_values (3, H, W), image_embeds (D,)) pairs: training images with their precomputed CLIP embedding."""

    def __init__(self, paths: list[Path], image_embeds: torch.Tensor, resolution: int, center_crop: bool):
        if len(paths) != image_embeds.shape[0]:
            raise ValueError(f"image_embeds: expected {len(paths)} rows (one per image), got {image_embeds.shape[0]}")
        self.paths, self.image_embeds = paths, image_embeds
        self.resolution, self.center_crop = resolution, center_crop

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        return {
            "pixel_values": load_training_image(self.paths[index], self.resolution, self.center_crop),
            "image_embeds": self.image_embeds[index],
            "index": index,
        }


def list_training_images(folder: str) -> list[Path]:
    """The image files of a folder; captions are ignored, even malformed ones."""
    paths = list_image_files(folder)
    if not paths:
        raise FileNotFoundError(f"image folder {folder!r} holds no images")
    return paths


def list_validation_images(items: list[str]) -> list[Path]:
    """Image files named directly or found in the named folders."""
    paths = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            paths.extend(list_training_images(str(path)))
        elif path.is_file():
            paths.append(path)
        else:
            raise FileNotFoundError(f"--validation_images: {path} is neither an image file nor a folder")
    return paths


# ---- embeddings -------------------------------------------------------------------------------------


def _embedding_metadata(clip, paths: list[Path]) -> dict:
    """What the saved embeddings depend on: the CLIP models and their weights, each image file's path, size and
    modification time (an edited image, or retrained CLIP weights at the same path, do not match)."""
    from .cache import encoder_weights, file_fingerprint

    files = [[str(p.resolve()), file_fingerprint(p)] for p in paths]
    return {"clip_spec": json.dumps(clip.spec, sort_keys=True), "clip_weights": json.dumps(encoder_weights(clip),
            sort_keys=True), "images": json.dumps(files)}


def cached_image_embeddings(cache_dir: str, clip, paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(embeddings (N, D), readable (N,) bool) from a shifted_diffusion.cache folder built with the same CLIP
    models and weights from these very image files, unchanged since (cache.match_image_embeddings; images it
    skipped as unreadable stay unreadable); None, with a warning saying why, when it does not match."""
    from . import cache

    matched, why = cache.match_image_embeddings(cache_dir, clip, paths)
    if matched is None:
        logger.warning(f"not reusing the embedding cache {cache_dir}: {why}")
    return matched


def compute_image_embeddings(clip, paths: list[Path], batch_size: int, desc: str,
                             disable: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(CLIP image embeddings (N, D), readable (N,) bool); unreadable files get a zero row and a warning."""
    from tqdm.auto import tqdm

    rows, readable = [], []
    for start in tqdm(range(0, len(paths), batch_size), desc=desc, disable=disable):
        chunk = paths[start:start + batch_size]
        images, ok = [], []
        for path in chunk:
            try:
                images.append(open_rgb(path))
                ok.append(True)
            except Exception as error:
                logger.warning(f"skipping unreadable image {path}: {type(error).__name__}: {error}")
                ok.append(False)
        out = torch.zeros(len(chunk), clip.dim)
        if images:
            out[torch.tensor(ok)] = clip.encode_image(images).float().cpu()
        rows.append(out)
        readable += ok
    return torch.cat(rows), torch.tensor(readable, dtype=torch.bool)


def training_image_embeddings(cfg, accelerator, clip, paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings (N, D), readable (N,)) of the training images: from the prior's cache, from our own file
    in output_dir (a resumed run), or computed once by the main process."""
    from safetensors import safe_open

    from .files import save_tensors

    if cfg.embedding_cache:
        cached = cached_image_embeddings(cfg.embedding_cache, clip, paths)
        if cached is not None:
            logger.info(f"reusing {int(cached[1].sum())} image embeddings from the cache {cfg.embedding_cache}")
            return cached
        logger.info(f"the cache {cfg.embedding_cache} does not match these CLIP models / images; computing embeddings")
    file = Path(cfg.output_dir) / EMBEDDINGS_NAME
    metadata = _embedding_metadata(clip, paths)
    with accelerator.main_process_first():
        if file.is_file():
            with safe_open(str(file), framework="pt") as f:
                if f.metadata() == metadata:
                    logger.info(f"reusing the image embeddings saved in {file}")
                    return f.get_tensor("image_embeds"), f.get_tensor("readable")
        if accelerator.is_main_process:
            embeds, readable = compute_image_embeddings(clip, paths, cfg.clip_batch_size, "CLIP image embeddings",
                                                        disable=not accelerator.is_local_main_process)
            save_tensors(file, {"image_embeds": embeds, "readable": readable}, metadata)
            return embeds, readable
    with safe_open(str(file), framework="pt") as f:
        return f.get_tensor("image_embeds"), f.get_tensor("readable")



def readable_training_embeddings(cfg, accelerator, clip, paths: list[Path]) -> tuple[list[Path], torch.Tensor, int]:
    """(readable paths, their embeddings (N, D), how many were unreadable): the training images through
    ``training_image_embeddings``, unreadable ones left out with a warning; SystemExit when none or too few
    for one batch on every process remain."""
    from . import training

    image_embeds, readable = training_image_embeddings(cfg, accelerator, clip, paths)
    num_unreadable = int((~readable).sum())
    if num_unreadable:
        logger.warning(f"{num_unreadable} of {len(paths)} training images are unreadable and left out")
        paths, image_embeds = [p for p, ok in zip(paths, readable.tolist()) if ok], image_embeds[readable]
    if not paths:
        raise SystemExit(f"finetune: none of the training images in {cfg.train_data_dir} could be read")
    try:
        training.check_batches(len(paths), cfg.train_batch_size, accelerator.num_processes,
                               f"readable training images in {cfg.train_data_dir}")
    except ValueError as error:
        raise SystemExit(f"finetune: {error}") from error
    return paths, image_embeds, num_unreadable

def empty_image_embedding(cfg, clip) -> tuple[torch.Tensor, str]:
    """The unconditional embedding (D,) and where it came from."""
    if cfg.empty_embedding:
        return load_embedding(cfg.empty_embedding), f"--empty_embedding {cfg.empty_embedding}"
    black = Image.new("RGB", (cfg.resolution, cfg.resolution))
    return clip.encode_image([black])[0].float().cpu(), "CLIP embedding of a black image"


def check_dim(name: str, source: str, dim: int, projection_dim: int, projection_source: str) -> None:
    """Raise when an embedding's dim differs from the projection's clip_dim, naming both sources."""
    if dim != projection_dim:
        raise ValueError(
            f"{name} has dim {dim} ({source}) but the projection expects clip_dim={projection_dim} "
            f"({projection_source}); use the same --clip_models for both"
        )
