"""RLOO with the KL in the reward (spec section 6): ``rl.algorithm: rloo``, the default.

Per step (``rl.prompts_per_step`` prompts from the base's seeded order, M = ``rl.samples_per_prompt``):

1. ``generate`` M samples per prompt with the policy (KV cache; seed derived from (seed, step, rank));
2. one reward call, ``R = Phi(C_hat(r))`` (or the raw reward ``r`` for raw-reward RLHF);
3. per micro-batch (the step's prompts split ``rl.grad_accum`` ways): policy log-probs with grad,
   reference log-probs without (each prompt runs once, its KV cache shared by its M completions),
   ``R' = R - beta (log pi - log pi_ref)`` (sequence level), RLOO advantages
   ``A_pm = R'_pm - mean_{m' != m} R'_pm'``, REINFORCE loss, backward; clip the gradient norm,
   AdamW, linear warm-up;
4. epochs 2..``rl.ppo_epochs`` reuse the first forward's detached log-probs as ``old`` (clipped ratio).

The policy runs in eval mode throughout (no dropout), so the log-probs in the KL and the ratio are
those of the sampling policy.

Metrics (``metrics.jsonl``, means over all processes' samples): ``rl/step`` (0-based),
``rl/reward_raw``, ``rl/reward_calibrated`` (C_hat), ``rl/reward_transformed`` (the training reward R),
``rl/kl_seq`` (mean sequence log-ratio log pi - log pi_ref of the step's samples under the pre-update
policy, nats), ``rl/kl_penalty`` (beta * kl_seq), ``rl/beta``, ``rl/advantage_std``, ``rl/entropy``
(per completion token), ``rl/completion_length`` (tokens, EOS included), ``rl/loss`` (REINFORCE loss of
the first epoch), ``rl/grad_norm`` (before clipping, mean over PPO epochs), ``rl/lr``, ``rl/clip_frac``
and ``rl/approx_kl`` (epochs 2.., else 0), and seconds per stage ``rl/time/generate``,
``rl/time/reward``, ``rl/time/forward_backward`` (forwards, backward, optimizer) and ``rl/time/step``.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from infalign.lm.models import Generation, derive_seed
from infalign.lm.rewards import score
from infalign.lm.sampling import sample
from infalign.lm.scoring import token_logprobs
from infalign.rl.advantages import (
    adaptive_beta,
    ctrl_reward,
    kl_penalized_reward,
    rloo_advantages,
    sequence_logprob,
)
from infalign.rl.base import CTRLTrainer, _add, defer_interrupts
from infalign.rl.losses import policy_gradient_loss

__all__ = ["TRAINER", "RLOOTrainer"]


class RLOOTrainer(CTRLTrainer):
    """On-policy RLOO on the CTRL reward with the KL in the reward (module docstring); the
    arguments are :class:`~infalign.rl.base.CTRLTrainer`'s."""

    def _train_step(self) -> dict[str, float]:
        acc, rl = self.accelerator, self.rl
        t_start = time.perf_counter()
        W, M = acc.num_processes, rl.samples_per_prompt
        idx = self.step_prompt_indices(self.step)[acc.process_index :: W]
        prompts = [self.prompts[i] for i in idx]
        policy = acc.unwrap_model(self.model)
        with acc.autocast():
            gen = sample(
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

        with defer_interrupts():  # the update, the step counter and its metrics record go together
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
                        lp, ent = token_logprobs(
                            self.model, sub, temperature=temp, grad=True, with_entropy=True
                        )
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
                        lp = token_logprobs(self.model, sub, temperature=temp, grad=True)
                        loss, d = policy_gradient_loss(lp, old, adv, mask, rl.clip_eps)
                        clip_fracs.append(float(d.clip_frac))
                        approx_kls.append(float(d.approx_kl))
                    acc.backward(loss * (adv.numel() * weight_per_seq))
                    if acc.sync_gradients:
                        grad_norms.append(self._clip_and_step())
        self.scheduler.step()
        diag = {
            "rl/grad_norm": float(np.mean(grad_norms)) if grad_norms else float("nan"),
            "rl/lr": lr,
            "rl/clip_frac": float(np.mean(clip_fracs)) if clip_fracs else 0.0,
            "rl/approx_kl": float(np.mean(approx_kls)) if approx_kls else 0.0,
        }
        return {k: (v[0], v[1]) for k, v in sums.items()}, diag


TRAINER = RLOOTrainer
