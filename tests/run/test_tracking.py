"""Experiment tracking (recipe key ``tracking``): the tensorboard event files, read back with
tensorboard's own reader, hold exactly the values of ``metrics.jsonl`` and ``eval.json``, across a
crash and a resume; a tracker that is unknown or not installed is a one-line error before any work."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import yaml
from tiny_assets import RECIPE, recipe_overrides, tiny_overrides, write_tiny_assets

from infalign.cli import main
from infalign.rl.algorithms import trainer_class
from infalign.run import pipeline, tracking
from infalign.run.recipe import load_config


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_tiny_assets(tmp_path_factory.mktemp("assets"))


def _over(assets, out, **extra):
    return tiny_overrides(assets, out, **{**extra})


def _f32(x: float) -> float:
    return float(np.float32(x))  # tensorboard stores scalars as float32


def test_tensorboard_events_equal_metrics_jsonl_across_a_resume(assets, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    over = {"tracking": "tensorboard", "rl.steps": 4, "rl.save_every": 2}
    cfg = load_config(RECIPE, _over(assets, tmp_path / "run", **over))
    cls, crashed = trainer_class(cfg.rl.algorithm), []
    real_step = cls._train_step

    def crash_once_at_step_3(self):
        if self.step == 3 and not crashed:  # step 2 is logged, its checkpoint never written
            crashed.append(True)
            raise RuntimeError("crash")
        return real_step(self)

    monkeypatch.setattr(cls, "_train_step", crash_once_at_step_3)
    with pytest.raises(RuntimeError, match="crash"):
        pipeline.run_train(cfg, "raw", 0.1)
    run_dir = tmp_path / "run" / "tracking" / "raw" / "beta=0.1"
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    d = pipeline.run_train(cfg, "raw", 0.1)  # resumes at the checkpoint of step 2
    ev = pipeline.run_evaluate(cfg, "raw", 0.1)

    records = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["rl/step"] for r in records] == [0, 1, 2, 3]
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert set(records[0]) <= tags
    for key in records[0]:
        events = acc.Scalars(key)
        assert [e.step for e in events] == [0, 1, 2, 3], key  # step 2 once: the crashed one purged
        assert [e.value for e in events] == [_f32(r[key]) for r in records], key
    expected = {
        "eval/kl": ev["kl"]["mean"],
        "eval/kl_stderr": ev["kl"]["stderr"],
        "eval/win_rate/bon_4": ev["win_rate"]["bon:4"]["mean"],
        "eval/win_rate/bon_4_low": ev["win_rate"]["bon:4"]["low"],
        "eval/win_rate/won_4_high": ev["win_rate"]["won:4"]["high"],
        "eval/standard_win_rate": ev["standard_win_rate"]["mean"],
        "eval/reward_mean": ev["reward"]["mean"],
    }
    for key, value in expected.items():
        (event,) = acc.Scalars(key)
        assert (event.step, event.value) == (4, _f32(value)), key
    # the run's config, with the method's beta and transform
    hparams = [yaml.safe_load(p.read_text()) for p in run_dir.glob("*/hparams.yml")]
    assert hparams and all(h["method"] == "raw" and h["rl.transform"] == "raw" for h in hparams)
    assert hparams[0]["rl.beta"] == 0.1 and hparams[0]["rl.steps"] == 4
    assert hparams[0]["tracking"] == '["tensorboard"]'


def test_flat_config_and_eval_scalars(assets, tmp_path):
    cfg = load_config(RECIPE, _over(assets, tmp_path / "x"))
    flat = tracking.flat_config(cfg, cfg.methods[1], 0.25)
    assert flat["rl.beta"] == 0.25 and flat["rl.transform"] == "exp:auto"
    assert flat["method"] == "ctrl-exp" and flat["reference_model"] is None
    assert (
        flat["prompts.test.column"] == "prompt" and json.loads(flat["methods"])[0]["name"] == "raw"
    )
    assert tracking.run_name(cfg.methods[1], 0.25) == "ctrl-exp/beta=0.25"
    assert tracking.run_name(None, None) == "reference"
    w = {"mean": 0.6, "low": 0.5, "high": 0.7, "stderr": None}
    result = {
        "kl": {"mean": 0.3, "low": 0.2, "high": 0.4, "stderr": 0.05},
        "win_rate": {"kth:2:4": w},
        "standard_win_rate": w,
        "theory_bound": {"kth:2:4": {"win_rate": None, "kl": 0.3}},
        "reward": {"mean": 1.5},
    }
    assert tracking.eval_scalars(result) == {
        "eval/kl": 0.3,
        "eval/kl_low": 0.2,
        "eval/kl_high": 0.4,
        "eval/kl_stderr": 0.05,
        "eval/win_rate/kth_2_4": 0.6,
        "eval/win_rate/kth_2_4_low": 0.5,
        "eval/win_rate/kth_2_4_high": 0.7,
        "eval/standard_win_rate": 0.6,
        "eval/standard_win_rate_low": 0.5,
        "eval/standard_win_rate_high": 0.7,
        "eval/reward_mean": 1.5,
    }


@pytest.mark.parametrize(
    ("value", "needles"),
    [
        ("wandb", ["tracking[0]='wandb'", "not installed", "pip install 'infalign[wandb]'"]),
        ("tensorbored", ["tracking[0]='tensorbored'", "unknown tracker", "tensorboard"]),
        ("tensorboard,tensorboard", ["tracking[1]='tensorboard'", "listed twice"]),
    ],
)
def test_bad_tracker_is_a_one_line_error_before_any_work(
    value, needles, assets, tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(tracking.TRACKERS, "wandb", ("infalign_no_such_module", "wandb"))
    out = tmp_path / "bad"
    argv = recipe_overrides(assets, out, tracking=value)
    assert main(["run", str(RECIPE), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("infalign run: error: config tracking["), err
    for needle in needles:
        assert needle in err[0], (needle, err[0])
    assert not out.exists()


def test_other_trackers_are_built_offline_inside_the_run_directory(assets, tmp_path, monkeypatch):
    from accelerate.tracking import TrackioTracker, WandBTracker

    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = load_config(RECIPE, _over(assets, tmp_path / "exp"))
    cfg = dataclasses.replace(
        cfg, tracking=("wandb", "trackio")
    )  # not installed: built, not started
    wandb, trackio = tracking._trackers(cfg, "raw/beta=0.1", 0)
    assert isinstance(wandb, WandBTracker) and isinstance(trackio, TrackioTracker)
    assert wandb.run_name == "exp" and trackio.run_name == "exp"  # the project: out's name
    root = str((tmp_path / "exp" / "tracking").resolve())
    assert wandb.init_kwargs == {"name": "raw/beta=0.1", "dir": root, "mode": "offline"}
    assert trackio.init_kwargs == {"name": "raw/beta=0.1"}
