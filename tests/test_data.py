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


# ---------------------------------------------------------------------------------------------- corner cases


def _png(path, size=(8, 8)):
    from PIL import Image

    Image.new("RGB", size, (10, 20, 30)).save(path)
    return path


def test_duplicate_rows_merge_captions_and_keep_first_fields(tmp_path):
    _png(tmp_path / "a.png")
    rows = [{"file_name": "a.png", "text": "first", "label": 1, "source": "x"},
            {"file_name": "a.png", "text": ["second", "third"], "label": 2, "extra": True}]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.warns(UserWarning, match=r"metadata\.jsonl:2.*'a\.png'.*metadata\.jsonl:1.*label=1.*label=2"):
        (record,) = read_image_folder(tmp_path)
    assert record.captions == ("first", "second", "third")
    assert record.metadata == {"label": 1, "source": "x", "extra": True}


def test_duplicate_rows_across_metadata_files_are_merged(tmp_path):
    (tmp_path / "sub").mkdir()
    _png(tmp_path / "sub" / "b.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "sub/b.png", "text": "from the root"}) + "\n")
    (tmp_path / "sub" / "metadata.jsonl").write_text(json.dumps({"file_name": "b.png", "text": "from sub"}) + "\n")
    (record,) = read_image_folder(tmp_path)
    assert record.file_name == "sub/b.png" and record.captions == ("from the root", "from sub")


@pytest.mark.parametrize("name", ["../outside.png", "sub/../../outside.png", "/etc/passwd", "C:\\x.png", ""])
def test_file_name_leaving_the_folder_is_refused(tmp_path, name):
    data = tmp_path / "data"
    data.mkdir()
    _png(tmp_path / "outside.png")
    _png(data / "a.png")
    lines = [json.dumps({"file_name": "a.png", "text": "ok"}), json.dumps({"file_name": name, "text": "bad"})]
    (data / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"metadata\.jsonl:2: file_name .* must be a relative path inside"):
        read_image_folder(data)


def test_non_utf8_metadata_names_file_and_line(tmp_path):
    _png(tmp_path / "a.png")
    good = json.dumps({"file_name": "a.png", "text": "ok"}).encode()
    bad = '{"file_name": "a.png", "text": "caf\u00e9"}'.encode("latin-1")
    (tmp_path / "metadata.jsonl").write_bytes(good + b"\n" + bad + b"\n")
    with pytest.raises(ValueError, match=r"metadata\.jsonl:2: not valid UTF-8"):
        read_image_folder(tmp_path)


def test_utf8_bom_metadata_is_read(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps({"file_name": "a.png", "text": "x"}).encode())
    assert read_image_folder(tmp_path)[0].captions == ("x",)


def test_non_utf8_txt_caption_is_refused_but_image_listing_warns(tmp_path):
    from shifted_diffusion.data import list_image_files

    _png(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("caf\u00e9 au lait".encode("latin-1"))
    with pytest.raises(ValueError, match=r"caption file .*a\.txt: not valid UTF-8"):
        read_image_folder(tmp_path)
    with pytest.warns(UserWarning, match=r"a\.txt: not valid UTF-8"):
        assert list_image_files(tmp_path) == [tmp_path / "a.png"]


def _gradient16(width=256, height=4):
    import numpy as np

    row = np.linspace(0, 65535, width).round().astype(np.uint16)  # every 16-bit level range, 0 and 65535 included
    return np.repeat(row[None], height, axis=0)  # (H, W) uint16


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I", "png"])
def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path, mode):
    import numpy as np
    from PIL import Image

    from shifted_diffusion.data import open_rgb, to_rgb

    values = _gradient16()
    if mode == "png":  # a real 16-bit PNG file, opened by Pillow
        Image.fromarray(values).save(tmp_path / "g16.png")
        rgb = open_rgb(tmp_path / "g16.png")
    else:
        array = {"I;16": values, "I;16B": values.astype(">u2"), "I": values.astype(np.int32)}[mode]
        image = Image.fromarray(array)
        assert image.mode == mode
        rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == (256, 4)
    expected = np.floor(values.astype(np.float64) / 257.0 + 0.5).astype(np.uint8)  # round(v / 257)
    out = np.asarray(rgb)
    for channel in range(3):
        np.testing.assert_array_equal(out[..., channel], expected)
    assert (out == 255).mean() < 0.01  # convert("RGB") alone makes ~99.6% of it white


@pytest.mark.parametrize("peak, scale", [(1.0, 255.0), (255.0, 1.0), (65535.0, 1 / 257)])
def test_float_images_are_scaled_by_their_range(peak, scale):
    import numpy as np
    from PIL import Image

    from shifted_diffusion.data import to_rgb

    values = np.linspace(0, peak, 64, dtype=np.float32)[None].repeat(2, axis=0)  # (2, 64)
    rgb = np.asarray(to_rgb(Image.fromarray(values)))
    np.testing.assert_array_equal(rgb[..., 1], np.floor(values.astype(np.float64) * scale + 0.5).astype(np.uint8))


def test_to_rgb_keeps_8_bit_images():
    import numpy as np
    from PIL import Image

    from shifted_diffusion.data import to_rgb

    gray = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16))
    np.testing.assert_array_equal(np.asarray(to_rgb(gray))[..., 0], np.asarray(gray))
    rgb = Image.new("RGB", (4, 4), (1, 2, 3))
    assert to_rgb(rgb) is rgb
