"""Priors written before the diffusers format: the ``shifted-diffusion-prior/1`` folder and the original
release's checkpoints, read into a ``ShiftedDiffusionPriorPipeline`` (``load_prior`` dispatches here).

The old folder held config.json (prior / schedule / encoder settings and the training config),
model.safetensors, vocab.safetensors (absent for the baseline) and null_embeddings.safetensors. An original
checkpoint is a ``.pt``/``.pth``/``.bin`` ClipPrior state dict with ``mean.pth`` / ``std.pth`` beside it; it
was trained with its T5 tokens zeroed for the unconditional branch, so guidance samples it that way.
Nothing is unpickled as code: safetensors, JSON, ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .files import InvalidFileError, read_json, read_safetensors, sniff
from .guidance import UnconditionalInputs
from .prior import PriorConfig, ShiftedPrior
from .schedule import ScheduleConfig
from .scheduler import ShiftedDiffusionScheduler
from .vocab import ClusterVocab, StandardNormalShift

FORMAT = "shifted-diffusion-prior/1"

PRIOR_FOLDER_EXPECTED = ("a prior pipeline folder (model_index.json, written by train.py or save_pretrained), an older "
                         "prior folder (config.json, model.safetensors, null_embeddings.safetensors[, vocab.safetensors]) "
                         "or an original ClipPrior checkpoint file (.pt / .pth / .bin, with mean.pth / std.pth beside it)")


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


def _stored_encoders(encoders: dict, folder: Path) -> dict:
    """The stored encoder settings with local paths absolute: folders saved with paths relative to the training
    run's working directory are found from the current one, else from the prior folder or one above it."""
    from .encoders import resolve_encoder_paths

    folder = folder.resolve()
    return resolve_encoder_paths(encoders, bases=[folder, *folder.parents])


def load_legacy_folder(path: Path, *, clip=None, text_encoder=None):
    """A ``shifted-diffusion-prior/1`` folder -> ShiftedDiffusionPriorPipeline (the same networks and tensors)."""
    from .prior_pipeline import ShiftedDiffusionPriorPipeline, check_shift_fits_prior

    config_path = path / "config.json"
    config = _read_prior_config(config_path)
    prior = _read_prior_weights(path / "model.safetensors", config["prior"], config_path)
    shift, vocab_where = _read_shift(path, config, prior.arch)
    check_shift_fits_prior(shift, prior.arch, vocab_where)
    nulls = _read_null_embeddings(path / "null_embeddings.safetensors", prior.arch)
    drops_clip = config.get("train", {}).get("empty_clip_prob", 0.0) > 0 or prior.arch.text_len == 0
    unconditional = UnconditionalInputs.from_encodings(
        nulls["null_text_tokens"].reshape(prior.arch.text_len, prior.arch.text_dim), nulls["null_clip_text"],
        clip_text="empty_caption" if drops_clip else "prompt")
    scheduler = ShiftedDiffusionScheduler.from_schedule_config(_schedule_config(config["schedule"], config_path))
    training = {k: v for k, v in config.items() if k not in ("format", "prior", "schedule", "encoders", "baseline")}
    pipeline = ShiftedDiffusionPriorPipeline(prior, shift, scheduler, unconditional,
                                             encoders=_stored_encoders(config["encoders"], path), training=training)
    return pipeline.set_encoders(clip=clip, text_encoder=text_encoder)


def load_original(path: Path, *, clip=None, text_encoder=None, **options):
    """The original release: a ClipPrior state dict, mean.pth / std.pth beside it (std_scale 5); its
    unconditional branch is zero T5 tokens with each prompt's CLIP text embedding, as it was trained."""
    from .convert import load_original_checkpoint
    from .prior_pipeline import PAPER_ENCODERS, ShiftedDiffusionPriorPipeline, check_shift_fits_prior

    _check_checkpoint_file(path)
    prior = load_original_checkpoint(path, **options)
    mean_path, std_path = path.parent / "mean.pth", path.parent / "std.pth"
    if prior.arch.has_cluster_token and mean_path.is_file() and std_path.is_file():
        shift = ClusterVocab.from_original(mean_path, std_path, dim=prior.arch.clip_dim)
        if shift.num_clusters > prior.arch.vocab_size:  # the release's files may hold extra rows: it read [:1024]
            shift = ClusterVocab(shift.means[: prior.arch.vocab_size], shift.stds[: prior.arch.vocab_size], shift.std_scale)
    elif prior.arch.has_cluster_token:
        raise FileNotFoundError(f"{os.fspath(path)} is a shifted prior but mean.pth / std.pth are not beside it")
    else:
        shift = StandardNormalShift(prior.arch.clip_dim)
    check_shift_fits_prior(shift, prior.arch, f"{os.fspath(mean_path)} vs {os.fspath(path)} loaded with "
                                              f"vocab_size={prior.arch.vocab_size}; pass vocab_size= to load_prior")
    unconditional = UnconditionalInputs(text_len=prior.arch.text_len, text_dim=prior.arch.text_dim,
                                        clip_dim=prior.arch.clip_dim, text_tokens="zeros", clip_text="prompt")
    pipeline = ShiftedDiffusionPriorPipeline(prior, shift, ShiftedDiffusionScheduler(), unconditional,
                                             encoders=dict(PAPER_ENCODERS), training={"source": os.fspath(path)})
    return pipeline.set_encoders(clip=clip, text_encoder=text_encoder)
