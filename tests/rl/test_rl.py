"""CTRL trainer: RLOO advantages, KL in the reward, losses, and the loop on a tiny GPT-2."""

import copy
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reward_fns import frac_e

from infalign.core.calibration import EmpiricalCalibration
from infalign.core.transforms import Exp
from infalign.lm.models import load_model
from infalign.lm.rewards import RewardError
from infalign.lm.sampling import sample
from infalign.rl import (
    ctrl_reward,
    kl_penalized_reward,
    policy_gradient_loss,
    rloo_advantages,
    sequence_logprob,
)
from infalign.rl.algorithms.rloo import RLOOTrainer
from infalign.rl.signals import Terminated, defer_interrupts, sigterm_raises
from infalign.run.config import ModelConfig, RLConfig, SamplingConfig

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
PROMPTS = ["The cat", "Human: hi Assistant:", "The weather", "What is"]
SAMPLING = SamplingConfig(max_new_tokens=8, batch_size=64)


@pytest.fixture(scope="module")
def calibration(tiny_lm):
    model, tok = tiny_lm
    gen = sample(model, tok, PROMPTS, 32, SAMPLING, seed=7, progress=False)
    return EmpiricalCalibration.fit(torch.tensor(frac_e(PROMPTS, gen.texts)))


def make_trainer(tiny_lm, calibration, out_dir, transform="identity", reward_fn=frac_e, **rl_kw):
    model, tok = tiny_lm
    rl_args = dict(
        steps=4, prompts_per_step=4, samples_per_prompt=4, lr=1e-2, beta=0.05, save_every=100
    )
    rl_args.update(rl_kw)
    resume = rl_args.pop("resume", False)
    return RLOOTrainer(
        copy.deepcopy(model),
        copy.deepcopy(model),
        tok,
        PROMPTS,
        reward_fn,
        calibration,
        transform,
        RLConfig(**rl_args),
        SAMPLING,
        out_dir,
        resume=resume,
        progress=False,
    )


def params(trainer):
    return {
        k: v.detach().clone()
        for k, v in trainer.accelerator.unwrap_model(trainer.model).named_parameters()
    }


# --- pure math -----------------------------------------------------------------------------------


def test_rloo_matches_explicit_loop():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(5, 6, generator=g, dtype=torch.float64)
    adv = rloo_advantages(r)
    P, M = r.shape
    for p in range(P):
        for i in range(M):
            others = [r[p, j].item() for j in range(M) if j != i]
            assert adv[p, i].item() == pytest.approx(
                r[p, i].item() - sum(others) / (M - 1), abs=1e-12
            )
    torch.testing.assert_close(
        adv.sum(dim=1), torch.zeros(P, dtype=torch.float64), atol=1e-12, rtol=0
    )
    normed = rloo_advantages(
        r * torch.tensor([[1.0], [10.0], [0.1], [3.0], [100.0]]), normalize_std=True
    )
    torch.testing.assert_close(
        normed.std(dim=1), torch.ones(P, dtype=torch.float64), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(
        normed.sum(dim=1), torch.zeros(P, dtype=torch.float64), atol=1e-9, rtol=0
    )
    assert rloo_advantages(torch.ones(2, 3), normalize_std=True).abs().max() == 0
    with pytest.raises(ValueError, match="M=1"):
        rloo_advantages(torch.zeros(3, 1))


def test_kl_penalized_reward_sign_and_scale():
    reward = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    lp = torch.tensor([[-3.0, -5.0], [-2.0, -2.0]])
    ref = torch.tensor([[-4.0, -5.0], [-1.0, -2.5]])  # log-ratios 1, 0, -1, 0.5
    out = kl_penalized_reward(reward, lp, ref, beta=0.5)
    torch.testing.assert_close(out, reward - 0.5 * torch.tensor([[1.0, 0.0], [-1.0, 0.5]]))
    assert out[0, 0] < reward[0, 0] and out[1, 0] > reward[1, 0]  # pi above pi_ref is penalised
    torch.testing.assert_close(kl_penalized_reward(reward, lp, ref, beta=0.0), reward)
    with pytest.raises(ValueError, match="same"):
        kl_penalized_reward(reward, lp[:1], ref, beta=0.1)
    tok = torch.tensor([[-1.0, -2.0, 9.0], [-0.5, 7.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(sequence_logprob(tok, mask), torch.tensor([-3.0, -0.5]))


def test_ctrl_reward_raw_and_transformed():
    cal = EmpiricalCalibration.fit(torch.tensor([[0.0, 1.0, 2.0, 3.0], [10.0, 20.0, 30.0, 40.0]]))
    r = torch.tensor([[1.5, 5.0], [10.0, 0.0]])
    torch.testing.assert_close(ctrl_reward(r, None, None), r)
    torch.testing.assert_close(ctrl_reward(r, None, "raw"), r)
    c = torch.tensor([[0.5, 1.0], [0.125, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(ctrl_reward(r, cal, "identity"), c)
    torch.testing.assert_close(ctrl_reward(r, cal, "exp:5"), Exp(5.0)(c))
    with pytest.raises(ValueError, match="calibration"):
        ctrl_reward(r, None, "identity")


def test_clipped_loss_gradient_equals_reinforce_at_ratio_one():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 5, 7, generator=g, requires_grad=True)
    tokens = torch.randint(0, 7, (6, 5), generator=g)
    mask = (torch.rand(6, 5, generator=g) > 0.3).float()
    adv = torch.randn(6, generator=g)

    def lp():
        return torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)

    loss_pg, d0 = policy_gradient_loss(lp(), None, adv, mask, clip_eps=0.2)
    (g_pg,) = torch.autograd.grad(loss_pg, logits)
    cur = lp()
    loss_ppo, d1 = policy_gradient_loss(cur, cur.detach(), adv, mask, clip_eps=0.2)
    (g_ppo,) = torch.autograd.grad(loss_ppo, logits)
    torch.testing.assert_close(g_ppo, g_pg, atol=1e-7, rtol=1e-6)
    # the values differ by design (ratio vs log-prob), only the gradients agree
    torch.testing.assert_close(loss_ppo.detach(), -(adv * mask.sum(1)).mean())
    assert float(d0.clip_frac) == 0 and float(d1.clip_frac) == 0 and float(d1.approx_kl) == 0
    # explicit value: -(1/B) sum_i A_i sum_t m_it logp_it
    ref = -(adv * (cur.detach() * mask).sum(1)).mean()
    torch.testing.assert_close(loss_pg.detach(), ref)
    # far from the old policy the clipped side has no gradient: A > 0 and ratio > 1 + eps
    old = cur.detach() - 1.0  # ratio = e > 1.2 everywhere
    pos = torch.ones(6)
    loss_c, dc = policy_gradient_loss(lp(), old, pos, mask, clip_eps=0.2)
    (g_c,) = torch.autograd.grad(loss_c, logits)
    assert g_c.abs().max() == 0 and float(dc.clip_frac) == pytest.approx(1.0)
    assert float(dc.approx_kl) > 0


# --- the loop --------------------------------------------------------------------------------------


def test_step0_kl_is_zero_and_training_raises_reward(tiny_lm, calibration, tmp_path):
    tr = make_trainer(
        tiny_lm, calibration, tmp_path, steps=12, samples_per_prompt=8, lr=3e-2, beta=0.01
    )
    before = params(tr)
    hist = tr.train()
    assert abs(hist[0]["rl/kl_seq"]) < 1e-6  # policy == reference at step 0
    after = params(tr)
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, f"parameters not updated: {unchanged}"
    first = hist[0]["rl/reward_transformed"]
    last = sum(h["rl/reward_transformed"] for h in hist[-3:]) / 3
    assert 0.3 < first < 0.7 and last > first + 0.25, (first, last)
    assert hist[-1]["rl/kl_seq"] > 0.1
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["rl/step"] for m in lines] == list(range(12))
    for key in (
        "rl/reward_raw", "rl/reward_calibrated", "rl/reward_transformed", "rl/kl_seq",
        "rl/kl_penalty", "rl/advantage_std", "rl/entropy", "rl/completion_length", "rl/loss",
        "rl/grad_norm", "rl/lr", "rl/clip_frac", "rl/time/generate", "rl/time/reward",
        "rl/time/forward_backward", "rl/time/step",
    ):  # fmt: skip
        assert key in lines[0] and lines[0][key] == lines[0][key], key  # present, not NaN
    # the final checkpoint loads back as a plain model with the trained weights
    ck = tmp_path / "checkpoint"
    assert (ck / "model.safetensors").is_file() and (ck / "trainer_state.pt").is_file()
    reloaded = load_model(ModelConfig(name=str(ck), device="cpu"))
    for k, v in reloaded.named_parameters():
        torch.testing.assert_close(v, after[k], atol=0, rtol=0)


@pytest.fixture
def sigterm_default():
    """SIGTERM at its default disposition for the test, whatever the process inherited."""
    inherited = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGTERM, inherited)


@pytest.mark.parametrize("failure", ["interrupt", "terminate", "crash"])
def test_resume_equals_uninterrupted(tiny_lm, calibration, tmp_path, failure, sigterm_default):
    # a reward that raises is named as a RewardError (the CLI prints it in one line)
    stops = {"interrupt": KeyboardInterrupt, "terminate": Terminated, "crash": RewardError}
    full = make_trainer(
        tiny_lm, calibration, tmp_path / "full", steps=5, save_every=2, warmup_steps=3
    )
    full_hist = full.train()
    target = params(full)

    calls = {"n": 0}

    def flaky(prompts, completions):
        calls["n"] += 1
        if calls["n"] == 4:  # during the 4th step (3 steps done, last checkpoint at step 2)
            if failure == "terminate":
                os.kill(os.getpid(), signal.SIGTERM)  # what `kill` and schedulers send
            raise KeyboardInterrupt if failure == "interrupt" else RuntimeError("backend died")
        return frac_e(prompts, completions)

    out = tmp_path / "resumed"
    first = make_trainer(
        tiny_lm, calibration, out, steps=5, save_every=2, warmup_steps=3, reward_fn=flaky
    )
    with pytest.raises(stops[failure]):
        first.train()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored after training
    state = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert state["step"] == (2 if failure == "crash" else 3)
    torch.rand(100)  # move the global RNG: resuming must restore it
    second = make_trainer(
        tiny_lm, calibration, out, steps=5, save_every=2, warmup_steps=3, resume=True
    )
    assert second.step == state["step"]
    assert torch.equal(torch.get_rng_state(), state["rng"]["torch"])
    second.train()
    for k, v in params(second).items():
        assert torch.allclose(v, target[k], rtol=0, atol=1e-7), k
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["rl/step"] for m in lines] == list(range(5))
    for a, b in zip(lines, full_hist, strict=True):
        assert a["rl/reward_raw"] == b["rl/reward_raw"] and a["rl/lr"] == b["rl/lr"]
    with pytest.raises(ValueError, match=r"rl\.beta"):
        make_trainer(tiny_lm, calibration, out, steps=5, beta=0.5, resume=True)


def test_grad_accum_and_ppo_epochs(tiny_lm, calibration, tmp_path):
    grads = {}
    for g in (1, 2):
        tr = make_trainer(
            tiny_lm, calibration, tmp_path / f"g{g}", steps=1, grad_accum=g, max_grad_norm=1e6
        )
        names = {id(p): k for k, p in tr.model.named_parameters()}

        def capture(opt, args, kwargs, g=g, names=names):
            grads[g] = {
                names[id(p)]: p.grad.clone() for grp in opt.param_groups for p in grp["params"]
            }

        tr.optimizer.optimizer.register_step_pre_hook(capture)
        tr.train()
    # same rollouts, same gradient (after clipping): the micro-batch split only reorders float sums
    assert grads[1].keys() == grads[2].keys() and len(grads[1]) > 10
    for k, v in grads[1].items():
        torch.testing.assert_close(grads[2][k], v, atol=1e-7, rtol=1e-5)
    ppo = make_trainer(tiny_lm, calibration, tmp_path / "ppo", steps=2, ppo_epochs=3, clip_eps=0.1)
    hist = ppo.train()
    assert all(h["rl/approx_kl"] > 0 and 0 <= h["rl/clip_frac"] <= 1 for h in hist)


def test_raw_reward_and_lora(tiny_lm, calibration, tmp_path):
    from peft import LoraConfig, get_peft_model

    raw = make_trainer(tiny_lm, None, tmp_path / "raw", transform=None, steps=1)
    (m,) = raw.train()
    assert "rl/reward_calibrated" not in m and m["rl/reward_transformed"] == m["rl/reward_raw"]

    model, tok = tiny_lm
    policy = get_peft_model(
        copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"])
    )
    rl = RLConfig(steps=2, prompts_per_step=4, samples_per_prompt=4, lr=1e-2, beta=0.05)
    tr = RLOOTrainer(
        policy, None, tok, PROMPTS, frac_e, calibration, "identity", rl, SAMPLING, tmp_path / "lora",
        progress=False,
    )  # fmt: skip
    base_before = {k: v.clone() for k, v in policy.named_parameters() if "lora_" not in k}
    lora_before = {k: v.clone() for k, v in policy.named_parameters() if "lora_B" in k}
    hist = tr.train()
    assert abs(hist[0]["rl/kl_seq"]) < 1e-6  # lora_B = 0 at init: policy == base
    assert hist[1]["rl/kl_seq"] != 0
    now = dict(policy.named_parameters())
    assert all(torch.equal(now[k], v) for k, v in base_before.items())
    assert all(not torch.equal(now[k], v) for k, v in lora_before.items())
    assert (tmp_path / "lora" / "checkpoint" / "adapter_model.safetensors").is_file()
    # resuming loads the adapter back into a fresh LoRA model
    fresh = get_peft_model(
        copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"])
    )
    again = RLOOTrainer(
        fresh, None, tok, PROMPTS, frac_e, calibration, "identity", rl, SAMPLING, tmp_path / "lora",
        resume=True, progress=False,
    )  # fmt: skip
    assert again.step == 2
    loaded = dict(fresh.named_parameters())
    for k, v in policy.named_parameters():
        assert torch.equal(loaded[k], v), k


def test_input_validation(tiny_lm, calibration, tmp_path):
    model, tok = tiny_lm
    rl = RLConfig(prompts_per_step=2, samples_per_prompt=4)

    def build(prompts=PROMPTS, cal=calibration, rl=rl, transform="identity", ref=model):
        return RLOOTrainer(model, ref, tok, prompts, frac_e, cal, transform, rl, SAMPLING, tmp_path)

    with pytest.raises(ValueError, match="prompts"):
        build(prompts=[])
    with pytest.raises(ValueError, match="calibration has 4 prompts but prompts has 3"):
        build(prompts=PROMPTS[:3])
    with pytest.raises(ValueError, match=r"rl\.samples_per_prompt=1"):
        build(rl=RLConfig(samples_per_prompt=1))
    with pytest.raises(ValueError, match=r"rl\.grad_accum=4"):
        build(rl=RLConfig(prompts_per_step=2, samples_per_prompt=4, grad_accum=4))
    with pytest.raises(ValueError, match="exp:auto"):
        build(transform="exp:auto")
    with pytest.raises(ValueError, match="needs a calibration"):
        build(cal=None)
    with pytest.raises(ValueError, match="reference=None"):
        build(ref=None)
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_signals_are_deferred_to_the_end_of_an_update(sig, sigterm_default):
    signum = getattr(signal, sig)
    # the raising handlers, whatever the process inherited (a shell's `&` sets SIGINT to ignored)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        done = []
        with sigterm_raises():
            handler = signal.getsignal(signal.SIGTERM)
            with pytest.raises(Terminated if sig == "SIGTERM" else KeyboardInterrupt):
                with defer_interrupts():
                    os.kill(os.getpid(), signum)
                    done.append("update finished")
            assert signal.getsignal(signal.SIGTERM) is handler
        assert done == ["update finished"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGINT, inherited)


# --- two processes -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_accelerate_run(tiny_lm_dir, tmp_path):
    """``accelerate launch`` with 2 CPU processes (gloo), bf16 autocast, grad_accum=2.

    ``accelerate launch --cpu`` starts several processes only through mpirun; without MPI it runs one.
    torchrun-style launching (``--multi_gpu``) with ``ACCELERATE_USE_CPU=1`` gives 2 gloo processes.
    """
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
        str(ROOT / "tests" / "accelerate_train_script.py"), str(tiny_lm_dir), str(out),
        "--steps", "2", "--bf16",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    result = json.loads(line[len("RESULT ") :])
    assert result["num_processes"] == 2 and result["mixed_precision"] == "bf16"
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["rl/step"] for m in lines] == [0, 1]
    state = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 2 and state["num_processes"] == 2
    assert (out / "checkpoint" / "model.safetensors").is_file()


def test_two_process_regression_equals_one_process(tiny_lm_dir, tmp_path):
    """rl.algorithm: regression under ``accelerate launch`` with 2 processes and grad_accum=2 makes
    the same updates as one process: the step's samples are the same, sharded by prompt, and the
    loss weights make each update the mean over all of them."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1"}
    script = [str(ROOT / "tests" / "accelerate_train_script.py"), str(tiny_lm_dir)]
    opts = ["--steps", "3", "--algorithm", "regression"]
    launch = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
    ]  # fmt: skip
    for cmd, out in ((launch, "two"), ([sys.executable], "one")):
        proc = subprocess.run(
            [*cmd, *script, str(tmp_path / out), *opts],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-4000:]
    two = torch.load(tmp_path / "two" / "params.pt", weights_only=True)
    one = torch.load(tmp_path / "one" / "params.pt", weights_only=True)
    base = torch.cat(
        [p.detach().flatten() for p in load_model(ModelConfig(name=str(tiny_lm_dir))).parameters()]
    )
    assert not torch.allclose(one, base)  # it trained
    # float noise amplified by Adam is ~2e-6 here; a wrong weighting of a rank or micro-batch moves
    # parameters by the order of lr (3e-3)
    assert torch.allclose(two, one, rtol=0, atol=2e-5), float((two - one).abs().max())
    # Adam hides a loss scale; the gradient norm (before clipping) does not: the same every step
    norms = {
        out: [json.loads(x)["rl/grad_norm"] for x in (tmp_path / out / "metrics.jsonl").open()]
        for out in ("one", "two")
    }
    assert norms["two"] == pytest.approx(norms["one"], rel=1e-4) and len(norms["one"]) == 3


def test_adaptive_beta_controller():
    from infalign.rl.advantages import adaptive_beta

    assert adaptive_beta(0.1, 0.5, 0.5, 10) == pytest.approx(0.1)
    assert adaptive_beta(0.1, 5.0, 0.5, 10) == pytest.approx(0.1 * 1.02)  # clipped at +20 %
    assert adaptive_beta(0.1, 0.0, 0.5, 1) == pytest.approx(0.08)  # clipped at -20 %
    assert adaptive_beta(0.1, float("nan"), 0.5, 1) == 0.1
    with pytest.raises(ValueError):
        adaptive_beta(0.1, 0.5, 0.0, 1)
    with pytest.raises(ValueError, match="kl_target"):
        RLConfig(kl_target=-1.0).validate()
    with pytest.raises(ValueError, match="regression"):
        RLConfig(algorithm="regression", kl_target=0.5).validate()


def test_kl_controller_moves_beta_and_resumes(tiny_lm, calibration, tmp_path):
    kw = dict(kl_target=1e-4, kl_horizon=1, save_every=2)
    tr = make_trainer(tiny_lm, calibration, tmp_path / "c", steps=3, **kw)
    hist = tr.train()
    betas = [h["rl/beta"] for h in hist]
    assert betas[0] == 0.05 and all(b > 0 for b in betas)
    for h, nxt in zip(
        hist, [*betas[1:], tr.beta], strict=True
    ):  # each step's KL sets the next beta
        e = min(max(h["rl/kl_seq"] / 1e-4 - 1, -0.2), 0.2)
        assert nxt == pytest.approx(h["rl/beta"] * (1 + e))
    again = make_trainer(tiny_lm, calibration, tmp_path / "c", steps=3, resume=True, **kw)
    assert again.beta == tr.beta


def test_algorithms_are_the_modules_of_the_algorithms_package():
    from infalign.rl.algorithms import names, trainer_class
    from infalign.rl.algorithms.regression import RegressionTrainer
    from infalign.rl.base import CTRLTrainer

    assert names() == ("regression", "rloo")
    assert trainer_class("rloo") is RLOOTrainer and trainer_class("regression") is RegressionTrainer
    assert all(issubclass(trainer_class(n), CTRLTrainer) for n in names())
    with pytest.raises(ValueError, match=r"rl\.algorithm='ppo': expected one of regression, rloo"):
        trainer_class("ppo")
