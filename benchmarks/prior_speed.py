"""Speed of ShiftedPrior vs the original network (x_transformers 0.28.4 trunk), same weights.

    python benchmarks/prior_speed.py --preset tiny|small|large [--batch B] [--json out.json]
                                     [--dtype bf16|fp16|fp32] [--compile] [--no-cuda-graphs]

Times, in one run and on one device:
  * train_step: forward + backward + AdamW (fused on CUDA) on B captions, one timestep each, autocast;
  * train_prefix_shared_k{K}: ours only, the same B captions x K timesteps each (B*K pairs), the caption
    prefix computed once per caption (`timesteps_per_caption` K in training); the reference has no such
    path, so its ratio is taken against the reference's plain train_step (pairs/s);
  * ema_step: the training loop's EMA update of all weights, ours (`FusedEMA`, one multi-tensor lerp) vs
    diffusers' `EMAModel` (tensor by tensor), on our network's weights;
  * sample_guided_{S}steps_{N}: classifier-free guided ancestral sampling of N prompts in S steps.
    Ours: cond + uncond prefixes built once, then S tail-only steps (optionally as one CUDA graph);
    reference: the whole sequence through the trunk at every step, batch doubled;
  * peak CUDA memory of each phase;
  * with --profile (CUDA): each phase's GPU kernel time per call by kind (matmul, attention, optimizer,
    copies/casts, other elementwise) and its top kernels, next to the wall time.
Prints (and optionally writes) one JSON object with ours, reference, ratios (ours speed / reference
speed) and the device name. Nothing here is asserted; tests/test_prior_speed_smoke.py runs it tiny.
Run from a checkout with the package installed (``pip install -e .``); the original network is read from
tests/reference_prior.py.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import platform
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F

from shifted_diffusion.convert import convert_original_state_dict
from shifted_diffusion.cuda_graph import GraphedCall
from shifted_diffusion.encoders import DTYPE_NAMES, parse_dtype
from shifted_diffusion.guidance import classifier_free_guidance, guided_denoiser
from shifted_diffusion.prior import PriorConfig, ShiftedPrior
from shifted_diffusion.sampling import sample_ancestral
from shifted_diffusion.schedule import DiffusionSchedule, ScheduleConfig

DEFAULT_BATCH = {"tiny": 16, "small": 64, "large": 64}


# The original network is test code (tests/reference_prior.py, not in the package): read from this checkout.
REFERENCE_FILE = Path(__file__).resolve().parents[1] / "tests" / "reference_prior.py"


def load_reference_module():
    """tests/reference_prior.py, loaded by path as a file of this checkout (needs x_transformers==0.28.4)."""
    if not REFERENCE_FILE.is_file():
        raise SystemExit(f"prior_speed: {REFERENCE_FILE} not found: run this benchmark from a checkout of the "
                         "repository (the reference network is test code, not part of the installed package)")
    spec = importlib.util.spec_from_file_location("_reference_prior", REFERENCE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- timing helpers ---------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def _time(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> float:
    """Seconds per call (mean over `iters`, after `warmup` calls), synchronised around the timer."""
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / iters


_KERNEL_KINDS = (  # first match wins; names of cuBLAS / CUTLASS / flash / PyTorch kernels
    ("attention", re.compile(r"flash|fmha|attention|softmax", re.I)),
    ("matmul", re.compile(r"gemm|nvjet|cutlass|xmma|cublas", re.I)),
    ("optimizer", re.compile(r"adam|multi_tensor", re.I)),
    ("copy_cast", re.compile(r"copy|cat_|CatArray|fill", re.I)),
)


def profile_kernels(fn: Callable[[], Any], device: torch.device, calls: int = 2, top: int = 12) -> Dict[str, Any]:
    """GPU kernel time per call of `fn` by kind, and the `top` kernels (torch.profiler, CUDA only)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    _sync(device)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        _sync(device)
    wall_ms = (time.perf_counter() - start) * 1e3 / calls
    annotations = {e.name for e in prof.events() if getattr(e, "is_user_annotation", False)}  # not kernels
    kernels = [(e.key, e.self_device_time_total / 1e3 / calls, e.count // calls) for e in prof.key_averages()
               if e.self_device_time_total > 0 and e.device_type == torch.autograd.DeviceType.CUDA
               and e.key not in annotations]
    by_kind: Dict[str, float] = {}
    for name, ms, _ in kernels:
        kind = next((k for k, pattern in _KERNEL_KINDS if pattern.search(name)), "other")
        by_kind[kind] = by_kind.get(kind, 0.0) + ms
    kernels.sort(key=lambda k: -k[1])
    return {
        "wall_ms_profiled": round(wall_ms, 3),
        "gpu_kernel_ms": round(sum(ms for _, ms, _ in kernels), 3),
        "kernel_ms_by_kind": {k: round(v, 3) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"name": name[:120], "ms": round(ms, 3), "launches": n} for name, ms, n in kernels[:top]],
    }


def _autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)


# ---- inputs ---------------------------------------------------------------------------------------


def _captions(config: PriorConfig, n: int, device: torch.device, gen: torch.Generator) -> Dict[str, torch.Tensor]:
    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    return dict(
        text_tokens=randn(n, config.text_len, config.text_dim),
        clip_text_emb=randn(n, config.clip_dim),
        cluster_idx=torch.randint(0, config.vocab_size or 1, (n,), generator=gen).to(device),
        shift_mean=randn(n, config.clip_dim) * 0.1,
        shift_std=randn(n, config.clip_dim).abs() * 0.1 + 0.5,
    )


def _pairs(config: PriorConfig, n: int, device: torch.device, gen: torch.Generator) -> Dict[str, torch.Tensor]:
    batch = _captions(config, n, device, gen)
    batch.update(
        x_t=torch.randn(n, config.clip_dim, generator=gen).to(device),
        x0=torch.randn(n, config.clip_dim, generator=gen).to(device),
        timesteps=torch.randint(0, 1000, (n,), generator=gen).to(device),
    )
    return batch


# ---- phases ---------------------------------------------------------------------------------------


def _optimizer(model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    kwargs = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(model.parameters(), lr=1e-5, **kwargs)


def _measure(fn: Callable[[], Any], device, warmup: int, iters: int, profile: bool):
    """(seconds per call, {peak memory[, kernel profile]}) of `fn`."""
    _reset_peak(device)
    seconds = _time(fn, device, warmup, iters)
    measured: Dict[str, Any] = {"peak_mem_mib": _peak_mib(device)}
    if profile:
        measured["profile"] = profile_kernels(fn, device)
    return seconds, measured


def bench_train(
    loss_fn: Callable[[], torch.Tensor], model: torch.nn.Module, device, dtype, pairs: int, warmup: int, iters: int,
    profile: bool = False,
) -> Dict[str, Any]:
    """forward + backward + optimizer step on `pairs` pairs under autocast."""
    opt = _optimizer(model, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def step():
        with _autocast(device, dtype):
            loss = loss_fn()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    seconds, measured = _measure(step, device, warmup, iters, profile)
    result = {"pairs": pairs, "ms_per_step": round(seconds * 1e3, 3), "pairs_per_s": round(pairs / seconds, 2),
              **measured}
    del opt
    model.zero_grad(set_to_none=True)
    return result


def bench_ema(which: str, model: torch.nn.Module, device, warmup: int, iters: int) -> Dict[str, Any]:
    """One EMA update of all of `model`'s weights, "ours" (FusedEMA) or "reference" (diffusers' EMAModel);
    the EMA's shadow copy is built here and freed after. (diffusers is imported here: the benchmark's other
    phases run without it.)"""
    from diffusers.training_utils import EMAModel

    from shifted_diffusion.ema import FusedEMA

    ema_cls = FusedEMA if which == "ours" else EMAModel
    params = list(model.parameters())
    ema = ema_cls(params, decay=0.9999)
    seconds, measured = _measure(lambda: ema.step(params), device, warmup, iters, False)
    del ema
    return {"ms_per_step": round(seconds * 1e3, 3), "steps_per_s": round(1 / seconds, 2), **measured}


def bench_sampling(
    sample_fn: Callable[[], torch.Tensor], device, n: int, warmup: int, iters: int, profile: bool = False
) -> Dict[str, Any]:
    seconds, measured = _measure(sample_fn, device, warmup, iters, profile)
    return {"prompts": n, "ms_per_batch": round(seconds * 1e3, 3), "prompts_per_s": round(n / seconds, 2),
            **measured}


def _sampling_context(model, device, dtype):
    """Autocast for fp32 weights; none for a network already cast to the sampling dtype."""
    return _autocast(device, dtype) if next(model.parameters()).dtype == torch.float32 else contextlib.nullcontext()


SAMPLER_INPUTS = ("text_tokens", "clip_text_emb", "cluster_idx", "shift_mean", "shift_std")


def _ours_guided(model, schedule, null_text, null_clip, scale, device, dtype):
    """Guided sampling as a function of the prompts' tensors: cached cond + uncond prefixes, tail-only steps."""
    def sample(text_tokens, clip_text_emb, cluster_idx, shift_mean, shift_std, generator=None):
        with _sampling_context(model, device, dtype):
            den = guided_denoiser(model, text_tokens, clip_text_emb, cluster_idx,
                                 guidance_scale=scale, null_text_tokens=null_text, null_clip_text_emb=null_clip)
            return sample_ancestral(den, schedule, shift_mean, shift_std, generator=generator)
    return sample


def _ours_sampler(model, schedule, caps, null_text, null_clip, scale, device, dtype):
    sample = _ours_guided(model, schedule, null_text, null_clip, scale, device, dtype)

    def run():
        with torch.inference_mode():
            return sample(**{name: caps[name] for name in SAMPLER_INPUTS})
    return run


def _ours_graph_sampler(model, schedule, caps, null_text, null_clip, scale, device, dtype):
    """The whole guided sampling (prefix encoding included) as one CUDA graph (`GraphedCall`, as
    `ShiftedDiffusionPriorPipeline.sample(cuda_graph=True)` does); each call copies the inputs in and the output out."""
    inputs = {name: caps[name] for name in SAMPLER_INPUTS}
    with torch.no_grad():
        graphed = GraphedCall(_ours_guided(model, schedule, null_text, null_clip, scale, device, dtype), inputs)

    def replay():
        with torch.no_grad():
            return graphed(**inputs)
    return replay


@contextlib.contextmanager
def _no_tf32():
    """fp32 matmuls in full fp32 (the timing phases allow TF32 on CUDA)."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def sampling_vs_reference(ours, ref, schedule, caps, null_text, null_clip, scale, device) -> float:
    """Max |difference| of our guided sampler (cached prefixes, empty caption encoded once, tail-only
    steps) from the original's (whole sequence at every step), fp32, same weights and seed."""
    fp32 = (schedule, caps, null_text, null_clip, scale, device, torch.float32)
    with _no_tf32():
        torch.manual_seed(4321)
        ours_out = _ours_sampler(ours, *fp32)()
        torch.manual_seed(4321)
        ref_out = _reference_sampler(ref, *fp32)()
    return (ours_out - ref_out).abs().max().item()


def exactness_checks(ours, config, device, gen, sample_args) -> Dict[str, float]:
    """Max |difference| of the fast paths against the plain ones (reported, not asserted), in the
    network's own dtype: the cached-prefix sampling denoiser (the sampling attention kernels) vs the full forward, and,
    on CUDA, the CUDA-graph sampler vs the same sampler run eagerly from the same seed."""
    checks: Dict[str, float] = {}
    inp = _pairs(config, 8, device, gen)
    with _no_tf32(), torch.no_grad():
        dt = next(ours.parameters()).dtype  # the plain forward takes inputs in the network's dtype
        full = ours(inp["x_t"].to(dt), inp["timesteps"], inp["cluster_idx"], inp["text_tokens"].to(dt),
                    inp["clip_text_emb"].to(dt)).float()
        den = guided_denoiser(ours, inp["text_tokens"], inp["clip_text_emb"], inp["cluster_idx"])
        cached = den(inp["x_t"], inp["timesteps"])
    checks["cached_vs_full_forward_max_abs"] = (cached - full).abs().max().item()
    checks["full_forward_max_abs_value"] = full.abs().max().item()
    if device.type == "cuda":
        torch.cuda.manual_seed(1234)
        eager = _ours_sampler(ours, *sample_args)()
        graph = _ours_graph_sampler(ours, *sample_args)
        torch.cuda.manual_seed(1234)
        checks["cuda_graph_vs_eager_sampling_max_abs"] = (graph() - eager).abs().max().item()
    return checks


def _reference_sampler(ref, schedule, caps, null_text, null_clip, scale, device, dtype):
    def run():
        with torch.inference_mode(), _autocast(device, dtype):
            n = caps["text_tokens"].shape[0]
            text = torch.cat([caps["text_tokens"], null_text.expand(n, -1, -1)])
            uncond_clip = caps["clip_text_emb"] if null_clip is None else null_clip.expand(n, -1)
            clip = torch.cat([caps["clip_text_emb"], uncond_clip])
            idx = torch.cat([caps["cluster_idx"], caps["cluster_idx"]])

            def den(x_t, t):
                x0 = ref(torch.cat([x_t, x_t]), torch.cat([t, t]), text, clip, idx)
                cond, uncond = x0.chunk(2)
                return classifier_free_guidance(cond, uncond, scale)

            return sample_ancestral(den, schedule, caps["shift_mean"], caps["shift_std"])
    return run


def _maybe_compile(module, enabled: bool, errors: Dict[str, str], name: str):
    if not enabled:
        return module
    try:
        return torch.compile(module)
    except Exception as err:  # noqa: BLE001 - benchmark keeps going in eager mode
        errors[f"compile_{name}"] = repr(err)
        return module


def _guarded(errors: Dict[str, str], name: str, fn: Callable[[], Any]) -> Optional[Any]:
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - report and continue
        errors[name] = f"{type(err).__name__}: {err}"
        traceback.print_exc(file=sys.stderr)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None


def _train_with_fallback(errors, name, loss_fn, eager_loss_fn, model, device, dtype, batch, args):
    """The (compiled, if --compile) training step; on a compile failure, the eager one (error recorded)."""
    result = _guarded(errors, name, lambda: bench_train(loss_fn, model, device, dtype, batch, args.warmup, args.iters,
                                                        args.profile))
    if result is not None:
        result["compiled"] = bool(args.compile)
    elif args.compile:
        result = _guarded(errors, name + "_eager",
                          lambda: bench_train(eager_loss_fn, model, device, dtype, batch, args.warmup, args.iters,
                                              args.profile))
        if result is not None:
            result["compiled"] = False
    return result


def _ratio(ours: Optional[dict], ref: Optional[dict], key: str) -> Optional[float]:
    if not ours or not ref:
        return None
    return round(ours[key] / ref[key], 3)


# ---- main -------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", choices=["tiny", "small", "large"])
    p.add_argument("--batch", type=int, default=None,
                   help="captions per training step (x K timesteps each in the prefix-shared step)")
    p.add_argument("--k", type=int, default=4, help="timesteps per caption in prefix-shared training")
    p.add_argument("--prompts", default="64,256", help="comma-separated prompt counts for sampling")
    p.add_argument("--steps", type=int, default=8, help="sampling steps (respaced schedule)")
    p.add_argument("--guidance-scale", type=float, default=3.0)
    p.add_argument("--uncond-clip", default="shared", choices=["shared", "per-prompt"],
                   help="CLIP sentence embedding of guidance's unconditional branch: the empty caption's for all "
                        "prompts, or each prompt's own (the prior pipeline's default for priors with text tokens)")
    p.add_argument("--dtype", default=None, choices=DTYPE_NAMES, help="autocast dtype (bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--device", default=None)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="torch.compile both networks for the training step")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="also time our sampling captured as a CUDA graph (CUDA only)")
    p.add_argument("--grad-checkpointing", action="store_true", help="ours only")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--profile", action="store_true",
                   help="CUDA: add each phase's kernel-time breakdown (torch.profiler, after the timing)")
    p.add_argument("--json", default=None, help="also write the JSON here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default 1 on CPU: small ops on a shared machine)")
    return p


def main(argv=None) -> Dict[str, Any]:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads = args.threads or (1 if device.type == "cpu" else None)
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(args, device)
    finally:
        torch.set_num_threads(previous_threads)


def _run(args: argparse.Namespace, device: torch.device) -> Dict[str, Any]:
    dtype = parse_dtype(args.dtype or ("bf16" if device.type == "cuda" else "fp32"), "--dtype")
    args.profile = args.profile and device.type == "cuda"
    batch = args.batch or DEFAULT_BATCH[args.preset]
    if batch < 1 or args.k < 1:
        raise SystemExit(f"--batch ({batch}) and --k ({args.k}) must be >= 1")
    prompt_counts = [int(n) for n in args.prompts.split(",") if n.strip()]
    config = PriorConfig.preset(args.preset, grad_checkpointing=args.grad_checkpointing)
    torch.manual_seed(args.seed)
    ref_mod = load_reference_module()
    with torch.device(device):  # initialise on the device (fast for the 1B-parameter presets)
        ref = ref_mod.ReferenceClipPrior.from_config(config)
        ours = ShiftedPrior.from_prior_config(config)
    ours.load_state_dict(convert_original_state_dict(ref.state_dict()))  # same weights
    ref.train()
    ours.train()
    gen = torch.Generator().manual_seed(args.seed + 1)
    errors: Dict[str, str] = {}

    schedule = DiffusionSchedule.from_config(ScheduleConfig()).respace(args.steps).to(device)
    null_text = torch.randn(config.text_len, config.text_dim, generator=gen).to(device)
    # the unconditional caption: empty text tokens and an empty-caption CLIP embedding shared by all prompts,
    # or (--uncond-clip per-prompt, the prior pipeline's default for T5 priors) each prompt's own CLIP embedding
    null_clip = torch.randn(config.clip_dim, generator=gen).to(device) if args.uncond_clip == "shared" else None
    checks: Dict[str, Any] = {}
    if not args.skip_reference:  # before the training phases update the two networks separately
        ref.eval()
        ours.eval()
        checks["sampling_vs_reference_fp32_max_abs"] = _guarded(errors, "checks_sampling_vs_reference", lambda: (
            sampling_vs_reference(ours, ref, schedule, _captions(config, 4, device, gen), null_text, null_clip,
                                  args.guidance_scale, device)))
        ref.train()
        ours.train()

    # same weights -> same outputs (fp32, a sanity check of the comparison)
    check = _pairs(config, 4, device, gen)
    with torch.no_grad():
        diff = (ours(check["x_t"], check["timesteps"], check["cluster_idx"], check["text_tokens"], check["clip_text_emb"])
                - ref(check["x_t"], check["timesteps"], check["text_tokens"], check["clip_text_emb"],
                      check["cluster_idx"])).abs().max().item()

    if device.type == "cuda":  # after the fp32 check; autocast dtypes are unaffected
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    results: Dict[str, Dict[str, Any]] = {"ours": {}, "reference": {}}
    train = _pairs(config, batch, device, gen)
    ours_step = _maybe_compile(ours, args.compile, errors, "ours")
    ref_step = _maybe_compile(ref, args.compile, errors, "reference")

    def ours_loss():
        out = ours_step(train["x_t"], train["timesteps"], train["cluster_idx"], train["text_tokens"],
                        train["clip_text_emb"])
        return F.mse_loss(out.float(), train["x0"])

    def ours_eager_loss():
        out = ours(train["x_t"], train["timesteps"], train["cluster_idx"], train["text_tokens"], train["clip_text_emb"])
        return F.mse_loss(out.float(), train["x0"])

    def ref_eager_loss():
        out = ref(train["x_t"], train["timesteps"], train["text_tokens"], train["clip_text_emb"], train["cluster_idx"])
        return F.mse_loss(out.float(), train["x0"])

    def ref_loss():
        out = ref_step(train["x_t"], train["timesteps"], train["text_tokens"], train["clip_text_emb"],
                       train["cluster_idx"])
        return F.mse_loss(out.float(), train["x0"])

    k = args.k
    shared = _pairs(config, batch * k, device, gen)  # B*K (x_t, t, x0) rows ...
    shared_caps = {key: train[key] for key in ("text_tokens", "clip_text_emb")}  # ... on the B captions

    def shared_forward(text_tokens, clip_text_emb, x_t, timesteps, cluster_idx):
        prefix = ours.encode_prefix(text_tokens, clip_text_emb)  # (B/K) captions, with grad
        return ours.forward_cached(prefix, x_t, timesteps, cluster_idx)  # B*K pairs

    shared_step = _maybe_compile(shared_forward, args.compile, errors, "ours_shared")

    def ours_shared_loss(fn=shared_step):
        out = fn(shared_caps["text_tokens"], shared_caps["clip_text_emb"], shared["x_t"], shared["timesteps"],
                 shared["cluster_idx"])
        return F.mse_loss(out.float(), shared["x0"])

    def ours_shared_eager_loss():
        return ours_shared_loss(shared_forward)

    results["ours"]["train_step"] = _train_with_fallback(
        errors, "ours_train_step", ours_loss, ours_eager_loss, ours, device, dtype, batch, args)
    results["ours"][f"train_prefix_shared_k{k}"] = _train_with_fallback(
        errors, "ours_train_prefix_shared", ours_shared_loss, ours_shared_eager_loss, ours, device, dtype,
        batch * k, args)
    if not args.skip_reference:
        results["reference"]["train_step"] = _train_with_fallback(
            errors, "reference_train_step", ref_loss, ref_eager_loss, ref, device, dtype, batch, args)
    del ours_step, ref_step, shared_step, train, shared
    # the training loop's EMA update: ours (one multi-tensor lerp) vs diffusers' EMAModel (tensor by tensor)
    results["ours"]["ema_step"] = _guarded(errors, "ours_ema_step",
                                           lambda: bench_ema("ours", ours, device, args.warmup, args.iters))
    if not args.skip_reference:
        results["reference"]["ema_step"] = _guarded(errors, "reference_ema_step",
                                                    lambda: bench_ema("reference", ours, device, args.warmup, args.iters))
    ours.eval()
    ref.eval()
    ours_lowp = copy.deepcopy(ours).to(dtype) if dtype != torch.float32 else None

    sample_iters = max(1, args.iters // 2)
    key = f"sample_guided_{args.steps}steps"
    for n in prompt_counts:
        caps = _captions(config, n, device, gen)
        sample_args = (schedule, caps, null_text, null_clip, args.guidance_scale, device, dtype)
        results["ours"][f"{key}_{n}"] = _guarded(
            errors, f"ours_{key}_{n}",
            lambda: bench_sampling(_ours_sampler(ours, *sample_args), device, n, args.warmup, sample_iters,
                                   args.profile))
        if not args.skip_reference:
            results["reference"][f"{key}_{n}"] = _guarded(
                errors, f"reference_{key}_{n}",
                lambda: bench_sampling(_reference_sampler(ref, *sample_args), device, n, args.warmup, sample_iters))
        if ours_lowp is not None:  # inference weights in the autocast dtype: no per-step weight casts
            results["ours"][f"{key}_{n}_lowp_weights"] = _guarded(
                errors, f"ours_{key}_{n}_lowp_weights",
                lambda: bench_sampling(_ours_sampler(ours_lowp, *sample_args), device, n, args.warmup, sample_iters,
                                   args.profile))
        if device.type == "cuda" and args.cuda_graphs:  # last: a failed capture must not spoil the others
            graph_model = ours_lowp if ours_lowp is not None else ours
            results["ours"][f"{key}_{n}_cuda_graph"] = _guarded(
                errors, f"ours_{key}_{n}_cuda_graph",
                lambda: bench_sampling(_ours_graph_sampler(graph_model, *sample_args), device, n, 1, sample_iters))

    for name, model in (("fp32_weights", ours), ("lowp_weights", ours_lowp)):
        if model is not None:
            check_args = (schedule, _captions(config, 4, device, gen), null_text, null_clip, args.guidance_scale,
                          device, dtype)
            checks[name] = _guarded(errors, f"checks_{name}",
                                    lambda: exactness_checks(model, config, device, gen, check_args))
    ref_train = results["reference"].get("train_step")
    ratios: Dict[str, Optional[float]] = {
        "train_step": _ratio(results["ours"]["train_step"], ref_train, "pairs_per_s"),
        f"train_prefix_shared_k{k}": _ratio(results["ours"][f"train_prefix_shared_k{k}"], ref_train, "pairs_per_s"),
        "ema_step": _ratio(results["ours"]["ema_step"], results["reference"].get("ema_step"), "steps_per_s"),
    }
    for n in prompt_counts:
        ref_s = results["reference"].get(f"{key}_{n}")
        ratios[f"{key}_{n}"] = _ratio(results["ours"][f"{key}_{n}"], ref_s, "prompts_per_s")
        for variant in ("lowp_weights", "cuda_graph"):
            if f"{key}_{n}_{variant}" in results["ours"]:
                ratios[f"{key}_{n}_{variant}"] = _ratio(results["ours"][f"{key}_{n}_{variant}"], ref_s, "prompts_per_s")

    import x_transformers  # noqa: F401 - version string only

    report = {
        "preset": args.preset,
        "config": config.to_dict(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu"),
        "device_type": device.type,
        "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "x_transformers": getattr(x_transformers, "__version__", None) or _dist_version("x-transformers"),
        "batch_captions": batch,
        "k": k,
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "uncond_clip": args.uncond_clip,
        "compile": args.compile,
        "cpu_threads": torch.get_num_threads(),
        "warmup": args.warmup,
        "iters": args.iters,
        "max_abs_diff_fp32_ours_vs_reference": diff,
        "ours": results["ours"],
        "reference": results["reference"],
        "ratios": ratios,
        "checks": checks,
        "errors": errors,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return report


def _dist_version(name: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001
        return None


if __name__ == "__main__":
    main()
