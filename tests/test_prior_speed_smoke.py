"""benchmarks/prior_speed.py runs end to end at tiny size and reports every phase (no timing asserts)."""

import json

import pytest
from repo_modules import load_repo_module

pytest.importorskip("x_transformers")


def _load_benchmark():
    return load_repo_module("benchmarks/prior_speed.py")


def test_prior_speed_tiny_smoke(tmp_path):
    bench = _load_benchmark()
    out = tmp_path / "speed.json"
    report = bench.main([
        "--preset", "tiny", "--device", "cpu", "--batch", "4", "--k", "2", "--prompts", "3,5",
        "--steps", "2", "--warmup", "0", "--iters", "1", "--threads", "1", "--json", str(out),
    ])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["errors"] == {}
    assert report["device_type"] == "cpu" and report["preset"] == "tiny"
    assert report["max_abs_diff_fp32_ours_vs_reference"] < 1e-5  # same weights, same network
    expected_ours = {"train_step", "train_prefix_shared_k2", "ema_step", "sample_guided_2steps_3", "sample_guided_2steps_5"}
    assert set(report["ours"]) == expected_ours
    assert set(report["reference"]) == {"train_step", "ema_step", "sample_guided_2steps_3", "sample_guided_2steps_5"}
    assert set(report["ratios"]) == expected_ours
    assert report["ours"]["train_step"]["pairs"] == 4  # 4 captions x 1 timestep
    assert report["ours"]["train_prefix_shared_k2"]["pairs"] == 8  # the same 4 captions x 2 timesteps
    assert all(report["ours"][name]["pairs_per_s"] > 0 for name in ("train_step", "train_prefix_shared_k2"))
    assert report["reference"]["sample_guided_2steps_5"]["prompts"] == 5
    assert all(r > 0 for r in report["ratios"].values())
    # the fast guided sampler reproduces the original network's sampling (fp32, same seed)
    assert report["checks"]["sampling_vs_reference_fp32_max_abs"] < 1e-4
    assert report["checks"]["fp32_weights"]["cached_vs_full_forward_max_abs"] < 1e-5


def test_prior_speed_per_prompt_unconditional_clip_matches_reference():
    """PriorPipeline's default guidance (each prompt's own CLIP embedding in the unconditional branch)."""
    report = _load_benchmark().main([
        "--preset", "tiny", "--device", "cpu", "--batch", "2", "--prompts", "3", "--steps", "3", "--warmup", "0",
        "--iters", "1", "--threads", "1", "--uncond-clip", "per-prompt",
    ])
    assert report["errors"] == {} and report["uncond_clip"] == "per-prompt"
    assert report["checks"]["sampling_vs_reference_fp32_max_abs"] < 1e-4
