"""CTRL by regression on the exact optimum (spec section 6b): ``rl.algorithm: regression``.

In calibrated space the KL-regularised optimum is known in closed form up to nothing:

    pi*(y|x) = pi_ref(y|x) exp(R(x, y) / beta) / Z,        R = Phi(C_hat(x, y)),
    beta (log pi*(y|x) - log pi_ref(y|x)) = R(x, y) - beta log Z          for every y,

so the policy's sequence log-ratio is regressed on that target with squared error,

    L(theta) = mean_{x, y ~ mu} [ (beta (log pi_theta(y|x) - log pi_ref(y|x)) - (R - beta log Z))^2 ],

whose unique zero is pi* for any mu covering pi*'s support. Here mu is pi_ref: the K reference
samples per prompt that were drawn and scored for calibration, with their stored token ids and
``log pi_ref`` (the reference artifact), so training needs no generation and no reference forward.

**Z.** A reference sample scored against its own prompt's K rewards takes the mid-rank
``u = (i - 1/2) / K`` (ties share theirs), so ``Z`` is the mean of ``exp(R/beta)`` over the prompt's
own K samples: ``log Z_p = logmeanexp_k(R_pk / beta)``. Without ties it equals the spec's
``(1/K) sum_i exp(Phi((i - 1/2)/K) / beta)``, the same for every prompt; with ties it is the exact
normaliser of the empirical reference distribution. The raw-reward baseline (``R = r``) uses the
same per-prompt formula, where Z genuinely differs between prompts.

Adam is invariant to the loss's scale, so the ``beta^2`` between reward units (above) and
log-ratio units changes nothing but the gradient-norm clipping threshold.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch

from infalign.core.calibration import EmpiricalCalibration
from infalign.core.transforms import Transform
from infalign.lm.models import derive_seed
from infalign.lm.rewards import RewardFn
from infalign.lm.scoring import token_logprobs
from infalign.rl.advantages import ctrl_reward, sequence_logprob
from infalign.rl.base import CTRLTrainer
from infalign.rl.signals import defer_interrupts
from infalign.run.config import RLConfig, SamplingConfig

__all__ = [
    "TRAINER",
    "RegressionTrainer",
    "fit_diagnostics",
    "fresh_log_partition",
    "log_partition",
    "regression_loss",
    "regression_target",
]


def log_partition(reward: torch.Tensor, beta: float) -> torch.Tensor:
    """``log Z_p = log (1/K) sum_k exp(R_pk / beta)``: the partition function of the tilt over each
    prompt's K reference samples. reward: (P, K). Returns (P,) float64."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}")
    r = reward.double() / beta
    return torch.logsumexp(r, dim=1) - math.log(r.shape[1])


def regression_target(
    reward: torch.Tensor, beta: float, log_z: torch.Tensor | float | None = None
) -> torch.Tensor:
    """The optimum's scaled log-ratio ``beta log(pi*/pi_ref) = R - beta log Z`` on the reference
    samples (reward units). reward: (P, K) -> (P, K) float64.

    ``log_z``: (P,) or a scalar when the partition function is known exactly (e.g. a tabular policy
    whose u is the population CDF); default :func:`log_partition` over each prompt's K samples.
    """
    if log_z is None:
        log_z = log_partition(reward, beta)
    lz = torch.as_tensor(log_z, dtype=torch.float64)
    return reward.double() - beta * (lz.unsqueeze(1) if lz.ndim == 1 else lz)


def fresh_log_partition(transform: Any, beta: float, K: int) -> float:
    """``log Z_K`` for a *fresh* sample of pi_ref scored against K reference rewards: its C_hat takes
    ``j/K``, j = 0..K, each with probability 1/(K+1), so ``Z_K = (1/(K+1)) sum_j exp(Phi(j/K)/beta)``
    (spec 6b; exact without ties)."""
    u = torch.arange(K + 1, dtype=torch.float64) / K
    r = torch.as_tensor(transform(u), dtype=torch.float64) / beta
    return float(torch.logsumexp(r, dim=0) - math.log(K + 1))


def regression_loss(
    policy_seq_logprob: torch.Tensor,
    ref_seq_logprob: torch.Tensor,
    target: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """``mean_i (beta (log pi(y_i) - log pi_ref(y_i)) - target_i)^2`` (spec 6b), any matching shape.

    ``policy_seq_logprob`` carries the gradient; the reference log-probs and the target are
    constants. Returns a scalar in the policy's dtype.
    """
    if not (policy_seq_logprob.shape == ref_seq_logprob.shape == target.shape):
        raise ValueError(
            f"policy {tuple(policy_seq_logprob.shape)}, reference {tuple(ref_seq_logprob.shape)} "
            f"and target {tuple(target.shape)} log-probs must have the same shape"
        )
    dt = policy_seq_logprob.dtype
    fit = beta * (policy_seq_logprob - ref_seq_logprob.detach().to(dt))
    return ((fit - target.detach().to(dt)) ** 2).mean()


def fit_diagnostics(logratio: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """How much of the intended tilt a policy realises: ``logratio`` = log pi - log pi_ref and
    ``target`` = (R - beta log Z) / beta on the same samples (any equal shapes, flattened).

    Returns ``slope`` (OLS of logratio on target; 1 is the optimum, 0 is pi_ref), ``corr``
    (Pearson) and ``rmse`` (nats) of logratio - target.
    """
    x, y = target.double().flatten(), logratio.double().flatten()
    if x.shape != y.shape or x.numel() < 2:
        raise ValueError(f"need two equal-length vectors, got {tuple(x.shape)}, {tuple(y.shape)}")
    xc, yc = x - x.mean(), y - y.mean()
    sxx, syy, sxy = (xc * xc).sum(), (yc * yc).sum(), (xc * yc).sum()
    slope = float(sxy / sxx) if sxx > 0 else float("nan")
    corr = float(sxy / (sxx * syy).sqrt()) if sxx > 0 and syy > 0 else float("nan")
    return {"slope": slope, "corr": corr, "rmse": float(((y - x) ** 2).mean().sqrt())}


def snis_kl(logratio: torch.Tensor) -> torch.Tensor:
    """Self-normalised importance estimate of ``KL(pi || pi_ref)`` per prompt from k samples of
    pi_ref: ``KL(w || uniform) = sum_k w_k (logratio_k - log mean_j exp(logratio_j))`` with
    ``w = softmax_k(logratio)``. (P, k) -> (P,).

    The KL of the policy reweighted onto the k samples from the uniform weights: in ``[0, log k]``,
    invariant to a shift of the log-ratios, and consistent (``mean exp(logratio) -> 1`` as k grows).
    The plain ``sum_k w_k logratio_k`` goes negative, without bound, once the policy moves its mass
    off the samples. Biased low for small k: a monitor, not the evaluation's estimate.
    """
    lr = logratio.double()
    log_mean = torch.logsumexp(lr, dim=1, keepdim=True) - math.log(lr.shape[1])
    return (torch.softmax(lr, dim=1) * (lr - log_mean)).sum(dim=1)


class RegressionTrainer(CTRLTrainer):
    """Regression on the exact optimum over the cached reference samples (module docstring).

    Shares :class:`~infalign.rl.base.CTRLTrainer`'s accelerate setup, optimizer and warm-up,
    checkpoints and exact resume, signal handling, metrics file and loop; only the step differs.
    Per step: ``rl.prompts_per_step`` prompts (the same seeded permutation as RLOO), and for each
    ``rl.samples_per_prompt`` of its K reference samples, drawn without replacement with a seed
    derived from ``(rl.seed, step)``; one policy forward/backward per micro-batch; no generation, no
    reward call, no reference forward.

    Args:
        reference_set: the :class:`~infalign.run.reference.ReferenceSet` of the training prompts
            (format 2: token ids and ``log pi_ref``), index-aligned with ``calibration``.
        other arguments: as for ``CTRLTrainer`` (``reward_fn`` is unused and may be None).

    Metrics (``metrics.jsonl``): ``rl/step``, ``rl/loss``, ``rl/reward_transformed`` (mean R of the
    step's samples), ``rl/kl_seq`` (self-normalised importance estimate of KL(pi || pi_ref) from the
    step's reference samples), ``rl/logratio`` (mean log pi - log pi_ref on them, an estimate of
    -KL(pi_ref || pi)), ``rl/fit_slope``, ``rl/fit_corr``, ``rl/fit_rmse`` (before the update, see
    :func:`fit_diagnostics`), ``rl/grad_norm``, ``rl/lr``, ``rl/completion_length`` and
    ``rl/time/forward_backward``, ``rl/time/step``.
    """

    def __init__(
        self,
        policy: Any,
        reference: Any | None,
        tokenizer: Any,
        reference_set: Any,
        calibration: EmpiricalCalibration | None,
        transform: Transform | str | None,
        rl: RLConfig,
        sampling: SamplingConfig,
        out_dir: Any,
        resume: bool = False,
        accelerator: Any | None = None,
        progress: bool = True,
        reward_fn: Any | None = None,
    ) -> None:
        tids = getattr(reference_set, "token_ids", None)
        if tids is None or getattr(reference_set, "logprobs", None) is None:
            raise ValueError(
                "rl.algorithm=regression needs a reference set with token_ids and logprobs "
                "(reference artifact format 2)"
            )
        K = reference_set.num_samples
        if rl.samples_per_prompt > K:
            raise ValueError(
                f"rl.samples_per_prompt={rl.samples_per_prompt} exceeds the K={K} reference "
                "samples per prompt that regression draws from"
            )
        super().__init__(
            policy,
            reference,
            tokenizer,
            reference_set.prompts,
            reward_fn if reward_fn is not None else _unused_reward,
            calibration,
            transform,
            rl,
            sampling,
            out_dir,
            resume=resume,
            accelerator=accelerator,
            progress=progress,
        )
        if rl.onpolicy_samples > 0 and reward_fn is None:
            raise ValueError(f"rl.onpolicy_samples={rl.onpolicy_samples} needs a reward_fn")
        self.reference_set = reference_set
        raw = reference_set.rewards.double()
        self.reward_table = ctrl_reward(raw, calibration, self.transform).double()  # (P, K)
        self.target_table = regression_target(self.reward_table, rl.beta)  # (P, K)
        self.ref_table = reference_set.logprobs.double()  # (P, K)
        # log Z of fresh samples (on-policy refresh): Z_K for a calibrated reward; for the raw
        # reward, the prompt's own estimate over its K reference samples
        if self.transform is None:
            self.fresh_log_z = log_partition(self.reward_table, rl.beta)
        else:
            lz = fresh_log_partition(self.transform, rl.beta, K)
            self.fresh_log_z = torch.full((len(self.prompts),), lz, dtype=torch.float64)

    @classmethod
    def _data(
        cls, reference_set: Any, load_reward: Callable[[], RewardFn], rl: RLConfig
    ) -> dict[str, Any]:
        """Regresses on ``reference_set`` itself; loads the reward only for on-policy samples."""
        reward = load_reward() if rl.onpolicy_samples > 0 else None
        return {"reference_set": reference_set, "reward_fn": reward}

    def _samples(self, idx: list[int]) -> torch.Tensor:
        """(len(idx), M) sample indices, without replacement, seeded by (rl.seed, step)."""
        g = torch.Generator().manual_seed(derive_seed(self.rl.seed, 0x5A3, self.step))
        K = self.reference_set.num_samples
        keys = torch.rand(len(self.prompts), K, generator=g)[idx]  # same draw on every rank
        return keys.argsort(dim=1)[:, : self.rl.samples_per_prompt]

    def _onpolicy(self, idx: list[int]) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``rl.onpolicy_samples`` fresh policy samples per prompt of ``idx``: (Generation, target
        (P', m), log pi_ref (P', m), reward R (P', m)); C_hat against the prompts' K references."""
        from infalign.lm.rewards import score
        from infalign.lm.sampling import sample

        acc, rl = self.accelerator, self.rl
        prompts = [self.prompts[i] for i in idx]
        with acc.autocast():
            gen = sample(
                acc.unwrap_model(self.model),
                self.tokenizer,
                prompts,
                rl.onpolicy_samples,
                self.sampling,
                seed=derive_seed(rl.seed, 0x0F, self.step, acc.process_index),
                progress=False,
            )
        raw = score(self.reward_fn, prompts, gen.texts).double()
        reward = ctrl_reward(raw, self._calibration_rows(idx), self.transform).double()
        target = regression_target(reward, rl.beta, self.fresh_log_z[idx])
        ref = self._ref_logprobs(gen)
        ref_seq = sequence_logprob(ref.double().cpu(), gen.completion_mask.double())
        return gen, target, ref_seq.view(len(idx), -1), reward

    def _batches(self, idx: list[int]) -> tuple[list[tuple[Any, Any, Any]], Any, Any, Any]:
        """The step's regression sets for prompts ``idx``: [(Generation, target (P', n), log pi_ref
        (P', n))] with the reference samples first and the on-policy ones (if any) second; also
        the reference samples' target and reward and the on-policy reward (or None)."""
        sidx = self._samples(idx)
        rows = torch.tensor(idx).unsqueeze(1)
        target, ref, reward = (
            t[rows, sidx] for t in (self.target_table, self.ref_table, self.reward_table)
        )
        batches = [(self.reference_set.generation(self.tokenizer, idx, sidx), target, ref)]
        on_reward = None
        if self.rl.onpolicy_samples > 0:
            gen_on, target_on, ref_on, on_reward = self._onpolicy(idx)
            batches.append((gen_on, target_on, ref_on))
        return batches, target, reward, on_reward

    def _regress(self, batches: list[tuple[Any, Any, Any]], n_prompts: int) -> tuple[Any, float]:
        """Forward/backward of every micro-batch and the optimizer step. Returns the reference
        samples' sequence log-ratios (P', n) before the update and the summed loss."""
        acc, rl = self.accelerator, self.rl
        W, G = acc.num_processes, rl.grad_accum
        n_per_prompt = sum(b[1].shape[1] for b in batches)
        chunks = [c.tolist() for c in torch.arange(n_prompts).tensor_split(G)]
        logratios: list[torch.Tensor] = []
        loss_sum, self._grad_norm = 0.0, float("nan")
        acc.step = 0
        for chunk in chunks:
            with acc.accumulate(self.model), acc.autocast():
                loss = torch.zeros((), device=acc.device)
                for bi, (gen, tgt, rf) in enumerate(batches):
                    sub = gen.select_prompts(chunk)
                    mask = sub.completion_mask.to(acc.device)
                    lp = token_logprobs(
                        self.model, sub, temperature=self.sampling.temperature, grad=True
                    )
                    seq = sequence_logprob(lp, mask).view(len(chunk), -1)
                    part = regression_loss(
                        seq, rf[chunk].to(seq.device), tgt[chunk].to(seq.device), rl.beta
                    )
                    # the mean over all of the step's samples: weight by this part's share
                    loss = loss + part * (seq.numel() / (rl.prompts_per_step * n_per_prompt))
                    if bi == 0:
                        logratios.append(seq.detach().double().cpu() - rf[chunk])
                acc.backward(loss * (W * G))  # accelerate divides by G; DDP averages over W
                loss_sum += loss.item() * rl.prompts_per_step
                if acc.sync_gradients:
                    self._grad_norm = self._clip_and_step()
        self.scheduler.step()
        return torch.cat(logratios), loss_sum

    def _train_step(self) -> dict[str, float]:
        acc, rl = self.accelerator, self.rl
        t0 = time.perf_counter()
        idx = self.step_prompt_indices(self.step)[acc.process_index :: acc.num_processes]
        batches, target, reward, on_reward = self._batches(idx)
        t_gen = time.perf_counter() if on_reward is not None else t0
        lr_now = float(self.scheduler.get_last_lr()[0])
        with defer_interrupts():
            lr_seq, loss_sum = self._regress(batches, len(idx))
            self.step += 1
            t1 = time.perf_counter()
            fit = fit_diagnostics(lr_seq, target / rl.beta)
            local = {
                "loss": (loss_sum, float(len(idx))),
                "reward_transformed": (float(reward.sum()), float(reward.numel())),
                "kl_seq": (float(snis_kl(lr_seq).sum()), float(len(idx))),
                "logratio": (float(lr_seq.sum()), float(lr_seq.numel())),
                "completion_length": (
                    float(batches[0][0].completion_mask.sum()),
                    float(lr_seq.numel()),
                ),
            }
            if on_reward is not None:
                local["onpolicy_reward"] = (float(on_reward.sum()), float(on_reward.numel()))
            metrics: dict[str, float] = {"rl/step": self.step - 1}
            metrics |= {f"rl/{k}": v for k, v in self._reduce_means(local).items()}
            metrics |= {f"rl/fit_{k}": fit[k] for k in ("slope", "corr", "rmse")}
            metrics |= {
                "rl/grad_norm": self._grad_norm,
                "rl/lr": lr_now,
                "rl/time/generate": t_gen - t0,
                "rl/time/forward_backward": t1 - t_gen,
                "rl/time/step": time.perf_counter() - t0,
            }
            self._log(metrics)
        return metrics


def _unused_reward(prompts: list[str], completions: list[list[str]]) -> torch.Tensor:
    raise RuntimeError("the regression trainer scores no samples")


TRAINER = RegressionTrainer
