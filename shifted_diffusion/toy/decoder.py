"""A toy "Stable Diffusion" for the toy world: tiny AutoencoderKL + UNet2DConditionModel.

The autoencoder is trained here (pixel MSE + a small KL term, as the latent-diffusion autoencoders minus the
perceptual / adversarial terms: flat-coloured shapes need neither). The UNet is *not* trained here: this module
only builds it freshly initialised and writes a standard diffusers StableDiffusionPipeline folder
(unet + trained vae + scheduler, no text encoder) that `finetune.py` fine-tunes like any Stable Diffusion
checkpoint (see train_toy_decoder.py). 64 px images -> 16 x 16 x 4 latents (3 VAE levels, 4x down-sampling).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data import open_rgb, to_rgb

VAE_CONFIG_FILE = "toy_vae.json"


@dataclass(frozen=True)
class ToyDecoderConfig:
    """Sizes and training recipe of the toy decoder (autoencoder + UNet)."""

    # autoencoder: len(vae_channels) - 1 down-samplings (3 levels: 64 px -> 16 x 16 latents)
    vae_channels: tuple = (16, 32, 32)
    vae_layers_per_block: int = 1
    vae_norm_groups: int = 8
    latent_channels: int = 4
    vae_steps: int = 3000
    vae_batch_size: int = 8
    vae_learning_rate: float = 2e-3
    vae_warmup_frac: float = 0.05
    kl_weight: float = 1e-6
    vae_initial_logvar: float = -8.0  # posterior log-variance at init: sampled latents start near the mean
    vae_foreground_weight: float = 10.0  # extra loss weight of object pixels (objects cover ~5-15% of an image)
    vae_images: int = 4096  # world images the autoencoder trains on (the first ones of metadata.jsonl)
    # UNet (trained by finetune.py): cross-attention on `num_tokens` projected image-embedding tokens
    unet_channels: tuple = (32, 64, 64)
    unet_layers_per_block: int = 1
    unet_norm_groups: int = 16
    cross_attention_dim: int = 64
    attention_head_dim: int = 8
    num_tokens: int = 4
    unet_steps: int = 4000
    unet_batch_size: int = 16
    unet_learning_rate: float = 1e-3
    unet_warmup_steps: int = 100
    ema_decay: float = 0.998
    conditioning_dropout_prob: float = 0.1
    # noise schedule: SD's scaled-linear betas, rescaled to zero terminal SNR (Lin et al. 2024) with the
    # v target and "trailing" sampling steps. Without it the last training step keeps sqrt(abar) = 0.068 of
    # the image, enough to leak a 16 x 16 latent's mean colour, and sampling from pure noise gets the
    # background wrong; False: SD's own schedule (epsilon target, "leading" steps).
    zero_terminal_snr: bool = True
    # the text + image decoder (train_toy_decoder.py --decoder_type text_and_image): a text-to-image toy "Stable
    # Diffusion" (the same UNet with cross-attention on the toy text encoder's token states, trained from scratch for
    # text_unet_steps with the UNet settings above; captions dropped with conditioning_dropout_prob), then an
    # IP-Adapter for the image embedding on it (UNet frozen) for adapter_steps
    text_unet_steps: int = 4000
    adapter_steps: int = 1500
    adapter_learning_rate: float = 1e-3
    seed: int = 0

    def __post_init__(self):
        for name in ("vae_channels", "unet_channels"):
            object.__setattr__(self, name, tuple(int(c) for c in getattr(self, name)))
        if len(self.vae_channels) < 1 or len(self.unet_channels) < 2:
            raise ValueError(f"need >= 1 VAE level and >= 2 UNet levels, got vae_channels={self.vae_channels}, "
                             f"unet_channels={self.unet_channels}")
        bad = [c for c in self.vae_channels if c % self.vae_norm_groups] + \
              [c for c in self.unet_channels if c % self.unet_norm_groups]
        if bad:
            raise ValueError(f"channel counts {bad} are not multiples of their GroupNorm groups "
                             f"(vae_norm_groups={self.vae_norm_groups}, unet_norm_groups={self.unet_norm_groups})")

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "ToyDecoderConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown ToyDecoderConfig keys {unknown}")
        return cls(**d)


def fast_decoder_config() -> ToyDecoderConfig:
    """Seconds-long settings for tests: a few steps of each stage on tiny networks."""
    return ToyDecoderConfig(vae_channels=(8, 8, 16), vae_steps=3, vae_batch_size=4, vae_images=32,
                            unet_channels=(16, 16), unet_norm_groups=8, cross_attention_dim=16, attention_head_dim=4,
                            unet_steps=2, unet_batch_size=4, unet_warmup_steps=0, text_unet_steps=2, adapter_steps=2)


# ----------------------------------------------------------------------------------------------
# components


def build_vae(config: ToyDecoderConfig, image_size: int):
    """A freshly initialised AutoencoderKL (no mid-block attention: 16 x 16 latents do not need it)."""
    from diffusers import AutoencoderKL

    levels = len(config.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=config.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        layers_per_block=config.vae_layers_per_block, latent_channels=config.latent_channels,
        norm_num_groups=config.vae_norm_groups, sample_size=image_size, mid_block_add_attention=False,
    )


def build_unet(config: ToyDecoderConfig, image_size: int):
    """A freshly initialised UNet2DConditionModel on the latent grid: plain first level, cross-attention below."""
    from diffusers import UNet2DConditionModel

    levels = len(config.unet_channels)
    if image_size % config.vae_scale_factor:
        raise ValueError(f"image_size {image_size} is not a multiple of the VAE scale factor {config.vae_scale_factor}")
    return UNet2DConditionModel(
        sample_size=image_size // config.vae_scale_factor, in_channels=config.latent_channels,
        out_channels=config.latent_channels, layers_per_block=config.unet_layers_per_block,
        block_out_channels=config.unet_channels,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
        cross_attention_dim=config.cross_attention_dim, attention_head_dim=config.attention_head_dim,
        norm_num_groups=config.unet_norm_groups,
    )


def build_scheduler(zero_terminal_snr: bool = True):
    """Stable Diffusion's DDIM scheduler (scaled-linear betas 0.00085..0.012); with ``zero_terminal_snr`` the
    betas rescaled so that the last step is pure noise, the v target and trailing timesteps, else SD's
    epsilon target and leading steps. The decoder trainer's DDPM noise scheduler reads the same config."""
    from diffusers import DDIMScheduler

    schedule = dict(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction") \
        if zero_terminal_snr else dict(steps_offset=1, prediction_type="epsilon")
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, **schedule)


def write_pretrained_folder(directory, vae, unet, scheduler, text_encoder=None, tokenizer=None) -> Path:
    """A standard StableDiffusionPipeline folder (safety checker None; text encoder and tokenizer when given)."""
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipeline.save_pretrained(str(directory))
    return Path(directory)


# ----------------------------------------------------------------------------------------------
# autoencoder training


def load_world_pixels(world_folder, count: int) -> torch.Tensor:
    """The first `count` images of a world folder as float (N, 3, H, W) in [-1, 1]."""
    lines = (Path(world_folder) / "metadata.jsonl").read_text().splitlines()[:count]
    names = [json.loads(line)["file_name"] for line in lines if line.strip()]
    if not names:
        raise FileNotFoundError(f"{world_folder}/metadata.jsonl lists no images")
    arrays = []
    for name in names:
        arrays.append(np.asarray(open_rgb(Path(world_folder) / name)))
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()  # (N, 3, H, W)
    return pixels / 127.5 - 1.0


def foreground_weights(pixels: torch.Tensor, extra_weight: float, threshold: float = 0.15) -> torch.Tensor:
    """Per-pixel loss weights (B, 1, H, W): 1 + extra_weight where a pixel differs from its image's border colour."""
    border = torch.cat([pixels[..., 0, :], pixels[..., -1, :], pixels[..., :, 0], pixels[..., :, -1]], dim=-1)  # (B, 3, 4W)
    background = border.median(dim=-1).values[..., None, None]  # (B, 3, 1, 1)
    foreground = (pixels - background).abs().amax(dim=1, keepdim=True) > threshold  # (B, 1, H, W)
    return 1.0 + extra_weight * foreground.to(pixels.dtype)


def kl_to_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over latent dims -> (B,)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


def cosine_lr(step: int, total: int, peak: float, warmup_frac: float) -> float:
    """Linear warmup to `peak`, then cosine decay to 0."""
    warmup = max(1, int(round(warmup_frac * total)))
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


@torch.no_grad()
def latent_scaling_factor(vae, pixels: torch.Tensor, batch_size: int = 64) -> float:
    """1 / std of the posterior means: the factor that gives the diffusion model unit-variance latents."""
    means = torch.cat([vae.encode(pixels[i:i + batch_size]).latent_dist.mean for i in range(0, len(pixels), batch_size)])
    return float(1.0 / means.float().std().clamp_min(1e-6))


def train_vae(world_folder, config: ToyDecoderConfig, *, log_every: int = 0):
    """Train the autoencoder on the world's images -> (AutoencoderKL with scaling_factor set, info dict)."""
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    pixels = load_world_pixels(world_folder, config.vae_images)  # (N, 3, H, W)
    vae = build_vae(config, pixels.shape[-1])
    with torch.no_grad():  # quant_conv outputs [mean | logvar]: start with a nearly deterministic posterior
        vae.quant_conv.bias[config.latent_channels:] = config.vae_initial_logvar
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_learning_rate, weight_decay=0.0)
    start, start_cpu = time.time(), time.process_time()
    losses = []
    for step in range(config.vae_steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, config.vae_steps, config.vae_learning_rate, config.vae_warmup_frac)
        batch = pixels[torch.randint(len(pixels), (config.vae_batch_size,), generator=generator)]  # (B, 3, H, W)
        posterior = vae.encode(batch).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(latents).sample  # (B, 3, H, W)
        squared_error = (reconstruction - batch).pow(2)  # (B, 3, H, W)
        mse = squared_error.mean()
        weighted = (squared_error * foreground_weights(batch, config.vae_foreground_weight)).mean()
        loss = weighted + config.kl_weight * kl_to_standard_normal(posterior.mean, posterior.logvar).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        losses.append(float(mse.detach()))
        if log_every and (step + 1) % log_every == 0:
            print(f"vae step {step + 1}/{config.vae_steps} mse {np.mean(losses[-log_every:]):.5f} "
                  f"{time.time() - start:.0f}s", flush=True)
    vae.eval()
    scaling = latent_scaling_factor(vae, pixels[:512])
    vae.register_to_config(scaling_factor=scaling)
    info = {"train_seconds": round(time.time() - start, 1), "train_cpu_seconds": round(time.process_time() - start_cpu, 1),
            "final_mse": float(np.mean(losses[-20:])) if losses else float("nan"), "scaling_factor": scaling,
            "num_images": int(len(pixels))}
    return vae, info


@torch.no_grad()
def reconstruct(vae, images: list) -> list:
    """PIL images -> their autoencoder reconstructions (posterior mean), as PIL images."""
    from PIL import Image

    pixels = torch.from_numpy(np.stack([np.asarray(to_rgb(im)) for im in images])).permute(0, 3, 1, 2)
    x = pixels.float().to(vae.device, vae.dtype) / 127.5 - 1.0
    out = vae.decode(vae.encode(x).latent_dist.mean).sample.float().clamp(-1, 1)
    arrays = ((out + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arrays]


def vae_is_cached(folder, config: ToyDecoderConfig, world_folder) -> bool:
    """True when `folder` holds an autoencoder trained with these settings on this world."""
    path = Path(folder) / VAE_CONFIG_FILE
    if not path.is_file():
        return False
    saved = json.loads(path.read_text())
    world = json.loads((Path(world_folder) / "toy_world.json").read_text())["config"]
    vae_keys = [f.name for f in dataclasses.fields(ToyDecoderConfig) if f.name.startswith(("vae_", "kl_", "latent_"))] + ["seed"]
    wanted = {k: config.to_dict()[k] for k in vae_keys}
    return saved.get("config") == wanted and saved.get("world") == world and saved.get("complete", False)


def ensure_vae(folder, world_folder, config: ToyDecoderConfig, *, log_every: int = 0):
    """The trained autoencoder saved in `folder` (trained now unless cached) and its training info."""
    from diffusers import AutoencoderKL

    folder = Path(folder)
    if vae_is_cached(folder, config, world_folder):
        info = json.loads((folder / VAE_CONFIG_FILE).read_text())
        return AutoencoderKL.from_pretrained(str(folder), use_safetensors=True), info["info"]
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / VAE_CONFIG_FILE
    if marker.exists():
        marker.unlink()
    vae, info = train_vae(world_folder, config, log_every=log_every)
    vae.save_pretrained(str(folder))
    vae_keys = [f.name for f in dataclasses.fields(ToyDecoderConfig) if f.name.startswith(("vae_", "kl_", "latent_"))] + ["seed"]
    world = json.loads((Path(world_folder) / "toy_world.json").read_text())["config"]
    marker.write_text(json.dumps({"config": {k: config.to_dict()[k] for k in vae_keys}, "world": world, "info": info,
                                  "complete": True}, indent=1) + "\n")
    return vae, info
