"""The trainer base: what every CTRL algorithm shares; an algorithm is one file in
:mod:`infalign.rl.algorithms` that subclasses :class:`CTRLTrainer` and implements ``_train_step``.

The base owns: validation before any expensive work, the ``accelerate`` setup (processes, mixed
precision, gradient accumulation), the optimizer and warm-up (:func:`make_optimizer`), the seeded
per-epoch prompt order (``step_prompt_indices``: every algorithm sees the same prompts at the same
step), reference log-probs, the per-prompt calibration rows, the cross-process means of metrics (one
all-reduce), the loop with its progress bar, ``metrics.jsonl``, atomic checkpoints with exact resume,
and signals: a SIGINT or SIGTERM that arrives inside an update is held until the update, its step
counter and its metrics record are complete; then a checkpoint of the last completed step is saved
and the interrupt propagates (:class:`Terminated` for SIGTERM, which the CLI turns into exit 143).

Under ``accelerate launch`` each process takes a disjoint shard of the step's prompts; each
algorithm weights its loss so that an update is the exact mean over all of the step's sequences.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from infalign.core.calibration import EmpiricalCalibration
from infalign.core.transforms import RAW, Transform, is_raw, parse_transform
from infalign.lm.models import Generation, derive_seed
from infalign.lm.prompts import check_prompt_list
from infalign.lm.rewards import RewardFn
from infalign.lm.scoring import token_logprobs
from infalign.rl import checkpoint as ckpt_io
from infalign.rl.checkpoint import CHECKPOINT_DIR, METRICS_FILE, STATE_FILE
from infalign.rl.optim import make_accelerator, make_optimizer
from infalign.rl.signals import Terminated, defer_interrupts, sigterm_raises
from infalign.run.config import RLConfig, SamplingConfig
from infalign.run.io import disk_errors

__all__ = [
    "CHECKPOINT_DIR",
    "METRICS_FILE",
    "STATE_FILE",
    "CTRLTrainer",
    "Terminated",
    "defer_interrupts",
    "make_optimizer",
    "sigterm_raises",
]

log = logging.getLogger(__name__)


class CTRLTrainer:
    """The base of every CTRL trainer: KL-regularised RL on the transformed calibrated reward, or
    on the raw reward (module docstring). Subclasses implement ``_train_step``.

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

    Each step appends one record to ``out_dir/metrics.jsonl`` (means over all processes' samples;
    the names are the algorithm's, docs/metrics.md).

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
        rl.validate("rl")
        sampling.validate("sampling")
        self.transform = _parse(transform)
        params, is_peft = _check_inputs(
            policy, reference, prompts, reward_fn, calibration, self.transform
        )
        accelerator = make_accelerator(rl, accelerator)

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

    @classmethod
    def from_reference(
        cls,
        policy: Any,
        reference: Any | None,
        tokenizer: Any,
        reference_set: Any,
        load_reward: Callable[[], RewardFn],
        calibration: EmpiricalCalibration | None,
        transform: Transform | str | None,
        rl: RLConfig,
        sampling: SamplingConfig,
        out_dir: str | Path,
        resume: bool = False,
    ) -> CTRLTrainer:
        """The pipeline's one way to build any algorithm's trainer from the train stage's inputs:
        the :class:`~infalign.run.reference.ReferenceSet` of the training prompts and a loader of
        the reward; :meth:`_data` says which of them the algorithm takes."""
        return cls(
            policy=policy,
            reference=reference,
            tokenizer=tokenizer,
            calibration=calibration,
            transform=transform,
            rl=rl,
            sampling=sampling,
            out_dir=out_dir,
            resume=resume,
            **cls._data(reference_set, load_reward, rl),
        )

    @classmethod
    def _data(
        cls, reference_set: Any, load_reward: Callable[[], RewardFn], rl: RLConfig
    ) -> dict[str, Any]:
        """The constructor's training data from the train stage's inputs: the prompts and the
        reward (overridden by algorithms that train on the reference samples themselves)."""
        return {"prompts": list(reference_set.prompts), "reward_fn": load_reward()}

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
            return token_logprobs(self.reference, gen, temperature=temp, grad=False)
        model = self.accelerator.unwrap_model(self.model)
        with model.disable_adapter():
            return token_logprobs(model, gen, temperature=temp, grad=False)

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
        """One step of the algorithm: update the policy, ``self.step += 1``, append its metrics
        record with :meth:`_log` (inside :func:`defer_interrupts`, so an interrupt never splits an
        update from its step counter and record), and return the record."""
        raise NotImplementedError(f"{type(self).__name__} does not implement _train_step")

    def _clip_and_step(self) -> float:
        """At an accumulation boundary: clip the gradient norm to ``rl.max_grad_norm`` (<= 0: no
        clipping), take the optimizer step, zero the gradients. Returns the norm before clipping."""
        rl = self.rl
        max_norm = rl.max_grad_norm if rl.max_grad_norm > 0 else float("inf")
        norm = float(self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

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

    # --- the loop --------------------------------------------------------------------------------

    def train(self) -> list[dict[str, float]]:
        """Run until ``rl.steps`` steps are done; returns this call's per-step metrics.

        A KeyboardInterrupt (SIGINT) or :class:`Terminated` (SIGTERM, while ``train`` runs in the
        main thread) saves a checkpoint of the last completed step, then propagates.
        """
        acc, rl = self.accelerator, self.rl
        self._history: list[dict[str, float]] = []
        bar = tqdm(
            total=rl.steps,
            initial=self.step,
            desc="rl",
            disable=not (self.progress and acc.is_main_process),
        )
        with sigterm_raises():
            self._loop(bar)
        return self._history

    def _loop(self, bar: Any) -> None:
        rl = self.rl
        try:
            while self.step < rl.steps:
                metrics = self._train_step()
                self._history.append(metrics)
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

    def _log(self, metrics: dict[str, float]) -> None:
        if not self.accelerator.is_main_process:
            return
        log.info("rl step %d: %s", metrics["rl/step"], json.dumps(metrics))
        path = self.out_dir / METRICS_FILE
        with disk_errors(path), open(path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        self.accelerator.log(metrics, step=int(metrics["rl/step"]))  # recipe key `tracking`

    # --- checkpoints (files and state: infalign.rl.checkpoint) -------------------------------------

    def _state(self) -> dict[str, Any]:
        state = ckpt_io.trainer_state(
            step=self.step,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            prompts=self.prompts,
            rl=self.rl,
            sampling=self.sampling,
            transform=RAW if self.transform is None else str(self.transform),
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


def _check_inputs(
    policy: Any,
    reference: Any | None,
    prompts: Any,
    reward_fn: Any,
    calibration: EmpiricalCalibration | None,
    transform: Transform | None,
) -> tuple[list[Any], bool]:
    """Validate a trainer's inputs before any expensive work; returns (trainable params, is_peft)."""
    check_prompt_list(prompts)
    if not callable(reward_fn):
        raise ValueError(f"reward_fn must be callable, got {type(reward_fn).__name__}")
    if calibration is None and transform is not None:
        raise ValueError(f"transform {str(transform)!r} needs a calibration, got None")
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
    return params, is_peft


def _parse(transform: Transform | str | None) -> Transform | None:
    if transform is None or is_raw(transform):
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
