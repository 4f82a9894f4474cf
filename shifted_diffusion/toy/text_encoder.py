"""The toy "Stable Diffusion"'s text encoder: the tiny CLIP's text tower as a transformers ``CLIPTextModel``, with a
``CLIPTokenizer`` that tokenizes exactly as open_clip does.

open_clip's text tower is OpenAI's CLIP text transformer (token + position embedding, pre-LN residual blocks
under a causal mask, final LayerNorm), which is what ``CLIPTextModel`` computes, so the conversion is a renaming
of weights (the fused ``in_proj`` split into q / k / v). The tokenizer files are built from the BPE merges
open_clip ships (the same 49,408-token vocabulary, in the same id order), so the ids and ``last_hidden_state``
equal open_clip's up to each caption's end token; after it the tokenizer pads with the end token as Stable
Diffusion's does (open_clip pads with id 0, a printable symbol that a transformers tokenizer would then split out
of captions as a special token). A Stable Diffusion pipeline then
takes the pair as its ``tokenizer`` / ``text_encoder`` and its UNet's ``cross_attention_dim`` is the tower's width.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# open_clip text-tower options that change the token states and that CLIPTextModel has no counterpart for,
# with their plain values
UNSUPPORTED = {"ls_init_value": None, "no_causal_mask": False, "embed_cls": False, "hf_model_name": None,
               "pre_norm": False}


def write_tokenizer_files(folder) -> Path:
    """vocab.json and merges.txt of open_clip's BPE (ids as open_clip numbers them) in ``folder``."""
    import open_clip.tokenizer as oc

    lines = gzip.open(oc.default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]  # open_clip's (and OpenAI's) slice of the merge list
    symbols = list(oc.bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


def build_tokenizer(folder, context_length: int):
    """A ``CLIPTokenizer`` over open_clip's BPE padding to ``context_length`` (files written to ``folder``)."""
    from transformers import CLIPTokenizer

    folder = write_tokenizer_files(folder)
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), bos_token=BOS, eos_token=EOS,
                         unk_token=EOS, pad_token=EOS, model_max_length=context_length)


def text_model_from_open_clip(model, model_cfg: dict):
    """The text tower of an open_clip ``CLIP`` (its ``model_cfg``: text_cfg, quick_gelu) as a ``CLIPTextModel``
    (token states and pooled end-token state; open_clip's ``text_projection`` is not part of it, as Stable
    Diffusion's text encoder reads only the token states)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    text_cfg = model_cfg["text_cfg"]
    odd = {k: text_cfg[k] for k, plain in UNSUPPORTED.items() if text_cfg.get(k, plain) != plain}
    if odd:
        raise ValueError(f"open_clip -> CLIPTextModel: text_cfg {odd} has no CLIPTextModel counterpart "
                         f"(supported: {', '.join(f'{k}={v}' for k, v in UNSUPPORTED.items())})")
    width, layers = int(text_cfg["width"]), int(text_cfg["layers"])
    block = model.transformer.resblocks[0]
    config = CLIPTextConfig(
        vocab_size=model.token_embedding.num_embeddings, hidden_size=width,
        intermediate_size=block.mlp.c_fc.out_features, num_hidden_layers=layers,
        num_attention_heads=int(text_cfg["heads"]), max_position_embeddings=model.positional_embedding.shape[0],
        hidden_act="quick_gelu" if model_cfg.get("quick_gelu") else "gelu", layer_norm_eps=model.ln_final.eps,
        projection_dim=int(model_cfg["embed_dim"]), bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    state = {"embeddings.token_embedding.weight": model.token_embedding.weight,
             "embeddings.position_embedding.weight": model.positional_embedding,
             "final_layer_norm.weight": model.ln_final.weight,
             "final_layer_norm.bias": model.ln_final.bias}
    for i, block in enumerate(model.transformer.resblocks):
        prefix = f"encoder.layers.{i}."
        for name, weight, bias in zip(("q_proj", "k_proj", "v_proj"), block.attn.in_proj_weight.chunk(3),
                                      block.attn.in_proj_bias.chunk(3)):
            state[f"{prefix}self_attn.{name}.weight"], state[f"{prefix}self_attn.{name}.bias"] = weight, bias
        pairs = {"self_attn.out_proj": block.attn.out_proj, "layer_norm1": block.ln_1, "layer_norm2": block.ln_2,
                 "mlp.fc1": block.mlp.c_fc, "mlp.fc2": block.mlp.c_proj}
        for name, module in pairs.items():
            state[f"{prefix}{name}.weight"], state[f"{prefix}{name}.bias"] = module.weight, module.bias
    text_model = CLIPTextModel(config)
    missing, unexpected = text_model.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"open_clip -> CLIPTextModel: missing {missing}, unexpected {unexpected}")
    return text_model.eval()


def toy_text_encoder(clip_dir, tokenizer_dir):
    """(tokenizer, CLIPTextModel) of the toy CLIP saved in ``clip_dir`` (``encoders.save_open_clip``'s folder); the
    tokenizer's files go to ``tokenizer_dir``."""
    from ..encoders import OPEN_CLIP_CONFIG_NAME, load_open_clip
    from ..files import read_json

    model, _, _ = load_open_clip(str(clip_dir))
    model_cfg = read_json(Path(clip_dir) / OPEN_CLIP_CONFIG_NAME, "the toy CLIP's open_clip config")["model_cfg"]
    context_length = int(model_cfg["text_cfg"]["context_length"])
    return build_tokenizer(tokenizer_dir, context_length), text_model_from_open_clip(model, model_cfg)
