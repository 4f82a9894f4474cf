"""Toy world generator: determinism, caching, caption/attribute consistency, pixels match attributes."""

import dataclasses
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from shifted_diffusion.toy import (
    ATTRIBUTES,
    ToyWorldConfig,
    generate_world,
    load_attributes,
    mentioned_attribute_accuracy,
    nearest_neighbour_attributes,
    unmentioned_diversity,
)
from shifted_diffusion.toy.evaluate import attribute_prompts, heldout_images, normalized_entropy
from shifted_diffusion.toy.world import COLOUR_RGB, POSITION_NAMES, caption_variants

SMALL = ToyWorldConfig(num_images=60, seed=3)
POSITION_WORDS = {"top", "middle", "bottom", "left", "centre", "right"}


def _rows(folder):
    return [json.loads(line) for line in open(folder / "metadata.jsonl")]


def _pixels(folder, row):
    return np.asarray(Image.open(folder / row["file_name"]).convert("RGB")).astype(np.int64)


def _words(text):
    return set(re.findall(r"[a-z]+", text))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(tmp_path_factory.mktemp("toy") / "world", SMALL)


def test_same_seed_same_world_different_seed_different(world, tmp_path):
    from pathlib import Path

    world = Path(world)
    again = Path(generate_world(tmp_path / "again", dataclasses.replace(SMALL, num_workers=2)))
    other = Path(generate_world(tmp_path / "other", dataclasses.replace(SMALL, seed=4)))
    assert _rows(world) == _rows(again)  # parallel generation changes nothing
    for row in _rows(world):
        assert np.array_equal(_pixels(world, row), _pixels(again, row))
    assert [r["text"] for r in _rows(world)] != [r["text"] for r in _rows(other)]
    differing = sum(not np.array_equal(_pixels(world, a), _pixels(other, b))
                    for a, b in zip(_rows(world), _rows(other)))
    assert differing == len(_rows(world))


def test_cached_world_is_not_rewritten_and_changed_config_is(tmp_path):
    config = ToyWorldConfig(num_images=8)
    folder = generate_world(tmp_path / "w", config)
    meta = tmp_path / "w" / "metadata.jsonl"
    stamp = meta.stat().st_mtime_ns
    generate_world(folder, config)
    assert meta.stat().st_mtime_ns == stamp
    generate_world(folder, dataclasses.replace(config, num_images=9))
    assert len(meta.read_text().splitlines()) == 9
    info = json.loads((tmp_path / "w" / "toy_world.json").read_text())
    assert info["config"]["num_images"] == 9 and info["complete"]


def test_metadata_is_an_imagefolder_readable_by_the_data_module(world):
    from pathlib import Path

    from shifted_diffusion.data import read_image_folder

    rows = _rows(Path(world))
    records = read_image_folder(world)
    assert [r.file_name for r in records] == [row["file_name"] for row in rows]
    assert [r.captions for r in records] == [(row["text"],) for row in rows]
    assert records[0].metadata["attributes"] == rows[0]["attributes"]
    assert records[0].metadata["mentioned"] == rows[0]["mentioned"]
    assert Image.open(records[0].path).size == (SMALL.image_size, SMALL.image_size)


def test_captions_mention_exactly_the_mentioned_attributes(world):
    from pathlib import Path

    rows = _rows(Path(world))
    mention_counts = dict.fromkeys(ATTRIBUTES, 0)
    for row in rows:
        words = _words(row["text"])
        assert 1 <= len(row["mentioned"]) and set(row["mentioned"]) <= set(ATTRIBUTES)
        for a in ATTRIBUTES:
            value = row["attributes"][a]
            assert value in SMALL.values(a)
            every_value_word = set().union(*(_words(v) for v in SMALL.values(a)))
            if a in row["mentioned"]:
                mention_counts[a] += 1
                assert re.search(rf"\b{value}\b", row["text"]), (a, row)
                # no other value of the attribute is named
                others = every_value_word - _words(value) - (POSITION_WORDS if a == "position" else set())
                assert not (words & others), (a, row)
            else:
                assert not (words & every_value_word), (a, row)
        if "position" not in row["mentioned"]:
            assert not (words & POSITION_WORDS), row
    assert all(count > 0 for count in mention_counts.values()), mention_counts
    # one caption fits many images: some captions leave attributes unmentioned
    assert sum(len(r["mentioned"]) < len(ATTRIBUTES) for r in rows) > len(rows) // 2


def test_background_never_equals_object_colour_even_with_shared_palette():
    from shifted_diffusion.toy.world import sample_record

    config = ToyWorldConfig(num_images=300, colours=("red", "blue", "green"), backgrounds=("red", "blue"))
    pairs = [(r["attributes"]["colour"], r["attributes"]["background"])
             for r in (sample_record(config, i) for i in range(config.num_images))]
    assert all(c != b for c, b in pairs)
    assert {b for c, b in pairs} == {"red", "blue"}


def test_pixels_show_the_object_colour_position_size_and_background(world):
    from pathlib import Path

    rows = _rows(Path(world))
    tol = SMALL.colour_jitter + 6
    areas = {}
    for row in rows:
        px = _pixels(Path(world), row)
        attrs = row["attributes"]
        obj = np.abs(px - np.array(COLOUR_RGB[attrs["colour"]])).max(-1) <= tol
        bg = np.abs(px - np.array(COLOUR_RGB[attrs["background"]])).max(-1) <= tol
        assert bg.mean() > 0.5, row  # background fills most of the image
        assert obj.sum() >= 30, row  # the object is drawn in its colour
        # its centroid is in the named grid cell (image cut in thirds)
        ys, xs = np.nonzero(obj)
        row_idx, col_idx = divmod(POSITION_NAMES.index(attrs["position"]), 3)
        size = SMALL.image_size
        assert int(ys.mean() * 3 // size) == row_idx and int(xs.mean() * 3 // size) == col_idx, row
        areas.setdefault((attrs["shape"], attrs["size"]), []).append(obj.sum())
    for shape in SMALL.shapes:
        if (shape, "small") in areas and (shape, "large") in areas:
            assert min(areas[(shape, "large")]) > 1.8 * max(areas[(shape, "small")]), shape


def test_shapes_differ_in_pixels():
    from shifted_diffusion.toy.world import render_image, sample_record

    config = ToyWorldConfig(num_images=1, colour_jitter=0, position_jitter=0, size_jitter=0, rotation_jitter=0)
    record = sample_record(config, 0)
    masks = {}
    for shape in config.shapes:
        rec = {**record, "attributes": {**record["attributes"], "shape": shape}}
        px = np.asarray(render_image(config, rec)).astype(np.int64)
        masks[shape] = np.abs(px - np.array(COLOUR_RGB[rec["attributes"]["colour"]])).max(-1) <= 40
    for a in config.shapes:
        for b in config.shapes:
            if a < b:
                iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
                assert iou < 0.85, (a, b, iou)


def test_longest_caption_fits_the_clip_context():
    import open_clip

    from shifted_diffusion.toy import ToyClipConfig

    tokenizer = open_clip.tokenizer.SimpleTokenizer()
    config = ToyWorldConfig()
    # BPE splits words independently, so the longest caption uses each attribute's longest value
    longest_value = {a: max(config.values(a), key=lambda v: len(tokenizer.encode(v))) for a in ATTRIBUTES}
    longest = 0
    for a in ATTRIBUTES:
        for value in config.values(a):
            attrs = {**longest_value, a: value}
            for text in caption_variants(attrs, ATTRIBUTES):
                longest = max(longest, len(tokenizer.encode(text)))
    assert longest + 2 <= ToyClipConfig().context_length  # + start/end tokens


def test_zero_shot_prompts_name_one_value_each():
    config = ToyWorldConfig()
    for a in ATTRIBUTES:
        prompts = attribute_prompts(config, a)
        assert len(prompts) == len(config.values(a))
        for value, variants in zip(config.values(a), prompts):
            for text in variants:
                assert re.search(rf"\b{value}\b", text)
                others = [v for v in config.values(a) if v != value and not re.search(rf"\b{v}\b", value)]
                assert not any(re.search(rf"\b{v}\b", text) for v in others), (text, others)


def test_heldout_images_are_new_samples(world):
    from pathlib import Path

    images, attributes = heldout_images(SMALL, 5)
    first = _pixels(Path(world), _rows(Path(world))[0])
    assert all(not np.array_equal(np.asarray(im), first) for im in images)
    assert set(attributes) == set(ATTRIBUTES) and all(v.shape == (5,) for v in attributes.values())


def test_load_attributes_matches_metadata(world):
    from pathlib import Path

    rows = _rows(Path(world))
    attrs = load_attributes(world)
    for i in (0, 17, len(rows) - 1):
        for j, a in enumerate(ATTRIBUTES):
            assert attrs["values"][a][int(attrs[a][i])] == rows[i]["attributes"][a]
            assert bool(attrs["mentioned"][i, j]) == (a in rows[i]["mentioned"])
    assert attrs["text"] == [r["text"] for r in rows]


def test_nearest_neighbour_and_mentioned_accuracy_by_hand():
    reference = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    reference_attrs = {a: torch.tensor([0, 1, 2]) for a in ATTRIBUTES}
    query = torch.tensor([[5.0, 0.1], [0.2, 3.0], [-1.0, -0.5], [0.9, 0.0]])  # cosine ignores norm
    pred = nearest_neighbour_attributes(query, reference, reference_attrs)
    assert pred["shape"].tolist() == [0, 1, 2, 0]
    true = {a: torch.tensor([0, 1, 1, 1]) for a in ATTRIBUTES}
    mentioned = torch.zeros(4, len(ATTRIBUTES), dtype=torch.bool)
    mentioned[:, 0] = torch.tensor([True, True, True, False])  # shape: 2 of 3 right
    mentioned[:, 1] = True  # colour: 2 of 4 right
    acc = mentioned_attribute_accuracy(pred, true, mentioned)
    assert acc["shape"] == pytest.approx(2 / 3) and acc["colour"] == pytest.approx(0.5)
    assert np.isnan(acc["size"])
    with pytest.raises(ValueError, match="mentioned"):
        mentioned_attribute_accuracy(pred, true, mentioned[:, :3])


def test_entropy_and_unmentioned_diversity():
    assert normalized_entropy(torch.tensor([0, 1, 2, 3]), 4) == pytest.approx(1.0)
    assert normalized_entropy(torch.tensor([2, 2, 2]), 4) == pytest.approx(0.0)
    assert normalized_entropy(torch.tensor([0, 0, 1, 1]), 4) == pytest.approx(np.log(2) / np.log(4))
    pred = {a: torch.tensor([0, 1, 0, 0]) for a in ATTRIBUTES}
    group = torch.tensor([0, 0, 1, 1])
    mentioned = torch.zeros(4, len(ATTRIBUTES), dtype=torch.bool)
    mentioned[2:, 0] = True  # caption 1 mentions the shape
    div = unmentioned_diversity(pred, group, mentioned, dict.fromkeys(ATTRIBUTES, 2))
    assert div["shape"] == pytest.approx(1.0)  # only caption 0 counts: values {0, 1}
    assert div["colour"] == pytest.approx(0.5)  # mean of 1.0 and 0.0
