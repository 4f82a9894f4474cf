"""The shifted-vs-baseline comparison: priors (+ a decoder) on a captioned evaluation set -> every number.

Per prior and prior guidance scale, without any decoder (in the prior's own CLIP space, block by block, averaged):
``prior_cos_image`` cos(generated embedding, the caption's own image embedding), ``prior_cos_text`` cos(generated,
the caption's text embedding), ``prior_cos_unrelated`` cos(generated, another caption's image embedding: the floor).
With a decoder, per decoder guidance scale too: ``fid`` (torchmetrics' FrechetInceptionDistance of the generated
images against the evaluation set's images, whose statistics are cached), ``clip_image_text`` and
``clip_image_image`` (the evaluation CLIPs' per-block cosine of a generated image to its caption / to the ground
truth image, averaged over blocks, then over captions: the seed's definition). The Frechet distance can be
computed in another encoder's space (``EncoderFeatures``, e.g. a CLIP's image embeddings) under another name than
``fid``; an image scorer adds its own per-image numbers (the toy world's attribute reader).

Everything is computed in shards (``eval_shards``) under the output folder: a rerun skips finished shards; each
accelerate process computes its share (``process_shards``) and the main process gathers the files.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence

import numpy as np
import torch

from .eval_data import EvalPair, pairs_fingerprint
from .eval_shards import ShardStore, process_shards
from .metrics import blockwise_cosine

__all__ = ["EvalSettings", "Evaluator", "EncoderFeatures", "images_to_uint8", "make_fid_metric", "fid_from_features",
           "real_fid_state", "check_prior_fits_decoder", "check_inception_weights"]


@dataclass
class EvalSettings:
    """What the numbers depend on (stored with them and in every shard's settings)."""

    prior_guidance_scales: Sequence[float] = (1.0,)
    guidance_scales: Sequence[float] = (7.5,)
    prior_num_inference_steps: str = "8"
    num_inference_steps: int = 50
    image_size: int = 256
    seed: int = 0
    shard_size: int = 256
    save_images: bool = False
    negative: str = "prior"  # the decoder's negative: the prior's sample for "" or ("empty") the decoder's own
    extra: dict = field(default_factory=dict)


def images_to_uint8(images, size: int) -> torch.Tensor:
    """PIL images -> (N, 3, size, size) uint8: shorter side resized to ``size`` (bicubic), centre crop."""
    from PIL import Image

    from .data import to_rgb

    out = []
    for image in images:
        image = to_rgb(image)
        scale = size / min(image.size)
        width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
        image = image.resize((width, height), Image.BICUBIC)
        left, top = (width - size) // 2, (height - size) // 2
        image = image.crop((left, top, left + size, top + size))
        out.append(torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1))
    return torch.stack(out) if out else torch.zeros(0, 3, size, size, dtype=torch.uint8)


class EncoderFeatures(torch.nn.Module):
    """uint8 images (N, 3, H, W) -> (N, D) float32 image embeddings of an encoder that takes PIL images
    (``encode_image``, e.g. MultiCLIP): a Frechet distance in that encoder's space instead of InceptionV3's (give it
    to ``make_fid_metric``; report the number under another name than FID). ``identity``: what the cached
    statistics are valid for (the encoder's ``spec`` when it has one)."""

    def __init__(self, encoder, identity=None):
        super().__init__()
        self.encoder = encoder  # not a registered module: the metric never moves or saves its weights
        self.identity = identity if identity is not None else getattr(encoder, "spec", type(encoder).__name__)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from PIL import Image

        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (N, 3, H, W); got {images.dtype} {tuple(images.shape)}")
        pixels = images.permute(0, 2, 3, 1).cpu().numpy()
        return self.encoder.encode_image([Image.fromarray(p) for p in pixels]).float()


def fid_identity(metric) -> object:
    """What a FID metric's features are (cached statistics and shards are valid only for the same)."""
    return getattr(metric.inception, "identity", type(metric.inception).__name__)


def check_inception_weights(path) -> dict:
    """The Inception weights of ``path`` as a state dict, read with ``weights_only=True``; refused unless they are
    plain tensors. (torch-fidelity's own loader would unpickle the file: it is only ever given a copy written
    here from these tensors, see ``make_fid_metric``.)"""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--inception_weights {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"--inception_weights {path}: not a plain state dict of tensors (refused without "
                         f"unpickling it): {error}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise ValueError(f"--inception_weights {path}: not a plain state dict of tensors")
    return state


def default_inception_weights() -> Path:
    """torch-fidelity's FID Inception weights, downloaded once into torch's hub cache and read with
    ``weights_only=True`` (torch-fidelity's own download would unpickle them); the cached file's path."""
    from urllib.parse import urlparse

    from torch.hub import get_dir, load_state_dict_from_url
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    load_state_dict_from_url(URL_INCEPTION_V3, map_location="cpu", progress=True, weights_only=True)
    return Path(get_dir()) / "checkpoints" / os.path.basename(urlparse(URL_INCEPTION_V3).path)


def make_fid_metric(feature=2048, inception_weights=None):
    """torchmetrics' FrechetInceptionDistance: ``feature`` 2048 (InceptionV3's pool features, torch-fidelity's
    weights: downloaded at first use, or ``inception_weights``) or an ``nn.Module`` mapping uint8 (N, 3, H, W) to
    (N, d) features."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if not isinstance(feature, int):
        return FrechetInceptionDistance(feature=feature, reset_real_features=False)
    state = check_inception_weights(inception_weights if inception_weights is not None else default_inception_weights())
    with tempfile.TemporaryDirectory() as folder:  # the only file torch-fidelity reads: tensors we just wrote
        copy = Path(folder) / "inception_weights.pth"
        torch.save(state, copy)
        return FrechetInceptionDistance(feature=feature, reset_real_features=False,
                                        feature_extractor_weights_path=os.fspath(copy))


@torch.no_grad()
def fid_features(metric, images_uint8: torch.Tensor) -> torch.Tensor:
    """(N, d) float32 features (on the CPU) of the metric's extractor for uint8 images (N, 3, H, W), run on the
    extractor's device."""
    parameter = next(metric.inception.parameters(), None)
    device = parameter.device if parameter is not None else metric.device
    features = metric.inception(images_uint8.to(device))
    return features.reshape(images_uint8.shape[0], -1).float().cpu()  # float32 in the shards; stats in float64


def _fill(metric, prefix: str, features: torch.Tensor) -> None:
    features = features.double().to(metric.device)
    setattr(metric, f"{prefix}_features_sum", features.sum(dim=0))
    setattr(metric, f"{prefix}_features_cov_sum", features.t() @ features)
    setattr(metric, f"{prefix}_features_num_samples", torch.tensor(features.shape[0]).long())


def real_fid_state(real_features: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The real-image states of FrechetInceptionDistance (sum, cov_sum, num_samples) from features (N, d)."""
    real_features = real_features.double()
    return {"sum": real_features.sum(dim=0), "cov_sum": real_features.t() @ real_features,
            "num_samples": torch.tensor(real_features.shape[0]).long()}


def fid_from_features(metric, real_state: Mapping[str, torch.Tensor], fake_features: torch.Tensor) -> float:
    """torchmetrics' FID (its ``compute``) with its states set from the cached real statistics and fake features."""
    metric.reset()
    metric.real_features_sum = real_state["sum"].double().to(metric.device)
    metric.real_features_cov_sum = real_state["cov_sum"].double().to(metric.device)
    metric.real_features_num_samples = real_state["num_samples"].long().to(metric.device)
    _fill(metric, "fake", fake_features)
    metric.orig_dtype = torch.float64  # what update() records from the extractor's output; compute() returns it
    metric._update_count = 1  # the states were set, not updated: no "compute before update" warning
    return float(metric.compute())


def check_prior_fits_decoder(name: str, prior, decoder) -> None:
    """ValueError naming the prior and both dims when the prior's embeddings do not fit the decoder."""
    prior_dim, decoder_dim = int(prior.clip_dim), int(decoder.clip_dim)
    if prior_dim != decoder_dim:
        raise ValueError(f"--prior {name}: the prior makes image embeddings of dim {prior_dim} but the decoder expects "
                         f"{decoder_dim}: they use different CLIP models")


def _key(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _scale_name(value: float) -> str:
    return f"{float(value):g}".replace(".", "p").replace("-", "m")


class Evaluator:
    """The comparison over ``pairs`` for ``priors`` ({name: ShiftedDiffusionPriorPipeline, encoders set or
    loadable}) and an optional ``decoder`` (``generate(embeds, guidance_scale=, num_inference_steps=,
    negative_embeds=, generator=, height=, width=)`` -> PIL images, ``clip_dim``). ``eval_clip``: the CLIPs of
    the image-text / image-image scores (``encode_image`` / ``encode_text`` / ``block_sizes``, e.g. MultiCLIP);
    ``fid_metric``: ``make_fid_metric(...)``; ``fd_name``: the key of its number in the results (``"fid"`` for
    InceptionV3; another name for other features, e.g. ``"fd_clip"``). ``prior_sources``: {name: path} recorded in
    shards' settings. ``image_scorer``: more per-image numbers of the generated images, an object with ``name``
    (stored in the image shards' settings), ``score(images, rows) -> {key: (n, ...) tensor}`` for the PIL images of
    pairs ``rows`` and ``summarize({key: (N, ...) tensor over every pair, in order}) -> dict`` (added to each
    entry); e.g. ``shifted_diffusion.toy.attribute_scorer.ToyAttributeScorer``."""

    def __init__(self, pairs: Sequence[EvalPair], priors: Mapping[str, object], output_dir, settings: EvalSettings,
                 *, decoder=None, eval_clip=None, fid_metric=None, fd_name: str = "fid",
                 prior_sources: Optional[Mapping[str, str]] = None, decoder_source: str = "", image_scorer=None,
                 state=None, progress: bool = True):
        from accelerate import PartialState

        if not pairs:
            raise ValueError("the evaluation set is empty")
        if decoder is not None:
            if eval_clip is None or fid_metric is None:
                raise ValueError("a decoder needs eval_clip (the CLIP scores) and fid_metric (FID)")
            for name, prior in priors.items():
                check_prior_fits_decoder(name, prior, decoder)
        missing = [p.image for p in pairs if not Path(p.image).is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} evaluation images do not exist, e.g. {missing[0]}")
        self.pairs, self.priors, self.settings = list(pairs), dict(priors), settings
        self.decoder, self.eval_clip, self.fid_metric = decoder, eval_clip, fid_metric
        self.output_dir = Path(output_dir)
        self.store = ShardStore(self.output_dir / "shards")
        self.prior_sources = dict(prior_sources or {name: name for name in priors})
        self.decoder_source = decoder_source
        self.fd_name, self.image_scorer = fd_name, image_scorer
        self.state = state or PartialState()
        self.progress = progress
        self.fingerprint = pairs_fingerprint(self.pairs)
        size = settings.shard_size
        self.shards = [range(start, min(start + size, len(self.pairs))) for start in range(0, len(self.pairs), size)]
        # the unrelated caption of caption i: the one half the set away (a different image whenever one exists)
        self.unrelated = [(i + max(1, len(self.pairs) // 2)) % len(self.pairs) for i in range(len(self.pairs))]

    # ---- shards ---------------------------------------------------------------------------------------

    def _mine(self):
        return [self.shards[i] for i in process_shards(len(self.shards), self.state.process_index,
                                                       self.state.num_processes)]

    def _meta(self, stage: str, rows: range, **extra) -> dict:
        return {"stage": stage, "pairs": self.fingerprint, "rows": [rows.start, rows.stop], **extra}

    def _images(self, rows: range):
        from .data import open_rgb

        return [open_rgb(self.pairs[i].image) for i in rows]

    def _run(self, jobs, desc: str):
        """Compute this process's (key, meta, compute) jobs (finished ones are skipped), then wait for all."""
        from tqdm.auto import tqdm

        for key, meta, compute in tqdm(jobs, desc=desc, disable=not (self.progress and self.state.is_main_process)):
            self.store.load_or_compute(key, meta, compute)
        self.state.wait_for_everyone()

    def _gather(self, keys_metas) -> Dict[str, torch.Tensor]:
        parts = [self.store.load(key, meta) for key, meta in keys_metas]
        if any(part is None for part in parts):
            raise RuntimeError("a shard is missing after every process finished (another run wrote the output folder?)")
        return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}

    # ---- stages ---------------------------------------------------------------------------------------

    def _real_jobs(self, mine=True):
        s = self.settings
        fid_id = fid_identity(self.fid_metric) if self.fid_metric is not None else None
        for rows in (self._mine() if mine else self.shards):
            meta = self._meta("real", rows, image_size=s.image_size, fid=fid_id,
                              clip=getattr(self.eval_clip, "spec", None) if self.eval_clip is not None else None)

            def compute(rows=rows):
                images = self._images(rows)
                return {"fid": fid_features(self.fid_metric, images_to_uint8(images, s.image_size)),
                        "clip_image": self.eval_clip.encode_image(images).float().cpu(),
                        "clip_text": self.eval_clip.encode_text([self.pairs[i].caption for i in rows]).float().cpu()}
            yield f"real/{rows.start:08d}", meta, compute

    def _prior_real_jobs(self, name, mine=True):
        prior = self.priors[name]
        for rows in (self._mine() if mine else self.shards):
            meta = self._meta("prior_real", rows, prior=self.prior_sources[name])

            def compute(rows=rows):
                prior.load_encoders()
                return {"image": prior.clip.encode_image(self._images(rows)).float().cpu(),
                        "text": prior.clip.encode_text([self.pairs[i].caption for i in rows]).float().cpu(),
                        # the CLIP blocks, kept with the shard: a resumed run need not load the CLIPs
                        "block_sizes": torch.tensor([list(prior.clip.block_sizes)] * len(rows))}
            yield f"{name}/real/{rows.start:08d}", meta, compute

    def _embed_jobs(self, name, prior_scale, mine=True):
        s, prior = self.settings, self.priors[name]
        for rows in (self._mine() if mine else self.shards):
            meta = self._meta("embeds", rows, prior=self.prior_sources[name], prior_guidance_scale=float(prior_scale),
                              steps=str(s.prior_num_inference_steps), seed=s.seed)

            def compute(rows=rows):
                clip_text, tokens = prior.encode_prompt([self.pairs[i].caption for i in rows])
                null_text, null_tokens = prior.encode_prompt([""])
                generator = torch.Generator(device=prior.device).manual_seed(s.seed + rows.start)
                common = dict(num_inference_steps=s.prior_num_inference_steps, guidance_scale=float(prior_scale))
                embeds = prior.sample(clip_text, tokens, generator=generator, **common)
                negative = prior.sample(null_text, null_tokens, generator=generator, **common)
                return {"embeds": embeds.float().cpu(), "negative": negative.float().cpu()}
            yield f"{name}/pg{_scale_name(prior_scale)}/embeds/{rows.start:08d}", meta, compute

    def _image_jobs(self, name, prior_scale, scale, mine=True):
        s = self.settings
        embed_jobs = {job[0]: job for job in self._embed_jobs(name, prior_scale, mine=False)}
        for rows in (self._mine() if mine else self.shards):
            embed_key = f"{name}/pg{_scale_name(prior_scale)}/embeds/{rows.start:08d}"
            meta = self._meta("images", rows, embeds=embed_jobs[embed_key][1], decoder=self.decoder_source,
                              guidance_scale=float(scale), steps=int(s.num_inference_steps), image_size=s.image_size,
                              fid=fid_identity(self.fid_metric), negative=s.negative,
                              scorer=getattr(self.image_scorer, "name", None))
            folder = self.output_dir / "images" / name / f"pg{_scale_name(prior_scale)}_g{_scale_name(scale)}"

            def compute(rows=rows, embed_key=embed_key):
                embeds = self.store.load(embed_key, embed_jobs[embed_key][1])
                uses_negative = s.negative == "prior" and getattr(self.decoder, "takes_negative", True)
                negative = embeds["negative"][0] if uses_negative else None
                device = getattr(self.decoder, "device", torch.device("cpu"))
                generators = [torch.Generator(device=device).manual_seed(s.seed + i) for i in rows]
                images = self.decoder.generate(embeds["embeds"], guidance_scale=float(scale),
                                               num_inference_steps=int(s.num_inference_steps),
                                               negative_embeds=negative, generator=generators,
                                               height=s.image_size, width=s.image_size)
                if s.save_images:
                    folder.mkdir(parents=True, exist_ok=True)
                    for i, image in zip(rows, images):
                        image.save(folder / f"{i:06d}.png")
                scores = self.image_scorer.score(images, rows) if self.image_scorer is not None else {}
                return {"fid": fid_features(self.fid_metric, images_to_uint8(images, s.image_size)),
                        "clip_image": self.eval_clip.encode_image(images).float().cpu(),
                        **{f"score/{key}": value for key, value in scores.items()}}
            yield f"{name}/pg{_scale_name(prior_scale)}/g{_scale_name(scale)}/{rows.start:08d}", meta, compute

    # ---- the whole comparison ----------------------------------------------------------------------------

    def real_fid_state(self) -> Dict[str, torch.Tensor]:
        """The real images' FID statistics, cached in ``real_fid_stats.safetensors`` for this image list."""
        meta = {"stage": "real_fid_stats", "pairs": self.fingerprint, "image_size": self.settings.image_size,
                "fid": fid_identity(self.fid_metric)}
        return self.store.load_or_compute("real_fid_stats", meta,
                                          lambda: real_fid_state(self._gather(
                                              [(k, m) for k, m, _ in self._real_jobs(mine=False)])["fid"]))

    def run(self) -> Optional[dict]:
        """Every number (the main process; None on the others), written to ``results.json``."""
        s = self.settings
        real = None
        if self.decoder is not None:
            self._run(list(self._real_jobs()), "real images")
            real = self._gather([(k, m) for k, m, _ in self._real_jobs(mine=False)])
        for name in self.priors:
            self._run(list(self._prior_real_jobs(name)), f"{name}: real embeddings")
            for prior_scale in s.prior_guidance_scales:
                self._run(list(self._embed_jobs(name, prior_scale)), f"{name}: prior pg={prior_scale}")
                if self.decoder is not None:
                    for scale in s.guidance_scales:
                        self._run(list(self._image_jobs(name, prior_scale, scale)),
                                  f"{name}: images pg={prior_scale} g={scale}")
        if not self.state.is_main_process:
            return None
        real_state = self.real_fid_state() if self.decoder is not None else None
        results = {"settings": {**asdict(s), "num_captions": len(self.pairs), "pairs_fingerprint": self.fingerprint,
                                "priors": self.prior_sources, "decoder": self.decoder_source or None,
                                "eval_clip": getattr(self.eval_clip, "spec", None),
                                "fd_name": self.fd_name if self.decoder is not None else None,
                                "fd_features": fid_identity(self.fid_metric) if self.fid_metric is not None else None,
                                "image_scorer": getattr(self.image_scorer, "name", None)},
                   "priors": {}}
        for name in self.priors:
            prior_real = self._gather([(k, m) for k, m, _ in self._prior_real_jobs(name, mine=False)])
            blocks = prior_real["block_sizes"][0].tolist()
            entries = []
            for prior_scale in s.prior_guidance_scales:
                embeds = self._gather([(k, m) for k, m, _ in self._embed_jobs(name, prior_scale, mine=False)])["embeds"]
                prior_numbers = prior_embedding_metrics(embeds, prior_real["image"], prior_real["text"],
                                                        self.unrelated, blocks)
                if self.decoder is None:
                    entries.append({"prior_guidance_scale": float(prior_scale), **prior_numbers})
                    continue
                for scale in s.guidance_scales:
                    fake = self._gather([(k, m) for k, m, _ in self._image_jobs(name, prior_scale, scale, mine=False)])
                    scores = {key[len("score/"):]: value for key, value in fake.items() if key.startswith("score/")}
                    entries.append({"prior_guidance_scale": float(prior_scale), "guidance_scale": float(scale),
                                    **prior_numbers,
                                    self.fd_name: fid_from_features(self.fid_metric, real_state, fake["fid"]),
                                    **clip_scores(fake["clip_image"], real["clip_text"], real["clip_image"],
                                                  list(self.eval_clip.block_sizes)),
                                    **(self.image_scorer.summarize(scores) if self.image_scorer is not None else {})})
            results["priors"][name] = entries
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
        return results


def prior_embedding_metrics(generated, own_image, text, unrelated: Sequence[int], block_sizes) -> dict:
    """Mean per-block cosine of each generated embedding to its caption's image / text embedding and to the
    unrelated caption's image embedding (rows ``unrelated``)."""
    def mean_cos(a, b):
        return float(blockwise_cosine(a, b, block_sizes)[1].mean())

    return {"prior_cos_image": mean_cos(generated, own_image), "prior_cos_text": mean_cos(generated, text),
            "prior_cos_unrelated": mean_cos(generated, own_image[list(unrelated)])}


def clip_scores(generated_image, caption_text, real_image, block_sizes) -> dict:
    """The seed's CLIP scores: per-block cosine of each generated image's CLIP embedding to its caption's text
    embedding and to its ground-truth image's embedding, averaged over blocks, then captions (per block too)."""
    text_blocks, text_mean = blockwise_cosine(generated_image, caption_text, block_sizes)
    image_blocks, image_mean = blockwise_cosine(generated_image, real_image, block_sizes)
    return {"clip_image_text": float(text_mean.mean()), "clip_image_image": float(image_mean.mean()),
            "clip_image_text_per_block": text_blocks.mean(0).tolist(),
            "clip_image_image_per_block": image_blocks.mean(0).tolist()}
