"""Trainer throughput: infalign's CTRLTrainer vs TRL's RLOOTrainer configured for the same objective.

Both train the default model of ``recipes/demo.yaml`` (the shipped 4.2M-parameter GPT-2, loaded twice:
trainable policy and frozen reference) on the same prompts (the first ``--prompts`` training prompts),
with the demo's batch: ``rl.prompts_per_step`` = 8 prompts x M = ``rl.samples_per_prompt`` = 4
completions per step, at most ``sampling.max_new_tokens`` = 24 new tokens, temperature 1, top-p 1, no
top-k, stopping at the model's EOS. The reward is the demo's ``helpful_reward`` calibrated against K
reference samples per prompt (built here first, with ``infalign.run.reference.build_reference``) under the
identity transform: ``CTRLTrainer(calibration, "identity")`` for infalign, ``CalibratedReward(...,
"identity")`` for TRL. The objective is the same (``infalign.integrations.trl.exact_ctrl_config``):
the sequence-level KL inside the reward at a fixed ``--beta``, leave-one-out baseline, no std scaling,
one on-policy gradient pass per batch. The optimizer is the same: ``torch.optim.AdamW`` (``optim=
"adamw_torch"``), lr ``rl.lr``, betas (0.9, 0.999), eps 1e-8, weight decay 0, constant lr with no
warm-up, gradient norm clipped to 1.0, float32, no gradient checkpointing.

Each trainer runs in its own subprocess with one torch thread, ``--warmup`` untimed steps then
``--steps`` timed ones (``--repeats`` runs each, alternating infalign / TRL, pooled). Measured per
trainer: seconds per step (wall time of one optimizer step, generation + reward + forwards + backward +
AdamW; infalign: around ``CTRLTrainer._train_step``, TRL: ``on_step_begin`` -> ``on_step_end``), its
split into generation (tokenize + ``generate`` + decode), the reward call (the same MiniLM + VADER
reward and calibration in both) and the rest (log-prob forwards, backward, optimizer, bookkeeping),
completion tokens per step (EOS included, from the completion masks), tokens/s = completion tokens /
step seconds, and peak memory (``ru_maxrss`` of the subprocess, which includes the reward's MiniLM
encoder). The ratio printed is TRL's median s/step over infalign's; the samples differ (different
random streams), so tokens/s is the fairer number when completion lengths differ.

infalign samples with ``--backend`` (``sampling.backend``; default ``native``, the decoding loop of
``infalign.lm.sampling_native``; ``hf`` is transformers' ``generate``, as TRL uses). TRL's generation
config is its own (``disable_compile=True``, no top-k / top-p / repetition penalty here).

Objective check (on TRL's untimed warm-up batch, where policy == reference): infalign's
``token_logprobs`` of TRL's sequences against TRL's own log-probs, and infalign's
``kl_penalized_reward`` + ``rloo_advantages`` of TRL's rewards against TRL's advantages.

What still differs between the two runs (documented, not removable from outside TRL):
  * prompt order: infalign draws prompts from its own seeded permutation, TRL from its RepeatSampler;
    both cycle through the same prompt set;
  * TRL runs an extra no-grad policy forward per step (``old_per_token_logps``) before the gradient
    forward; infalign reuses the detached log-probs of the gradient forward (identical at one epoch);
  * TRL's scoring forwards pass no ``position_ids``, so for a left-padded prompt GPT-2 (transformers
    5.x) counts positions from the first padding token, while ``generate`` (and infalign's scoring)
    count from the first real token: TRL's log-probs (in its KL and its gradient) are not those of the
    sampling policy for every prompt shorter than the longest in its batch (several nats per sequence
    here; the check prints the size). Its compute is unaffected; with equal-length prompts it vanishes.

Run: ``OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/trainer.py [--steps 8] [--backend hf]
[--json out.json]``. Timings are not asserted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parents[1]
TRANSFORM = "identity"


# --- shared setup (parent and workers) -----------------------------------------------------------


def single_thread() -> None:
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renamed arguments
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (inter-op pool started)
        pass


def run_config(args: argparse.Namespace) -> Any:
    from infalign.run.recipe import load_config

    cfg = load_config(args.config)
    rl = dataclasses.replace(
        cfg.rl,
        beta=args.beta,
        transform=TRANSFORM,
        steps=args.warmup + args.steps,
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        ppo_epochs=1,
        grad_accum=1,
        bf16=False,
        save_every=10**9,  # only the final checkpoint, after the timed steps
    )
    sampling = dataclasses.replace(cfg.sampling, backend=args.backend)
    return dataclasses.replace(cfg, rl=rl, sampling=sampling)


def build_reference(args: argparse.Namespace, cfg: Any, out: Path) -> Any:
    """K = ``--k`` reference samples for each of the first ``--prompts`` training prompts."""
    from infalign.lm.models import derive_seed, load_model, load_tokenizer
    from infalign.lm.prompts import load_prompts
    from infalign.lm.rewards import load_reward
    from infalign.run.reference import build_reference as build

    prompts = load_prompts(cfg.prompts.train)[: args.prompts]
    return build(
        load_model(cfg.model),
        load_tokenizer(cfg.model),
        prompts,
        load_reward(cfg.reward),
        cfg.sampling,
        args.k,
        out,
        derive_seed(cfg.seed, 1),
        progress=False,
    )


def peak_rss_mib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / (1024 * 1024) if sys.platform == "darwin" else kib / 1024


# --- workers -------------------------------------------------------------------------------------


def run_infalign(args: argparse.Namespace, cfg: Any, ref: Any, out: Path) -> dict[str, Any]:
    from infalign.lm.models import load_model, load_tokenizer
    from infalign.lm.rewards import load_reward
    from infalign.rl.algorithms.rloo import RLOOTrainer

    policy = load_model(cfg.model, trainable=True)
    reference = load_model(cfg.model)
    trainer = RLOOTrainer(
        policy,
        reference,
        load_tokenizer(cfg.model),
        ref.prompts,
        load_reward(cfg.reward),
        ref.calibration(smoothed=cfg.reference.smoothed),
        TRANSFORM,
        cfg.rl,
        cfg.sampling,
        out,
        progress=False,
    )
    spans: list[tuple[float, float]] = []
    step = trainer._train_step

    def timed_step() -> dict[str, float]:
        t0 = time.perf_counter()
        metrics = step()
        spans.append((t0, time.perf_counter()))
        return metrics

    trainer._train_step = timed_step  # type: ignore[method-assign]
    history = trainer.train()
    n_seq = cfg.rl.prompts_per_step * cfg.rl.samples_per_prompt
    return {
        "step_s": [b - a for a, b in spans],
        "tokens": [round(h["rl/completion_length"] * n_seq) for h in history],
        "generate_s": [h["rl/time/generate"] for h in history],
        "reward_s": [h["rl/time/reward"] for h in history],
        "reward_raw": [h["rl/reward_raw"] for h in history],
        "reward_calibrated": [h["rl/reward_calibrated"] for h in history],
        "kl_token": [h["rl/kl_seq"] / h["rl/completion_length"] for h in history],
        "loss": [h["rl/loss"] for h in history],
        "optimizer": type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__name__,
    }


def run_trl(args: argparse.Namespace, cfg: Any, ref: Any, out: Path) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import RLOOTrainer

    from infalign.integrations.trl import (
        CalibratedReward,
        add_reference_rewards,
        check_exact_ctrl,
        exact_ctrl_config,
    )
    from infalign.lm.models import Generation, load_model, load_tokenizer
    from infalign.lm.rewards import load_reward
    from infalign.lm.scoring import token_logprobs
    from infalign.rl.advantages import kl_penalized_reward, rloo_advantages, sequence_logprob

    rl, M = cfg.rl, cfg.rl.samples_per_prompt
    spans: list[list[float]] = []
    tokens: list[int] = []
    generate_s: list[float] = []
    reward_s: list[float] = []
    returned: list[list[float]] = []
    check: dict[str, float] = {}

    class TimedReward(CalibratedReward):
        def __call__(self, prompts: Any, completions: Any, **kwargs: Any) -> list[float]:
            t0 = time.perf_counter()
            out = super().__call__(prompts, completions, **kwargs)
            reward_s.append(time.perf_counter() - t0)
            returned.append(out)
            return out

    class Trainer(RLOOTrainer):
        def _generate(self, prompts: Any) -> Any:  # tokenize, generate, decode
            t0 = time.perf_counter()
            out = super()._generate(prompts)
            generate_s.append(time.perf_counter() - t0)
            return out

        def _generate_and_score_completions(self, inputs: Any) -> Any:
            out = super()._generate_and_score_completions(inputs)
            tokens.append(int(out["completion_mask"].sum()))
            if not check:  # warm-up step (untimed), policy == reference
                check.update(objective_check(self, out, returned[-1]))
            return out

    def objective_check(trainer: Any, out: Any, rewards: list[float]) -> dict[str, float]:
        """infalign's log-probs and advantages on TRL's batch, against TRL's."""
        cmask = out["completion_mask"].float()
        gen = Generation(
            input_ids=torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1),
            attention_mask=torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1),
            prompt_length=out["prompt_ids"].shape[1],
            completion_mask=cmask,
            texts=[[""] * M for _ in range(cmask.shape[0] // M)],
        )
        seq = sequence_logprob(token_logprobs(trainer.model, gen), cmask).double()
        seq_ref = sequence_logprob(token_logprobs(trainer.ref_model, gen), cmask).double()
        r = torch.tensor(rewards, dtype=torch.float64).view(-1, M)
        pen = kl_penalized_reward(r, seq.view(-1, M), seq_ref.view(-1, M), rl.beta)
        adv = rloo_advantages(pen, normalize_std=rl.normalize_std).flatten()
        return {
            "logp_max_abs_diff": float((seq - out["old_logps"].double()).abs().max()),
            "logp_mean_abs_diff": float((seq - out["old_logps"].double()).abs().mean()),
            "adv_max_abs_diff": float((adv - out["advantages"].double()).abs().max()),
            "adv_max_abs": float(adv.abs().max()),
        }

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            spans.append([time.perf_counter()])

        def on_step_end(self, *a: Any, **k: Any) -> None:
            spans[-1].append(time.perf_counter())

    dataset = add_reference_rewards(
        Dataset.from_dict({"prompt": ref.prompts}), ref.rewards.double(), prompts=ref.prompts
    )
    config = exact_ctrl_config(
        str(out),
        beta=rl.beta,
        num_generations=M,
        per_device_train_batch_size=rl.prompts_per_step * M,
        gradient_accumulation_steps=1,
        max_completion_length=cfg.sampling.max_new_tokens,
        max_steps=rl.steps,
        learning_rate=rl.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch",
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        weight_decay=rl.weight_decay,
        max_grad_norm=rl.max_grad_norm,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=rl.seed,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
    )
    problems = check_exact_ctrl(config)
    trainer = Trainer(
        model=load_model(cfg.model, trainable=True),  # TRL loads the reference from the same path
        reward_funcs=cast(Any, TimedReward(load_reward(cfg.reward), TRANSFORM)),
        args=config,
        train_dataset=dataset,
        processing_class=load_tokenizer(cfg.model),
        callbacks=[StepTimer()],
    )
    trainer.remove_callback(PrinterCallback)  # the per-step log dicts on stdout
    trainer.train()
    logs = [h for h in trainer.state.log_history if "kl" in h]
    name = f"ctrl_{TRANSFORM}"
    return {
        "step_s": [s[1] - s[0] for s in spans],
        "tokens": tokens,
        "generate_s": generate_s,
        "reward_s": reward_s,
        "reward_raw": [h[f"{name}/raw_mean"] for h in logs],
        "reward_calibrated": [h[f"rewards/{name}/mean"] for h in logs],
        "kl_token": [h["kl"] for h in logs],
        "loss": [h["loss"] for h in logs],
        "optimizer": type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__name__,
        "check": check,
        "exact_ctrl_problems": problems,
    }


def worker(args: argparse.Namespace) -> None:
    from infalign.run.reference import ReferenceSet

    single_thread()
    cfg = run_config(args)
    work = Path(args.workdir)
    ref = ReferenceSet.load(work / "reference")
    run = run_infalign if args.worker == "infalign" else run_trl
    res = run(args, cfg, ref, work / args.worker)
    res["peak_rss_mib"] = peak_rss_mib()
    (work / f"{args.worker}.json").write_text(json.dumps(res))


# --- parent --------------------------------------------------------------------------------------


def summarize(runs: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """Pool the timed steps (each run's first ``warmup`` dropped) of one trainer's runs."""

    def timed(key: str) -> list[float]:
        return [v for r in runs for v in r[key][warmup:]]

    step_s, tokens = timed("step_s"), timed("tokens")
    generate_s, reward_s = (
        statistics.fmean(timed("generate_s")),
        statistics.fmean(timed("reward_s")),
    )
    return {
        "s_per_step_median": statistics.median(step_s),
        "s_per_step_mean": statistics.fmean(step_s),
        "tokens_per_step": statistics.fmean(tokens),
        "tokens_per_s": sum(tokens) / sum(step_s),
        "generate_s_per_step": generate_s,
        "reward_s_per_step": reward_s,
        "rest_s_per_step": statistics.fmean(step_s) - generate_s - reward_s,
        "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
        "timed_steps": len(step_s),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="timed steps per trainer")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--prompts", type=int, default=16, help="first N training prompts")
    ap.add_argument("--k", type=int, default=16, help="reference samples per prompt (calibration)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per trainer, alternating")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--config", default="recipes/demo.yaml")
    ap.add_argument(
        "--backend",
        choices=["hf", "native"],
        default="native",
        help="infalign's sampling.backend (TRL always samples with transformers' generate)",
    )
    ap.add_argument("--json", help="also write the numbers to this file")
    ap.add_argument("--worker", choices=["infalign", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.warmup < 1:
        ap.error("--warmup must be >= 1 (TRL's objective check runs on the first step)")
    os.chdir(ROOT)  # the recipe's paths are relative to the repository root
    if args.worker:
        worker(args)
        return

    import torch
    import transformers
    import trl

    from infalign.run.io import git_commit

    single_thread()
    cfg = run_config(args)
    rl, sp = cfg.rl, cfg.sampling
    print(
        f"# benchmarks/trainer.py  commit={git_commit()}  "
        f"torch={torch.__version__}  transformers={transformers.__version__}  trl={trl.__version__}  "
        f"python={platform.python_version()}  threads=1 per trainer"
    )
    print(
        f"# model {cfg.model.name} ({cfg.model.dtype}, cpu); reward {cfg.reward.name}; "
        f"{args.prompts} train prompts, reference K={args.k}; {rl.prompts_per_step} prompts x "
        f"M={rl.samples_per_prompt} per step, max_new_tokens={sp.max_new_tokens}, "
        f"T={sp.temperature}, top_p={sp.top_p}, infalign sampling.backend={sp.backend}; "
        f"AdamW lr={rl.lr:g}, beta={rl.beta:g}, "
        f"transform {TRANSFORM}; {args.warmup} warm-up + {args.steps} timed steps"
    )
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="infalign-bench-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        build_reference(args, cfg, work / "reference")
        print(f"# reference built in {time.perf_counter() - t0:.1f}s")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        runs: dict[str, list[dict[str, Any]]] = {"infalign": [], "trl": []}
        for _ in range(args.repeats):  # alternate, so a change in machine load hits both
            for name in runs:
                cmd = [sys.executable, __file__, "--worker", name, "--workdir", tmp]
                cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
                cmd += ["--prompts", str(args.prompts), "--k", str(args.k)]
                cmd += ["--beta", str(args.beta), "--config", args.config]
                cmd += ["--backend", args.backend]
                subprocess.run(cmd, check=True, env=env)
                runs[name].append(json.loads((work / f"{name}.json").read_text()))

    summary = {n: summarize(r, args.warmup) for n, r in runs.items()}
    results = {n: r[0] for n, r in runs.items()}  # traces and checks: the first run
    ours, theirs = summary["infalign"], summary["trl"]
    print(
        f"# {args.repeats} run(s) x {args.steps} timed steps per trainer; stage columns are means "
        "(s/step): generate, reward, rest = forwards + backward + optimizer + bookkeeping"
    )
    print(
        f"{'trainer':<10} {'s/step med':>10} {'s/step mean':>11} {'tokens/step':>11} "
        f"{'tokens/s':>9} {'generate':>9} {'reward':>7} {'rest':>7} {'peak RSS MiB':>12}"
    )
    for name, s in summary.items():
        print(
            f"{name:<10} {s['s_per_step_median']:>10.3f} {s['s_per_step_mean']:>11.3f} "
            f"{s['tokens_per_step']:>11.1f} {s['tokens_per_s']:>9.1f} "
            f"{s['generate_s_per_step']:>9.3f} {s['reward_s_per_step']:>7.3f} "
            f"{s['rest_s_per_step']:>7.3f} {s['peak_rss_mib']:>12.0f}"
        )
    ratio = theirs["s_per_step_median"] / ours["s_per_step_median"]
    tok_ratio = ours["tokens_per_s"] / theirs["tokens_per_s"]
    no_reward = (theirs["s_per_step_mean"] - theirs["reward_s_per_step"]) / (
        ours["s_per_step_mean"] - ours["reward_s_per_step"]
    )
    print(f"infalign / TRL throughput ratio: {ratio:.2f}x  (TRL s/step median / infalign's)")
    print(f"# tokens/s ratio: {tok_ratio:.2f}x; excluding the shared reward call: {no_reward:.2f}x")

    for name, r in results.items():
        print(
            f"# {name:<8} per step (warm-up first): reward_raw "
            + " ".join(f"{v:.3f}" for v in r["reward_raw"])
            + " | calibrated "
            + " ".join(f"{v:.3f}" for v in r["reward_calibrated"])
            + " | kl/token "
            + " ".join(f"{v:.4f}" for v in r["kl_token"])
        )
    c = results["trl"]["check"]
    print(
        "# objective check on TRL's warm-up batch (policy == reference): advantages "
        f"max |infalign - TRL| = {c['adv_max_abs_diff']:.2e} (max |A| {c['adv_max_abs']:.3f}); "
        f"sequence log-probs max |diff| = {c['logp_max_abs_diff']:.3f} nats, "
        f"mean {c['logp_mean_abs_diff']:.3f} (TRL scores without position_ids)"
    )
    problems = results["trl"]["exact_ctrl_problems"]
    print(
        f"# check_exact_ctrl(TRL config): {problems or 'exact'}; optimizers: infalign "
        f"{results['infalign']['optimizer']}, TRL {results['trl']['optimizer']}"
    )
    print(f"# wall time {time.perf_counter() - t_start:.0f}s")

    if args.json:
        payload = {
            "commit": git_commit(),
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "trl": trl.__version__,
            },
            "settings": {
                k: getattr(args, k)
                for k in ("steps", "warmup", "repeats", "prompts", "k", "beta", "config")
            },
            "summary": summary,
            "ratio_s_per_step": ratio,
            "ratio_tokens_per_s": tok_ratio,
            "ratio_excluding_reward": no_reward,
            "runs": runs,
        }
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
