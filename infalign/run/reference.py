"""The reference stage: K samples per prompt from pi_ref, scored once, cached as an artifact.

Artifact (in ``out_dir``):
    ``reference.jsonl``  one row per prompt: index, prompt, completions (K), num_tokens (K), rewards (K),
                         token_ids (K lists: the sampled completion tokens, EOS included) and
                         logprobs (K: the sequence log-prob ``log pi_ref(y|x)`` at the sampling temperature)
    ``reference.json``   metadata: K, seed, sampling, number of prompts and their hash, reward
                         description, prompts per chunk, fraction of tied rewards, versions

Resumable: prompts are processed in chunks of ``prompts_per_chunk``; chunk c is sampled with seed
``derive_seed(seed, c)``, so a resumed run equals an uninterrupted one. Finished chunks are appended (and
fsynced) to ``reference.partial.jsonl``; a restart checks ``reference.partial.json`` against the request
(ValueError naming the field that differs), keeps the complete chunks and does the rest. The final files
appear atomically and the partial files are then removed.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from infalign.core.calibration import EmpiricalCalibration
from infalign.lm.models import Generation, derive_seed, encode_prompts
from infalign.lm.prompts import check_prompt_list, prompts_sha256
from infalign.lm.rewards import describe_reward, score
from infalign.lm.sampling import sample, sampler_logprobs
from infalign.rl.advantages import sequence_logprob
from infalign.run.config import SamplingConfig, to_dict
from infalign.run.io import (
    append_jsonl,
    atomic_write_json,
    atomic_write_text,
    read_json,
    read_jsonl,
    run_manifest,
)
from infalign.run.keys import reference_key
from infalign.run.runs import SEED_KEYS, SPLITS, RunEnv, mark_stage, read_stage, reference_dir

__all__ = ["ReferenceSet", "build_reference", "reference_stage", "tie_fraction"]

log = logging.getLogger(__name__)

FINAL_ROWS = "reference.jsonl"
FINAL_META = "reference.json"
PARTIAL_ROWS = "reference.partial.jsonl"
PARTIAL_META = "reference.partial.json"
# 2: token_ids and logprobs per sample (the regression trainer trains on the exact sampled tokens;
# re-tokenising the texts changes some sequences). A version-1 artifact is reported, never reused.
FORMAT_VERSION = 2
# the fields a resumed or cached artifact must share with the request
_CHECKED = (
    "format_version",
    "num_samples",
    "seed",
    "sampling",
    "num_prompts",
    "prompts_sha256",
    "reward",
    "prompts_per_chunk",
)


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


def _check_meta(found: dict[str, Any], want: dict[str, Any], where: Path) -> None:
    """ValueError naming the first field of ``_CHECKED`` that differs. A sampling key that a newer
    infalign added (e.g. ``backend``, ``top_k``) reads as its default in an older artifact."""
    if isinstance(found.get("sampling"), dict):
        found = {**found, "sampling": {**to_dict(SamplingConfig()), **found["sampling"]}}
    for key in _CHECKED:
        if found.get(key) != want.get(key):
            raise ValueError(
                f"reference artifact {str(where)!r} was made with {key}={found.get(key)!r}, "
                f"this request has {key}={want.get(key)!r}; use another out_dir or delete it"
            )


def build_reference(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    reward_fn: Any,
    sampling: SamplingConfig,
    num_samples: int,
    out_dir: str | Path,
    seed: int,
    prompts_per_chunk: int | None = None,
    progress: bool = True,
) -> ReferenceSet:
    """Sample K = ``num_samples`` completions per prompt from ``model`` (pi_ref), score them once with
    ``reward_fn`` and write the artifact in ``out_dir`` (see the module docstring); returns it.

    An existing finished artifact made with the same request is loaded instead of recomputed; one made
    with a different request (K, sampling, seed, prompts, reward, chunking) is a ValueError.
    ``prompts_per_chunk`` defaults to ``max(1, sampling.batch_size // K)``.
    """
    prompts = check_prompt_list(prompts)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"reference.num_samples={num_samples!r}: calibration needs K >= 2")
    sampling.validate("sampling")
    K = num_samples
    ppc = prompts_per_chunk if prompts_per_chunk is not None else max(1, sampling.batch_size // K)
    if isinstance(ppc, bool) or not isinstance(ppc, int) or ppc < 1:
        raise ValueError(f"prompts_per_chunk={prompts_per_chunk!r}: must be an integer >= 1")
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    request: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "num_samples": K,
        "seed": int(seed),
        "sampling": to_dict(sampling),
        "num_prompts": len(prompts),
        "prompts_sha256": prompts_sha256(prompts),
        "reward": describe_reward(reward_fn),
        "prompts_per_chunk": ppc,
        "model": getattr(getattr(model, "config", None), "_name_or_path", None) or "",
    }

    if (d / FINAL_META).is_file():
        _check_meta(read_json(d / FINAL_META), request, d / FINAL_META)
        log.info("reference: reusing the finished artifact in %s", d)
        return ReferenceSet.load(d)

    rows = _resume(d, request, ppc)
    done = {r["chunk"] for r in rows}
    chunks = [list(range(s, min(s + ppc, len(prompts)))) for s in range(0, len(prompts), ppc)]
    todo = [c for c in range(len(chunks)) if c not in done]
    if rows:
        log.info("reference: resuming %s, %d of %d chunks done", d, len(done), len(chunks))
    try:
        for c in tqdm(todo, desc="reference", disable=not progress):
            idx = chunks[c]
            ps = [prompts[i] for i in idx]
            gen = sample(
                model, tokenizer, ps, K, sampling, seed=derive_seed(seed, c), progress=False
            )
            rewards = score(reward_fn, ps, gen.texts)
            lp = sampler_logprobs(model, gen, sampling)
            seq_lp = sequence_logprob(lp.double().cpu(), gen.completion_mask).view(len(ps), K)
            comp, n_tok = gen.completion_ids, gen.num_tokens.view(-1)
            new = [
                {
                    "index": i,
                    "chunk": c,
                    "prompt": prompts[i],
                    "completions": gen.texts[j],
                    "num_tokens": gen.num_tokens[j].tolist(),
                    "rewards": rewards[j].tolist(),
                    "token_ids": [
                        comp[j * K + k, : int(n_tok[j * K + k])].tolist() for k in range(K)
                    ],
                    "logprobs": seq_lp[j].tolist(),
                }
                for j, i in enumerate(idx)
            ]
            append_jsonl(d / PARTIAL_ROWS, new)
            rows.extend(new)
    except BaseException:
        if not rows:  # nothing finished: leave no partial files behind
            (d / PARTIAL_ROWS).unlink(missing_ok=True)
            (d / PARTIAL_META).unlink(missing_ok=True)
        raise

    ref = ReferenceSet.from_rows(rows, {})
    meta = {
        **request,
        "tie_fraction": ref.tie_fraction(),
        "mean_reward": float(ref.rewards.mean()),
        "mean_num_tokens": float(ref.num_tokens.float().mean()),
        "manifest": run_manifest(None, seed),
    }
    ref.meta = meta
    body = "".join(
        json.dumps({k: v for k, v in r.items() if k != "chunk"}, ensure_ascii=False) + "\n"
        for r in sorted(rows, key=lambda r: r["index"])
    )
    atomic_write_text(d / FINAL_ROWS, body)
    atomic_write_json(d / FINAL_META, meta)
    (d / PARTIAL_ROWS).unlink(missing_ok=True)
    (d / PARTIAL_META).unlink(missing_ok=True)
    if ref.meta["tie_fraction"] > 0.5:
        log.warning(
            "reference: %.0f%% of reference rewards are tied within their prompt; the calibrated "
            "reward will be coarse",
            100 * ref.meta["tie_fraction"],
        )
    log.info("reference: wrote %d prompts x %d samples to %s", len(prompts), K, d)
    return ref


def _resume(d: Path, request: dict[str, Any], ppc: int) -> list[dict[str, Any]]:
    """Rows of the complete chunks of an interrupted run (after checking its request), rewriting
    the partial file to exactly those rows; or [] after writing a fresh partial metadata file."""
    meta_path, rows_path = d / PARTIAL_META, d / PARTIAL_ROWS
    if not meta_path.is_file():
        rows_path.unlink(missing_ok=True)
        atomic_write_json(meta_path, request)
        return []
    try:
        found = read_json(meta_path)
        rows = read_jsonl(rows_path, strict=False) if rows_path.is_file() else []
    except ValueError as err:  # a corrupt partial file: its chunks cannot be trusted
        raise ValueError(f"{err}; delete it to sample its chunks again") from None
    _check_meta(found, request, meta_path)
    if not rows:  # (a torn first row is dropped with the file)
        rows_path.unlink(missing_ok=True)
        return []
    n = request["num_prompts"]
    by_chunk: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        by_chunk.setdefault(int(r["chunk"]), []).append(r)
    keep: list[dict[str, Any]] = []
    for c, rs in sorted(by_chunk.items()):
        want = list(range(c * ppc, min((c + 1) * ppc, n)))
        if sorted(r["index"] for r in rs) == want:
            keep.extend(rs)
    if len(keep) != len(rows) or rows_path.read_bytes()[-1:] not in (b"\n", b""):
        log.warning("reference: dropping %d rows of unfinished chunks", len(rows) - len(keep))
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep)
        atomic_write_text(rows_path, body)
    return keep


def reference_stage(env: RunEnv, split: str) -> ReferenceSet:
    """The reference artifact of ``split`` in the run directory: reused when finished under the same
    stage key, else built (or resumed) under the stage lock with K = ``reference.num_samples``
    (train) or ``evaluate.reference_samples`` (test) and seed ``derive_seed(seed, 1 | 2)``."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {list(SPLITS)}")
    if split in env.refs:
        return env.refs[split]
    cfg, d, what = env.cfg, reference_dir(env.cfg, split), f"reference/{split}"
    key = reference_key(env, split)
    if env.open_stage(d, key, what, FINAL_META) == "done":
        log.info("%s: reusing the finished artifact in %s", what, d)
        env.refs[split] = read_stage(what, d, lambda: ReferenceSet.load(d))
        return env.refs[split]
    k = cfg.reference.num_samples if split == "train" else cfg.evaluate.reference_samples
    seed = derive_seed(cfg.seed, SEED_KEYS[split])
    log.info("%s: sampling K=%d per prompt into %s", what, k, d)
    mark_stage(d, key, seed, what, "running")
    ref = build_reference(
        env.reference_model(),
        env.tokenizer(),
        env.prompts(split),
        env.reward(),
        cfg.sampling,
        k,
        d,
        seed,
    )
    summary = {k: ref.meta.get(k) for k in ("num_prompts", "num_samples", "tie_fraction")}
    summary["mean_reward"] = ref.meta.get("mean_reward")
    mark_stage(d, key, seed, what, "done", summary=summary)
    env.refs[split] = ref
    return ref
