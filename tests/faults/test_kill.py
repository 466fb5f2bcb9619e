"""Interrupted runs resume to exactly the results of an uninterrupted run: SIGINT, SIGTERM and
SIGKILL delivered to a child ``infalign run`` in a reference chunk, a training step, a checkpoint
save and an evaluation, and a KeyboardInterrupt in this process in the last stage. Every resume
also leaves no temp file behind (``docs/reliability.md``)."""

from __future__ import annotations

import signal
import time

import pytest
import tiny_assets
from faultkit import TRAIN, leftovers, run_cli, snapshot, start_child

# (fault armed in the child, its exit status): SIGINT and SIGTERM save and exit 130 / 143
CASES = {
    "SIGINT-in-reference-test-chunk": ({"reward_calls": 5, "signal": "SIGINT"}, 130),
    "SIGTERM-in-training-step": ({"reward_calls": 8, "signal": "SIGTERM"}, 143),
    "SIGKILL-in-checkpoint-save": ({"kill_in_save": 2}, -9),
    "SIGKILL-in-evaluation": ({"reward_calls": 10, "signal": "SIGKILL"}, -9),
}


@pytest.fixture(scope="module")
def killed(recipe, tmp_path_factory, request):
    """Every case's child run, all started at once (and the baseline run alongside): case -> (out,
    exit status, stderr, the checkpoint temp dirs right after it died)."""
    root = tmp_path_factory.mktemp("killed")
    children = {c: start_child(recipe, root / c, spec) for c, (spec, _) in CASES.items()}
    request.getfixturevalue("baseline")
    done = {}
    for case, child in children.items():
        _, err = child.communicate(timeout=600)
        out = root / case
        done[case] = (out, child.returncode, err, sorted((out / TRAIN).glob(".checkpoint.tmp-*")))
    return done


@pytest.mark.parametrize("case", list(CASES))
def test_signal_then_resume_gives_identical_results(case, killed, recipe, baseline):
    out, status, stderr, tmp_dirs = killed[case]
    assert "Traceback" not in stderr, stderr[-2000:]
    assert status == CASES[case][1], stderr[-2000:]
    if case == "SIGKILL-in-checkpoint-save":  # killed between the temp dir and its rename
        assert tmp_dirs
    assert run_cli(recipe, out) == 0
    assert snapshot(out) == baseline[1]
    assert leftovers(out) == []


def test_keyboard_interrupt_in_the_last_stage_then_resume(recipe, baseline, tmp_path):
    out = tmp_path / "run"
    tiny_assets.FAULTS["interrupt_after"] = 11  # evaluation of pi_ref
    assert run_cli(recipe, out) == 130
    assert (out / "eval" / "reference" / "manifest.json").is_file()
    assert run_cli(recipe, out) == 0
    assert snapshot(out) == baseline[1]
    assert leftovers(out) == []


def test_sigterm_to_a_parallel_run_then_resume(recipe, baseline, tmp_path):
    """``run --jobs 2``: SIGTERM to the parent once the method stage has started in a worker stops
    the workers (the busy one saves its work), exits 143 without a traceback, and a rerun gives the
    sequential run's results."""
    out = tmp_path / "run"
    child = start_child(recipe, out, {}, "--jobs", "2")
    deadline = time.monotonic() + 300
    while not (out / "logs" / "ctrl@beta=0.1.log").exists() and child.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=300)
    assert child.returncode == 143 and "Traceback" not in err, err[-2000:]
    assert run_cli(recipe, out, "--jobs", "2") == 0
    assert snapshot(out) == baseline[1]
    assert leftovers(out) == []
