"""A truncated version of every artifact type: a one-line error naming the file and the remedy,
or a rebuild that gives the results of an uninterrupted run (``docs/reliability.md``)."""

from __future__ import annotations

import shutil

import pytest
import tiny_assets
from faultkit import EVAL, TRAIN, copy_run, one_line_error, run_cli, snapshot, truncate

# artifact of a finished run -> the file the error names
FINISHED = {
    "reference rows": "reference/train/reference.jsonl",
    "reference metadata": "reference/test/reference.json",
    "stage manifest": f"{TRAIN}/manifest.json",
    "eval.json": f"{EVAL}/eval.json",
    "transform.json": f"{TRAIN}/transform.json",
}


@pytest.mark.parametrize("artifact", list(FINISHED))
def test_truncated_artifact_of_a_finished_run_is_a_named_error(
    artifact, recipe, baseline, tmp_path, capsys
):
    out = copy_run(baseline, tmp_path / "run")
    truncate(out / FINISHED[artifact])
    assert run_cli(recipe, out) == 2
    line = one_line_error(capsys, FINISHED[artifact].rsplit("/", 1)[-1], "delete")
    assert str(out) in line


def test_truncated_results_json_is_rebuilt(recipe, baseline, tmp_path):
    out = copy_run(baseline, tmp_path / "run")
    truncate(out / "results.json")
    assert run_cli(recipe, out) == 0
    assert snapshot(out) == baseline[1]


def test_truncated_checkpoint_of_a_finished_run_is_a_named_error(
    recipe, baseline, tmp_path, capsys
):
    out = copy_run(baseline, tmp_path / "run")
    shutil.rmtree(out / EVAL)  # the evaluation must load the trained policy again
    truncate(out / TRAIN / "checkpoint" / "model.safetensors")
    assert run_cli(recipe, out) == 2
    one_line_error(capsys, "checkpoint", "cannot be loaded", "delete", str(out / TRAIN))


@pytest.mark.parametrize("name", ["model.safetensors", "trainer_state.pt"])
def test_truncated_checkpoint_of_an_unfinished_run_is_a_named_error_then_restarts(
    name, interrupted_in_training, recipe, baseline, tmp_path, capsys
):
    out = copy_run((interrupted_in_training, {}), tmp_path / "run")
    truncate(out / TRAIN / "checkpoint" / name)
    assert run_cli(recipe, out) == 2
    one_line_error(capsys, name, "corrupt or truncated", "delete", "step 0")
    shutil.rmtree(out / TRAIN / "checkpoint")  # the remedy the error names
    assert run_cli(recipe, out) == 0
    assert snapshot(out) == baseline[1]


def test_torn_last_metrics_line_is_dropped_on_resume(
    interrupted_in_training, recipe, baseline, tmp_path
):
    out = copy_run((interrupted_in_training, {}), tmp_path / "run")
    with open(out / TRAIN / "metrics.jsonl", "a") as f:
        f.write('{"rl/step": 2, "rl/rew')  # a crash in the middle of an append
    assert run_cli(recipe, out) == 0
    assert snapshot(out) == baseline[1]


def test_torn_reference_chunk_is_resampled(recipe, baseline, tmp_path):
    out = tmp_path / "run"
    tiny_assets.FAULTS["interrupt_after"] = 2  # reference/train chunks 0 and 1 are kept
    assert run_cli(recipe, out) == 130
    partial = out / "reference" / "train" / "reference.partial.jsonl"
    assert len(partial.read_text().splitlines()) == 4  # 2 chunks x 2 prompts
    with open(partial, "a") as f:
        f.write('{"index": 4, "chunk": 2, "prompt": "Wat')
    assert run_cli(recipe, out) == 0
    assert snapshot(out) == baseline[1]
