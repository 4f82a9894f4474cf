"""The prior study's work (``toy.prior_study``) at --fast size: every prior, seed and setting scored, the summary
the mean and sample std of the rows, ECLIPSE scored at its one step, and the plot written."""

import json
import shutil
import statistics

import pytest

from shifted_diffusion.toy import prior_study
from shifted_diffusion.toy.prior_study import run_prior_study


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    out = tmp / "study.json"
    returned = run_prior_study(["--fast", "--out", str(out), "--output_dir", str(tmp / "run"), "--toy_root",
                                str(tmp / "assets"), "--axes", "default,std_scale", "--seeds", "0,1", "--steps", "2,4",
                                "--guidance_scales", "2", "--noise_temperatures", "0.5", "--std_scales", "1",
                                "--num_threads", "1"])
    return returned, json.loads(out.read_text()), out


def test_every_prior_seed_and_setting_is_scored(study):
    returned, saved, out = study
    assert saved["summary"] == returned["summary"] and out.with_suffix(".png").stat().st_size > 0
    rows = saved["rows"]
    keys = {(r["axis"], r["kind"], tuple(r["setting"].items()), r["sampling_steps"], r["guidance_scale"],
             r["noise_temperature"]) for r in rows}
    expected = set()
    for kind, steps in (("shifted", (2, 4)), ("baseline", (2, 4)), ("eclipse", (1,))):
        expected |= {("default", kind, (), s, 1.0, 1.0) for s in steps}
        setting_steps = 1 if kind == "eclipse" else 8
        expected |= {("default", kind, (), setting_steps, 2.0, 1.0), ("default", kind, (), setting_steps, 1.0, 0.5)}
    expected |= {("std_scale", "shifted", (("std_scale", 1.0),), s, 1.0, 1.0) for s in (2, 4)}
    assert keys == expected
    assert sorted({r["seed"] for r in rows}) == [0, 1] and len(rows) == 2 * len(expected)
    for row in rows:
        assert 0 <= row["nn_attr_acc"] <= 1 and row["fd"] >= 0 and -1 <= row["cos_gt"] <= 1
    assert set(saved["config"]["wall_seconds"]) >= {"train_eclipse_steps8_seed0", "total"}
    assert saved["config"]["complete"] is True


def test_summary_is_the_mean_and_sample_std_over_seeds(study):
    _, saved, _ = study
    assert len(saved["summary"]) == len(saved["rows"]) // 2
    for entry in saved["summary"]:
        members = [r for r in saved["rows"] if all(r[k] == entry[k] for k in (
            "axis", "kind", "setting", "train_steps", "sampling_steps", "guidance_scale", "noise_temperature"))]
        assert entry["n"] == len(members) == 2
        for metric in ("fd", "nn_attr_acc"):
            values = [m[metric] for m in members]
            assert entry[metric] == pytest.approx(statistics.fmean(values))
            assert entry[f"{metric}_std"] == pytest.approx(statistics.stdev(values))


def test_unknown_axis_is_refused():
    with pytest.raises(SystemExit, match="--axes guidance"):
        run_prior_study(["--fast", "--out", "unused.json", "--axes", "default,guidance"])


def test_a_rerun_reuses_finished_trainings_and_scores_them_the_same(study, tmp_path):
    _, saved, out = study
    run = out.parent / "run"
    again = run_prior_study(["--fast", "--out", str(tmp_path / "again.json"), "--output_dir", str(run), "--toy_root",
                             str(out.parent / "assets"), "--axes", "default", "--seeds", "1", "--steps", "2,4",
                             "--guidance_scales", "2", "--noise_temperatures", "0.5", "--num_threads", "1"])
    assert again["config"]["reused_trainings"] == [f"{k}_steps8_seed1" for k in ("shifted", "baseline", "eclipse")]
    first = [r for r in saved["rows"] if r["seed"] == 1 and r["axis"] == "default"]
    assert again["rows"] == first


def test_an_unfinished_or_differently_set_training_is_trained_again(study, tmp_path):
    _, _, out = study
    run = tmp_path / "run"
    shutil.copytree(out.parent / "run", run)
    for name, edit in (("shifted", lambda info: info.update(global_step=info["global_step"] - 1)),
                       ("baseline", lambda info: info["train"].update(learning_rate=2 * info["train"]["learning_rate"]))):
        index = run / f"{name}_steps8_seed1" / "prior" / "model_index.json"
        saved = json.loads(index.read_text())
        edit(saved["training"])
        index.write_text(json.dumps(saved))
    again = run_prior_study(["--fast", "--out", str(tmp_path / "again.json"), "--output_dir", str(run), "--toy_root",
                             str(out.parent / "assets"), "--axes", "default", "--seeds", "1", "--steps", "2",
                             "--guidance_scales", "2", "--noise_temperatures", "0.5", "--num_threads", "1"])
    assert again["config"]["reused_trainings"] == ["eclipse_steps8_seed1"]
    assert again["config"]["wall_seconds"]["train_shifted_steps8_seed1"] > 0
    assert again["config"]["wall_seconds"]["train_baseline_steps8_seed1"] > 0


def test_a_stopped_run_keeps_the_points_it_scored(study, tmp_path, monkeypatch):
    _, saved, out = study
    real, calls = prior_study.evaluate_toy_prior, []

    def evaluate_then_stop(prior_dir, *args, **kwargs):
        if "baseline" in str(prior_dir):
            raise KeyboardInterrupt
        calls.append(prior_dir)
        return real(prior_dir, *args, **kwargs)

    monkeypatch.setattr(prior_study, "evaluate_toy_prior", evaluate_then_stop)
    partial = tmp_path / "partial.json"
    with pytest.raises(KeyboardInterrupt):
        run_prior_study(["--fast", "--out", str(partial), "--output_dir", str(out.parent / "run"), "--toy_root",
                         str(out.parent / "assets"), "--axes", "default", "--seeds", "0,1", "--steps", "2,4",
                         "--guidance_scales", "2", "--noise_temperatures", "0.5", "--num_threads", "1"])
    kept = json.loads(partial.read_text())
    assert kept["config"]["complete"] is False and calls
    # both seeds of the shifted point, scored before the stop, are on disk exactly as the full run scored them
    assert kept["rows"] == [r for r in saved["rows"] if r["kind"] == "shifted" and r["axis"] == "default"]
