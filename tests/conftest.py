"""Shared test settings: one intra-op thread (tiny tensors; avoids oversubscription on small CI machines).

Also the shared fixtures of the encoder / data / cache tests: two tiny random open_clip folders (written with
``encoders.save_open_clip``), a tiny random T5 encoder folder (ByT5 byte tokenizer: no download) and a small
image folder in the Hugging Face ``imagefolder`` convention with ``CAPTION_FOLDER_EXPECTED`` its expected parse.
And the original prior's network (``reference_prior``: tests/reference_prior.py, loaded here by path, the
only way tests reach it: no test imports another file of tests/).
"""

import functools
import importlib.util
import json
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch


def pytest_configure(config):
    torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------- tiny open_clips

# JSON-native values only: tests compare it with the model_cfg read back from open_clip_config.json
TINY_OPEN_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

# a second, different tiny open_clip: other embedding dim (24) and input size (48 px, so its own transform)
TINY_OPEN_CLIP_CFG_2 = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 48, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def _save_tiny_open_clip(directory: Path, model_cfg: dict, seed: int) -> Path:
    """A randomly initialised (seeded) open_clip.CLIP saved as a local folder; global RNG left untouched."""
    import open_clip

    from shifted_diffusion.encoders import save_open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**model_cfg)
    return save_open_clip(model.eval(), model_cfg, directory)


@pytest.fixture(scope="session")
def tiny_open_clip_dir(tmp_path_factory) -> Path:
    """Tiny open_clip folder: D = 32, 64 px images, 16-token context, text width 64."""
    return _save_tiny_open_clip(tmp_path_factory.mktemp("tiny_open_clip"), TINY_OPEN_CLIP_CFG, seed=0)


@pytest.fixture(scope="session")
def tiny_open_clip_dir_2(tmp_path_factory) -> Path:
    """A second tiny open_clip folder: D = 24, 48 px images, other weights."""
    return _save_tiny_open_clip(tmp_path_factory.mktemp("tiny_open_clip_2"), TINY_OPEN_CLIP_CFG_2, seed=1)


# ---------------------------------------------------------------------------------------------- tiny T5


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory) -> Path:
    """Tiny random T5 encoder (d_model 32, 2 layers) + ByT5 byte tokenizer, saved with save_pretrained."""
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    directory = tmp_path_factory.mktemp("tiny_t5")
    tokenizer = ByT5Tokenizer()  # bytes -> ids: needs no vocabulary file
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = T5EncoderModel(config)
    model.eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# ---------------------------------------------------------------------------------------------- image folder

# What read_image_folder / precompute must find in make_caption_image_folder's folder.
CAPTION_FOLDER_EXPECTED = {
    "num_files": 16,  # every image file, broken.png included
    "num_images": 15,  # readable images (broken.png is skipped by the cache builder)
    "num_captioned": 9,  # img00 01 05 06 07 09 10 11(jpg) sub/img08
    "num_uncaptioned": 6,  # img02 03 04 12 13 14
    "num_captions": 11,  # 1 + 2 + 1 + 1 + 1 + 2 + 1 + 1 + 1, broken.png's caption not counted
    "skipped": ["broken.png"],
}


def _shape_image(index: int, size: tuple, rng: np.random.Generator):
    """An RGB image (w, h) = size: a coloured rectangle on a noisy coloured background."""
    from PIL import Image

    w, h = size
    array = rng.integers(0, 64, size=(h, w, 3), dtype=np.uint8) + rng.integers(0, 192, 3).astype(np.uint8)
    top, left = h // 4 + index % 3, w // 4 + index % 5
    array[top:top + h // 2, left:left + w // 3] = rng.integers(0, 256, 3)
    return Image.fromarray(array)


def make_caption_image_folder(root) -> Path:
    """Write the test image folder under root (HF imagefolder convention) and return it.

    root/metadata.jsonl rows: string captions, a list of captions, extra fields, empty / null / [] captions,
    a caption for the corrupt broken.png; root/sub/metadata.jsonl names sub/img08.png relative to sub/;
    img09.png is captioned by img09.txt (one caption per non-empty line); img14.txt is blank (uncaptioned);
    img00.txt is ignored because metadata.jsonl captions img00.png; img02 and img13 appear nowhere.
    """
    root = Path(root)
    (root / "sub").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    sizes = [(40, 40), (48, 32), (32, 56), (64, 64), (36, 44)]
    names = [f"img{i:02d}.png" for i in range(15) if i not in (8, 11)] + ["img11.jpg", "sub/img08.png"]
    for i, name in enumerate(sorted(names)):
        image = _shape_image(i, sizes[i % len(sizes)], rng)
        image.save(root / name, quality=95) if name.endswith(".jpg") else image.save(root / name)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a valid png file")

    rows = [
        {"file_name": "img00.png", "text": "a red circle"},
        {"file_name": "img01.png", "text": ["a blue square", "a square"]},
        {"file_name": "img03.png", "text": ""},
        {"file_name": "img04.png", "text": []},
        {"file_name": "img05.png", "text": "a yellow star"},
        {"file_name": "img06.png", "text": ["two orange dots", "  "]},
        {"file_name": "img07.png", "text": "a red square", "color": "red", "count": 3},
        {"file_name": "img10.png", "text": "a white cross"},
        {"file_name": "img11.jpg", "text": "a jpeg circle"},
        {"file_name": "img12.png", "text": None},
        {"file_name": "broken.png", "text": "a broken image"},
    ]
    (root / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    (root / "sub" / "metadata.jsonl").write_text(
        json.dumps({"color": "purple", "file_name": "img08.png", "text": "in a subfolder", "count": 4}) + "\n\n",
        encoding="utf-8")
    (root / "img09.txt").write_text("green triangle\n\n  small green triangle  \n", encoding="utf-8")
    (root / "img14.txt").write_text("\n   \n", encoding="utf-8")
    (root / "img00.txt").write_text("a caption that metadata.jsonl overrides\n", encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def caption_image_folder(tmp_path_factory) -> Path:
    """The image folder of make_caption_image_folder (read-only for tests)."""
    return make_caption_image_folder(tmp_path_factory.mktemp("caption_images"))


# ---------------------------------------------------------------------------------------------- older prior folders


def write_legacy_prior(directory, prior, shift, schedule_config, encoders, null_clip_text, null_text_tokens,
                       extra=None):
    """A prior folder in the format train.py wrote before the diffusers pipeline ("shifted-diffusion-prior/1"):
    config.json, model.safetensors, vocab.safetensors (not for the baseline), null_embeddings.safetensors."""
    from safetensors.torch import save_file

    from shifted_diffusion.vocab import ClusterVocab

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in prior.state_dict().items()},
              str(directory / "model.safetensors"))
    if isinstance(shift, ClusterVocab):
        shift.save(directory / "vocab.safetensors")
    save_file({"null_clip_text": null_clip_text.float().cpu().contiguous(),
               "null_text_tokens": null_text_tokens.float().cpu().contiguous()},
              str(directory / "null_embeddings.safetensors"))
    config = {"format": "shifted-diffusion-prior/1", "prior": prior.arch.to_dict(), "schedule": schedule_config.to_dict(),
              "encoders": encoders, "baseline": not isinstance(shift, ClusterVocab), **(extra or {})}
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


@pytest.fixture
def legacy_prior_writer():
    return write_legacy_prior


# ---------------------------------------------------------------------------------------------- reference prior

REFERENCE_PRIOR_FILE = Path(__file__).resolve().with_name("reference_prior.py")


@functools.lru_cache(maxsize=None)
def _reference_prior_module():
    """tests/reference_prior.py as a module (by path: it is a file of the tests, not of the package)."""
    spec = importlib.util.spec_from_file_location("_reference_prior", REFERENCE_PRIOR_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def reference_prior():
    """Builder of the original ClipPrior network (real x_transformers 0.28.4 trunk) for a PriorConfig:
    ``reference_prior(config, seed=0)`` has every parameter randomised from ``seed`` and is in eval mode;
    ``seed=None`` keeps the default initialisation (e.g. on the meta device). Skips without x_transformers."""
    pytest.importorskip("x_transformers")
    module = _reference_prior_module()

    def build(config, seed: Optional[int] = 0):
        ref = module.ReferenceClipPrior.from_config(config)
        if seed is None:
            return ref
        return module.randomize_(ref, torch.Generator().manual_seed(seed)).eval()

    return build
