"""CTRL inside TRL: the calibrated, transformed reward as a TRL reward function (spec sections 2 and 6).

TRL's ``RLOOTrainer`` / ``GRPOTrainer`` call each reward function as
``f(prompts=..., completions=..., completion_ids=..., **dataset_columns, trainer_state=..., log_extra=...,
log_metric=...)`` with one entry per completion (each prompt repeated ``num_generations`` times,
consecutively) and expect one float per completion back. ``CalibratedReward`` scores the completions
with an infalign reward function, maps each score to its quantile among the K cached reference-policy
rewards of **its own** prompt (a dataset column, attached with ``add_reference_rewards``)::

    C_hat(x, y) = (1/K) sum_k [ 1{r(x,y) > s_k} + 1/2 1{r(x,y) = s_k} ]      (EmpiricalCalibration)
    R(x, y)     = Phi(C_hat(x, y))                                            (Transform)

and returns ``R``. ``exact_ctrl_config`` builds the ``trl.RLOOConfig`` whose update is exactly CTRL's
KL-regularised RLOO (sequence-level KL inside the reward, fixed beta, leave-one-out baseline, no std
scaling, on-policy); ``check_exact_ctrl`` lists how any config departs from it. See docs/trl.md.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from infalign.core.calibration import EmpiricalCalibration
from infalign.core.transforms import RAW, Transform, is_raw, parse_transform

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

REFERENCE_COLUMN = "reference_rewards"
# keyword arguments TRL adds to every reward call that are not dataset columns
_TRL_EXTRA_KWARGS = ("completion_ids", "trainer_state", "log_extra", "log_metric")

RewardCallable = Callable[[list[str], list[list[str]]], Any]


def message_text(x: Any) -> str:
    """Text of a TRL prompt or completion.

    A string is returned as is. A chat message list ``[{"role": ..., "content": ...}, ...]`` (TRL's
    conversational format; a completion is ``[{"role": "assistant", "content": text}]``) gives its text
    contents joined by newlines; a content given as parts keeps the ``{"type": "text"}`` parts.
    """
    if isinstance(x, str):
        return x
    if isinstance(x, dict):
        x = [x]
    if not isinstance(x, Sequence):
        raise TypeError(
            f"expected a string or a list of chat messages, got {type(x).__name__}: {x!r}"
        )
    texts: list[str] = []
    for message in x:
        if not isinstance(message, dict) or "content" not in message:
            raise TypeError(f"chat message must be a dict with a 'content' key, got {message!r}")
        content = message["content"]
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(
                str(part.get("text", ""))
                for part in content
                if isinstance(part, dict) and part.get("type") == "text"
            )
        elif content is not None:
            raise TypeError(
                f"chat message content must be a string or a list of parts, got {content!r}"
            )
    return "\n".join(texts)


def _equal_runs(texts: list[str]) -> tuple[int, int] | None:
    """(P, M) if ``texts`` is P runs of M identical consecutive entries (TRL's layout), else None."""
    starts = [0] + [i for i in range(1, len(texts)) if texts[i] != texts[i - 1]]
    m = len(texts) // len(starts)
    if m * len(starts) != len(texts) or any(s != i * m for i, s in enumerate(starts)):
        return None
    return len(starts), m


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def _reference_matrix(rows: Any, column: str, batch: int) -> np.ndarray:
    """(B, K) float64 array from a column of per-prompt reward lists; ragged rows and None become NaN."""
    if isinstance(rows, torch.Tensor):
        rows = rows.detach().cpu().numpy()
    if isinstance(rows, (str, bytes)) or not isinstance(rows, (Sequence, np.ndarray)):
        raise ValueError(
            f"column {column!r} must hold one list of reference rewards per completion, got {type(rows).__name__}"
        )
    if len(rows) != batch:
        raise ValueError(
            f"column {column!r} has {len(rows)} rows but there are {batch} completions"
        )
    try:
        arr = np.asarray(rows, dtype=np.float64)  # rectangular; None -> NaN
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.ndim != 2:
        for i, row in enumerate(rows):
            if row is None or isinstance(row, (str, bytes)) or not hasattr(row, "__len__"):
                raise ValueError(
                    f"column {column!r} row {i} must be a list of reference rewards, got {row!r}"
                )
        width = max((len(row) for row in rows), default=0)
        arr = np.full((batch, width), np.nan)
        for i, row in enumerate(rows):  # data marshalling only: pad ragged rows with NaN (missing)
            arr[i, : len(row)] = np.asarray(row, dtype=np.float64)
    return arr


def _check_reference(arr: np.ndarray, column: str, prompts: Sequence[str]) -> None:
    """Clear errors naming the column, the row and the prompt (before any calibration)."""
    inf = np.isinf(arr)
    if inf.any():
        i, k = (int(v) for v in np.argwhere(inf)[0])
        raise ValueError(
            f"column {column!r} row {i} (prompt {_short(prompts[i])}) has an infinite reference reward "
            f"{arr[i, k]!r} at position {k}; use NaN to mark a missing reward"
        )
    counts = np.isfinite(arr).sum(axis=1)
    few = np.flatnonzero(counts < 2)
    if few.size:
        i = int(few[0])
        raise ValueError(
            f"column {column!r} row {i} (prompt {_short(prompts[i])}) has {int(counts[i])} finite "
            f"reference rewards; calibration needs at least 2 ({few.size} row(s) affected)"
        )


class CalibratedRewardOutput(NamedTuple):
    """Per-completion tensors (B,), float64: the reward model's score, C_hat (None for "raw"), Phi(C_hat)."""

    raw: torch.Tensor
    calibrated: torch.Tensor | None
    reward: torch.Tensor


class CalibratedReward:
    """TRL reward function ``Phi(C_hat(x, y))``: reward, calibrate against the prompt's own reference, transform.

    Args:
        reward_fn: infalign RewardFn ``(prompts: list[str], completions: list[list[str]]) -> (P, M)``
            tensor (or array); it must score each completion independently of its siblings.
        transform: an infalign ``Transform`` or spec string (``identity``, ``log``, ``exp:T``,
            ``negexp:T``, chains ``a|b``); ``"raw"`` returns the uncalibrated reward (baseline; the
            reference column is then not needed).
        smoothed: use the mid-rank calibration ``(K C_hat + 1/2) / (K + 1)`` (never exactly 0 or 1).
        reference_column: dataset column with each prompt's K cached reference rewards (list of floats,
            NaN or None for a missing one; rows may differ in length).
        name: the reward's ``__name__`` (TRL logs ``rewards/<name>/mean``); default ``ctrl_<transform>``
            or ``raw_reward``.
        group_prompts: score identical consecutive prompts as one (P, M) call (TRL repeats each prompt
            ``num_generations`` times in a row); else one call with P = B, M = 1.
        chat_to_text: how a prompt or completion becomes a string for ``reward_fn``; the default
            ``message_text`` keeps strings and joins the text contents of chat message lists.

    Calling it with TRL's keyword arguments returns a list of B floats. If TRL passes ``log_metric`` /
    ``log_extra``, the batch means of the raw and calibrated rewards are logged as
    ``<name>/raw_mean`` and ``<name>/calibrated_mean`` and per-completion columns are added to the
    completions table.
    """

    def __init__(
        self,
        reward_fn: RewardCallable,
        transform: Transform | str = "identity",
        smoothed: bool = False,
        reference_column: str = REFERENCE_COLUMN,
        *,
        name: str | None = None,
        group_prompts: bool = True,
        chat_to_text: Callable[[Any], str] = message_text,
    ) -> None:
        if not callable(reward_fn):
            raise TypeError(f"reward_fn must be callable, got {type(reward_fn).__name__}")
        if not isinstance(reference_column, str) or not reference_column:
            raise ValueError(
                f"reference_column must be a non-empty string, got {reference_column!r}"
            )
        self.reward_fn = reward_fn
        raw = is_raw(transform)
        self.transform: Transform | None = None if raw else parse_transform(transform)
        if raw and smoothed:
            raise ValueError("smoothed=True needs a calibrated transform, but transform='raw'")
        self.smoothed = bool(smoothed)
        self.reference_column = reference_column
        self.group_prompts = bool(group_prompts)
        self.chat_to_text = chat_to_text
        if name is None:
            slug = re.sub(r"[^0-9A-Za-z]+", "_", str(self.transform)).strip("_")
            name = "raw_reward" if self.transform is None else f"ctrl_{slug}"
        self.__name__ = name

    @property
    def calibrated(self) -> bool:
        return self.transform is not None

    def __repr__(self) -> str:
        spec = RAW if self.transform is None else str(self.transform)
        return (
            f"CalibratedReward(transform={spec!r}, smoothed={self.smoothed}, "
            f"reference_column={self.reference_column!r}, name={self.__name__!r})"
        )

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        """Raw rewards (B,) float64 of B (prompt, completion) text pairs through ``reward_fn``."""
        if len(prompts) != len(completions):
            raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
        batch = len(prompts)
        if batch == 0:
            return torch.empty(0, dtype=torch.float64)
        runs = _equal_runs(list(prompts)) if self.group_prompts else None
        p, m = runs if runs is not None else (batch, 1)
        out = self.reward_fn(
            [prompts[i * m] for i in range(p)],
            [list(completions[i * m : (i + 1) * m]) for i in range(p)],
        )
        r = torch.as_tensor(out.detach() if isinstance(out, torch.Tensor) else out).cpu()
        if tuple(r.shape) != (p, m):
            raise ValueError(
                f"reward_fn returned shape {tuple(r.shape)} for {p} prompts x {m} completions; "
                f"expected ({p}, {m})"
            )
        r = r.to(torch.float64).reshape(batch)
        bad = ~torch.isfinite(r)
        if bad.any():
            i = int(torch.nonzero(bad)[0])
            raise ValueError(
                f"reward_fn returned {r[i].item()} for completion {i} (prompt {_short(prompts[i])}); "
                "rewards must be finite"
            )
        return r

    def compute(
        self, prompts: Sequence[Any], completions: Sequence[Any], reference_rewards: Any = None
    ) -> CalibratedRewardOutput:
        """Raw, calibrated and transformed rewards (each (B,)) for B completions.

        ``reference_rewards`` holds row i's reference rewards for completion i: a (B, K) tensor/array or
        a list of B lists (ragged, NaN/None for missing). Shapes: C_hat is the calibration fitted on
        these (B, K) rows applied to the (B, 1) raw rewards, so each completion is ranked against its
        own prompt's reference only.
        """
        p_text = [self.chat_to_text(x) for x in prompts]
        c_text = [self.chat_to_text(x) for x in completions]
        if self.transform is not None:
            if reference_rewards is None:
                raise ValueError(
                    f"calibration needs the reference rewards (column {self.reference_column!r})"
                )
            ref = _reference_matrix(reference_rewards, self.reference_column, len(p_text))
            _check_reference(ref, self.reference_column, p_text)
        raw = self.score(p_text, c_text)
        if self.transform is None:
            return CalibratedRewardOutput(raw=raw, calibrated=None, reward=raw)
        if raw.numel() == 0:
            return CalibratedRewardOutput(raw=raw, calibrated=raw.clone(), reward=raw.clone())
        cal = EmpiricalCalibration.fit(torch.from_numpy(ref), smoothed=self.smoothed)
        c_hat = cal(raw.unsqueeze(1)).squeeze(1)  # (B, 1) -> (B,)
        return CalibratedRewardOutput(raw=raw, calibrated=c_hat, reward=self.transform(c_hat))

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any
    ) -> list[float]:
        """TRL entry point: one float per completion."""
        if self.transform is not None and self.reference_column not in kwargs:
            columns = sorted(k for k in kwargs if k not in _TRL_EXTRA_KWARGS)
            raise ValueError(
                f"{self.__name__}: the reward function needs the dataset column {self.reference_column!r} "
                f"(each prompt's K cached reference rewards), but the batch has columns {columns}. Attach "
                f"it with infalign.integrations.trl.add_reference_rewards(dataset, rewards, "
                f"column={self.reference_column!r}) and keep it with remove_unused_columns=False."
            )
        out = self.compute(prompts, completions, kwargs.get(self.reference_column))
        log_metric = kwargs.get("log_metric")
        if callable(log_metric) and out.raw.numel():
            log_metric(f"{self.__name__}/raw_mean", float(out.raw.mean()))
            if out.calibrated is not None:
                log_metric(f"{self.__name__}/calibrated_mean", float(out.calibrated.mean()))
        log_extra = kwargs.get("log_extra")
        if callable(log_extra):
            log_extra(f"{self.__name__}/raw", out.raw.tolist())
            if out.calibrated is not None:
                log_extra(f"{self.__name__}/calibrated", out.calibrated.tolist())
        return out.reward.tolist()


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
