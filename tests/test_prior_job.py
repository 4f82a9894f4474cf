"""train.py's toy job around the table: where the other prior's run folder is, and the line printed when there is
none (the combined table itself is tested on trained priors in test_toy_prior_eval.py)."""

import shlex
from pathlib import Path

from shifted_diffusion.toy.prior_job import COMPARE_BENCHMARK, sibling_output_dir, sibling_pointer
from shifted_diffusion.train_config import TrainConfig, parse_config


def test_sibling_folder_of_a_shifted_and_of_a_baseline_run():
    assert sibling_output_dir(TrainConfig(output_dir="outputs/toy_prior")) == Path("outputs/toy_prior_baseline")
    assert sibling_output_dir(TrainConfig(output_dir="runs/a/", baseline=False)) == Path("runs/a_baseline")
    assert sibling_output_dir(TrainConfig(output_dir="outputs/toy_prior_baseline", baseline=True)) == Path("outputs/toy_prior")
    # a baseline whose folder does not follow the convention has no sibling to look for
    assert sibling_output_dir(TrainConfig(output_dir="outputs/toy_prior", baseline=True)) is None
    assert sibling_output_dir(TrainConfig(output_dir="_baseline", baseline=True)) is None


def _command(line: str) -> list:
    """The argv of the `python train.py ...` command quoted in a pointer line."""
    start = line.index("`python train.py")
    return shlex.split(line[start + 1: line.index("`", start + 1)])


def test_pointer_gives_the_command_that_trains_a_comparable_baseline():
    cfg = TrainConfig(output_dir="outputs/toy prior", toy_fast=True, seed=4)
    argv = ["--toy_fast", "--seed", "4", "--output_dir", "outputs/toy prior"]
    line = sibling_pointer(cfg, argv, sibling_output_dir(cfg), "no finished prior in outputs/toy prior_baseline/prior")
    assert "\n" not in line and f"python {COMPARE_BENCHMARK}" in line and "no baseline rows" in line
    command = _command(line)
    assert command[:2] == ["python", "train.py"]
    baseline = parse_config(command[2:])  # the user's flags kept, the sibling's folder and --baseline win
    assert baseline.baseline and baseline.output_dir == "outputs/toy prior_baseline"
    assert baseline.toy_fast and baseline.seed == 4
    # the case: `python train.py` with no arguments -> the README's baseline command
    line = sibling_pointer(TrainConfig(output_dir="outputs/toy_prior"), [], Path("outputs/toy_prior_baseline"), "none")
    assert "`python train.py --baseline --output_dir outputs/toy_prior_baseline`" in line


def test_pointer_of_a_baseline_run_trains_the_shifted_prior():
    cfg = TrainConfig(output_dir="outputs/toy_prior_baseline", baseline=True)
    argv = ["--baseline", "--output_dir", "outputs/toy_prior_baseline"]
    line = sibling_pointer(cfg, argv, sibling_output_dir(cfg), "no finished prior in outputs/toy_prior/prior")
    shifted = parse_config(_command(line)[2:])
    assert not shifted.baseline and shifted.output_dir == "outputs/toy_prior" and "no shifted rows" in line
    line = sibling_pointer(TrainConfig(output_dir="x", baseline=True), [], None, "x does not end in _baseline")
    assert "x does not end in _baseline" in line and COMPARE_BENCHMARK in line and "\n" not in line
