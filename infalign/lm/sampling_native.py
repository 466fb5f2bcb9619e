"""The ``native`` sampling backend: a decoding loop for small causal LMs on CPU.

Per chunk of ``sampling.batch_size`` rows (seeded ``derive_seed(seed, i)`` through its own
``torch.Generator``): each distinct prompt of the chunk is prefilled once, (U, L), and its keys and
values are copied to its rows in a KV cache preallocated for L + ``sampling.max_new_tokens``
positions; then one batched decoding step per token, (n, 1), until every row has emitted an EOS or
the budget is spent. Each step draws y_t ~ softmax(top_p(top_k(logits / temperature))) (the order and
the rules of transformers' warpers) and records ``log softmax(logits / temperature)[y_t]``.

GPT-2 models (``GPT2LMHeadModel`` with plain ``Conv1D`` layers) run on their own weights through
:class:`_GPT2` (a few fused torch ops per layer, no framework code per token); any other causal LM
(or a peft-wrapped GPT-2) runs through its own forward with a transformers KV cache
(:class:`_HFDecoder`). Positions are ``cumsum(attention_mask) - 1`` as in ``generate`` and the scorer.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from infalign.lm.models import Generation, derive_seed, encode_prompts
from infalign.lm.sampling import check_positions, eos_token_ids, generation_from_tokens
from infalign.lm.scoring import cache_argument, forward_params
from infalign.run.config import SamplingConfig

__all__ = ["draw", "sample", "warp"]

_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")


def warp(z: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Tempered logits z (n, V) truncated by top-k then top-p as transformers' ``TopKLogitsWarper``
    and ``TopPLogitsWarper`` do: -inf outside the k largest, then outside the smallest set of most
    likely tokens whose probability under softmax exceeds top_p (the ascending cumulative probability
    <= 1 - top_p is dropped; the most likely token always stays). z itself when neither applies."""
    V = z.shape[-1]
    if 0 < sampling.top_k < V:
        kth = torch.topk(z, sampling.top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, -math.inf)
    if sampling.top_p < 1.0:
        sz, si = torch.sort(z, dim=-1)
        drop = sz.softmax(-1).cumsum(-1) <= 1 - sampling.top_p
        drop[:, -1] = False
        z = z.masked_fill(drop.scatter(1, si, drop), -math.inf)
    return z


def draw(
    logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row from logits (n, V): z = logits / temperature, p = softmax(warp(z)),
    y = min{i : F_i > u F_V} with F = cumsum(exp(warp(z) - max z)) in float64 and u ~ U[0, 1) (an
    exact inverse-CDF draw from p; a token with p_i = 0 is never drawn). Returns (y (n,) long,
    log softmax(z)[y] (n,) float32: the untruncated tempered log-prob, as the scorer's)."""
    z = logits.float()
    if sampling.temperature != 1.0:
        z = z / sampling.temperature
    m = z.amax(-1, keepdim=True)
    zt = warp(z, sampling)
    cdf = (zt - m).exp_().cumsum(-1, dtype=torch.float64)  # unnormalised
    total = cdf[:, -1:]
    u = torch.rand(len(z), 1, generator=generator, dtype=torch.float64, device=z.device)
    y = torch.searchsorted(cdf, u * total, right=True)
    # u * total rounds to total with probability ~2^-53: then take the last token with p > 0
    y = torch.minimum(y, (cdf < total).sum(-1, keepdim=True))
    if zt is not z:
        total = (z - m).exp().sum(-1, keepdim=True, dtype=torch.float64)
    lp = (z.gather(1, y) - m).double() - total.log()  # log softmax(z)[y]
    return y.squeeze(1), lp.squeeze(1).float()


class _GPT2:
    """GPT-2 decoding on the model's own weights with a preallocated cache (layers, 2, n, H, S, d)."""

    def __init__(self, model: Any) -> None:
        cfg = model.config
        tr = model.transformer
        tanh = cfg.activation_function in _TANH_GELU
        # per block: (ln_1, c_attn, c_proj, ln_2, c_fc, act, mlp c_proj) as plain tensors
        self.blocks = [
            (
                (b.ln_1.weight, b.ln_1.bias, b.ln_1.eps),
                (b.attn.c_attn.weight, b.attn.c_attn.bias),
                (b.attn.c_proj.weight, b.attn.c_proj.bias),
                (b.ln_2.weight, b.ln_2.bias, b.ln_2.eps),
                (b.mlp.c_fc.weight, b.mlp.c_fc.bias),
                (lambda x: F.gelu(x, approximate="tanh")) if tanh else b.mlp.act,
                (b.mlp.c_proj.weight, b.mlp.c_proj.bias),
            )
            for b in tr.h
        ]
        self.wte, self.wpe = tr.wte.weight, tr.wpe.weight
        self.ln_f = (tr.ln_f.weight, tr.ln_f.bias, tr.ln_f.eps)
        self.head = model.lm_head.weight
        self.H = int(cfg.n_head)
        self.scale_attn = bool(cfg.scale_attn_weights)
        self.cache: torch.Tensor | None = None

    @staticmethod
    def supports(model: Any) -> bool:
        from transformers import GPT2LMHeadModel
        from transformers.pytorch_utils import Conv1D

        if type(model) is not GPT2LMHeadModel:
            return False
        cfg = model.config
        if cfg.scale_attn_by_inverse_layer_idx or cfg.reorder_and_upcast_attn:
            return False
        blocks: Any = model.transformer.h
        mods = [m for b in blocks for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)]
        return all(type(m) is Conv1D for m in mods) and type(model.lm_head) is torch.nn.Linear

    def _layers(self, h: torch.Tensor, attend: Any) -> torch.Tensor:
        """h (n, s, E) through every block (Conv1D: y = x W + b, W (in, out));
        ``attend(layer, q, k, v)`` -> (n, H, s, d)."""
        n, s, E = h.shape
        d = E // self.H
        h = h.reshape(n * s, E)
        for i, (ln1, attn, proj, ln2, fc, act, out) in enumerate(self.blocks):
            qkv = torch.addmm(attn[1], torch.layer_norm(h, (E,), *ln1), attn[0])
            q, k, v = qkv.view(n, s, 3, self.H, d).permute(2, 0, 3, 1, 4).unbind(0)
            a = attend(i, q, k, v).transpose(1, 2).reshape(n * s, E)
            h = torch.addmm(h, a, proj[0]).add_(proj[1])
            x = act(torch.addmm(fc[1], torch.layer_norm(h, (E,), *ln2), fc[0]))
            h = torch.addmm(h, x, out[0]).add_(out[1])
        return h.view(n, s, E)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        x = torch.layer_norm(h, (h.shape[-1],), *self.ln_f)
        return (x @ self.head.T).float()

    def prefill(
        self, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, width: int
    ) -> torch.Tensor:
        """Prompts ids, mask (U, L); row r continues prompt ``rows[r]``. Fills cache positions
        [0, L) of the (n, ..., width) cache; returns the next-token logits (n, V)."""
        L = ids.shape[1]
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        h = self.wte[ids] + self.wpe[pos]
        E = h.shape[-1]
        causal = torch.ones(L, L, dtype=torch.bool, device=ids.device).tril()
        eye = torch.eye(L, dtype=torch.bool, device=ids.device)
        allowed = (causal & mask.bool()[:, None, :]) | eye  # (U, L, L); a pad row sees itself
        self.cache = h.new_empty(len(self.blocks), 2, len(rows), self.H, width, E // self.H)
        scale = None if self.scale_attn else 1.0

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            assert self.cache is not None
            self.cache[i, 0, :, :, :L] = k[rows]
            self.cache[i, 1, :, :, :L] = v[rows]
            return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], scale=scale)

        h = self._layers(h, attend)
        return self._logits(h[:, -1])[rows]

    def step(
        self, tok: torch.Tensor, pos: torch.Tensor, t: int, valid: torch.Tensor
    ) -> torch.Tensor:
        """Tokens (n,) at position ids ``pos`` (n,), cache slot t; ``valid`` (n, t + 1) bool keys.
        Returns the next-token logits (n, V)."""
        h = (self.wte[tok] + self.wpe[pos])[:, None]
        cache = self.cache
        assert cache is not None
        # additive key mask (n, 1, 1, t + 1), shared by the layers
        bias = torch.zeros(valid.shape, dtype=h.dtype, device=h.device)
        bias = bias.masked_fill_(~valid, -math.inf)[:, None, None, :]
        scale = 1 / math.sqrt(cache.shape[-1]) if self.scale_attn else 1.0

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            cache[i, 0, :, :, t : t + 1] = k
            cache[i, 1, :, :, t : t + 1] = v
            K, V = cache[i, 0, :, :, : t + 1], cache[i, 1, :, :, : t + 1]
            w = torch.matmul(q * scale, K.transpose(-1, -2)).add_(bias).softmax(-1)
            return torch.matmul(w, V)

        return self._logits(self._layers(h, attend)[:, 0])

    def keep(self, order: torch.Tensor, used: int) -> None:
        """Batch entry j becomes entry ``order[j]`` (k = len(order) entries stay). Only the entries
        that move are copied (slots [0, used)); the cache is then viewed as its first k rows."""
        assert self.cache is not None
        k = len(order)
        moved = (order != torch.arange(k, device=order.device)).nonzero().squeeze(1)
        c = self.cache
        c[:, :, moved, :, :used] = c[:, :, order[moved], :, :used]
        self.cache = c[:, :, :k]


class _HFDecoder:
    """Any causal LM through its own forward and a transformers KV cache (prefilled once per prompt,
    rows selected with ``batch_select_indices``)."""

    def __init__(self, model: Any) -> None:
        params = forward_params(model)
        kw = cache_argument(params)
        if kw is None:
            raise ValueError(
                f"sampling.backend='native': {type(model).__name__}.forward takes no KV cache; "
                "use sampling.backend hf"
            )
        self.model, self.kw = model, kw
        self.cache: Any = None
        self.keep_last = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    def prefill(
        self, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, width: int
    ) -> torch.Tensor:
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **self.keep_last
        )
        self.cache = out[self.kw]
        self.cache.batch_select_indices(rows)
        return out.logits[:, -1].float()[rows]

    def step(
        self, tok: torch.Tensor, pos: torch.Tensor, t: int, valid: torch.Tensor
    ) -> torch.Tensor:
        out = self.model(
            input_ids=tok[:, None],
            attention_mask=valid.long(),
            position_ids=pos[:, None],
            use_cache=True,
            **{self.kw: self.cache},
        )
        self.cache = out[self.kw]
        return out.logits[:, -1].float()

    def keep(self, order: torch.Tensor, used: int) -> None:
        self.cache.batch_select_indices(order)


def _fill_order(done: torch.Tensor) -> torch.Tensor:
    """The k = #(not done) entries that stay, as new order: entry j < k stays in place if it is not
    done, else takes the next unfinished entry from [k, n); so few cache rows move."""
    keep = (~done).nonzero().squeeze(1)
    k = len(keep)
    order = torch.arange(k, device=done.device)
    holes = done[:k].nonzero().squeeze(1)
    order[holes] = keep[keep >= k]
    return order


def _decode_chunk(
    dec: Any,
    ids: torch.Tensor,
    mask: torch.Tensor,
    rows: torch.Tensor,
    sampling: SamplingConfig,
    eos: torch.Tensor,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample completions for n = len(rows) rows continuing prompts ids, mask (U, L).

    Returns (tokens (n, T) long, log-probs (n, T) float32), T <= max_new_tokens; rows stop after
    their first EOS. A finished row leaves the batch at once (:func:`_fill_order`)."""
    n, L, N = len(rows), ids.shape[1], sampling.max_new_tokens
    valid = torch.zeros(n, L + N, dtype=torch.bool, device=ids.device)
    valid[:, :L] = mask[rows].bool()
    pos = mask.sum(-1)[rows]  # position id of the first completion token
    toks = torch.zeros(n, N, dtype=torch.long, device=ids.device)
    lps = torch.zeros(n, N, device=ids.device)
    active = torch.arange(n, device=ids.device)  # row of each batch entry
    done = torch.zeros(n, dtype=torch.bool, device=ids.device)  # per batch entry
    logits = dec.prefill(ids, mask, rows, L + N)
    for t in range(N):
        y, lp = draw(logits, sampling, gen)
        toks[active, t], lps[active, t] = y, lp
        done |= torch.isin(y, eos)
        if t == N - 1 or bool(done.all()):
            return toks[:, : t + 1], lps[:, : t + 1]
        if bool(done.any()):
            order = _fill_order(done)
            dec.keep(order, L + t)
            active, y, pos, done = active[order], y[order], pos[order], done[order]
        valid[active, L + t] = True
        logits = dec.step(y, pos + t, L + t, valid[active, : L + t + 1])
    raise AssertionError("unreachable")


def sample(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    num_samples: int,
    sampling: SamplingConfig,
    seed: int,
    progress: bool = True,
) -> Generation:
    """The ``native`` Sampler (module docstring); inputs checked by :func:`infalign.lm.sampling.sample`.
    Fills ``Generation.logprobs``."""
    eos_ids = eos_token_ids(model, tokenizer)
    enc_ids, enc_mask = encode_prompts(tokenizer, prompts)
    check_positions(model, enc_ids.shape[1], sampling)
    device = next(model.parameters()).device
    eos = torch.tensor(eos_ids, device=device)
    B, M, bs = len(prompts) * num_samples, num_samples, sampling.batch_size
    toks: list[torch.Tensor] = []
    lps: list[torch.Tensor] = []
    was_training = model.training
    model.eval()
    try:
        starts = range(0, B, bs)
        for ci, s in enumerate(tqdm(starts, desc="sample", disable=not progress, leave=False)):
            dec = _GPT2(model) if _GPT2.supports(model) else _HFDecoder(model)
            prompt_of_row = torch.arange(s, min(s + bs, B)) // M
            uniq, rows = torch.unique(prompt_of_row, return_inverse=True)
            mask = enc_mask[uniq]
            first = int((mask.sum(0) > 0).nonzero()[0])  # drop columns that are padding everywhere
            gen = torch.Generator(device=device).manual_seed(derive_seed(seed, ci))
            with torch.inference_mode():
                t, lp = _decode_chunk(
                    dec,
                    enc_ids[uniq, first:].to(device),
                    mask[:, first:].to(device),
                    rows.to(device),
                    sampling,
                    eos,
                    gen,
                )
            toks.append(t.cpu())
            lps.append(lp.cpu())
    finally:
        if was_training:
            model.train()
    return generation_from_tokens(tokenizer, prompts, M, toks, eos_ids, logprobs=lps)
