"""A tiny recipe with its train reference artifact (built in seconds), and the CTRL reward of any
(prompt, response) worked out by hand from that artifact: the oracle of the reward server and of the
OpenRLHF / verl functions."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from tiny_assets import _score, recipe_overrides, tiny_overrides, write_tiny_assets

ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "recipes" / "tiny.yaml")


@dataclass
class CTRLRun:
    argv: list[str]  # config overrides for the CLI (after the recipe)
    prompts: list[str]
    completions: list[list[str]]  # the K reference completions of each prompt
    rewards: np.ndarray  # (P, K) float32, as in the artifact
    t: float  # exp:auto resolved for the recipe's first non-raw method (ctrl-exp)

    def expected(self, prompt: str, response: str) -> tuple[float, float, float]:
        """(raw, C_hat, exp_t(C_hat)) by hand: the vowel reward rounded to float32 like the
        artifact, its mid-rank among the prompt's K reference rewards, the exp transform."""
        raw = np.float32(_score(response))
        s = self.rewards[self.prompts.index(prompt)]
        c = float(np.mean((raw > s) + 0.5 * (raw == s)))
        return float(raw), c, math.expm1(self.t * c) / math.expm1(self.t)


@pytest.fixture(scope="session")
def ctrl_run(tmp_path_factory) -> CTRLRun:
    from infalign.run.pipeline import get_method, run_references
    from infalign.run.recipe import load_config
    from infalign.run.train import resolve_transform

    d = tmp_path_factory.mktemp("ctrl_run")
    assets = write_tiny_assets(d / "assets")
    reward = f"{ROOT / 'tests' / 'tiny_assets.py'}:gated_vowel_reward"
    over = tiny_overrides(assets, d / "run", **{"reward.name": reward})
    cfg = load_config(RECIPE, over)
    ref = run_references(cfg, ["train"])["train"]
    tf, _ = resolve_transform(cfg, get_method(cfg, "ctrl-exp"))
    return CTRLRun(
        argv=recipe_overrides(assets, d / "run", **{"reward.name": reward}),
        prompts=ref.prompts,
        completions=ref.completions,
        rewards=ref.rewards.numpy(),
        t=float(tf.t),
    )
