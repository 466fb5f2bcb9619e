"""Run a few CTRL steps on a tiny saved model; launched by tests/rl/test_rl.py under ``accelerate launch``.

Usage (CPU, no MPI): ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 \
       tests/accelerate_train_script.py MODEL_DIR OUT_DIR
       [--steps N] [--bf16] [--algorithm regression]

With ``--algorithm regression`` the trainer regresses on 8 reference samples per prompt (drawn with a
fixed seed, so every process holds the same set) and the main process saves the final parameters to
OUT_DIR/params.pt, so a 2-process run can be compared with a 1-process one.
"""

import argparse
import json
import os
import sys

import torch

torch.set_num_threads(1)

from infalign.core.calibration import EmpiricalCalibration  # noqa: E402
from infalign.lm.models import generate, load_model, load_tokenizer  # noqa: E402
from infalign.lm.scoring import token_logprobs  # noqa: E402
from infalign.rl.algorithms.regression import RegressionTrainer  # noqa: E402
from infalign.rl.algorithms.rloo import RLOOTrainer  # noqa: E402
from infalign.run.config import ModelConfig, RLConfig, SamplingConfig  # noqa: E402
from infalign.run.reference import ReferenceSet  # noqa: E402

PROMPTS = ["The cat", "Human: hi Assistant:", "The weather", "What is", "A good", "We"]


def frac_e(prompts, completions):
    return [[c.count("e") / max(len(c), 1) for c in row] for row in completions]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--algorithm", default="rloo")
    args = ap.parse_args()

    mcfg = ModelConfig(name=args.model_dir, device="cpu")
    policy = load_model(mcfg, trainable=True)
    reference = load_model(mcfg, trainable=False)
    tok = load_tokenizer(mcfg)
    sampling = SamplingConfig(max_new_tokens=6, batch_size=64)
    # every process draws the same reference samples (seeded), so all hold the same calibration
    ref_gen = generate(reference, tok, PROMPTS, 8, sampling, seed=123, progress=False)
    cal = EmpiricalCalibration.fit(torch.tensor(frac_e(PROMPTS, ref_gen.texts)))
    rl = RLConfig(
        steps=args.steps,
        prompts_per_step=4,
        samples_per_prompt=4,
        lr=1e-2,
        beta=0.05,
        grad_accum=2,
        bf16=args.bf16,
        save_every=1,
    )
    if args.algorithm == "regression":
        import dataclasses

        rl = dataclasses.replace(rl, algorithm="regression", lr=3e-3)
        lp = token_logprobs(reference, ref_gen)
        seq = (lp.double() * ref_gen.completion_mask.double()).sum(-1).view(len(PROMPTS), -1)
        n = ref_gen.num_tokens.view(-1)
        ids = ref_gen.completion_ids
        refset = ReferenceSet(
            prompts=PROMPTS,
            completions=ref_gen.texts,
            rewards=torch.tensor(frac_e(PROMPTS, ref_gen.texts), dtype=torch.float32),
            num_tokens=ref_gen.num_tokens,
            token_ids=[
                [ids[p * 8 + k, : int(n[p * 8 + k])].tolist() for k in range(8)] for p in range(6)
            ],
            logprobs=seq,
        )
        trainer: RLOOTrainer | RegressionTrainer = RegressionTrainer(
            policy, reference, tok, refset, cal, "exp:4", rl, sampling, args.out_dir, progress=False
        )
    else:
        trainer = RLOOTrainer(
            policy,
            reference,
            tok,
            PROMPTS,
            frac_e,
            cal,
            "exp:4",
            rl,
            sampling,
            args.out_dir,
            progress=False,
        )
    history = trainer.train()
    acc = trainer.accelerator
    # the update is synchronised: every process holds the same parameters
    flat = torch.cat([p.detach().flatten() for p in acc.unwrap_model(trainer.model).parameters()])
    gathered = acc.gather(flat.unsqueeze(0))
    if acc.is_main_process:
        assert acc.num_processes == int(os.environ.get("WORLD_SIZE", "1"))
        assert torch.equal(gathered[0], gathered[-1]), "parameters differ across processes"
        torch.save(flat, os.path.join(args.out_dir, "params.pt"))
        print(
            "RESULT "
            + json.dumps(
                {
                    "num_processes": acc.num_processes,
                    "mixed_precision": acc.mixed_precision,
                    "history": history,
                }
            )
        )
    # Every collective is done (the gather above). Exit without tearing gloo down: left to
    # interpreter shutdown its threads aborted a rank once ("terminate called without an active
    # exception"), and an explicit barrier + destroy_process_group hung once for 300 s in CI.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
