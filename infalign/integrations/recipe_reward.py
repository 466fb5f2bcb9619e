"""A recipe's CTRL reward outside infalign's trainer: the engine of ``infalign serve-reward`` and of
the OpenRLHF / verl functions that ``infalign export-reward`` writes.

``RewardSpec`` says which reward: the recipe's reward model (``reward``), the train split's reference
artifact (``reference_dir``, built by ``infalign reference RECIPE``), the method's transform resolved
to a fixed Phi, the calibration flavour and the special tokens to drop from responses. It is plain
JSON, so an exported file carries it. ``CTRLReward`` loads it once (reward model + the (P, K)
reference rewards) and maps B (prompt, response) texts to (B,) tensors::

    raw = r(x, y)                                   the reward model, rounded to float32 like the artifact
    calibrated = C_hat(x, y) = (1/K) sum_k [1{raw > s_k} + 1/2 1{raw = s_k}]   s = x's K reference rewards
    reward = Phi(calibrated)                        (the raw reward itself for a ``raw`` method)

through ``CalibratedReward.compute``. A prompt is identified by its exact text; one that is not in the
artifact is an ``UnknownPromptError`` naming it (rewards are never computed on demand: add the prompt
to ``prompts.train`` and rerun ``infalign reference``).
"""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from infalign.core.transforms import Transform, transform_from_dict
from infalign.integrations.calibrated import CalibratedReward, CalibratedRewardOutput, _short

if TYPE_CHECKING:
    from infalign.run.config import RunConfig

__all__ = [
    "CTRLReward",
    "LazyReward",
    "QueryError",
    "RewardSpec",
    "UnknownPromptError",
    "spec_from_recipe",
    "split_query",
]

log = logging.getLogger(__name__)


class UnknownPromptError(ValueError):
    """A prompt with no reference rewards in the artifact."""


class QueryError(ValueError):
    """A query that does not start with its prompt."""


@dataclass(frozen=True)
class RewardSpec:
    """Everything needed to rebuild a recipe's CTRL reward; JSON-serialisable (``asdict``).

    ``transform`` is ``Transform.to_dict()`` of the resolved Phi, or None for a ``raw`` method.
    ``prompts_sha256`` and ``num_samples`` pin the artifact that was checked against the recipe.
    """

    method: str
    transform: dict[str, Any] | None
    reward: dict[str, Any]
    reference_dir: str
    smoothed: bool
    special_tokens: tuple[str, ...]
    prompts_sha256: str
    num_samples: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["special_tokens"] = list(self.special_tokens)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RewardSpec:
        return cls(**{**d, "special_tokens": tuple(d.get("special_tokens", ()))})


def _default_method(cfg: RunConfig) -> str:
    """The recipe's first method whose transform is not ``raw``."""
    from infalign.run.pipeline import sweep

    for m in sweep(cfg):
        if m.transform.strip().lower() != "raw":
            return m.name
    names = [m.name for m in sweep(cfg)]
    raise ValueError(
        f"the recipe's methods {names} are all raw; pass --method to serve one of them"
    )


def _absolute_reward(reward: dict[str, Any]) -> dict[str, Any]:
    """The reward config with a local model dir or ``file.py:function`` made absolute (an exported
    file is imported from another working directory)."""
    name = reward["name"]
    if reward["kind"] == "callable":
        module, _, fn = name.rpartition(":")
        if module.endswith(".py") and Path(module).is_file():
            name = f"{Path(module).resolve()}:{fn}"
    elif Path(name).exists():
        name = str(Path(name).resolve())
    return {**reward, "name": name}


def spec_from_recipe(
    cfg: RunConfig, method: str | None = None, strip_special_tokens: bool = True
) -> RewardSpec:
    """The ``RewardSpec`` of ``method`` (default: the first non-raw method) of a validated recipe.

    The transform is resolved as for training (``exp:auto`` for ``report.procedure`` at
    ``rl.target_kl``); the train reference artifact must be finished and made with this recipe's
    reference settings (ValueError naming the differing field otherwise). ``special_tokens`` are the
    policy tokenizer's (the reference completions were decoded without them).
    """
    from infalign.lm.models import load_tokenizer
    from infalign.run.config import to_dict
    from infalign.run.keys import reference_key
    from infalign.run.reference import ReferenceSet
    from infalign.run.runs import RunEnv, get_method, reference_dir, stage_state
    from infalign.run.train import resolve_transform

    name = _default_method(cfg) if method is None else method
    tf, _ = resolve_transform(cfg, get_method(cfg, name))
    d = reference_dir(cfg, "train")
    if stage_state(d, reference_key(RunEnv(cfg), "train"), "reference/train") != "done":
        raise ValueError(
            f"no finished reference artifact in {str(d)!r}; build it with `infalign reference "
            "RECIPE --split train` (same overrides)"
        )
    meta = ReferenceSet.load(d).meta
    special = (
        tuple(t for t in load_tokenizer(cfg.model).all_special_tokens if t)
        if strip_special_tokens
        else ()
    )
    return RewardSpec(
        method=name,
        transform=None if tf is None else tf.to_dict(),
        reward=_absolute_reward(to_dict(cfg.reward)),
        reference_dir=str(d.resolve()),
        smoothed=cfg.reference.smoothed,
        special_tokens=special,
        prompts_sha256=meta["prompts_sha256"],
        num_samples=int(meta["num_samples"]),
    )


def split_query(query: str, prompt: str, index: int = 0) -> str:
    """The response of an OpenRLHF query: ``query`` minus its ``prompt`` prefix.

    QueryError naming ``index`` if ``query`` does not start with ``prompt`` (the response cannot be
    told apart from the prompt then; the reward is not guessed).
    """
    if not query.startswith(prompt):
        raise QueryError(
            f"query[{index}] {_short(query)} does not start with prompts[{index}] {_short(prompt)}"
        )
    return query[len(prompt) :]


class CTRLReward:
    """A loaded ``RewardSpec``: ``reward(prompts, responses) -> CalibratedRewardOutput`` of (B,) tensors.

    Thread-safe for concurrent calls if the reward model is.
    """

    def __init__(self, spec: RewardSpec, reward_fn: Any = None) -> None:
        from infalign.lm.rewards import load_reward, score
        from infalign.run.config import RewardConfig
        from infalign.run.recipe import from_dict
        from infalign.run.reference import ReferenceSet

        ref = ReferenceSet.load(spec.reference_dir)
        for key in ("prompts_sha256", "num_samples"):
            if ref.meta.get(key) != getattr(spec, key):
                raise ValueError(
                    f"reference artifact {spec.reference_dir!r} has {key}={ref.meta.get(key)!r}, "
                    f"the reward was exported with {getattr(spec, key)!r}: it was rebuilt since; "
                    "export the reward again"
                )
        if reward_fn is None:
            reward_fn = load_reward(from_dict(RewardConfig, spec.reward, "reward"))
        self.spec = spec
        self.transform: Transform | None = (
            None if spec.transform is None else transform_from_dict(spec.transform)
        )
        # score() rounds to float32 and checks shape and finiteness, exactly as for the artifact
        self._calibrated = CalibratedReward(
            functools.partial(score, reward_fn),
            self.transform or "identity",
            smoothed=spec.smoothed,
            name=f"ctrl_{spec.method}",
        )
        self.prompts = ref.prompts
        self.reference = ref.rewards.to(torch.float64)  # (P, K)
        self.index: dict[str, int] = {}
        for i, p in enumerate(ref.prompts):
            self.index.setdefault(p, i)
        log.info(
            "CTRL reward %s (%s): %d prompts x K=%d from %s",
            spec.method,
            "raw" if self.transform is None else self.transform,
            len(self.prompts),
            self.reference.shape[1],
            spec.reference_dir,
        )

    def rows(self, prompts: list[str]) -> list[int]:
        """Artifact row of each prompt; UnknownPromptError naming the first unknown one."""
        out = []
        for i, p in enumerate(prompts):
            row = self.index.get(p)
            if row is None:
                raise UnknownPromptError(
                    f"prompts[{i}] {_short(p)} has no reference rewards in "
                    f"{self.spec.reference_dir!r} ({len(self.index)} prompts); add it to "
                    "prompts.train and rerun `infalign reference`"
                )
            out.append(row)
        return out

    def clean(self, response: str) -> str:
        """The response without the policy tokenizer's special tokens (as the artifact was decoded)."""
        for tok in self.spec.special_tokens:
            response = response.replace(tok, "")
        return response

    def __call__(self, prompts: list[str], responses: list[str]) -> CalibratedRewardOutput:
        """Raw, calibrated and CTRL rewards, each (B,) float64, of B (prompt, response) pairs."""
        if len(prompts) != len(responses):
            raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
        rows = self.rows(prompts)
        cleaned = [self.clean(r) for r in responses]
        out = self._calibrated.compute(prompts, cleaned, self.reference[rows])
        if self.transform is None:  # a raw method: the reward is the reward model's
            return CalibratedRewardOutput(out.raw, out.calibrated, out.raw)
        return out

    def split(self, queries: list[str], prompts: list[str]) -> list[str]:
        """The responses of OpenRLHF queries (``queries[i]`` = ``prompts[i]`` + response).

        ValueError for lists of different lengths, UnknownPromptError for a prompt with no reference
        rewards, QueryError for a query that does not start with its prompt (each naming the index).
        """
        if len(queries) != len(prompts):
            raise ValueError(f"got {len(queries)} queries but {len(prompts)} prompts")
        self.rows(prompts)
        return [split_query(q, p, i) for i, (q, p) in enumerate(zip(queries, prompts, strict=True))]

    def score_queries(self, queries: list[str], prompts: list[str]) -> CalibratedRewardOutput:
        """OpenRLHF's form: rewards of ``split(queries, prompts)``."""
        return self(prompts, self.split(queries, prompts))


class LazyReward:
    """A ``RewardSpec`` loaded on first use, once per process (thread-safe); pickles as the spec
    alone, so a Ray / multiprocessing worker loads its own copy."""

    def __init__(self, spec: RewardSpec | dict[str, Any]) -> None:
        self.spec = spec if isinstance(spec, RewardSpec) else RewardSpec.from_dict(spec)
        self._reward: CTRLReward | None = None
        self._lock = threading.Lock()

    def get(self) -> CTRLReward:
        if self._reward is None:
            with self._lock:
                if self._reward is None:
                    self._reward = CTRLReward(self.spec)
        return self._reward

    def __getstate__(self) -> dict[str, Any]:
        return {"spec": self.spec.to_dict()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["spec"])  # type: ignore[misc]
