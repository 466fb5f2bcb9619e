"""Decoding under inference-time procedures: BoN serves the max of its group, WoN the min."""

import pytest
import torch

from infalign.core.procedures import CdfMap, parse_procedure
from infalign.lm.decoding import decode
from infalign.lm.rewards import CallableReward
from infalign.run.config import SamplingConfig

PROMPTS = ["The cat", "Human: hi\n\nAssistant:", "A good answer", "x"]
SAMPLING = SamplingConfig(max_new_tokens=10, batch_size=16)


@pytest.mark.parametrize("spec", ["bon:4", "won:4"])
def test_bon_max_won_min(tiny_lm, spec):
    model, tok = tiny_lm
    reward = CallableReward("reward_fns:length_reward")
    out = decode(model, tok, PROMPTS, spec, reward, SAMPLING, seed=0)
    assert out.candidate_rewards.shape == (4, 4) and out.procedure == spec
    want = out.candidate_rewards.max(1) if spec == "bon:4" else out.candidate_rewards.min(1)
    assert torch.equal(out.rewards, want.values)
    assert out.texts == [out.candidates[p][int(out.index[p])] for p in range(4)]
    assert out.rewards.tolist() == [float(len(t)) for t in out.texts]
    served = out.served_generation()
    assert served.num_samples == 1 and served.texts == [[t] for t in out.texts]
    # same seed, same candidates for both procedures
    other = decode(model, tok, PROMPTS, parse_procedure("sample"), reward, SAMPLING, seed=0)
    assert other.candidate_rewards.shape == (4, 1) and other.texts == [
        c[0] for c in other.candidates
    ]


def test_ties_broken_by_seed(tiny_lm):
    model, tok = tiny_lm
    reward = CallableReward("reward_fns:count_e_reward")
    out = decode(model, tok, PROMPTS, "bon:8", reward, SAMPLING, seed=1)
    assert torch.equal(out.rewards, out.candidate_rewards.max(1).values)
    again = decode(model, tok, PROMPTS, "bon:8", reward, SAMPLING, seed=1)
    assert torch.equal(again.index, out.index)


def test_bad_procedure(tiny_lm):
    model, tok = tiny_lm
    reward = CallableReward("reward_fns:length_reward")
    with pytest.raises(ValueError, match="unknown procedure"):
        decode(model, tok, PROMPTS, "best:4", reward, SAMPLING, seed=0)
    g = CdfMap(G=lambda u: u**2, dG=lambda u: 2 * u)
    with pytest.raises(NotImplementedError, match="no sample-level"):
        decode(model, tok, PROMPTS, g, reward, SAMPLING, seed=0)
