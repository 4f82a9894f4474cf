"""Webdataset tar shards as --train_data_dir: indexing, captions, corrupt members, the cache built from tars."""

import io
import json
import tarfile
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from shifted_diffusion import webdata
from shifted_diffusion.cache import load_image_embeddings, load_image_records, match_image_embeddings, precompute
from shifted_diffusion.data import list_image_files, open_rgb, read_image_folder
from shifted_diffusion.decoder_data import load_training_image
from shifted_diffusion.encoders import CLIPTokenTextEncoder, MultiCLIP


def _png(i: int, size=(40, 30)) -> bytes:
    image = Image.new("RGB", size, ((37 * i) % 256, (91 * i) % 256, (53 * i + 20) % 256))
    image.putpixel((i % size[0], 3), (255, 255, 255))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def _samples(start: int, count: int) -> list[tuple[str, bytes]]:
    """img2dataset-style members: even keys caption in .txt, odd keys in .json (with other fields)."""
    members = []
    for i in range(start, start + count):
        key = f"{i:06d}"
        members.append((f"{key}.jpg" if i % 3 == 0 else f"{key}.png", _png(i)))
        if i % 2 == 0:
            members.append((f"{key}.txt", f"caption {i}\nsecond caption {i}\n".encode()))
        else:
            members.append((f"{key}.json", json.dumps({"caption": f"caption {i}", "url": f"u{i}"}).encode()))
    return members


@pytest.fixture
def shards(tmp_path) -> Path:
    folder = tmp_path / "shards"
    folder.mkdir()
    _write_tar(folder / "000000.tar", _samples(0, 4))
    _write_tar(folder / "000001.tar", _samples(4, 3))
    return folder


@pytest.fixture(scope="module")
def clip(tiny_open_clip_dir):
    return MultiCLIP([(str(tiny_open_clip_dir), "")], device="cpu", batch_size=4)


@pytest.fixture(scope="module")
def text_encoder(tiny_open_clip_dir):
    return CLIPTokenTextEncoder(str(tiny_open_clip_dir), max_length=12, device="cpu")


def test_samples_captions_and_metadata_read_in_place(shards):
    records = read_image_folder(shards)
    assert [r.file_name for r in records] == [
        f"{t}/{i:06d}.{'jpg' if i % 3 == 0 else 'png'}" for t, i in
        [("000000.tar", i) for i in range(4)] + [("000001.tar", i) for i in range(4, 7)]]
    assert records[0].captions == ("caption 0", "second caption 0")
    assert records[1].captions == ("caption 1",) and records[1].metadata == {"url": "u1"}
    for i, record in enumerate(records):
        assert isinstance(record.path, webdata.TarMember) and record.path.error is None
        assert record.path.read_bytes() == _png(i)  # the member's bytes, read at its offset
        assert open_rgb(record.path).tobytes() == Image.open(io.BytesIO(_png(i))).convert("RGB").tobytes()
    # the same records through a brace pattern, a single tar and a '::' list
    pattern = str(shards / "{000000..000001}.tar")
    assert [r.file_name for r in read_image_folder(pattern)] == [r.file_name for r in records]
    assert len(read_image_folder(shards / "000001.tar")) == 3
    both = f"{shards / '000001.tar'}::{shards / '000000.tar'}"
    assert [r.file_name for r in read_image_folder(both)][:3] == [r.file_name for r in records][4:]
    assert list_image_files(shards) == [r.path for r in records]


def test_bad_sources_are_named(shards, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"1 of its 3 shard\(s\) do not exist.*000002\.tar"):
        read_image_folder(str(shards / "{000000..000002}.tar"))
    (shards / "x.png").write_bytes(_png(0))
    with pytest.raises(ValueError, match="both .tar shards"):
        read_image_folder(shards)
    gz = tmp_path / "a.tar.gz"
    gz.write_bytes(b"")
    with pytest.raises(ValueError, match="decompress"):
        read_image_folder(gz)


def test_corrupt_members_are_listed_not_dropped(tmp_path):
    good = _samples(0, 2)
    members = good + [("000002.png", b"not a png"), ("000003.txt", b"caption without image"),
                      ("000004.png", _png(4)), ("000004.json", b"{broken"),
                      ("000005.png", _png(5)), ("000005.txt", b"\xff\xfe bad utf-8")]
    _write_tar(tmp_path / "a.tar", members)
    # b.tar: truncated inside the data of its last member
    whole = _write_tar(tmp_path / "full.tar", _samples(10, 2)).read_bytes()
    (tmp_path / "b.tar").write_bytes(whole[:512 * 7 + 20])  # 000011.json: 20 of its 39 bytes
    (tmp_path / "full.tar").unlink()
    # c.tar: a garbage header after its first sample, then another sample that tarfile would never reach
    first = _write_tar(tmp_path / "one.tar", _samples(20, 1)).read_bytes()
    tail = _write_tar(tmp_path / "two.tar", _samples(21, 1)).read_bytes()
    end_of_first = 512 * (1 + -(-len(_png(20)) // 512) + 2)  # header + data of .png, header + data of .txt
    (tmp_path / "c.tar").write_bytes(first[:end_of_first] + b"\x07" * 512 + tail)
    for name in ("one.tar", "two.tar"):
        (tmp_path / name).unlink()

    records = read_image_folder(tmp_path)
    errors = {r.file_name: r.path.error for r in records if r.path.error}
    assert [r.file_name for r in records if not r.path.error] == [
        "a.tar/000000.jpg", "a.tar/000001.png", "a.tar/000002.png", "b.tar/000010.png", "c.tar/000020.png"]
    assert "without an image member" in errors["a.tar/000003"]
    assert "invalid JSON" in errors["a.tar/000004.png"] and "not valid UTF-8" in errors["a.tar/000005.png"]
    assert any("truncated tar" in e for name, e in errors.items() if name.startswith("b.tar/"))
    assert "unreadable tar header at byte" in errors["c.tar"]
    with pytest.raises(ValueError, match="without an image member"):
        open_rgb(next(r.path for r in records if r.file_name == "a.tar/000003"))
    with pytest.raises(Exception):
        open_rgb(next(r.path for r in records if r.file_name == "a.tar/000002.png"))


def test_cache_from_tars_equals_cache_from_the_unpacked_folder(shards, tmp_path, clip, text_encoder):
    records = read_image_folder(shards)
    folder = tmp_path / "unpacked"
    rows = []
    for i, record in enumerate(records):
        target = folder / record.file_name.replace(".tar/", "_")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(record.path.read_bytes())
        rows.append({"file_name": target.name, "text": list(record.captions), **record.metadata})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    kw = dict(shard_size=3, batch_size=2, progress=False, clip_dtype=torch.float32)
    from_tars = precompute(shards, tmp_path / "cache_tars", clip, text_encoder, num_workers=2, **kw)
    from_folder = precompute(folder, tmp_path / "cache_folder", clip, text_encoder, **kw)
    assert from_tars["num_images"] == 7 and from_tars["num_captions"] == from_folder["num_captions"] == 11
    assert from_tars["source"] == str(shards.resolve())
    torch.testing.assert_close(load_image_embeddings(tmp_path / "cache_tars"),
                               load_image_embeddings(tmp_path / "cache_folder"), rtol=0, atol=0)
    assert [r["captions"] for r in load_image_records(tmp_path / "cache_tars")] == \
        [r["captions"] for r in load_image_records(tmp_path / "cache_folder")]
    # a rerun reuses every shard; the decoder's lookup finds the members' rows
    again = precompute(str(shards / "{000000..000001}.tar"), tmp_path / "cache_pattern", clip, text_encoder, **kw)
    assert again["num_images"] == 7
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rerun = precompute(shards, tmp_path / "cache_tars", clip, text_encoder, **kw)
    assert rerun["last_run"] == {"shards_computed": 0, "shards_reused": 3}
    members = [r.path for r in records][::-1]
    matched, why = match_image_embeddings(tmp_path / "cache_tars", clip, members)
    assert why == ""
    torch.testing.assert_close(matched[0], load_image_embeddings(tmp_path / "cache_tars").flip(0))
    assert matched[1].all()


def test_cache_lists_corrupt_samples_and_notices_a_rewritten_tar(tmp_path, clip, text_encoder):
    _write_tar(tmp_path / "a.tar", _samples(0, 3) + [("000009.png", b"garbage")])
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image.*a\.tar/000009\.png"):
        manifest = precompute(tmp_path, tmp_path / "cache", clip, text_encoder, progress=False)
    assert manifest["num_images"] == 3 and manifest["skipped"][0]["file_name"] == "a.tar/000009.png"
    _write_tar(tmp_path / "a.tar", _samples(1, 4))  # rewritten: other samples, other size
    with pytest.warns(UserWarning, match="recomputing"):
        manifest = precompute(tmp_path, tmp_path / "cache", clip, text_encoder, progress=False)
    assert manifest["num_images"] == 4 and manifest["num_skipped"] == 0


def test_decoder_pixels_from_a_member_equal_those_from_the_file(shards, tmp_path):
    member = read_image_folder(shards)[2].path
    path = tmp_path / "x.png"
    path.write_bytes(member.read_bytes())
    torch.testing.assert_close(load_training_image(member, 16, True), load_training_image(path, 16, True),
                               rtol=0, atol=0)
