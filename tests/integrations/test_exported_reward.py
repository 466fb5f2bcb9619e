"""``infalign export-reward``: the file OpenRLHF imports as ``--reward.remote_url reward_func.py`` and
verl as ``custom_reward_function.path``, called exactly as those frameworks call it, against rewards
worked out by hand from the reference artifact (``conftest.CTRLRun.expected``)."""

from __future__ import annotations

import asyncio
import importlib.util
import pickle
from functools import partial

import numpy as np
import pytest
import torch
from conftest import RECIPE

from infalign.cli import main
from infalign.integrations.recipe_reward import (
    CTRLReward,
    LazyReward,
    QueryError,
    RewardSpec,
    UnknownPromptError,
)


def _export(ctrl_run, path, *flags):
    assert main(["export-reward", RECIPE, str(path), *flags, *ctrl_run.argv]) == 0
    return path


def _import_like_openrlhf(path):
    """openrlhf/utils/agent.py, SingleTurnAgentExecutor.__init__."""
    spec = importlib.util.spec_from_file_location("reward_func", str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _call_with_kwargs(raw_fn, extra_kwargs, *args, **kwargs):
    """verl/trainer/ppo/reward.py: how get_custom_reward_fn wraps the loaded compute_score."""
    return raw_fn(*args, **{**kwargs, **extra_kwargs})


def _cases(ctrl_run):
    """(prompt, response): an arbitrary text, and a reference completion (its reward ties one of
    the K reference rewards exactly) for every prompt."""
    return [
        (p, r)
        for i, p in enumerate(ctrl_run.prompts)
        for r in (" and a cat", *ctrl_run.completions[i][:1])
    ]


@pytest.fixture(scope="module")
def exported(ctrl_run, tmp_path_factory):
    return _import_like_openrlhf(_export(ctrl_run, tmp_path_factory.mktemp("export") / "rf.py"))


def test_openrlhf_reward_func_matches_hand_computed_ctrl_reward(ctrl_run, exported):
    cases = _cases(ctrl_run)
    ties = 0
    for prompt, response in cases:
        # OpenRLHF: asyncio.to_thread(reward_func, queries[i:i+1], prompts[i:i+1], labels[i:i+1])
        call = asyncio.to_thread(exported.reward_func, [prompt + response], [prompt], [None])
        out = asyncio.run(call)
        raw, c, want = ctrl_run.expected(prompt, response)
        assert isinstance(out["rewards"], torch.Tensor) and out["rewards"].shape == (1,)
        assert out["rewards"].item() == pytest.approx(want, rel=1e-6)  # float32 tensors
        assert out["scores"].item() == c
        assert (
            out["extra_logs"]["raw_reward"] == raw and out["extra_logs"]["calibrated_reward"] == c
        )
        ties += bool(np.any(ctrl_run.rewards[ctrl_run.prompts.index(prompt)] == np.float32(raw)))
    assert ties >= len(ctrl_run.prompts)  # the reference completions were credited 1/2 for the tie

    # one call with every query, and the EOS text OpenRLHF leaves in (skip_special_tokens=False)
    prompts = [p for p, _ in cases]
    out = exported.reward_func([p + r + "<eos>" for p, r in cases], prompts, [None] * len(cases))
    want = [ctrl_run.expected(p, r) for p, r in cases]
    assert out["scores"].tolist() == [c for _, c, _ in want]
    assert out["rewards"].tolist() == pytest.approx([w for _, _, w in want], rel=1e-6)
    assert out["extra_logs"]["ctrl_reward"] == pytest.approx(np.mean([w for *_, w in want]))


def test_keep_special_tokens_scores_the_text_as_sent(ctrl_run, tmp_path):
    module = _import_like_openrlhf(_export(ctrl_run, tmp_path / "keep.py", "--keep-special-tokens"))
    prompt, response = ctrl_run.prompts[0], ctrl_run.completions[0][0]
    out = module.reward_func([prompt + response + "<eos>"], [prompt], [None])
    assert out["extra_logs"]["raw_reward"] == ctrl_run.expected(prompt, response + "<eos>")[0]
    assert out["extra_logs"]["raw_reward"] != ctrl_run.expected(prompt, response)[0]


def test_verl_compute_score_per_sample_and_batch(ctrl_run, exported):
    cases = _cases(ctrl_run)
    per_sample = partial(_call_with_kwargs, exported.compute_score, {})
    singles = []
    for prompt, response in cases:
        # verl/workers/reward_manager/naive.py: extra_info gains num_turns and rollout_reward_scores
        extra = {"prompt": prompt, "index": 0, "num_turns": None, "rollout_reward_scores": {}}
        got = per_sample(
            data_source="infalign", solution_str=response, ground_truth=None, extra_info=extra
        )
        raw, c, want = ctrl_run.expected(prompt, response)
        assert got["score"] == pytest.approx(want, rel=1e-12, abs=1e-15)
        assert (got["raw_reward"], got["calibrated_reward"]) == (raw, c)
        singles.append(got)
    # verl/workers/reward_manager/batch.py: numpy object arrays from non_tensor_batch
    batch = partial(_call_with_kwargs, exported.compute_score_batch, {})
    got = batch(
        data_sources=np.array(["infalign"] * len(cases), dtype=object),
        solution_strs=[r for _, r in cases],
        ground_truths=[None] * len(cases),
        extra_infos=np.array([{"prompt": p, "rollout_reward_scores": {}} for p, _ in cases]),
    )
    assert got == singles


def test_verl_without_the_prompt_in_extra_info_names_the_field(exported):
    with pytest.raises(ValueError, match=r"extra_info must hold the prompt text under 'prompt'"):
        exported.compute_score("infalign", "text", None, extra_info={"index": 3})
    with pytest.raises(ValueError, match=r"extra_infos\[1\]"):
        exported.compute_score_batch(["a", "a"], ["x", "y"], [None, None], [{"prompt": "p"}, None])


def test_unknown_prompt_and_query_without_its_prompt(ctrl_run, exported):
    p = ctrl_run.prompts[2]
    with pytest.raises(UnknownPromptError, match=r"prompts\[1\] 'Not a training prompt'"):
        exported.reward_func(
            [p + "!", "Not a training prompt!"], [p, "Not a training prompt"], [0, 0]
        )
    with pytest.raises(QueryError, match=r"query\[0\] 'Hello' does not start with prompts\[0\]"):
        exported.reward_func(["Hello"], [p], [None])


def test_raw_method_serves_the_raw_reward(ctrl_run, tmp_path):
    module = _import_like_openrlhf(_export(ctrl_run, tmp_path / "raw.py", "--method", "raw"))
    prompt, response = ctrl_run.prompts[1], " sunny"
    out = module.reward_func([prompt + response], [prompt], [None])
    raw, c, _ = ctrl_run.expected(prompt, response)
    assert out["rewards"].item() == pytest.approx(raw) and out["scores"].item() == c


def test_lazy_reward_pickles_as_its_spec_and_a_rebuilt_artifact_is_refused(exported):
    clone = pickle.loads(pickle.dumps(exported.REWARD))
    assert isinstance(clone, LazyReward) and clone._reward is None
    assert clone.spec == exported.REWARD.spec
    stale = RewardSpec.from_dict({**clone.spec.to_dict(), "num_samples": 99})
    with pytest.raises(ValueError, match="num_samples=8, the reward was exported with 99"):
        CTRLReward(stale)


def test_export_without_reference_artifact_is_one_line_error(ctrl_run, tmp_path, capsys):
    argv = [*ctrl_run.argv[:-2], "--out", str(tmp_path / "empty")]
    assert main(["export-reward", RECIPE, str(tmp_path / "rf.py"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "no finished reference artifact" in err and "infalign reference" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "rf.py").exists()
