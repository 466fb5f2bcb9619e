"""Reward functions: ``(prompts, completions) -> (P, M)`` float tensor.

* :class:`HFRewardModel`: a sequence-classification reward model (hub name or local dir), batched,
  truncated, no grad; the reward is logit ``label_index``.
* :class:`CallableReward`: any ``module:function`` (or ``path/to/file.py:function``) with the same
  signature, returning a nested list, numpy array or tensor.
* :func:`score`: call a reward function and check the (P, M) shape and finiteness, naming the offending
  prompt / completion.

Rewards are float32 everywhere (reference and policy rewards go through the same :func:`score`, so
calibration compares like with like).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import traceback
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from tqdm.auto import tqdm

from infalign.lm.prompts import check_prompt_list
from infalign.run.config import RewardConfig

__all__ = [
    "CallableReward",
    "HFRewardModel",
    "RewardError",
    "RewardFn",
    "describe_reward",
    "load_reward",
    "score",
]

log = logging.getLogger(__name__)


@runtime_checkable
class RewardFn(Protocol):
    """``reward_fn(prompts, completions)``: P prompts, P lists of M completions -> (P, M) float."""

    def __call__(self, prompts: list[str], completions: list[list[str]]) -> torch.Tensor: ...


def describe_reward(reward_fn: Any) -> str:
    """A short, stable description of a reward function (for artifact metadata)."""
    desc = getattr(reward_fn, "description", None)
    if isinstance(desc, str):
        return desc
    mod = getattr(reward_fn, "__module__", None)
    name = getattr(reward_fn, "__qualname__", None)
    if mod and name and "<" not in name:
        return f"callable:{mod}:{name}"
    return type(reward_fn).__name__


def _check_inputs(prompts: Any, completions: Any) -> int:
    """Validate the (prompts, completions) structure; returns M."""
    check_prompt_list(prompts)
    if not isinstance(completions, list) or len(completions) != len(prompts):
        n = len(completions) if isinstance(completions, list) else type(completions).__name__
        raise ValueError(f"completions must be a list of P={len(prompts)} lists, got {n}")
    M = len(completions[0]) if isinstance(completions[0], list) else -1
    for p, group in enumerate(completions):
        if not isinstance(group, list) or len(group) != M:
            got = len(group) if isinstance(group, list) else type(group).__name__
            raise ValueError(f"completions[{p}] must be a list of M={M} strings, got {got}")
        for m, c in enumerate(group):
            if not isinstance(c, str):
                raise ValueError(f"completions[{p}][{m}] is {type(c).__name__}, expected str")
    if M < 1:
        raise ValueError("every prompt needs at least one completion (M >= 1)")
    return M


def _short(text: str, n: int = 80) -> str:
    return repr(text if len(text) <= n else text[: n - 3] + "...")


class RewardError(ValueError):
    """The user's reward function failed (raised, exited, or returned something unusable)."""


def _where(err: BaseException) -> str:
    """``file:line`` of the innermost frame of an exception's traceback ('?' without one)."""
    frames = traceback.extract_tb(err.__traceback__)
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"


def _call(reward_fn: Any, prompts: list[str], completions: list[list[str]]) -> Any:
    """``reward_fn(prompts, completions)``; an exception or ``sys.exit`` inside it becomes one
    RewardError naming the function, the exception type, its message and where it was raised."""
    desc = describe_reward(reward_fn)
    try:
        return reward_fn(prompts, completions)
    except SystemExit as err:
        raise RewardError(
            f"reward {desc} called sys.exit({err.code!r}) at {_where(err)}; a reward must return "
            "(P, M) numbers"
        ) from None
    except Exception as err:
        raise RewardError(
            f"reward {desc} raised {type(err).__name__}: {' '.join(str(err).split())} "
            f"(at {_where(err)})"
        ) from err


def _as_float32(raw: Any, desc: str, P: int, M: int) -> torch.Tensor:
    """A reward function's output as a float32 CPU tensor; RewardError for None, non-numbers and
    finite values beyond float32's range (they would silently become inf)."""
    if raw is None:
        raise RewardError(f"reward {desc} returned None, expected (P={P}, M={M}) numbers")
    try:
        if isinstance(raw, torch.Tensor):
            wide = raw.detach().to("cpu", torch.float64)
        else:
            wide = torch.as_tensor(np.asarray(raw, dtype=np.float64))
    except (TypeError, ValueError) as err:
        raise RewardError(
            f"reward {desc} returned {type(raw).__name__} that is not a (P={P}, M={M}) array of "
            f"numbers: {err}"
        ) from None
    huge = torch.isfinite(wide) & (wide.abs() > torch.finfo(torch.float32).max)
    if huge.any():
        i = tuple(int(j) for j in torch.nonzero(huge)[0])
        raise RewardError(
            f"reward {desc} is {wide[i].item():g} at index {list(i)}: it exceeds float32 "
            f"(max {torch.finfo(torch.float32).max:.3g}); rescale the reward"
        )
    return wide.to(torch.float32)


def score(reward_fn: Any, prompts: list[str], completions: list[list[str]]) -> torch.Tensor:
    """Rewards of every completion: a (P, M) float32 CPU tensor.

    RewardError (a ValueError) in one line if the reward function raises or calls ``sys.exit``
    (naming the exception and where), returns None, another shape (expected vs got), a value
    beyond float32 or a non-finite value (naming the prompt index, the completion index and both
    texts, truncated).
    """
    M = _check_inputs(prompts, completions)
    P = len(prompts)
    raw = _call(reward_fn, prompts, completions)
    out = _as_float32(raw, describe_reward(reward_fn), P, M)
    if tuple(out.shape) != (P, M):
        raise RewardError(
            f"reward {describe_reward(reward_fn)} returned shape {tuple(out.shape)}, "
            f"expected (P={P}, M={M})"
        )
    bad = ~torch.isfinite(out)
    if bad.any():
        p, m = (int(i) for i in torch.nonzero(bad)[0])
        raise RewardError(
            f"reward {describe_reward(reward_fn)} is {out[p, m].item()} for prompt {p}, "
            f"completion {m} ({int(bad.sum())} non-finite in all): prompt={_short(prompts[p])}, "
            f"completion={_short(completions[p][m])}"
        )
    return out


class CallableReward:
    """A reward given as ``"module:function"`` or ``"path/to/file.py:function"``.

    The function takes ``(prompts, completions)`` and returns (P, M) numbers (list, array, tensor).
    A module that is not importable from ``sys.path`` is also looked up from the working directory.
    """

    def __init__(self, spec: str):
        if not isinstance(spec, str) or ":" not in spec:
            raise ValueError(f"reward.name={spec!r}: a callable reward is given as module:function")
        mod_name, _, fn_name = spec.rpartition(":")
        if not mod_name or not fn_name:
            raise ValueError(f"reward.name={spec!r}: a callable reward is given as module:function")
        module = _import(mod_name, spec)
        fn = module
        for part in fn_name.split("."):
            if not hasattr(fn, part):
                raise ValueError(f"reward.name={spec!r}: {mod_name!r} has no attribute {fn_name!r}")
            fn = getattr(fn, part)
        if not callable(fn):
            raise ValueError(f"reward.name={spec!r}: {fn_name!r} is not callable")
        self.fn = fn
        self.spec = spec
        self.description = f"callable:{spec}"

    def __call__(self, prompts: list[str], completions: list[list[str]]) -> torch.Tensor:
        return self.fn(prompts, completions)

    def __repr__(self) -> str:
        return f"CallableReward({self.spec!r})"


def _import(mod_name: str, spec: str) -> Any:
    if mod_name.endswith(".py"):
        path = Path(mod_name).expanduser()
        if not path.is_file():
            raise ValueError(f"reward.name={spec!r}: file {str(path)!r} does not exist")
        uniq = f"_infalign_reward_{abs(hash(str(path.resolve())))}"
        if uniq in sys.modules:
            return sys.modules[uniq]
        mspec = importlib.util.spec_from_file_location(uniq, path)
        assert mspec is not None and mspec.loader is not None
        module = importlib.util.module_from_spec(mspec)
        sys.modules[uniq] = module
        mspec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(mod_name)
    except ModuleNotFoundError as err:
        cwd = str(Path.cwd())
        if err.name and mod_name.startswith(err.name) and cwd not in sys.path:
            sys.path.append(cwd)
            try:
                return importlib.import_module(mod_name)
            except ModuleNotFoundError:
                pass
            finally:
                sys.path.remove(cwd)
        raise ValueError(
            f"reward.name={spec!r}: cannot import module {mod_name!r}: {err}"
        ) from None


def _refuse_new_weights(name: str, info: dict[str, Any]) -> None:
    """ValueError if transformers initialised weights of the classifier afresh (``missing_keys``, or
    ``mismatched_keys`` re-initialised for a new shape): e.g. a causal LM given as the reward model,
    whose ``score`` head would be random."""
    fresh = [str(k) for k in info.get("missing_keys") or ()]
    fresh += [str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys") or ()]
    if fresh:
        shown = ", ".join(sorted(fresh)[:5]) + (
            f" (+{len(fresh) - 5} more)" if len(fresh) > 5 else ""
        )
        raise ValueError(
            f"reward.name={name!r} is not a trained sequence classifier: transformers initialised "
            f"{shown} afresh (random); give a reward model with a trained head, or kind: callable"
        )


def _set_padding(tok: Any, model: Any, name: str) -> None:
    """Right padding (EOS as pad if there is none) and left truncation, the model told the pad id."""
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"reward model tokenizer {name!r} has no pad or EOS token")
        tok.pad_token = tok.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    tok.padding_side = "right"
    tok.truncation_side = "left"


class HFRewardModel:
    """A Hugging Face sequence-classification reward model.

    Each (prompt, completion) is scored as ``prompt + completion`` (or as a text pair when
    ``pair=True``), truncated to ``max_length`` tokens from the left (the start of the prompt goes
    first, so the completion is always seen), in batches of ``batch_size`` sorted by length, without
    grad. Returns logit ``label_index`` as a (P, M) float32 CPU tensor.
    """

    def __init__(
        self,
        path_or_name: str,
        batch_size: int = 64,
        max_length: int = 512,
        device: str = "auto",
        label_index: int = 0,
        dtype: str = "float32",
        pair: bool = False,
        trust_remote_code: bool = False,
        progress: bool = False,
    ):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from infalign.lm.models import _resolve_dtype, _source, resolve_device

        if batch_size < 1:
            raise ValueError(f"reward.batch_size={batch_size!r}: must be >= 1")
        if max_length < 2:
            raise ValueError(f"reward.max_length={max_length!r}: must be >= 2")
        name, local = _source(path_or_name, "reward model")
        self.device = resolve_device(device)
        kwargs: dict[str, Any] = {
            "dtype": _resolve_dtype(dtype),
            "trust_remote_code": trust_remote_code,
        }
        if local and Path(name).is_dir() and any(Path(name).glob("*.safetensors")):
            kwargs["use_safetensors"] = True
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(
                name, trust_remote_code=trust_remote_code
            )
            self.model, info = AutoModelForSequenceClassification.from_pretrained(
                name, output_loading_info=True, **kwargs
            )
        except Exception as err:
            raise ValueError(
                f"cannot load reward model from {name!r}: {type(err).__name__}: {err}"
            ) from err
        _refuse_new_weights(name, info)
        n_labels = int(getattr(self.model.config, "num_labels", 1))
        if not 0 <= label_index < n_labels:
            raise ValueError(
                f"reward.label_index={label_index}: the model {name!r} has {n_labels} label(s)"
            )
        _set_padding(self.tokenizer, self.model, name)
        self.model.to(self.device).eval().requires_grad_(False)
        self.batch_size = batch_size
        self.max_length = max_length
        self.label_index = label_index
        self.pair = pair
        self.progress = progress
        self.description = f"hf:{path_or_name}[{label_index}]" + (":pair" if pair else "")

    def __call__(self, prompts: list[str], completions: list[list[str]]) -> torch.Tensor:
        M = _check_inputs(prompts, completions)
        flat = [(p, c) for p, group in zip(prompts, completions, strict=True) for c in group]
        order = sorted(range(len(flat)), key=lambda i: len(flat[i][0]) + len(flat[i][1]))
        out = torch.empty(len(flat), dtype=torch.float32)
        starts = range(0, len(flat), self.batch_size)
        with torch.no_grad():
            for s in tqdm(starts, desc="reward", disable=not self.progress, leave=False):
                idx = order[s : s + self.batch_size]
                if self.pair:
                    enc = self.tokenizer(
                        [flat[i][0] for i in idx],
                        [flat[i][1] for i in idx],
                        truncation="only_first",
                        max_length=self.max_length,
                        padding=True,
                        return_tensors="pt",
                    )
                else:
                    enc = self.tokenizer(
                        [flat[i][0] + flat[i][1] for i in idx],
                        truncation=True,
                        max_length=self.max_length,
                        padding=True,
                        return_tensors="pt",
                    )
                enc = {k: v.to(self.device) for k, v in enc.items()}
                logits = self.model(**enc).logits
                out[torch.tensor(idx)] = logits[:, self.label_index].float().cpu()
        return out.view(len(prompts), M)

    def __repr__(self) -> str:
        return f"HFRewardModel({self.description!r})"


def load_reward(cfg: RewardConfig, trust_remote_code: bool = False) -> RewardFn:
    """Build the reward function a :class:`RewardConfig` describes (validated first)."""
    cfg.validate("reward")
    if cfg.kind == "callable":
        return CallableReward(cfg.name)
    return HFRewardModel(
        cfg.name,
        batch_size=cfg.batch_size,
        max_length=cfg.max_length,
        device=cfg.device,
        label_index=cfg.label_index,
        dtype=cfg.dtype,
        pair=cfg.pair,
        trust_remote_code=trust_remote_code,
    )
