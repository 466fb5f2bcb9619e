"""The optimizer and the ``accelerate`` setup every trainer (and the convergence tests) shares."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from infalign.run.config import RLConfig

__all__ = ["make_accelerator", "make_optimizer"]

log = logging.getLogger(__name__)


def make_accelerator(rl: RLConfig, accelerator: Any | None = None) -> Any:
    """An ``accelerate.Accelerator`` for ``rl`` (gradient accumulation over ``rl.grad_accum``
    micro-batches, bf16 when ``rl.bf16`` and supported, the scheduler stepped by the trainer), or
    the given one after checking it agrees; also refuses launches whose processes would not talk."""
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
    return accelerator


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
