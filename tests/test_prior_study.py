"""The prior study's work (``toy.prior_study``) at --fast size: every prior, seed and setting scored, the summary
the mean and sample std of the rows, ECLIPSE scored at its one step, and the plot written."""

import json
import statistics

import pytest

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
