"""Tiny, offline assets for the pipeline tests and for ``recipes/tiny.yaml``.

``write_tiny_assets(dir)`` writes

    dir/model/        a tiny random GPT-2 (safetensors) and its byte-level BPE tokenizer
    dir/train.jsonl   training prompts  ({"prompt": ...} per line)
    dir/test.jsonl    held-out prompts
    dir/empty.jsonl   no rows (bad input)
    dir/other.jsonl   rows with a "text" column only (missing column)

and returns the paths. Run as a script to make the files ``recipes/tiny.yaml`` points at:

    python tests/tiny_assets.py runs/tiny-assets
    infalign run recipes/tiny.yaml

The rewards below are deterministic functions of the text, used as ``tests/tiny_assets.py:NAME``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

TRAIN_PROMPTS = [
    "The quick brown fox",
    "A good answer is",
    "The cat sat on",
    "How are you today?",
    "Please tell me a story",
    "The weather is",
    "Water boils at",
    "She reads a book",
]
TEST_PROMPTS = [
    "We walked along the river",
    "The small robot learned",
    "Every morning the baker",
    "Music, art and science",
    "The train leaves the station",
    "Birds sing in the trees",
]


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_tiny_assets(out: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write the tiny model, tokenizer and prompt files into ``out``; returns their paths."""
    from fixtures import tiny_causal_lm

    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    model_dir = d / "model"
    if not (model_dir / "config.json").is_file():
        model, tok = tiny_causal_lm(seed=seed)
        model.save_pretrained(model_dir, safe_serialization=True)
        tok.save_pretrained(model_dir)
    return {
        "model": model_dir,
        "train": _write_jsonl(d / "train.jsonl", [{"prompt": p} for p in TRAIN_PROMPTS]),
        "test": _write_jsonl(d / "test.jsonl", [{"prompt": p} for p in TEST_PROMPTS]),
        "empty": _write_jsonl(d / "empty.jsonl", []),
        "other": _write_jsonl(d / "other.jsonl", [{"text": p} for p in TEST_PROMPTS]),
    }


RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"
REWARD = f"{Path(__file__).resolve()}:vowel_reward"


def tiny_overrides(assets: dict[str, Path], out: str | Path, **extra: object) -> dict[str, object]:
    """Overrides (dotted key -> value; paths as strings) that point ``recipes/tiny.yaml`` at the
    assets of ``write_tiny_assets`` and at ``out``, plus ``extra`` (which may replace any of them)."""
    over: dict[str, object] = {
        "model.name": str(assets["model"]),
        "prompts.train.source": str(assets["train"]),
        "prompts.test.source": str(assets["test"]),
        "reward.name": REWARD,
        "out": str(out),
    }
    return {**over, **extra}


def recipe_overrides(assets: dict[str, Path], out: str | Path, **extra: object) -> list[str]:
    """:func:`tiny_overrides` as CLI ``--key value`` tokens."""
    return [
        tok for k, v in tiny_overrides(assets, out, **extra).items() for tok in (f"--{k}", str(v))
    ]


def _score(c: str) -> float:
    """Vowel density plus a small length term: few ties, a smooth target for a tiny model."""
    vowels = sum(ch in "aeiou" for ch in c.lower())
    return vowels / (1.0 + len(c)) + 0.01 * len(c)


def vowel_reward(prompts: list[str], completions: list[list[str]]) -> list[list[float]]:
    """(P, M) deterministic reward of every completion."""
    return [[_score(c) for c in group] for group in completions]


def nan_reward(prompts: list[str], completions: list[list[str]]) -> list[list[float]]:
    """Like ``vowel_reward`` but NaN for the first completion of the first prompt (bad input)."""
    out = vowel_reward(prompts, completions)
    out[0][0] = float("nan")
    return out


GATE = "[[gate]]"


def gated_vowel_reward(prompts: list[str], completions: list[list[str]]) -> Any:
    """``vowel_reward`` as a float64 array (not float32-exact, unlike the artifact's rewards); a call
    with a completion containing ``GATE`` first reads one line from the FIFO named by
    ``$INFALIGN_TEST_GATE`` (a test holds a request in flight until it writes there)."""
    import numpy as np

    if any(GATE in c for group in completions for c in group):
        with open(os.environ["INFALIGN_TEST_GATE"], encoding="utf-8") as fifo:
            fifo.readline()
    return np.asarray(vowel_reward(prompts, completions), dtype=np.float64)


# switched on by tests through the module (import it as ``tiny_assets``, reward ``tiny_assets:...``)
FAULTS: dict[str, int | bool | None] = {"interrupt_after": None, "nan": False, "signal": None}


def faulty_reward(prompts: list[str], completions: list[list[str]]) -> list[list[float]]:
    """``vowel_reward`` with faults: after ``FAULTS["interrupt_after"]`` more calls the next one
    raises KeyboardInterrupt (once), or sends signal ``FAULTS["signal"]`` to this process if set;
    ``FAULTS["nan"]`` makes the first reward NaN."""
    left = FAULTS["interrupt_after"]
    if isinstance(left, int) and not isinstance(left, bool):
        FAULTS["interrupt_after"] = left - 1
        if left <= 0:
            FAULTS["interrupt_after"] = None
            sig = FAULTS["signal"]
            if sig is None:
                raise KeyboardInterrupt
            os.kill(os.getpid(), int(sig))
    out = vowel_reward(prompts, completions)
    if FAULTS["nan"]:
        out[0][0] = float("nan")
    return out


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else "runs/tiny-assets"
    for name, path in write_tiny_assets(target).items():
        print(f"{name:6s} {path}")
