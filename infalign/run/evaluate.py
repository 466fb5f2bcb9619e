"""The evaluate stage: a trained policy (or pi_ref itself) against ``reference/test`` in
``eval/<method>/beta=<b>/`` (or ``eval/reference/``): ``eval.json``, ``samples.jsonl``,
``manifest.json``. Reused when finished under the same stage key, else built under the stage lock.

Sampling uses ``derive_seed(evaluate.seed, 3)`` for every policy, so all rows see the same draws.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from infalign.run import tracking
from infalign.run.config import MethodConfig, RunConfig, to_dict
from infalign.run.io import atomic_write_json, atomic_write_text, read_json, to_jsonable
from infalign.run.keys import eval_key, train_key
from infalign.run.reference import ReferenceSet, reference_stage
from infalign.run.runs import (
    SEED_KEYS,
    RunEnv,
    eval_dir,
    mark_stage,
    read_stage,
    reference_dir,
    stage_state,
    train_dir,
)

__all__ = ["evaluate_stage", "load_policy", "require_trained"]

log = logging.getLogger(__name__)


def _load_checkpoint(cfg: RunConfig, ckpt: Path) -> Any:
    """The trained policy of a finished train stage (a LoRA adapter is merged into the base)."""
    from infalign.lm.models import load_model

    if (ckpt / "adapter_config.json").is_file():
        from peft import PeftModel

        base = load_model(dataclasses.replace(cfg.model, lora_r=0), trainable=False)
        model = PeftModel.from_pretrained(base, str(ckpt)).merge_and_unload()
        return model.requires_grad_(False).eval()
    m = dataclasses.replace(cfg.model, name=str(ckpt), tokenizer=None, gguf_file=None, lora_r=0)
    return load_model(m, trainable=False)


def load_policy(cfg: RunConfig, ckpt: Path) -> Any:
    """The trained policy in ``ckpt`` (:func:`_load_checkpoint`); a corrupt or truncated checkpoint
    is a one-line ValueError naming it and the remedy."""
    try:
        return _load_checkpoint(cfg, ckpt)
    except (OSError, ValueError, RuntimeError, EOFError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(
            f"the checkpoint {str(ckpt)!r} of a finished training run cannot be loaded "
            f"({type(err).__name__}: {first[:200]}); delete {str(ckpt.parent)!r} to train it again"
        ) from None


def _seq_logprobs(model: Any, gen: Any, cfg: RunConfig, sampled: bool = False) -> torch.Tensor:
    """(P, M) float64 sequence log-probs sum_t log pi(y_t | ...) (tempered, as in training).
    ``sampled``: ``model`` sampled ``gen``, so the sampler's own log-probs serve when it has them."""
    from infalign.lm.sampling import sampler_logprobs

    if not sampled and gen.logprobs is not None:  # another model's log-probs: score anew
        gen = dataclasses.replace(gen, logprobs=None)
    lp = sampler_logprobs(model, gen, cfg.sampling)
    seq = (lp * gen.completion_mask.to(lp.device)).sum(-1)
    return seq.double().cpu().view(gen.num_prompts, -1)


def _theory_bound(proc: str, kl: float) -> float | None:
    from infalign import theory

    if not (0 < kl <= theory.MAX_KL):
        return None
    try:
        return float(theory.optimal_policy(proc, kl=kl).win_rate(proc))
    except (ValueError, RuntimeError) as err:
        log.warning("theory bound for %s at KL %.4g failed: %s", proc, kl, err)
        return None


def require_trained(env: RunEnv, method: MethodConfig, beta: float) -> Path:
    """The finished train dir of ``method`` at ``beta`` (same stage key), else a ValueError."""
    td = train_dir(env.cfg, method.name, beta)
    if stage_state(td, train_key(env, method, beta), f"train/{method.name}") != "done":
        raise ValueError(
            f"evaluate: no finished training run in {str(td)!r}; run `infalign train RECIPE "
            f"--method {method.name} --beta {beta!r}` (or `infalign run RECIPE`) first"
        )
    return td


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return x


def _policy_info(
    env: RunEnv, method: MethodConfig | None, beta: float | None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(``eval.json``'s ``policy``, the train stage's ``transform.json`` or None for pi_ref)."""
    if method is None:
        return {"kind": "reference"}, None
    assert beta is not None
    td = require_trained(env, method, beta)
    tinfo = read_stage(f"train/{method.name}", td, lambda: read_json(td / "transform.json"))
    info = {
        "kind": "trained",
        "method": method.name,
        "beta": beta,
        "transform": method.transform,
        "resolved_transform": tinfo.get("resolved"),
        "train_dir": str(td.relative_to(env.cfg.out)),
    }
    return info, tinfo


def evaluate_stage(env: RunEnv, method: MethodConfig | None, beta: float | None) -> dict[str, Any]:
    """Evaluate ``method`` at ``beta`` (or pi_ref, ``method=None``): win rates of every procedure
    with intervals, KL, the calibrated-space bound at that KL, the tilt realised; returns eval.json."""
    from infalign.lm.models import derive_seed
    from infalign.lm.rewards import score
    from infalign.lm.sampling import sample
    from infalign.rl.checkpoint import CHECKPOINT_DIR

    cfg = env.cfg
    d = eval_dir(cfg, None if method is None else method.name, beta)
    what = str(d.relative_to(cfg.out))
    info, tinfo = _policy_info(env, method, beta)
    key = eval_key(env, method, beta)
    if env.open_stage(d, key, what, "eval.json") == "done":
        log.info("%s: reusing %s", what, d / "eval.json")
        return read_stage(what, d, lambda: read_json(d / "eval.json"))
    test_ref = reference_stage(env, "test")
    prompts = env.prompts("test")
    if test_ref.prompts != prompts:
        raise ValueError(f"{reference_dir(cfg, 'test')} holds other prompts than prompts.test")
    log.info("%s: evaluating on %d test prompts", what, len(prompts))
    seed = derive_seed(cfg.evaluate.seed, SEED_KEYS["eval"])
    mark_stage(d, key, seed, what, "running")
    ref_model = env.reference_model()
    policy = ref_model
    if method is not None:
        policy = load_policy(cfg, train_dir(cfg, method.name, beta or 0.0) / CHECKPOINT_DIR)
    n = cfg.evaluate.samples_per_prompt
    gen = sample(policy, env.tokenizer(), prompts, n, cfg.sampling, seed)
    rewards = score(env.reward(), prompts, gen.texts)
    lp = _seq_logprobs(policy, gen, cfg, sampled=True)
    lr = lp if method is None else _seq_logprobs(ref_model, gen, cfg)
    fit = None
    if tinfo is not None and beta is not None:
        fit = _transfer(env, policy, test_ref, tinfo, beta)
    result = _result(cfg, info, test_ref, gen, rewards, lp, lr, fit, seed)
    samples = _samples(prompts, gen, rewards, lp, lr)
    if policy is not ref_model:
        del policy
        gc.collect()
    atomic_write_text(d / "samples.jsonl", samples)
    atomic_write_json(d / "eval.json", result)
    mark_stage(d, key, seed, what, "done")
    tracking.log_eval(cfg, method, beta, result)
    return result


def _result(
    cfg: RunConfig,
    info: dict[str, Any],
    test_ref: ReferenceSet,
    gen: Any,
    rewards: torch.Tensor,
    lp: torch.Tensor,
    lr: torch.Tensor,
    fit: dict[str, Any] | None,
    seed: int,
) -> dict[str, Any]:
    """The content of ``eval.json`` (``docs/metrics.md``): rewards (P, M), lp / lr (P, M) sequence
    log-probs under the policy and pi_ref."""
    from infalign.core.evaluation import inference_win_rate, kl_estimate
    from infalign.core.procedures import parse_procedure

    ev, P = cfg.evaluate, gen.num_prompts
    kl = kl_estimate(lp, lr, confidence=ev.confidence)

    def win(proc: str) -> dict[str, Any]:
        w = inference_win_rate(
            rewards, test_ref.rewards, proc, ev.confidence, ev.bootstrap, ev.seed
        )
        return w.to_dict(per_prompt=ev.per_prompt)

    procs = [parse_procedure(p).spec() for p in ev.procedures]
    n_tok = gen.num_tokens.double()
    result = {
        "policy": info,
        "num_prompts": P,
        "samples_per_prompt": ev.samples_per_prompt,
        "reference_samples": test_ref.num_samples,
        "win_rate": {p: win(p) for p in procs},
        "standard_win_rate": win("sample"),
        "kl": kl.to_dict(),
        "theory_bound": {p: {"win_rate": _theory_bound(p, kl.mean), "kl": kl.mean} for p in procs},
        "transfer": fit,
        "reward": {
            "mean": float(rewards.mean()),
            "stderr": float(rewards.double().mean(1).std() / math.sqrt(P)) if P > 1 else None,
            "reference_mean": float(test_ref.rewards.mean()),
        },
        "length": {
            "mean": float(n_tok.mean()),
            "finished_fraction": float(gen.finished.double().mean())
            if gen.finished is not None
            else None,
        },
        "settings": {"sampling": to_dict(cfg.sampling), "evaluate": to_dict(ev)},
        "seed": seed,
    }
    return _nan_to_none(to_jsonable(result))  # e.g. stderr over a single prompt


def _samples(
    prompts: list[str], gen: Any, rewards: torch.Tensor, lp: torch.Tensor, lr: torch.Tensor
) -> str:
    """``samples.jsonl``: one row per prompt with its completions, rewards and log-probs."""
    return "".join(
        json.dumps(
            {
                "prompt": prompts[p],
                "completions": gen.texts[p],
                "rewards": rewards[p].tolist(),
                "logprob": lp[p].tolist(),
                "ref_logprob": lr[p].tolist(),
                "num_tokens": gen.num_tokens[p].tolist(),
            },
            ensure_ascii=False,
        )
        + "\n"
        for p in range(len(prompts))
    )


def _transfer(
    env: RunEnv, policy: Any, test_ref: ReferenceSet, tinfo: dict[str, Any], beta: float
) -> dict[str, Any]:
    """How much of the optimum's tilt the policy realises on samples it never saw: on the held-out
    reference pool (P_test x K' samples of pi_ref with stored tokens and log pi_ref), the policy's
    sequence log-ratio against the target ``(R - beta log Z_p) / beta`` (spec 6b; R = Phi(C_hat) with
    C_hat the pool's own mid-ranks, or the raw reward): slope, correlation, RMSE
    (:func:`infalign.rl.algorithms.regression.fit_diagnostics`)."""
    from infalign.core.transforms import transform_from_dict
    from infalign.rl.advantages import ctrl_reward
    from infalign.rl.algorithms.regression import fit_diagnostics, regression_target

    cfg = env.cfg
    spec = tinfo.get("transform")
    tf = None if spec is None else transform_from_dict(spec)
    cal = None if tf is None else test_ref.calibration(smoothed=cfg.reference.smoothed)
    R = ctrl_reward(test_ref.rewards.double(), cal, tf).double()
    target = regression_target(R, beta) / beta
    P, K = R.shape
    gen = test_ref.generation(env.tokenizer(), list(range(P)), torch.arange(K).expand(P, K))
    logratio = _seq_logprobs(policy, gen, cfg) - test_ref.logprobs
    out: dict[str, Any] = fit_diagnostics(logratio, target)
    out.update(
        num_samples=P * K, target_std=float(target.std()), logratio_std=float(logratio.std())
    )
    return out
