"""The Sampler seam (infalign.lm.sampling): the hf and native backends give the same layout, the native
backend's log-probs equal the scorer's, its samples follow hf's distribution (and the exact one), and
a seed reproduces a run."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch
from fixtures import tiny_causal_lm, tiny_llama_lm
from scipy import stats

from infalign.lm import sampling_native
from infalign.lm.sampling import make_sampler, sample
from infalign.lm.scoring import token_logprobs
from infalign.run.config import SamplingConfig
from infalign.run.recipe import from_dict

PROMPTS = ["The cat", "Human: What is two plus two? Assistant:", "x"]
BACKENDS = ["hf", "native"]


def _eos_heavy(seed: int = 0, logit: float = 4.0):
    """The tiny GPT-2 with a constant +``logit`` on EOS (through one feature of the final layer
    norm), so rows finish at many different steps (about 1 in 5 per step)."""
    model, tok = tiny_causal_lm(seed=seed)
    with torch.no_grad():
        ln, head = model.transformer.ln_f, model.lm_head.weight
        ln.weight[0], ln.bias[0] = 0.0, 1.0
        head[:, 0] = 0.0
        head[tok.eos_token_id, 0] = logit
    return model, tok


@pytest.fixture(scope="module")
def eos_heavy():
    return _eos_heavy()


@pytest.fixture(scope="module", params=BACKENDS)
def gen(request, tiny_lm):
    model, tok = tiny_lm
    s = SamplingConfig(max_new_tokens=40, batch_size=4, backend=request.param)
    return sample(model, tok, PROMPTS, 6, s, seed=1, progress=False)


def test_generation_layout(tiny_lm, gen):
    """Both backends: rows p * M + m, left-padded prompts, the completion mask up to and including
    the first EOS, pad after it, finished flags, decoded texts."""
    _, tok = tiny_lm
    B, LT = gen.input_ids.shape
    assert B == len(PROMPTS) * 6 and gen.num_prompts == 3 and gen.num_samples == 6
    L = gen.prompt_length
    T = LT - L
    assert gen.completion_mask.shape == (B, T) and T <= 40
    assert gen.num_tokens.shape == (3, 6) and gen.num_tokens.dtype == torch.long
    enc = tok(PROMPTS[1], add_special_tokens=False).input_ids
    assert gen.input_ids[6, L - len(enc) : L].tolist() == enc
    assert gen.attention_mask[6, : L - len(enc)].sum() == 0
    comp = gen.completion_ids
    eos = tok.eos_token_id
    assert gen.finished is not None and gen.finished.any() and not gen.finished.all()
    for b in range(B):
        n = int(gen.completion_mask[b].sum())
        assert gen.completion_mask[b, :n].eq(1).all() and gen.completion_mask[b, n:].eq(0).all()
        assert gen.attention_mask[b, L:].tolist() == gen.completion_mask[b].long().tolist()
        first = (comp[b] == eos).nonzero()
        if len(first):
            assert gen.finished[b] and n == int(first[0]) + 1
        else:
            assert not gen.finished[b] and n == 40
        assert comp[b, n:].eq(tok.pad_token_id).all()
        p, m = divmod(b, 6)
        assert gen.texts[p][m] == tok.decode(comp[b, :n], skip_special_tokens=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_reproduces_a_run(tiny_lm, backend):
    model, tok = tiny_lm
    s = SamplingConfig(max_new_tokens=20, batch_size=4, backend=backend)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = sample(model, tok, PROMPTS, 6, s, seed=1, progress=False)
    assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched
    b = sample(model, tok, PROMPTS, 6, s, seed=1, progress=False)
    assert torch.equal(a.input_ids, b.input_ids) and a.texts == b.texts
    other = sample(model, tok, PROMPTS, 6, s, seed=2, progress=False)
    assert other.texts != a.texts


def _lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(
        model, LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False)
    )


@pytest.mark.parametrize("arch", ["gpt2", "gpt2-lora", "llama"])
@pytest.mark.parametrize(
    "over", [{}, {"temperature": 1.3, "top_k": 50, "top_p": 0.95}], ids=["plain", "truncated"]
)
def test_native_logprobs_equal_the_scorer(arch, over):
    """GPT-2 on its own weights, and any model through its forward (a peft-wrapped GPT-2, a Llama):
    the reported log-probs equal token_logprobs at the sampling temperature to 1e-5, with rows that
    end at many different steps (chunks of 5 rows cut prompts' M = 6 samples apart)."""
    model, tok = _eos_heavy(seed=2)
    if arch == "gpt2-lora":
        model = _lora(model)
    elif arch == "llama":
        model = tiny_llama_lm(tok, seed=2)
    s = SamplingConfig(max_new_tokens=16, batch_size=5, backend="native", **over)
    g = sample(model, tok, PROMPTS, 6, s, seed=3, progress=False)
    lp = token_logprobs(model, g, temperature=s.temperature)
    assert g.logprobs is not None and g.logprobs.shape == lp.shape
    torch.testing.assert_close(g.logprobs, lp, atol=1e-5, rtol=0)
    assert g.logprobs[g.completion_mask == 0].eq(0).all()
    if arch != "llama":
        n = g.num_tokens.flatten()
        assert len(set(n.tolist())) >= 5 and g.finished.float().mean() > 0.5


def test_native_gpt2_path_equals_the_model_forward_path(eos_heavy, monkeypatch):
    """The same seed gives the same tokens through GPT-2's own weights and through model.forward."""
    model, tok = eos_heavy
    s = SamplingConfig(max_new_tokens=16, batch_size=7, backend="native", top_p=0.95)
    fast = sample(model, tok, PROMPTS, 6, s, seed=4, progress=False)
    assert sampling_native._GPT2.supports(model)
    monkeypatch.setattr(sampling_native._GPT2, "supports", staticmethod(lambda m: False))
    slow = sample(model, tok, PROMPTS, 6, s, seed=4, progress=False)
    assert torch.equal(fast.input_ids, slow.input_ids)
    torch.testing.assert_close(fast.logprobs, slow.logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "over",
    [{"top_k": 5}, {"top_p": 0.7}, {"top_k": 50, "top_p": 0.9}, {"top_p": 0.05}, {"top_p": 1e-9}],
)
def test_warp_matches_transformers_warpers(over):
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    s = SamplingConfig(**over)
    z = torch.randn(64, 300, generator=torch.Generator().manual_seed(0)) * 3
    want = z.clone()
    if s.top_k:
        want = TopKLogitsWarper(top_k=s.top_k)(None, want)
    if s.top_p < 1:
        want = TopPLogitsWarper(top_p=s.top_p)(None, want)
    got = sampling_native.warp(z, s)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert torch.equal(got[~torch.isinf(got)], z[~torch.isinf(got)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_model_generation_defaults_do_not_leak(tiny_lm, backend):
    """Model-level top_k / repetition_penalty must not leak into sampling from pi."""
    _, tok = tiny_lm
    model, _ = tiny_causal_lm(seed=0)
    s = SamplingConfig(max_new_tokens=12, batch_size=64, backend=backend)
    clean = sample(model, tok, PROMPTS, 4, s, seed=5, progress=False)
    model.generation_config.top_k = 2
    model.generation_config.repetition_penalty = 3.0
    leaky = sample(model, tok, PROMPTS, 4, s, seed=5, progress=False)
    assert torch.equal(clean.input_ids, leaky.input_ids)
    assert model.generation_config.top_k == 2  # restored


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_mode_is_restored(tiny_lm, backend):
    model, tok = tiny_lm
    model.train()
    try:
        s = SamplingConfig(max_new_tokens=3, backend=backend)
        sample(model, tok, ["a"], 2, s, seed=0, progress=False)
        assert model.training
    finally:
        model.eval()


def test_bad_input(tiny_lm):
    model, tok = tiny_lm
    s = SamplingConfig(max_new_tokens=3)
    with pytest.raises(ValueError, match="num_samples"):
        sample(model, tok, ["a"], 0, s, seed=0)
    with pytest.raises(ValueError, match="prompts"):
        sample(model, tok, [], 2, s, seed=0)
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        sample(model, tok, ["a", 3], 2, s, seed=0)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="temperature"):
        sample(model, tok, ["a"], 2, SamplingConfig(temperature=0.0), seed=0)
    with pytest.raises(ValueError, match="positions"):
        sample(model, tok, ["a"], 2, SamplingConfig(max_new_tokens=500), seed=0)


# --- distribution ------------------------------------------------------------------------------


def _peaked():
    """The tiny GPT-2 with logits x 12 (through the final layer norm): perplexity ~44 at the first
    token instead of ~280, so 4000 draws resolve its distribution."""
    model, tok = tiny_causal_lm(seed=1)
    with torch.no_grad():
        model.transformer.ln_f.weight.mul_(12.0)
    return model, tok


@pytest.fixture(scope="module")
def peaked():
    return _peaked()


def _draws(model, tok, n: int, seed: int, **over) -> tuple[list[int], list[tuple[int, int]]]:
    """First tokens and first two tokens of n samples for PROMPTS[0] (one chunk)."""
    s = SamplingConfig(max_new_tokens=2, batch_size=n, **over)
    g = sample(model, tok, PROMPTS[:1], n, s, seed=seed, progress=False)
    c = g.completion_ids
    pairs = [
        (int(a), int(b) if m > 0 else -1)
        for a, b, m in zip(c[:, 0], c[:, 1], g.completion_mask[:, 1], strict=True)
    ]
    return c[:, 0].tolist(), pairs


def _two_sample_p(a: list, b: list, min_count: int = 10) -> float:
    """Chi-square test of homogeneity; categories seen < min_count times in all are pooled."""
    ca, cb = Counter(a), Counter(b)
    common = [k for k in ca.keys() | cb.keys() if ca[k] + cb[k] >= min_count]
    rows = [
        [c[k] for k in common] + [len(x) - sum(c[k] for k in common)] for c, x in ((ca, a), (cb, b))
    ]
    if rows[0][-1] + rows[1][-1] == 0:
        rows = [r[:-1] for r in rows]
    return float(stats.chi2_contingency(rows).pvalue)


N_DRAWS = 4000


@pytest.mark.parametrize(
    "over", [{}, {"temperature": 0.8, "top_k": 8}, {"top_p": 0.6}], ids=["plain", "top-k", "top-p"]
)
def test_native_samples_follow_the_hf_distribution(peaked, over):
    """First tokens and two-token prefixes of 4000 native and 4000 hf samples: a chi-square test
    of homogeneity does not reject (p > 1e-3); the control (native at another temperature, or
    without the truncation) is rejected (p < 1e-6), so the test has the power to see a difference."""
    model, tok = peaked
    nat = _draws(model, tok, N_DRAWS, seed=0, backend="native", **over)
    hf = _draws(model, tok, N_DRAWS, seed=1, backend="hf", **over)
    assert len(set(hf[0])) >= 5  # not a degenerate distribution
    for a, b in zip(nat, hf, strict=True):
        assert _two_sample_p(a, b) > 1e-3
    ctrl = {**over, "temperature": 0.65} if "temperature" not in over else {}
    bad = _draws(model, tok, N_DRAWS, seed=0, backend="native", **ctrl)
    for a, b in zip(bad, hf, strict=True):
        assert _two_sample_p(a, b) < 1e-6


def test_native_first_tokens_follow_the_exact_distribution(peaked):
    """Goodness of fit of 4000 native first tokens to softmax(logits / 0.9) at the prompt."""
    model, tok = peaked
    first, _ = _draws(model, tok, N_DRAWS, seed=5, backend="native", temperature=0.9)
    ids = torch.tensor([tok(PROMPTS[0], add_special_tokens=True).input_ids])
    with torch.no_grad():
        p = (model(ids, attention_mask=torch.ones_like(ids)).logits[0, -1] / 0.9).softmax(-1)
        p = p.double()
    expected = p * N_DRAWS
    big = (expected >= 5).nonzero().squeeze(1).tolist()
    counts = Counter(first)
    obs = [counts[k] for k in big] + [N_DRAWS - sum(counts[k] for k in big)]
    exp = [float(expected[k]) for k in big] + [N_DRAWS - float(expected[big].sum())]
    assert len(big) >= 5 and stats.chisquare(obs, exp).pvalue > 1e-3
    wrong = [float(e) for e in (p ** (0.9 / 0.8) / (p ** (0.9 / 0.8)).sum() * N_DRAWS)[big]]
    wrong.append(N_DRAWS - sum(wrong))
    assert stats.chisquare(obs, wrong).pvalue < 1e-6  # control: the temperature-0.8 distribution


# --- the seam ----------------------------------------------------------------------------------


def test_backend_key_is_validated_and_dispatched(tiny_lm):
    model, tok = tiny_lm
    with pytest.raises(ValueError, match=r"sampling\.backend='bogus'"):
        SamplingConfig(backend="bogus").validate()
    cfg = from_dict(SamplingConfig, {"backend": "native"}, "sampling")
    assert make_sampler(cfg) is sampling_native.sample
    with pytest.raises(ValueError, match=r"sampling\.top_k=-1"):
        sample(model, tok, ["a"], 2, SamplingConfig(top_k=-1), seed=0)
    with pytest.raises(ValueError, match=r"sampling\.backend='nope'"):
        sample(model, tok, ["a"], 2, dataclasses.replace(SamplingConfig(), backend="nope"), seed=0)
