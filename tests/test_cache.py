"""Embedding cache: precompute shards + manifest, resume, encoder mismatch, EmbeddingDataset, splits."""

import json
import os

import pytest
import torch
from PIL import Image

from conftest import CAPTION_FOLDER_EXPECTED
from shifted_diffusion.cache import (
    MANIFEST_NAME,
    EmbeddingDataset,
    load_image_embeddings,
    load_image_records,
    load_manifest,
    load_null_embeddings,
    precompute,
    split_image_indices,
)
from shifted_diffusion.encoders import CLIPTokenTextEncoder, MultiCLIP, NoTextEncoder, T5TextEncoder


@pytest.fixture(scope="module")
def cache_clip(tiny_open_clip_dir):
    return MultiCLIP([(str(tiny_open_clip_dir), "")], device="cpu", batch_size=4)


@pytest.fixture(scope="module")
def cache_text_encoder(tiny_open_clip_dir):
    return CLIPTokenTextEncoder(str(tiny_open_clip_dir), max_length=12, device="cpu")


def _precompute(folder, cache_dir, clip, text_encoder, **kw):
    kw.setdefault("shard_size", 5)
    kw.setdefault("batch_size", 3)
    kw.setdefault("progress", False)
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image.*broken\.png"):
        return precompute(folder, cache_dir, clip, text_encoder, **kw)


def test_precompute_counts_skips_and_manifest(caption_image_folder, tmp_path, cache_clip, cache_text_encoder):
    manifest = _precompute(caption_image_folder, tmp_path / "cache", cache_clip, cache_text_encoder)
    assert manifest == load_manifest(tmp_path / "cache")
    assert manifest["num_images"] == CAPTION_FOLDER_EXPECTED["num_images"]
    assert manifest["num_captioned_images"] == CAPTION_FOLDER_EXPECTED["num_captioned"]
    assert manifest["num_uncaptioned_images"] == CAPTION_FOLDER_EXPECTED["num_uncaptioned"]
    assert manifest["num_captions"] == CAPTION_FOLDER_EXPECTED["num_captions"]
    assert manifest["num_skipped"] == 1 and [s["file_name"] for s in manifest["skipped"]] == ["broken.png"]
    assert manifest["skipped"][0]["error"]
    assert len(manifest["shards"]) == 4  # 16 files / shard_size 5
    assert manifest["clip_dim"] == 32 and manifest["block_sizes"] == [32]
    assert manifest["text_len"] == 12 and manifest["text_dim"] == 64
    assert manifest["encoders"]["clip"] == cache_clip.spec and manifest["encoders"]["text"] == cache_text_encoder.spec
    null_clip_text, null_text_tokens = load_null_embeddings(tmp_path / "cache")
    torch.testing.assert_close(null_clip_text, cache_clip.encode_text([""])[0])
    torch.testing.assert_close(null_text_tokens, cache_text_encoder.encode([""])[0])
    # every embedded image, captioned or not, is in the vocabulary set; metadata passes through
    records = load_image_records(tmp_path / "cache")
    assert [r["file_name"] for r in records] == sorted(
        n for n in [f"img{i:02d}.png" for i in range(15) if i not in (8, 11)] + ["img11.jpg", "sub/img08.png"])
    assert records[[r["file_name"] for r in records].index("img07.png")]["metadata"] == {"color": "red", "count": 3}
    embeddings = load_image_embeddings(tmp_path / "cache")
    assert embeddings.shape == (15, 32) and embeddings.dtype == torch.float32
    uncaptioned = [r["file_name"] for r in records].index("img13.png")
    image = Image.open(caption_image_folder / "img13.png")
    torch.testing.assert_close(embeddings[uncaptioned], cache_clip.encode_image([image])[0], atol=2e-3, rtol=2e-3)


def test_dataset_items_equal_direct_encoder_outputs(caption_image_folder, tmp_path, cache_clip, cache_text_encoder):
    _precompute(caption_image_folder, tmp_path / "cache", cache_clip, cache_text_encoder, clip_dtype=torch.float32)
    dataset = EmbeddingDataset(tmp_path / "cache")
    assert len(dataset) == CAPTION_FOLDER_EXPECTED["num_captions"]
    records = load_image_records(tmp_path / "cache")
    pairs = [(r["file_name"], c) for r in records for c in r["captions"]]
    items = [dataset[i] for i in range(len(dataset))]
    seen = [pairs[int(item["caption_index"])] for item in items]
    images = [Image.open(caption_image_folder / file_name) for file_name, _ in seen]
    captions = [caption for _, caption in seen]
    for item, (file_name, _) in zip(items, seen):
        assert item["clip_image"].shape == (32,) and item["clip_text"].shape == (32,)
        assert item["text_tokens"].shape == (12, 64) and item["text_tokens"].dtype == torch.float32
        assert records[int(item["image_index"])]["file_name"] == file_name
    torch.testing.assert_close(torch.stack([i["clip_image"] for i in items]), cache_clip.encode_image(images),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.stack([i["clip_text"] for i in items]), cache_clip.encode_text(captions),
                               atol=1e-5, rtol=1e-5)
    # text tokens are stored in float16
    torch.testing.assert_close(torch.stack([i["text_tokens"] for i in items]), cache_text_encoder.encode(captions),
                               atol=5e-3, rtol=5e-3)
    seen = set(seen)
    assert ("img01.png", "a square") in seen and ("img09.png", "small green triangle") in seen
    assert len(seen) == len(pairs)
    # in-memory mode and a DataLoader give the same batches
    batch = next(iter(torch.utils.data.DataLoader(EmbeddingDataset(tmp_path / "cache", in_memory=True), batch_size=4)))
    first = [dataset[i] for i in range(4)]
    assert torch.equal(batch["text_tokens"], torch.stack([f["text_tokens"] for f in first]))
    assert batch["clip_image"].shape == (4, 32)


def test_resume_skips_finished_shards(caption_image_folder, tmp_path, cache_clip, cache_text_encoder):
    cache_dir = tmp_path / "cache"
    first = _precompute(caption_image_folder, cache_dir, cache_clip, cache_text_encoder)
    assert first["last_run"] == {"shards_computed": 4, "shards_reused": 0}
    mtimes = {p.name: p.stat().st_mtime_ns for p in cache_dir.glob("shard_*")}
    os.remove(cache_dir / "shard_00002.json")  # as if interrupted while writing shard 2
    second = _precompute(caption_image_folder, cache_dir, cache_clip, cache_text_encoder)
    assert second["last_run"] == {"shards_computed": 1, "shards_reused": 3}
    for name, mtime in mtimes.items():
        if not name.startswith("shard_00002"):
            assert (cache_dir / name).stat().st_mtime_ns == mtime, name
    assert {k: v for k, v in second.items() if k != "last_run"} == {k: v for k, v in first.items() if k != "last_run"}


def test_cache_built_with_other_encoders_is_refused(caption_image_folder, tmp_path, cache_clip, cache_text_encoder,
                                                     tiny_open_clip_dir, tiny_open_clip_dir_2):
    cache_dir = tmp_path / "cache"
    _precompute(caption_image_folder, cache_dir, cache_clip, cache_text_encoder)
    other_text = CLIPTokenTextEncoder(str(tiny_open_clip_dir), max_length=10, device="cpu")
    with pytest.raises(ValueError, match=r"encoders\.text\.max_length=12.*encoders\.text\.max_length=10"):
        precompute(caption_image_folder, cache_dir, cache_clip, other_text, progress=False)
    other_clip = MultiCLIP([(str(tiny_open_clip_dir_2), "")], device="cpu")
    with pytest.raises(ValueError, match=r"encoders\.clip\."):
        precompute(caption_image_folder, cache_dir, other_clip, cache_text_encoder, progress=False)
    with pytest.raises(ValueError, match=r"encoders\.text\.type='clip-tokens'.*'none'"):
        precompute(caption_image_folder, cache_dir, cache_clip, NoTextEncoder(), progress=False)


def test_precompute_empty_folder_and_missing_caption_column(tmp_path, cache_clip, cache_text_encoder,
                                                            caption_image_folder):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        precompute(tmp_path / "empty", tmp_path / "cache", cache_clip, cache_text_encoder, progress=False)
    with pytest.raises(ValueError, match=r"metadata\.jsonl.*'caption'"):
        precompute(caption_image_folder, tmp_path / "cache", cache_clip, cache_text_encoder,
                   caption_column="caption", progress=False)


def test_interrupted_cache_is_not_loaded(tmp_path):
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"format": "shifted-diffusion-embedding-cache",
                                                      "complete": False}))
    with pytest.raises(ValueError, match="incomplete"):
        EmbeddingDataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="precompute"):
        EmbeddingDataset(tmp_path / "nothing")


def test_t5_and_none_text_encoders_in_cache(caption_image_folder, tmp_path, cache_clip, tiny_t5_dir):
    t5 = T5TextEncoder(str(tiny_t5_dir), max_length=20, device="cpu")
    _precompute(caption_image_folder, tmp_path / "t5", cache_clip, t5, shard_size=100)
    dataset = EmbeddingDataset(tmp_path / "t5")
    records = load_image_records(tmp_path / "t5")
    pairs = [c for r in records for c in r["captions"]]
    item = dataset[3]
    assert item["text_tokens"].shape == (20, 32)
    torch.testing.assert_close(item["text_tokens"], t5.encode([pairs[int(item["caption_index"])]])[0],
                               atol=5e-3, rtol=5e-3)
    assert dataset.null_text_tokens.shape == (20, 32)

    _precompute(caption_image_folder, tmp_path / "none", cache_clip, NoTextEncoder(), shard_size=100, num_workers=2)
    dataset = EmbeddingDataset(tmp_path / "none")
    assert dataset.text_len == 0 and dataset[0]["text_tokens"].shape == (0, 0)
    assert dataset.null_text_tokens.shape == (0, 0)
    # images decoded in DataLoader workers give the same embeddings
    torch.testing.assert_close(load_image_embeddings(tmp_path / "none"), load_image_embeddings(tmp_path / "t5"))


def test_split_is_deterministic_disjoint_and_by_image(caption_image_folder, tmp_path, cache_clip, cache_text_encoder):
    train, val = split_image_indices(100, val_fraction=0.1, seed=3)
    assert len(val) == 10 and len(train) == 90
    assert set(train.tolist()) | set(val.tolist()) == set(range(100)) and not set(train.tolist()) & set(val.tolist())
    assert torch.equal(val, split_image_indices(100, val_fraction=0.1, seed=3)[1])
    assert not torch.equal(val, split_image_indices(100, val_fraction=0.1, seed=4)[1])

    _precompute(caption_image_folder, tmp_path / "cache", cache_clip, cache_text_encoder)
    train_set = EmbeddingDataset(tmp_path / "cache", split="train", val_fraction=0.3, seed=0)
    val_set = EmbeddingDataset(tmp_path / "cache", split="val", val_fraction=0.3, seed=0)
    _, val_images = split_image_indices(15, val_fraction=0.3, seed=0)
    train_images = {int(item["image_index"]) for item in train_set}
    held_out = {int(item["image_index"]) for item in val_set}
    assert held_out <= set(val_images.tolist()) and not train_images & set(val_images.tolist())
    assert len(train_set) + len(val_set) == CAPTION_FOLDER_EXPECTED["num_captions"]
    with pytest.raises(ValueError, match="split"):
        EmbeddingDataset(tmp_path / "cache", split="test")
