"""Reward functions used by tests (loaded as ``reward_fns:NAME`` through CallableReward)."""

import numpy as np
import torch


def length_reward(prompts, completions):
    """Number of characters of each completion (a list of lists)."""
    return [[float(len(c)) for c in group] for group in completions]


def length_reward_tensor(prompts, completions):
    """Same as ``length_reward``, as a tensor."""
    return torch.tensor([[float(len(c)) for c in group] for group in completions])


def count_e_reward(prompts, completions):
    """Number of letters 'e' (a numpy array, many ties)."""
    return np.array([[c.count("e") for c in group] for group in completions], dtype=np.float64)


def frac_e(prompts, completions):
    """Fraction of characters that are 'e': a tiny random GPT-2 learns to raise it in ~10 steps."""
    return [[c.count("e") / max(len(c), 1) for c in row] for row in completions]


def nan_reward(prompts, completions):
    """NaN for the second completion of the last prompt."""
    out = torch.zeros(len(prompts), len(completions[0]))
    out[-1, min(1, out.shape[1] - 1)] = float("nan")
    return out


def flat_reward(prompts, completions):
    """Wrong shape: a flat list."""
    return [0.0 for group in completions for _ in group]


class Boom(RuntimeError):
    pass


def failing_reward(prompts, completions):
    """Raises: simulates a reward model crash."""
    raise Boom("reward backend crashed")


def exiting_reward(prompts, completions):
    """Calls sys.exit(3) (a script's habit, inside a library call)."""
    import sys

    sys.exit(3)


def none_reward(prompts, completions):
    """Forgets to return."""
    [[len(c) for c in group] for group in completions]


def huge_reward(prompts, completions):
    """1e300 for every completion: finite in float64, beyond float32."""
    return [[1e300 for _ in group] for group in completions]
