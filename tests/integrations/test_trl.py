"""TRL integration: CalibratedReward equals C_hat + transform computed directly, handles TRL's formats,
and drives two real RLOOTrainer steps on a tiny in-process GPT-2 (CPU, no downloads)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from infalign.core.calibration import EmpiricalCalibration  # noqa: E402
from infalign.core.transforms import Exp, NegExp, parse_transform  # noqa: E402
from infalign.integrations.trl import (  # noqa: E402
    EXACT_CTRL_SETTINGS,
    CalibratedReward,
    add_reference_rewards,
    check_exact_ctrl,
    exact_ctrl_config,
)


def length_reward(prompts: list[str], completions: list[list[str]]) -> torch.Tensor:
    """RewardFn: the completion's length in characters, (P, M)."""
    return torch.tensor([[float(len(c)) for c in row] for row in completions], dtype=torch.float64)


class TableReward:
    """RewardFn looking scores up in a dict keyed by (prompt, completion); records its call shapes."""

    def __init__(self, table: dict[tuple[str, str], float]) -> None:
        self.table = table
        self.shapes: list[tuple[int, int]] = []

    def __call__(self, prompts: list[str], completions: list[list[str]]) -> torch.Tensor:
        self.shapes.append((len(prompts), len(completions[0])))
        return torch.tensor(
            [[self.table[(p, c)] for c in row] for p, row in zip(prompts, completions, strict=True)]
        )


def _trl_batch(seed: int = 0, num_prompts: int = 3, m: int = 4, k: int = 16):
    """A TRL-shaped batch: each prompt repeated m times in a row, with its (k,) reference row per entry."""
    g = torch.Generator().manual_seed(seed)
    prompts, completions, refs, table = [], [], [], {}
    ref_rows = (
        torch.round(torch.randn(num_prompts, k, generator=g, dtype=torch.float64) * 4) / 4
    )  # ties
    ref_rows = (
        ref_rows + torch.arange(num_prompts, dtype=torch.float64).unsqueeze(1) * 3
    )  # per prompt
    ref_rows[0, 3] = float("nan")  # a missing reference reward
    raw = torch.round(torch.randn(num_prompts, m, generator=g, dtype=torch.float64) * 4) / 4 + 3.0
    for p in range(num_prompts):
        for j in range(m):
            prompt, completion = f"prompt {p}", f"completion {p}.{j}"
            prompts.append(prompt)
            completions.append(completion)
            refs.append(ref_rows[p].tolist())
            table[(prompt, completion)] = float(raw[p, j])
    return prompts, completions, refs, table, ref_rows, raw


@pytest.mark.parametrize("spec", ["identity", "exp:8", "negexp:5", "log"])
@pytest.mark.parametrize("smoothed", [False, True])
def test_equals_direct_calibration_and_transform(spec: str, smoothed: bool) -> None:
    prompts, completions, refs, table, ref_rows, raw = _trl_batch()
    fn = TableReward(table)
    reward = CalibratedReward(fn, spec, smoothed=smoothed)
    got = reward(prompts=prompts, completions=completions, reference_rewards=refs)
    assert isinstance(got, list) and len(got) == len(prompts)
    assert all(isinstance(v, float) for v in got)
    assert fn.shapes == [(3, 4)]  # grouped: one (P, M) call

    c_hat = EmpiricalCalibration.fit(ref_rows, smoothed=smoothed)(raw)  # (P, M) directly
    want = parse_transform(spec)(c_hat).reshape(-1)
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), want, rtol=0, atol=1e-12)

    # ungrouped scoring (P = B, M = 1) gives the same values
    flat = CalibratedReward(TableReward(table), spec, smoothed=smoothed, group_prompts=False)
    assert flat(prompts=prompts, completions=completions, reference_rewards=refs) == got


def test_each_completion_ranked_against_its_own_prompt() -> None:
    # same raw reward 5.0 under two prompts: top of prompt A's reference, bottom of prompt B's
    reward = CalibratedReward(lambda p, c: torch.full((len(p), len(c[0])), 5.0), "identity")
    refs = [[0.0, 1.0, 2.0, 3.0]] * 2 + [[6.0, 7.0, 8.0, 9.0]] * 2
    got = reward(
        prompts=["a", "a", "b", "b"], completions=["x", "y", "x", "y"], reference_rewards=refs
    )
    assert got == [1.0, 1.0, 0.0, 0.0]
    tie = reward(
        prompts=["a", "a"], completions=["x", "y"], reference_rewards=[[5.0, 5.0, 0.0, 9.0]] * 2
    )
    assert tie == [0.5, 0.5]  # two ties count 1/2 each, one below: (1 + 1/2 + 1/2) / 4


def test_chat_format_matches_strings() -> None:
    prompts, completions, refs, table, _, _ = _trl_batch(seed=1)
    chat_prompts = [[{"role": "user", "content": p}] for p in prompts]
    chat_completions = [[{"role": "assistant", "content": c}] for c in completions]
    reward = CalibratedReward(TableReward(table), Exp(4.0))
    want = reward(prompts=prompts, completions=completions, reference_rewards=refs)
    got = reward(prompts=chat_prompts, completions=chat_completions, reference_rewards=refs)
    assert got == want
    parts = [[{"role": "assistant", "content": [{"type": "text", "text": c}]}] for c in completions]
    assert reward(prompts=chat_prompts, completions=parts, reference_rewards=refs) == want


def test_missing_column_names_it() -> None:
    reward = CalibratedReward(length_reward, "identity", reference_column="my_refs")
    with pytest.raises(ValueError, match="'my_refs'") as err:
        reward(prompts=["a", "a"], completions=["x", "yy"], reference_rewards=[[1.0, 2.0]] * 2)
    assert "remove_unused_columns=False" in str(err.value)
    assert "reference_rewards" in str(err.value)  # lists the columns it did get


def test_bad_reference_rows_and_rewards_are_clear_errors() -> None:
    reward = CalibratedReward(length_reward, "identity")
    with pytest.raises(ValueError, match=r"'reference_rewards' row 1 \(prompt 'b'\) has 1 finite"):
        reward(
            prompts=["a", "b"], completions=["x", "y"], reference_rewards=[[1.0, 2.0], [None, 3.0]]
        )
    with pytest.raises(ValueError, match="infinite"):
        reward(prompts=["a"], completions=["x"], reference_rewards=[[1.0, math.inf]])
    with pytest.raises(ValueError, match="3 rows but there are 2 completions"):
        reward(prompts=["a", "b"], completions=["x", "y"], reference_rewards=[[1.0, 2.0]] * 3)
    bad_shape = CalibratedReward(lambda p, c: torch.zeros(len(p)), "identity")
    with pytest.raises(ValueError, match=r"expected \(1, 2\)"):
        bad_shape(prompts=["a", "a"], completions=["x", "y"], reference_rewards=[[1.0, 2.0]] * 2)
    nan_fn = CalibratedReward(lambda p, c: torch.full((len(p), len(c[0])), math.nan), "identity")
    with pytest.raises(ValueError, match="must be finite"):
        nan_fn(prompts=["a"], completions=["x"], reference_rewards=[[1.0, 2.0]])


def test_ragged_reference_rows() -> None:
    reward = CalibratedReward(lambda p, c: torch.full((len(p), len(c[0])), 2.0), "identity")
    got = reward(
        prompts=["a", "b"],
        completions=["x", "y"],
        reference_rewards=[[1.0, 3.0], [1.0, 1.5, 3.0, 4.0]],
    )
    assert got == [0.5, 0.5]


def test_raw_is_the_uncalibrated_baseline() -> None:
    reward = CalibratedReward(length_reward, "raw")
    assert reward.__name__ == "raw_reward" and not reward.calibrated
    assert reward(prompts=["a", "a"], completions=["x", "yyy"]) == [1.0, 3.0]
    with pytest.raises(ValueError, match="smoothed"):
        CalibratedReward(length_reward, "raw", smoothed=True)
    with pytest.raises(ValueError, match="unknown transform"):
        CalibratedReward(length_reward, "cube")


def test_names_and_logging_hooks() -> None:
    assert CalibratedReward(length_reward, "exp:12").__name__ == "ctrl_exp_12"
    assert CalibratedReward(length_reward, NegExp(2.0), name="safety").__name__ == "safety"
    metrics, extra = {}, {}
    reward = CalibratedReward(length_reward, "identity")
    reward(
        prompts=["a", "a"],
        completions=["x", "yyy"],
        reference_rewards=[[0.0, 2.0]] * 2,
        log_metric=lambda k, v: metrics.__setitem__(k, v),
        log_extra=lambda k, v: extra.__setitem__(k, v),
        trainer_state=None,
        completion_ids=[[1], [2, 3]],
    )
    # lengths 1 and 3 against reference [0, 2]: C_hat = 1/2 and 1
    assert metrics == {"ctrl_identity/raw_mean": 2.0, "ctrl_identity/calibrated_mean": 0.75}
    assert extra == {"ctrl_identity/raw": [1.0, 3.0], "ctrl_identity/calibrated": [0.5, 1.0]}


def test_add_reference_rewards() -> None:
    ds = datasets.Dataset.from_dict({"prompt": ["a", "b", "c"]})
    refs = np.array([[0.0, 1.0], [2.0, np.nan], [4.0, 5.0]])
    with pytest.raises(ValueError, match="row 1"):  # only 1 finite reward
        add_reference_rewards(ds, refs)
    refs[1, 1] = 3.0
    out = add_reference_rewards(ds, torch.from_numpy(refs))
    assert out["reference_rewards"] == refs.tolist() and out["prompt"] == ["a", "b", "c"]
    with pytest.raises(ValueError, match="2 rows but the dataset has 3"):
        add_reference_rewards(ds, refs[:2])
    with pytest.raises(ValueError, match="already has a column"):
        add_reference_rewards(out, refs)
    assert add_reference_rewards(out, refs + 1, overwrite=True)["reference_rewards"][0] == [
        1.0,
        2.0,
    ]
    with pytest.raises(ValueError, match="row 2"):
        add_reference_rewards(ds, refs, prompts=["a", "b", "z"])
    with pytest.raises(ValueError, match="no prompt column 'query'"):
        add_reference_rewards(ds, refs, prompt_column="query")
    ragged = add_reference_rewards(
        ds, [[0.0, 1.0], [2.0, None, 3.0], [4.0, 5.0, 6.0]], column="refs"
    )
    row = ragged["refs"][1]
    assert row[0] == 2.0 and math.isnan(row[1]) and row[2] == 3.0


def test_exact_ctrl_config(tmp_path) -> None:
    cpu = {"use_cpu": True, "bf16": False, "report_to": "none"}
    cfg = exact_ctrl_config(str(tmp_path), beta=0.1, num_generations=4, **cpu)
    for key, want in EXACT_CTRL_SETTINGS.items():
        assert getattr(cfg, key) == want, key
    assert cfg.beta == 0.1 and cfg.num_generations == 4
    assert cfg.steps_per_generation == cfg.gradient_accumulation_steps
    assert check_exact_ctrl(cfg) == []
    with pytest.raises(ValueError, match="normalize_advantages"):
        exact_ctrl_config(
            str(tmp_path), beta=0.1, num_generations=4, normalize_advantages=True, **cpu
        )
    with pytest.raises(ValueError, match="steps_per_generation"):
        exact_ctrl_config(str(tmp_path), beta=0.1, num_generations=2, steps_per_generation=4, **cpu)
    with pytest.raises(ValueError, match="beta"):
        exact_ctrl_config(str(tmp_path), beta=0.0, num_generations=4, **cpu)
    with pytest.raises(ValueError, match="num_generations"):
        exact_ctrl_config(str(tmp_path), beta=0.1, num_generations=1, **cpu)
    loose = exact_ctrl_config(
        str(tmp_path), beta=0.1, num_generations=2, temperature=0.7, strict=False, **cpu
    )
    assert check_exact_ctrl(loose) == ["temperature=0.7 (exact CTRL needs 1.0)"]

    from trl import RLOOConfig

    default = check_exact_ctrl(RLOOConfig(output_dir=str(tmp_path), **cpu))
    assert any(p.startswith("disable_dropout") for p in default)


# ------------------------------------------------------------------------- two real TRL training steps


def test_rloo_trainer_two_steps(tiny_lm_dir, tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import RLOOTrainer

    prompts = ["the cat", "a quick brown", "tell me a", "what is the"]
    k = 64
    ref = torch.linspace(0.0, 40.0, k, dtype=torch.float64).repeat(4, 1) + torch.arange(
        4
    ).unsqueeze(1)
    ref[1, 5] = float("nan")
    dataset = add_reference_rewards(
        datasets.Dataset.from_dict({"prompt": prompts}), ref, prompts=prompts
    )
    ref_by_prompt = {p: row for p, row in zip(prompts, dataset["reference_rewards"], strict=True)}

    calls: list[tuple[list, list, list]] = []
    returned: list[list[float]] = []
    advantages: list[torch.Tensor] = []

    class Recording(CalibratedReward):
        def __call__(self, prompts, completions, **kwargs):
            calls.append((list(prompts), list(completions), kwargs.get("reference_rewards")))
            returned.append(super().__call__(prompts, completions, **kwargs))
            return returned[-1]

    class CapturingRLOO(RLOOTrainer):  # records the advantages TRL computes from our rewards
        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            advantages.append(out["advantages"].detach().clone())
            return out

    reward = Recording(length_reward, "exp:4")
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    args = exact_ctrl_config(
        str(tmp_path / "out"),
        beta=0.05,
        num_generations=2,
        per_device_train_batch_size=4,
        max_completion_length=8,
        max_steps=2,
        learning_rate=1e-3,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        seed=0,
        dataloader_num_workers=0,
    )
    trainer = CapturingRLOO(
        model=model,
        reward_funcs=reward,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.train()

    assert len(calls) == 2  # one generation batch per step
    seen = set()
    for batch_prompts, batch_completions, batch_refs in calls:
        assert len(batch_prompts) == len(batch_completions) == 4
        assert batch_refs is not None, "reference_rewards column was not passed to the reward"
        for p, row in zip(batch_prompts, batch_refs, strict=True):
            np.testing.assert_array_equal(np.asarray(row), np.asarray(ref_by_prompt[p]))
            seen.add(p)
    assert seen == set(prompts)
    # step 1: policy == pi_ref, so the KL term is 0 and TRL's advantage must be the plain leave-one-out
    # difference of our rewards (no std scaling, no normalisation): A_i = R_i - R_other for M = 2
    r = torch.tensor(returned[0], dtype=torch.float32).view(2, 2)
    want = (r - r.flip(1)).view(-1)
    torch.testing.assert_close(advantages[0], want, rtol=0, atol=1e-6)
    assert want.abs().max() > 0  # the check is not vacuous
    logged = [h for h in trainer.state.log_history if "kl" in h]
    assert logged and all(math.isfinite(h["kl"]) for h in logged)
    assert any("ctrl_exp_4/calibrated_mean" in h for h in trainer.state.log_history)
    changed = [
        n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])
    ]
    assert changed, "no parameter changed after two RLOO steps"
