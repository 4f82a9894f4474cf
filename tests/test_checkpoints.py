"""Training checkpoints: pickle-free state round trip, atomic folders, 'latest' skipping what a crash left,
refusal of pickle checkpoints without unpickling them, one-sentence mismatch errors."""

import json
import os
import pickle
import random
import shutil

import numpy as np
import pytest
import torch

from shifted_diffusion.checkpoints import (
    CheckpointError, find_checkpoint, join_state, list_checkpoints, load_checkpoint, read_state, save_checkpoint,
    split_state,
)


class _Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _plant(path, marker):
    path.write_bytes(pickle.dumps(_Payload(marker)))


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def _objects(seed=0, width=3):
    from diffusers.optimization import get_scheduler

    from shifted_diffusion.ema import FusedEMA

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(width, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=2, num_training_steps=20)
    ema = FusedEMA(model.parameters(), decay=0.9)
    return model, optimizer, scheduler, ema


def _step(model, optimizer, scheduler, ema, steps=3):
    for _ in range(steps):
        model(torch.randn(5, model[0].in_features)).square().mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        ema.step(model.parameters())


def _assert_equal_trees(a, b):
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            _assert_equal_trees(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_equal_trees(x, y)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    else:
        assert a == b


def test_split_join_round_trips_real_trainer_state_exactly():
    model, optimizer, scheduler, ema = _objects()
    _step(model, optimizer, scheduler, ema)
    state = {"optimizer": optimizer.state_dict(), "lr_scheduler": scheduler.state_dict(), "ema": ema.state_dict(),
             "scaler": torch.amp.GradScaler("cpu").state_dict(), "np": np.arange(3, dtype=np.uint32)}
    tensors = {}
    tree = split_state(state, "state", tensors)
    text = json.dumps(tree)  # JSON only: no pickle anywhere
    _assert_equal_trees(join_state(json.loads(text), tensors), state)
    assert 0 in join_state(json.loads(text), tensors)["optimizer"]["state"]  # int keys stay ints
    with pytest.raises(TypeError, match="state.bad: cannot store a object"):
        split_state({"bad": object()}, "state", {})


def test_save_load_restores_weights_optimizer_ema_schedule_and_generators(accelerator, tmp_path):
    model, optimizer, scheduler, ema = _objects()
    _step(model, optimizer, scheduler, ema)
    random.seed(5), np.random.seed(6), torch.manual_seed(7)
    path = save_checkpoint(accelerator, tmp_path, 3, modules={"net": model}, optimizer=optimizer,
                           lr_scheduler=scheduler, ema=ema, config={"width": 3})
    assert path == tmp_path / "checkpoint-3" and read_state(path)["global_step"] == 3
    assert not any(p.suffix in (".pkl", ".bin", ".pt") for p in path.iterdir())
    expected_draws = (random.random(), float(np.random.rand()), float(torch.rand(())))
    torch.manual_seed(11)
    _step(model, optimizer, scheduler, ema, steps=1)  # the original continues one step
    model2, optimizer2, scheduler2, ema2 = _objects(seed=1)  # other weights, fresh optimizer state
    load_checkpoint(accelerator, path, modules={"net": model2}, optimizer=optimizer2, lr_scheduler=scheduler2, ema=ema2,
                    config={"width": 3})
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected_draws
    torch.manual_seed(11)
    _step(model2, optimizer2, scheduler2, ema2, steps=1)  # the restored copy takes the same step
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(ema.shadow_params, ema2.shadow_params):
        assert torch.equal(a, b)
    assert scheduler.get_last_lr() == scheduler2.get_last_lr() and ema2.optimization_step == 4


def test_latest_skips_incomplete_and_damaged_folders(accelerator, tmp_path):
    model, optimizer, scheduler, ema = _objects()
    save_checkpoint(accelerator, tmp_path, 2, modules={"net": model}, optimizer=optimizer, lr_scheduler=scheduler)
    (tmp_path / "checkpoint-9").mkdir()  # a crash before the state file (what the old save left)
    shutil.copytree(tmp_path / "checkpoint-2", tmp_path / "checkpoint-5")
    with open(tmp_path / "checkpoint-5" / "net.safetensors", "ab") as f:
        f.truncate(10)  # damaged weights
    with pytest.warns(UserWarning) as record:
        assert find_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-2"
    text = " ".join(str(w.message) for w in record)
    assert "checkpoint-9" in text and "train_state.json is missing" in text
    assert "checkpoint-5" in text and "net.safetensors has 10 bytes" in text
    with pytest.raises(CheckpointError, match="net.safetensors has 10 bytes"):
        find_checkpoint(tmp_path, str(tmp_path / "checkpoint-5"))
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        find_checkpoint(tmp_path, str(tmp_path / "checkpoint-9"))


def test_prune_after_success_keeps_the_limit_and_foreign_folders(accelerator, tmp_path):
    model, optimizer, scheduler, ema = _objects()
    (tmp_path / "checkpoint-1").mkdir()  # not ours: never deleted
    (tmp_path / ".checkpoint-7.partial").mkdir()  # a crashed save: cleaned up
    for step in (2, 4, 6):
        save_checkpoint(accelerator, tmp_path, step, modules={"net": model}, optimizer=optimizer, lr_scheduler=scheduler,
                        total_limit=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-1", "checkpoint-4", "checkpoint-6"]
    assert not (tmp_path / ".checkpoint-7.partial").exists()


def test_pickle_checkpoint_is_refused_without_unpickling(accelerator, tmp_path):
    """An accelerate-style folder full of pickles: refused by name, nothing runs."""
    marker = tmp_path / "pwned"
    folder = tmp_path / "checkpoint-4"
    folder.mkdir()
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin", "scaler.pt",
                 "pytorch_model.bin"):
        _plant(folder / name, marker)
    model, optimizer, scheduler, ema = _objects()
    with pytest.raises(CheckpointError, match="unpickling can run code"):
        load_checkpoint(accelerator, folder, modules={"net": model}, optimizer=optimizer, lr_scheduler=scheduler)
    with pytest.warns(UserWarning, match="unpickling can run code"), \
            pytest.raises(CheckpointError, match="only checkpoints in accelerate's pickle format"):
        find_checkpoint(tmp_path, "latest")
    assert not marker.exists()


def test_planted_pickles_in_a_real_checkpoint_never_run(accelerator, tmp_path):
    """Pickles planted beside (or instead of) a real checkpoint's files: ignored, or refused as unreadable."""
    marker = tmp_path / "pwned"
    model, optimizer, scheduler, ema = _objects()
    path = save_checkpoint(accelerator, tmp_path, 2, modules={"net": model}, optimizer=optimizer,
                           lr_scheduler=scheduler, ema=ema)
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scaler.pt"):
        _plant(path / name, marker)
    load_checkpoint(accelerator, path, modules={"net": model}, optimizer=optimizer, lr_scheduler=scheduler, ema=ema)
    for name in ("state.safetensors", "net.safetensors", "rng_0.safetensors"):
        damaged = tmp_path / f"copy_{name}"
        shutil.copytree(path, damaged)
        payload = pickle.dumps(_Payload(marker))
        size = (damaged / name).stat().st_size
        (damaged / name).write_bytes(payload + b"\0" * (size - len(payload)))  # same size: passes the size check
        with pytest.raises(Exception) as error:
            load_checkpoint(accelerator, damaged, modules={"net": model}, optimizer=optimizer, lr_scheduler=scheduler,
                            ema=ema)
        assert not isinstance(error.value, (SystemExit, KeyboardInterrupt))
    assert not marker.exists()


def test_mismatched_model_is_one_sentence_naming_the_setting(accelerator, tmp_path):
    model, optimizer, scheduler, ema = _objects(width=3)
    path = save_checkpoint(accelerator, tmp_path, 2, modules={"net": model}, optimizer=optimizer,
                           lr_scheduler=scheduler, config={"model_width": 3, "max_train_steps": 5})
    other, optimizer2, scheduler2, _ = _objects(width=6)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(accelerator, path, modules={"net": other}, optimizer=optimizer2, lr_scheduler=scheduler2,
                        config={"model_width": 6, "max_train_steps": 9})
    message = str(error.value)
    assert "0.weight is (4, 3) in the checkpoint but (4, 6)" in message
    assert "model_width=3 (checkpoint) vs 6 (now)" in message and "max_train_steps" not in message
    assert "\n" not in message
    with pytest.raises(CheckpointError, match=r"holds modules \['net'\], this run trains \['unet'\]"):
        load_checkpoint(accelerator, path, modules={"unet": other}, optimizer=optimizer2, lr_scheduler=scheduler2)


def test_resume_paths_relative_to_the_run_and_older_checkpoints_refused(accelerator, tmp_path):
    model, optimizer, scheduler, ema = _objects()
    for step in (2, 4):
        save_checkpoint(accelerator, tmp_path, step, modules={"net": model}, optimizer=optimizer, lr_scheduler=scheduler)
    assert find_checkpoint(tmp_path, "checkpoint-4") == tmp_path / "checkpoint-4"  # relative to output_dir
    with pytest.raises(CheckpointError, match=r"also holds newer checkpoints \['checkpoint-4'\]"):
        find_checkpoint(tmp_path, "checkpoint-2")


def test_resume_with_changed_settings_warns_naming_them(accelerator, tmp_path):
    model, optimizer, scheduler, ema = _objects()
    path = save_checkpoint(accelerator, tmp_path, 2, modules={"net": model}, optimizer=optimizer, lr_scheduler=scheduler,
                           config={"learning_rate": 0.1, "max_train_steps": 5})
    with pytest.warns(UserWarning, match=r"learning_rate=0\.1 \(checkpoint\) vs 0\.2 \(now\)") as record:
        load_checkpoint(accelerator, path, modules={"net": model}, optimizer=optimizer, lr_scheduler=scheduler,
                        config={"learning_rate": 0.2, "max_train_steps": 9})
    assert "max_train_steps" not in str(record[0].message)  # a run-control setting may change freely
