"""CTRL inside TRL: the calibrated, transformed reward as a TRL reward function (spec sections 2 and 6).

TRL's ``RLOOTrainer`` / ``GRPOTrainer`` call each reward function as
``f(prompts=..., completions=..., completion_ids=..., **dataset_columns, trainer_state=..., log_extra=...,
log_metric=...)`` with one entry per completion (each prompt repeated ``num_generations`` times,
consecutively) and expect one float per completion back. ``CalibratedReward`` scores the completions
with an infalign reward function, maps each score to its quantile among the K cached reference-policy
rewards of **its own** prompt (a dataset column, attached with ``add_reference_rewards``)::

    C_hat(x, y) = (1/K) sum_k [ 1{r(x,y) > s_k} + 1/2 1{r(x,y) = s_k} ]      (EmpiricalCalibration)
    R(x, y)     = Phi(C_hat(x, y))                                            (Transform)

and returns ``R`` (``CalibratedReward`` lives in ``infalign.integrations.calibrated`` and is re-exported
here). ``exact_ctrl_config`` builds the ``trl.RLOOConfig`` whose update is exactly CTRL's
KL-regularised RLOO (sequence-level KL inside the reward, fixed beta, leave-one-out baseline, no std
scaling, on-policy); ``check_exact_ctrl`` lists how any config departs from it. See docs/trl.md.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from infalign.integrations.calibrated import (
    REFERENCE_COLUMN,
    CalibratedReward,
    CalibratedRewardOutput,
    _check_reference,
    _reference_matrix,
    _short,
    message_text,
)

if TYPE_CHECKING:
    from datasets import Dataset
    from trl import RLOOConfig

__all__ = [
    "EXACT_CTRL_SETTINGS",
    "REFERENCE_COLUMN",
    "CalibratedReward",
    "CalibratedRewardOutput",
    "add_reference_rewards",
    "check_exact_ctrl",
    "exact_ctrl_config",
    "message_text",
]

logger = logging.getLogger(__name__)


def add_reference_rewards(
    dataset: Dataset,
    reference_rewards: Any,
    column: str = REFERENCE_COLUMN,
    *,
    prompt_column: str = "prompt",
    prompts: Sequence[Any] | None = None,
    overwrite: bool = False,
) -> Dataset:
    """Return ``dataset`` with a column holding each prompt's reference rewards (row-aligned).

    ``reference_rewards`` is a (P, K) tensor/array or a list of P lists (NaN or None marks a missing
    reward; lists may differ in length), row i belonging to ``dataset[i][prompt_column]``. If
    ``prompts`` is given (the prompts the rewards were computed for), the dataset's prompt column must
    equal it row by row. Raises ValueError for a missing prompt column, a length mismatch, an existing
    column (unless ``overwrite``), infinite rewards or a row with fewer than 2 finite rewards.
    """
    from datasets import Dataset

    if not isinstance(dataset, Dataset):
        raise TypeError(f"dataset must be a datasets.Dataset, got {type(dataset).__name__}")
    if prompt_column not in dataset.column_names:
        raise ValueError(
            f"dataset has no prompt column {prompt_column!r} (columns: {dataset.column_names})"
        )
    if (
        isinstance(reference_rewards, (torch.Tensor, np.ndarray))
        and np.ndim(reference_rewards) != 2
    ):
        raise ValueError(
            f"reference_rewards must be (P, K), got shape {tuple(np.shape(reference_rewards))}"
        )
    n = len(reference_rewards)
    if n != len(dataset):
        raise ValueError(
            f"reference_rewards has {n} rows but the dataset has {len(dataset)} prompts; they must be "
            "row-aligned"
        )
    texts = [message_text(x) for x in dataset[prompt_column]]
    if prompts is not None:
        if len(prompts) != len(texts):
            raise ValueError(f"prompts has {len(prompts)} entries but the dataset has {len(texts)}")
        for i, (a, b) in enumerate(zip(texts, (message_text(x) for x in prompts), strict=True)):
            if a != b:
                raise ValueError(
                    f"row {i}: dataset prompt {_short(a)} differs from the prompt the reference rewards "
                    f"were computed for {_short(b)}"
                )
    arr = _reference_matrix(reference_rewards, column, n)
    _check_reference(arr, column, texts)
    if column in dataset.column_names:
        if not overwrite:
            raise ValueError(
                f"dataset already has a column {column!r}; pass overwrite=True to replace it"
            )
        dataset = dataset.remove_columns(column)
    if isinstance(reference_rewards, (torch.Tensor, np.ndarray)):
        rows = arr.tolist()
    else:  # keep each row's own length (None -> NaN); drop only the padding added for ragged input
        rows = [arr[i, : len(r)].tolist() for i, r in enumerate(reference_rewards)]
    return dataset.add_column(column, rows)


# --------------------------------------------------------------------------------------------- config

#: RLOOConfig fields whose value decides whether TRL's update is exactly CTRL's (spec section 6).
EXACT_CTRL_SETTINGS: dict[str, Any] = {
    # no per-batch std normalisation of advantages (it would rescale beta)
    "normalize_advantages": False,
    # one gradient pass per generated batch: on-policy, the PPO ratio is 1 and clipping never acts
    "num_iterations": 1,
    # rewards enter unclipped and unweighted (exactly one reward function, the CalibratedReward)
    "reward_clip_range": None,
    "reward_weights": None,
    # truncated completions stay in the loss (masking them zeroes their log-prob and KL terms)
    "mask_truncated_completions": False,
    # pi_ref stays the model the reference rewards were drawn from (no TR-DPO mixing)
    "sync_ref_model": False,
    # sample from pi itself: the log-probs, the KL and the calibration all assume plain sampling
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": None,
    "repetition_penalty": 1.0,
    "generation_kwargs": None,
    # deterministic log-probs: the logged-at-generation log-probs equal the ones differentiated
    "disable_dropout": True,
    # TRL's RLOO has no importance-sampling correction for vLLM's sampler
    "use_vllm": False,
    # keep the reference-rewards column in the batches
    "remove_unused_columns": False,
}

_EQUIVALENT: dict[str, tuple[Any, ...]] = {
    "reward_weights": ([1.0],),
    "top_k": (None,),
    "generation_kwargs": ({},),
}


def check_exact_ctrl(args: Any) -> list[str]:
    """Ways a ``trl.RLOOConfig`` departs from CTRL's exact objective (empty list: it is exact).

    Checks ``EXACT_CTRL_SETTINGS``, ``beta > 0`` (KL in the reward), ``num_generations >= 2`` and
    ``steps_per_generation == gradient_accumulation_steps`` (each generated batch is used for exactly
    one optimiser step, so samples are on-policy).
    """
    problems = []
    for key, want in EXACT_CTRL_SETTINGS.items():
        if not hasattr(args, key):
            problems.append(f"{key}: not a field of {type(args).__name__} (installed trl differs)")
            continue
        got = getattr(args, key)
        if got != want and got not in _EQUIVALENT.get(key, ()):
            problems.append(f"{key}={got!r} (exact CTRL needs {want!r})")
    beta = getattr(args, "beta", None)
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        problems.append(
            f"beta={beta!r} (exact CTRL needs a finite beta > 0: the KL penalty in the reward)"
        )
    if getattr(args, "num_generations", 0) < 2:
        problems.append(
            f"num_generations={getattr(args, 'num_generations', None)!r} (RLOO needs >= 2)"
        )
    spg, gas = (
        getattr(args, "steps_per_generation", None),
        getattr(args, "gradient_accumulation_steps", 1),
    )
    if spg is not None and spg != gas:
        problems.append(
            f"steps_per_generation={spg} != gradient_accumulation_steps={gas}: later optimiser steps "
            "would reuse stale (off-policy, clipped) samples"
        )
    return problems


def exact_ctrl_config(
    output_dir: str,
    *,
    beta: float,
    num_generations: int,
    strict: bool = True,
    **kwargs: Any,
) -> RLOOConfig:
    """A ``trl.RLOOConfig`` whose update is exactly CTRL's KL-regularised RLOO (spec section 6).

    With M = ``num_generations`` samples per prompt, TRL's RLOOTrainer (trl/trainer/rloo_trainer.py,
    ``_generate_and_score_completions`` and ``_compute_loss``) then computes

        R_i' = R_i - beta * sum_t (log pi(y_i,t) - log pi_ref(y_i,t))     sequence-level KL in the reward
        A_i  = R_i' - mean_{j != i} R_j'                                  leave-one-out baseline
        loss = mean_i [ -A_i * exp(log pi(y_i) - log pi_old(y_i)) ]       ratio = 1: grad = -A_i grad log pi(y_i)

    with ``R_i`` the CalibratedReward. Settings fixed here (``EXACT_CTRL_SETTINGS``):
    ``beta`` (> 0, constant: TRL has no adaptive KL controller), ``normalize_advantages=False`` (no
    std scaling), ``num_iterations=1`` and ``steps_per_generation = gradient_accumulation_steps``
    (on-policy; PPO clipping inactive), ``reward_clip_range=None``, ``reward_weights=None`` (pass exactly
    one reward function), ``mask_truncated_completions=False``, ``sync_ref_model=False`` (pi_ref fixed),
    ``temperature=1, top_p=1, top_k=0, min_p=None, repetition_penalty=1, generation_kwargs=None``
    (samples and log-probs are pi's own), ``disable_dropout=True``, ``use_vllm=False``,
    ``remove_unused_columns=False`` (keeps the reference column).

    Other keyword arguments (learning rate, batch sizes, ``max_completion_length``, ``bf16``, ...) go to
    ``RLOOConfig`` unchanged. Overriding a fixed setting with a different value raises ValueError
    (``strict=True``) or logs a warning (``strict=False``).
    """
    from trl import RLOOConfig

    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0 (the KL coefficient), got {beta!r}")
    if not isinstance(num_generations, int) or num_generations < 2:
        raise ValueError(
            f"num_generations must be an int >= 2 (RLOO baseline), got {num_generations!r}"
        )
    fields = {f.name for f in dataclasses.fields(RLOOConfig)}
    missing = [k for k in EXACT_CTRL_SETTINGS if k not in fields]
    if missing:
        raise RuntimeError(
            f"the installed trl's RLOOConfig lacks {missing}; cannot guarantee the exact CTRL objective"
        )
    settings = dict(EXACT_CTRL_SETTINGS)
    for key, value in kwargs.items():
        if key in settings and value != settings[key] and value not in _EQUIVALENT.get(key, ()):
            msg = f"exact_ctrl_config: {key}={value!r} departs from CTRL (needs {settings[key]!r})"
            if strict:
                raise ValueError(msg + "; pass strict=False to allow it")
            logger.warning(msg)
    settings.update(kwargs)
    config = RLOOConfig(
        output_dir=output_dir, beta=float(beta), num_generations=num_generations, **settings
    )
    problems = check_exact_ctrl(config)
    if problems:
        msg = "exact_ctrl_config: the config is not exactly CTRL: " + "; ".join(problems)
        if strict:
            raise ValueError(msg + "; pass strict=False to allow it")
        logger.warning(msg)
    return config
