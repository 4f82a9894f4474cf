"""The toy text encoder: open_clip's text tower as a transformers CLIPTextModel + CLIPTokenizer, checked against
open_clip's own tokenizer and token states (``CLIPTokenTextEncoder``), before and after save / from_pretrained."""

import pytest
import torch

from shifted_diffusion.encoders import CLIPTokenTextEncoder, load_open_clip
from shifted_diffusion.toy.text_encoder import toy_text_encoder

CAPTIONS = ["a small red circle at the top left on a blue background", "", "A Big  GREEN star, centre!",
            "square " * 30, "a cross"]


@pytest.fixture(scope="module")
def converted(tiny_open_clip_dir, tmp_path_factory):
    return toy_text_encoder(tiny_open_clip_dir, tmp_path_factory.mktemp("tokenizer"))


def _upto_end(ids: torch.Tensor) -> torch.Tensor:
    """(B, L) mask of the positions up to and including each row's first end token."""
    first_end = (ids == 49407).int().argmax(dim=1, keepdim=True)
    return torch.arange(ids.shape[1])[None] <= first_end


def test_tokenizer_gives_open_clips_ids_up_to_the_end_token(converted, tiny_open_clip_dir):
    tokenizer, _ = converted
    _, _, reference = load_open_clip(str(tiny_open_clip_dir))
    ids = tokenizer(CAPTIONS, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    expected = reference(CAPTIONS)
    assert tokenizer.model_max_length == 16 and ids.shape == expected.shape
    mask = _upto_end(expected)
    assert torch.equal(ids[mask], expected[mask]) and ids[~mask].eq(49407).all()  # then padded with the end token
    assert ids[1, :2].tolist() == [49406, 49407] and ids[3, -1] == 49407  # "" and a truncated caption


def test_hidden_states_equal_open_clips_token_states_and_survive_from_pretrained(converted, tiny_open_clip_dir,
                                                                                tmp_path):
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer, model = converted
    expected = CLIPTokenTextEncoder(str(tiny_open_clip_dir)).encode(CAPTIONS)  # (5, 16, 64)
    ids = tokenizer(CAPTIONS, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
    mask = _upto_end(ids)
    with torch.no_grad():
        got = model(ids).last_hidden_state
    torch.testing.assert_close(got[mask], expected[mask], rtol=1e-5, atol=1e-5)
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    model.save_pretrained(tmp_path / "text_encoder")
    tokenizer2 = CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")
    model2 = CLIPTextModel.from_pretrained(tmp_path / "text_encoder")
    ids2 = tokenizer2(CAPTIONS, padding="max_length", max_length=tokenizer2.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
    assert torch.equal(ids2, ids)
    with torch.no_grad():
        torch.testing.assert_close(model2(ids2).last_hidden_state, got)


def test_a_tower_option_without_a_counterpart_is_refused(tiny_open_clip_dir):
    from shifted_diffusion.toy.text_encoder import text_model_from_open_clip

    model, _, _ = load_open_clip(str(tiny_open_clip_dir))
    cfg = {"embed_dim": 32, "text_cfg": {"width": 64, "layers": 1, "heads": 2, "context_length": 16,
                                         "no_causal_mask": True}}
    with pytest.raises(ValueError, match=r"'no_causal_mask': True.*no CLIPTextModel counterpart"):
        text_model_from_open_clip(model, cfg)
