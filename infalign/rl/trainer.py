"""The CTRL training loop (spec section 6): sample, score, calibrate + transform, RLOO with the KL in the
reward, one policy forward (grad) and one reference forward (no grad) per micro-batch, AdamW.

Per step (``rl.prompts_per_step`` prompts from a seeded permutation, M = ``rl.samples_per_prompt``):

1. ``generate`` M samples per prompt with the policy (KV cache; seed derived from (seed, step, rank));
2. one reward call, ``R = Phi(C_hat(r))`` (or the raw reward ``r`` for raw-reward RLHF);
3. per micro-batch (the step's prompts split ``rl.grad_accum`` ways): policy log-probs with grad,
   reference log-probs without (each prompt runs once, its KV cache shared by its M completions), ``R' = R - beta (log pi - log pi_ref)`` (sequence level), RLOO
   advantages, REINFORCE loss, backward; clip the gradient norm, AdamW, linear warm-up;
4. epochs 2..``rl.ppo_epochs`` reuse the first forward's detached log-probs as ``old`` (clipped ratio).

The policy runs in eval mode throughout (no dropout), so the log-probs in the KL and the ratio are
those of the sampling policy. Under ``accelerate launch`` each process takes a disjoint shard of the
step's prompts; loss weights make the update the exact mean over all of the step's sequences.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from infalign.core.calibration import EmpiricalCalibration
from infalign.core.transforms import Transform, parse_transform
from infalign.lm.models import Generation, derive_seed, generate
from infalign.lm.rewards import RewardFn, score
from infalign.lm.scoring import token_logprobs
from infalign.rl import checkpoint as ckpt_io
from infalign.rl.advantages import (
    adaptive_beta,
    ctrl_reward,
    kl_penalized_reward,
    rloo_advantages,
    sequence_logprob,
)
from infalign.rl.checkpoint import CHECKPOINT_DIR, METRICS_FILE, STATE_FILE
from infalign.rl.losses import policy_gradient_loss
from infalign.run.config import RLConfig, SamplingConfig
from infalign.run.io import disk_errors

__all__ = ["CHECKPOINT_DIR", "METRICS_FILE", "STATE_FILE", "CTRLTrainer", "make_optimizer"]

log = logging.getLogger(__name__)


class CTRLTrainer:
    """KL-regularised RL on the transformed calibrated reward (CTRL), or on the raw reward.

    Args:
        policy: trainable causal LM (optionally a peft LoRA model; only ``requires_grad`` params train).
        reference: frozen reference LM; None with a peft policy uses the policy with its adapter off.
        tokenizer: shared by policy and reference.
        prompts: the P_train training prompts.
        reward_fn: ``(prompts, completions) -> (P, M)`` raw rewards.
        calibration: fitted on the cached reference rewards of the same prompts (row i <-> prompts[i]);
            may be None for the raw-reward baseline (then ``rl/reward_calibrated`` is not logged).
        transform: a Transform or spec string; None or ``"raw"`` trains on the raw reward.
        rl, sampling: configs (``sampling`` is shared with reference sampling and evaluation).
        out_dir: receives ``metrics.jsonl`` and ``checkpoint/`` (main process only).
        resume: continue from ``out_dir/checkpoint`` if there is one.
        accelerator: an ``accelerate.Accelerator`` (created from ``rl`` if None).
        progress: show a tqdm bar on the main process.

    Each step appends one record to ``out_dir/metrics.jsonl`` (means over all processes' samples):
    ``rl/step`` (0-based index of the step), ``rl/reward_raw``, ``rl/reward_calibrated`` (C_hat),
    ``rl/reward_transformed`` (the training reward R), ``rl/kl_seq`` (mean sequence log-ratio
    log pi - log pi_ref, nats, of the step's samples under the pre-update policy), ``rl/kl_penalty``
    (beta * kl_seq), ``rl/advantage_std``, ``rl/entropy`` (per completion token),
    ``rl/completion_length`` (tokens, EOS included), ``rl/loss`` (REINFORCE loss of the first epoch),
    ``rl/grad_norm`` (before clipping, mean over PPO epochs), ``rl/lr``, ``rl/clip_frac`` and
    ``rl/approx_kl`` (epochs 2.., else 0), and seconds per stage ``rl/time/generate``,
    ``rl/time/reward``, ``rl/time/forward_backward`` (forwards, backward, optimizer) and
    ``rl/time/step``. ``rl.max_grad_norm <= 0`` disables clipping (the norm is still logged).

    A checkpoint after k completed steps holds the records of steps 0..k-1; resuming drops any later
    records from ``metrics.jsonl`` before training on.
    """

    def __init__(
        self,
        policy: Any,
        reference: Any | None,
        tokenizer: Any,
        prompts: list[str],
        reward_fn: RewardFn,
        calibration: EmpiricalCalibration | None,
        transform: Transform | str | None,
        rl: RLConfig,
        sampling: SamplingConfig,
        out_dir: str | Path,
        resume: bool = False,
        accelerator: Any | None = None,
        progress: bool = True,
    ) -> None:
        # --- validation, before any expensive work --------------------------------------------
        if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
            raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r:.80}")
        bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
        if bad:
            raise ValueError(f"prompts[{bad[0]}] is {type(prompts[bad[0]]).__name__}, expected str")
        rl.validate("rl")
        sampling.validate("sampling")
        if not callable(reward_fn):
            raise ValueError(f"reward_fn must be callable, got {type(reward_fn).__name__}")
        self.transform = _parse(transform)
        if calibration is None and self.transform is not None:
            raise ValueError(f"transform {str(self.transform)!r} needs a calibration, got None")
        if calibration is not None and calibration.num_prompts != len(prompts):
            raise ValueError(
                f"calibration has {calibration.num_prompts} prompts but prompts has {len(prompts)}; "
                "fit it on the reference rewards of the same (index-aligned) training prompts"
            )
        is_peft = hasattr(policy, "peft_config") and hasattr(policy, "disable_adapter")
        if reference is None and not is_peft:
            raise ValueError("reference=None is only allowed for a peft (LoRA) policy")
        params = [p for p in policy.parameters() if p.requires_grad]
        if not params:
            raise ValueError("policy has no trainable parameters (requires_grad=False everywhere)")

        if accelerator is None:
            from accelerate import Accelerator
            from accelerate.utils import is_bf16_available

            mp = "no"
            if rl.bf16:
                if is_bf16_available():
                    mp = "bf16"
                else:
                    log.warning("rl.bf16=True but bf16 is not supported here; training in fp32")
            accelerator = Accelerator(
                gradient_accumulation_steps=rl.grad_accum,
                mixed_precision=mp,
                step_scheduler_with_optimizer=False,
            )
        elif accelerator.gradient_accumulation_steps != rl.grad_accum:
            raise ValueError(
                f"rl.grad_accum={rl.grad_accum} but the accelerator accumulates over "
                f"{accelerator.gradient_accumulation_steps} steps"
            )
        elif accelerator.step_scheduler_with_optimizer:
            raise ValueError("pass an Accelerator(step_scheduler_with_optimizer=False)")
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world > 1 and accelerator.num_processes == 1:
            raise ValueError(
                f"launched with WORLD_SIZE={world} but accelerate runs a single process, so every "
                "process would train alone and write the same files; without a GPU set "
                "ACCELERATE_USE_CPU=1 (or Accelerator(cpu=True)) so accelerate uses gloo on CPU"
            )
        per_rank = rl.prompts_per_step // accelerator.num_processes
        if per_rank < rl.grad_accum:
            raise ValueError(
                f"rl.grad_accum={rl.grad_accum}: each of the {accelerator.num_processes} processes "
                f"gets {per_rank} of rl.prompts_per_step={rl.prompts_per_step} prompts, fewer than "
                "one per micro-batch"
            )

        self.accelerator = accelerator
        self.prompts = list(prompts)
        self.reward_fn = reward_fn
        self.calibration = calibration
        self.rl = rl
        self.sampling = sampling
        self.tokenizer = tokenizer
        self.out_dir = Path(out_dir)
        self.progress = progress
        self.is_peft = is_peft
        self.beta = float(rl.beta)  # moved by the KL controller when rl.kl_target is set
        self.step = 0  # completed steps
        self._saved_step = -1  # step of the last checkpoint written or loaded
        self._perm_cache: dict[int, list[int]] = {}

        # --- models, optimizer, schedule ------------------------------------------------------
        policy.eval()  # dropout off: log-probs are those of the sampling policy
        optimizer, scheduler = make_optimizer(params, rl)
        self.model, self.optimizer, self.scheduler = accelerator.prepare(
            policy, optimizer, scheduler
        )
        self.reference = reference
        if reference is not None:
            reference.requires_grad_(False)
            reference.eval()
            reference.to(accelerator.device)
        if accelerator.is_main_process:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            self.load_checkpoint()

    # --- prompts ---------------------------------------------------------------------------------

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perm_cache:
            g = torch.Generator().manual_seed(derive_seed(self.rl.seed, 0x5EED, epoch))
            self._perm_cache = {epoch: torch.randperm(len(self.prompts), generator=g).tolist()}
        return self._perm_cache[epoch]

    def step_prompt_indices(self, step: int) -> list[int]:
        """The ``rl.prompts_per_step`` prompt indices of step ``step`` (all processes): positions
        ``[step * pps, (step + 1) * pps)`` of the concatenated per-epoch seeded permutations."""
        n, pps = len(self.prompts), self.rl.prompts_per_step
        return [self._perm(pos // n)[pos % n] for pos in range(step * pps, (step + 1) * pps)]

    # --- one step --------------------------------------------------------------------------------

    def _ref_logprobs(self, gen: Generation) -> torch.Tensor:
        temp = self.sampling.temperature
        if self.reference is not None:
            out = token_logprobs(self.reference, gen, temperature=temp, grad=False)
        else:
            model = self.accelerator.unwrap_model(self.model)
            with model.disable_adapter():
                out = token_logprobs(model, gen, temperature=temp, grad=False)
        assert isinstance(out, torch.Tensor)
        return out

    def _calibration_rows(self, idx: list[int]) -> EmpiricalCalibration | None:
        """The calibration of prompts ``idx`` (row j <-> prompt idx[j]), or None for raw."""
        if self.calibration is None:
            return None
        return dataclasses.replace(
            self.calibration,
            sorted_rewards=self.calibration.sorted_rewards[idx],
            counts=self.calibration.counts[idx],
        )

    def _train_step(self) -> dict[str, float]:
        acc, rl = self.accelerator, self.rl
        t_start = time.perf_counter()
        W, M = acc.num_processes, rl.samples_per_prompt
        idx = self.step_prompt_indices(self.step)[acc.process_index :: W]
        prompts = [self.prompts[i] for i in idx]
        policy = acc.unwrap_model(self.model)
        with acc.autocast():
            gen = generate(
                policy,
                self.tokenizer,
                prompts,
                M,
                self.sampling,
                seed=derive_seed(rl.seed, self.step, acc.process_index),
                progress=False,
            )
        t_gen = time.perf_counter()

        raw = score(self.reward_fn, prompts, gen.texts).to(torch.float64)  # (P_r, M), validated
        cal = self._calibration_rows(idx)
        reward = ctrl_reward(raw, cal, self.transform).to(torch.float64)
        calibrated = cal(raw) if cal is not None else None
        t_rew = time.perf_counter()

        with _defer_sigint():  # the update, the step counter and its metrics record go together
            stats, diag = self._update(gen, reward)
            self.step += 1
            t_end = time.perf_counter()
            metrics = self._metrics(raw, calibrated, reward, gen, stats, diag)
            if rl.kl_target is not None:  # the beta of the next step
                self.beta = adaptive_beta(
                    self.beta, metrics["rl/kl_seq"], rl.kl_target, rl.kl_horizon
                )
            metrics["rl/time/generate"] = t_gen - t_start
            metrics["rl/time/reward"] = t_rew - t_gen
            metrics["rl/time/forward_backward"] = t_end - t_rew
            metrics["rl/time/step"] = t_end - t_start
            self._log(metrics)
        return metrics

    def _metrics(
        self,
        raw: torch.Tensor,
        calibrated: torch.Tensor | None,
        reward: torch.Tensor,
        gen: Generation,
        stats: dict[str, tuple[float, float]],
        diag: dict[str, float],
    ) -> dict[str, float]:
        """Means over all processes' samples (one all-reduce of (sum, count) pairs)."""
        n_seq = float(raw.numel())
        local = {
            "reward_raw": (raw.sum().item(), n_seq),
            "reward_calibrated": (
                (calibrated.sum().item() if calibrated is not None else 0.0),
                n_seq if calibrated is not None else 0.0,
            ),
            "reward_transformed": (reward.sum().item(), n_seq),
            "completion_length": (float(gen.completion_mask.sum()), n_seq),
            **stats,
        }
        mean = self._reduce_means(local)
        adv_var = mean["adv_sq"] - mean["adv"] ** 2
        metrics = {
            "rl/step": self.step - 1,
            "rl/reward_raw": mean["reward_raw"],
            "rl/reward_calibrated": mean.get("reward_calibrated", float("nan")),
            "rl/reward_transformed": mean["reward_transformed"],
            "rl/kl_seq": mean["kl_seq"],
            "rl/kl_penalty": self.beta * mean["kl_seq"],
            "rl/beta": self.beta,
            "rl/advantage_std": max(adv_var, 0.0) ** 0.5,
            "rl/entropy": mean["entropy"],
            "rl/completion_length": mean["completion_length"],
            "rl/loss": mean["loss"],
            **diag,
        }
        if calibrated is None:
            metrics.pop("rl/reward_calibrated")
        return metrics

    def _reduce_means(self, local: dict[str, tuple[float, float]]) -> dict[str, float]:
        """``{key: sum / count}`` over all processes from this process's ``(sum, count)`` pairs (one
        all-reduce); keys whose total count is 0 are left out."""
        acc = self.accelerator
        keys = sorted(local)
        vec = torch.tensor(
            [v for k in keys for v in local[k]], dtype=torch.float64, device=acc.device
        )
        if acc.num_processes > 1:
            vec = acc.reduce(vec, reduction="sum")
        tot = {k: (vec[2 * i].item(), vec[2 * i + 1].item()) for i, k in enumerate(keys)}
        return {k: s / c for k, (s, c) in tot.items() if c > 0}

    def _update(
        self, gen: Generation, reward: torch.Tensor
    ) -> tuple[dict[str, tuple[float, float]], dict[str, float]]:
        """Forward/backward over G micro-batches for each PPO epoch; one optimizer step per epoch."""
        acc, rl = self.accelerator, self.rl
        W, G = acc.num_processes, rl.grad_accum
        P = gen.num_prompts
        temp = self.sampling.temperature
        chunks = [c.tolist() for c in torch.arange(P).tensor_split(G)]
        weight_per_seq = G * W / (rl.prompts_per_step * rl.samples_per_prompt)
        lr = float(self.scheduler.get_last_lr()[0])
        sums = {k: [0.0, 0.0] for k in ("kl_seq", "adv", "adv_sq", "entropy", "loss")}
        saved: list[tuple[Generation, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        grad_norms: list[float] = []
        clip_fracs: list[float] = []
        approx_kls: list[float] = []
        acc.step = 0  # align accelerate's accumulation counter with our micro-batches
        for epoch in range(rl.ppo_epochs):
            for ci, chunk in enumerate(chunks):
                with acc.accumulate(self.model), acc.autocast():
                    if epoch == 0:
                        sub = gen.select_prompts(chunk)
                        mask = sub.completion_mask.to(acc.device)
                        out = token_logprobs(
                            self.model, sub, temperature=temp, grad=True, with_entropy=True
                        )
                        assert isinstance(out, tuple)
                        lp, ent = out
                        ref_lp = self._ref_logprobs(sub)
                        n = len(chunk)
                        seq = sequence_logprob(lp.detach(), mask).double().cpu().view(n, -1)
                        seq_ref = sequence_logprob(ref_lp, mask).double().cpu().view(n, -1)
                        r_pen = kl_penalized_reward(reward[chunk], seq, seq_ref, self.beta)
                        adv_pm = rloo_advantages(r_pen, normalize_std=rl.normalize_std)
                        adv = adv_pm.flatten().to(device=acc.device, dtype=torch.float32)
                        loss, d = policy_gradient_loss(lp, None, adv, mask, rl.clip_eps)
                        saved.append((sub, lp.detach(), adv, mask))
                        b = float(adv.numel())
                        _add(sums["kl_seq"], (seq - seq_ref).sum().item(), b)
                        _add(sums["adv"], adv_pm.sum().item(), b)
                        _add(sums["adv_sq"], (adv_pm**2).sum().item(), b)
                        _add(sums["entropy"], float((ent * mask).sum()), float(mask.sum()))
                        _add(sums["loss"], loss.item() * b, b)
                    else:
                        sub, old, adv, mask = saved[ci]
                        out = token_logprobs(self.model, sub, temperature=temp, grad=True)
                        assert isinstance(out, torch.Tensor)
                        loss, d = policy_gradient_loss(out, old, adv, mask, rl.clip_eps)
                        clip_fracs.append(float(d.clip_frac))
                        approx_kls.append(float(d.approx_kl))
                    acc.backward(loss * (adv.numel() * weight_per_seq))
                    if acc.sync_gradients:
                        max_norm = rl.max_grad_norm if rl.max_grad_norm > 0 else float("inf")
                        gn = acc.clip_grad_norm_(self.model.parameters(), max_norm)
                        grad_norms.append(float(gn))
                        self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        diag = {
            "rl/grad_norm": float(np.mean(grad_norms)) if grad_norms else float("nan"),
            "rl/lr": lr,
            "rl/clip_frac": float(np.mean(clip_fracs)) if clip_fracs else 0.0,
            "rl/approx_kl": float(np.mean(approx_kls)) if approx_kls else 0.0,
        }
        return {k: (v[0], v[1]) for k, v in sums.items()}, diag

    # --- the loop --------------------------------------------------------------------------------

    def train(self) -> list[dict[str, float]]:
        """Run until ``rl.steps`` steps are done; returns this call's per-step metrics.

        A KeyboardInterrupt saves a checkpoint of the last completed step, then propagates.
        """
        acc, rl = self.accelerator, self.rl
        history: list[dict[str, float]] = []
        bar = tqdm(
            total=rl.steps,
            initial=self.step,
            desc="rl",
            disable=not (self.progress and acc.is_main_process),
        )
        try:
            while self.step < rl.steps:
                metrics = self._train_step()
                history.append(metrics)
                bar.update(1)
                bar.set_postfix(
                    reward=f"{metrics['rl/reward_transformed']:.3f}",
                    kl=f"{metrics['rl/kl_seq']:.3f}",
                )
                if self.step % rl.save_every == 0 or self.step == rl.steps:
                    self.save_checkpoint()
            if self._saved_step != self.step:
                self.save_checkpoint()
        except KeyboardInterrupt:
            log.warning("interrupted: saving a checkpoint at step %d", self.step)
            self.save_checkpoint(collective=False)
            raise
        finally:
            bar.close()
        return history

    def _log(self, metrics: dict[str, float]) -> None:
        if not self.accelerator.is_main_process:
            return
        log.info("rl step %d: %s", metrics["rl/step"], json.dumps(metrics))
        path = self.out_dir / METRICS_FILE
        with disk_errors(path), open(path, "a") as f:
            f.write(json.dumps(metrics) + "\n")

    # --- checkpoints (files and state: infalign.rl.checkpoint) -------------------------------------

    def _state(self) -> dict[str, Any]:
        state = ckpt_io.trainer_state(
            step=self.step,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            prompts=self.prompts,
            rl=self.rl,
            sampling=self.sampling,
            transform="raw" if self.transform is None else str(self.transform),
            num_processes=self.accelerator.num_processes,
        )
        state["beta"] = self.beta
        return state

    def save_checkpoint(self, collective: bool = True) -> Path:
        """Write ``out_dir/checkpoint`` atomically (temp dir, then rename): the model (safetensors)
        and tokenizer via ``save_pretrained``, and ``trainer_state.pt``. ``collective=False`` skips
        the cross-process parts (used after an interrupt, when other ranks may be gone)."""
        acc = self.accelerator
        final = self.out_dir / CHECKPOINT_DIR
        if collective:
            acc.wait_for_everyone()
            state_dict = acc.get_state_dict(self.model)
        else:
            state_dict = acc.unwrap_model(self.model).state_dict()
        if acc.is_main_process:
            ckpt_io.write_checkpoint(
                self.out_dir,
                acc.unwrap_model(self.model),
                self.tokenizer,
                state_dict,
                self._state(),
            )
            log.info("saved checkpoint at step %d to %s", self.step, final)
        self._saved_step = self.step
        if collective:
            acc.wait_for_everyone()
        return final

    def load_checkpoint(self) -> bool:
        """Restore model, optimizer, scheduler, step and RNG states from ``out_dir/checkpoint`` (or
        the ``checkpoint.old`` left by a save interrupted between its two renames). False if none."""
        ckpt = ckpt_io.find_checkpoint(self.out_dir)
        if ckpt is None:
            log.info("resume: no checkpoint in %s, starting from step 0", self.out_dir)
            return False
        state = ckpt_io.load_state(ckpt)
        ckpt_io.check_resumable(state, ckpt, self.rl, self.prompts)
        ckpt_io.load_weights(self.accelerator.unwrap_model(self.model), ckpt, self.is_peft)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        ckpt_io.restore_rng_state(state["rng"])
        self.step = self._saved_step = int(state["step"])
        self.beta = float(state.get("beta", self.rl.beta))
        if self.accelerator.is_main_process:
            ckpt_io.truncate_metrics(self.out_dir / METRICS_FILE, self.step)
        log.info("resumed from %s at step %d", ckpt, self.step)
        return True


# --- helpers -------------------------------------------------------------------------------------


def make_optimizer(params: Any, rl: RLConfig) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW at ``rl.lr`` (``rl.weight_decay``) and its schedule: linear warm-up over
    ``rl.warmup_steps`` optimizer steps, then constant. Every trainer (and the convergence tests)
    builds its optimizer here."""
    optimizer = torch.optim.AdamW(params, lr=rl.lr, weight_decay=rl.weight_decay)
    warm = rl.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warm) if warm > 0 else 1.0
    )
    return optimizer, scheduler


def _parse(transform: Transform | str | None) -> Transform | None:
    if transform is None or (isinstance(transform, str) and transform.strip().lower() == "raw"):
        return None
    try:
        return parse_transform(transform)
    except ValueError as err:
        raise ValueError(
            f"transform={transform!r}: {err} (resolve exp:auto / optimal with infalign.theory first)"
        ) from None


def _add(acc: list[float], s: float, c: float) -> None:
    acc[0] += s
    acc[1] += c


@contextlib.contextmanager
def _defer_sigint() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) that arrives inside the block until the block ends, so a parameter
    update and its step counter are never split; re-raised as KeyboardInterrupt afterwards."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    received: list[Any] = []
    previous = signal.signal(signal.SIGINT, lambda sig, frame: received.append(sig))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt
