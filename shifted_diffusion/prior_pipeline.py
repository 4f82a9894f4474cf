"""The prior as a diffusers pipeline: caption -> CLIP image embedding.

    from shifted_diffusion import ShiftedDiffusionPriorPipeline
    pipe = ShiftedDiffusionPriorPipeline.from_pretrained("runs/prior/prior")    # or DiffusionPipeline.from_pretrained
    out = pipe(["a red double-decker bus"], num_images_per_prompt=4, num_inference_steps=8, guidance_scale=2.0)
    out.image_embeds, out.negative_image_embeds    # (4, D) each: what a decoder's own guidance needs

Components (``save_pretrained`` writes each in its subfolder, config + safetensors, and ``model_index.json``):
``prior`` (ShiftedPrior), ``vocabulary`` (ClusterVocab, or StandardNormalShift for the baseline), ``scheduler``
(ShiftedDiffusionScheduler), ``unconditional`` (UnconditionalInputs: what guidance's unconditional branch
feeds the network). The text encoders (open_clip CLIPs, T5 or the CLIP token states) are named in the
pipeline's ``encoders`` config and loaded on first use, or handed over with ``set_encoders``.
``load_prior(path)`` reads this folder, the older ``shifted-diffusion-prior/1`` folder and original checkpoints.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Union

import diffusers
import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from .checks import check_count, check_finite, check_scale
from .cuda_graph import GraphedCall
from .eclipse import ONE_STEP
from .encoders import PAPER_CLIP_MODELS, PAPER_T5_MODEL, PAPER_TEXT_MAX_LENGTH
from .files import partial_folder, replace_folder
from .guidance import UnconditionalInputs, guided_denoiser
from .prior import PriorConfig, ShiftedPrior
from .sampling import sample_ancestral, sample_ddim
from .schedule import DiffusionSchedule, ScheduleConfig
from .scheduler import ShiftedDiffusionScheduler
from .vocab import ClusterVocab, StandardNormalShift

logger = logging.getLogger(__name__)

PAPER_ENCODERS = {
    "clip_models": list(PAPER_CLIP_MODELS),
    "t5_model": PAPER_T5_MODEL,
    "text_max_length": PAPER_TEXT_MAX_LENGTH,
    "t5_masked": False,
}


@dataclass
class ShiftedDiffusionPriorPipelineOutput(BaseOutput):
    """image_embeds (B * n, D): samples for the prompts, prompt-major; negative_image_embeds (B * n, D): samples
    for the negative prompts (default: the empty caption), the unconditional input of a decoder's guidance."""

    image_embeds: Union[torch.Tensor, np.ndarray]
    negative_image_embeds: Union[torch.Tensor, np.ndarray]


def check_shift_fits_prior(shift, config: PriorConfig, where: str = "") -> None:
    """Refuse a vocabulary whose dim differs from the prior's clip_dim, or whose cluster count differs from the
    prior's vocab_size (its cluster token was trained on indices [0, vocab_size) only); ``where`` names files."""
    where = f" ({where})" if where else ""
    if shift.dim != config.clip_dim:
        raise ValueError(f"vocabulary dim {shift.dim} does not match the prior's clip_dim {config.clip_dim}{where}")
    if config.has_cluster_token:
        if shift.num_clusters is None:
            raise ValueError(f"the prior has a cluster token (vocab_size {config.vocab_size}) but was given no "
                             f"cluster vocabulary (the baseline N(0, I) shift){where}")
        if shift.num_clusters != config.vocab_size:
            raise ValueError(f"the vocabulary has {shift.num_clusters} clusters but the prior's vocab_size is "
                             f"{config.vocab_size}: they were not trained together{where}")


class ShiftedDiffusionPriorPipeline(DiffusionPipeline):
    """Caption -> CLIP image embedding with a shifted (or baseline) diffusion prior."""

    model_cpu_offload_seq = "prior"
    max_cuda_graphs = 4  # captured sampling graphs kept (``sample(cuda_graph=True)``): the most recently used

    def __init__(self, prior: ShiftedPrior, vocabulary: Union[ClusterVocab, StandardNormalShift],
                 scheduler: ShiftedDiffusionScheduler, unconditional: UnconditionalInputs,
                 encoders: Optional[dict] = None, training: Optional[dict] = None):
        super().__init__()
        check_shift_fits_prior(vocabulary, prior.arch)
        arch = prior.arch
        if (unconditional.config.text_len, unconditional.config.clip_dim) != (arch.text_len, arch.clip_dim):
            raise ValueError(f"unconditional inputs are for text_len {unconditional.config.text_len}, clip_dim "
                             f"{unconditional.config.clip_dim}; the prior has {arch.text_len}, {arch.clip_dim}")
        self.register_modules(prior=prior.eval(), vocabulary=vocabulary, scheduler=scheduler,
                              unconditional=unconditional)
        self.register_to_config(encoders=dict(encoders or PAPER_ENCODERS), training=dict(training or {}))
        self.clip, self.text_encoder = None, None
        self._respaced: dict = {}
        self._graphs: "OrderedDict[tuple, GraphedCall]" = OrderedDict()
        self._warned_one_step = False

    # ---- loading and saving ----------------------------------------------------------------------

    COMPONENTS = ("prior", "vocabulary", "scheduler", "unconditional")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "ShiftedDiffusionPriorPipeline":
        """Only safetensors weights are read (``use_safetensors=True`` unless given). ``torch_dtype`` applies to
        the network only: the vocabulary and the unconditional inputs are loaded and kept in float32."""
        kwargs.setdefault("use_safetensors", True)
        dtype = kwargs.pop("torch_dtype", None)
        pipeline = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        folder = Path(pretrained_model_name_or_path)
        if folder.is_dir():  # local encoder paths stored relative to a training run's working directory
            from .encoders import resolve_encoder_paths

            folder = folder.resolve()
            pipeline.register_to_config(encoders=resolve_encoder_paths(pipeline.encoders, bases=[folder, *folder.parents]))
        return pipeline.to(dtype=dtype) if dtype is not None else pipeline

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """diffusers' save_pretrained (safetensors), built under a temporary name and renamed into place: an
        interrupted save leaves the previous folder. A folder holding anything but an earlier save of a pipeline is
        refused (the rename would replace it). With ``push_to_hub``, diffusers' own save runs in place."""
        kwargs.setdefault("safe_serialization", True)
        if kwargs.get("push_to_hub"):
            return super().save_pretrained(str(save_directory), **kwargs)
        save_directory = Path(save_directory)
        if save_directory.is_dir():
            foreign = sorted(p.name for p in save_directory.iterdir()
                             if p.name not in ("model_index.json", *self.COMPONENTS))
            if foreign:
                raise FileExistsError(f"save_pretrained: {os.fspath(save_directory)} holds other files ({foreign[:5]}); "
                                      "save the pipeline into its own (new or earlier-saved) folder")
        partial = partial_folder(save_directory)
        shutil.rmtree(partial, ignore_errors=True)
        super().save_pretrained(str(partial), **kwargs)
        replace_folder(partial, save_directory)

    @property
    def device(self) -> torch.device:
        return next(self.prior.parameters()).device

    @property
    def clip_dim(self) -> int:
        return self.prior.arch.clip_dim

    @property
    def encoders(self) -> dict:
        return dict(self.config.encoders)

    @property
    def one_step(self) -> bool:
        """A one-step (ECLIPSE, ``prior_type`` eclipse) prior: sampled in one step whatever num_inference_steps says."""
        return dict(self.config.training).get("train", {}).get("prior_type") == "eclipse"

    def to(self, *args, **kwargs) -> "ShiftedDiffusionPriorPipeline":
        """``to(device)``, ``to(dtype)``, ``to(device, dtype)`` or keywords, as ``DiffusionPipeline.to``: the network
        takes the dtype (bf16 weights sample faster on a GPU); the vocabulary and the unconditional inputs move to
        the device and stay float32. Encoders already loaded stay where they are (their outputs are moved)."""
        device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
        kwargs.pop("silence_dtype_warnings", None)
        if kwargs:
            raise TypeError(f"to(): unexpected arguments {sorted(kwargs)}")
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            elif arg is not None:
                device = arg
        moves = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        if moves:
            self.prior.to(**moves)
        if device is not None:
            self.vocabulary.to(device=device)
            self.unconditional.to(device=device)
        self.clear_cuda_graphs()
        return self

    # ---- text --------------------------------------------------------------------------------------

    def set_encoders(self, clip=None, text_encoder=None) -> "ShiftedDiffusionPriorPipeline":
        """Use these (already built) encoders instead of loading the ones named in ``encoders``."""
        self.clip = clip if clip is not None else self.clip
        self.text_encoder = text_encoder if text_encoder is not None else self.text_encoder
        return self

    def load_encoders(self, device=None, dtype=None) -> None:
        """Build the CLIP and word-level text encoders named in the config (once)."""
        from .encoders import MultiCLIP, build_text_encoder
        from .encoders import parse_clip_specs

        device = device or self.device
        encoders = self.encoders
        _check_local_encoders(encoders)
        if self.clip is None:
            self.clip = MultiCLIP(parse_clip_specs(encoders["clip_models"]), device=device, dtype=dtype)
        if self.text_encoder is None:
            self.text_encoder = build_text_encoder(
                encoders["t5_model"], max_length=encoders.get("text_max_length", 80),
                masked=encoders.get("t5_masked", False), device=device,
            )

    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str]):
        """(clip_text_embeds (B, D), text_tokens (B, L, E)) on the prior's device, float32."""
        self.load_encoders()
        clip_text = self.clip.encode_text(list(prompts)).to(self.device, torch.float32)
        tokens = self.text_encoder.encode(list(prompts)).to(self.device, torch.float32)
        return clip_text, tokens

    # ---- sampling ------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, List[str]],
        negative_prompt: Optional[Union[str, List[str]]] = None,
        num_images_per_prompt: int = 1,
        num_inference_steps: Union[int, str] = 8,
        guidance_scale: float = 1.0,
        generator: Optional[torch.Generator] = None,
        latents: Optional[torch.Tensor] = None,
        output_type: str = "pt",
        return_dict: bool = True,
        **sampling,
    ):
        """Image embeddings for the prompts and for the negative prompts (default: the empty caption, one
        sample shared by every row). ``sampling``: the options of ``sample`` (sampler, eta, variance,
        noise_temperature, clamp_std, cuda_graph, progress). ``output_type``: "pt" or "np"."""
        if output_type not in ("pt", "np"):
            raise ValueError(f"output_type: expected 'pt' or 'np', got {output_type!r}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("prompt: expected a string or a non-empty list of strings")
        common = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, generator=generator,
                      **sampling)
        image_embeds = self.sample(*self.encode_prompt(prompts), num_images_per_prompt=num_images_per_prompt,
                                   latents=latents, **common)
        if negative_prompt is None:
            negative = self.sample(*self.encode_prompt([""]), **common).expand_as(image_embeds).clone()
        else:
            negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negatives) != len(prompts):
                raise ValueError(f"negative_prompt: {len(negatives)} given for {len(prompts)} prompts")
            negative = self.sample(*self.encode_prompt(negatives), num_images_per_prompt=num_images_per_prompt, **common)
        if output_type == "np":
            image_embeds, negative = image_embeds.cpu().numpy(), negative.cpu().numpy()
        if not return_dict:
            return (image_embeds, negative)
        return ShiftedDiffusionPriorPipelineOutput(image_embeds=image_embeds, negative_image_embeds=negative)

    def respaced(self, num_inference_steps: Union[int, str]) -> DiffusionSchedule:
        """The schedule respaced to ``num_inference_steps`` (cached); on CUDA its tables live on the GPU
        (float64: they stay on the CPU elsewhere, e.g. MPS has no float64), as a CUDA-graph capture needs."""
        steps, device = str(num_inference_steps), self.device
        if (steps, device) not in self._respaced:
            schedule = self.scheduler.schedule
            schedule = schedule if steps == str(schedule.num_steps) else schedule.respace(steps)
            self._respaced[steps, device] = schedule.to(device) if device.type == "cuda" else schedule
        return self._respaced[steps, device]

    @torch.no_grad()
    def sample(
        self,
        clip_text_embeds: torch.Tensor,
        text_tokens: torch.Tensor,
        *,
        num_images_per_prompt: int = 1,
        num_inference_steps: Union[int, str] = 8,
        guidance_scale: float = 1.0,
        sampler: Optional[str] = None,
        variance: Optional[str] = None,
        eta: Optional[float] = None,
        noise_temperature: float = 1.0,
        clamp_std: Optional[float] = None,
        generator: Optional[torch.Generator] = None,
        latents: Optional[torch.Tensor] = None,
        progress: bool = False,
        cuda_graph: bool = False,
    ) -> torch.Tensor:
        """Image embeddings (B * num_images_per_prompt, D), prompt-major, from encoded captions. The shift is
        the caption's cluster, argmax_k cos(c, mu_k), throughout (not the cluster nearest x0_hat).

        ``sampler`` / ``variance`` / ``eta``: default the scheduler's config. ``clamp_std``: clamp x0_hat to
        mu +- clamp_std * s_k with the *raw* cluster stds s_k (the original's ``clip`` of 3), not the scaled
        std_scale * s_k of the noise. ``latents``: the start x_T (B * n, D) instead of a draw from N(mu, Sigma).
        ``cuda_graph`` (prior on a CUDA device): the whole call is captured as one CUDA graph the first time this
        batch shape meets these settings and replayed afterwards (same result as eager for the same seed;
        ``generator`` a CUDA generator, a fresh one per call too, or None)."""
        if self.one_step and str(num_inference_steps) != ONE_STEP:
            if not self._warned_one_step:
                logger.warning(f"this is a one-step (ECLIPSE) prior: num_inference_steps {num_inference_steps} -> 1")
                self._warned_one_step = True
            num_inference_steps = ONE_STEP
        sampler = sampler or self.scheduler.config.sampler
        variance = variance or self.scheduler.config.variance_type
        eta = self.scheduler.config.eta if eta is None else eta
        if sampler not in ("ancestral", "ddim"):
            raise ValueError(f"unknown sampler {sampler!r}; expected 'ancestral' or 'ddim'")
        guidance_scale = check_scale("guidance_scale", guidance_scale)
        check_count("num_images_per_prompt", num_images_per_prompt)
        if isinstance(num_inference_steps, int):
            check_count("num_inference_steps", num_inference_steps)
        if clamp_std is not None:
            clamp_std = check_scale("clamp_std", clamp_std)
        check_finite(clip_text_embeds, "clip_text_embeds (the prompts' CLIP text embeddings)", "the text encoders")
        check_finite(text_tokens, "text_tokens (the prompts' word-level encodings)", "the text encoders")
        clip_text_embeds = clip_text_embeds.to(self.device, torch.float32)
        text_tokens = text_tokens.to(self.device, torch.float32)
        cluster_idx = self.vocabulary.assign(clip_text_embeds)
        null_tokens, null_clip = self.unconditional.inputs() if guidance_scale != 1.0 else (None, None)
        if guidance_scale != 1.0 and self.prior.arch.text_len == 0 and null_clip is None:
            raise ValueError("guidance needs an unconditional branch: this prior has no text tokens, so its "
                             "unconditional inputs must replace the CLIP text embedding (clip_text='empty_caption')")
        rows = cluster_idx.repeat_interleave(num_images_per_prompt)
        shift_mean, shift_std = self.vocabulary.shift(rows, check=False)
        if latents is not None:
            if tuple(latents.shape) != tuple(shift_mean.shape):
                raise ValueError(f"latents: expected shape {tuple(shift_mean.shape)} (prompts x num_images_per_prompt, "
                                 f"clip_dim), got {tuple(latents.shape)}")
            latents = latents.to(self.device, torch.float32)
        inputs = dict(
            text_tokens=text_tokens, clip_text_emb=clip_text_embeds,
            cluster_idx=cluster_idx if self.prior.arch.has_cluster_token else None,
            shift_mean=shift_mean.float(), shift_std=shift_std.float(), x_start=latents,
            null_text_tokens=null_tokens, null_clip_text_emb=null_clip,
        )
        settings = dict(schedule=self.respaced(num_inference_steps), guidance_scale=guidance_scale, sampler=sampler,
                        variance=variance, eta=eta, noise_temperature=noise_temperature, clamp_std=clamp_std,
                        std_scale=float(self.vocabulary.std_scale))
        if not cuda_graph:
            return self._checked(self._sample(**inputs, **settings, generator=generator, progress=progress), settings)
        # a graph reads the weights at their addresses and bakes in autocast: both are part of its key
        weights = tuple((t.data_ptr(), t.dtype) for t in (*self.prior.parameters(), *self.prior.buffers()))
        autocast = torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda")
        key = (self.prior, self.device, weights, autocast, str(num_inference_steps),
               *((k, v) for k, v in settings.items() if k != "schedule"),
               *((name, None if x is None else (tuple(x.shape), x.dtype)) for name, x in inputs.items()))
        graphed = self._graphs.pop(key, None)
        if graphed is None:
            graphed = GraphedCall(functools.partial(self._sample, **settings), inputs)
        self._graphs[key] = graphed  # most recent last
        while len(self._graphs) > self.max_cuda_graphs:
            self._graphs.pop(next(iter(self._graphs)))
        return self._checked(graphed(generator=generator, **inputs), settings)

    def _checked(self, embeddings: torch.Tensor, settings: dict) -> torch.Tensor:
        """The sampled embeddings, refused when any value is NaN / inf (the cause named)."""
        cause = (f"guidance_scale={settings['guidance_scale']} is too large" if settings["guidance_scale"] > 1.0
                 else "the prior's weights hold NaN / inf or overflow in their dtype")
        check_finite(embeddings, "the prior's sampled image embeddings", cause)
        return embeddings

    def _sample(self, text_tokens, clip_text_emb, cluster_idx, shift_mean, shift_std, x_start, null_text_tokens,
                null_clip_text_emb, *, schedule, guidance_scale, sampler, variance, eta, noise_temperature,
                clamp_std, std_scale, generator, progress=False) -> torch.Tensor:
        """The sampling itself, on device tensors only (what a CUDA graph captures)."""
        denoise = guided_denoiser(
            self.prior, text_tokens, clip_text_emb, cluster_idx, guidance_scale=guidance_scale,
            null_text_tokens=null_text_tokens, null_clip_text_emb=null_clip_text_emb,
        )
        kwargs = dict(noise_temperature=noise_temperature, clamp_std=clamp_std, clamp_unit=shift_std / std_scale,
                      generator=generator, x_start=x_start, progress=progress)
        if sampler == "ddim":
            return sample_ddim(denoise, schedule, shift_mean, shift_std, eta=eta, **kwargs)
        return sample_ancestral(denoise, schedule, shift_mean, shift_std, variance=variance, **kwargs)

    def clear_cuda_graphs(self) -> None:
        """Free the captured sampling graphs (and the GPU memory their buffers hold)."""
        self._graphs.clear()


# with the package imported, DiffusionPipeline.from_pretrained(folder) finds the class named in model_index.json
setattr(diffusers, ShiftedDiffusionPriorPipeline.__name__, ShiftedDiffusionPriorPipeline)


def build_pipeline(prior: ShiftedPrior, shift: Union[ClusterVocab, StandardNormalShift], schedule_config: ScheduleConfig,
                   encoders: dict, null_clip_text: torch.Tensor, null_text_tokens: torch.Tensor, *,
                   uncond_clip_text: str = "prompt", training: Optional[dict] = None) -> ShiftedDiffusionPriorPipeline:
    """A pipeline from the parts a training run has (encoder paths stored resolved, so it loads anywhere)."""
    from .encoders import resolve_encoder_paths

    unconditional = UnconditionalInputs.from_encodings(
        null_text_tokens.float().cpu().reshape(prior.arch.text_len, prior.arch.text_dim), null_clip_text.float().cpu(),
        clip_text=uncond_clip_text)
    return ShiftedDiffusionPriorPipeline(prior, shift, ShiftedDiffusionScheduler.from_schedule_config(schedule_config),
                                         unconditional.to(prior.device), encoders=resolve_encoder_paths(encoders),
                                         training=training)


def save_prior(directory, prior: ShiftedPrior, shift, schedule_config: ScheduleConfig, encoders: dict,
               null_clip_text: torch.Tensor, null_text_tokens: torch.Tensor, extra: Optional[dict] = None,
               state_dict: Optional[dict] = None) -> Path:
    """Write a training run's prior as a pipeline folder; ``state_dict`` overrides the network's weights (e.g. the
    EMA weights); ``extra`` (the training config, step, validation) is stored as the pipeline's ``training``."""
    extra = dict(extra or {})
    drops_clip = extra.get("train", {}).get("empty_clip_prob", 0.0) > 0 or prior.arch.text_len == 0
    network = ShiftedPrior.from_prior_config(prior.arch)  # a float32 CPU copy: the caller's network stays as it is
    network.load_state_dict({k: v.detach().float().cpu() for k, v in (state_dict or prior.state_dict()).items()})
    pipeline = build_pipeline(network, shift.cpu(), schedule_config, encoders, null_clip_text,
                              null_text_tokens, uncond_clip_text="empty_caption" if drops_clip else "prompt",
                              training=extra)
    pipeline.save_pretrained(directory)
    return Path(directory)


def read_prior_info(path) -> dict:
    """What a prior folder records without loading it: {"training": the run's settings, step and validation (as
    ``save_prior`` stored them), "encoders", "prior": the network's config}; the older folder format too."""
    from .files import read_json

    path = Path(path)
    if (path / "model_index.json").is_file():
        index = read_json(path / "model_index.json", "the prior pipeline's index")
        network = read_json(path / "prior" / "config.json", "the prior network's config")
        return {"training": index.get("training", {}), "encoders": index.get("encoders", {}),
                "prior": {k: v for k, v in network.items() if not k.startswith("_")}}
    config = read_json(path / "config.json", "the prior's settings")
    training = {k: v for k, v in config.items() if k not in ("format", "prior", "schedule", "encoders", "baseline")}
    return {"training": training, "encoders": config.get("encoders", {}), "prior": config.get("prior", {})}


def load_prior(path, device=None, dtype=None, *, clip=None, text_encoder=None,
               **original_options) -> ShiftedDiffusionPriorPipeline:
    """A pipeline from a pipeline folder, an older ``shifted-diffusion-prior/1`` folder or an original-release
    checkpoint file (``original_options``: text_len / vocab_size / dim_head of that network when not the release's
    80 / 1024 / 64). ``dtype`` (e.g. torch.bfloat16): the network's weights for sampling. Nothing is unpickled as
    code; a file or folder of another kind is refused with what it is."""
    from . import prior_legacy

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"prior not found: {os.fspath(path)} (expected {prior_legacy.PRIOR_FOLDER_EXPECTED})")
    if path.is_file():
        pipeline = prior_legacy.load_original(path, clip=clip, text_encoder=text_encoder, **original_options)
    elif (path / "model_index.json").is_file():
        pipeline = ShiftedDiffusionPriorPipeline.from_pretrained(path).set_encoders(clip=clip, text_encoder=text_encoder)
    elif (path / "config.json").is_file():
        pipeline = prior_legacy.load_legacy_folder(path, clip=clip, text_encoder=text_encoder)
    else:
        raise FileNotFoundError(f"{os.fspath(path)} has neither model_index.json nor config.json: expected "
                                f"{prior_legacy.PRIOR_FOLDER_EXPECTED}")
    return pipeline.to(device=device, dtype=dtype)


def _check_local_encoders(encoders: dict) -> None:
    """Refuse encoder settings naming a local path (a value with a path separator) that does not exist, before
    open_clip / transformers take it for a hub name."""
    from .encoders import CLIP_TOKENS_PREFIX, LOCAL_DIR_PREFIX
    from .encoders import parse_clip_specs

    values = [("clip_models", part) for spec in parse_clip_specs(encoders.get("clip_models") or []) for part in spec]
    t5 = str(encoders.get("t5_model") or "")
    values.append(("t5_model", t5[len(CLIP_TOKENS_PREFIX):] if t5.startswith(CLIP_TOKENS_PREFIX) else t5))
    for key, value in values:
        path = value[len(LOCAL_DIR_PREFIX):] if value.startswith(LOCAL_DIR_PREFIX) else value
        if os.sep in path and not value.startswith("hf-hub:") and not os.path.exists(path):
            raise FileNotFoundError(f"the prior's encoder settings ({key}) name {path}, which does not exist "
                                    f"(working directory {os.getcwd()}); pass clip= / text_encoder= to load_prior "
                                    f"or put the encoders back there")


