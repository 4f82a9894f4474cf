"""process_img.py's work (``shifted_diffusion.resize``): centre crop + LANCZOS resize over a nested folder,
corrupt files, skip-if-done, refused destinations; the script itself (its flags, its messages) in a child
process."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shifted_diffusion.resize import center_crop_resize, resize_tree

ROOT = Path(__file__).resolve().parents[1]


def _banded(width, height, band):
    """Red band left/top, blue band right/bottom (each `band` px), green centre."""
    array = np.zeros((height, width, 3), np.uint8)
    array[...] = (0, 255, 0)
    if width > height:
        array[:, :band] = (255, 0, 0)
        array[:, width - band:] = (0, 0, 255)
    else:
        array[:band, :] = (255, 0, 0)
        array[height - band:, :] = (0, 0, 255)
    return Image.fromarray(array)


@pytest.fixture
def tree(tmp_path):
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    _banded(60, 40, 10).save(src / "wide.png")  # centre crop removes exactly the two bands
    _banded(30, 50, 10).save(src / "a" / "tall.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (37, 53, 3), np.uint8)).save(src / "a" / "b" / "noise.jpg")
    (src / "a" / "b" / "noise.txt").write_text("a caption")
    (src / "a" / "broken.jpg").write_bytes(b"this is not a jpeg")
    return src, tmp_path / "dest"


def test_center_crop_pixels_match_direct_crop():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 70, 3), np.uint8))
    out = center_crop_resize(image, 40)
    expected = np.asarray(image)[:, 15:55]  # (70 - 40) / 2 = 15 columns cut on each side
    np.testing.assert_array_equal(np.asarray(out), expected)
    odd = center_crop_resize(image.crop((0, 0, 41, 40)), 40)  # 41 wide: floor((41-40)/2)=0 left
    np.testing.assert_array_equal(np.asarray(odd), np.asarray(image)[:, 0:40])


def test_process_tree(tree, capsys):
    src, dest = tree
    counts = resize_tree(src, dest, size=16, num_workers=2)
    assert counts["total"] == 4 and counts["done"] == 3 and counts["failed"] == 1 and counts["skipped"] == 0
    assert counts["captions_copied"] == 1
    assert str(src / "a" / "broken.jpg") in capsys.readouterr().err  # reported on stderr by default
    for rel in ["wide.png", "a/tall.png", "a/b/noise.jpg"]:
        with Image.open(dest / rel) as image:
            assert image.size == (16, 16)
    assert not (dest / "a" / "broken.jpg").exists()
    assert (dest / "a" / "b" / "noise.txt").read_text() == "a caption"
    for rel in ["wide.png", "a/tall.png"]:  # the coloured bands lie outside the centre crop
        pixels = np.asarray(Image.open(dest / rel).convert("RGB")).astype(int)
        assert np.abs(pixels - np.array([0, 255, 0])).max() <= 2, rel

    before = (dest / "wide.png").stat().st_mtime_ns
    again = resize_tree(src, dest, size=16, num_workers=1)
    assert again["skipped"] == 3 and again["done"] == 0 and again["failed"] == 1
    assert (dest / "wide.png").stat().st_mtime_ns == before


def test_empty_source_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no images"):
        resize_tree(tmp_path / "empty", tmp_path / "out", size=8)
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        resize_tree(tmp_path / "missing", tmp_path / "out", size=8)


@pytest.mark.parametrize("size,workers,message", [(0, 1, "--size must be positive, got 0"),
                                                  (8, 0, "--num must be positive, got 0")])
def test_bad_size_or_worker_count_is_refused(tree, size, workers, message):
    src, dest = tree
    with pytest.raises(ValueError, match=message):
        resize_tree(src, dest, size=size, num_workers=workers)
    assert not dest.exists()


def test_malformed_captions_do_not_matter(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _banded(20, 10, 2).save(src / "x.png")
    (src / "metadata.jsonl").write_text('{"file_name": "x.png", "caption": "not the text column"}\n')
    counts = resize_tree(src, tmp_path / "dest", size=8)
    assert counts["done"] == 1 and (tmp_path / "dest" / "x.png").is_file()


def test_sixteen_bit_source_is_scaled_not_whitened(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    values = np.repeat(np.linspace(0, 65535, 16).round().astype(np.uint16)[None], 16, axis=0)  # (16, 16) gradient
    Image.fromarray(values).save(src / "g16.png")
    counts = resize_tree(src, tmp_path / "dest", size=16)
    assert counts["done"] == 1
    out = np.asarray(Image.open(tmp_path / "dest" / "g16.png").convert("RGB"))
    expected = np.floor(values / 257.0 + 0.5).astype(np.uint8)  # same size: no resampling, exact scaling
    np.testing.assert_array_equal(out[..., 0], expected)
    np.testing.assert_array_equal(out[..., 2], expected)


@pytest.mark.parametrize("inside", [".", "out", "a/out"])
def test_dest_inside_src_is_refused(tree, inside):
    src, _ = tree
    with pytest.raises(ValueError, match=r"--dest .* is inside --src"):
        resize_tree(src, src / inside, size=8)
    assert not (src / "out").exists()


def test_unwritable_dest_fails_once_up_front(tree, tmp_path, capsys):
    src, _ = tree
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match=r"--dest .*a_file.*out is not writable"):
        resize_tree(src, blocker / "out", size=8)
    assert "could not" not in capsys.readouterr().err  # one clear error, not one per image


def test_write_failure_names_the_destination(tree):
    src, dest = tree
    dest.mkdir()
    (dest / "a").write_text("a file where the sub-folder a/ should go")  # a/tall.png, a/b/noise.jpg cannot be written
    messages = []
    counts = resize_tree(src, dest, size=8, copy_captions=False, report=messages.append)
    assert counts["done"] == 1 and counts["unwritable"] == 2 and counts["unreadable"] == 1 and counts["failed"] == 3
    assert counts["captions_copied"] == 0 and len(messages) == 3
    err = "\n".join(messages)
    assert f"could not write {dest / 'a' / 'tall.png'} (from {src / 'a' / 'tall.png'})" in err
    assert f"could not read {src / 'a' / 'broken.jpg'}" in err


def test_script_flags_summary_and_refusals(tree):
    """process_img.py as a user runs it: the summary line, failures on stderr, refusals as one message and
    exit status 1, flag errors from argparse (status 2)."""
    src, dest = tree

    def run(*flags):
        return subprocess.run([sys.executable, "process_img.py", *flags], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)

    done = run("--src", str(src), "--dest", str(dest), "--size", "8", "--num", "1")
    assert done.returncode == 0, done.stderr
    assert "4 images under" in done.stdout and "3 written" in done.stdout and "1 unreadable" in done.stdout
    assert "1 caption files copied" in done.stdout and "(8x8)" in done.stdout
    assert f"process_img: could not read {src / 'a' / 'broken.jpg'}" in done.stderr
    with Image.open(dest / "wide.png") as image:
        assert image.size == (8, 8)
    inside = run("--src", str(src), "--dest", str(src / "out"), "--size", "8", "--num", "1")
    assert inside.returncode == 1 and "process_img: --dest" in inside.stderr and "is inside --src" in inside.stderr
    bad = run("--src", str(src), "--dest", str(dest), "--size", "0")
    assert bad.returncode == 2 and "--size must be positive, got 0" in bad.stderr
