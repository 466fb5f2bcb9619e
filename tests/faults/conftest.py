"""Shared setup of the fault suite: tiny assets, a small recipe (one method, 3 steps with a
checkpoint after each, several reference chunks per split) and one uninterrupted run to compare
against (helpers: ``faultkit.py``).

Reward calls of ``run`` on this recipe, in order: reference/train chunks 0-3 (calls 0-3),
reference/test chunks 0-2 (4-6), training steps 0-2 (7-9), evaluation of the method (10), of pi_ref
(11).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import tiny_assets
from faultkit import ROOT, TRAIN, run_cli, snapshot
from tiny_assets import tiny_overrides, write_tiny_assets

from infalign.run.recipe import dump_config, load_config


@pytest.fixture(autouse=True)
def _no_faults():
    tiny_assets.FAULTS.update(interrupt_after=None, nan=False, signal=None)
    yield
    tiny_assets.FAULTS.update(interrupt_after=None, nan=False, signal=None)


@pytest.fixture(scope="session")
def recipe(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("faults")
    assets = write_tiny_assets(d / "assets")
    extra = {
        "reward.name": "tiny_assets:faulty_reward",
        "methods": [{"name": "ctrl", "transform": "identity", "betas": [0.1]}],
        "sampling.batch_size": 16,  # K = 8: 2 prompts per reference chunk
        "rl.steps": 3,
        "rl.save_every": 1,
        "evaluate.procedures": ["sample", "bon:4"],
        "evaluate.bootstrap": 20,
    }
    over = tiny_overrides(assets, d / "unused", **extra)
    path = d / "recipe.yaml"
    path.write_text(dump_config(load_config(ROOT / "recipes" / "tiny.yaml", over)))
    return path


@pytest.fixture(scope="session")
def baseline(recipe, tmp_path_factory) -> tuple[Path, dict]:
    """(run directory, snapshot) of the uninterrupted run; copy it before changing it."""
    out = tmp_path_factory.mktemp("baseline") / "run"
    assert run_cli(recipe, out) == 0
    return out, snapshot(out)


@pytest.fixture(scope="session")
def interrupted_in_training(recipe, tmp_path_factory):
    """A run interrupted in training step 2: checkpoint at step 2, two metrics records."""
    out = tmp_path_factory.mktemp("interrupted") / "run"
    tiny_assets.FAULTS["interrupt_after"] = 9
    assert run_cli(recipe, out) == 130
    tiny_assets.FAULTS["interrupt_after"] = None
    assert len((out / TRAIN / "metrics.jsonl").read_text().splitlines()) == 2
    return out
