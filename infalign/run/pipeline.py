"""The end-to-end pipeline over a validated :class:`~infalign.run.config.RunConfig`:
reference (train, test) -> for each method x beta: train, evaluate -> evaluate pi_ref -> results -> report.

Layout under ``cfg.out`` (every file written atomically; ``docs/metrics.md`` lists every key):

    config.yaml, manifest.json          the config of the latest command, what ran it
    reference/train/                    K = reference.num_samples samples per training prompt (calibration)
    reference/test/                     M' = evaluate.reference_samples per test prompt (evaluation's pi_ref side)
    train/<method>/beta=<b>/            metrics.jsonl, checkpoint/, transform.json, manifest.json
    eval/<method>/beta=<b>/             eval.json, samples.jsonl, manifest.json
    eval/reference/                     the same for pi_ref itself (fresh samples: win rate ~0.5, KL 0)
    results.json                        one row per method x beta, plus the reference row

**Reuse.** Every stage directory holds a ``manifest.json`` whose ``config`` is the *stage config*: the
part of the RunConfig that determines that artifact (a stage's config includes the configs of the stages
it reads). A stage whose manifest says ``status: done`` is reused, so a second ``run`` only does what is
missing (e.g. a new beta). A stage made with a different stage config is a ValueError naming the first
differing dotted field: results are never mixed silently; use another ``out`` or delete the directory.
An unfinished stage with the same config resumes (reference chunks, trainer checkpoint).
Paths, stage configs, manifests, :func:`preflight` and the cleanup guard live in :mod:`infalign.run.runs`
(re-exported here).

**Failures.** Inputs are checked by :func:`preflight` before any model is loaded or any file written. If
a command fails later (e.g. a NaN reward), directories it created that hold no resumable work are
removed; a KeyboardInterrupt leaves everything in place (finished stages and checkpoints are kept).

**Seeds.** Reference artifacts use ``derive_seed(seed, 1)`` (train) and ``derive_seed(seed, 2)`` (test),
evaluation sampling ``derive_seed(evaluate.seed, 3)`` (the same for every policy), training ``rl.seed``.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from infalign.run import tracking
from infalign.run.config import MethodConfig, RunConfig, to_dict
from infalign.run.io import atomic_write_json, atomic_write_text, read_json, to_jsonable
from infalign.run.runs import (
    MANIFEST,
    REFERENCE_ROW,
    SPLITS,
    _check_plan,
    _Env,
    _eval_cfg,
    _first_diff,
    _guard,
    _plain,
    _reference_cfg,
    _stage_state,
    _train_cfg,
    _write_run_files,
    _write_stage,
    beta_name,
    eval_dir,
    get_method,
    preflight,
    reference_dir,
    sweep,
    train_dir,
)

__all__ = [
    "REFERENCE_ROW",
    "SPLITS",
    "eval_dir",
    "get_method",
    "preflight",
    "reference_dir",
    "run_all",
    "run_evaluate",
    "run_reference",
    "run_references",
    "run_train",
    "sweep",
    "train_dir",
    "write_results",
]

log = logging.getLogger(__name__)

_SEED_KEYS = {"train": 1, "test": 2, "eval": 3}


# --- reference -----------------------------------------------------------------------------------


def _num_samples(cfg: RunConfig, split: str) -> int:
    return cfg.reference.num_samples if split == "train" else cfg.evaluate.reference_samples


def _reference(env: _Env, split: str) -> Any:
    from infalign.lm.models import derive_seed
    from infalign.run.reference import ReferenceSet, build_reference

    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {list(SPLITS)}")
    if split in env.refs:
        return env.refs[split]
    cfg, d, what = env.cfg, reference_dir(env.cfg, split), f"reference/{split}"
    stage_cfg = _reference_cfg(cfg, split)
    if _stage_state(d, stage_cfg, what) == "done" and (d / "reference.json").is_file():
        log.info("%s: reusing the finished artifact in %s", what, d)
        env.refs[split] = ReferenceSet.load(d)
        return env.refs[split]
    seed = derive_seed(cfg.seed, _SEED_KEYS[split])
    log.info("%s: sampling K=%d per prompt into %s", what, _num_samples(cfg, split), d)
    env.mkdir(d)
    _write_stage(d, stage_cfg, seed, what, "running")
    ref = build_reference(
        env.reference_model(),
        env.tokenizer(),
        env.prompts(split),
        env.reward(),
        cfg.sampling,
        _num_samples(cfg, split),
        d,
        seed,
    )
    summary = {k: ref.meta.get(k) for k in ("num_prompts", "num_samples", "tie_fraction")}
    summary["mean_reward"] = ref.meta.get("mean_reward")
    _write_stage(d, stage_cfg, seed, what, "done", summary=summary)
    env.refs[split] = ref
    return ref


def run_references(cfg: RunConfig, splits: Sequence[str] = SPLITS) -> dict[str, Any]:
    """Build (or reuse) the reference artifacts of the given splits; returns split -> ReferenceSet."""
    env = preflight(cfg)
    _check_plan(cfg, splits=splits)
    with _guard(env):
        _write_run_files(env, "reference")
        return {s: _reference(env, s) for s in splits}


def run_reference(cfg: RunConfig, split: str) -> Any:
    """The reference artifact of one split (``train``: K = reference.num_samples; ``test``:
    K = evaluate.reference_samples), built or reused: a :class:`~infalign.run.reference.ReferenceSet`."""
    return run_references(cfg, (split,))[split]


# --- train ---------------------------------------------------------------------------------------


def _resolve(cfg: RunConfig, method: MethodConfig) -> tuple[Any, dict[str, Any]]:
    """(Transform or None for raw, transform.json content)."""
    from infalign import theory

    spec = method.transform
    if spec.strip().lower() == "raw":
        return None, {"spec": "raw", "resolved": "raw", "transform": None}
    auto = theory.needs_theory(spec)
    proc, kl = cfg.report.procedure, theory.split_target(spec)[1] or cfg.rl.target_kl
    tf = theory.resolve_transform(spec, proc, kl=kl)
    info: dict[str, Any] = {"spec": spec, "resolved": str(tf), "t": getattr(tf, "t", None)}
    if auto:
        info.update(procedure=proc, target_kl=kl)
    try:
        info["theory_beta"] = theory.beta_for_kl(tf, kl)
    except ValueError:
        info["theory_beta"] = None
    info["transform"] = tf.to_dict()
    return tf, info


def _train(env: _Env, method: MethodConfig, beta: float) -> Path:
    from infalign.lm.models import load_model
    from infalign.rl.algorithms import trainer_class
    from infalign.rl.checkpoint import CHECKPOINT_DIR, METRICS_FILE, STATE_FILE

    cfg = env.cfg
    d, what = train_dir(cfg, method.name, beta), f"train/{method.name}/{beta_name(beta)}"
    stage_cfg = _train_cfg(cfg, method, beta)
    if _stage_state(d, stage_cfg, what) == "done" and (d / CHECKPOINT_DIR).is_dir():
        log.info("%s: reusing the finished run in %s", what, d)
        return d
    ref = _reference(env, "train")
    rl = dataclasses.replace(cfg.rl, beta=float(beta), transform=method.transform)
    tf, tinfo = _resolve(cfg, method)
    log.info(
        "%s: transform %s -> %s, %d steps", what, method.transform, tinfo["resolved"], rl.steps
    )
    env.mkdir(d)
    resume = any((d / c / STATE_FILE).is_file() for c in (CHECKPOINT_DIR, f"{CHECKPOINT_DIR}.old"))
    if not resume and (d / METRICS_FILE).exists():
        (d / METRICS_FILE).unlink()  # records of an attempt that never reached a checkpoint
    atomic_write_json(d / "transform.json", tinfo)
    _write_stage(d, stage_cfg, rl.seed, what, "running")
    prompts = env.prompts("train")
    if ref.prompts != prompts:
        raise ValueError(f"{reference_dir(cfg, 'train')} holds other prompts than prompts.train")
    calibration = ref.calibration(smoothed=cfg.reference.smoothed)
    torch.manual_seed(rl.seed)  # LoRA initialisation
    policy = load_model(cfg.model, trainable=True)
    shared_base = cfg.model.lora_r > 0 and cfg.reference_model is None
    reference = None if shared_base else env.reference_model()
    trainer = trainer_class(rl.algorithm).from_reference(
        policy,
        reference,
        env.tokenizer(),
        ref,
        env.reward,
        calibration,
        tf,
        rl,
        cfg.sampling,
        d,
        resume=resume,
    )
    with tracking.session(trainer.accelerator, cfg, method, beta, trainer.step):
        trainer.train()
    del trainer, policy
    gc.collect()
    rows = [json.loads(x) for x in (d / METRICS_FILE).read_text().splitlines() if x.strip()]
    _write_stage(d, stage_cfg, rl.seed, what, "done", summary=rows[-1] if rows else {})
    return d


def run_train(cfg: RunConfig, method: str, beta: float | None = None) -> Path:
    """Train (or reuse / resume) one method at one beta (default ``rl.beta``); returns its run dir.

    Policy: a fresh load of ``model`` (LoRA if ``model.lora_r > 0``); reference: ``reference_model``
    (or ``model``) frozen; calibration from ``reference/train``; transform: ``raw`` -> raw reward,
    ``exp:auto`` / ``negexp:auto`` / ``optimal`` resolved by ``theory.resolve_transform`` for
    ``report.procedure`` at ``rl.target_kl`` (written to ``transform.json``), else parsed.
    """
    env = preflight(cfg)
    m, b = get_method(cfg, method), float(cfg.rl.beta if beta is None else beta)
    _check_plan(cfg, splits=("train",), train=[(m, b)])
    with _guard(env):
        _write_run_files(env, "train")
        return _train(env, m, b)


# --- evaluate ------------------------------------------------------------------------------------


def _load_checkpoint(cfg: RunConfig, ckpt: Path) -> Any:
    from infalign.lm.models import load_model

    if (ckpt / "adapter_config.json").is_file():
        from peft import PeftModel

        base = load_model(dataclasses.replace(cfg.model, lora_r=0), trainable=False)
        model = PeftModel.from_pretrained(base, str(ckpt)).merge_and_unload()
        return model.requires_grad_(False).eval()
    m = dataclasses.replace(cfg.model, name=str(ckpt), tokenizer=None, gguf_file=None, lora_r=0)
    return load_model(m, trainable=False)


def _seq_logprobs(model: Any, gen: Any, cfg: RunConfig, sampled: bool = False) -> torch.Tensor:
    """(P, M) float64 sequence log-probs sum_t log pi(y_t | ...) (tempered, as in training).
    ``sampled``: ``model`` sampled ``gen``, so the sampler's own log-probs serve when it has them."""
    from infalign.lm.scoring import token_logprobs

    lp = gen.logprobs if sampled else None
    if lp is None:
        lp = token_logprobs(
            model,
            gen,
            temperature=cfg.sampling.temperature,
            micro_batch_size=cfg.sampling.batch_size,
        )
    assert isinstance(lp, torch.Tensor)
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


def _require_trained(cfg: RunConfig, method: MethodConfig, beta: float) -> Path:
    """The finished train dir of ``method`` at ``beta`` (same stage config), else a ValueError."""
    td = train_dir(cfg, method.name, beta)
    if _stage_state(td, _train_cfg(cfg, method, beta), f"train/{method.name}") != "done":
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


def _evaluate(env: _Env, method: MethodConfig | None, beta: float | None) -> dict[str, Any]:
    from infalign.core.evaluation import inference_win_rate, kl_estimate
    from infalign.core.procedures import parse_procedure
    from infalign.lm.models import derive_seed
    from infalign.lm.rewards import score
    from infalign.lm.sampling import sample
    from infalign.rl.checkpoint import CHECKPOINT_DIR

    cfg, ev = env.cfg, env.cfg.evaluate
    d = eval_dir(cfg, None if method is None else method.name, beta)
    what = str(d.relative_to(cfg.out))
    if method is None:
        policy_info: dict[str, Any] = {"kind": "reference"}
    else:
        assert beta is not None
        td = _require_trained(cfg, method, beta)
        tinfo = read_json(td / "transform.json")
        policy_info = {
            "kind": "trained",
            "method": method.name,
            "beta": beta,
            "transform": method.transform,
            "resolved_transform": tinfo.get("resolved"),
            "train_dir": str(td.relative_to(cfg.out)),
        }
    stage_cfg = _eval_cfg(cfg, method, beta)
    if _stage_state(d, stage_cfg, what) == "done" and (d / "eval.json").is_file():
        log.info("%s: reusing %s", what, d / "eval.json")
        return read_json(d / "eval.json")
    test_ref = _reference(env, "test")
    log.info("%s: evaluating on %d test prompts", what, len(test_ref.prompts))
    env.mkdir(d)
    seed = derive_seed(ev.seed, _SEED_KEYS["eval"])
    _write_stage(d, stage_cfg, seed, what, "running")
    prompts = env.prompts("test")
    if test_ref.prompts != prompts:
        raise ValueError(f"{reference_dir(cfg, 'test')} holds other prompts than prompts.test")
    ref_model = env.reference_model()
    policy = ref_model if method is None else _load_checkpoint(cfg, td / CHECKPOINT_DIR)
    gen = sample(policy, env.tokenizer(), prompts, ev.samples_per_prompt, cfg.sampling, seed)
    rewards = score(env.reward(), prompts, gen.texts)
    lp = _seq_logprobs(policy, gen, cfg, sampled=True)
    lr = lp if method is None else _seq_logprobs(ref_model, gen, cfg)
    kl = kl_estimate(lp, lr, confidence=ev.confidence)

    def win(proc: str) -> dict[str, Any]:
        w = inference_win_rate(
            rewards, test_ref.rewards, proc, ev.confidence, ev.bootstrap, ev.seed
        )
        return w.to_dict(per_prompt=ev.per_prompt)

    fit = None if method is None else _transfer(env, policy, ref_model, test_ref, tinfo, beta)
    procs = [parse_procedure(p).spec() for p in ev.procedures]
    n_tok = gen.num_tokens.double()
    result = {
        "policy": policy_info,
        "num_prompts": len(prompts),
        "samples_per_prompt": ev.samples_per_prompt,
        "reference_samples": test_ref.num_samples,
        "win_rate": {p: win(p) for p in procs},
        "standard_win_rate": win("sample"),
        "kl": kl.to_dict(),
        "theory_bound": {p: {"win_rate": _theory_bound(p, kl.mean), "kl": kl.mean} for p in procs},
        "transfer": fit,
        "reward": {
            "mean": float(rewards.mean()),
            "stderr": float(rewards.double().mean(1).std() / math.sqrt(len(prompts)))
            if len(prompts) > 1
            else None,
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
    body = "".join(
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
    if policy is not ref_model:
        del policy
        gc.collect()
    atomic_write_text(d / "samples.jsonl", body)
    result = _nan_to_none(to_jsonable(result))  # e.g. stderr over a single prompt
    atomic_write_json(d / "eval.json", result)
    _write_stage(d, stage_cfg, seed, what, "done")
    tracking.log_eval(cfg, method, beta, result)
    return result


def _transfer(
    env: _Env, policy: Any, ref_model: Any, test_ref: Any, tinfo: dict[str, Any], beta: float
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


def run_evaluate(cfg: RunConfig, method: str | None, beta: float | None = None) -> dict[str, Any]:
    """Evaluate a trained method at beta (default ``rl.beta``), or pi_ref itself (``method=None``),
    against ``reference/test``; writes ``eval.json`` (returned) and refreshes ``results.json``."""
    env = preflight(cfg)
    m = None if method is None else get_method(cfg, method)
    b = None if m is None else float(cfg.rl.beta if beta is None else beta)
    _check_plan(cfg, splits=("test",), evals=[(m, b)])
    if m is not None and b is not None:
        _require_trained(cfg, m, b)
    with _guard(env):
        _write_run_files(env, "evaluate")
        out = _evaluate(env, m, b)
        write_results(cfg)
        return out


# --- results, report, run ------------------------------------------------------------------------


def _row(cfg: RunConfig, method: MethodConfig | None, beta: float | None) -> dict[str, Any] | None:
    """The results row of one finished eval dir, or None if it is missing, unfinished or was made
    with another config than ``cfg`` (then a warning names the differing field)."""
    d = eval_dir(cfg, None if method is None else method.name, beta)
    if not (d / "eval.json").is_file() or not (d / MANIFEST).is_file():
        return None
    manifest = read_json(d / MANIFEST)
    if manifest.get("status") != "done":
        return None
    diff = _first_diff(manifest.get("config"), _plain(_eval_cfg(cfg, method, beta)))
    if diff is not None:
        log.warning("results: leaving out %s, made with %s=%r (now %r)", d, *diff)
        return None
    e = read_json(d / "eval.json")
    pick = ("mean", "low", "high", "stderr")
    return {
        "method": REFERENCE_ROW if method is None else method.name,
        "transform": None if method is None else method.transform,
        "resolved_transform": e["policy"].get("resolved_transform"),
        "beta": beta,
        "kl": {k: e["kl"][k] for k in pick},
        "win_rate": {p: {k: w[k] for k in pick} for p, w in e["win_rate"].items()},
        "standard_win_rate": {k: e["standard_win_rate"][k] for k in pick},
        "theory_bound": {p: b["win_rate"] for p, b in e["theory_bound"].items()},
        "transfer": e.get("transfer"),
        "reward_mean": e["reward"]["mean"],
        "length_mean": e["length"]["mean"],
        "eval": str((d / "eval.json").relative_to(cfg.out)),
        "train": e["policy"].get("train_dir"),
    }


def _betas_on_disk(cfg: RunConfig, method: MethodConfig) -> list[float]:
    """The sweep's betas of ``method`` and any other beta evaluated under ``eval/<method>/``."""
    betas = {float(b) for b in method.betas}
    root = Path(cfg.out) / "eval" / method.name
    for d in root.glob("beta=*") if root.is_dir() else []:
        try:
            betas.add(float(d.name.removeprefix("beta=")))
        except ValueError:
            continue
    return sorted(betas)


def write_results(cfg: RunConfig) -> dict[str, Any]:
    """Collect into ``results.json`` one row per finished evaluation made with this config: every
    method x beta of the sweep, other betas of its methods evaluated one by one, and pi_ref.
    ``complete`` says whether every row of the sweep (and pi_ref) is there; ``missing`` lists
    those that are not."""
    from infalign.core.procedures import parse_procedure

    rows, missing = [], []
    for m in sweep(cfg):
        swept = {float(b) for b in m.betas}
        for b in _betas_on_disk(cfg, m):
            r = _row(cfg, m, b)
            if r is not None:
                rows.append(r)
            elif b in swept:
                missing.append(f"{m.name}/{beta_name(b)}")
    ref = _row(cfg, None, None)
    if ref is None:
        missing.append(REFERENCE_ROW)
    else:
        rows.append(ref)
    results = {
        "procedures": [parse_procedure(p).spec() for p in cfg.evaluate.procedures],
        "headline_procedure": parse_procedure(cfg.report.procedure).spec(),
        "confidence": cfg.evaluate.confidence,
        "complete": not missing,
        "missing": missing,
        "rows": rows,
    }
    atomic_write_json(Path(cfg.out) / "results.json", results)
    return results


def _report(run_dir: Path) -> Path | None:
    try:
        from infalign.run import report
    except Exception as err:
        log.warning("report: cannot import infalign.run.report (%s); skipped", err)
        return None
    fn = getattr(report, "write_report", None)
    if fn is None:
        log.warning("report: infalign.run.report has no write_report(); skipped")
        return None
    try:
        path = Path(fn(run_dir))
    except Exception as err:
        log.error(
            "report: write_report failed (%s: %s); results.json is complete, retry with "
            "`infalign report %s`",
            type(err).__name__,
            err,
            run_dir,
        )
        return None
    log.info("report: %s", path)
    return path


def run_all(cfg: RunConfig, report: bool = True) -> dict[str, Any]:
    """The whole experiment; finished stages are reused. Returns the content of ``results.json``
    plus ``report`` (the report's path, or None when skipped or failed)."""
    env = preflight(cfg)
    jobs = [(m, float(b)) for m in sweep(cfg) for b in m.betas]
    _check_plan(cfg, splits=SPLITS, train=jobs, evals=[*jobs, (None, None)])
    with _guard(env):
        _write_run_files(env, "run")
        for split in SPLITS:
            _reference(env, split)
        for m, b in tqdm(jobs, desc="sweep", unit="run"):
            _train(env, m, b)
            _evaluate(env, m, b)
        _evaluate(env, None, None)
        results = write_results(cfg)
    path = _report(Path(cfg.out)) if report else None
    results["report"] = None if path is None else str(path)
    return results
