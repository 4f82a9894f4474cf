"""CUDA-graph sampling: PriorPipeline.sample(cuda_graph=True) and GraphedCall.

On CPU: the errors, and the pipeline's graph cache (capture once per signature, most recent kept,
the captured function fed the call's own inputs) with the capture replaced by an eager stand-in. On a
CUDA machine also the real capture: a graphed call equals the eager one for the same seed, reads new
inputs on every replay, and draws from the caller's generator exactly as the eager call does."""

import pytest
import torch

import shifted_diffusion.prior_pipeline as prior_pipeline
from shifted_diffusion.cuda_graph import GraphedCall
from shifted_diffusion.guidance import guided_denoiser
from shifted_diffusion.sampling import sample_ancestral
from shifted_diffusion.schedule import DiffusionSchedule, ScheduleConfig

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_schedule_to_moves_every_table():
    schedule = DiffusionSchedule.from_config(ScheduleConfig()).respace(8)
    assert schedule.to("cpu") is schedule
    moved = schedule.to("meta")
    for name, value in vars(schedule).items():
        if isinstance(value, torch.Tensor):
            assert getattr(moved, name).device.type == "meta" and getattr(moved, name).dtype == value.dtype, name
            assert value.device.type == "cpu", name  # the original is untouched
    assert moved.num_steps == 8


def test_graphed_call_rejects_cpu_inputs(tiny_prior_pipeline, prior_captions):
    with pytest.raises(ValueError, match="CUDA device; got inputs on \\['cpu'\\]"):
        GraphedCall(lambda x, generator: x * 2, {"x": torch.ones(2)})
    clip_text, tokens = prior_captions(2)
    with pytest.raises(ValueError, match="CUDA device"):
        tiny_prior_pipeline().sample(clip_text, tokens, num_inference_steps=2, cuda_graph=True)


class EagerStandIn:
    """GraphedCall's contract (static copies of the inputs, fn(**static, generator=...), the caller's
    generator at call time) run eagerly."""

    captures = []

    def __init__(self, fn, inputs):
        self.fn = fn
        self.static = {name: None if x is None else x.clone() for name, x in inputs.items()}
        EagerStandIn.captures.append(self)

    def __call__(self, generator=None, **inputs):
        for name, x in inputs.items():
            if x is not None:
                self.static[name].copy_(x)
        return self.fn(**self.static, generator=generator)


def test_pipeline_graph_cache(monkeypatch, tiny_prior_pipeline, prior_captions):
    monkeypatch.setattr(prior_pipeline, "GraphedCall", EagerStandIn)
    EagerStandIn.captures = []
    pipe = tiny_prior_pipeline()
    clip_text, tokens = prior_captions(3, seed=5)
    got = pipe.sample(clip_text, tokens, num_inference_steps=4, guidance_scale=2.0, generator=torch.Generator().manual_seed(7),
                      cuda_graph=True)

    # independent of the pipeline's plumbing: the caption's cluster, its shift, the guided denoiser, the sampler
    idx = pipe.vocabulary.assign(clip_text)
    mean, std = pipe.vocabulary.shift(idx)
    den = guided_denoiser(pipe.prior, tokens, clip_text, idx, guidance_scale=2.0, null_text_tokens=pipe.unconditional.null_text_tokens)
    with torch.no_grad():
        want = sample_ancestral(den, pipe.scheduler.schedule.respace(4), mean, std, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(got, want)

    # same signature, new prompts, a fresh generator object: replayed on the new inputs, not captured again
    other_clip, other_tokens = prior_captions(3, seed=6)
    again = pipe.sample(other_clip, other_tokens, num_inference_steps=4, guidance_scale=2.0,
                        generator=torch.Generator().manual_seed(7), cuda_graph=True)
    eager = pipe.sample(other_clip, other_tokens, num_inference_steps=4, guidance_scale=2.0,
                        generator=torch.Generator().manual_seed(7))
    assert len(EagerStandIn.captures) == 1
    torch.testing.assert_close(again, eager)
    assert not torch.allclose(again, got)

    # a new batch size, step count or guidance scale is a new graph; the oldest beyond max_cuda_graphs goes
    for n, steps, scale in ((2, 4, 2.0), (3, 2, 2.0), (3, 4, 1.0), (3, 4, 3.0)):
        clip_text, tokens = prior_captions(n, seed=8)
        out = pipe.sample(clip_text, tokens, num_inference_steps=steps, guidance_scale=scale, cuda_graph=True)
        assert out.shape == (n, pipe.clip_dim)
    assert len(EagerStandIn.captures) == 5 and len(pipe._graphs) == pipe.max_cuda_graphs
    assert EagerStandIn.captures[0] not in pipe._graphs.values()
    pipe.prior.double()  # weights re-created: a new graph, not a replay reading freed memory
    pipe.sample(clip_text, tokens, num_inference_steps=4, guidance_scale=3.0, cuda_graph=True)
    assert len(EagerStandIn.captures) == 6
    pipe.clear_cuda_graphs()
    assert not pipe._graphs


# ---- on a CUDA device ---------------------------------------------------------------------------


@cuda
@pytest.mark.parametrize("custom_generator", [False, True])
def test_graphed_sampling_equals_eager(custom_generator, tiny_prior_pipeline, prior_captions):
    pipe = tiny_prior_pipeline().to("cuda")
    clip_text, tokens = prior_captions(4, seed=3)
    generator = torch.Generator("cuda") if custom_generator else None

    def seed(s):
        return generator.manual_seed(s) if custom_generator else torch.cuda.manual_seed(s)

    kwargs = dict(num_images_per_prompt=2, num_inference_steps=6, guidance_scale=3.0, generator=generator)
    seed(11)
    eager = pipe.sample(clip_text, tokens, **kwargs)
    after_eager = torch.randn(4, device="cuda", generator=generator)
    seed(11)
    graphed = pipe.sample(clip_text, tokens, cuda_graph=True, **kwargs)  # capture (warm-up draws are private)
    after_graphed = torch.randn(4, device="cuda", generator=generator)
    torch.testing.assert_close(graphed, eager, atol=0, rtol=0)
    torch.testing.assert_close(after_graphed, after_eager, atol=0, rtol=0)  # the caller's stream of draws

    other_clip, other_tokens = prior_captions(4, seed=4)
    kwargs["generator"] = torch.Generator("cuda").manual_seed(12)  # a fresh generator object: same graph
    eager = pipe.sample(other_clip, other_tokens, **kwargs)
    kwargs["generator"] = torch.Generator("cuda").manual_seed(12)
    replayed = pipe.sample(other_clip, other_tokens, cuda_graph=True, **kwargs)
    assert len(pipe._graphs) == 1
    torch.testing.assert_close(replayed, eager, atol=0, rtol=0)


@cuda
def test_graphed_call_checks_the_signature_and_the_generator():
    graphed = GraphedCall(lambda x, generator: x * 2 + torch.randn(x.shape, device=x.device, generator=generator),
                          {"x": torch.ones(3, device="cuda")})
    torch.cuda.manual_seed(0)
    out = graphed(x=torch.zeros(3, device="cuda"))
    torch.cuda.manual_seed(0)
    torch.testing.assert_close(out, torch.randn(3, device="cuda"))
    with pytest.raises(ValueError, match="do not match the captured"):
        graphed(x=torch.zeros(4, device="cuda"))
    with pytest.raises(ValueError, match="must be a CUDA generator"):
        graphed(generator=torch.Generator(), x=torch.zeros(3, device="cuda"))
