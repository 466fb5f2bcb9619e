"""The pipeline as a library: stage configs and reuse, transform resolution, interrupted training,
cleanup after a failure, LoRA checkpoints through evaluation, results rows."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import tiny_assets
from tiny_assets import write_tiny_assets

from infalign import theory
from infalign.run import pipeline
from infalign.run.config import MethodConfig
from infalign.run.keys import config_diff, train_key
from infalign.run.recipe import load_config
from infalign.run.runs import RunEnv, beta_name
from infalign.run.train import TILT_WARN_NATS, _warn_steep_tilt, resolve_transform, tilt_span

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "tiny.yaml"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_tiny_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture(autouse=True)
def _no_faults():
    tiny_assets.FAULTS.update(interrupt_after=None, nan=False)
    yield
    tiny_assets.FAULTS.update(interrupt_after=None, nan=False)


def _cfg(assets, out, **over):
    base = {
        "model.name": str(assets["model"]),
        "prompts.train.source": str(assets["train"]),
        "prompts.test.source": str(assets["test"]),
        "reward.name": "tiny_assets:faulty_reward",
        "out": str(out),
        **over,
    }
    return load_config(RECIPE, base)


def test_first_diff_names_the_dotted_field():
    old = {"rl": {"beta": 0.1, "steps": 3}, "prompts": {"train": {"limit": None}}, "p": [1, 2]}
    assert config_diff(old, old) is None
    assert config_diff(old, {**old, "rl": {"beta": 0.2, "steps": 3}}) == (
        "rl.beta",
        0.1,
        0.2,
    )
    assert config_diff(old, {**old, "p": [1, 3]}) == ("p[1]", 2, 3)
    assert config_diff(old, {**old, "new": 1})[0] == "new"


def test_a_key_added_later_at_its_default_keeps_old_stages_reusable():
    old = {"rl": {"beta": 0.1}, "train": {"rl": {"beta": 0.1}}}
    new = {
        "rl": {"beta": 0.1, "onpolicy_samples": 0},
        "train": {"rl": {"beta": 0.1, "algorithm": "rloo"}},
    }
    assert config_diff(old, new) is None
    changed = {**new, "rl": {"beta": 0.1, "onpolicy_samples": 4}}
    assert config_diff(old, changed) == ("rl.onpolicy_samples", "<unset>", 4)


def test_beta_dir_names_round_trip():
    for b in (0.1, 0.05, 1.0, 1e-5, 0.123456789):
        name = beta_name(b)
        assert float(name.removeprefix("beta=")) == b
    assert beta_name(0.1) == "beta=0.1"


def test_resolve_transforms(assets, tmp_path):
    cfg = _cfg(assets, tmp_path / "r", **{"rl.target_kl": 0.3, "report.procedure": "won:4"})
    tf, info = resolve_transform(cfg, MethodConfig("m", "negexp:auto"))
    assert info["t"] == pytest.approx(theory.best_t("negexp", "won:4", 0.3))
    assert info["procedure"] == "won:4" and info["target_kl"] == 0.3
    assert info["theory_beta"] == pytest.approx(theory.beta_for_kl(tf, 0.3))
    tf, info = resolve_transform(cfg, MethodConfig("m", "optimal"))
    assert info["transform"]["name"] == "tabulated" and info["resolved"].startswith("tabulated")
    tf, info = resolve_transform(cfg, MethodConfig("m", "raw"))
    assert tf is None and info["resolved"] == "raw"
    tf, info = resolve_transform(cfg, MethodConfig("m", "exp:3"))
    assert info["resolved"] == str(tf) and "procedure" not in info
    # the stage config records the procedure and KL only where they change the transform
    assert "report" in train_key(RunEnv(cfg), MethodConfig("m", "optimal"), 0.1)
    assert "report" not in train_key(RunEnv(cfg), MethodConfig("m", "exp:3"), 0.1)
    # a pinned KL (exp:auto@KL) wins over rl.target_kl, and rl.target_kl leaves its stage key alone
    tf, info = resolve_transform(cfg, MethodConfig("m", "negexp:auto@1.5"))
    assert info["target_kl"] == 1.5
    assert info["t"] == pytest.approx(theory.best_t("negexp", "won:4", 1.5))
    pinned = MethodConfig("m", "negexp:auto@1.5")
    other = _cfg(assets, tmp_path / "r", **{"rl.target_kl": 0.8, "report.procedure": "won:4"})
    assert train_key(RunEnv(cfg), pinned, 0.1) == train_key(RunEnv(other), pinned, 0.1)


def test_changed_stage_config_is_an_error_naming_the_field(assets, tmp_path):
    cfg = _cfg(assets, tmp_path / "run")
    ref = pipeline.run_reference(cfg, "test")
    assert tuple(ref.rewards.shape) == (6, 8)
    again = pipeline.run_reference(cfg, "test")  # reused: same rewards
    assert again.rewards.equal(ref.rewards)
    changed = _cfg(assets, tmp_path / "run", **{"evaluate.reference_samples": 6})
    with pytest.raises(ValueError, match=r"evaluate\.reference_samples=8 but this config has "):
        pipeline.run_reference(changed, "test")
    changed = _cfg(assets, tmp_path / "run", **{"sampling.max_new_tokens": 4})
    with pytest.raises(ValueError, match=r"sampling\.max_new_tokens=8 but .* use another out"):
        pipeline.run_reference(changed, "test")
    # settings that do not change the artifact do not invalidate it
    pipeline.run_reference(_cfg(assets, tmp_path / "run", **{"reward.batch_size": 3}), "test")


def test_a_steep_tilt_is_warned_before_training(assets, tmp_path, caplog):
    cfg = _cfg(assets, tmp_path / "r", **{"report.procedure": "won:4"})
    identity, _ = resolve_transform(cfg, MethodConfig("m", "identity"))
    assert tilt_span(identity, 0.1) == pytest.approx(10.0)
    assert tilt_span(None, 0.1) is None  # raw: the scale is the reward's
    # the theory's negexp at KL 1 (beta ~2e-5): the claims sweep's runaway unit
    tf, info = resolve_transform(cfg, MethodConfig("m", "negexp:auto@1"))
    assert tilt_span(tf, info["theory_beta"]) > 1e4
    with caplog.at_level(logging.WARNING, logger="infalign"):
        _warn_steep_tilt(identity, 1.0 / TILT_WARN_NATS * 1.01, "train/a")
        _warn_steep_tilt(tf, info["theory_beta"], "train/b")
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and said[0].startswith("train/b: beta 2.4") and "robust t" in said[0]


def test_interrupted_training_resumes(assets, tmp_path, caplog):
    # no methods: the sweep is one method "default" with rl.transform at rl.beta
    cfg = _cfg(assets, tmp_path / "run", methods=[], **{"rl.transform": "identity"})
    assert [m.name for m in pipeline.sweep(cfg)] == ["default"]
    pipeline.run_references(cfg)
    tiny_assets.FAULTS["interrupt_after"] = 2  # steps 0 and 1 finish, step 2 is interrupted
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_train(cfg, "default")
    d = tmp_path / "run" / "train" / "default" / "beta=0.1"
    assert json.loads((d / "manifest.json").read_text())["status"] == "running"
    assert (d / "checkpoint" / "trainer_state.pt").is_file()  # kept for the resume
    assert len((d / "metrics.jsonl").read_text().splitlines()) == 2
    with caplog.at_level(logging.INFO, logger="infalign"):
        assert pipeline.run_train(cfg, "default") == d
    assert any("resumed from" in r.getMessage() for r in caplog.records)
    steps = [json.loads(x)["rl/step"] for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2]
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["summary"]["rl/step"] == 2


def test_failed_stage_is_removed_and_finished_ones_kept(assets, tmp_path):
    cfg = _cfg(assets, tmp_path / "run")
    pipeline.run_references(cfg)
    tiny_assets.FAULTS["nan"] = True  # the policy's first rollout gets a NaN reward
    with pytest.raises(ValueError, match="is nan for prompt 0, completion 0"):
        pipeline.run_train(cfg, "raw")
    assert not (tmp_path / "run" / "train").exists()
    assert (tmp_path / "run" / "reference" / "train" / "reference.json").is_file()
    assert (tmp_path / "run" / "reference" / "test" / "reference.json").is_file()


def test_lora_checkpoint_through_evaluation(assets, tmp_path, caplog):
    over = {"model.lora_r": 2, "model.lora_target_modules": "c_attn", "rl.steps": 2}
    cfg = _cfg(assets, tmp_path / "run", **over)
    d = pipeline.run_train(cfg, "ctrl-exp", 0.1)
    assert (d / "checkpoint" / "adapter_model.safetensors").is_file()
    ev = pipeline.run_evaluate(cfg, "ctrl-exp", 0.1)
    assert math.isfinite(ev["kl"]["mean"]) and ev["kl"]["mean"] != 0.0  # the adapter is applied
    assert ev["policy"]["resolved_transform"].startswith("exp:")
    samples = (tmp_path / "run/eval/ctrl-exp/beta=0.1/samples.jsonl").read_text().splitlines()
    assert len(samples) == 6 and len(json.loads(samples[0])["completions"]) == 8
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [r["method"] for r in results["rows"]] == ["ctrl-exp"]
    assert sorted(results["missing"]) == ["raw/beta=0.1", "reference"]
    # results leave out rows made with another config than the one asked about
    other = _cfg(assets, tmp_path / "run", **over, **{"evaluate.bootstrap": 7})
    with caplog.at_level(logging.WARNING, logger="infalign"):
        assert pipeline.write_results(other)["rows"] == []
    assert any("evaluate.bootstrap" in r.getMessage() for r in caplog.records)


def test_regression_algorithm_through_the_pipeline(assets, tmp_path):
    """rl.algorithm: regression trains from the cached reference samples (no reward call during
    training) and its evaluation, like every trained policy's, reports the transfer diagnostic."""
    over = {"rl.algorithm": "regression", "rl.steps": 3, "rl.samples_per_prompt": 2}
    cfg = _cfg(assets, tmp_path / "reg", **over)
    d = pipeline.run_train(cfg, "raw", 0.1)
    rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["rl/step"] for r in rows] == [0, 1, 2] and "rl/fit_corr" in rows[0]
    ev = pipeline.run_evaluate(cfg, "raw", 0.1)
    t = ev["transfer"]
    assert t["num_samples"] == 6 * cfg.evaluate.reference_samples
    assert -1.0 <= t["corr"] <= 1.0 and t["rmse"] > 0 and math.isfinite(t["slope"])
    assert pipeline.run_evaluate(cfg, None)["transfer"] is None  # pi_ref itself


@pytest.mark.parametrize("algorithm", ["rloo", "regression"])
def test_native_sampling_through_the_pipeline(assets, tmp_path, algorithm):
    """sampling.backend: native serves reference sampling, training rollouts and evaluation; the
    stages record it, so a run made with it is not silently reused by another backend."""
    over = {"sampling.backend": "native", "rl.algorithm": algorithm, "rl.steps": 2}
    if algorithm == "regression":
        over.update({"rl.samples_per_prompt": 2, "rl.onpolicy_samples": 2})
    cfg = _cfg(assets, tmp_path / algorithm, **over)
    d = pipeline.run_train(cfg, "raw", 0.1)
    rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["rl/step"] for r in rows] == [0, 1] and all(r["rl/time/generate"] > 0 for r in rows)
    ev = pipeline.run_evaluate(cfg, "raw", 0.1)
    assert math.isfinite(ev["kl"]["mean"]) and 0.0 <= ev["win_rate"]["bon:4"]["mean"] <= 1.0
    manifest = json.loads((tmp_path / algorithm / "reference/train/manifest.json").read_text())
    assert manifest["config"]["sampling"]["backend"] == "native"
    with pytest.raises(ValueError, match=r"sampling\.backend='native'.*sampling\.backend='hf'"):
        pipeline.run_evaluate(
            _cfg(assets, tmp_path / algorithm, **{**over, "sampling.backend": "hf"}), "raw", 0.1
        )


def test_single_test_prompt_has_no_stderr(assets, tmp_path):
    cfg = _cfg(assets, tmp_path / "one", **{"prompts.test.limit": 1})
    ev = pipeline.run_evaluate(cfg, None)  # pi_ref against its own test artifact
    assert ev["num_prompts"] == 1 and ev["kl"]["mean"] == 0.0
    assert ev["kl"]["stderr"] is None and ev["win_rate"]["bon:4"]["stderr"] is None
    assert 0.0 <= ev["win_rate"]["bon:4"]["mean"] <= 1.0
    row = json.loads((tmp_path / "one" / "results.json").read_text())["rows"][0]
    assert row["method"] == "reference" and row["kl"]["stderr"] is None


def test_preflight_checks_before_loading(assets, tmp_path):
    with pytest.raises(ValueError, match=r"prompts\.test\.source=.*no such file"):
        pipeline.preflight(_cfg(assets, tmp_path / "p", **{"prompts.test.source": "nope.jsonl"}))
    with pytest.raises(ValueError, match=r"method 'nope' is not in the config's methods"):
        pipeline.run_train(_cfg(assets, tmp_path / "p"), "nope")
    with pytest.raises(ValueError, match=r"methods\[0\]\.name='reference'"):
        _cfg(assets, tmp_path / "p", methods=[{"name": "reference", "transform": "raw"}])
    with pytest.raises(ValueError, match=r"rl\.target_kl=20"):
        _cfg(assets, tmp_path / "p", **{"rl.target_kl": 20})
    assert not (tmp_path / "p").exists()


def test_task_fills_reward_prompts_and_procedure(tmp_path):
    from infalign.lm.tasks import TASKS
    from infalign.run.recipe import load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "recipes" / "harmless.yaml")
    task = TASKS["harmless"]
    assert cfg.reward.name == task.reward and cfg.report.procedure == "won:4"
    assert cfg.prompts.train.source == task.train_prompts and cfg.prompts.train.limit == 96
    assert cfg.prompts.test.source == task.test_prompts
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: helpfull\nmodel: {name: x}\n")
    with pytest.raises(ValueError, match=r"task='helpfull'.*unknown task"):
        load_config(bad)


def _rows(results):
    return [{k: r[k] for k in ("method", "beta", "kl", "win_rate")} for r in results["rows"]]


def test_jobs_run_the_stages_in_workers_with_the_same_numbers(assets, tmp_path):
    """``run_all(jobs=2)`` (spawned workers, :mod:`infalign.run.parallel`) writes the results of the
    sequential run: each stage draws from its own seeds, whichever process runs it. A second call
    reuses every stage."""
    seq = pipeline.run_all(_cfg(assets, tmp_path / "seq"), report=False)
    par = pipeline.run_all(_cfg(assets, tmp_path / "par"), report=False, jobs=2)
    assert _rows(par) == _rows(seq) and len(par["rows"]) == 3  # raw, ctrl-exp, pi_ref
    for m in ("raw", "ctrl-exp"):
        assert (tmp_path / "par" / "train" / m / "beta=0.1" / "manifest.json").is_file()
    stamp = (tmp_path / "par" / "eval" / "raw" / "beta=0.1" / "eval.json").stat().st_mtime_ns
    again = pipeline.run_all(_cfg(assets, tmp_path / "par"), report=False, jobs=2)
    assert _rows(again) == _rows(seq)
    assert (
        tmp_path / "par" / "eval" / "raw" / "beta=0.1" / "eval.json"
    ).stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="jobs=0"):
        pipeline.run_all(_cfg(assets, tmp_path / "bad"), jobs=0)


def test_a_failing_stage_in_a_worker_fails_the_run(assets, tmp_path):
    """A stage that raises in a worker (a NaN reward here) raises its own exception in the parent,
    with a note naming the stage's log, which holds the worker's stderr; the pool does not hang."""
    cfg = _cfg(assets, tmp_path / "nan", **{"reward.name": "tiny_assets:nan_reward"})
    with pytest.raises(ValueError, match=r"nan_reward is nan") as err:
        pipeline.run_all(cfg, report=False, jobs=2)
    (note,) = err.value.__notes__
    assert "(stage reference-" in note and "logs/reference-" in note
    assert (tmp_path / "nan" / "logs").is_dir()
