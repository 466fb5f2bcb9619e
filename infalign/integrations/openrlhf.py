"""CTRL rewards for OpenRLHF: its remote reward protocol and its ``reward_func`` file form.

OpenRLHF (``openrlhf/utils/agent.py``, ``SingleTurnAgentExecutor``; checked at commit 3c3be62 of
github.com/OpenRLHF/OpenRLHF) decodes each rollout as ``query = decode(prompt_ids + response_ids,
skip_special_tokens=False)`` and asks for its reward either

- over HTTP: ``POST {"query": [...], "prompts": [...], "labels": [...]}`` to ``--reward.remote_url``
  (``--remote_rm_url`` before OpenRLHF 0.10.2), served by ``infalign serve-reward``; or
- in process: ``reward_func(queries, prompts, labels)`` from the Python file given as that URL
  (loaded with ``importlib``, called through ``asyncio.to_thread`` with one query per call), written
  by ``infalign export-reward``.

Both answer ``{"rewards": ..., "scores": ..., "extra_logs": {...}}`` (``payload``): ``rewards`` is the
CTRL reward ``Phi(C_hat(x, y))`` that OpenRLHF trains on, ``scores`` the calibrated reward
``C_hat(x, y)`` in [0, 1] (what its dynamic filtering reads), ``extra_logs`` the means over the call of
the raw, calibrated and CTRL rewards. See docs/openrlhf.md.
"""

from __future__ import annotations

from typing import Any

import torch

from infalign.integrations.calibrated import CalibratedRewardOutput
from infalign.integrations.recipe_reward import LazyReward

__all__ = ["payload", "reward_func"]


def _mean(x: torch.Tensor | None) -> float | None:
    return None if x is None or x.numel() == 0 else float(x.mean())


def payload(out: CalibratedRewardOutput, as_tensors: bool = False) -> dict[str, Any]:
    """OpenRLHF's reward answer for B queries: rewards (B,), scores (B,) and the batch means.

    ``as_tensors``: float32 tensors, as OpenRLHF's own ``reward_func`` examples return (else lists of
    floats, for JSON).
    """
    scores = out.calibrated if out.calibrated is not None else out.raw
    logs = {
        "raw_reward": _mean(out.raw),
        "calibrated_reward": _mean(out.calibrated),
        "ctrl_reward": _mean(out.reward),
    }
    if as_tensors:
        return {
            "rewards": out.reward.to(torch.float32),
            "scores": scores.to(torch.float32),
            "extra_logs": {k: v for k, v in logs.items() if v is not None},
        }
    return {"rewards": out.reward.tolist(), "scores": scores.tolist(), "extra_logs": logs}


def reward_func(
    reward: LazyReward, queries: list[str], prompts: list[str], labels: Any = None
) -> dict[str, Any]:
    """OpenRLHF's ``reward_func(queries, prompts, labels)`` for the reward ``reward`` (labels unused)."""
    return payload(reward.get().score_queries(list(queries), list(prompts)), as_tensors=True)
