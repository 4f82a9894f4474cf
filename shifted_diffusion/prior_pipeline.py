"""A trained prior in one folder, loaded in one call: caption -> CLIP image embedding.

Folder layout (written by ``save_prior``; ``train.py`` writes ``<output_dir>/prior``)::

    config.json                 prior / schedule / encoder settings (+ the training config)
    model.safetensors           prior weights (the EMA weights when training used EMA)
    vocab.safetensors           the cluster vocabulary (absent for the baseline prior)
    null_embeddings.safetensors encodings of the empty caption (unconditional branch of guidance)

A checkpoint of the original release (a ``.pt``/``.pth``/``.bin`` file) loads too, through the
converter, with its ``mean.pth`` / ``std.pth`` vocabulary beside it.
"""

from __future__ import annotations

import functools
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from safetensors.torch import save_file

from .cuda_graph import GraphedCall
from .files import InvalidFileError, read_json, read_safetensors, sniff
from .checks import check_count, check_finite, check_scale
from .prior import PriorConfig, ShiftedPrior
from .sampling import sample_ancestral, sample_ddim
from .schedule import DiffusionSchedule, ScheduleConfig
from .vocab import ClusterVocab, StandardNormalShift

FORMAT = "shifted-diffusion-prior/1"
PAPER_ENCODERS = {
    "clip_models": ["ViT-B-16:openai", "ViT-B-32:openai", "RN101:openai"],
    "t5_model": "t5-11b",
    "text_max_length": 80,
    "t5_masked": False,
}


def save_prior(
    directory,
    prior: ShiftedPrior,
    shift: Union[ClusterVocab, StandardNormalShift],
    schedule_config: ScheduleConfig,
    encoders: dict,
    null_clip_text: torch.Tensor,
    null_text_tokens: torch.Tensor,
    extra: Optional[dict] = None,
    state_dict: Optional[dict] = None,
) -> Path:
    """Write a prior folder; ``state_dict`` overrides the module's weights (e.g. the EMA weights).

    Local encoder folders / files in ``encoders`` are stored as absolute paths (resolved against the working
    directory), so that the prior loads from any working directory; hub names are stored as given. The folder
    is built under a temporary name and renamed into place: an interrupted save leaves the previous folder."""
    import shutil

    from .encoders import resolve_encoder_paths
    from .files import partial_folder, replace_folder

    directory = Path(directory)
    encoders = resolve_encoder_paths(encoders)
    partial = partial_folder(directory)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    weights = state_dict if state_dict is not None else prior.state_dict()
    save_file({k: v.detach().float().cpu().contiguous() for k, v in weights.items()}, str(partial / "model.safetensors"))
    if isinstance(shift, ClusterVocab):
        shift.save(partial / "vocab.safetensors")
    save_file(
        {"null_clip_text": null_clip_text.float().cpu().contiguous(), "null_text_tokens": null_text_tokens.float().cpu().contiguous()},
        str(partial / "null_embeddings.safetensors"),
    )
    config = {
        "format": FORMAT,
        "prior": prior.arch.to_dict(),
        "schedule": schedule_config.to_dict(),
        "encoders": encoders,
        "baseline": not isinstance(shift, ClusterVocab),
        **(extra or {}),
    }
    (partial / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    replace_folder(partial, directory)
    return directory


class PriorPipeline:
    """Prior + vocabulary + schedule (+ text encoders, loaded on first use of ``generate``)."""

    max_cuda_graphs = 4  # captured sampling graphs kept (``sample(cuda_graph=True)``): the most recently used

    def __init__(
        self,
        prior: ShiftedPrior,
        shift: Union[ClusterVocab, StandardNormalShift],
        schedule: DiffusionSchedule,
        *,
        null_clip_text: Optional[torch.Tensor] = None,
        null_text_tokens: Optional[torch.Tensor] = None,
        encoders: Optional[dict] = None,
        clip=None,
        text_encoder=None,
        uncond_drops_clip: Optional[bool] = None,
    ):
        check_shift_fits_prior(shift, prior.arch)
        self.prior = prior.eval()
        self.shift = shift
        self.schedule = schedule
        self.encoders = dict(encoders or PAPER_ENCODERS)
        self.clip = clip
        self.text_encoder = text_encoder
        self.null_clip_text = null_clip_text
        self.null_text_tokens = null_text_tokens
        self._respaced: dict = {}
        self._graphs: "OrderedDict[tuple, GraphedCall]" = OrderedDict()
        # the unconditional branch of guidance replaces the CLIP sentence embedding too when the prior was
        # trained to drop it (empty_clip_prob > 0) or has no text tokens (else guidance would change nothing)
        self.uncond_drops_clip = prior.arch.text_len == 0 if uncond_drops_clip is None else uncond_drops_clip

    @property
    def device(self) -> torch.device:
        return next(self.prior.parameters()).device

    @property
    def clip_dim(self) -> int:
        return self.prior.arch.clip_dim

    def to(self, device=None, dtype=None) -> "PriorPipeline":
        self.prior.to(device=device, dtype=dtype)
        self.shift.to(device=device)
        self.clear_cuda_graphs()
        return self

    # ---- text ------------------------------------------------------------------------------

    def load_encoders(self, device=None, dtype=None) -> None:
        """Build the CLIP and word-level text encoders named in the config (once)."""
        from .encoders import MultiCLIP, build_text_encoder
        from .train_config import parse_clip_specs

        device = device or self.device
        _check_local_encoders(self.encoders)
        if self.clip is None:
            self.clip = MultiCLIP(parse_clip_specs(self.encoders["clip_models"]), device=device, dtype=dtype)
        if self.text_encoder is None:
            self.text_encoder = build_text_encoder(
                self.encoders["t5_model"], max_length=self.encoders.get("text_max_length", 80),
                masked=self.encoders.get("t5_masked", False), device=device,
            )

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]):
        """(clip_text_emb (B, D), text_tokens (B, L, E)) on the prior's device."""
        self.load_encoders()
        clip_text = self.clip.encode_text(list(prompts)).to(self.device, torch.float32)
        tokens = self.text_encoder.encode(list(prompts)).to(self.device, torch.float32)
        return clip_text, tokens

    def null_embeddings(self):
        """Encodings of the empty caption (computed with the encoders if the folder had none)."""
        if self.null_clip_text is None or self.null_text_tokens is None:
            clip_text, tokens = self.encode_prompts([""])
            self.null_clip_text, self.null_text_tokens = clip_text[0], tokens[0]
        return self.null_clip_text.to(self.device), self.null_text_tokens.to(self.device)

    # ---- sampling ----------------------------------------------------------------------------

    def respaced(self, num_steps: Union[int, str]) -> DiffusionSchedule:
        """The schedule respaced to ``num_steps`` (cached); on CUDA its tables live on the GPU (float64:
        they stay on the CPU elsewhere, e.g. MPS has no float64), as a CUDA-graph capture needs."""
        steps, device = str(num_steps), self.device
        if (steps, device) not in self._respaced:
            schedule = self.schedule if steps == str(self.schedule.num_steps) else self.schedule.respace(steps)
            self._respaced[steps, device] = schedule.to(device) if device.type == "cuda" else schedule
        return self._respaced[steps, device]

    @torch.no_grad()
    def sample(
        self,
        clip_text_emb: torch.Tensor,
        text_tokens: torch.Tensor,
        *,
        num_images_per_prompt: int = 1,
        num_steps: Union[int, str] = 8,
        guidance_scale: float = 1.0,
        sampler: str = "ancestral",
        variance: str = "fixed_large",
        eta: float = 0.0,
        noise_temperature: float = 1.0,
        clamp_std: Optional[float] = None,
        generator: Optional[torch.Generator] = None,
        progress: bool = False,
        cuda_graph: bool = False,
    ) -> torch.Tensor:
        """Image embeddings (B * num_images_per_prompt, D), prompt-major order. The shift is the
        caption's cluster, argmax_k cos(c, mu_k), not the cluster nearest x0_hat.

        ``cuda_graph`` (prior on a CUDA device): the whole call (prefix encoding, every step, the noise)
        is captured as one CUDA graph the first time this batch shape meets these settings, and replayed
        on later calls (the ``max_cuda_graphs`` most recent kept; ``clear_cuda_graphs`` frees them). Same
        result as the eager call for the same seed; ``generator`` must then be a CUDA generator (any one,
        a fresh one per call too) or None (the default CUDA generator); ``progress`` is not shown. Weights
        moved or re-created (``prior.half()``) get a new graph; updated in place, the graph sees them."""
        if sampler not in ("ancestral", "ddim"):
            raise ValueError(f"unknown sampler {sampler!r}; expected 'ancestral' or 'ddim'")
        guidance_scale = check_scale("guidance_scale", guidance_scale)
        check_count("num_images_per_prompt", num_images_per_prompt)
        if isinstance(num_steps, int):
            check_count("num_steps", num_steps)
        check_finite(clip_text_emb, "clip_text_emb (the prompts' CLIP text embeddings)", "the text encoders")
        check_finite(text_tokens, "text_tokens (the prompts' word-level encodings)", "the text encoders")
        clip_text_emb = clip_text_emb.to(self.device, torch.float32)
        text_tokens = text_tokens.to(self.device, torch.float32)
        cluster_idx = self.shift.assign(clip_text_emb)
        null_clip, null_tokens = self.null_embeddings() if guidance_scale != 1.0 else (None, None)
        if guidance_scale != 1.0 and self.prior.arch.text_len == 0 and not self.uncond_drops_clip:
            raise ValueError("guidance needs an unconditional branch: this prior has no text tokens, so set "
                             "uncond_drops_clip=True (its CLIP sentence embedding is then replaced by that of '')")
        shift_mean, shift_std = self.shift.shift(cluster_idx.repeat_interleave(num_images_per_prompt), check=False)
        inputs = dict(
            text_tokens=text_tokens, clip_text_emb=clip_text_emb,
            cluster_idx=cluster_idx if self.prior.arch.has_cluster_token else None,
            shift_mean=shift_mean.float(), shift_std=shift_std.float(),
            null_text_tokens=null_tokens, null_clip_text_emb=null_clip if self.uncond_drops_clip else None,
        )
        settings = dict(schedule=self.respaced(num_steps), guidance_scale=guidance_scale, sampler=sampler,
                        variance=variance, eta=eta, noise_temperature=noise_temperature, clamp_std=clamp_std)
        if not cuda_graph:
            return self._checked(self._sample(**inputs, **settings, generator=generator, progress=progress), settings)
        # a graph reads the weights at their addresses and bakes in autocast: both are part of its key
        weights = tuple((t.data_ptr(), t.dtype) for t in (*self.prior.parameters(), *self.prior.buffers()))
        autocast = torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda")
        key = (self.prior, self.device, weights, autocast, str(num_steps), guidance_scale, sampler, variance, eta,
               noise_temperature, clamp_std,
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

    def _sample(self, text_tokens, clip_text_emb, cluster_idx, shift_mean, shift_std, null_text_tokens,
                null_clip_text_emb, *, schedule, guidance_scale, sampler, variance, eta, noise_temperature,
                clamp_std, generator, progress=False) -> torch.Tensor:
        """The sampling itself, on device tensors only (what a CUDA graph captures)."""
        denoise = self.prior.denoiser(
            text_tokens, clip_text_emb, cluster_idx, guidance_scale=guidance_scale,
            null_text_tokens=null_text_tokens, null_clip_text_emb=null_clip_text_emb,
        )
        kwargs = dict(noise_temperature=noise_temperature, clamp_std=clamp_std, generator=generator, progress=progress)
        if sampler == "ddim":
            return sample_ddim(denoise, schedule, shift_mean, shift_std, eta=eta, **kwargs)
        return sample_ancestral(denoise, schedule, shift_mean, shift_std, variance=variance, **kwargs)

    def clear_cuda_graphs(self) -> None:
        """Free the captured sampling graphs (and the GPU memory their buffers hold)."""
        self._graphs.clear()

    def generate(self, prompts: Sequence[str], **kwargs) -> torch.Tensor:
        """Encode the prompts and sample their image embeddings (see ``sample``)."""
        clip_text, tokens = self.encode_prompts(prompts)
        return self.sample(clip_text, tokens, **kwargs)


PRIOR_FOLDER_EXPECTED = ("a prior folder written by train.py (config.json, model.safetensors, "
                         "null_embeddings.safetensors[, vocab.safetensors]) or an original ClipPrior checkpoint "
                         "file (.pt / .pth / .bin, with mean.pth / std.pth beside it)")


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


def load_prior(path, device=None, dtype=None, *, clip=None, text_encoder=None, **original_options) -> PriorPipeline:
    """A PriorPipeline from a prior folder (``train.py`` output) or an original-release checkpoint file
    (``original_options``: text_len / vocab_size / dim_head of that network when not the release's 80 / 1024 / 64).

    ``dtype`` (e.g. torch.bfloat16): the network's weights for sampling (inputs, vocabulary and outputs stay
    float32); on a GPU bf16 weights sample ~1.35x faster than float32 weights under autocast.

    Nothing is unpickled as code: the folder's files are safetensors / JSON, an original checkpoint is read with
    ``torch.load(weights_only=True)``. A file or folder of another kind is refused with what it is."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"prior not found: {os.fspath(path)} (expected {PRIOR_FOLDER_EXPECTED})")
    if path.is_file():
        _check_checkpoint_file(path)
        pipeline = _load_original(path, device, clip=clip, text_encoder=text_encoder, **original_options)
        return pipeline if dtype is None else pipeline.to(dtype=dtype)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{os.fspath(path)} has no config.json: not a prior folder written by train.py")
    config = _read_prior_config(config_path)
    prior = _read_prior_weights(path / "model.safetensors", config["prior"], config_path)
    shift, vocab_where = _read_shift(path, config, prior.arch)
    check_shift_fits_prior(shift, prior.arch, vocab_where)
    nulls = _read_null_embeddings(path / "null_embeddings.safetensors", prior.arch)
    pipeline = PriorPipeline(
        prior, shift, DiffusionSchedule.from_config(_schedule_config(config["schedule"], config_path)),
        null_clip_text=nulls["null_clip_text"], null_text_tokens=nulls["null_text_tokens"],
        encoders=_stored_encoders(config["encoders"], path), clip=clip, text_encoder=text_encoder,
        uncond_drops_clip=config.get("train", {}).get("empty_clip_prob", 0.0) > 0 or prior.arch.text_len == 0,
    )
    return pipeline.to(device=device, dtype=dtype)


def _check_checkpoint_file(path: Path) -> None:
    """Refuse a file given as a prior that is not a checkpoint, saying what it is and what was expected."""
    kind = sniff(path)
    if kind == "safetensors" and path.name == "model.safetensors" and (path.parent / "config.json").is_file():
        raise ValueError(f"{os.fspath(path)} is the weights file of a prior folder: pass the folder "
                         f"{os.fspath(path.parent)} instead")
    if kind not in ("zip", "pickle", "safetensors"):
        raise InvalidFileError(f"{os.fspath(path)} is {kind}, not a prior: expected {PRIOR_FOLDER_EXPECTED}")


def _read_prior_config(config_path: Path) -> dict:
    """config.json of a prior folder, its format and required keys checked."""
    config = read_json(config_path, "the prior's settings, written by train.py")
    if config.get("format") != FORMAT:
        raise ValueError(f"{config_path}: unknown format {config.get('format')!r}, expected {FORMAT!r}")
    for key, kind in (("prior", dict), ("schedule", dict), ("encoders", dict), ("baseline", bool)):
        if not isinstance(config.get(key), kind):
            raise InvalidFileError(f"{config_path}: key {key!r} must be a JSON {'object' if kind is dict else 'boolean'}"
                                   f"; got {config.get(key)!r}")
    return config


def _read_prior_weights(weights_path: Path, prior_settings: dict, config_path: Path) -> ShiftedPrior:
    """The network described by config.json's "prior" with the weights of model.safetensors."""
    try:
        prior = ShiftedPrior.from_prior_config(PriorConfig.from_dict(prior_settings))
    except (TypeError, ValueError) as err:
        raise InvalidFileError(f"{config_path}: invalid \"prior\" settings: {err}") from None
    state = read_safetensors(weights_path, "the prior's weights")
    try:
        prior.load_state_dict(state)
    except RuntimeError as err:
        raise InvalidFileError(f"{weights_path}: the weights do not fit the network of {config_path}: {err}") from None
    return prior


def check_finite_weights(state: dict, source) -> None:
    """Refuse a state dict holding NaN / inf, naming the file and the first bad tensor."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise InvalidFileError(f"{os.fspath(source)}: tensor {name!r} holds NaN or inf values")


def _read_shift(path: Path, config: dict, prior_config: PriorConfig):
    """(vocabulary or baseline shift, a description naming the files) of a prior folder."""
    vocab_path = path / "vocab.safetensors"
    if config["baseline"] != (not vocab_path.is_file()):
        raise ValueError(f"{os.fspath(path)}: config says baseline={config['baseline']} but vocab.safetensors "
                         f"is {'present' if vocab_path.is_file() else 'missing'}")
    if not vocab_path.is_file():
        return StandardNormalShift(prior_config.clip_dim), f"{os.fspath(path / 'config.json')}: baseline prior"
    shift = ClusterVocab.load(vocab_path)
    return shift, f"{os.fspath(vocab_path)} vs \"prior\" in {os.fspath(path / 'config.json')}"


def _read_null_embeddings(nulls_path: Path, prior_config: PriorConfig) -> dict:
    """null_clip_text (clip_dim,) and null_text_tokens (text_len, text_dim) of a prior folder, checked."""
    nulls = read_safetensors(nulls_path, "the encodings of the empty caption")
    expected = {"null_clip_text": (prior_config.clip_dim,),
                "null_text_tokens": (prior_config.text_len, prior_config.text_dim)}
    for key, shape in expected.items():
        if key not in nulls:
            raise InvalidFileError(f"{os.fspath(nulls_path)}: no tensor {key!r} (has {sorted(nulls)})")
        got = tuple(nulls[key].shape)
        # a prior without text tokens may store (0,) or (0, E') for its empty token block
        if got != shape and not (prior_config.text_len == 0 and nulls[key].numel() == 0):
            raise InvalidFileError(f"{os.fspath(nulls_path)}: {key} has shape {got}, the prior expects {shape}")
    check_finite_weights(nulls, nulls_path)
    return nulls


def _schedule_config(settings: dict, config_path: Path) -> ScheduleConfig:
    """ScheduleConfig from config.json's "schedule"."""
    try:
        return ScheduleConfig(**settings)
    except (TypeError, ValueError) as err:
        raise InvalidFileError(f"{config_path}: invalid \"schedule\" settings: {err}") from None


def _check_local_encoders(encoders: dict) -> None:
    """Refuse encoder settings naming a local path (a value with a path separator) that does not exist, before
    open_clip / transformers take it for a hub name."""
    from .encoders import CLIP_TOKENS_PREFIX, LOCAL_DIR_PREFIX
    from .train_config import parse_clip_specs

    values = [("clip_models", part) for spec in parse_clip_specs(encoders.get("clip_models") or []) for part in spec]
    t5 = str(encoders.get("t5_model") or "")
    values.append(("t5_model", t5[len(CLIP_TOKENS_PREFIX):] if t5.startswith(CLIP_TOKENS_PREFIX) else t5))
    for key, value in values:
        path = value[len(LOCAL_DIR_PREFIX):] if value.startswith(LOCAL_DIR_PREFIX) else value
        if os.sep in path and not value.startswith("hf-hub:") and not os.path.exists(path):
            raise FileNotFoundError(f"the prior's encoder settings ({key}) name {path}, which does not exist "
                                    f"(working directory {os.getcwd()}); pass clip= / text_encoder= to load_prior "
                                    f"or put the encoders back there")


def _stored_encoders(encoders: dict, folder: Path) -> dict:
    """The stored encoder settings with local paths absolute: folders saved with paths relative to the training
    run's working directory are found from the current one, else from the prior folder or one above it."""
    from .encoders import resolve_encoder_paths

    folder = folder.resolve()
    return resolve_encoder_paths(encoders, bases=[folder, *folder.parents])


def _load_original(path: Path, device, *, clip=None, text_encoder=None, **options) -> PriorPipeline:
    """The original release: a ClipPrior state dict, mean.pth / std.pth beside it (std_scale 5)."""
    from .convert import load_original_checkpoint

    prior = load_original_checkpoint(path, **options)
    mean_path, std_path = path.parent / "mean.pth", path.parent / "std.pth"
    if mean_path.is_file() and std_path.is_file():
        shift = ClusterVocab.from_original(mean_path, std_path, dim=prior.arch.clip_dim)
        if shift.num_clusters > prior.arch.vocab_size:  # the release's files may hold extra rows: it read [:1024]
            shift = ClusterVocab(shift.means[: prior.arch.vocab_size], shift.stds[: prior.arch.vocab_size], shift.std_scale)
    elif prior.arch.has_cluster_token:
        raise FileNotFoundError(f"{os.fspath(path)} is a shifted prior but mean.pth / std.pth are not beside it")
    else:
        shift = StandardNormalShift(prior.arch.clip_dim)
    check_shift_fits_prior(shift, prior.arch, f"{os.fspath(mean_path)} vs {os.fspath(path)} loaded with "
                                                f"vocab_size={prior.arch.vocab_size}; pass vocab_size= to load_prior")
    pipeline = PriorPipeline(prior, shift, DiffusionSchedule.from_config(ScheduleConfig()), clip=clip, text_encoder=text_encoder)
    return pipeline.to(device) if device is not None else pipeline
