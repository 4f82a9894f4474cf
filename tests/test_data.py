"""Image-folder reading: metadata.jsonl (HF imagefolder), .txt fallback, uncaptioned images, errors."""

import json

import pytest

from conftest import CAPTION_FOLDER_EXPECTED
from shifted_diffusion.data import read_image_folder


def test_reads_metadata_lists_txt_fallback_and_uncaptioned(caption_image_folder):
    records = read_image_folder(caption_image_folder)
    by_name = {r.file_name: r for r in records}
    assert len(records) == CAPTION_FOLDER_EXPECTED["num_files"]
    assert [r.file_name for r in records] == sorted(by_name)
    assert by_name["img00.png"].captions == ("a red circle",)
    assert by_name["img01.png"].captions == ("a blue square", "a square")
    for name in ("img02.png", "img03.png", "img04.png", "img12.png", "img13.png", "img14.png"):
        assert by_name[name].captions == (), name
    assert by_name["img09.png"].captions == ("green triangle", "small green triangle")
    assert by_name["img11.jpg"].captions == ("a jpeg circle",)
    assert by_name["sub/img08.png"].captions == ("in a subfolder",)
    assert by_name["sub/img08.png"].path == caption_image_folder / "sub" / "img08.png"
    # extra fields pass through, the image / caption columns do not
    assert by_name["img07.png"].metadata == {"color": "red", "count": 3}
    assert by_name["sub/img08.png"].metadata == {"color": "purple", "count": 4}
    assert by_name["img12.png"].metadata == {}
    num_captions = sum(len(r.captions) for r in records if r.file_name != "broken.png")
    assert num_captions == CAPTION_FOLDER_EXPECTED["num_captions"]


def test_configurable_columns(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"image": "a.png", "caption": ["x", "y"], "label": 3}) + "\n")
    (record,) = read_image_folder(tmp_path, image_column="image", caption_column="caption")
    assert record.captions == ("x", "y") and record.metadata == {"label": 3}


def test_missing_caption_column_names_column_and_file(caption_image_folder):
    with pytest.raises(ValueError) as info:
        read_image_folder(caption_image_folder, caption_column="caption")
    message = str(info.value)
    assert "'caption'" in message and "metadata.jsonl" in message


def test_missing_image_column_names_column_and_line(caption_image_folder):
    with pytest.raises(ValueError, match=r"metadata.jsonl:1.*'path'"):
        read_image_folder(caption_image_folder, image_column="path")


def test_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no images"):
        read_image_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_image_folder(tmp_path / "nope")


def test_metadata_row_for_a_missing_file_is_kept_for_reporting(tmp_path):
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "gone.png", "text": "lost"}) + "\n")
    (record,) = read_image_folder(tmp_path)
    assert record.file_name == "gone.png" and record.captions == ("lost",) and not record.path.exists()
