"""The GAN decoder (shifted_diffusion.gan): networks at two resolutions, the modulated convolution and the losses
against hand computations, both players' losses falling when each trains alone, training through finetune.py
(output folder, exact resume), save -> load -> the same images, and test.py / sft_test.py loading it plainly."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from shifted_diffusion.decoder import load_decoder
from shifted_diffusion.decoder_training import parse_decoder_config, train_decoder
from shifted_diffusion.gan.decoder import GanDecoder
from shifted_diffusion.gan.losses import contrastive_loss, perturb_conditioning, r1_penalty, reconstruction_loss
from shifted_diffusion.gan.networks import Discriminator, Generator, modulated_conv2d, normalize_blocks
from shifted_diffusion.gan.training import discriminator_step_index, gan_loss, is_discriminator_step

BLOCKS = (5, 3)
TINY = dict(clip_dim=8, block_sizes=BLOCKS, channel_base=128, channel_max=16)


def tiny_generator(resolution=8, **extra):
    torch.manual_seed(0)
    return Generator(resolution=resolution, z_dim=6, w_dim=10, mapping_layers=2, **TINY, **extra)


@pytest.mark.parametrize("resolution", [8, 16])
def test_shapes_and_dependence_on_embedding_and_z(resolution):
    generator = tiny_generator(resolution)
    discriminator = Discriminator(resolution=resolution, **TINY)
    z, c = torch.randn(4, 6), torch.randn(4, 8)
    images = generator(z, c, noise_mode="const")
    assert images.shape == (4, 3, resolution, resolution)
    logits, features = discriminator(images, c)
    assert logits.shape == (4,) and features.shape == (4, 8)
    # the image depends on the embedding and on z
    assert (generator(z, c + torch.randn(4, 8), noise_mode="const") - images).abs().mean() > 1e-3
    assert (generator(torch.randn(4, 6), c, noise_mode="const") - images).abs().mean() > 1e-3
    # a row does not depend on the others (no batch coupling in the generator)
    assert torch.allclose(generator(z[:1], c[:1], noise_mode="const"), images[:1], atol=1e-5)
    with pytest.raises(ValueError, match=r"image_embeds: expected \(4, 8\)"):
        generator(z, torch.randn(4, 7))
    with pytest.raises(ValueError, match="power of two"):
        Generator(resolution=12, **TINY)


def test_modulated_conv_against_a_per_sample_convolution():
    g = torch.Generator().manual_seed(0)
    x, weight, styles = torch.randn(3, 4, 5, 5, generator=g), torch.randn(6, 4, 3, 3, generator=g), \
        torch.rand(3, 4, generator=g) + 0.5
    for demodulate in (False, True):
        out = modulated_conv2d(x, weight, styles, demodulate)
        for b in range(3):
            w = weight * styles[b][None, :, None, None]
            if demodulate:
                w = w / torch.sqrt((w ** 2).sum(dim=(1, 2, 3), keepdim=True) + 1e-8)
            expected = F.conv2d(x[b:b + 1], w, padding=1)
            assert torch.allclose(out[b:b + 1], expected, atol=1e-5)


def test_losses_against_hand_computations():
    # R1 of a linear discriminator D(x) = sum(a * x) is ||a||^2 for every sample
    a = torch.randn(3, 4, 4)
    images = torch.randn(5, 3, 4, 4, requires_grad=True)
    logits = (images * a).sum(dim=(1, 2, 3))
    assert r1_penalty(logits, images).item() == pytest.approx(float((a ** 2).sum()), rel=1e-5)
    # InfoNCE written out with loops
    g = torch.Generator().manual_seed(1)
    u, v, tau = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g), 0.5
    total = 0.0
    for i in range(4):
        scores = [float(F.cosine_similarity(u[i], v[j], dim=0)) / tau for j in range(4)]
        total += -(scores[i] - math.log(sum(math.exp(s) for s in scores)))
    assert contrastive_loss(u, v, tau).item() == pytest.approx(total / 4, rel=1e-5)
    # the perturbation: unit rows; level 0 is the normalised input; the cosine to the input falls with the level
    c = torch.randn(200, 16, generator=g)
    assert torch.allclose(perturb_conditioning(c, 0.0), F.normalize(c, dim=-1), atol=1e-6)
    cosines = [float(F.cosine_similarity(perturb_conditioning(c, level, g), c).mean()) for level in (0.1, 0.5, 0.75)]
    assert cosines[0] > cosines[1] > cosines[2] > 0
    assert torch.allclose(perturb_conditioning(c, 0.75, g).norm(dim=-1), torch.ones(200), atol=1e-5)
    # per-block normalisation: each block counts equally
    blocks = normalize_blocks(torch.tensor([[3.0, 4.0, 0.0, 0.0, 0.0, 10.0, 0.0, 0.0]]), BLOCKS)
    assert torch.allclose(blocks, torch.tensor([[0.6, 0.8, 0, 0, 0, 1.0, 0, 0]]) / math.sqrt(2))


class _Config:
    """The GAN settings gan_loss reads (DecoderTrainConfig's gan_* fields)."""
    gan_perturbation, gan_contrastive_temperature, gan_r1_gamma, gan_r1_interval = 0.1, 0.5, 1.0, 2
    gan_d_contrastive_weight, gan_clip_contrastive_weight = 1.0, 0.0
    gan_adversarial_weight, gan_reconstruction_weight, gan_generator_warmup_steps = 1.0, 0.0, 0


def test_generator_input_from_style_starts_as_the_constant_and_learns_a_layout():
    plain, styled = tiny_generator(8), tiny_generator(8, input_from_style=True)
    z, c = torch.randn(4, 6), torch.randn(4, 8)
    # created last and zero: the same weights and images as StyleGAN2's constant input at initialisation
    assert torch.equal(plain(z, c, noise_mode="const"), styled(z, c, noise_mode="const"))
    assert {"input_affine.weight", "input_affine.bias"} <= set(styled.state_dict())
    assert "input_affine.weight" not in plain.state_dict()
    # the 4x4 input is const + A [w, c]: written out for a nonzero A
    with torch.no_grad():
        styled.input_affine.weight.normal_()
    w, c_norm = styled.map(z, c)
    style_input = torch.cat([w, c_norm], dim=1)
    expected = styled.const[None] + (style_input @ styled.input_affine.weight.T).view(4, *styled.const.shape)
    seen = {}
    hook = styled.convs[0].register_forward_hook(lambda module, args, out: seen.setdefault("x", args[0]))
    styled(z, c, noise_mode="const")
    hook.remove()
    assert torch.allclose(seen["x"], expected, atol=1e-5)
    assert (styled(z, c, noise_mode="const") - plain(z, c, noise_mode="const")).abs().mean() > 1e-3


def test_phases_with_a_generator_warm_up():
    # 3 warm-up steps of G alone, then D, G, D, G ...; without a loss that reads D, never a D step
    assert [is_discriminator_step(s, 3) for s in range(8)] == [False, False, False, True, False, True, False, True]
    assert [is_discriminator_step(s) for s in range(4)] == [True, False, True, False]
    assert not any(is_discriminator_step(s, 0, adversarial=False) for s in range(6))
    assert [discriminator_step_index(s, 3) for s in (3, 5, 7)] == [0, 1, 2]


def test_reconstruction_loss_and_the_warm_up_step():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    expected = sum(float(x - y) ** 2 for x, y in zip(a.flatten(), b.flatten())) / a.numel()
    assert reconstruction_loss(a, b).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="one shape"):
        reconstruction_loss(a, b[:, :, :2])

    class Warm(_Config):
        gan_reconstruction_weight, gan_generator_warmup_steps = 2.5, 4

    generator, discriminator = tiny_generator(8), Discriminator(resolution=8, **TINY)
    batch = {"pixel_values": torch.rand(4, 3, 8, 8, generator=g) * 2 - 1,
             "image_embeds": torch.randn(4, 8, generator=g)}
    loss = gan_loss(Warm, generator, discriminator, None, batch, 2, torch.Generator().manual_seed(9), "cpu")
    loss.backward()
    # the same draws by hand: the perturbed conditioning, z, then the generator's noise
    rng = torch.Generator().manual_seed(9)
    condition = perturb_conditioning(normalize_blocks(batch["image_embeds"], BLOCKS), Warm.gan_perturbation, rng)
    z = torch.randn(4, 6, generator=rng)
    with torch.no_grad():
        fake = generator(z, condition, generator=rng)
    assert loss.item() == pytest.approx(2.5 * float(((fake - batch["pixel_values"]) ** 2).mean()), rel=1e-5)
    assert all(p.grad is None for p in discriminator.parameters())  # the warm-up never reads D
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in generator.parameters())


def test_each_player_lowers_its_loss_when_it_trains_alone():
    torch.manual_seed(0)
    generator, discriminator = tiny_generator(8), Discriminator(resolution=8, **TINY)
    g = torch.Generator().manual_seed(3)
    batch = {"pixel_values": torch.rand(8, 3, 8, 8, generator=g) * 2 - 1,
             "image_embeds": torch.randn(8, 8, generator=g)}

    def run(step_parity, params, steps=30):
        optimizer = torch.optim.Adam(params, lr=2e-3, betas=(0.0, 0.99))
        values = []
        for k in range(steps):
            rng = torch.Generator().manual_seed(100)  # the same z / perturbation each step: a fixed objective
            step = 2 * k + step_parity + 1
            loss = gan_loss(_Config, generator, discriminator, None, batch, step, rng, "cpu")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            values.append(loss.item())
        return values

    d_values = run(-1, list(discriminator.parameters()))  # even steps (no R1 at odd half-steps): D alone
    assert d_values[-1] < 0.7 * d_values[0]
    g_values = run(0, list(generator.parameters()))  # odd steps: G alone, against the trained D
    assert g_values[-1] < 0.7 * g_values[0]
    assert is_discriminator_step(0) and not is_discriminator_step(1)


@pytest.fixture(scope="module")
def gan_world(tmp_path_factory, tiny_decoder_clips, small_images):
    root = tmp_path_factory.mktemp("gan")
    small_images(root / "images", count=10)
    return {"images": root / "images", "clips": tiny_decoder_clips(root), "root": root}


def _gan_args(world, out, *extra):
    return ["--decoder_type", "gan", "--train_data_dir", str(world["images"]), "--clip_models", *world["clips"],
            "--resolution", "16", "--center_crop", "--train_batch_size", "4", "--learning_rate", "2e-3",
            "--lr_warmup_steps", "0", "--adam_beta1", "0", "--adam_beta2", "0.99", "--adam_weight_decay", "0",
            "--max_grad_norm", "1000", "--gan_z_dim", "8", "--gan_w_dim", "16", "--gan_mapping_layers", "2",
            "--gan_channel_base", "256", "--gan_channel_max", "16", "--gan_r1_interval", "2",
            "--num_validation_images", "2", "--report_to", "none", "--seed", "0", "--output_dir", str(out), *extra]


def test_train_save_load_and_exact_resume(gan_world, tmp_path):
    out = train_decoder(parse_decoder_config(_gan_args(gan_world, tmp_path / "run", "--max_train_steps", "6",
                                                       "--checkpointing_steps", "4", "--validation_steps", "6",
                                                       "--use_ema", "--ema_decay", "0.9")))
    config = json.loads((out / "shifted_decoder.json").read_text())
    assert config["decoder_type"] == "gan" and config["clip_dim"] == 56 and config["resolution"] == 16
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["global_step"] == 6 and np.isfinite(summary["last_train_loss"])
    from PIL import Image

    with Image.open(out / "validation" / "step-0000006.png") as grid:
        assert grid.size == (3 * 16, 2 * 16)  # 2 held-out images x [image | two generations]
    checkpoint = out / "checkpoint-4"
    assert {"generator.safetensors", "discriminator.safetensors"} <= {p.name for p in checkpoint.iterdir()}

    # load through the decoders' loader: the same images for the same seeds, one row independent of the batch
    decoder = load_decoder(out)
    assert isinstance(decoder, GanDecoder) and decoder.clip_dim == 56
    embeds = torch.randn(3, 56, generator=torch.Generator().manual_seed(0))
    seeds = lambda: [torch.Generator().manual_seed(s) for s in (1, 2, 3)]  # noqa: E731
    first = [np.asarray(im) for im in decoder.generate(embeds, generator=seeds())]
    again = [np.asarray(im) for im in load_decoder(out).generate(embeds, generator=seeds())]
    assert all(np.array_equal(a, b) for a, b in zip(first, again)) and first[0].shape == (16, 16, 3)
    alone = decoder.generate(embeds[1:2], generator=[torch.Generator().manual_seed(2)])
    assert np.abs(np.asarray(alone[0]).astype(int) - first[1].astype(int)).max() <= 1
    with pytest.raises(ValueError, match="makes 16 x 16 images"):
        decoder.generate(embeds, height=32)

    # resuming from checkpoint-4 reaches the uninterrupted run's weights
    import shutil

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(checkpoint, resumed / "checkpoint-4")
    train_decoder(parse_decoder_config(_gan_args(gan_world, resumed, "--max_train_steps", "6", "--checkpointing_steps",
                                                 "4", "--use_ema", "--ema_decay", "0.9",
                                                 "--resume_from_checkpoint", "latest")))
    a = load_file(str(out / "generator" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(resumed / "generator" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_scripts_load_the_gan_folder_without_flags(gan_world, tmp_path, tiny_clip_prior):
    """test.py (image -> CLIP -> generator) and sft_test.py (caption -> prior -> generator) on the folder."""
    from shifted_diffusion import image_to_image

    out = train_decoder(parse_decoder_config(_gan_args(gan_world, tmp_path / "run", "--max_train_steps", "2",
                                                       "--validation_steps", "0")))
    written = image_to_image.main(["--decoder", str(out), "--images", str(gan_world["images"]), "--output_dir",
                                   str(tmp_path / "recon"), "--device", "cpu"])
    pngs = [p for p in written if Path(p).name != "grid.png"]
    assert pngs and all(Image_size(p) == (16, 16) for p in pngs)

    from shifted_diffusion import text_to_image

    tiny_clip_prior(tmp_path / "prior", gan_world["clips"])
    written = text_to_image.main(["--prior", str(tmp_path / "prior"), "--decoder", str(out), "--prompt", "a cat",
                                  "--num_images", "2", "--prior_num_inference_steps", "2", "--output_dir",
                                  str(tmp_path / "t2i"), "--device", "cpu"])
    pngs = [p for p in written if Path(p).name != "grid.png"]
    assert len(pngs) == 2 and all(Image_size(p) == (16, 16) for p in pngs)


def Image_size(path):
    from PIL import Image

    with Image.open(path) as image:
        return image.size


def test_generator_warm_up_run_leaves_d_alone_and_resumes_exactly(gan_world, tmp_path):
    """--gan_generator_warmup_steps with the reconstruction loss and the style-driven input: D keeps its initial
    weights through the warm-up, the generator folder records its input, and a run resumed inside the warm-up
    reaches the uninterrupted run's weights."""
    import shutil

    from shifted_diffusion.gan.training import build_networks

    extra = ["--max_train_steps", "5", "--checkpointing_steps", "2", "--validation_steps", "0",
             "--gan_generator_warmup_steps", "3", "--gan_reconstruction_weight", "1", "--gan_input_from_style",
             "--gan_d_adam_beta1", "0.5", "--gan_clip_contrastive_weight", "0"]
    cfg = parse_decoder_config(_gan_args(gan_world, tmp_path / "run", *extra))
    out = train_decoder(cfg)
    assert json.loads((out / "generator" / "config.json").read_text())["input_from_style"] is True
    _, fresh_d = build_networks(cfg, 56, (24, 32))
    at_2 = load_file(str(out / "checkpoint-2" / "discriminator.safetensors"))
    assert all(torch.equal(at_2[k], v) for k, v in fresh_d.state_dict().items())
    at_4 = load_file(str(out / "checkpoint-4" / "discriminator.safetensors"))  # step 3 was D's first
    assert any(not torch.equal(at_4[k], v) for k, v in fresh_d.state_dict().items())

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    train_decoder(parse_decoder_config(_gan_args(gan_world, resumed, *extra, "--resume_from_checkpoint", "latest")))
    a = load_file(str(out / "generator" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(resumed / "generator" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gan_settings_are_checked():
    from shifted_diffusion.decoder_training import DecoderTrainConfig

    zero = dict(gan_adversarial_weight=0.0, gan_d_contrastive_weight=0.0, gan_clip_contrastive_weight=0.0)
    with pytest.raises(ValueError, match="generator has no loss.*--gan_reconstruction_weight"):
        DecoderTrainConfig(decoder_type="gan", **zero)
    assert DecoderTrainConfig(decoder_type="gan", gan_reconstruction_weight=1.0, **zero).gan_adversarial_weight == 0
    with pytest.raises(ValueError, match="--gan_d_adam_beta1"):
        DecoderTrainConfig(decoder_type="gan", gan_d_adam_beta1=1.0)
    with pytest.raises(ValueError, match="--gan_generator_warmup_steps: expected an integer >= 0"):
        DecoderTrainConfig(decoder_type="gan", gan_generator_warmup_steps=-1)
    with pytest.raises(ValueError, match="--gan_reconstruction_weight"):
        DecoderTrainConfig(decoder_type="gan", gan_reconstruction_weight=-1.0)
    with pytest.raises(ValueError, match="--gan_generator_warmup_steps 5: the warm-up .* both are off"):
        DecoderTrainConfig(decoder_type="gan", gan_generator_warmup_steps=5, gan_clip_contrastive_weight=0.0)
    # D's own beta1 goes to D's parameter group only
    from shifted_diffusion.gan.training import build_optimizer

    cfg = DecoderTrainConfig(decoder_type="gan", adam_beta1=0.9, adam_beta2=0.99, gan_d_adam_beta1=0.0)
    generator, discriminator = tiny_generator(8), Discriminator(resolution=8, **TINY)
    groups = build_optimizer(cfg, generator, discriminator).param_groups
    assert groups[0]["betas"] == (0.9, 0.99) and groups[1]["betas"] == (0.0, 0.99)
    assert len(groups[1]["params"]) == len(list(discriminator.parameters()))
    same = build_optimizer(DecoderTrainConfig(decoder_type="gan", adam_beta1=0.5), generator, discriminator)
    assert same.param_groups[1]["betas"][0] == 0.5


def test_every_discriminator_weight_gets_a_gradient_without_the_feature_loss():
    """DDP needs a gradient for every weight on every step: the feature head must stay in D's graph at weight 0."""

    class NoFeatures(_Config):
        gan_d_contrastive_weight, gan_r1_gamma = 0.0, 0.0

    generator, discriminator = tiny_generator(8), Discriminator(resolution=8, **TINY)
    g = torch.Generator().manual_seed(5)
    batch = {"pixel_values": torch.rand(4, 3, 8, 8, generator=g) * 2 - 1,
             "image_embeds": torch.randn(4, 8, generator=g)}
    loss = gan_loss(NoFeatures, generator, discriminator, None, batch, 0, torch.Generator().manual_seed(1), "cpu")
    loss.backward()
    assert all(p.grad is not None for p in discriminator.parameters())
    assert float(discriminator.features_head.weight.grad.abs().sum()) == 0.0
