"""The GAN decoder's networks (StyleGAN2-style, written for this package; no custom CUDA ops).

Generator: a mapping network from (z, conditioning) to the style vector w (both inputs normalised to unit second
moment, then an MLP with equalised learning rate and a learning-rate multiplier, ``mapping_lr_mul``: StyleGAN2's
0.01 by default); a synthesis network from a learned 4x4 constant up to ``resolution``: per resolution two
modulated / demodulated 3x3 convolutions (the second resolution onward upsamples first), per-pixel noise with a
learned strength, and a skip architecture (each resolution's RGB output, a modulated 1x1 convolution without
demodulation, is added to the upsampled sum). As in Lafite, every layer's style affine also reads the conditioning
directly (``concat(w, c)``), not only through w.
Truncation at inference: ``w = w_avg + psi (w - w_avg)`` with ``w_avg`` tracked during training. With
``input_from_style`` the 4x4 input is the constant plus a linear map of ``concat(w, c)`` (zero at initialisation, so
training starts from StyleGAN2's constant): the conditioning can place the layout at the coarsest level directly.

Discriminator: residual blocks from ``resolution`` down to 4x4 (two 3x3 convolutions, 2x average-pool down, a 1x1
skip, sum scaled by sqrt(1/2)), a minibatch standard-deviation channel, a 3x3 convolution and a fully connected
layer giving features h; the logit is ``out(h) + <proj(c), h> / sqrt(dim h)`` (a projection discriminator), and
``features`` maps h into the conditioning space for the contrastive loss.

Conditioning c: the (un-normalised) image embedding of the decoder's CLIP, normalised here per CLIP block (one
block per CLIP model) so that each model counts equally; shapes: z (B, z_dim), c (B, clip_dim), images (B, 3, R, R)
in [-1, 1].
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

LRELU_GAIN = math.sqrt(2.0)


def normalize_2nd_moment(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return x * (x.square().mean(dim=1, keepdim=True) + eps).rsqrt()


def normalize_blocks(c: torch.Tensor, block_sizes: Sequence[int]) -> torch.Tensor:
    """Each CLIP block of (B, D) scaled to unit norm, the concatenation scaled to unit norm again."""
    blocks = torch.split(c.float(), list(block_sizes), dim=-1)
    out = torch.cat([F.normalize(b, dim=-1) for b in blocks], dim=-1)
    return out / math.sqrt(len(blocks))


def channels_at(resolution: int, channel_base: int, channel_max: int) -> int:
    return max(1, min(channel_base // resolution, channel_max))


def _check_resolution(resolution: int) -> int:
    if resolution < 4 or resolution & (resolution - 1):
        raise ValueError(f"resolution: expected a power of two >= 4, got {resolution}")
    return int(math.log2(resolution))


class EqualLinear(torch.nn.Module):
    """Linear layer with equalised learning rate: weights stored N(0, 1) / lr_mul, scaled at run time."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bias_init: float = 0.0,
                 lr_mul: float = 1.0, activation: bool = False):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(out_features, in_features) / lr_mul)
        self.bias = torch.nn.Parameter(torch.full((out_features,), float(bias_init) / lr_mul)) if bias else None
        self.weight_gain, self.lr_mul, self.activation = lr_mul / math.sqrt(in_features), lr_mul, activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias * self.lr_mul if self.bias is not None else None
        x = F.linear(x, self.weight * self.weight_gain, bias)
        return F.leaky_relu(x, 0.2) * LRELU_GAIN if self.activation else x


class EqualConv2d(torch.nn.Module):
    """Convolution with equalised learning rate (same padding), optional 2x average-pool down after it."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True,
                 activation: bool = False, down: bool = False):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = torch.nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        self.activation, self.down, self.padding = activation, down, kernel_size // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.weight * self.weight_gain, self.bias, padding=self.padding)
        if self.down:
            x = F.avg_pool2d(x, 2)
        return F.leaky_relu(x, 0.2) * LRELU_GAIN if self.activation else x


def modulated_conv2d(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, demodulate: bool) -> torch.Tensor:
    """x (B, I, H, W), weight (O, I, k, k), styles (B, I) -> (B, O, H, W): the convolution with per-sample weights
    ``w * s`` (scaled along I), demodulated to unit output variance (``w' / sqrt(sum w'^2 + 1e-8)`` over I, k, k)
    when asked. Computed without per-sample weights: the input is scaled by s, one shared convolution runs, and the
    output is scaled by the demodulation coefficients ``rsqrt(s^2 @ sum_kk w^2 + 1e-8)`` (B, O): the same function
    as the grouped convolution over per-sample weights, with one weight tensor for the whole batch."""
    kernel = weight.shape[-1]
    out = F.conv2d(x * styles[:, :, None, None].to(x.dtype), weight.to(x.dtype), padding=kernel // 2)
    if demodulate:  # in float32 whatever the autocast (the 1e-8 underflows in fp16)
        with torch.autocast(x.device.type, enabled=False):
            coefficients = (styles.float().square() @ weight.float().square().sum(dim=(2, 3)).T + 1e-8).rsqrt()
        out = out * coefficients[:, :, None, None].to(out.dtype)  # (B, O)
    return out


class SynthesisLayer(torch.nn.Module):
    """Modulated 3x3 convolution (optionally after a 2x bilinear upsample) + noise + bias + leaky ReLU."""

    def __init__(self, in_channels: int, out_channels: int, style_dim: int, resolution: int, up: bool = False):
        super().__init__()
        self.affine = EqualLinear(style_dim, in_channels, bias_init=1.0)
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, 3, 3))
        self.weight_gain = 1.0 / math.sqrt(in_channels * 9)
        self.bias = torch.nn.Parameter(torch.zeros(out_channels))
        self.noise_strength = torch.nn.Parameter(torch.zeros([]))
        self.register_buffer("noise_const", torch.randn(resolution, resolution))
        self.up, self.resolution = up, resolution

    def forward(self, x: torch.Tensor, style_input: torch.Tensor, noise_mode: str = "random",
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if self.up:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        styles = self.affine(style_input) * self.weight_gain
        x = modulated_conv2d(x, self.weight, styles, demodulate=True)
        if noise_mode == "random":
            noise = torch.randn(x.shape[0], 1, self.resolution, self.resolution, device=x.device, dtype=x.dtype,
                                generator=generator)
            x = x + noise * self.noise_strength
        elif noise_mode == "const":
            x = x + self.noise_const.to(x.dtype) * self.noise_strength
        elif noise_mode != "none":
            raise ValueError(f"noise_mode: expected random, const or none, got {noise_mode!r}")
        return F.leaky_relu(x + self.bias[None, :, None, None], 0.2) * LRELU_GAIN


class ToRGB(torch.nn.Module):
    """Modulated 1x1 convolution to RGB (no demodulation) + bias."""

    def __init__(self, in_channels: int, style_dim: int):
        super().__init__()
        self.affine = EqualLinear(style_dim, in_channels, bias_init=1.0)
        self.weight = torch.nn.Parameter(torch.randn(3, in_channels, 1, 1))
        self.weight_gain = 1.0 / math.sqrt(in_channels)
        self.bias = torch.nn.Parameter(torch.zeros(3))

    def forward(self, x: torch.Tensor, style_input: torch.Tensor) -> torch.Tensor:
        styles = self.affine(style_input) * self.weight_gain
        return modulated_conv2d(x, self.weight, styles, demodulate=False) + self.bias[None, :, None, None]


class Generator(ModelMixin, ConfigMixin):
    """(z (B, z_dim), image embedding (B, clip_dim)) -> images (B, 3, resolution, resolution) in about [-1, 1]."""

    @register_to_config
    def __init__(self, clip_dim: int = 1536, block_sizes: Sequence[int] = (512, 512, 512), resolution: int = 256,
                 z_dim: int = 512, w_dim: int = 512, mapping_layers: int = 8, channel_base: int = 16384,
                 channel_max: int = 512, w_avg_beta: float = 0.995, input_from_style: bool = False,
                 mapping_lr_mul: float = 0.01):
        super().__init__()
        levels = _check_resolution(resolution)
        if sum(block_sizes) != clip_dim:
            raise ValueError(f"block_sizes {list(block_sizes)} must sum to clip_dim {clip_dim}")
        if min(z_dim, w_dim, mapping_layers) < 1:
            raise ValueError(f"z_dim, w_dim and mapping_layers must be >= 1; got {z_dim}, {w_dim}, {mapping_layers}")
        self.embed = EqualLinear(clip_dim, w_dim)
        layers = [EqualLinear(z_dim + w_dim if i == 0 else w_dim, w_dim, lr_mul=mapping_lr_mul, activation=True)
                  for i in range(mapping_layers)]
        self.mapping = torch.nn.Sequential(*layers)
        self.register_buffer("w_avg", torch.zeros(w_dim))
        style_dim = w_dim + clip_dim
        channels = [channels_at(2 ** k, channel_base, channel_max) for k in range(2, levels + 1)]
        self.const = torch.nn.Parameter(torch.randn(channels[0], 4, 4))
        self.convs = torch.nn.ModuleList()
        self.to_rgbs = torch.nn.ModuleList()
        for i, k in enumerate(range(2, levels + 1)):
            res = 2 ** k
            if i > 0:
                self.convs.append(SynthesisLayer(channels[i - 1], channels[i], style_dim, res, up=True))
            self.convs.append(SynthesisLayer(channels[i], channels[i], style_dim, res))
            self.to_rgbs.append(ToRGB(channels[i], style_dim))
        self.input_affine = None  # created last, so that G's other weights initialise as without it
        if input_from_style:
            self.input_affine = torch.nn.Linear(style_dim, channels[0] * 16)
            torch.nn.init.zeros_(self.input_affine.weight)
            torch.nn.init.zeros_(self.input_affine.bias)

    def map(self, z: torch.Tensor, c: torch.Tensor, truncation_psi: float = 1.0, update_w_avg: bool = False):
        """(w (B, w_dim), the normalised conditioning (B, clip_dim))."""
        self._check(z, c)
        c = normalize_blocks(c, self.config.block_sizes).to(z.dtype)
        x = torch.cat([normalize_2nd_moment(z), normalize_2nd_moment(self.embed(c))], dim=1)
        w = self.mapping(x)
        if update_w_avg:
            self.w_avg.copy_(w.detach().float().mean(0).lerp(self.w_avg, self.config.w_avg_beta))
        if truncation_psi != 1.0:
            w = self.w_avg.to(w.dtype).lerp(w, truncation_psi)
        return w, c

    def forward(self, z: torch.Tensor, c: torch.Tensor, truncation_psi: float = 1.0, noise_mode: str = "random",
                generator: Optional[torch.Generator] = None, update_w_avg: bool = False) -> torch.Tensor:
        w, c = self.map(z, c, truncation_psi, update_w_avg=update_w_avg and self.training)
        style_input = torch.cat([w, c], dim=1)
        x = self.const[None].expand(z.shape[0], -1, -1, -1)
        if self.input_affine is not None:
            x = x + self.input_affine(style_input).view(x.shape)
        image = None
        convs = iter(self.convs)
        for i, to_rgb in enumerate(self.to_rgbs):
            if i > 0:
                x = next(convs)(x, style_input, noise_mode, generator)
            x = next(convs)(x, style_input, noise_mode, generator)
            rgb = to_rgb(x, style_input)
            image = rgb if image is None else F.interpolate(image, scale_factor=2, mode="bilinear",
                                                            align_corners=False) + rgb
        return image

    def _check(self, z: torch.Tensor, c: torch.Tensor) -> None:
        if z.ndim != 2 or z.shape[1] != self.config.z_dim:
            raise ValueError(f"z: expected (B, {self.config.z_dim}), got {tuple(z.shape)}")
        if c.ndim != 2 or c.shape != (z.shape[0], self.config.clip_dim):
            raise ValueError(f"image_embeds: expected ({z.shape[0]}, {self.config.clip_dim}) (the generator's "
                             f"clip_dim), got {tuple(c.shape)}")


class DiscriminatorBlock(torch.nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv0 = EqualConv2d(in_channels, in_channels, 3, activation=True)
        self.conv1 = EqualConv2d(in_channels, out_channels, 3, activation=True, down=True)
        self.skip = EqualConv2d(in_channels, out_channels, 1, bias=False, down=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.skip(x) + self.conv1(self.conv0(x))) * math.sqrt(0.5)


class Discriminator(ModelMixin, ConfigMixin):
    """images (B, 3, R, R) and the conditioning (B, clip_dim) -> (logits (B,), features (B, clip_dim))."""

    @register_to_config
    def __init__(self, clip_dim: int = 1536, block_sizes: Sequence[int] = (512, 512, 512), resolution: int = 256,
                 channel_base: int = 16384, channel_max: int = 512, mbstd_group_size: int = 4):
        super().__init__()
        levels = _check_resolution(resolution)
        channels = {2 ** k: channels_at(2 ** k, channel_base, channel_max) for k in range(2, levels + 1)}
        self.from_rgb = EqualConv2d(3, channels[resolution], 1, activation=True)
        self.blocks = torch.nn.ModuleList([DiscriminatorBlock(channels[2 ** k], channels[2 ** (k - 1)])
                                           for k in range(levels, 2, -1)])
        top = channels[4]
        self.conv = EqualConv2d(top + 1, top, 3, activation=True)
        self.fc = EqualLinear(top * 16, top, activation=True)
        self.out = EqualLinear(top, 1)
        self.cond_proj = EqualLinear(clip_dim, top)
        self.features_head = EqualLinear(top, clip_dim)

    def minibatch_std(self, x: torch.Tensor) -> torch.Tensor:
        """One more channel: the standard deviation over groups of samples, averaged over features and pixels."""
        batch, channels, height, width = x.shape
        group = min(self.config.mbstd_group_size, batch)
        while batch % group:
            group -= 1
        y = x.reshape(group, -1, channels, height, width)
        y = (y - y.mean(dim=0)).square().mean(dim=0).add(1e-8).sqrt()  # (B/G, C, H, W)
        y = y.mean(dim=(1, 2, 3)).reshape(-1, 1, 1, 1).repeat(group, 1, height, width)
        return torch.cat([x, y], dim=1)

    def forward(self, images: torch.Tensor, c: torch.Tensor) -> tuple:
        resolution = self.config.resolution
        if images.ndim != 4 or images.shape[1:] != (3, resolution, resolution):
            raise ValueError(f"images: expected (B, 3, {resolution}, {resolution}), got {tuple(images.shape)}")
        if c.shape != (images.shape[0], self.config.clip_dim):
            raise ValueError(f"image_embeds: expected ({images.shape[0]}, {self.config.clip_dim}), got "
                             f"{tuple(c.shape)}")
        x = self.from_rgb(images)
        for block in self.blocks:
            x = block(x)
        x = self.conv(self.minibatch_std(x))
        h = self.fc(x.flatten(1))
        c = normalize_blocks(c, self.config.block_sizes).to(h.dtype)
        logits = self.out(h)[:, 0] + (self.cond_proj(c) * h).sum(dim=1) / math.sqrt(h.shape[1])
        return logits, self.features_head(h)
