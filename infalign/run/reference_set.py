"""The reference artifact as data: :class:`ReferenceSet` (K scored samples per prompt from pi_ref, with
their token ids and log pi_ref), its file names and format version. :mod:`infalign.run.reference` builds
it (the reference stage) and documents the files.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from infalign.core.calibration import EmpiricalCalibration
from infalign.lm.models import Generation, encode_prompts
from infalign.run.io import read_json, read_jsonl

__all__ = ["FORMAT_VERSION", "ReferenceSet", "tie_fraction"]

log = logging.getLogger(__name__)

FINAL_ROWS = "reference.jsonl"
FINAL_META = "reference.json"
PARTIAL_ROWS = "reference.partial.jsonl"
PARTIAL_META = "reference.partial.json"
# 2: token_ids and logprobs per sample (the regression trainer trains on the exact sampled tokens;
# re-tokenising the texts changes some sequences). A version-1 artifact is reported, never reused.
FORMAT_VERSION = 2


def tie_fraction(rewards: torch.Tensor) -> float:
    """Mean over prompts of the fraction of a prompt's K rewards equal to another of its rewards.

    rewards: (P, K). Returns a float in [0, 1].
    """
    r = torch.as_tensor(rewards)
    if r.ndim != 2 or r.shape[1] < 1:
        raise ValueError(f"rewards must be (P, K), got shape {tuple(r.shape)}")
    s, _ = torch.sort(r, dim=1)
    eq = s[:, 1:] == s[:, :-1]
    tied = torch.zeros_like(s, dtype=torch.bool)
    tied[:, 1:] |= eq
    tied[:, :-1] |= eq
    return float(tied.float().mean(dim=1).mean())


@dataclass
class ReferenceSet:
    """K reference samples for each of P prompts and their rewards.

    Attributes:
        prompts: P prompt strings.
        completions: P lists of K completions.
        rewards: (P, K) float32.
        num_tokens: (P, K) long, completion tokens (EOS included).
        token_ids: P lists of K token-id lists (each ``num_tokens[p, k]`` long).
        logprobs: (P, K) float64, ``log pi_ref(y_pk | x_p)`` (tempered, summed over the tokens).
        meta: the artifact's metadata (``reference.json``).
    """

    prompts: list[str]
    completions: list[list[str]]
    rewards: torch.Tensor
    num_tokens: torch.Tensor
    token_ids: list[list[list[int]]]
    logprobs: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        """K."""
        return int(self.rewards.shape[1])

    def calibration(self, smoothed: bool = False) -> EmpiricalCalibration:
        """The per-prompt empirical CDF of the reference rewards (spec section 2)."""
        return EmpiricalCalibration.fit(self.rewards, smoothed=smoothed)

    def tie_fraction(self) -> float:
        """Mean over prompts of the fraction of the K rewards that equal another of the same prompt."""
        return tie_fraction(self.rewards)

    def generation(
        self, tokenizer: Any, prompt_idx: list[int], sample_idx: torch.Tensor
    ) -> Generation:
        """The stored samples ``sample_idx[j]`` (k of the K) of prompts ``prompt_idx[j]`` as a
        :class:`~infalign.lm.models.Generation` of len(prompt_idx) x k rows, exactly as sampled: the
        prompt encoded as for sampling (left-padded), the stored completion tokens right-padded.

        sample_idx: (P', k) long indices into 0..K-1.
        """
        sample_idx = torch.as_tensor(sample_idx, dtype=torch.long)
        if sample_idx.ndim != 2 or sample_idx.shape[0] != len(prompt_idx):
            raise ValueError(
                f"sample_idx must be (P'={len(prompt_idx)}, k), got {tuple(sample_idx.shape)}"
            )
        k = sample_idx.shape[1]
        ids, am = encode_prompts(tokenizer, [self.prompts[p] for p in prompt_idx])
        rows = [
            self.token_ids[p][int(j)]
            for p, js in zip(prompt_idx, sample_idx, strict=True)
            for j in js
        ]
        T = max(1, max(len(r) for r in rows))
        comp = torch.full((len(rows), T), int(tokenizer.pad_token_id), dtype=torch.long)
        cmask = torch.zeros(len(rows), T)
        for b, r in enumerate(rows):
            comp[b, : len(r)] = torch.tensor(r, dtype=torch.long)
            cmask[b, : len(r)] = 1.0
        return Generation(
            input_ids=torch.cat([ids.repeat_interleave(k, dim=0), comp], dim=1),
            attention_mask=torch.cat([am.repeat_interleave(k, dim=0), cmask.long()], dim=1),
            prompt_length=ids.shape[1],
            completion_mask=cmask,
            texts=[
                [self.completions[p][int(j)] for j in js]
                for p, js in zip(prompt_idx, sample_idx, strict=True)
            ],
            prompts=[self.prompts[p] for p in prompt_idx],
        )

    @classmethod
    def from_rows(cls, rows: list[dict[str, Any]], meta: dict[str, Any]) -> ReferenceSet:
        rows = sorted(rows, key=lambda r: r["index"])
        return cls(
            prompts=[r["prompt"] for r in rows],
            completions=[r["completions"] for r in rows],
            rewards=torch.tensor([r["rewards"] for r in rows], dtype=torch.float32),
            num_tokens=torch.tensor([r["num_tokens"] for r in rows], dtype=torch.long),
            token_ids=[r["token_ids"] for r in rows],
            logprobs=torch.tensor([r["logprobs"] for r in rows], dtype=torch.float64),
            meta=meta,
        )

    @classmethod
    def load(cls, out_dir: str | Path) -> ReferenceSet:
        """Read a finished artifact; ValueError if it is missing, incomplete or inconsistent."""
        d = Path(out_dir)
        if not (d / FINAL_META).is_file() or not (d / FINAL_ROWS).is_file():
            partial = (
                " (an unfinished run left partial files)" if (d / PARTIAL_ROWS).exists() else ""
            )
            raise ValueError(f"no reference artifact in {str(d)!r}{partial}")
        meta = read_json(d / FINAL_META)
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"reference artifact {str(d)!r} has format_version={meta.get('format_version')!r}; "
                f"this infalign reads version {FORMAT_VERSION} (it stores the sampled token ids and "
                "log pi_ref per sample): delete the directory (or use another out) to rebuild it"
            )
        rows = read_jsonl(d / FINAL_ROWS)
        if [r.get("index") for r in rows] != list(range(meta["num_prompts"])):
            raise ValueError(
                f"{str(d / FINAL_ROWS)!r} does not hold rows 0..{meta['num_prompts'] - 1} in order"
            )
        ref = cls.from_rows(rows, meta)
        if tuple(ref.rewards.shape) != (meta["num_prompts"], meta["num_samples"]):
            raise ValueError(
                f"{str(d)!r}: rewards shape {tuple(ref.rewards.shape)} does not match the metadata "
                f"(P={meta['num_prompts']}, K={meta['num_samples']})"
            )
        return ref
