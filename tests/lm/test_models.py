"""Tiny causal LM, loading, sampling and token log-probs (exactness under left padding)."""

import dataclasses

import pytest
import torch
from transformers import GenerationConfig

from infalign.lm.models import (
    Generation,
    derive_seed,
    load_model,
    load_tokenizer,
    resolve_device,
)
from infalign.lm.sampling import sample
from infalign.lm.scoring import token_logprobs
from infalign.run.config import ModelConfig, SamplingConfig

PROMPTS = ["The cat", "Human: What is two plus two? Assistant:", "x"]


@pytest.fixture(scope="module")
def gen(tiny_lm):
    model, tok = tiny_lm
    s = SamplingConfig(max_new_tokens=40, batch_size=4)
    return sample(model, tok, PROMPTS, 6, s, seed=1, progress=False)


def test_tiny_lm_tokenizer(tiny_lm):
    model, tok = tiny_lm
    assert 250 < len(tok) <= 300
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "left"
    assert model.config.vocab_size == len(tok)
    text = "The quick brown fox, naïve café!"
    assert tok.decode(tok(text).input_ids) == text


def test_token_logprobs_exact_under_padding(tiny_lm, gen):
    model, _ = tiny_lm
    lp = token_logprobs(model, gen)
    L = gen.prompt_length
    assert lp.dtype == torch.float32 and lp.shape == gen.completion_mask.shape
    assert lp[gen.completion_mask == 0].eq(0).all()
    for b in range(gen.input_ids.shape[0]):
        ids = gen.input_ids[b][gen.attention_mask[b].bool()].unsqueeze(0)  # no padding at all
        n = int(gen.completion_mask[b].sum())
        with torch.no_grad():
            logp = model(ids).logits[0].float().log_softmax(-1)
        ref = logp[-n - 1 : -1].gather(-1, ids[0, -n:, None]).squeeze(-1)
        torch.testing.assert_close(lp[b, :n], ref, atol=1e-5, rtol=0)
        assert torch.equal(gen.input_ids[b, L : L + n], ids[0, -n:])
    # micro-batching and entropy
    lp2, ent = token_logprobs(model, gen, micro_batch_size=5, with_entropy=True)
    torch.testing.assert_close(lp2, lp, atol=1e-6, rtol=0)
    valid = gen.completion_mask > 0
    assert (ent[valid] > 0).all() and (ent[valid] <= torch.log(torch.tensor(300.0)) + 1e-4).all()
    assert ent[~valid].eq(0).all()
    # temperature rescales logits
    lpt = token_logprobs(model, gen, temperature=0.5)
    assert not torch.allclose(lpt, lp)


def test_token_logprobs_match_generate_scores(tiny_lm):
    """At temperature 1 the sequence log-prob equals the sum of generate's sampling log-probs."""
    model, tok = tiny_lm
    s = SamplingConfig(max_new_tokens=16, batch_size=64)
    g = sample(model, tok, PROMPTS, 3, s, seed=7, progress=False)
    enc = tok(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    ids = enc.input_ids.repeat_interleave(3, 0)
    am = enc.attention_mask.repeat_interleave(3, 0)
    cfg = GenerationConfig(
        do_sample=True,
        top_k=0,
        top_p=1.0,
        temperature=1.0,
        max_new_tokens=16,
        pad_token_id=tok.pad_token_id,
        eos_token_id=[tok.eos_token_id],
        output_scores=True,
        return_dict_in_generate=True,
    )
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(derive_seed(7, 0))
        out = model.generate(input_ids=ids, attention_mask=am, generation_config=cfg)
    T = len(out.scores)
    assert torch.equal(out.sequences, g.input_ids[:, : g.prompt_length + T])
    scores = torch.stack(out.scores, 1).float().log_softmax(-1)
    step_lp = scores.gather(-1, out.sequences[:, -T:, None]).squeeze(-1)
    seq_gen = (step_lp * g.completion_mask[:, :T]).sum(-1)
    lp = token_logprobs(model, g)
    seq = (lp * g.completion_mask).sum(-1)
    torch.testing.assert_close(seq, seq_gen, atol=1e-4, rtol=0)


def test_token_logprobs_prefix_sharing_equals_one_full_pass(tiny_lm, gen):
    """Each prompt once + its KV cache repeated for the M completions: same log-probs, entropies
    and gradients as one pass over every (prompt, completion) row."""
    from infalign.lm import scoring

    model, _ = tiny_lm
    flat = dataclasses.replace(
        gen, texts=[[t] for ts in gen.texts for t in ts]
    )  # M = 1 per "prompt"
    assert scoring._shared_prompts(gen) == gen.num_samples > 1
    assert scoring._shared_prompts(flat) == 1
    results = []
    for g in (gen, flat):
        model.zero_grad()
        lp, ent = token_logprobs(model, g, grad=True, with_entropy=True, micro_batch_size=7)
        (lp * torch.linspace(0.5, 1.5, lp.shape[1])).sum().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        results.append((lp.detach(), ent, grads))
    model.zero_grad()
    (lp_s, ent_s, g_s), (lp_f, ent_f, g_f) = results
    torch.testing.assert_close(lp_s, lp_f, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent_s, ent_f, atol=1e-5, rtol=0)
    assert len(g_s) == len(g_f) > 0
    for a, b in zip(g_s, g_f, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_token_logprobs_grad(tiny_lm, gen):
    model, _ = tiny_lm
    model.zero_grad()
    lp = token_logprobs(model, gen, grad=True, micro_batch_size=8)
    assert lp.requires_grad
    (lp * gen.completion_mask).sum().backward()
    assert model.transformer.wte.weight.grad is not None
    model.zero_grad()
    assert not token_logprobs(model, gen).requires_grad


def test_generation_select(gen):
    idx = torch.tensor([[0, 5], [1, 1], [4, 2]])
    sub = gen.select(idx)
    assert sub.num_prompts == 3 and sub.num_samples == 2
    assert torch.equal(sub.input_ids[1], gen.input_ids[5])
    assert torch.equal(sub.input_ids[2], gen.input_ids[1 * 6 + 1])
    assert sub.texts[2] == [gen.texts[2][4], gen.texts[2][2]]
    assert sub.num_tokens[0, 1] == gen.num_tokens[0, 5]
    sp = gen.select_prompts([2, 0])
    assert sp.texts == [gen.texts[2], gen.texts[0]] and sp.prompts == [PROMPTS[2], PROMPTS[0]]
    assert torch.equal(sp.input_ids[:6], gen.input_ids[12:18])
    with pytest.raises(ValueError, match="select"):
        gen.select(torch.tensor([[0, 6], [0, 0], [0, 0]]))
    assert isinstance(dataclasses.replace(gen), Generation)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(ValueError, match="device"):
        resolve_device("nonsense")


def test_load_from_dir(tiny_lm, tiny_lm_dir):
    model, tok = tiny_lm
    cfg = ModelConfig(name=str(tiny_lm_dir), device="cpu")
    tok2 = load_tokenizer(cfg)
    assert tok2.padding_side == "left" and tok2.pad_token_id == tok.pad_token_id
    ref = load_model(cfg)
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    x = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(ref(x).logits, model(x).logits)
    half = load_model(dataclasses.replace(cfg, dtype="bfloat16"))
    assert next(half.parameters()).dtype == torch.bfloat16


def test_load_lora(tiny_lm_dir, tiny_lm):
    _, tok = tiny_lm
    cfg = ModelConfig(name=str(tiny_lm_dir), device="cpu", lora_r=4)
    pol = load_model(cfg, trainable=True)
    names = [n for n, p in pol.named_parameters() if p.requires_grad]
    assert names and all("lora" in n for n in names)
    g = sample(pol, tok, ["The cat"], 2, SamplingConfig(max_new_tokens=4), seed=0, progress=False)
    lp = token_logprobs(pol, g, grad=True)
    lp.sum().backward()
    full = load_model(dataclasses.replace(cfg, lora_r=0), trainable=True)
    assert all(p.requires_grad for p in full.parameters())


def test_load_errors(tmp_path, tiny_lm_dir):
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match="nope"):
        load_model(ModelConfig(name=str(missing), device="cpu"))
    with pytest.raises(ValueError, match="nope"):
        load_tokenizer(ModelConfig(name=str(missing)))
    bad = tmp_path / "corrupt"
    bad.mkdir()
    for f in tiny_lm_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="corrupt"):
        load_model(ModelConfig(name=str(bad), device="cpu"))


def test_package_path_resolves_installed_packages():
    from infalign.lm.models import _source, package_path

    assets = package_path("pkg:infalign/assets")
    assert (assets / "reference_lm" / "config.json").is_file()
    assert _source("pkg:infalign/assets/reference_lm", "model") == (
        str(assets / "reference_lm"),
        True,
    )
    with pytest.raises(ValueError, match="no installed Python package"):
        package_path("pkg:no_such_package_xyz")
