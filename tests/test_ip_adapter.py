"""The text + image decoder's adapter file (shifted_diffusion.ip_adapter): written by us, loaded by stock
diffusers ``load_ip_adapter`` into a tiny StableDiffusionPipeline, and run with ``ip_adapter_image_embeds``."""

from pathlib import Path

import pytest
import torch

from shifted_diffusion import ip_adapter

CLIP_DIM = 56  # as conftest's two tiny decoder CLIPs (32 + 24)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory, tiny_sd_pipeline, tiny_clip_tokenizer):
    """A tiny SD folder with a text encoder and an offline tokenizer (16 positions, as the text encoder)."""
    from diffusers import StableDiffusionPipeline

    root = tmp_path_factory.mktemp("ip_sd")
    base = tiny_sd_pipeline(root / "base")
    (root / "tok").mkdir()
    tokenizer = tiny_clip_tokenizer(root / "tok", model_max_length=16)
    StableDiffusionPipeline.from_pretrained(base, tokenizer=tokenizer, safety_checker=None,
                                            requires_safety_checker=False).save_pretrained(root / "sd")
    return root / "sd"


def _pipe(folder):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _random_state(unet, seed=0):
    """An adapter with every tensor random (so a wrongly mapped key cannot pass by accident)."""
    g = torch.Generator().manual_seed(seed)
    state = ip_adapter.init_adapter_state(unet, CLIP_DIM, generator=g)
    return {k: torch.randn(v.shape, generator=g) * 0.5 for k, v in state.items()}


def _generate(pipe, seed=0, **kwargs):
    out = pipe("a cat", num_inference_steps=2, guidance_scale=3.0, height=32, width=32, output_type="np",
               generator=torch.Generator().manual_seed(seed), **kwargs)
    return torch.from_numpy(out.images)


def test_init_copies_text_key_values_and_checks_shapes(sd_folder):
    pipe = _pipe(sd_folder)
    names = ip_adapter.cross_attention_processors(pipe.unet)
    assert len(names) == 4 and all(n.endswith("attn2.processor") for n in names)
    state = ip_adapter.init_adapter_state(pipe.unet, CLIP_DIM, generator=torch.Generator().manual_seed(0))
    assert state["image_proj.proj.weight"].shape == (4 * 24, CLIP_DIM)
    attn = pipe.unet.get_submodule(names[1][: -len(".processor")])
    assert torch.equal(state["ip_adapter.3.to_k_ip.weight"], attn.to_k.weight)
    assert torch.equal(state["ip_adapter.3.to_v_ip.weight"], attn.to_v.weight)
    assert ip_adapter.check_adapter_state(state, pipe.unet) == CLIP_DIM
    with pytest.raises(ValueError, match="4 image tokens"):
        ip_adapter.init_adapter_state(pipe.unet, CLIP_DIM, num_tokens=8)
    bad = dict(state)
    del bad["ip_adapter.3.to_v_ip.weight"]
    with pytest.raises(ValueError, match="missing ip_adapter.3.to_v_ip.weight"):
        ip_adapter.check_adapter_state(bad, pipe.unet)
    bad = {**state, "image_proj.norm.bias": torch.zeros(5)}
    with pytest.raises(ValueError, match="image_proj.norm.bias has shape"):
        ip_adapter.check_adapter_state(bad, pipe.unet)


def test_stock_load_ip_adapter_reads_our_file_and_runs(sd_folder, tmp_path):
    text_only = _pipe(sd_folder)
    pipe = _pipe(sd_folder)
    state = _random_state(pipe.unet)
    path = ip_adapter.save_adapter(state, tmp_path / "adapter")
    assert path.name == "ip_adapter.safetensors"
    pipe.load_ip_adapter(str(tmp_path / "adapter"), subfolder="", weight_name=ip_adapter.ADAPTER_WEIGHT_NAME,
                         image_encoder_folder=None)

    # (a) the stock loader put every one of our tensors where we said
    proj = pipe.unet.encoder_hid_proj.image_projection_layers[0]
    assert torch.equal(proj.image_embeds.weight, state["image_proj.proj.weight"])
    assert torch.equal(proj.image_embeds.bias, state["image_proj.proj.bias"])
    assert torch.equal(proj.norm.weight, state["image_proj.norm.weight"])
    assert torch.equal(proj.norm.bias, state["image_proj.norm.bias"])
    processors = pipe.unet.attn_processors
    for k, name in enumerate(ip_adapter.cross_attention_processors(pipe.unet)):
        assert torch.equal(processors[name].to_k_ip[0].weight, state[f"ip_adapter.{2 * k + 1}.to_k_ip.weight"])
        assert torch.equal(processors[name].to_v_ip[0].weight, state[f"ip_adapter.{2 * k + 1}.to_v_ip.weight"])
    read_back = ip_adapter.adapter_state_from_unet(pipe.unet)
    assert read_back.keys() == state.keys() and all(torch.equal(read_back[k], state[k]) for k in state)

    # (b) it generates, deterministically; the image embedding matters; scale 0 is the text-only pipeline
    g = torch.Generator().manual_seed(3)
    embeds, other = torch.randn(1, CLIP_DIM, generator=g) * 3, torch.randn(1, CLIP_DIM, generator=g) * 3
    guided = ip_adapter.pipeline_image_embeds(embeds, guidance=True)
    assert guided[0].shape == (2, 1, CLIP_DIM) and torch.equal(guided[0][0], torch.zeros(1, CLIP_DIM))
    a = _generate(pipe, ip_adapter_image_embeds=guided)
    b = _generate(pipe, ip_adapter_image_embeds=guided)
    c = _generate(pipe, ip_adapter_image_embeds=ip_adapter.pipeline_image_embeds(other, guidance=True))
    assert a.shape == (1, 32, 32, 3) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3
    pipe.set_ip_adapter_scale(0.0)
    zero = _generate(pipe, ip_adapter_image_embeds=guided)
    reference = _generate(text_only)
    assert torch.allclose(zero, reference, atol=1e-6)
    assert (a - reference).abs().max() > 1e-3


def test_pipeline_image_embeds_layout():
    embeds = torch.arange(6.0).view(2, 3)
    (plain,) = ip_adapter.pipeline_image_embeds(embeds, guidance=False)
    assert plain.shape == (2, 1, 3) and torch.equal(plain[:, 0], embeds)
    (guided,) = ip_adapter.pipeline_image_embeds(embeds, guidance=True, negative=torch.ones(3))
    negative, positive = guided.chunk(2)  # what prepare_ip_adapter_image_embeds does
    assert torch.equal(positive[:, 0], embeds) and torch.equal(negative, torch.ones(2, 1, 3))
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        ip_adapter.pipeline_image_embeds(embeds[None], guidance=True)


def test_attach_adapter_matches_stock_loader(sd_folder, tmp_path):
    stock, ours = _pipe(sd_folder), _pipe(sd_folder)
    state = _random_state(stock.unet, seed=1)
    ip_adapter.save_adapter(state, tmp_path)
    stock.load_ip_adapter(str(tmp_path), subfolder="", weight_name=ip_adapter.ADAPTER_WEIGHT_NAME,
                          image_encoder_folder=None)
    ip_adapter.attach_adapter(ours.unet, ip_adapter.load_adapter_state(Path(tmp_path) / "ip_adapter.safetensors"))
    params = ip_adapter.adapter_parameters(ours.unet)
    assert sum(p.numel() for p in params) == sum(v.numel() for v in state.values())
    embeds = ip_adapter.pipeline_image_embeds(torch.randn(1, CLIP_DIM), guidance=True)
    assert torch.equal(_generate(stock, ip_adapter_image_embeds=embeds),
                       _generate(ours, ip_adapter_image_embeds=embeds))
    with pytest.raises(ValueError, match="no IP-Adapter attached"):
        ip_adapter.adapter_parameters(_pipe(sd_folder).unet)
