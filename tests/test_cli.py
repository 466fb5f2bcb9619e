"""End-to-end CLI: ``infalign run`` of the tiny recipe, stage reuse, single verbs, bad input.

Everything runs in a temp directory on the tiny model of ``tests/tiny_assets.py`` (no hub).
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys

import pytest
from tiny_assets import RECIPE as TINY_RECIPE
from tiny_assets import recipe_overrides as _args
from tiny_assets import write_tiny_assets

from infalign.cli import main

RECIPE = str(TINY_RECIPE)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_tiny_assets(tmp_path_factory.mktemp("assets"))


def _check_ci(d):
    assert 0.0 <= d["low"] <= d["mean"] <= d["high"] <= 1.0, d


def test_run_end_to_end_then_reuse(assets, tmp_path, capsys, caplog, monkeypatch):
    out = tmp_path / "run"
    argv = ["run", RECIPE, *_args(assets, out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "ctrl-exp" in printed and "raw" in printed and "bon:4" in printed

    results = json.loads((out / "results.json").read_text())
    assert results["complete"] and results["missing"] == []
    assert results["procedures"] == ["sample", "bon:4", "won:4"]
    rows = {r["method"]: r for r in results["rows"]}
    assert set(rows) == {"raw", "ctrl-exp", "reference"}
    for r in rows.values():
        assert math.isfinite(r["kl"]["mean"]) and math.isfinite(r["kl"]["stderr"])
        assert r["kl"]["low"] <= r["kl"]["mean"] <= r["kl"]["high"]
        _check_ci(r["standard_win_rate"])
        for proc in results["procedures"]:
            _check_ci(r["win_rate"][proc])
    assert rows["raw"]["beta"] == 0.1 and rows["raw"]["resolved_transform"] == "raw"
    # the policies moved away from pi_ref; the theory bound is reported at their measured KL
    for name in ("raw", "ctrl-exp"):
        assert rows[name]["kl"]["mean"] != 0.0
        bound = rows[name]["theory_bound"]["bon:4"]
        assert bound is None or 0.5 < bound < 1.0
    # pi_ref against its own test artifact (fresh samples): KL exactly 0, win rate ~1/2
    ref = rows["reference"]
    assert ref["kl"]["mean"] == 0.0 and ref["kl"]["stderr"] == 0.0
    assert ref["theory_bound"]["bon:4"] is None
    for proc in results["procedures"]:
        w = ref["win_rate"][proc]
        assert w["low"] <= 0.5 <= w["high"], (proc, w)

    # exp:auto was resolved by the theory engine for bon:4 at rl.target_kl
    tinfo = json.loads((out / "train/ctrl-exp/beta=0.1/transform.json").read_text())
    assert tinfo["spec"] == "exp:auto" and tinfo["procedure"] == "bon:4"
    assert tinfo["resolved"].startswith("exp:") and tinfo["t"] > 1
    ev = json.loads((out / "eval/ctrl-exp/beta=0.1/eval.json").read_text())
    assert ev["policy"]["resolved_transform"] == tinfo["resolved"]
    assert ev["num_prompts"] == 6 and ev["samples_per_prompt"] == 8
    assert ev["reference_samples"] == 8 and ev["kl"]["n"] == 48
    ref_meta = json.loads((out / "reference/train/reference.json").read_text())
    assert ref_meta["num_samples"] == 8 and ref_meta["num_prompts"] == 8
    for stage in ("reference/train", "reference/test", "train/raw/beta=0.1", "eval/reference"):
        manifest = json.loads((out / stage / "manifest.json").read_text())
        assert manifest["status"] == "done" and manifest["stage"] == stage
    metrics = (out / "train/raw/beta=0.1/metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["rl/step"] for x in metrics] == [0, 1, 2]
    assert (out / "config.yaml").is_file() and (out / "manifest.json").is_file()

    # a second run reuses every finished stage: nothing is rewritten; a failing report is only
    # logged (results.json stands)
    import infalign.run.report

    def broken_report(run_dir):
        raise RuntimeError("no plots today")

    monkeypatch.setattr(infalign.run.report, "write_report", broken_report)
    watched = [
        out / "reference/train/reference.jsonl",
        out / "train/raw/beta=0.1/metrics.jsonl",
        out / "train/ctrl-exp/beta=0.1/checkpoint/model.safetensors",
        out / "eval/ctrl-exp/beta=0.1/eval.json",
        out / "eval/reference/eval.json",
    ]
    before = {p: p.stat().st_mtime_ns for p in watched}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="infalign"):
        assert main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in watched} == before
    reused = [r.getMessage() for r in caplog.records if "reusing" in r.getMessage()]
    assert len(reused) == 2 + 2 * 2 + 1, reused  # 2 references, 2 x (train, eval), pi_ref eval
    assert any(
        "write_report failed (RuntimeError: no plots today)" in r.getMessage()
        for r in caplog.records
    )
    watched.append(out / "config.yaml")
    before = {p: p.stat().st_mtime_ns for p in watched}
    assert json.loads((out / "results.json").read_text())["rows"] == results["rows"]

    # a changed setting of a finished stage is an error naming the field, and changes nothing
    capsys.readouterr()
    assert main([*argv, "--evaluate.bootstrap", "50"]) == 2
    err = capsys.readouterr().err
    assert "evaluate.bootstrap=200" in err and "evaluate.bootstrap=50" in err
    assert {p: p.stat().st_mtime_ns for p in watched} == before


def test_train_and_evaluate_verbs_with_override(assets, tmp_path, capsys):
    out = tmp_path / "one"
    base = [RECIPE, *_args(assets, out, **{"rl.steps": 1})]
    assert main(["train", *base, "--method", "raw", "--rl.beta", "0.25"]) == 0
    d = out / "train" / "raw" / "beta=0.25"
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["config"]["rl"]["beta"] == 0.25 and manifest["config"]["rl"]["steps"] == 1
    assert manifest["config"]["rl"]["transform"] == "raw"
    assert manifest["summary"]["rl/step"] == 0
    assert len((d / "metrics.jsonl").read_text().splitlines()) == 1
    top = json.loads((out / "manifest.json").read_text())
    assert top["config"]["rl"]["beta"] == 0.25 and top["command"] == "train"
    assert (out / "reference" / "train" / "reference.json").is_file()
    assert "train raw (raw)" in capsys.readouterr().out

    # evaluating a beta that was never trained is a clear error, before anything is written
    config_mtime = (out / "config.yaml").stat().st_mtime_ns
    assert main(["evaluate", *base, "--method", "raw", "--beta", "0.5"]) == 2
    assert "no finished training run" in capsys.readouterr().err
    assert not (out / "eval").exists() and not (out / "reference" / "test").exists()
    assert (out / "config.yaml").stat().st_mtime_ns == config_mtime

    assert main(["evaluate", *base, "--method", "raw", "--rl.beta", "0.25"]) == 0
    ev = json.loads((out / "eval" / "raw" / "beta=0.25" / "eval.json").read_text())
    assert ev["policy"]["beta"] == 0.25 and ev["policy"]["train_dir"] == "train/raw/beta=0.25"
    assert set(ev["win_rate"]) == {"sample", "bon:4", "won:4"}
    assert "raw" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results["rows"]] == ["raw"]
    assert not results["complete"] and "reference" in results["missing"]

    assert main(["reference", *base, "--split", "test"]) == 0
    assert "reference/test: 6 prompts x K=8" in capsys.readouterr().out

    assert main(["evaluate", *base, "--reference"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("reference  -     0.000")
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results["rows"]] == ["raw", "reference"]
    assert results["missing"] == ["raw/beta=0.1", "ctrl-exp/beta=0.1"]


def test_override_syntax_errors(assets, tmp_path, capsys):
    out = tmp_path / "x"
    assert main(["run", RECIPE, *_args(assets, out), "--rl.steps"]) == 2
    assert "--rl.steps needs a value" in capsys.readouterr().err
    assert main(["run", RECIPE, *_args(assets, out), "stray"]) == 2
    assert "unexpected argument 'stray'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # verbs without a recipe take no overrides
        main(["solve", "--kl", "0.5", "--rl.beta", "1"])
    assert exc.value.code == 2
    assert not out.exists()


def test_the_parser_imports_no_torch():
    """`infalign --help`, `--version` and every user error before work stay fast: building the
    parser imports neither torch nor transformers (they load when a verb runs)."""
    code = (
        "import sys, infalign.cli as c; c.build_parser(); "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
