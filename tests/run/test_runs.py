"""The stage store's parts: stage locks, temp-file sweeping, stage keys and their differences,
input content hashes, disk-full errors, metrics truncation (end-to-end faults: tests/faults)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_assets import tiny_overrides, write_tiny_assets

from infalign.rl.checkpoint import truncate_metrics
from infalign.run.io import disk_errors
from infalign.run.keys import config_diff
from infalign.run.lock import StageLock, lock_stage
from infalign.run.recipe import load_config
from infalign.run.runs import RunEnv

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "tiny.yaml"


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_stage_lock_refuses_a_second_holder_naming_the_pid(tmp_path):
    first = StageLock(tmp_path, "reference/train")
    with pytest.raises(ValueError, match=rf"reference/train: .* in use .*\(pid {os.getpid()}\)"):
        StageLock(tmp_path, "reference/train")
    first.release()
    StageLock(tmp_path, "reference/train").release()  # free again


def test_locking_a_stage_sweeps_the_leftovers_of_interrupted_writes(tmp_path):
    torn = tmp_path / ".eval.json.k2j3.tmp"
    dead = tmp_path / f".checkpoint.tmp-{_dead_pid()}"
    mine = tmp_path / f".checkpoint.tmp-{os.getpid()}"
    for p in (dead, mine):
        p.mkdir()
        (p / "trainer_state.pt").write_bytes(b"half")
    torn.write_text("{")
    lock = lock_stage(tmp_path, "eval/x")
    assert not torn.exists() and not dead.exists() and mine.is_dir()
    lock.release()


def test_config_diff_keeps_old_stages_reusable_and_names_a_changed_input():
    old = {"rl": {"beta": 0.1, "save_every": 50}, "train": {"rl": {"save_every": 5}}}
    new = {"rl": {"beta": 0.1}, "train": {"rl": {}, "inputs": {"prompts.train": "a"}}}
    assert config_diff(old, new) is None  # dropped setting; manifest older than input hashes
    hashed = {**new, "inputs": {"prompts.test": "a"}}
    changed = {**new, "inputs": {"prompts.test": "b"}}
    assert config_diff(hashed, changed) == ("inputs.prompts.test", "a", "b")
    assert config_diff({"rl": {"beta": 0.1}}, {"rl": {"beta": 0.2}}) == ("rl.beta", 0.1, 0.2)


def test_input_hashes_follow_the_content_of_each_input(tmp_path):
    assets = write_tiny_assets(tmp_path / "assets")
    reward = tmp_path / "my_reward.py"
    reward.write_text(
        "def r(prompts, completions):\n    return [[0.0] * len(c) for c in completions]\n"
    )
    over = tiny_overrides(assets, tmp_path / "run", **{"reward.name": f"{reward}:r"})
    cfg = load_config(RECIPE, over)
    before = RunEnv(cfg).inputs()
    assert set(before) == {"prompts.train", "prompts.test", "model", "reward"}
    edits = {"reward": (reward, "# a comment\n"), "model": (assets["model"] / "config.json", "\n")}
    edits["prompts.test"] = (assets["test"], '{"prompt": "one more"}\n')
    for name, (path, text) in edits.items():
        with open(path, "a") as f:
            f.write(text)
        after = RunEnv(cfg).inputs()
        assert {k for k in after if after[k] != before[k]} == {name}
        before = after
    hub = load_config(RECIPE, {**over, "model.name": "org/model-on-the-hub"})
    assert "model" not in RunEnv(hub).inputs()


def test_disk_full_is_one_line_naming_the_path_and_other_errors_pass(tmp_path):
    target = tmp_path / "eval.json"
    with pytest.raises(ValueError, match=r"^no space left .*eval\.json.* rerun") as info:
        with disk_errors(target):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert "\n" not in str(info.value)
    with pytest.raises(PermissionError):
        with disk_errors(target):
            raise PermissionError(errno.EACCES, "Permission denied")


def test_truncate_metrics_drops_a_torn_last_line_and_later_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"rl/step": s, "rl/loss": 0.5 * s} for s in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"rl/step": 4, "rl/lo')
    truncate_metrics(path, 3)
    assert [json.loads(x) for x in path.read_text().splitlines()] == rows[:3]
    path.write_text('{"rl/step": 0}\n{"rl/st\n{"rl/step": 2}\n')  # torn in the middle
    with pytest.raises(ValueError, match=r"metrics\.jsonl' line 2 is not valid JSON"):
        truncate_metrics(path, 3)


def test_the_hash_cache_is_keyed_by_path_size_mtime_and_inode(tmp_path):
    from infalign.run.io import sha256_path

    f = tmp_path / "model.safetensors"
    f.write_bytes(b"weights")
    cache: dict[str, str] = {}
    real = sha256_path(f, cache)
    assert real == sha256_path(f) and len(cache) == 1
    (key,) = cache
    assert sha256_path(f, {key: "from-the-cache"}) == "from-the-cache"  # not read again
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 1))  # rewritten in place
    assert sha256_path(f, {key: "from-the-cache"}) == real
