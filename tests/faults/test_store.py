"""The run directory as a store: concurrent commands on one stage, a full disk, inputs edited in
place, settings that do not change results, manifests written before inputs were hashed, and
run-level user errors (``docs/reliability.md``)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys

import pytest
from faultkit import EVAL, ROOT, TRAIN, copy_run, leftovers, one_line_error, run_cli, snapshot

# a stand-in for another infalign command: holds the stage lock of argv[1] until stdin closes
HOLD = (
    "import sys; from pathlib import Path; from infalign.run.lock import StageLock; "
    "d = Path(sys.argv[1]); d.mkdir(parents=True, exist_ok=True); lock = StageLock(d, 'x'); "
    "print('locked', flush=True); sys.stdin.read()"
)


def test_a_stage_in_use_is_refused_naming_the_holder_pid(recipe, baseline, tmp_path, capsys):
    out = copy_run(baseline, tmp_path / "run")
    shutil.rmtree(out / EVAL)  # the run has the method's evaluation to do
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out / EVAL)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        assert run_cli(recipe, out) == 2
        one_line_error(capsys, f"pid {holder.pid}", "in use", str(out / EVAL))
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=60)
    assert run_cli(recipe, out) == 0  # the holder is gone: its lock went with it
    assert snapshot(out) == baseline[1]


def test_a_lock_file_of_a_dead_process_is_taken_over(recipe, baseline, tmp_path):
    out = copy_run(baseline, tmp_path / "run")
    shutil.rmtree(out / EVAL)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (out / EVAL).mkdir()
    (out / EVAL / ".lock").write_text(f"{gone.pid}\n")  # a dead holder's pid, no flock
    assert run_cli(recipe, out) == 0
    assert snapshot(out) == baseline[1]


def _full(after: int, exc: Exception):
    """A writer that fails with ``exc`` from its ``after + 1``-th call on (a disk that fills up)."""
    calls = [0]

    def fail(real):
        def write(*args, **kwargs):
            calls[0] += 1
            if calls[0] > after:
                raise exc
            return real(*args, **kwargs)

        return write

    return fail


def test_disk_full_in_a_checkpoint_save_leaves_nothing_and_resumes(
    recipe, baseline, tmp_path, capsys, monkeypatch
):
    import transformers.modeling_utils as mu
    from safetensors import SafetensorError

    torn = SafetensorError(
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
        'left on device" })'
    )
    out = tmp_path / "run"
    monkeypatch.setattr(mu, "safe_save_file", _full(1, torn)(mu.safe_save_file))
    assert run_cli(recipe, out) == 2
    one_line_error(capsys, "no space left", "checkpoint", "rerun")
    assert leftovers(out) == []
    assert (out / TRAIN / "checkpoint" / "trainer_state.pt").is_file()  # step 1's is kept
    monkeypatch.undo()  # space freed
    assert run_cli(recipe, out) == 0
    assert snapshot(out) == baseline[1]


def test_disk_full_writing_an_artifact_leaves_nothing_and_resumes(
    recipe, baseline, tmp_path, capsys, monkeypatch
):
    import pathlib

    out = copy_run(baseline, tmp_path / "run")
    shutil.rmtree(out / EVAL)
    real = pathlib.Path.write_bytes

    def write_bytes(self, data):
        if self.name.startswith(".eval.json."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", write_bytes)
    assert run_cli(recipe, out) == 2
    one_line_error(capsys, "no space left", "eval.json")
    assert leftovers(out) == []
    monkeypatch.undo()
    assert run_cli(recipe, out) == 0
    assert snapshot(out) == baseline[1]


@pytest.fixture
def edited(recipe):
    """Edit a file in place for one test (``edit(path, text)`` appends text), then restore it."""
    saved: dict = {}

    def edit(path, text):
        saved.setdefault(path, path.read_bytes())
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)

    yield edit
    for path, data in saved.items():
        path.write_bytes(data)


@pytest.mark.parametrize(
    "what",
    [
        ("prompts.test.source", "test.jsonl", '{"prompt": "A new test prompt"}\n'),
        ("prompts.train.source", "train.jsonl", '{"prompt": "A new train prompt"}\n'),
        ("model.name", "model/config.json", "\n"),
    ],
    ids=["test prompts", "train prompts", "model file"],
)
def test_an_input_edited_in_place_is_a_named_error(
    what, recipe, baseline, tmp_path, capsys, edited
):
    field, rel, text = what
    out = copy_run(baseline, tmp_path / "run")
    assets = recipe.parent / "assets"
    edited(assets / rel, text)
    assert run_cli(recipe, out) == 2
    target = str(assets / rel.split("/")[0])
    one_line_error(capsys, f"{field}={target!r}", "changed since", "delete")


def test_settings_that_do_not_change_results_reuse_a_finished_run(recipe, baseline, tmp_path):
    out = copy_run(baseline, tmp_path / "run")
    state = out / TRAIN / "checkpoint" / "trainer_state.pt"
    before = state.stat().st_mtime_ns
    extra = ("--rl.save_every", "7", "--reward.batch_size", "3", "--model.device", "cpu")
    assert run_cli(recipe, out, *extra) == 0
    assert state.stat().st_mtime_ns == before  # not trained again
    assert snapshot(out) == baseline[1]


def _drop_inputs(x):
    if isinstance(x, dict):
        return {k: _drop_inputs(v) for k, v in x.items() if k != "inputs"}
    return x


def test_stages_recorded_before_inputs_were_hashed_stay_reusable(recipe, baseline, tmp_path):
    out = copy_run(baseline, tmp_path / "run")
    for m in out.glob("*/**/manifest.json"):
        manifest = json.loads(m.read_text())
        manifest["config"] = _drop_inputs(manifest["config"])
        m.write_text(json.dumps(manifest))
    state = out / TRAIN / "checkpoint" / "trainer_state.pt"
    before = state.stat().st_mtime_ns
    assert run_cli(recipe, out) == 0
    assert state.stat().st_mtime_ns == before
    assert snapshot(out) == baseline[1]


@pytest.mark.parametrize(
    "override,needles",
    [
        (("--out", ""), ["config out="]),
        (("--out", "''"), ["out=''", "non-empty"]),
        (("--out", "' '"), ["out=' '", "non-empty"]),
        (("--rl.steps", "0"), ["rl.steps=0", ">= 1"]),
    ],
    ids=["empty out", "quoted empty out", "blank out", "zero steps"],
)
def test_run_level_user_errors(override, needles, recipe, tmp_path, capsys, monkeypatch):
    from infalign.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["run", str(recipe), "--no-report", *override]) == 2
    one_line_error(capsys, *needles)
    assert list(tmp_path.iterdir()) == []  # nothing written in the working directory


def test_one_prompts_hash_across_artifacts(baseline):
    import torch

    out = baseline[0]
    ref = json.loads((out / "reference" / "train" / "reference.json").read_text())
    state = torch.load(out / TRAIN / "checkpoint" / "trainer_state.pt", weights_only=True)
    manifest = json.loads((out / TRAIN / "manifest.json").read_text())
    assert ref["prompts_sha256"] == state["prompt_order"]["prompts_sha256"]
    assert ref["prompts_sha256"] == manifest["config"]["inputs"]["prompts.train"]
