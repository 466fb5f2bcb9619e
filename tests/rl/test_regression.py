"""The regression trainer (rl.algorithm: regression) on a tiny GPT-2: it fits the exact target on
the cached reference samples, resumes exactly, validates its inputs, and runs through the pipeline."""

import copy
import json
import math

import pytest
import torch
from reward_fns import frac_e

from infalign.lm.scoring import token_logprobs
from infalign.rl.advantages import ctrl_reward
from infalign.rl.algorithms.regression import (
    RegressionTrainer,
    fit_diagnostics,
    fresh_log_partition,
    regression_loss,
    regression_target,
    snis_kl,
)
from infalign.run.config import RLConfig, SamplingConfig
from infalign.run.reference import build_reference

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
PROMPTS = ["The cat", "Human: hi Assistant:", "The weather", "What is"]
SAMPLING = SamplingConfig(max_new_tokens=8, batch_size=64)
BETA = 0.2


@pytest.fixture(scope="module")
def refset(tiny_lm, tmp_path_factory):
    model, tok = tiny_lm
    d = tmp_path_factory.mktemp("reg_ref")
    return build_reference(model, tok, PROMPTS, frac_e, SAMPLING, 16, d, seed=5, progress=False)


def make(tiny_lm, refset, out, reward_fn=None, **rl_kw):
    model, tok = tiny_lm
    args = dict(
        algorithm="regression",
        steps=4,
        prompts_per_step=2,
        samples_per_prompt=8,
        lr=3e-3,
        beta=BETA,
        save_every=100,
    )
    args.update(rl_kw)
    resume = args.pop("resume", False)
    return RegressionTrainer(
        copy.deepcopy(model),
        copy.deepcopy(model),
        tok,
        refset,
        refset.calibration(),
        "identity",
        RLConfig(**args),
        SAMPLING,
        out,
        resume=resume,
        progress=False,
        reward_fn=reward_fn,
    )


def full_loss(trainer, refset):
    """The regression loss and fit over all P x K reference samples (no grad)."""
    P, K = refset.rewards.shape
    gen = refset.generation(trainer.tokenizer, list(range(P)), torch.arange(K).expand(P, K))
    model = trainer.accelerator.unwrap_model(trainer.model)
    lp = token_logprobs(model, gen, temperature=SAMPLING.temperature)
    seq = (lp.double() * gen.completion_mask.double()).sum(-1).view(P, K)
    target = trainer.target_table
    loss = float(regression_loss(seq, refset.logprobs, target, BETA))
    return loss, fit_diagnostics(seq - refset.logprobs, target / BETA)


def test_pure_math_of_the_target():
    R = torch.tensor([[0.1, 0.4, 0.9], [0.5, 0.5, 0.5]], dtype=torch.float64)
    t = regression_target(R, 0.5)
    # normalised over each prompt's samples; a flat reward has target 0 (pi* = pi_ref)
    assert torch.allclose(torch.exp(t / 0.5).mean(1), torch.ones(2, dtype=torch.float64))
    assert torch.allclose(t[1], torch.zeros(3, dtype=torch.float64), atol=1e-15)
    lp = torch.tensor([[0.0, 1.0]], requires_grad=True)
    loss = regression_loss(lp, torch.zeros(1, 2), torch.tensor([[0.5, 0.5]]), 2.0)
    assert float(loss.detach()) == pytest.approx(((0 - 0.5) ** 2 + (2 - 0.5) ** 2) / 2)
    loss.backward()  # d/dlp mean (2 lp - 0.5)^2 = 2 (2 lp - 0.5) * 2 / 2
    assert torch.allclose(lp.grad, torch.tensor([[-1.0, 3.0]]))
    f = fit_diagnostics(2 * t, t)
    assert f["slope"] == pytest.approx(2.0) and f["corr"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same shape"):
        regression_loss(lp, torch.zeros(2), torch.zeros(1, 2), 1.0)


def test_snis_kl_is_a_nonnegative_consistent_estimate():
    lr = torch.tensor([[0.0, 0.0], [1.0, -1.0], [-200.0, -190.0]])
    kl = snis_kl(lr)
    assert kl[0] == 0.0  # pi == pi_ref on the samples
    # mass moved off the samples (every log-ratio very negative): still in [0, log k], not -195
    assert bool(((kl >= 0) & (kl <= math.log(2) + 1e-12)).all())
    assert torch.allclose(snis_kl(lr + 7.0), kl)  # a shift of the log-ratios changes nothing
    # consistent: a tilted categorical with a known KL, sampled from pi_ref
    g = torch.Generator().manual_seed(0)
    ref = torch.softmax(torch.randn(50, generator=g, dtype=torch.float64), 0)
    pi = torch.softmax(ref.log() + torch.randn(50, generator=g, dtype=torch.float64), 0)
    exact = float((pi * (pi / ref).log()).sum())
    y = torch.multinomial(ref, 200_000, replacement=True, generator=g)
    est = float(snis_kl((pi / ref).log()[y].unsqueeze(0))[0])
    assert est == pytest.approx(exact, rel=0.02)


def test_training_fits_the_target(tiny_lm, refset, tmp_path):
    tr = make(tiny_lm, refset, tmp_path / "fit", steps=60, lr=1e-2)
    R = ctrl_reward(refset.rewards.double(), refset.calibration(), "identity")
    assert torch.allclose(tr.reward_table, R)
    before, fit0 = full_loss(tr, refset)
    assert fit0["slope"] == pytest.approx(0.0, abs=1e-6)  # the policy starts at pi_ref
    hist = tr.train()
    after, fit1 = full_loss(tr, refset)
    assert after < 0.5 * before, (before, after)
    assert fit1["corr"] > 0.6 and fit1["slope"] > 0.3, fit1
    assert [h["rl/step"] for h in hist] == list(range(60))
    assert {"rl/loss", "rl/kl_seq", "rl/fit_corr", "rl/grad_norm"} <= set(hist[0])


def test_resume_equals_uninterrupted(tiny_lm, refset, tmp_path):
    full = make(tiny_lm, refset, tmp_path / "full", steps=6, warmup_steps=3)
    full.train()
    want = {k: v.detach().clone() for k, v in full.model.named_parameters()}
    first = make(tiny_lm, refset, tmp_path / "part", steps=3, warmup_steps=3)
    first.train()
    torch.rand(10)
    second = make(tiny_lm, refset, tmp_path / "part", steps=6, warmup_steps=3, resume=True)
    assert second.step == 3
    second.train()
    for k, v in second.model.named_parameters():
        assert torch.allclose(v, want[k], rtol=0, atol=1e-7), k
    lines = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["rl/step"] for x in lines] == list(range(6))


def test_input_validation(tiny_lm, refset, tmp_path):
    with pytest.raises(ValueError, match="samples_per_prompt=32 exceeds the K=16"):
        make(tiny_lm, refset, tmp_path / "a", samples_per_prompt=32)
    with pytest.raises(ValueError, match=r"rl\.algorithm='ppo'"):
        RLConfig(algorithm="ppo").validate()
    RLConfig(algorithm="regression", samples_per_prompt=1).validate()  # no leave-one-out needed
    with pytest.raises(ValueError, match="RLOO needs M >= 2"):
        RLConfig(samples_per_prompt=1).validate()
    old = copy.copy(refset)
    old.logprobs = None
    with pytest.raises(ValueError, match="format 2"):
        make(tiny_lm, old, tmp_path / "b")


def test_fresh_log_partition_is_the_discrete_z():
    """A fresh pi_ref sample scored against K references has C_hat = j/K with probability 1/(K+1):
    check Z_K by simulation of exactly that (continuous rewards, no ties)."""
    from infalign.core.calibration import EmpiricalCalibration
    from infalign.core.transforms import parse_transform

    K, beta, phi = 8, 0.3, parse_transform("exp:4")
    g = torch.Generator().manual_seed(0)
    refs = torch.rand(20000, K, generator=g, dtype=torch.float64)
    fresh = torch.rand(20000, 1, generator=g, dtype=torch.float64)
    u = EmpiricalCalibration.fit(refs)(fresh)
    mc = float(torch.exp(phi(u) / beta).mean().log())
    assert fresh_log_partition(phi, beta, K) == pytest.approx(mc, abs=0.02)


def test_onpolicy_refresh(tiny_lm, refset, tmp_path):
    """With rl.onpolicy_samples, each step adds that many policy samples per prompt: the reward is
    called once per step, and the run still fits and resumes exactly."""
    calls = {"n": 0}

    def counted(prompts, completions):
        calls["n"] += 1
        assert all(len(c) == 3 for c in completions)
        return frac_e(prompts, completions)

    full = make(tiny_lm, refset, tmp_path / "on", reward_fn=counted, steps=4, onpolicy_samples=3)
    hist = full.train()
    assert calls["n"] == 4 and all("rl/onpolicy_reward" in h for h in hist)
    assert all(h["rl/time/generate"] > 0 for h in hist)
    want = {k: v.detach().clone() for k, v in full.model.named_parameters()}
    part = make(tiny_lm, refset, tmp_path / "on2", reward_fn=frac_e, steps=2, onpolicy_samples=3)
    part.train()
    rest = make(
        tiny_lm,
        refset,
        tmp_path / "on2",
        reward_fn=frac_e,
        steps=4,
        onpolicy_samples=3,
        resume=True,
    )
    rest.train()
    for k, v in rest.model.named_parameters():
        assert torch.allclose(v, want[k], rtol=0, atol=1e-7), k
    with pytest.raises(ValueError, match="needs a reward_fn"):
        make(tiny_lm, refset, tmp_path / "x", onpolicy_samples=2)
    with pytest.raises(ValueError, match="onpolicy_samples"):
        RLConfig(onpolicy_samples=2).validate()  # rloo
