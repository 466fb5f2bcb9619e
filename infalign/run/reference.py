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
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from infalign.lm.models import derive_seed
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
from infalign.run.reference_set import (
    FINAL_META,
    FINAL_ROWS,
    FORMAT_VERSION,
    PARTIAL_META,
    PARTIAL_ROWS,
    ReferenceSet,
    tie_fraction,
)
from infalign.run.runs import SEED_KEYS, SPLITS, RunEnv, mark_stage, read_stage, reference_dir

__all__ = ["ReferenceSet", "build_reference", "reference_stage", "tie_fraction"]  # the artifact too

log = logging.getLogger(__name__)

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
    request = _request(model, prompts, reward_fn, sampling, num_samples, seed, prompts_per_chunk)
    K, ppc = num_samples, request["prompts_per_chunk"]
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)

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
            new = _sample_chunk(
                model, tokenizer, prompts, chunks[c], c, reward_fn, sampling, K, seed
            )
            append_jsonl(d / PARTIAL_ROWS, new)
            rows.extend(new)
    except BaseException:
        if not rows:  # nothing finished: leave no partial files behind
            (d / PARTIAL_ROWS).unlink(missing_ok=True)
            (d / PARTIAL_META).unlink(missing_ok=True)
        raise

    ref = _finish(d, rows, request, seed)
    log.info("reference: wrote %d prompts x %d samples to %s", len(prompts), K, d)
    return ref


def _request(
    model: Any,
    prompts: list[str],
    reward_fn: Any,
    sampling: SamplingConfig,
    num_samples: int,
    seed: int,
    prompts_per_chunk: int | None,
) -> dict[str, Any]:
    """The checked request an artifact is made for (the fields a cached one must share)."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"reference.num_samples={num_samples!r}: calibration needs K >= 2")
    sampling.validate("sampling")
    K = num_samples
    ppc = prompts_per_chunk if prompts_per_chunk is not None else max(1, sampling.batch_size // K)
    if isinstance(ppc, bool) or not isinstance(ppc, int) or ppc < 1:
        raise ValueError(f"prompts_per_chunk={prompts_per_chunk!r}: must be an integer >= 1")
    return {
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


def _sample_chunk(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    idx: list[int],
    chunk: int,
    reward_fn: Any,
    sampling: SamplingConfig,
    K: int,
    seed: int,
) -> list[dict[str, Any]]:
    """Chunk ``chunk`` (prompts ``idx``): K samples per prompt with seed ``derive_seed(seed, chunk)``,
    scored once; one artifact row per prompt (texts, token ids, rewards, sequence log pi_ref)."""
    ps = [prompts[i] for i in idx]
    gen = sample(model, tokenizer, ps, K, sampling, seed=derive_seed(seed, chunk), progress=False)
    rewards = score(reward_fn, ps, gen.texts)
    lp = sampler_logprobs(model, gen, sampling)
    seq_lp = sequence_logprob(lp.double().cpu(), gen.completion_mask).view(len(ps), K)
    comp, n_tok = gen.completion_ids, gen.num_tokens.view(-1)
    return [
        {
            "index": i,
            "chunk": chunk,
            "prompt": prompts[i],
            "completions": gen.texts[j],
            "num_tokens": gen.num_tokens[j].tolist(),
            "rewards": rewards[j].tolist(),
            "token_ids": [comp[j * K + k, : int(n_tok[j * K + k])].tolist() for k in range(K)],
            "logprobs": seq_lp[j].tolist(),
        }
        for j, i in enumerate(idx)
    ]


def _finish(
    d: Path, rows: list[dict[str, Any]], request: dict[str, Any], seed: int
) -> ReferenceSet:
    """Write the finished artifact (rows in prompt order, then the meta) and drop the partial files."""
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
