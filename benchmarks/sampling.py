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

Run: ``OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/sampling.py [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "recipes/demo.yaml"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=24)
    args = ap.parse_args()

    import torch

    from infalign.lm.models import load_model, load_tokenizer
    from infalign.lm.prompts import load_prompts
    from infalign.lm.sampling import sample
    from infalign.run.io import git_commit
    from infalign.run.recipe import load_config

    torch.set_num_threads(1)
    cfg = load_config(args.config)
    model, tok = load_model(cfg.model), load_tokenizer(cfg.model)
    prompts = load_prompts(cfg.prompts.train)
    print(
        f"benchmarks/sampling.py @ {git_commit()}: {cfg.model.name}, {args.new_tokens} new tokens, "
        f"{args.repeats} repeats, load {os.getloadavg()[0]:.2f}"
    )
    for P, M in ((8, 4), (64, 4)):
        rate: dict[str, float] = {}
        tokens: dict[str, int] = {"hf": 0, "native": 0}
        seconds: dict[str, float] = {"hf": 0.0, "native": 0.0}
        wall: dict[str, float] = {"hf": 0.0, "native": 0.0}
        samp = {
            b: dataclasses.replace(
                cfg.sampling, max_new_tokens=args.new_tokens, batch_size=P * M, backend=b
            )
            for b in ("hf", "native")
        }
        for r in range(-1, args.repeats):  # r = -1: warm-up
            for b in ("hf", "native"):
                t0, c0 = time.perf_counter(), time.thread_time()
                g = sample(model, tok, prompts[:P], M, samp[b], seed=max(r, 0), progress=False)
                if r >= 0:
                    seconds[b] += time.thread_time() - c0
                    wall[b] += time.perf_counter() - t0
                    tokens[b] += int(g.num_tokens.sum())
        for b in ("hf", "native"):
            rate[b] = tokens[b] / seconds[b]
            print(
                f"  batch {P * M}: {b:6s} {rate[b]:8.0f} tokens/s "
                f"({tokens[b] / args.repeats / (P * M):.1f} tokens per sample, "
                f"{seconds[b] / args.repeats * 1e3:.1f} ms CPU, "
                f"{wall[b] / args.repeats * 1e3:.1f} ms wall per call)"
            )
        wall_ratio = (tokens["native"] / wall["native"]) / (tokens["hf"] / wall["hf"])
        print(f"  (wall-clock ratio at batch {P * M}: {wall_ratio:.2f})")
        print(f"native/hf tokens/s ratio at batch {P * M}: {rate['native'] / rate['hf']:.2f}")


if __name__ == "__main__":
    main()
