"""benchmarks/prior_speed.py runs end to end at tiny size and reports every phase (no timing asserts).

The benchmark runs as a user runs it, ``python benchmarks/prior_speed.py ...`` from the checkout, in a child
process with this checkout's package first on its path; the report is read back from ``--json``."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("x_transformers")

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--device", "cpu", "--warmup", "0", "--iters", "1", "--threads", "1"]


def run_benchmark(tmp_path, *flags) -> dict:
    """The benchmark's JSON report; it also printed exactly that JSON on stdout."""
    out = tmp_path / "speed.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    child = subprocess.run([sys.executable, "benchmarks/prior_speed.py", *TINY, *flags, "--json", str(out)],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    report = json.loads(out.read_text())
    assert json.loads(child.stdout) == report
    return report


def test_prior_speed_tiny_smoke(tmp_path):
    report = run_benchmark(tmp_path, "--batch", "4", "--k", "2", "--prompts", "3,5", "--steps", "2")
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


def test_prior_speed_per_prompt_unconditional_clip_matches_reference(tmp_path):
    """PriorPipeline's default guidance (each prompt's own CLIP embedding in the unconditional branch)."""
    report = run_benchmark(tmp_path, "--batch", "2", "--prompts", "3", "--steps", "3", "--uncond-clip", "per-prompt")
    assert report["errors"] == {} and report["uncond_clip"] == "per-prompt"
    assert report["checks"]["sampling_vs_reference_fp32_max_abs"] < 1e-4
