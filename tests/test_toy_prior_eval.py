"""Toy-world prior evaluation: the benchmark's work (``toy.prior_quality``) end to end at --fast size, and the
metrics checked against hand computations (a neighbour bank with known attributes) and against known inputs
(ground truth in, random embeddings in)."""

import dataclasses
import json
import math
import os
from pathlib import Path

import pytest
import torch

from shifted_diffusion.cache import EmbeddingDataset, load_image_embeddings, load_image_records
from shifted_diffusion.toy import load_attributes
from shifted_diffusion.toy.prior_eval import (
    TABLE_METRICS,
    ToyEvalData,
    format_table,
    load_eval_data,
    oracle_embeddings,
    score_embeddings,
)
from shifted_diffusion.toy.prior_quality import run_prior_quality

STEPS = ("4", "8", "16", "64")


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    """The benchmark's work (``run_prior_quality``, the flags of benchmarks/toy_prior_quality.py) at --fast size,
    run once: (results read back from the JSON file, work folder)."""
    tmp = tmp_path_factory.mktemp("toy_prior_quality")
    out = tmp / "results.json"
    returned = run_prior_quality(["--fast", "--out", str(out), "--output_dir", str(tmp / "run"),
                                  "--toy_root", str(tmp / "assets"), "--seed", "3"])
    results = json.loads(out.read_text())
    assert results["shifted"] == json.loads(json.dumps(returned["shifted"]))
    return results, tmp


def test_benchmark_writes_both_priors_at_every_step_count(fast_run):
    results, tmp = fast_run
    assert {"shifted", "baseline", "config", "reference"} <= set(results)
    for prior in ("shifted", "baseline"):
        assert set(results[prior]) == set(STEPS)
        for steps in STEPS:
            metrics = results[prior][steps]
            for key in TABLE_METRICS:
                assert math.isfinite(metrics[key]), (prior, steps, key)
            assert 0 <= metrics["nn_attr_acc"] <= 1 and -1 <= metrics["cos_gt"] <= 1 and metrics["fd"] >= 0
            assert 0 <= metrics["diversity"] <= 1
    config = results["config"]
    assert config["fast"] and config["seed"] == 3
    assert {"train_shifted", "train_baseline", "eval_shifted", "eval_baseline"} <= set(config["wall_seconds"])
    shifted, baseline = config["train"]["shifted"], config["train"]["baseline"]
    # identical budgets and seeds; only the shift (and the folder) differ
    assert shifted["global_step"] == baseline["global_step"] == config["max_train_steps"]
    differing = {k for k in shifted["train"] if shifted["train"][k] != baseline["train"][k]}
    assert differing == {"baseline", "output_dir"}
    assert shifted["argv"][:2] == ["--config", "shifted_diffusion/toy/prior_toy.yaml"]  # the packaged toy preset
    assert shifted["train"]["std_scale"] == 2.0  # the toy preset's, not TrainConfig's 5.0
    assert shifted["prior"]["vocab_size"] == 8 and baseline["prior"]["vocab_size"] is None
    # the same held-out captions for both: the oracle reference is computed once, from the cache
    assert results["reference"]["diversity"] == results["shifted"]["4"]["diversity_real"]
    assert results["baseline"]["64"]["diversity_real"] == results["shifted"]["64"]["diversity_real"]
    table = format_table({"shifted": results["shifted"], "baseline": results["baseline"]}, results["reference"])
    assert len(table.splitlines()) == 2 + 2 * len(STEPS) + 1 and "| shifted | 64 |" in table


def fast_eval_data(tmp, num_captions=None) -> ToyEvalData:
    return load_eval_data(tmp / "assets" / "world_fast", tmp / "run" / "embeddings", val_fraction=0.25,
                          split_seed=3, num_captions=num_captions)


def test_eval_data_is_the_val_split_with_the_worlds_attributes(fast_run):
    _, tmp = fast_run
    data = fast_eval_data(tmp)
    val = EmbeddingDataset(tmp / "run" / "embeddings", "val", val_fraction=0.25, seed=3)
    train = EmbeddingDataset(tmp / "run" / "embeddings", "train", val_fraction=0.25, seed=3)
    assert data.num_captions == len(val) and data.bank.shape[0] == len(val.image_indices)
    assert data.pool.shape[0] == len(train.image_indices)
    # attributes and mentions re-read independently: via the file name of each val image
    world = load_attributes(tmp / "assets" / "world_fast")
    records = load_image_records(tmp / "run" / "embeddings")
    for i in (0, len(val) - 1):
        row = world["file_name"].index(records[int(val[i]["image_index"])]["file_name"])
        assert data.caption_attributes[i].tolist() == [int(world[a][row]) for a in ("shape", "colour", "size", "position", "background")]
        assert data.mentioned[i].tolist() == world["mentioned"][row].tolist()
        torch.testing.assert_close(data.true_embeddings[i], val[i]["clip_image"])
    torch.testing.assert_close(data.bank, load_image_embeddings(tmp / "run" / "embeddings")[val.image_indices])


def separated(tmp) -> ToyEvalData:
    """The fast run's held-out data with every image's embedding replaced by a distinct random vector (the fast
    CLIP is trained for a few steps only: its embeddings nearly coincide), the captions' ground truth
    re-derived independently from the cache's image indices."""
    data = fast_eval_data(tmp)
    val = EmbeddingDataset(tmp / "run" / "embeddings", "val", val_fraction=0.25, seed=3)
    per_image = torch.randn(val.num_images, data.bank.shape[1], generator=torch.Generator().manual_seed(5))
    caption_images = torch.stack([val[i]["image_index"] for i in range(len(val))])
    return dataclasses.replace(data, bank=per_image[val.image_indices], true_embeddings=per_image[caption_images])


def test_ground_truth_as_generated_scores_perfectly(fast_run):
    _, tmp = fast_run
    data = separated(tmp)  # every val caption: its images are exactly the bank
    samples = 3
    metrics = score_embeddings(data.true_embeddings.repeat_interleave(samples, 0), data, samples)
    assert metrics["cos_gt"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["nn_attr_acc"] == 1.0
    assert all(v == 1.0 for v in metrics["nn_attr_acc_by_attribute"].values() if not math.isnan(v))
    assert metrics["diversity"] == 0.0  # the samples of a caption are one embedding
    # one sample each: the generated set is the bank itself (one caption per toy image), so FD ~ 0
    assert data.true_embeddings.shape == data.bank.shape
    scale = float(data.bank.var(0).sum())  # tr(Sigma): the FD of the bank against a single point
    assert score_embeddings(data.true_embeddings, data, 1)["fd"] == pytest.approx(0.0, abs=1e-5 * scale)


def test_random_embeddings_score_clearly_lower(fast_run):
    _, tmp = fast_run
    generator = torch.Generator().manual_seed(0)
    samples = 4
    distinct = separated(tmp)
    for data in (distinct, fast_eval_data(tmp)):  # distinct embeddings, and the fast CLIP's own
        mean, std = data.bank.mean(0), data.bank.std(0)  # the real set's per-dim moments: near in FD, no caption
        random = mean + std * torch.randn(data.num_captions * samples, data.bank.shape[1], generator=generator)
        metrics = score_embeddings(random, data, samples)
        assert metrics["nn_attr_acc"] < 0.6
    truth = score_embeddings(distinct.true_embeddings.repeat_interleave(samples, 0), distinct, samples)
    assert truth["nn_attr_acc"] == 1.0
    # isotropic noise: E cos(noise, anything) = 0 in every block
    noise = torch.randn(data.num_captions * samples, data.bank.shape[1], generator=generator)
    assert abs(score_embeddings(noise, data, samples)["cos_gt"]) < 0.1


def test_oracle_draws_real_training_images_that_match_the_caption(fast_run):
    _, tmp = fast_run
    data = fast_eval_data(tmp, num_captions=8)
    draws = oracle_embeddings(data, 5, torch.Generator().manual_seed(1))
    assert draws.shape == (8 * 5, data.bank.shape[1])
    for c in range(8):
        for row in draws[5 * c: 5 * c + 5]:
            match = (data.pool == row).all(1).nonzero().flatten()
            if match.numel() == 0:  # no training image matches: the caption's own image stands in
                assert torch.equal(row, data.true_embeddings[c])
                continue
            attrs = data.pool_attributes[match[0]]
            m = data.mentioned[c]
            assert torch.equal(attrs[m], data.caption_attributes[c][m])


# ---- the metrics on a hand-made bank ------------------------------------------------------------


def hand_data():
    """Bank: 4 orthogonal unit vectors with known attributes; 2 captions, one mentions shape+colour,
    the other only size. Blocks (2, 2) so cosine is per block."""
    bank = torch.eye(4)
    #                   shape colour size position background
    bank_attributes = torch.tensor([[0, 0, 0, 0, 0],
                                    [0, 1, 1, 1, 1],
                                    [1, 0, 1, 2, 2],
                                    [2, 2, 0, 3, 3]])
    caption_attributes = torch.tensor([[0, 0, 0, 0, 0], [5, 5, 1, 5, 5]])
    mentioned = torch.tensor([[True, True, False, False, False], [False, False, True, False, False]])
    return ToyEvalData(
        clip_text=torch.zeros(2, 4), text_tokens=torch.zeros(2, 1, 4), true_embeddings=bank[[0, 1]],
        caption_attributes=caption_attributes, mentioned=mentioned, bank=bank, bank_attributes=bank_attributes,
        pool=bank, pool_attributes=bank_attributes, num_values=(6, 6, 2, 9, 4), block_sizes=(2, 2),
    )


def test_metrics_match_hand_computation():
    data = hand_data()
    # caption 0 samples -> neighbours 0, 1 ; caption 1 samples -> neighbours 2, 3 (a small perturbation each)
    generated = torch.eye(4) + 0.01
    metrics = score_embeddings(generated, data, 2)
    # caption 0 (shape 0, colour 0): nb 0 matches 2/2, nb 1 matches shape only 1/2; caption 1 (size 1): nb 2 yes, nb 3 no
    assert metrics["nn_attr_acc"] == pytest.approx((1 + 0.5 + 1 + 0) / 4)
    assert metrics["nn_attr_acc_by_attribute"]["shape"] == pytest.approx(1.0)
    assert metrics["nn_attr_acc_by_attribute"]["colour"] == pytest.approx(0.5)
    assert metrics["nn_attr_acc_by_attribute"]["size"] == pytest.approx(0.5)
    assert math.isnan(metrics["nn_attr_acc_by_attribute"]["position"])
    # diversity: caption 0 leaves size/position/background open; its neighbours differ in all three (2 values each)
    # caption 1 leaves shape/colour/position/background open; neighbours 2 and 3 differ in all of them
    h2 = math.log(2)
    expected = [h2 / math.log(2), h2 / math.log(9), h2 / math.log(4),  # caption 0: size, position, background
                h2 / math.log(6), h2 / math.log(6), h2 / math.log(9), h2 / math.log(4)]  # caption 1
    assert metrics["diversity"] == pytest.approx(sum(expected) / len(expected))
    # cos_gt per block: sample rows vs [e0, e0, e1, e1]
    def block_cos(a, b):
        return sum(float(torch.nn.functional.cosine_similarity(a[s], b[s], dim=0)) for s in (slice(0, 2), slice(2, 4))) / 2
    gt = data.true_embeddings.repeat_interleave(2, 0)
    assert metrics["cos_gt"] == pytest.approx(sum(block_cos(g, t) for g, t in zip(generated, gt)) / 4, rel=1e-5)
    assert metrics["norm_ratio"] == pytest.approx(float(generated.norm(dim=1).mean()), rel=1e-5)


def test_score_embeddings_rejects_wrong_shapes():
    data = hand_data()
    with pytest.raises(ValueError, match=r"generated: expected shape \(4, 4\).*got \(3, 4\)"):
        score_embeddings(torch.zeros(3, 4), data, 2)


def test_format_table_rows_and_missing_values():
    steps = {"8": {"nn_attr_acc": 0.5, "cos_gt": 0.25, "fd": 123.456, "diversity": 0.1, "diversity_real": 0.2},
             "4": {"nn_attr_acc": 0.4, "cos_gt": 0.2, "fd": 1.0, "diversity": float("nan"), "diversity_real": 0.2}}
    lines = format_table({"shifted": steps}).splitlines()
    assert lines[0].startswith("| prior | steps |") and len(lines) == 4
    assert lines[2] == "| shifted | 4 | 0.400 | 0.200 | 1.000 | - | 0.200 |"  # sorted by step count, nan as "-"
    assert lines[3] == "| shifted | 8 | 0.500 | 0.250 | 123.5 | 0.100 | 0.200 |"


def test_fidelity_metrics_on_the_hand_bank():
    from shifted_diffusion.toy.prior_eval import fidelity_metrics

    data = hand_data()
    # the bank itself, one sample per real image: on the real manifold, every real image covered
    same = fidelity_metrics(data.bank, dataclasses.replace(data, true_embeddings=data.bank,
                                                           caption_attributes=data.bank_attributes,
                                                           mentioned=torch.ones(4, 5, dtype=torch.bool)), 1)
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    assert same["probe_acc_real"] == 1.0 and same["probe_acc"] == 1.0  # probes trained on this very pool
    assert same["probe_tv"] == pytest.approx(0.0)  # each caption's conditional is its own image's attributes
    far = fidelity_metrics(-torch.ones(4, 4), data, 2)  # block-normalised: distance 1.49 > every radius (1)
    assert far["precision"] == 0.0 and far["coverage"] == 0.0


# ---- train.py's table: the other prior's rows from its sibling run folder ---------------------------------


@pytest.fixture(scope="module")
def prior_pair(fast_run):
    """The fast run's two priors laid out as train.py's convention has them (<dir> and <dir>_baseline), and the
    shifted run's TrainConfig as recorded in its prior folder."""
    import shutil

    from shifted_diffusion.prior_pipeline import read_prior_info
    from shifted_diffusion.train_config import TrainConfig

    _, tmp = fast_run
    pair = tmp / "pair"
    for name, folder in (("shifted", "toy"), ("baseline", "toy_baseline")):
        shutil.copytree(tmp / "run" / name, pair / folder, ignore=shutil.ignore_patterns("checkpoint*", "logs"))
    train = read_prior_info(pair / "toy" / "prior")["training"]["train"]
    return dataclasses.replace(TrainConfig.from_dict(train), output_dir=str(pair / "toy")), pair


def table_rows(text: str) -> list:
    return [line.split(" | ")[0].strip("| ") + " " + line.split(" | ")[1] for line in text.splitlines()[2:]
            if line.startswith("| ")]


def test_train_table_adds_the_baseline_rows_and_caches_both_evaluations(prior_pair, capsys, monkeypatch):
    from shifted_diffusion.toy import prior_eval
    from shifted_diffusion.toy.prior_job import print_toy_table

    cfg, pair = prior_pair
    results = print_toy_table(cfg, pair / "toy" / "prior")
    first = capsys.readouterr().out
    assert not results["baseline"]
    assert table_rows(first) == [f"{p} {s}" for p in ("shifted", "baseline") for s in STEPS] + ["real images (oracle) -"]
    assert "no baseline rows" not in first
    lines = first.splitlines()
    assert lines[2 + len(STEPS)].split(" | ")[2:] != lines[2].split(" | ")[2:]  # the baseline's own numbers
    for folder in ("toy", "toy_baseline"):
        stored = json.loads((pair / folder / "prior_toy_eval.json").read_text())
        assert stored["results"]["baseline"] == (folder == "toy_baseline") and set(stored["results"]["steps"]) == set(STEPS)
        assert stored["key"]["seed"] == cfg.seed and "prior/diffusion_pytorch_model.safetensors" in stored["key"]["weights"]

    calls = []
    real = prior_eval.evaluate_toy_prior

    def counting(prior_dir, *args, **kwargs):
        calls.append(Path(prior_dir).parent.name)
        return real(prior_dir, *args, **kwargs)

    monkeypatch.setattr(prior_eval, "evaluate_toy_prior", counting)
    print_toy_table(cfg, pair / "toy" / "prior")  # a second train.py: nothing is evaluated again
    assert calls == [] and capsys.readouterr().out == first
    weights = pair / "toy_baseline" / "prior" / "prior" / "diffusion_pytorch_model.safetensors"
    assert weights.is_file()
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # retrained: other stamp
    (pair / "toy" / "prior_toy_eval.json").write_text('{"key": ')  # a truncated cache file: evaluated again
    with pytest.warns(UserWarning, match=r"prior_toy_eval.json: invalid JSON.*evaluating again"):
        print_toy_table(cfg, pair / "toy" / "prior")
    again = capsys.readouterr().out
    assert sorted(calls) == ["toy", "toy_baseline"] and table_rows(again) == table_rows(first)
    assert again == first  # same weights, captions and seed: the same samples

    # the baseline run's own table: the shifted sibling found by stripping _baseline, rows in the same order
    calls.clear()
    base = dataclasses.replace(cfg, output_dir=str(pair / "toy_baseline"), baseline=True)
    assert print_toy_table(base, pair / "toy_baseline" / "prior")["baseline"]
    assert calls == [] and table_rows(capsys.readouterr().out) == table_rows(first)


def test_train_table_points_to_the_baseline_when_it_is_not_comparable(prior_pair, capsys, tmp_path):
    from shifted_diffusion.toy.prior_job import print_toy_table

    cfg, pair = prior_pair
    other_world = dataclasses.replace(cfg, toy_root=str(tmp_path / "assets"))  # the sibling's toy_root differs
    print_toy_table(other_world, pair / "toy" / "prior")
    out = capsys.readouterr().out.splitlines()
    assert table_rows("\n".join(out)) == [f"shifted {s}" for s in STEPS] + ["real images (oracle) -"]
    assert out[-1].startswith("(no baseline rows:") and "toy_root" in out[-1]
    assert f"--baseline --output_dir {pair / 'toy_baseline'}`" in out[-1] and "toy_shifted_vs_baseline.py" in out[-1]
    alone = dataclasses.replace(cfg, output_dir=str(tmp_path / "solo"))  # no sibling folder at all
    print_toy_table(alone, pair / "toy" / "prior")
    assert f"no finished prior in {tmp_path / 'solo_baseline' / 'prior'}" in capsys.readouterr().out
