"""Embedding cache: precompute shards + manifest, resume, encoder mismatch, EmbeddingDataset, splits."""

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import CAPTION_FOLDER_EXPECTED
from shifted_diffusion.cache import (
    CACHE_VERSION,
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
    # float32=False hands over the storage dtypes (half the bytes through workers); cast, the same values
    stored = EmbeddingDataset(tmp_path / "cache", float32=False)
    for i in (0, len(dataset) - 1):
        item = stored[i]
        assert item["text_tokens"].dtype == torch.float16
        for key in ("clip_image", "clip_text", "text_tokens"):
            assert torch.equal(item[key].float(), items[i][key])


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
                                                      "version": CACHE_VERSION, "complete": False}))
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


# ---------------------------------------------------------------------------------------------- stale data


def _copy_folder(caption_image_folder, tmp_path):
    import shutil

    return Path(shutil.copytree(caption_image_folder, tmp_path / "data"))


def _rewrite_metadata(folder, name, **changes):
    path = folder / "metadata.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for row in rows:
        if row["file_name"] == name:
            row.update(changes)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _shard_of(cache_dir, file_name):
    for shard in load_manifest(cache_dir)["shards"]:
        info = json.loads((cache_dir / f"{shard['name']}.json").read_text())
        if file_name in [x["file_name"] for x in info["inputs"]]:
            return shard["name"]
    raise KeyError(file_name)


def test_edited_caption_or_metadata_recomputes_exactly_its_shard(caption_image_folder, tmp_path, cache_clip,
                                                                 cache_text_encoder):
    data, cache_dir = _copy_folder(caption_image_folder, tmp_path), tmp_path / "cache"
    _precompute(data, cache_dir, cache_clip, cache_text_encoder, clip_dtype=torch.float32)
    shard = _shard_of(cache_dir, "img05.png")
    _rewrite_metadata(data, "img05.png", text="a purple star")
    with pytest.warns(UserWarning, match=rf"recomputing .*{shard}.*captions of img05\.png changed"):
        manifest = _precompute(data, cache_dir, cache_clip, cache_text_encoder, clip_dtype=torch.float32)
    assert manifest["last_run"] == {"shards_computed": 1, "shards_reused": 3}
    records = load_image_records(cache_dir)
    pairs = [(r["file_name"], c) for r in records for c in r["captions"]]
    assert ("img05.png", "a purple star") in pairs and ("img05.png", "a yellow star") not in pairs
    dataset = EmbeddingDataset(cache_dir)
    (item,) = [dataset[i] for i in range(len(dataset)) if pairs[int(dataset[i]["caption_index"])][1] == "a purple star"]
    torch.testing.assert_close(item["clip_text"], cache_clip.encode_text(["a purple star"])[0], atol=1e-5, rtol=1e-5)

    _rewrite_metadata(data, "img07.png", color="blue")
    with pytest.warns(UserWarning, match=r"metadata of img07\.png changed"):
        manifest = _precompute(data, cache_dir, cache_clip, cache_text_encoder, clip_dtype=torch.float32)
    assert manifest["last_run"] == {"shards_computed": 1, "shards_reused": 3}
    assert {r["file_name"]: r for r in load_image_records(cache_dir)}["img07.png"]["metadata"]["color"] == "blue"


def test_edited_pixels_recompute_their_shard(caption_image_folder, tmp_path, cache_clip, cache_text_encoder):
    data, cache_dir = _copy_folder(caption_image_folder, tmp_path), tmp_path / "cache"
    _precompute(data, cache_dir, cache_clip, cache_text_encoder, clip_dtype=torch.float32)
    before = load_image_embeddings(cache_dir)
    new = Image.new("RGB", (40, 40), (250, 10, 200))
    new.save(data / "img13.png")
    with pytest.warns(UserWarning, match=r"recomputing .*shard_\d+.*image img13\.png changed since it was embedded"):
        manifest = _precompute(data, cache_dir, cache_clip, cache_text_encoder, clip_dtype=torch.float32)
    assert manifest["last_run"] == {"shards_computed": 1, "shards_reused": 3}
    after = load_image_embeddings(cache_dir)
    row = [r["file_name"] for r in load_image_records(cache_dir)].index("img13.png")
    torch.testing.assert_close(after[row], cache_clip.encode_image([new])[0], atol=1e-5, rtol=1e-5)
    others = torch.arange(len(after)) != row
    assert torch.equal(after[others], before[others])  # the other images: reused or recomputed bit-exactly


def test_other_source_folder_is_refused(caption_image_folder, tmp_path, cache_clip, cache_text_encoder):
    data, cache_dir = _copy_folder(caption_image_folder, tmp_path), tmp_path / "cache"
    _precompute(caption_image_folder, cache_dir, cache_clip, cache_text_encoder)
    with pytest.raises(ValueError, match=rf"{cache_dir}.*built from the image folder .*{caption_image_folder.name}.*"
                                         rf"not from .*{data}.*another cache_dir"):
        precompute(data, cache_dir, cache_clip, cache_text_encoder, progress=False)


def _retrain(clip_dir, seed):
    """Overwrite a tiny open_clip folder's weights in place (same config, other values)."""
    from conftest import TINY_OPEN_CLIP_CFG, _save_tiny_open_clip

    _save_tiny_open_clip(clip_dir, TINY_OPEN_CLIP_CFG, seed=seed)


def test_retrained_clip_weights_at_the_same_path_are_refused(caption_image_folder, tmp_path, tiny_open_clip_dir,
                                                             cache_text_encoder):
    import shutil

    clip_dir = Path(shutil.copytree(tiny_open_clip_dir, tmp_path / "clip"))
    clip = MultiCLIP([(str(clip_dir), "")], device="cpu", batch_size=8)
    cache_dir = tmp_path / "cache"
    _precompute(caption_image_folder, cache_dir, clip, cache_text_encoder, shard_size=100)
    _retrain(clip_dir, seed=5)
    retrained = MultiCLIP([(str(clip_dir), "")], device="cpu", batch_size=8)
    assert retrained.spec == clip.spec  # same path, same dims: the spec alone cannot tell
    with pytest.raises(ValueError, match=r"built with other encoder weights .*open_clip_model\.safetensors.*"
                                         r"another cache_dir \(or delete this one\)"):
        precompute(caption_image_folder, cache_dir, retrained, cache_text_encoder, progress=False, shard_size=100)


def test_weights_content_hash_accepts_touched_files_with_the_same_bytes(caption_image_folder, tmp_path,
                                                                       tiny_open_clip_dir, cache_text_encoder):
    import shutil

    clip_dir = Path(shutil.copytree(tiny_open_clip_dir, tmp_path / "clip"))
    clip = MultiCLIP([(str(clip_dir), "")], device="cpu", batch_size=8)
    cache_dir = tmp_path / "cache"
    _precompute(caption_image_folder, cache_dir, clip, cache_text_encoder, shard_size=100, weights_content_hash=True)
    weights = clip_dir / "open_clip_model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # same bytes, new mtime
    again = _precompute(caption_image_folder, cache_dir, clip, cache_text_encoder, shard_size=100,
                        weights_content_hash=True)
    assert again["last_run"] == {"shards_computed": 0, "shards_reused": 1}
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    with pytest.raises(ValueError, match=r"other encoder weights .*open_clip_model\.safetensors: size=\d+, "
                                         r"mtime_ns=\d+ when the cache was built"):  # size + mtime only: refused
        precompute(caption_image_folder, cache_dir, clip, cache_text_encoder, progress=False, shard_size=100)


def test_cache_of_an_older_version_is_refused(caption_image_folder, tmp_path, cache_clip, cache_text_encoder):
    cache_dir = tmp_path / "cache"
    _precompute(caption_image_folder, cache_dir, cache_clip, cache_text_encoder)
    manifest = json.loads((cache_dir / MANIFEST_NAME).read_text())
    (cache_dir / MANIFEST_NAME).write_text(json.dumps({**manifest, "version": 1}))
    for call in (lambda: load_manifest(cache_dir), lambda: EmbeddingDataset(cache_dir),
                 lambda: precompute(caption_image_folder, cache_dir, cache_clip, cache_text_encoder, progress=False)):
        with pytest.raises(ValueError, match=r"built by an older version .*delete it or use another cache_dir"):
            call()


# ---------------------------------------------------------------------------------------------- corrupt files


def test_truncated_shard_is_named_on_read_and_repaired_by_precompute(caption_image_folder, tmp_path, cache_clip,
                                                                    cache_text_encoder):
    from shifted_diffusion.cache import CacheFileError

    cache_dir = tmp_path / "cache"
    _precompute(caption_image_folder, cache_dir, cache_clip, cache_text_encoder)
    before = load_image_embeddings(cache_dir)
    tokens_before = torch.stack([item["text_tokens"] for item in EmbeddingDataset(cache_dir)])
    shard = cache_dir / "shard_00001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])  # as if the disk filled up
    for call in (lambda: EmbeddingDataset(cache_dir), lambda: EmbeddingDataset(cache_dir, in_memory=True),
                 lambda: load_image_embeddings(cache_dir)):
        with pytest.raises(CacheFileError, match=r"shard_00001\.safetensors.*rerun precompute"):
            call()
    with pytest.warns(UserWarning, match=r"recomputing .*shard_00001"):
        manifest = _precompute(caption_image_folder, cache_dir, cache_clip, cache_text_encoder)
    assert manifest["last_run"] == {"shards_computed": 1, "shards_reused": 3}
    assert torch.equal(load_image_embeddings(cache_dir), before)  # recomputed bit-exactly
    assert torch.equal(torch.stack([item["text_tokens"] for item in EmbeddingDataset(cache_dir)]), tokens_before)


def test_garbage_shard_file_and_record_are_named_and_repaired(caption_image_folder, tmp_path, cache_clip,
                                                              cache_text_encoder):
    from shifted_diffusion.cache import CacheFileError

    cache_dir = tmp_path / "cache"
    _precompute(caption_image_folder, cache_dir, cache_clip, cache_text_encoder)
    records = load_image_records(cache_dir)
    (cache_dir / "shard_00002.json").write_text('{"images": [')  # truncated record
    with pytest.raises(CacheFileError, match=r"shard_00002\.json: unreadable or corrupt shard record.*rerun precompute"):
        load_image_records(cache_dir)
    (cache_dir / "shard_00000.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(CacheFileError, match=r"shard_00000\.safetensors.*rerun precompute"):
        EmbeddingDataset(cache_dir)
    with pytest.warns(UserWarning, match=r"recomputing .*shard_00000") as warned:
        manifest = _precompute(caption_image_folder, cache_dir, cache_clip, cache_text_encoder)
    assert any("shard_00002" in str(w.message) for w in warned)
    assert manifest["last_run"] == {"shards_computed": 2, "shards_reused": 2}
    assert load_image_records(cache_dir) == records and len(EmbeddingDataset(cache_dir)) == len(
        [c for r in records for c in r["captions"]])


def test_corrupt_manifest_is_named_and_rebuilt(caption_image_folder, tmp_path, cache_clip, cache_text_encoder):
    from shifted_diffusion.cache import CacheFileError

    cache_dir = tmp_path / "cache"
    first = _precompute(caption_image_folder, cache_dir, cache_clip, cache_text_encoder)
    (cache_dir / MANIFEST_NAME).write_bytes((cache_dir / MANIFEST_NAME).read_bytes()[:50])
    with pytest.raises(CacheFileError, match=r"manifest\.json: unreadable or corrupt manifest.*rerun precompute"):
        load_manifest(cache_dir)
    with pytest.warns(UserWarning, match=r"manifest\.json is corrupt"):
        second = _precompute(caption_image_folder, cache_dir, cache_clip, cache_text_encoder)
    assert second["last_run"] == {"shards_computed": 0, "shards_reused": 4}  # shards checked by their own records
    assert {k: v for k, v in second.items() if k != "last_run"} == {k: v for k, v in first.items() if k != "last_run"}


# ---------------------------------------------------------------------------------------------- non-finite values


class _NonFiniteClip:
    """``clip`` with NaN image embeddings for each batch's first image and/or inf for one caption."""

    def __init__(self, clip, nan_image=False, inf_caption=None):
        self.clip, self.nan_image, self.inf_caption = clip, nan_image, inf_caption

    def __getattr__(self, name):
        return getattr(self.clip, name)

    def encode_pixels(self, pixels):
        out = self.clip.encode_pixels(pixels).clone()
        if self.nan_image:
            out[0, 3] = float("nan")
        return out

    def encode_text(self, texts):
        out = self.clip.encode_text(texts).clone()
        for i, text in enumerate(texts):
            if text == self.inf_caption:
                out[i, 0] = float("inf")
        return out


def test_non_finite_embeddings_are_refused_when_written(caption_image_folder, tmp_path, cache_clip,
                                                        cache_text_encoder):
    with pytest.raises(ValueError, match=r"shard_00000: .*NaN / inf .*clip_image of 2 image\(s\): img00\.png, "
                                         r"img02\.png"):
        precompute(caption_image_folder, tmp_path / "a", _NonFiniteClip(cache_clip, nan_image=True),
                   cache_text_encoder, shard_size=5, batch_size=3, progress=False)
    assert not (tmp_path / "a" / "shard_00000.json").exists()
    with pytest.raises(ValueError, match=r"shard_00001: .*clip_text of 1 caption\(s\): caption \d+ "
                                         r"\(img05\.png: 'a yellow star'\)"):
        precompute(caption_image_folder, tmp_path / "b", _NonFiniteClip(cache_clip, inf_caption="a yellow star"),
                   cache_text_encoder, shard_size=5, batch_size=3, progress=False)
    assert (tmp_path / "b" / "shard_00000.json").exists() and not (tmp_path / "b" / "shard_00001.json").exists()


def test_non_finite_values_in_a_cache_are_named_when_opened(caption_image_folder, tmp_path, cache_clip,
                                                            cache_text_encoder):
    from safetensors.torch import load_file, save_file

    from shifted_diffusion.cache import CacheFileError

    cache_dir = tmp_path / "cache"
    _precompute(caption_image_folder, cache_dir, cache_clip, cache_text_encoder)
    path = cache_dir / "shard_00001.safetensors"
    tensors = load_file(str(path))
    row = int(tensors["text_offsets"][1]) + 4  # caption 1's fifth stored token row
    tensors["text_tokens"][row, 2] = float("nan")  # a bit flip / a bad encoder after the fact
    save_file(tensors, str(path))
    info = json.loads((cache_dir / "shard_00001.json").read_text())
    owner = [(image["file_name"], c) for image in info["images"] for c in image["captions"]][1]
    for in_memory in (False, True):
        with pytest.raises(CacheFileError, match=rf"shard_00001\.safetensors: tensor text_tokens holds NaN / inf in "
                                                 rf"1 row\(s\): rows 1 \(captions \('{owner[0]}', '{owner[1]}'\)\)"):
            EmbeddingDataset(cache_dir, in_memory=in_memory)
    tensors["text_tokens"][row, 2] = 0.0
    tensors["clip_image"][2, 0] = float("inf")
    save_file(tensors, str(path))
    with pytest.raises(CacheFileError, match=rf"shard_00001\.safetensors: tensor clip_image .*rows 2 \(images "
                                             rf"{info['images'][2]['file_name']}\)"):
        load_image_embeddings(cache_dir)
    with pytest.raises(CacheFileError, match=r"shard_00001\.safetensors: tensor clip_image"):
        EmbeddingDataset(cache_dir)


# ---------------------------------------------------------------------------------------------- 16-bit images


def test_sixteen_bit_images_are_embedded_as_their_8_bit_scaling(tmp_path, cache_clip, cache_text_encoder):
    import numpy as np

    folder = tmp_path / "data"
    folder.mkdir()
    values = (np.add.outer(np.arange(64), np.arange(64)) * (65535 / 126)).round().astype(np.uint16)  # (64, 64)
    Image.fromarray(values).save(folder / "g16.png")
    eight = Image.fromarray(np.floor(values / 257.0 + 0.5).astype(np.uint8)).convert("RGB")  # independent scaling
    precompute(folder, tmp_path / "cache", cache_clip, cache_text_encoder, progress=False, clip_dtype=torch.float32)
    expected = cache_clip.encode_image([eight])[0]
    torch.testing.assert_close(load_image_embeddings(tmp_path / "cache")[0], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache_clip.encode_image([Image.open(folder / "g16.png")])[0], expected,
                               atol=1e-5, rtol=1e-5)
    white = cache_clip.encode_image([Image.fromarray(values).convert("RGB")])[0]  # what convert("RGB") gave
    assert not torch.allclose(white, expected, atol=1e-3)


# ---------------------------------------------------------------------------------------------- storage choices


@pytest.mark.parametrize("masked", [True, False])
def test_only_real_tokens_are_stored_and_padded_back_exactly(caption_image_folder, tmp_path, cache_clip, tiny_t5_dir,
                                                             masked):
    """A masked T5 zeroes its pads: the shard keeps attention_mask.sum() rows per caption, and each item is the
    float16 rounding of the encoder's full (L, E) output. An unmasked T5 keeps all L rows."""
    from safetensors.torch import load_file

    t5 = T5TextEncoder(str(tiny_t5_dir), max_length=20, masked=masked, device="cpu")
    _precompute(caption_image_folder, tmp_path / "c", cache_clip, t5, shard_size=100)
    captions = [c for r in load_image_records(tmp_path / "c") for c in r["captions"]]
    stored = load_file(str(tmp_path / "c" / "shard_00000.safetensors"))
    real = t5.tokenize(captions)["attention_mask"].sum(1)  # (m,) real tokens (the ByT5 bytes + </s>)
    expected_rows = int(real.sum()) if masked else len(captions) * 20
    assert stored["text_tokens"].shape == (expected_rows, 32)
    if masked:
        assert torch.equal(stored["text_offsets"][1:] - stored["text_offsets"][:-1], real)
    dataset = EmbeddingDataset(tmp_path / "c")
    items = [dataset[i] for i in range(len(dataset))]
    full = t5.encode([captions[int(item["caption_index"])] for item in items]).half().float()  # (m, L, E)
    assert torch.equal(torch.stack([item["text_tokens"] for item in items]), full)


def test_text_dtype_is_stored_recorded_and_a_change_recomputes(caption_image_folder, tmp_path, cache_clip,
                                                               cache_text_encoder):
    from safetensors import safe_open

    cache_dir = tmp_path / "cache"
    manifest = _precompute(caption_image_folder, cache_dir, cache_clip, cache_text_encoder, text_dtype=torch.bfloat16)
    assert manifest["text_dtype"] == "bfloat16"
    with safe_open(str(cache_dir / "shard_00000.safetensors"), framework="pt") as f:
        assert f.get_slice("text_tokens").get_dtype() == "BF16"
    dataset = EmbeddingDataset(cache_dir)
    captions = [c for r in load_image_records(cache_dir) for c in r["captions"]]
    item = dataset[0]
    assert torch.equal(item["text_tokens"],
                       cache_text_encoder.encode([captions[int(item["caption_index"])]])[0].bfloat16().float())
    with pytest.warns(UserWarning, match=r"recomputing .*shard_00000.*text_dtype='bfloat16', now 'float16'"):
        manifest = precompute(caption_image_folder, cache_dir, cache_clip, cache_text_encoder, shard_size=5,
                              batch_size=3, progress=False)
    assert manifest["text_dtype"] == "float16" and manifest["last_run"]["shards_reused"] == 0
    with pytest.raises(ValueError, match=r"text_dtype: expected one of"):
        precompute(caption_image_folder, cache_dir, cache_clip, cache_text_encoder, text_dtype=torch.int8)


DISTRIBUTED_EMBEDDING = '''
import os, sys
import torch
import torch.distributed as dist
from shifted_diffusion.cache import precompute
from shifted_diffusion.encoders import CLIPTokenTextEncoder, MultiCLIP

torch.set_num_threads(1)
folder, clip_dir, cache_dir = sys.argv[1:4]
world = int(os.environ.get("WORLD_SIZE", "1"))
if world > 1:
    dist.init_process_group("gloo")
rank = dist.get_rank() if world > 1 else 0
clip = MultiCLIP([(clip_dir, "")], device="cpu", batch_size=4)
text = CLIPTokenTextEncoder(clip_dir, max_length=12, device="cpu")
manifest = precompute(folder, cache_dir, clip, text, shard_size=3, batch_size=2, progress=False,
                      process_index=rank, num_processes=world)
print("rank", rank, "images", manifest["num_images"], "computed", manifest["last_run"]["shards_computed"])
if world > 1:
    dist.destroy_process_group()
'''


@pytest.mark.slow
def test_two_processes_write_the_cache_one_process_writes(caption_image_folder, tiny_open_clip_dir, tmp_path):
    """torchrun with 2 gloo processes: each embeds every other shard; every file (shards, records, manifest,
    null embeddings) is byte for byte the one process's, and both processes return the finished manifest."""
    import subprocess
    import sys

    script = tmp_path / "embed.py"
    script.write_text(DISTRIBUTED_EMBEDDING)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    runs = {"one": [sys.executable, str(script)],
            "two": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                    str(script)]}
    outputs = {}
    for name, command in runs.items():
        child = subprocess.run([*command, str(caption_image_folder), str(tiny_open_clip_dir), str(tmp_path / name)],
                               env=env, capture_output=True, text=True, timeout=300)
        assert child.returncode == 0, child.stderr[-3000:]
        outputs[name] = child.stdout
    num_shards = len(load_manifest(tmp_path / "one")["shards"])
    reports = sorted(line for line in outputs["two"].splitlines() if line.startswith("rank"))
    assert reports == [f"rank {r} images {CAPTION_FOLDER_EXPECTED['num_images']} computed {num_shards}"
                       for r in (0, 1)]
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "two").iterdir())
    assert len([f for f in files if f.startswith("shard_") and f.endswith(".safetensors")]) >= 4
    for name in files:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
