"""train.py's job (``run_prior_job``) end to end on a generated folder with tiny encoders: cache -> vocab ->
steps -> prior folder, exact resume, and clear errors on bad input; train.py itself in a child process."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shifted_diffusion.checkpoints import CheckpointError, find_checkpoint, list_checkpoints
from shifted_diffusion.prior_pipeline import load_prior
from shifted_diffusion.train_config import TrainConfig, parse_config
from shifted_diffusion.training import read_loss_log
from shifted_diffusion.toy.prior_job import run_prior_job
from shifted_diffusion.vocab import ClusterVocab

ROOT = Path(__file__).resolve().parents[1]


def args(folder, clip_dir, out, *extra):
    return [
        "--train_data_dir", str(folder), "--clip_models", str(clip_dir), "--t5_model", f"clip-tokens:{clip_dir}",
        "--text_max_length", "8", "--config", str(ROOT / "configs" / "prior_tiny.yaml"),
        "--vocab_size", "3", "--train_batch_size", "2", "--val_fraction", "0.2", "--output_dir", str(out),
        "--num_validation_samples", "4", "--kmeans_iters", "5", *extra,
    ]


def test_end_to_end_cache_vocab_train_load_sample(caption_image_folder, tiny_open_clip_dir, tmp_path):
    out = tmp_path / "run"
    prior_dir = run_prior_job(args(caption_image_folder, tiny_open_clip_dir, out, "--max_train_steps", "3",
                                "--checkpointing_steps", "2", "--validation_steps", "2"))
    assert prior_dir == out / "prior"
    network = json.loads((prior_dir / "prior" / "config.json").read_text())
    assert network["_class_name"] == "ShiftedPrior"
    assert network["clip_dim"] == 32 and network["text_len"] == 8 and network["vocab_size"] == 3
    config = json.loads((prior_dir / "model_index.json").read_text())["training"]
    assert config["train"]["max_train_steps"] == 3 and config["global_step"] == 3
    assert "val_ema/cos_gt" in config["validation"] and -1 <= config["validation"]["val/cos_gt"] <= 1
    assert (out / "checkpoint-2").is_dir() and (out / "train_config.json").is_file()
    vocab = ClusterVocab.from_pretrained(prior_dir / "vocabulary")
    assert vocab.num_clusters == 3 and vocab.dim == 32

    pipeline = load_prior(prior_dir)
    embeddings = pipeline(["a red square", "blue"], num_images_per_prompt=2, num_inference_steps=4, guidance_scale=2.0,
                        generator=torch.Generator().manual_seed(0)).image_embeds
    assert embeddings.shape == (4, 32) and torch.isfinite(embeddings).all()
    # the saved weights load into the network unchanged, and they are the EMA weights, not the raw ones
    saved = load_file(str(prior_dir / "prior" / "diffusion_pytorch_model.safetensors"))
    for key, value in pipeline.prior.state_dict().items():
        torch.testing.assert_close(value, saved[key])
    raw_dir = run_prior_job(args(caption_image_folder, tiny_open_clip_dir, tmp_path / "raw", "--max_train_steps", "3",
                              "--checkpointing_steps", "0", "--validation_steps", "0", "--no-use_ema"))
    raw = load_file(str(raw_dir / "prior" / "diffusion_pytorch_model.safetensors"))
    assert json.loads((raw_dir / "model_index.json").read_text())["training"]["weights"] == "raw" and config["weights"] == "ema"
    assert any(not torch.allclose(raw[k], saved[k]) for k in saved)


def test_resume_reaches_the_weights_of_an_uninterrupted_run(caption_image_folder, tiny_open_clip_dir, tmp_path):
    common = ["--checkpointing_steps", "2", "--validation_steps", "0", "--lr_scheduler", "constant_with_warmup",
              "--logging_steps", "1"]
    straight = run_prior_job(args(caption_image_folder, tiny_open_clip_dir, tmp_path / "a", "--max_train_steps", "5", *common))
    # interrupted after step 3: its loss log runs past the checkpoint the resumed run starts from
    run_prior_job(args(caption_image_folder, tiny_open_clip_dir, tmp_path / "b", "--max_train_steps", "3", *common))
    assert [p.name for p in list_checkpoints(tmp_path / "b")][-1] == "checkpoint-2"
    resumed = run_prior_job(args(caption_image_folder, tiny_open_clip_dir, tmp_path / "b", "--max_train_steps", "5",
                              "--resume_from_checkpoint", "latest", *common))
    a, b = load_file(str(straight / "prior" / "diffusion_pytorch_model.safetensors")), load_file(str(resumed / "prior" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:  # same data order, same per-step randomness, same optimiser and EMA state: exact on CPU
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    # the resumed run's loss log is the uninterrupted run's: steps 3.. re-logged once, the same values
    log_a, log_b = (read_loss_log(tmp_path / run / "logs" / "loss.jsonl") for run in ("a", "b"))
    assert [line["step"] for line in log_b] == [1, 2, 3, 4, 5]
    torch.testing.assert_close(torch.tensor([line["loss"] for line in log_b]),
                               torch.tensor([line["loss"] for line in log_a]), rtol=0, atol=1e-6)
    untrained = run_prior_job(args(caption_image_folder, tiny_open_clip_dir, tmp_path / "c", "--max_train_steps", "2", *common))
    c = load_file(str(untrained / "prior" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.allclose(a[k], c[k]) for k in a)  # the comparison above could fail


def test_online_text_encoding_trains_as_the_cached_tokens_without_storing_them(caption_image_folder,
                                                                               tiny_open_clip_dir, tmp_path):
    """--text_encoding online: the cache holds the CLIP embeddings only, the text encoder runs in the step on the
    batch's captions, with the same dropout; float32 cached tokens give the same training (same loss log, same
    weights up to float32 summation order of the encoder's batches)."""
    common = ["--max_train_steps", "4", "--checkpointing_steps", "0", "--validation_steps", "2",
              "--logging_steps", "1", "--cache_text_dtype", "float32", "--empty_t5_prob", "0.3"]
    cached = run_prior_job(args(caption_image_folder, tiny_open_clip_dir, tmp_path / "cached", *common))
    online = run_prior_job(args(caption_image_folder, tiny_open_clip_dir, tmp_path / "online", *common,
                                "--text_encoding", "online"))
    manifests = {name: json.loads((tmp_path / name / "embeddings" / "manifest.json").read_text())
                 for name in ("cached", "online")}
    assert manifests["online"]["encoders"]["text"] == {"type": "none"} and manifests["online"]["text_len"] == 0
    assert manifests["cached"]["text_len"] == 8
    sizes = {name: sum(p.stat().st_size for p in (tmp_path / name / "embeddings").glob("shard_*.safetensors"))
             for name in manifests}
    assert sizes["online"] < sizes["cached"] / 2  # 32-dim CLIP rows vs 8 x 64 token states per caption
    a, b = (load_file(str(run / "prior" / "diffusion_pytorch_model.safetensors")) for run in (cached, online))
    for key in a:  # measured: 1.5e-8 apart at most
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    losses = [[line["loss"] for line in read_loss_log(tmp_path / name / "logs" / "loss.jsonl")] for name in manifests]
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=0, atol=1e-6)
    index = [json.loads((run / "model_index.json").read_text()) for run in (cached, online)]
    assert index[0]["training"]["validation"].keys() == index[1]["training"]["validation"].keys()
    # the online prior samples from prompts as the cached one does
    for run in (cached, online):
        assert load_prior(run)(["a red square"], num_inference_steps=2).image_embeds.shape == (1, 32)
    with pytest.raises(ValueError, match="no text encoder to run online"):
        parse_config(["--text_encoding", "online", "--t5_model", "none"])
    with pytest.raises(ValueError, match="text_encoding"):
        parse_config(["--text_encoding", "sometimes"])


def test_baseline_prior_has_no_vocab_and_no_cluster_token(caption_image_folder, tiny_open_clip_dir, tmp_path):
    prior_dir = run_prior_job(args(caption_image_folder, tiny_open_clip_dir, tmp_path / "base", "--baseline",
                                "--max_train_steps", "1", "--validation_steps", "0", "--checkpointing_steps", "0"))
    assert json.loads((prior_dir / "prior" / "config.json").read_text())["vocab_size"] is None
    assert json.loads((prior_dir / "model_index.json").read_text())["vocabulary"][1] == "StandardNormalShift"
    assert load_prior(prior_dir)(["a ring"], num_inference_steps=2).image_embeds.shape == (1, 32)


def test_flags_override_yaml_and_booleans_are_real(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("std_scale: 3.0\nuse_ema: true\nlearning_rate: 0.5\n")
    cfg = parse_config(["--config", str(preset), "--learning_rate", "0.1", "--no-use_ema", "--baseline"])
    assert (cfg.std_scale, cfg.learning_rate, cfg.use_ema, cfg.baseline) == (3.0, 0.1, False, True)
    assert parse_config([]) == TrainConfig()
    with pytest.raises(ValueError, match="unknown training setting"):
        preset.write_text("lerning_rate: 0.1\n")
        parse_config(["--config", str(preset)])


def test_toy_preset_ships_inside_the_package():
    """The toy preset resolves from the installed package (configs/ is not installed) and parses as settings."""
    import shifted_diffusion
    from shifted_diffusion.toy.prior_job import TOY_CONFIG, toy_defaults

    assert TOY_CONFIG.is_file() and Path(shifted_diffusion.__file__).resolve().parent in TOY_CONFIG.parents
    cfg = parse_config(["--max_train_steps", "7"], defaults=toy_defaults())
    assert (cfg.model_preset, cfg.vocab_size, cfg.std_scale, cfg.max_train_steps) == ("tiny", 64, 2.0, 7)
    assert cfg.train_data_dir is None  # filled in with the generated world by toy_config
    assert parse_config(["--config", str(TOY_CONFIG)]) == parse_config([], defaults=toy_defaults()) != TrainConfig()


def test_bad_inputs_fail_clearly(caption_image_folder, tiny_open_clip_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(Exception, match="(?i)no images|empty"):
        run_prior_job(args(empty, tiny_open_clip_dir, tmp_path / "e", "--max_train_steps", "1"))
    wrong_vocab = tmp_path / "wrong.safetensors"
    ClusterVocab(torch.zeros(2, 5), torch.ones(2, 5)).save(wrong_vocab)
    with pytest.raises(ValueError, match="dim 5.*dim 32"):
        run_prior_job(args(caption_image_folder, tiny_open_clip_dir, tmp_path / "v", "--max_train_steps", "1",
                        "--vocab_path", str(wrong_vocab)))
    with pytest.raises(FileNotFoundError, match="prior not found"):
        load_prior(tmp_path / "nowhere")


def test_prefix_shared_training_runs_through_train_py(caption_image_folder, tiny_open_clip_dir, tmp_path):
    prior_dir = run_prior_job(args(caption_image_folder, tiny_open_clip_dir, tmp_path / "k", "--timesteps_per_caption", "3",
                                "--max_train_steps", "2", "--validation_steps", "0", "--checkpointing_steps", "0"))
    config = json.loads((prior_dir / "model_index.json").read_text())["training"]
    assert config["train"]["timesteps_per_caption"] == 3 and config["global_step"] == 2


def test_compiled_training_matches_eager_and_saves_plain_names(caption_image_folder, tiny_open_clip_dir, tmp_path,
                                                               monkeypatch):
    """--compile (torch.compile of the network): same weights after 2 steps as eager, same checkpoint names."""
    from shifted_diffusion.prior import ShiftedPrior

    compiled = []
    original_compile = ShiftedPrior.compile
    monkeypatch.setattr(ShiftedPrior, "compile", lambda self, *a, **k: compiled.append(1) or original_compile(self))
    weights = {}
    for name, extra in (("eager", ()), ("compiled", ("--compile",))):
        prior_dir = run_prior_job(args(caption_image_folder, tiny_open_clip_dir, tmp_path / name, "--max_train_steps",
                                    "2", "--validation_steps", "0", "--checkpointing_steps", "0", "--no-use_ema",
                                    *extra))
        files = sorted(prior_dir.glob("*.safetensors"))
        weights[name] = {k: v for f in files for k, v in load_file(f).items()}
    assert compiled == [1]  # only the --compile run
    assert set(weights["compiled"]) == set(weights["eager"]) and not any("_orig_mod" in k for k in weights["compiled"])
    for key, value in weights["eager"].items():
        torch.testing.assert_close(weights["compiled"][key], value, atol=1e-5, rtol=1e-4, msg=key)


def test_logged_loss_is_the_mean_over_each_accumulation_window(caption_image_folder, tiny_open_clip_dir, tmp_path,
                                                               monkeypatch):
    """The original logged a constant 0. Here each logged train/loss is the mean of the micro-batch losses of
    that optimizer step's accumulation window (summed on the device, read only when logged)."""
    from accelerate import Accelerator

    from shifted_diffusion.loss import ShiftedDiffusionLoss

    micro_losses, logged = [], []
    original_call, original_log = ShiftedDiffusionLoss.__call__, Accelerator.log

    def spy_call(self, *a, **k):
        losses = original_call(self, *a, **k)
        micro_losses.append(losses.detach().mean().item())
        return losses

    def spy_log(self, values, step=None, **k):
        if "train/loss" in values:
            logged.append((step, values["train/loss"]))
        return original_log(self, values, step=step, **k)

    monkeypatch.setattr(ShiftedDiffusionLoss, "__call__", spy_call)
    monkeypatch.setattr(Accelerator, "log", spy_log)
    run_prior_job(args(caption_image_folder, tiny_open_clip_dir, tmp_path / "log", "--max_train_steps", "5",
                    "--gradient_accumulation_steps", "2", "--logging_steps", "2", "--validation_steps", "0",
                    "--checkpointing_steps", "0", "--no-use_ema", "--report_to", "none"))
    assert len(micro_losses) == 10 and len({round(v, 6) for v in micro_losses}) > 1
    assert [step for step, _ in logged] == [2, 4, 5]  # every logging_steps, and the last step
    for step, value in logged:
        window = micro_losses[2 * step - 2: 2 * step]
        assert value == pytest.approx(sum(window) / 2, rel=1e-5)


# ---------------------------------------------------------------------------------------------- reliability

# Run train.py in a child process that SIGKILLs itself at one moment of the save of checkpoint-KILL_STEP.
KILLER = r'''
import os, runpy, signal, sys
import shifted_diffusion.checkpoints as c

point, step = os.environ["KILL_AT"], int(os.environ["KILL_STEP"])
def kill():
    os.kill(os.getpid(), signal.SIGKILL)

if point == "writing":  # the first weights file of the save is on disk, the rest is not
    save_module = c._save_module
    def hooked(path, module):
        save_module(path, module)
        if path.parent.name == f".checkpoint-{step}.partial":
            kill()
    c._save_module = hooked
elif point == "pruning":  # the new checkpoint is in place, the old one not yet pruned
    prune = c.prune_checkpoints
    def hooked(output_dir, total_limit):
        if (c.checkpoint_folder(output_dir, step)).is_dir():
            kill()
        prune(output_dir, total_limit)
    c.prune_checkpoints = hooked
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path(os.path.join(os.getcwd(), "train.py"), run_name="__main__")
'''


@pytest.mark.slow
@pytest.mark.parametrize("point,resumed_from", [("writing", "checkpoint-2"), ("pruning", "checkpoint-4")])
def test_kill_9_during_a_save_loses_nothing(caption_image_folder, tiny_open_clip_dir, tmp_path, point, resumed_from):
    """A real training process killed with SIGKILL while it writes checkpoint-4 (limit 1 checkpoint): the
    previous checkpoint survives, 'latest' resumes from the newest complete one, and the resumed run ends with
    the weights of an uninterrupted one."""
    import os
    import subprocess
    import sys

    common = ["--checkpointing_steps", "2", "--checkpoints_total_limit", "1", "--validation_steps", "0",
              "--max_train_steps", "6", "--report_to", "none", "--cache_dir", str(tmp_path / "cache")]
    straight = run_prior_job(args(caption_image_folder, tiny_open_clip_dir, tmp_path / "a", *common))
    run = tmp_path / "b"
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    env = {**os.environ, "KILL_AT": point, "KILL_STEP": "4", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.run([sys.executable, str(script), *args(caption_image_folder, tiny_open_clip_dir, run, *common)],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == -9, child.stderr[-3000:]
    assert not (run / "prior").exists()
    latest = find_checkpoint(run, "latest")
    assert latest.name == resumed_from
    resumed = run_prior_job(args(caption_image_folder, tiny_open_clip_dir, run, *common, "--resume_from_checkpoint", "latest"))
    a, b = load_file(str(straight / "prior" / "diffusion_pytorch_model.safetensors")), load_file(str(resumed / "prior" / "diffusion_pytorch_model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-6"]  # the limit holds again, leftovers removed
    assert not list(run.glob(".checkpoint-*"))


def test_resume_never_unpickles_and_names_mismatches(caption_image_folder, tiny_open_clip_dir, tmp_path):
    """Payloads planted in every pickle-capable file name accelerate's load_state reads: a resume ignores them
    (ours) or refuses the folder by name (theirs); nothing runs. Other width or a non-checkpoint folder: one
    sentence, before any embedding work."""
    import os
    import pickle
    import shutil

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)

    common = ["--checkpointing_steps", "2", "--validation_steps", "0", "--report_to", "none",
              "--cache_dir", str(tmp_path / "cache")]
    run = tmp_path / "run"
    run_prior_job(args(caption_image_folder, tiny_open_clip_dir, run, "--max_train_steps", "2", *common))
    pickles = ["custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin", "scaler.pt",
               "sampler.bin", "pytorch_model.bin", "model.safetensors"]
    for name in pickles:
        (run / "checkpoint-2" / name).write_bytes(pickle.dumps(Payload()))
    run_prior_job(args(caption_image_folder, tiny_open_clip_dir, run, "--max_train_steps", "3", *common,
                    "--resume_from_checkpoint", "latest"))
    theirs = tmp_path / "theirs" / "checkpoint-2"
    theirs.mkdir(parents=True)
    for name in pickles:
        (theirs / name).write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CheckpointError, match="pickle files .*unpickling can run code"):
        run_prior_job(args(caption_image_folder, tiny_open_clip_dir, tmp_path / "x", "--max_train_steps", "3", *common,
                        "--resume_from_checkpoint", str(theirs)))
    assert not (tmp_path / "pwned").exists()

    wide = tmp_path / "wide"
    shutil.copytree(run / "checkpoint-2", wide / "checkpoint-2")
    with pytest.raises(CheckpointError, match=r"128, 128\) in the checkpoint but \(48, 128\).*model_width=None \(checkpoint\) vs 48 \(now\)"):
        run_prior_job(args(caption_image_folder, tiny_open_clip_dir, wide, "--max_train_steps", "3", *common,
                        "--model_width", "48", "--resume_from_checkpoint", "latest"))
    with pytest.raises(CheckpointError, match="is not a complete checkpoint"):
        run_prior_job(args(caption_image_folder, tiny_open_clip_dir, tmp_path / "y", "--max_train_steps", "3",
                        "--resume_from_checkpoint", str(caption_image_folder)))
    assert not (tmp_path / "y").exists()  # refused before any work


@pytest.mark.parametrize("flag,value,message", [
    ("--max_train_steps", "0", "--max_train_steps: expected an integer >= 1"),
    ("--checkpointing_steps", "-1", "--checkpointing_steps: expected an integer >= 0"),
    ("--train_batch_size", "0", "--train_batch_size: expected an integer >= 1"),
    ("--gradient_accumulation_steps", "0", "--gradient_accumulation_steps: expected an integer >= 1"),
    ("--logging_steps", "0", "--logging_steps: expected an integer >= 1"),
    ("--learning_rate", "0", "--learning_rate: expected a finite number > 0.0"),
    ("--vocab_size", "0", "--vocab_size: expected an integer >= 1"),
    ("--num_inference_steps", "0", "--num_inference_steps: expected an integer >= 1"),
    ("--ema_decay", "2", r"--ema_decay: expected a finite number in \[0.0, 1.0\]"),
    ("--guidance_scale", "nan", "--guidance_scale: expected a finite number >= 0.0"),
    ("--std_scale", "inf", "--std_scale: expected a finite number > 0.0"),
    ("--lr_scheduler", "cosin", "--lr_scheduler: expected one of"),
    ("--mixed_precision", "fp8", "--mixed_precision: expected one of"),
    ("--model_num_heads", "0", "--model_num_heads: expected an integer >= 1"),
    ("--val_fraction", "1", r"--val_fraction: expected a finite number in \[0.0, 1.0\)"),
])
def test_settings_are_checked_before_any_work(caption_image_folder, tiny_open_clip_dir, tmp_path, flag, value, message):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        run_prior_job(args(caption_image_folder, tiny_open_clip_dir, out, flag, value))
    assert not out.exists()


def test_garbage_vocab_path_is_refused_before_any_work(caption_image_folder, tiny_open_clip_dir, tmp_path):
    garbage = tmp_path / "vocab.safetensors"
    garbage.write_bytes(b"not a vocabulary")
    with pytest.raises(ValueError, match=f"vocab_path {garbage}: not a vocabulary file"):
        run_prior_job(args(caption_image_folder, tiny_open_clip_dir, tmp_path / "out", "--vocab_path", str(garbage)))
    assert not (tmp_path / "out").exists()


def test_non_finite_loss_stops_the_run_naming_the_step(caption_image_folder, tiny_open_clip_dir, tmp_path,
                                                       monkeypatch):
    from shifted_diffusion.loss import ShiftedDiffusionLoss

    calls, original = [], ShiftedDiffusionLoss.__call__

    def poisoned(self, *a, **k):
        calls.append(1)
        losses = original(self, *a, **k)
        return losses * float("nan") if len(calls) >= 3 else losses

    monkeypatch.setattr(ShiftedDiffusionLoss, "__call__", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(FloatingPointError, match="step 4: the training loss is nan"):
        run_prior_job(args(caption_image_folder, tiny_open_clip_dir, out, "--max_train_steps", "6", "--logging_steps", "2",
                        "--checkpointing_steps", "2", "--validation_steps", "0", "--report_to", "none"))
    assert not (out / "prior").exists() and [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]


def test_a_flag_clears_an_optional_setting_of_a_preset(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("max_train_steps: 300\ncheckpoints_total_limit: 2\n")
    cfg = parse_config(["--config", str(preset), "--max_train_steps", "none", "--checkpoints_total_limit", "null"])
    assert cfg.max_train_steps is None and cfg.checkpoints_total_limit is None
    assert parse_config(["--config", str(preset)]).max_train_steps == 300
    with pytest.raises(SystemExit):
        parse_config(["--max_train_steps", "lots"])


@pytest.mark.slow
def test_two_process_ddp_training_embeds_shares_checkpoints_once_and_resumes_exactly(caption_image_folder,
                                                                                     tiny_open_clip_dir, tmp_path):
    """train.py in 2 CPU processes (torchrun + ACCELERATE_USE_CPU: accelerate's MULTI_CPU, gloo; `accelerate launch
    --cpu` starts one process): both embed their share of the cache, each checkpoint is written once, a resumed
    DDP run reaches the weights of an uninterrupted one, and they differ from one process's."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    common = ["--checkpointing_steps", "2", "--validation_steps", "0", "--report_to", "none", "--no-use_ema",
              "--lr_scheduler", "constant", "--learning_rate", "1e-3", "--cache_dir", str(tmp_path / "cache"),
              "--logging_steps", "1"]

    def launch(out, *extra):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
                   str(ROOT / "train.py"), *args(caption_image_folder, tiny_open_clip_dir, out, *common, *extra)]
        child = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert child.returncode == 0, child.stderr[-4000:]
        return child

    first = launch(tmp_path / "a", "--max_train_steps", "5")
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_captions"] > 0
    assert [p.name for p in list_checkpoints(tmp_path / "a")] == ["checkpoint-2", "checkpoint-4"]
    assert not list((tmp_path / "a").glob(".checkpoint-*"))  # no half-written or duplicate saves left behind
    losses = [line["loss"] for line in read_loss_log(tmp_path / "a" / "logs" / "loss.jsonl")]
    assert len(losses) == 5 and sum(losses[-2:]) < sum(losses[:2]), losses  # 0.53 0.79 .. 0.49 0.35
    launch(tmp_path / "b", "--max_train_steps", "2")
    launch(tmp_path / "b", "--max_train_steps", "5", "--resume_from_checkpoint", "latest")
    a = load_file(str(tmp_path / "a" / "prior" / "prior" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "prior" / "prior" / "diffusion_pytorch_model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    assert "embedded by 2 processes" in first.stderr + first.stdout
    single = run_prior_job(args(caption_image_folder, tiny_open_clip_dir, tmp_path / "c", *common,
                                "--max_train_steps", "5"))
    c = load_file(str(single / "prior" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.allclose(a[k], c[k]) for k in a)  # two processes saw twice the data: other weights


def test_fsdp_and_deepspeed_launches_are_refused_by_name():
    from accelerate.utils import DistributedType

    from shifted_diffusion.training import check_distributed_type

    for kind in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        check_distributed_type(str(kind))
    for kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        with pytest.raises(SystemExit, match=f"launched this run with {kind.name}.*choose multi-GPU"):
            check_distributed_type(str(kind))
