"""The Sampler seam: every completion infalign samples (reference, RL rollouts, evaluation, BoN / WoN
decoding) comes from :func:`sample`, which runs the backend named by ``sampling.backend``.

A Sampler is a callable ``(model, tokenizer, prompts, num_samples, sampling, seed, progress) ->
Generation``: M = ``num_samples`` completions for each of the P prompts, rows ordered ``p * M + m``,
drawn by pure ancestral sampling from pi(. | x, y_<t) ** (1 / temperature), truncated by
``sampling.top_k`` (0: off) and ``sampling.top_p`` (1: off), at most ``sampling.max_new_tokens``
tokens, stopping at the first EOS (kept in the completion mask; pad after it). A backend that has
the sampling log-probs fills ``Generation.logprobs`` (B, T): ``log softmax(logits / temperature)``
of each sampled token (the untruncated tempered distribution, as
:func:`infalign.lm.scoring.token_logprobs` computes it), 0 after the end.

Backends (``sampling.backend``):
    ``hf``      transformers' ``generate`` (this module; the default)
    ``native``  :mod:`infalign.lm.sampling_native`: a decoding loop for small models on CPU
    ``vllm``    :mod:`infalign.lm.sampling_vllm`: vLLM (an optional extra)

A backend module other than this one defines ``sample`` with the Sampler signature; it receives
inputs already checked by :func:`sample` and may use :func:`generation_from_tokens` to build its
output. Results depend only on (prompts, M, sampling, seed): chunk i of ``sampling.batch_size``
rows is seeded with ``derive_seed(seed, i)`` and the global RNG state is left untouched.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from infalign.lm.models import Generation, derive_seed, encode_prompts
from infalign.lm.prompts import check_prompt_list
from infalign.run.config import SAMPLING_BACKENDS, SamplingConfig

__all__ = [
    "Sampler",
    "check_request",
    "completion_mask",
    "eos_token_ids",
    "generation_from_tokens",
    "hf_sample",
    "make_sampler",
    "sample",
    "sampler_logprobs",
]


class _NoPaddingFalseAlarm(logging.Filter):
    """Drops transformers' "We strongly recommend passing in an `attention_mask`" warning. ``generate``
    itself drops an all-ones mask (a chunk whose prompts have equal length); once a row has finished,
    its pad (= EOS) token then trips GPT-2's padding check, though nothing is padded. The mask is
    always passed (``hf_sample``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "passing in an `attention_mask`" not in record.getMessage()


logging.getLogger("transformers.modeling_utils").addFilter(_NoPaddingFalseAlarm())

# backend -> (module, attribute); modules are imported only when their backend is asked for
_REGISTRY: dict[str, tuple[str, str]] = {
    "hf": (__name__, "hf_sample"),
    "native": ("infalign.lm.sampling_native", "sample"),
    "vllm": ("infalign.lm.sampling_vllm", "sample"),
}
assert tuple(_REGISTRY) == SAMPLING_BACKENDS


class Sampler(Protocol):
    def __call__(
        self,
        model: Any,
        tokenizer: Any,
        prompts: list[str],
        num_samples: int,
        sampling: SamplingConfig,
        seed: int,
        progress: bool = True,
    ) -> Generation: ...


def make_sampler(sampling: SamplingConfig) -> Sampler:
    """The Sampler of ``sampling.backend`` (its module imported now). ValueError naming the key for
    an unknown backend, or for one whose module or extra cannot be imported (with the install
    hint)."""
    sampling.validate("sampling")
    module, attr = _REGISTRY[sampling.backend]
    try:
        mod = importlib.import_module(module)
    except ImportError as err:
        raise ValueError(
            f"config sampling.backend={sampling.backend!r}: cannot import {module} ({err}); "
            f"pip install 'infalign[{sampling.backend}]'"
        ) from err
    sampler: Sampler = getattr(mod, attr)
    return sampler


def sample(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    num_samples: int,
    sampling: SamplingConfig,
    seed: int,
    progress: bool = True,
) -> Generation:
    """Sample M = ``num_samples`` completions for each of the P ``prompts`` with the backend of
    ``sampling.backend`` (see the module docstring). Returns a Generation of B = P * M rows."""
    prompts = check_request(model, tokenizer, prompts, num_samples, sampling)
    return make_sampler(sampling)(
        model, tokenizer, prompts, num_samples, sampling, seed=seed, progress=progress
    )


def sampler_logprobs(model: Any, gen: Generation, sampling: SamplingConfig) -> torch.Tensor:
    """(B, T) ``log pi(y_t | x, y_<t)`` at ``sampling.temperature`` of ``gen``'s tokens under
    ``model``, the model that sampled ``gen``: the sampler's own ``gen.logprobs`` when it has them,
    else :func:`infalign.lm.scoring.token_logprobs` (0 after each completion's end either way)."""
    from infalign.lm.scoring import token_logprobs

    if gen.logprobs is not None:
        return gen.logprobs
    return token_logprobs(
        model, gen, temperature=sampling.temperature, micro_batch_size=sampling.batch_size
    )


def check_request(
    model: Any, tokenizer: Any, prompts: list[str], num_samples: int, sampling: SamplingConfig
) -> list[str]:
    """The prompts as a list; ValueError naming the argument for a bad request, before any
    sampling starts."""
    prompts = check_prompt_list(prompts)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples={num_samples!r}: must be an integer >= 1")
    sampling.validate("sampling")
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer has no pad token; load it with load_tokenizer")
    eos_token_ids(model, tokenizer)
    return prompts


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """The EOS ids of the model's generation config and of the tokenizer (deduplicated, in order)."""
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


def check_positions(model: Any, prompt_length: int, sampling: SamplingConfig) -> None:
    """ValueError if L + ``sampling.max_new_tokens`` exceeds the model's position table."""
    cfg = getattr(model, "config", None)
    n_pos = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
    if n_pos is not None and prompt_length + sampling.max_new_tokens > n_pos:
        raise ValueError(
            f"prompt length {prompt_length} + sampling.max_new_tokens={sampling.max_new_tokens} "
            f"exceeds the model's {n_pos} positions"
        )


def completion_mask(
    completion: torch.Tensor, eos_ids: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask (B, T) float: 1 up to and including the first EOS, finished (B,) bool)."""
    is_eos = torch.isin(completion, torch.tensor(eos_ids, device=completion.device))
    # number of EOS strictly before position t: 0 means t is at or before the first EOS
    before = torch.cumsum(is_eos.long(), dim=-1) - is_eos.long()
    return (before == 0).float(), is_eos.any(dim=-1)


def generation_from_tokens(
    tokenizer: Any,
    prompts: list[str],
    num_samples: int,
    chunks: list[torch.Tensor],
    eos_ids: list[int],
    logprobs: list[torch.Tensor] | None = None,
) -> Generation:
    """A Generation from the sampled completion tokens, given as row chunks (B_i, T_i) in row order
    (tokens after the first EOS are ignored; widths may differ). ``logprobs``: matching (B_i, T_i)
    per-token sampling log-probs, or None. Prompts are encoded as :func:`encode_prompts` does.

    Returns input_ids (B, L + T) = [left-padded prompt | completion, pad after its first EOS],
    attention_mask, completion_mask (B, T), finished (B,), texts (P x M, special tokens skipped).
    """
    pad_id = int(tokenizer.pad_token_id)
    enc_ids, enc_mask = encode_prompts(tokenizer, prompts)
    M = num_samples
    ids, mask = enc_ids.repeat_interleave(M, dim=0), enc_mask.repeat_interleave(M, dim=0)
    B, L = ids.shape
    T = max(c.shape[1] for c in chunks)
    completion = torch.full((B, T), pad_id, dtype=torch.long)
    cmask = torch.zeros(B, T)
    lp = torch.zeros(B, T) if logprobs is not None else None
    finished = torch.zeros(B, dtype=torch.bool)
    row = 0
    for i, c in enumerate(chunks):
        c = c.cpu()
        n, t = c.shape
        m, f = completion_mask(c, eos_ids)
        completion[row : row + n, :t] = torch.where(m.bool(), c, torch.full_like(c, pad_id))
        cmask[row : row + n, :t] = m
        finished[row : row + n] = f
        if lp is not None and logprobs is not None:
            lp[row : row + n, :t] = logprobs[i].cpu().float() * m
        row += n
    if row != B:
        raise ValueError(f"sampled {row} rows, expected P * M = {B}")
    flat = tokenizer.batch_decode(
        [completion[b, : int(cmask[b].sum())].tolist() for b in range(B)],
        skip_special_tokens=True,
    )
    return Generation(
        input_ids=torch.cat([ids, completion], dim=1),
        attention_mask=torch.cat([mask, cmask.long()], dim=1),
        prompt_length=L,
        completion_mask=cmask,
        texts=[flat[p * M : (p + 1) * M] for p in range(len(prompts))],
        finished=finished,
        prompts=list(prompts),
        logprobs=lp,
    )


def hf_sample(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    num_samples: int,
    sampling: SamplingConfig,
    seed: int,
    progress: bool = True,
) -> Generation:
    """The ``hf`` backend: transformers' ``model.generate`` on chunks of ``sampling.batch_size``
    rows (each prompt repeated M times), with a clean GenerationConfig (the model's own defaults,
    e.g. top_k or repetition_penalty, do not leak in). ``Generation.logprobs`` is left None."""
    from transformers import GenerationConfig

    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = int(tokenizer.pad_token_id)
    device = next(model.parameters()).device
    enc_ids, enc_mask = encode_prompts(tokenizer, prompts)
    check_positions(model, enc_ids.shape[1], sampling)
    ids = enc_ids.repeat_interleave(num_samples, dim=0)
    mask = enc_mask.repeat_interleave(num_samples, dim=0)
    gen_cfg = GenerationConfig(
        do_sample=True,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
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
    L = ids.shape[1]
    try:
        starts = range(0, ids.shape[0], bs)
        for ci, s in enumerate(tqdm(starts, desc="generate", disable=not progress, leave=False)):
            fork_devs = [device.index or 0] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=fork_devs), torch.no_grad():
                torch.manual_seed(derive_seed(seed, ci))
                out = model.generate(
                    input_ids=ids[s : s + bs].to(device),
                    attention_mask=mask[s : s + bs].to(device),
                    generation_config=gen_cfg,
                )
            seqs = out if isinstance(out, torch.Tensor) else out.sequences
            chunks.append(seqs[:, L:].cpu())
    finally:
        base.generation_config = saved_gen_cfg
        if was_training:
            model.train()
    return generation_from_tokens(tokenizer, prompts, num_samples, chunks, eos_ids)
