"""Sampling throughput: the ``native`` backend vs ``hf`` (transformers' generate) on the default model.

The model is ``recipes/demo.yaml``'s (the shipped 4.2M-parameter GPT-2, ``infalign/assets/reference_lm``)
with the demo's sampling (temperature 1, top-p 1, no top-k, EOS stops a row) and 24 new tokens. Two
batches: 32 rows (8 prompts x 4 samples, the RL step's batch) and 256 rows (64 prompts x 4 samples),
each in one chunk (``sampling.batch_size`` = rows). Per backend and batch: ``--repeats`` calls after
one untimed warm-up, alternating hf / native, seeds 0, 1, ...; tokens/s = completion tokens (EOS
included, from the completion masks) / seconds, pooled over the repeats. The samples differ between
the backends (different random streams), so tokens/s, not seconds, is compared. Seconds are the
thread's CPU time (one torch thread, so equal to wall time on an idle machine, and far less noisy on
a shared one); the wall-clock ratio is printed too.

Prints ``native/hf tokens/s ratio at batch 32: X`` and the same at 256. One torch thread.

At batch 32 it also times ``generate`` as TRL's ``RLOOTrainer`` calls it (tokenize without special
tokens, ``model.generate`` with TRL's generation config, ``batch_decode``) and prints
``hf/plain-generate seconds per call at batch 32: X`` (seconds, not tokens/s: both decode every
row until all have finished, so their cost hardly depends on the sampled lengths): the cost of
infalign's ``hf`` path around the same ``generate`` (the issue asked why infalign's generate took
0.342 s/step against TRL's 0.288 s).

``--profile`` then runs ``native`` at batch 32 ``--repeats`` more times under ``torch.profiler`` and
prints the ops by self CPU time: where the time goes that hf also spends (the matrix products).

Run: ``OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/sampling.py [--repeats 5] [--profile]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _infalign(model: Any, tok: Any, prompts: list[str], M: int, sp: Any, seed: int) -> int:
    """infalign's Sampler (``sp.backend``); returns the completion tokens (EOS included)."""
    from infalign.lm.sampling import sample

    return int(sample(model, tok, prompts, M, sp, seed=seed, progress=False).num_tokens.sum())


def _plain_generate(model: Any, tok: Any, prompts: list[str], M: int, new: int, seed: int) -> int:
    """TRL's generation path on P prompts x M samples; returns the completion tokens (EOS incl.)."""
    import torch
    from transformers import GenerationConfig

    from infalign.lm.models import derive_seed
    from infalign.lm.sampling import completion_mask, eos_token_ids

    eos = eos_token_ids(model, tok)
    cfg = GenerationConfig(
        max_new_tokens=new,
        do_sample=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=eos,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        disable_compile=True,
    )
    rows = [p for p in prompts for _ in range(M)]
    enc = tok(rows, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(derive_seed(seed, 0))
        out = model.generate(**enc, generation_config=cfg)
    comp = out[:, enc.input_ids.shape[1] :]
    tok.batch_decode(comp, skip_special_tokens=True)
    return int(completion_mask(comp, eos)[0].sum())


def _measure(fns: dict[str, Any], repeats: int) -> dict[str, tuple[int, float, float]]:
    """name -> (tokens, thread CPU seconds, wall seconds) over ``repeats`` calls ``fn(seed)`` after
    one warm-up, alternating the names each repeat."""
    out = {name: (0, 0.0, 0.0) for name in fns}
    for r in range(-1, repeats):  # r = -1: warm-up
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.thread_time()
            n = fn(max(r, 0))
            if r >= 0:
                tk, cpu, wall = out[name]
                out[name] = (tk + n, cpu + time.thread_time() - c0, wall + time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "recipes/demo.yaml"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--profile", action="store_true", help="profile native at batch 32 after")
    args = ap.parse_args()

    import torch

    from infalign.lm.models import load_model, load_tokenizer
    from infalign.lm.prompts import load_prompts
    from infalign.run.io import git_commit
    from infalign.run.recipe import load_config

    torch.set_num_threads(1)
    cfg = load_config(args.config)
    model, tok = load_model(cfg.model), load_tokenizer(cfg.model)
    prompts = load_prompts(cfg.prompts.train)
    new = args.new_tokens
    print(
        f"benchmarks/sampling.py @ {git_commit()}: {cfg.model.name}, {new} new tokens, "
        f"{args.repeats} repeats, load {os.getloadavg()[0]:.2f}"
    )
    for P, M in ((8, 4), (64, 4)):
        ps = prompts[:P]
        fns: dict[str, Any] = {}
        for b in ("hf", "native"):
            sp = dataclasses.replace(cfg.sampling, max_new_tokens=new, batch_size=P * M, backend=b)
            fns[b] = functools.partial(_infalign, model, tok, ps, M, sp)
        if P * M == 32:
            fns["plain-generate"] = functools.partial(_plain_generate, model, tok, ps, M, new)
        res = _measure(fns, args.repeats)
        rate = {name: tk / cpu for name, (tk, cpu, _) in res.items()}
        for name, (tk, cpu, wall) in res.items():
            print(
                f"  batch {P * M}: {name:14s} {rate[name]:6.0f} tokens/s ({tk / args.repeats / (P * M):.1f}"
                f" tokens per sample, {cpu / args.repeats * 1e3:.1f} ms CPU, "
                f"{wall / args.repeats * 1e3:.1f} ms wall per call)"
            )
        wall_rate = {name: tk / wall for name, (tk, _, wall) in res.items()}
        print(f"  (wall-clock ratio: {wall_rate['native'] / wall_rate['hf']:.2f})")
        print(f"native/hf tokens/s ratio at batch {P * M}: {rate['native'] / rate['hf']:.2f}")
        if "plain-generate" in res:  # both run every row to the end: compare seconds per call
            r = res["hf"][1] / res["plain-generate"][1]
            print(f"hf/plain-generate seconds per call at batch {P * M}: {r:.2f}")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        sp = dataclasses.replace(cfg.sampling, max_new_tokens=new, batch_size=32, backend="native")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for seed in range(args.repeats):
                _infalign(model, tok, prompts[:8], 4, sp, seed)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
