"""Encoders: open_clip folder save/load, MultiCLIP (preprocessing, concatenation), T5 / CLIP-token / none."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_OPEN_CLIP_CFG
from shifted_diffusion.encoders import (
    OPEN_CLIP_CONFIG_NAME,
    OPEN_CLIP_WEIGHTS_NAME,
    CLIPTokenTextEncoder,
    MultiCLIP,
    NoTextEncoder,
    T5TextEncoder,
    build_text_encoder,
    load_open_clip,
    save_open_clip,
)


def _open_clip_direct(directory):
    import open_clip

    model = open_clip.create_model("local-dir:" + str(directory))
    return model.eval()


def _clip_preprocess_by_hand(image, size, mean, std):
    """Resize the shortest side to size (bicubic), centre crop size x size, scale to [0, 1], normalise."""
    w, h = image.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    image = image.convert("RGB").resize((new_w, new_h), Image.BICUBIC)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def _wide_test_image(w=120, h=64, seed=0):
    """A non-square image whose left and right margins differ strongly from its centre."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    a[:, : w // 5] = (255, 0, 0)
    a[:, -w // 5:] = (0, 0, 255)
    return Image.fromarray(a)


def test_save_open_clip_writes_open_clip_hub_layout(tiny_open_clip_dir):
    config = json.loads((tiny_open_clip_dir / OPEN_CLIP_CONFIG_NAME).read_text())
    assert config["model_cfg"] == TINY_OPEN_CLIP_CFG
    assert config["preprocess_cfg"]["size"] in (64, [64, 64])
    assert (tiny_open_clip_dir / OPEN_CLIP_WEIGHTS_NAME).is_file()


def test_load_open_clip_local_dir_matches_plain_open_clip(tiny_open_clip_dir):
    import open_clip

    model, preprocess, tokenizer = load_open_clip(str(tiny_open_clip_dir))
    direct = _open_clip_direct(tiny_open_clip_dir)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), direct.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert not model.training
    # and it is not a random init: the weights equal the saved file
    from safetensors.torch import load_file

    saved = load_file(str(tiny_open_clip_dir / OPEN_CLIP_WEIGHTS_NAME))
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    assert tokenizer.context_length == 16
    tokens = tokenizer(["a red circle"])
    assert torch.equal(tokens, open_clip.SimpleTokenizer(context_length=16)(["a red circle"]))
    # "local-dir:" prefix works too
    model2, _, _ = load_open_clip("local-dir:" + str(tiny_open_clip_dir))
    assert torch.equal(model2.visual.conv1.weight, model.visual.conv1.weight)


def test_load_open_clip_builtin_name_with_local_checkpoint(tmp_path, tiny_open_clip_dir):
    import open_clip

    (tmp_path / "ShiftedDiffusionTestTiny.json").write_text(json.dumps(TINY_OPEN_CLIP_CFG))
    open_clip.add_model_config(tmp_path / "ShiftedDiffusionTestTiny.json")
    reference = _open_clip_direct(tiny_open_clip_dir)
    checkpoint = tmp_path / "tiny.pt"
    torch.save(reference.state_dict(), checkpoint)
    model, _, _ = load_open_clip("ShiftedDiffusionTestTiny", str(checkpoint))
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.state_dict().items())
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_open_clip("ShiftedDiffusionTestTiny", str(tmp_path / "missing.pt"))
    # a local folder's weights can be overridden by a checkpoint file
    other = open_clip.CLIP(**TINY_OPEN_CLIP_CFG)
    torch.save(other.state_dict(), tmp_path / "other.pt")
    model, _, _ = load_open_clip(str(tiny_open_clip_dir), str(tmp_path / "other.pt"))
    assert torch.equal(model.visual.conv1.weight, other.visual.conv1.weight)


def test_load_open_clip_folder_without_config_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match=OPEN_CLIP_CONFIG_NAME):
        load_open_clip(str(tmp_path))


def test_multiclip_concatenates_blocks_with_centre_cropped_preprocessing(tiny_open_clip_dir, tiny_open_clip_dir_2):
    from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    clip = MultiCLIP([(str(tiny_open_clip_dir), ""), (str(tiny_open_clip_dir_2), "")], device="cpu", batch_size=2)
    assert clip.block_sizes == [32, 24] and clip.dim == 56
    assert len(clip.transforms) == 2  # 64 px and 48 px models need different transforms
    images = [_wide_test_image(120, 64, 0), _wide_test_image(50, 90, 1), _wide_test_image(64, 64, 2)]
    got = clip.encode_image(images)
    assert got.shape == (3, 56) and got.dtype == torch.float32

    blocks = []
    for directory, size in ((tiny_open_clip_dir, 64), (tiny_open_clip_dir_2, 48)):
        model = _open_clip_direct(directory)
        pixels = torch.stack([_clip_preprocess_by_hand(im, size, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
                              for im in images])
        with torch.no_grad():
            blocks.append(model.encode_image(pixels))
    expected = torch.cat(blocks, dim=-1)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    a, b = clip.split_blocks(got)
    torch.testing.assert_close(a, blocks[0], atol=1e-4, rtol=1e-4)
    assert b.shape == (3, 24)
    # the crop matters: squashing the wide image to a square gives a different embedding
    squashed = images[0].resize((64, 64), Image.BICUBIC)
    assert not torch.allclose(clip.encode_image([squashed])[0, :32], got[0, :32], atol=1e-3)
    # the preprocessed tensor itself is the centre crop
    pixels = clip.preprocess(images[0])[0]
    torch.testing.assert_close(pixels, _clip_preprocess_by_hand(images[0], 64, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD),
                               atol=1e-5, rtol=0)


def test_multiclip_encode_image_tensor_matches_the_pil_path_and_passes_gradients(tiny_open_clip_dir,
                                                                                 tiny_open_clip_dir_2):
    """Square 64 px images as [-1, 1] tensors: the 64 px model's block equals encode_image's (no resize); the 48 px
    model's is close (antialiased bicubic on tensors vs PIL's bicubic); gradients reach the pixels."""
    clip = MultiCLIP([(str(tiny_open_clip_dir), ""), (str(tiny_open_clip_dir_2), "")], device="cpu")
    images = [_wide_test_image(64, 64, k) for k in range(3)]
    pixels = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) for im in images])
    pixels = (pixels / 127.5 - 1.0).requires_grad_(True)
    got = clip.encode_image_tensor(pixels)
    reference = clip.encode_image(images)
    torch.testing.assert_close(got[:, :32], reference[:, :32], atol=1e-4, rtol=1e-4)
    cos = torch.nn.functional.cosine_similarity(got[:, 32:], reference[:, 32:])
    assert bool((cos > 0.98).all()), cos
    got.square().sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0
    assert all(p.grad is None for model in clip.models for p in model.parameters())
    with pytest.raises(ValueError, match=r"expected \(B, 3, H, W\)"):
        clip.encode_image_tensor(pixels[0])


def test_multiclip_encode_text_is_unnormalised_concat(tiny_open_clip_dir, tiny_open_clip_dir_2):
    import open_clip

    clip = MultiCLIP([(str(tiny_open_clip_dir), ""), (str(tiny_open_clip_dir_2), "")], device="cpu", batch_size=2)
    texts = ["a red circle", "two blue squares on the left", ""]
    got = clip.encode_text(texts)
    tokens = open_clip.SimpleTokenizer(context_length=16)(texts)
    with torch.no_grad():
        expected = torch.cat([_open_clip_direct(d).encode_text(tokens)
                              for d in (tiny_open_clip_dir, tiny_open_clip_dir_2)], dim=-1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[:, :32].norm(dim=-1), torch.ones(3))  # not L2-normalised


def test_multiclip_rejects_empty_spec_list():
    with pytest.raises(ValueError, match="specs"):
        MultiCLIP([], device="cpu")


def test_t5_unmasked_equals_plain_t5_without_mask(tiny_t5_dir):
    from transformers import AutoTokenizer, T5EncoderModel

    encoder = T5TextEncoder(str(tiny_t5_dir), max_length=80, device="cpu")
    texts = ["a red circle", "", "three small green triangles in a row"]
    got = encoder.encode(texts)
    assert got.shape == (3, 80, 32) and encoder.dim == 32 and encoder.max_length == 80
    tokenizer = AutoTokenizer.from_pretrained(tiny_t5_dir)
    model = T5EncoderModel.from_pretrained(tiny_t5_dir).eval()
    ids = tokenizer(texts, padding="max_length", max_length=80, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert got[0, -1].abs().sum() > 0  # unmasked: pad positions carry states


def test_t5_masked_zeroes_padding_and_matches_masked_t5(tiny_t5_dir):
    from transformers import AutoTokenizer, T5EncoderModel

    masked = T5TextEncoder(str(tiny_t5_dir), max_length=24, masked=True, device="cpu", batch_size=2)
    unmasked = T5TextEncoder(str(tiny_t5_dir), max_length=24, masked=False, device="cpu")
    texts = ["a red circle", "", "three small green triangles in a row"]  # the last one is truncated
    got = masked.encode(texts)
    tokenizer = AutoTokenizer.from_pretrained(tiny_t5_dir)
    batch = tokenizer(texts, padding="max_length", max_length=24, truncation=True, return_tensors="pt")
    mask = batch.attention_mask.bool()
    assert (~mask).any() and mask[2].all()
    assert torch.all(got[~mask] == 0)
    model = T5EncoderModel.from_pretrained(tiny_t5_dir).eval()
    with torch.no_grad():
        expected = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    torch.testing.assert_close(got[mask], expected[mask], atol=1e-5, rtol=1e-5)
    # without the mask real tokens attend to padding, so the two modes really differ
    assert not torch.allclose(unmasked.encode(texts)[0][mask[0]], got[0][mask[0]], atol=1e-4)


def test_clip_token_encoder_returns_ln_final_states_before_pooling(tiny_open_clip_dir):
    import open_clip

    encoder = CLIPTokenTextEncoder(str(tiny_open_clip_dir), max_length=20, device="cpu")
    texts = ["a red circle", "two blue squares"]
    got = encoder.encode(texts)
    assert got.shape == (2, 20, 64) and encoder.dim == 64 and encoder.max_length == 20
    model = _open_clip_direct(tiny_open_clip_dir)
    tokens = open_clip.SimpleTokenizer(context_length=16)(texts)
    with torch.no_grad():
        x = model.token_embedding(tokens) + model.positional_embedding
        x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))  # (B, 16, 64)
        # pooling the states at the end-of-text token and projecting gives CLIP's sentence embedding
        pooled = x[torch.arange(2), tokens.argmax(dim=-1)] @ model.text_projection
        torch.testing.assert_close(pooled, model.encode_text(tokens), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[:, :16], x, atol=1e-5, rtol=1e-5)
    assert torch.all(got[:, 16:] == 0)  # zero-padded beyond the context length
    short = CLIPTokenTextEncoder(str(tiny_open_clip_dir), max_length=8, device="cpu").encode(texts)
    torch.testing.assert_close(short, x[:, :8], atol=1e-5, rtol=1e-5)


def test_build_text_encoder_dispatch(tiny_open_clip_dir, tiny_t5_dir):
    none = build_text_encoder("none")
    assert isinstance(none, NoTextEncoder) and none.encode(["a", "b"]).shape == (2, 0, 0)
    assert none.max_length == 0 and none.dim == 0
    tokens = build_text_encoder(f"clip-tokens:{tiny_open_clip_dir}", device="cpu")
    assert isinstance(tokens, CLIPTokenTextEncoder) and tokens.max_length == 16
    t5 = build_text_encoder(str(tiny_t5_dir), max_length=12, device="cpu")
    assert isinstance(t5, T5TextEncoder) and t5.encode(["x"]).shape == (1, 12, 32)
    assert t5.spec["max_length"] == 12 and t5.spec["masked"] is False


def test_save_open_clip_rejects_non_config(tmp_path):
    import open_clip

    with pytest.raises(ValueError, match="model_cfg"):
        save_open_clip(open_clip.CLIP(**TINY_OPEN_CLIP_CFG), {"embed_dim": 32}, tmp_path)


def test_low_precision_encoders_stay_close_to_float32(tiny_open_clip_dir, tiny_t5_dir):
    images = [_wide_test_image(96, 64, 3), _wide_test_image(64, 80, 4)]
    texts = ["a red circle", "two blue squares"]
    reference = MultiCLIP([(str(tiny_open_clip_dir), "")], device="cpu")
    t5_reference = T5TextEncoder(str(tiny_t5_dir), max_length=16, device="cpu").encode(texts)
    for dtype in (torch.bfloat16, torch.float16):
        clip = MultiCLIP([(str(tiny_open_clip_dir), "")], device="cpu", dtype=dtype)
        assert {p.dtype for p in clip.models[0].visual.parameters()} >= {dtype}
        for got, want in ((clip.encode_image(images), reference.encode_image(images)),
                          (clip.encode_text(texts), reference.encode_text(texts))):
            assert got.dtype == torch.float32
            assert (got - want).norm() / want.norm() < 3e-2
    t5 = T5TextEncoder(str(tiny_t5_dir), max_length=16, device="cpu", dtype="bf16")
    assert t5.model.dtype == torch.bfloat16
    got = t5.encode(texts)
    assert got.dtype == torch.float32 and (got - t5_reference).norm() / t5_reference.norm() < 3e-2
