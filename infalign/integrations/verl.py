"""CTRL rewards for verl: ``compute_score`` in its per-sample and its batch form.

verl (checked at commit b178a3c of github.com/volcengine/verl) loads ``custom_reward_function.path``
/ ``.name`` (``verl/trainer/ppo/reward.py``, ``get_custom_reward_fn``) and calls it

- per sample (``verl/workers/reward_manager/naive.py`` and the reward loop's
  ``verl/experimental/reward_loop/reward_manager/naive.py``)::

      compute_score(data_source=..., solution_str=..., ground_truth=..., extra_info=...)

- in batch (``reward_model.reward_manager=batch``, ``verl/workers/reward_manager/batch.py``)::

      compute_score(data_sources=..., solution_strs=..., ground_truths=..., extra_infos=..., **reward_kwargs)

``solution_str`` is the response alone, decoded without special tokens; the prompt is not passed, so
the dataset must carry it: set ``extra_info["prompt"]`` of every row to the prompt text exactly as
in the reference artifact (the ``prompt`` field of ``reference/train/reference.jsonl``). Both return
a dict per sample whose ``score`` is the CTRL reward ``Phi(C_hat(x, y))`` (verl logs the other keys:
``raw_reward``, ``calibrated_reward``). See docs/verl.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from infalign.integrations.recipe_reward import LazyReward

__all__ = ["PROMPT_KEY", "compute_score", "compute_score_batch"]

#: the ``extra_info`` key that holds the prompt text
PROMPT_KEY = "prompt"


def _prompt(extra_info: Any, i: int | None = None) -> str:
    where = "extra_info" if i is None else f"extra_infos[{i}]"
    if not isinstance(extra_info, dict) or not isinstance(extra_info.get(PROMPT_KEY), str):
        got = sorted(extra_info) if isinstance(extra_info, dict) else type(extra_info).__name__
        raise ValueError(
            f"verl compute_score: {where} must hold the prompt text under {PROMPT_KEY!r} (got "
            f"{got}); set extra_info.{PROMPT_KEY} in the dataset (docs/verl.md)"
        )
    return extra_info[PROMPT_KEY]


def _rows(reward: LazyReward, prompts: list[str], responses: list[str]) -> list[dict[str, float]]:
    out = reward.get()(prompts, responses)
    cal = out.calibrated if out.calibrated is not None else out.raw
    return [
        {"score": float(s), "raw_reward": float(r), "calibrated_reward": float(c)}
        for s, r, c in zip(out.reward.tolist(), out.raw.tolist(), cal.tolist(), strict=True)
    ]


def compute_score(
    reward: LazyReward, solution_str: str, extra_info: dict[str, Any] | None
) -> dict[str, float]:
    """verl's per-sample form: ``{"score": CTRL reward, "raw_reward", "calibrated_reward"}``."""
    return _rows(reward, [_prompt(extra_info)], [solution_str])[0]


def compute_score_batch(
    reward: LazyReward, solution_strs: Sequence[str], extra_infos: Sequence[Any]
) -> list[dict[str, float]]:
    """verl's batch form: one dict (as ``compute_score``) per sample, scored in one call."""
    if len(solution_strs) != len(extra_infos):
        raise ValueError(
            f"verl compute_score: {len(solution_strs)} solution_strs but {len(extra_infos)} extra_infos"
        )
    prompts = [_prompt(e, i) for i, e in enumerate(extra_infos)]
    return _rows(reward, prompts, list(solution_strs))
