"""The calibrated, transformed reward ``Phi(C_hat(x, y))`` of one completion (spec sections 2 and 6).

``CalibratedReward`` scores completions with an infalign reward function and maps each score to its
quantile among the K cached reference-policy rewards of **its own** prompt::

    C_hat(x, y) = (1/K) sum_k [ 1{r(x,y) > s_k} + 1/2 1{r(x,y) = s_k} ]      (EmpiricalCalibration)
    R(x, y)     = Phi(C_hat(x, y))                                            (Transform)

Called with TRL's keyword arguments it is a TRL reward function (``infalign.integrations.trl``); its
``compute`` is what the reward server and the OpenRLHF / verl functions
(``infalign.integrations.recipe_reward``) call.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from infalign.core.calibration import EmpiricalCalibration
from infalign.core.transforms import RAW, Transform, is_raw, parse_transform

__all__ = [
    "RAW",
    "REFERENCE_COLUMN",
    "CalibratedReward",
    "CalibratedRewardOutput",
    "message_text",
]

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
