"""Serve a policy under an inference-time procedure: sample n candidates per prompt, score them, let
the procedure pick (best-of-n serves the max reward, worst-of-n the min, ``sample`` the only one)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from infalign.core.procedures import Procedure, parse_procedure
from infalign.lm.models import Generation, derive_seed
from infalign.lm.rewards import score
from infalign.lm.sampling import sample
from infalign.run.config import SamplingConfig

__all__ = ["Decoded", "decode"]

log = logging.getLogger(__name__)


@dataclass
class Decoded:
    """What a procedure serves for P prompts from n candidates each.

    Attributes:
        texts: P served completions.
        rewards: (P,) float32 reward of each served completion.
        index: (P,) long, which candidate was served.
        candidates: P lists of n candidate completions.
        candidate_rewards: (P, n) float32 rewards of the candidates.
        procedure: the procedure's spec (``bon:4``, ...).
        generation: the candidates' :class:`Generation` (token ids, masks).
    """

    texts: list[str]
    rewards: torch.Tensor
    index: torch.Tensor
    candidates: list[list[str]]
    candidate_rewards: torch.Tensor
    procedure: str
    generation: Generation

    def served_generation(self) -> Generation:
        """The served completions as a Generation with P prompts x 1 sample."""
        return self.generation.select(self.index.unsqueeze(1))


def decode(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    procedure: Procedure | str,
    reward_fn: Any,
    sampling: SamplingConfig,
    seed: int,
    progress: bool = False,
) -> Decoded:
    """Sample ``procedure.n`` candidates per prompt (seed ``seed``), score them with ``reward_fn`` and
    serve the one ``procedure.select`` picks (ties broken with a generator seeded from ``seed``)."""
    proc = parse_procedure(procedure)
    n = int(proc.n)
    _ = proc.rank  # a procedure without a sample-level rule (CdfMap) fails here, before sampling
    gen = sample(model, tokenizer, prompts, n, sampling, seed=seed, progress=progress)
    rewards = score(reward_fn, prompts, gen.texts)
    idx = proc.select(rewards, generator=derive_seed(seed, 1)).squeeze(1)
    P = len(prompts)
    ar = torch.arange(P)
    return Decoded(
        texts=[gen.texts[p][int(idx[p])] for p in range(P)],
        rewards=rewards[ar, idx],
        index=idx,
        candidates=gen.texts,
        candidate_rewards=rewards,
        procedure=str(proc),
        generation=gen,
    )
