"""Token log-probs of sampled completions under a causal LM (policy or reference).

Shapes as in :mod:`infalign.lm.models`: a :class:`~infalign.lm.models.Generation` of B = P * M rows, L the
padded prompt width (left padding), T the completion width. Each prompt of a P x M batch goes through
the model once and its KV cache serves its M completions (prefix sharing).
"""

from __future__ import annotations

import inspect
from typing import Any, Literal, overload

import torch

from infalign.lm.models import Generation

__all__ = ["cache_argument", "forward_params", "token_logprobs"]


def forward_params(model: Any) -> set[str]:
    """The parameter names of the (base) model's ``forward``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return set(inspect.signature(base.forward).parameters)
    except (TypeError, ValueError):
        return set()


def cache_argument(params: set[str]) -> str | None:
    """The KV-cache argument of a forward with these parameters (also the output's key): ``cache`` in
    transformers 5, ``past_key_values`` before; None if it takes none."""
    return next((k for k in ("cache", "past_key_values") if k in params), None)


def _shared_prompts(gen: Generation) -> int:
    """M if the rows come in groups of M = ``gen.num_samples`` > 1 sharing one (padded) prompt, else 1."""
    M, L = gen.num_samples, gen.prompt_length
    if M < 2 or L < 1 or gen.input_ids.shape[0] != M * gen.num_prompts:
        return 1
    for t in (gen.input_ids[:, :L], gen.attention_mask[:, :L]):
        g = t.reshape(gen.num_prompts, M, L)
        if not torch.equal(g, g[:, :1].expand_as(g)):
            return 1
    return M


def _logits(
    model: Any,
    ids: torch.Tensor,
    am: torch.Tensor,
    L: int,
    T: int,
    M: int,
    keep: bool,
    cache_kw: str | None,
) -> torch.Tensor:
    """(B, T, V) logits predicting the completion tokens ``ids[:, L:]`` (B = P * M rows).

    M > 1 (prefix sharing, for a model whose forward takes a KV cache as ``cache_kw``): the prompt
    of each group of M rows is run once, (P, L), with the cache; the cache is repeated M times and
    the completion, minus its last token, runs on it, (B, T - 1). The logit at the last prompt
    position comes from the prompt pass. Same values as one pass over (B, L + T), with (B - P) L
    fewer tokens through the model (forward and backward).
    """
    pos = (am.long().cumsum(-1) - 1).clamp(min=0)
    if M > 1 and cache_kw is not None:
        pre = model(
            input_ids=ids[::M, :L],
            attention_mask=am[::M, :L],
            position_ids=pos[::M, :L],
            use_cache=True,
            **({"logits_to_keep": 1} if keep else {}),
        )
        first = pre.logits[:, -1:].repeat_interleave(M, dim=0)  # (B, 1, V)
        if T == 1:
            return first
        cache = pre[cache_kw]
        if hasattr(cache, "batch_repeat_interleave"):  # a transformers Cache
            cache.batch_repeat_interleave(M)
        else:  # legacy tuple of (key, value) per layer (older transformers)
            cache = tuple(tuple(t.repeat_interleave(M, dim=0) for t in layer) for layer in cache)
        rest = model(
            input_ids=ids[:, L : L + T - 1],
            attention_mask=am[:, : L + T - 1],
            position_ids=pos[:, L : L + T - 1],
            use_cache=True,
            **{cache_kw: cache},
        ).logits  # (B, T - 1, V)
        return torch.cat([first, rest], dim=1)
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": am, "position_ids": pos}
    if keep:
        kwargs["logits_to_keep"] = T + 1
    return model(**kwargs, use_cache=False).logits[:, -(T + 1) : -1]


@overload
def token_logprobs(
    model: Any,
    gen: Generation,
    temperature: float = ...,
    grad: bool = ...,
    micro_batch_size: int | None = ...,
    with_entropy: Literal[False] = ...,
) -> torch.Tensor: ...


@overload
def token_logprobs(
    model: Any,
    gen: Generation,
    temperature: float = ...,
    grad: bool = ...,
    micro_batch_size: int | None = ...,
    *,
    with_entropy: Literal[True],
) -> tuple[torch.Tensor, torch.Tensor]: ...


def token_logprobs(
    model: Any,
    gen: Generation,
    temperature: float = 1.0,
    grad: bool = False,
    micro_batch_size: int | None = None,
    with_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log pi(y_t | x, y_<t) / temperature-scaled, for every completion token.

    The forward runs over ``gen.input_ids`` (B, L + T) with the attention mask and position ids
    ``cumsum(mask) - 1`` (exact under left padding); when the rows are P prompts x M samples, each
    prompt goes through the model once and its KV cache serves its M completions (``_logits``).
    Then logits / temperature, ``log_softmax`` in float32, gather. The sequence log-prob is
    ``(out * gen.completion_mask).sum(-1)``.

    Args:
        grad: keep the graph (policy loss); otherwise runs under ``torch.no_grad``.
        micro_batch_size: rows per forward pass (None: all B at once; rounded down to a multiple of
            M, at least M, when prompts are shared).
        with_entropy: also return the per-token entropy (B, T) of the same tempered distribution.

    Returns:
        (B, T) float32 on the model's device, 0 where ``completion_mask == 0``
        (and the (B, T) entropy, also zeroed there, when ``with_entropy``). The model's train/eval
        mode is not changed.
    """
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r}: must be > 0")
    device = next(model.parameters()).device
    B, LT = gen.input_ids.shape
    L = gen.prompt_length
    T = LT - L
    if T < 1:
        raise ValueError(f"generation has no completion tokens (width {LT}, prompt_length {L})")
    mb = B if not micro_batch_size else int(micro_batch_size)
    if mb < 1:
        raise ValueError(f"micro_batch_size={micro_batch_size!r}: must be >= 1")
    params = forward_params(model)
    keep = "logits_to_keep" in params
    cache_kw = cache_argument(params)
    M = _shared_prompts(gen) if cache_kw is not None else 1
    mb = max(M, mb // M * M)
    outs: list[torch.Tensor] = []
    ents: list[torch.Tensor] = []
    ctx = torch.enable_grad() if grad else torch.no_grad()
    with ctx:
        for s in range(0, B, mb):
            ids = gen.input_ids[s : s + mb].to(device)
            am = gen.attention_mask[s : s + mb].to(device)
            cm = gen.completion_mask[s : s + mb].to(device)
            logits = _logits(model, ids, am, L, T, M, keep, cache_kw).float() / temperature
            logp = torch.log_softmax(logits, dim=-1)
            targets = ids[:, L:].unsqueeze(-1)
            lp = torch.gather(logp, -1, targets).squeeze(-1)
            outs.append(torch.where(cm > 0, lp, torch.zeros_like(lp)))
            if with_entropy:
                ent = -(logp.exp() * logp).sum(-1).detach()
                ents.append(torch.where(cm > 0, ent, torch.zeros_like(ent)))
    out = torch.cat(outs, dim=0)
    if with_entropy:
        return out, torch.cat(ents, dim=0)
    return out
