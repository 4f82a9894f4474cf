"""Configuration of prior training: one frozen dataclass, YAML presets, command-line overrides.

The command line is generated from the dataclass (``config_cli``, shared with the decoder's config), so a
YAML file and a flag set the same fields; the flag names are the original release's where it had them
(``--train_data_dir``, ``--std_scale``, ...). Booleans are real booleans (``--baseline`` / ``--no-baseline``).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Optional, Sequence

from . import config_cli
from .checks import check_choice, check_range
from .encoders import PAPER_CLIP_MODELS


@dataclass(frozen=True)
class TrainConfig(config_cli.FlagConfig):
    """Everything a prior training run depends on; saved in every checkpoint and in the output folder."""

    SCRIPT: ClassVar[str] = "train.py"

    # data
    # an image folder or webdataset tar shards (a pattern, a .tar, a folder of .tar); None: the embedded toy world
    train_data_dir: Optional[str] = None
    cache_dir: Optional[str] = None  # default: <output_dir>/embeddings
    image_column: str = "file_name"
    caption_column: str = "text"
    val_fraction: float = 0.02
    toy_root: str = "outputs/toy_assets"  # where the toy world and its CLIP are cached
    toy_fast: bool = False  # tiny toy world (tests)
    # encoders (frozen, run once into the cache)
    clip_models: Sequence[str] = dataclasses.field(
        default=PAPER_CLIP_MODELS,
        metadata={"comma_separated": True, "help": "comma-separated MODEL:PRETRAINED open_clip pairs"})
    t5_model: str = "t5-11b"  # a T5 name/path, "clip-tokens:<open_clip dir>", or "none"
    text_max_length: int = 80
    t5_masked: bool = False
    t5_offload: bool = False
    encoder_dtype: Optional[str] = None  # default: fp16 (CLIP) / bf16 (T5) on GPU, fp32 on CPU
    encoder_batch_size: int = 256
    cache_text_dtype: str = "float16"  # storage of the token states: float16, bfloat16 or float32
    text_encoding: str = dataclasses.field(default="cache", metadata={"help": (
        "cache: the text encoder's token states are embedded once into the cache; online: the cache keeps the "
        "CLIP embeddings only and every process runs the frozen text encoder on its batch's captions in the "
        "training step (sets too large to cache)")})
    # vocabulary
    baseline: bool = False  # DALL-E 2 prior: mu = 0, Sigma = I, no cluster token
    prior_type: str = dataclasses.field(default="diffusion", metadata={"help": (
        "diffusion: the (shifted or --baseline) diffusion prior; eclipse: a one-step non-diffusion reference "
        "prior (ECLIPSE: projection MSE + CLIP contrastive loss, shifted_diffusion/eclipse.py; needs --baseline, "
        "samples in one step)")})
    eclipse_contrastive_weight: float = 0.2  # --prior_type eclipse: weight of the contrastive term (the paper's)
    eclipse_temperature: float = 0.07  # --prior_type eclipse: temperature of the contrastive term
    vocab_path: Optional[str] = None  # a saved vocabulary; None: fit one on the training images
    vocab_size: int = 1024
    std_scale: float = 5.0
    kmeans_iters: int = 50
    # network
    model_preset: str = "small"
    model_width: Optional[int] = None
    model_layers: Optional[int] = None
    model_num_heads: Optional[int] = None
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the network's forward (checkpoints keep the same parameter names)
    # diffusion and loss
    beta_schedule: str = "linear"
    num_timesteps: int = 1000
    beta_min: float = 1e-4
    beta_max: float = 0.02
    p2_k: float = 1.0
    p2_gamma: float = 1.0
    empty_t5_prob: float = 0.1
    empty_clip_prob: float = 0.0
    timesteps_per_caption: int = 1  # > 1: K timesteps share one caption prefix (loss = mean over K)
    # semi-supervised: uncaptioned images with a pseudo text condition (shifted_diffusion/pseudo_text.py)
    pseudo_text_fraction: float = dataclasses.field(default=0.0, metadata={"help": (
        "share of every batch's pairs that are uncaptioned training images with a pseudo text condition (their "
        "own CLIP image embedding, normalised and perturbed, as the CLIP text embedding; the empty caption's "
        "tokens); 0: captioned pairs only")})
    pseudo_text_noise: Optional[float] = dataclasses.field(default=None, metadata={"help": (
        "perturbation level of the pseudo text embedding (noise length relative to the unit embedding); "
        "None: per CLIP block, the level at which it is as close to its image as real captions are to theirs")})
    # optimisation (the original's AdamW defaults)
    learning_rate: float = 1.2e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.96
    adam_weight_decay: float = 0.06
    adam_epsilon: float = 1e-6
    max_grad_norm: float = 1.0
    lr_scheduler: str = "constant_with_warmup"  # or "cosine", "linear", "constant", ...
    lr_warmup_steps: int = 500
    use_ema: bool = True
    ema_decay: float = 0.9999
    # loop
    output_dir: str = "outputs/prior"
    seed: int = 0
    train_batch_size: int = 64
    num_train_epochs: int = 100
    max_train_steps: Optional[int] = None
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16"
    dataloader_num_workers: int = 0
    checkpointing_steps: int = 5000
    checkpoints_total_limit: Optional[int] = None
    resume_from_checkpoint: Optional[str] = None  # "latest" or a checkpoint folder
    validation_steps: int = 2000
    num_validation_samples: int = 256
    num_inference_steps: int = 8  # validation sampling steps
    guidance_scale: float = 1.0
    report_to: str = "tensorboard"  # used when installed; "none" disables trackers
    logging_steps: int = 10
    evaluate_toy: bool = True  # after training on the toy world, print its quality table

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Every numeric setting in its range and every name known: ValueError naming the flag otherwise."""
        from diffusers.optimization import SchedulerType

        from .cache import TEXT_DTYPES
        from .encoders import DTYPE_NAMES
        from .prior import _PRESETS

        ints = {  # field: (low, optional)
            "encoder_batch_size": (1, False), "text_max_length": (1, False), "vocab_size": (1, False),
            "kmeans_iters": (1, False), "model_width": (1, True), "model_layers": (1, True),
            "model_num_heads": (1, True), "num_timesteps": (2, False), "timesteps_per_caption": (1, False),
            "lr_warmup_steps": (0, False), "train_batch_size": (1, False), "num_train_epochs": (1, False),
            "max_train_steps": (1, True), "gradient_accumulation_steps": (1, False),
            "dataloader_num_workers": (0, False), "checkpointing_steps": (0, False),
            "checkpoints_total_limit": (1, True), "validation_steps": (0, False), "num_validation_samples": (0, False),
            "num_inference_steps": (1, False), "logging_steps": (1, False), "seed": (0, False),
        }
        for name, (low, optional) in ints.items():
            check_range(f"--{name}", getattr(self, name), low, integer=True, optional=optional)
        for name in ("val_fraction",):
            check_range(f"--{name}", getattr(self, name), 0.0, 1.0, high_open=True)
        for name in ("empty_t5_prob", "empty_clip_prob", "ema_decay"):
            check_range(f"--{name}", getattr(self, name), 0.0, 1.0)
        for name in ("adam_beta1", "adam_beta2"):
            check_range(f"--{name}", getattr(self, name), 0.0, 1.0, high_open=True)
        for name in ("std_scale", "learning_rate", "adam_epsilon", "max_grad_norm", "p2_k"):
            check_range(f"--{name}", getattr(self, name), 0.0, low_open=True)
        for name in ("adam_weight_decay", "p2_gamma", "guidance_scale"):
            check_range(f"--{name}", getattr(self, name), 0.0)
        check_range("--beta_min", self.beta_min, 0.0, low_open=True)
        check_range("--beta_max", self.beta_max, self.beta_min, 1.0, high_open=True)
        if self.beta_schedule == "linear":  # linear betas are scaled by 1000 / num_timesteps
            check_range("--beta_max x 1000 / --num_timesteps", self.beta_max * 1000 / self.num_timesteps, 0.0, 1.0,
                        high_open=True)
        check_choice("--beta_schedule", self.beta_schedule, {"linear", "cosine"})
        check_choice("--mixed_precision", self.mixed_precision, {"no", "fp16", "bf16"})
        check_choice("--model_preset", self.model_preset, set(_PRESETS))
        check_choice("--lr_scheduler", self.lr_scheduler, {t.value for t in SchedulerType})
        check_choice("--encoder_dtype", self.encoder_dtype, {None, *DTYPE_NAMES})
        check_choice("--cache_text_dtype", self.cache_text_dtype, set(TEXT_DTYPES))
        check_choice("--text_encoding", self.text_encoding, {"cache", "online"})
        check_range("--pseudo_text_fraction", self.pseudo_text_fraction, 0.0, 1.0, high_open=True)
        check_choice("--prior_type", self.prior_type, {"diffusion", "eclipse"})
        check_range("--eclipse_contrastive_weight", self.eclipse_contrastive_weight, 0.0)
        check_range("--eclipse_temperature", self.eclipse_temperature, 0.0, low_open=True)
        if self.prior_type == "eclipse" and not self.baseline:
            raise ValueError("--prior_type eclipse starts from N(0, I) and has no cluster vocabulary: add --baseline")
        if self.prior_type == "eclipse" and self.timesteps_per_caption != 1:
            raise ValueError(f"--prior_type eclipse has one timestep: --timesteps_per_caption must be 1, got "
                             f"{self.timesteps_per_caption}")
        check_range("--pseudo_text_noise", self.pseudo_text_noise, 0.0, optional=True)
        if self.text_encoding == "online" and self.t5_model.lower() in ("", "none"):
            raise ValueError("--text_encoding online: --t5_model is 'none', there is no text encoder to run online; "
                             "use --text_encoding cache (a CLIP-only prior caches nothing per token)")
        if self.model_width is not None and self.model_num_heads is not None and self.model_width % self.model_num_heads:
            raise ValueError(f"--model_width {self.model_width} is not divisible by --model_num_heads "
                             f"{self.model_num_heads}")
        if not self.clip_models:
            raise ValueError("--clip_models: expected at least one MODEL:PRETRAINED pair, got none")


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``TrainConfig`` (config_cli.build_parser: one flag per field, ``--config`` YAML files)."""
    return config_cli.build_parser(
        TrainConfig, "Train a shifted diffusion prior (caption -> CLIP image embedding). "
        "With no arguments it runs the embedded toy world, end to end, offline.")


def parse_config(argv: Optional[Sequence[str]] = None, defaults: Optional[dict] = None) -> TrainConfig:
    """TrainConfig from (dataclass defaults) < ``defaults`` < YAML files in order < explicit flags."""
    return config_cli.parse_settings(TrainConfig, argv, defaults, parser=build_parser())
