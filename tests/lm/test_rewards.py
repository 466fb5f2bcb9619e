"""Reward functions: HF sequence classifier, callables, shape and finiteness checks."""

from pathlib import Path

import pytest
import torch

from infalign.lm.rewards import CallableReward, HFRewardModel, describe_reward, load_reward, score
from infalign.run.config import RewardConfig

PROMPTS = ["Human: hi\n\nAssistant:", "The cat"]
COMPS = [[" hello there", " no", " a very long answer indeed"], [" sat", "", " on the mat"]]


@pytest.fixture(scope="module")
def rm_dir(tiny_lm, tmp_path_factory):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    _, tok = tiny_lm
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=64,
        n_embd=16,
        n_layer=1,
        n_head=2,
        num_labels=2,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(cfg).eval()
    d = tmp_path_factory.mktemp("rm")
    model.save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    return d, model, tok


def test_hf_reward_matches_unbatched(rm_dir):
    d, model, tok = rm_dir
    rm = HFRewardModel(str(d), batch_size=4, max_length=64, device="cpu", label_index=1)
    r = rm(PROMPTS, COMPS)
    assert r.shape == (2, 3) and r.dtype == torch.float32
    for p in range(2):
        for m in range(3):
            ids = tok(PROMPTS[p] + COMPS[p][m], return_tensors="pt").input_ids
            with torch.no_grad():
                want = model(ids).logits[0, 1]
            torch.testing.assert_close(r[p, m], want, atol=1e-5, rtol=0)
    # batch size does not change the result
    rm1 = HFRewardModel(str(d), batch_size=1, max_length=64, device="cpu", label_index=1)
    torch.testing.assert_close(rm1(PROMPTS, COMPS), r, atol=1e-5, rtol=0)
    assert "hf:" in describe_reward(rm)


def test_hf_reward_truncates_from_left(rm_dir):
    d, _, _ = rm_dir
    rm = HFRewardModel(str(d), batch_size=2, max_length=16, device="cpu")
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 20
    r = rm([long_prompt, "x" + long_prompt], [[" the end"], [" the end"]])
    assert torch.isfinite(r).all()
    # only the last 16 tokens are seen: the two inputs share them
    torch.testing.assert_close(r[0], r[1])


def test_hf_reward_errors(rm_dir, tmp_path):
    d, _, _ = rm_dir
    with pytest.raises(ValueError, match="label_index"):
        HFRewardModel(str(d), device="cpu", label_index=2)
    with pytest.raises(ValueError, match="nope"):
        HFRewardModel(str(tmp_path / "nope"), device="cpu")
    with pytest.raises(ValueError, match="batch_size"):
        HFRewardModel(str(d), batch_size=0)


def test_load_reward(rm_dir):
    d, _, _ = rm_dir
    rm = load_reward(RewardConfig(kind="hf", name=str(d), device="cpu", max_length=64))
    assert score(rm, PROMPTS, COMPS).shape == (2, 3)
    fn = load_reward(RewardConfig(kind="callable", name="reward_fns:length_reward"))
    assert isinstance(fn, CallableReward)
    with pytest.raises(ValueError, match=r"reward\.kind"):
        load_reward(RewardConfig(kind="nope", name="x"))


@pytest.mark.parametrize("name", ["length_reward", "length_reward_tensor"])
def test_callable_reward(name):
    fn = CallableReward(f"reward_fns:{name}")
    r = score(fn, PROMPTS, COMPS)
    assert r.dtype == torch.float32
    assert r.tolist() == [[12.0, 3.0, 26.0], [4.0, 0.0, 11.0]]
    assert describe_reward(fn) == f"callable:reward_fns:{name}"


def test_callable_from_file(tmp_path):
    f = tmp_path / "my_reward.py"
    f.write_text("def r(prompts, completions):\n    return [[1.0] * len(g) for g in completions]\n")
    assert score(CallableReward(f"{f}:r"), PROMPTS, COMPS).eq(1).all()


def test_callable_errors():
    with pytest.raises(ValueError, match="module:function"):
        CallableReward("no_colon")
    with pytest.raises(ValueError, match="cannot import"):
        CallableReward("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="has no attribute"):
        CallableReward("reward_fns:missing")


def test_score_checks_shape_and_finiteness():
    with pytest.raises(ValueError, match=r"shape \(6,\), expected \(P=2, M=3\)"):
        score(CallableReward("reward_fns:flat_reward"), PROMPTS, COMPS)
    with pytest.raises(ValueError, match=r"nan for prompt 1, completion 1 .*'The cat'.*''"):
        score(CallableReward("reward_fns:nan_reward"), PROMPTS, COMPS)
    with pytest.raises(ValueError, match=r"completions\[1\] must be a list of M=3"):
        score(CallableReward("reward_fns:length_reward"), PROMPTS, [COMPS[0], ["a"]])
    with pytest.raises(ValueError, match=r"completions\[0\]\[1\]"):
        score(CallableReward("reward_fns:length_reward"), PROMPTS[:1], [["a", 3]])
    with pytest.raises(ValueError, match="P=2"):
        score(CallableReward("reward_fns:length_reward"), PROMPTS, COMPS[:1])


def test_score_truncates_long_text_in_error():
    long = "word " * 100
    with pytest.raises(ValueError) as err:
        score(CallableReward("reward_fns:nan_reward"), [long], [["a", long]])
    assert "..." in str(err.value) and len(str(err.value)) < 400


def test_a_reward_that_raises_is_one_line_naming_type_message_and_place():
    with pytest.raises(ValueError) as err:
        score(CallableReward("reward_fns:failing_reward"), PROMPTS, COMPS)
    msg = str(err.value)
    assert "\n" not in msg
    assert "reward callable:reward_fns:failing_reward raised Boom: reward backend crashed" in msg
    assert "reward_fns.py:" in msg  # the file and line where it was raised
    line = int(msg.rsplit("reward_fns.py:", 1)[1].rstrip(")"))
    src = (Path(__file__).parents[1] / "reward_fns.py").read_text().splitlines()
    assert "raise Boom" in src[line - 1]


def test_a_reward_that_calls_sys_exit_is_reported_not_obeyed():
    with pytest.raises(ValueError, match=r"reward_fns:exiting_reward called sys.exit\(3\)"):
        score(CallableReward("reward_fns:exiting_reward"), PROMPTS, COMPS)


def test_a_none_reward_says_none_and_names_the_function():
    with pytest.raises(ValueError, match=r"reward callable:reward_fns:none_reward returned None"):
        score(CallableReward("reward_fns:none_reward"), PROMPTS, COMPS)


def test_a_reward_beyond_float32_says_so():
    with pytest.raises(ValueError, match=r"1e\+300 at index \[0, 0\]: it exceeds float32"):
        score(CallableReward("reward_fns:huge_reward"), PROMPTS, COMPS)


def test_a_causal_lm_is_refused_as_reward_model_naming_the_fresh_head(tiny_lm_dir):
    """A causal LM loads as a sequence classifier with a random ``score`` head: refuse it."""
    with pytest.raises(ValueError, match=r"not a trained sequence classifier: .*score\.weight"):
        HFRewardModel(str(tiny_lm_dir), device="cpu")
    with pytest.raises(ValueError, match=r"score\.weight"):
        load_reward(RewardConfig(kind="hf", name=str(tiny_lm_dir), device="cpu"))
