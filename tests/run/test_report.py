"""Report layer: calibrated-space frontier plot/table, the run report built from artifacts only, and
the CLI verbs that draw them (report, frontier, solve)."""

import csv
import json

import pytest
import yaml

from infalign import theory
from infalign.cli import main
from infalign.run import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def frontier_rows():
    return theory.frontier("bon:4", ["identity", "exp:auto", "optimal"], [0.1, 0.5, 1.0])


def test_plot_frontier_and_table(frontier_rows, tmp_path):
    out = report.plot_frontier(frontier_rows, tmp_path / "sub" / "f.png", procedure="bon:4")
    assert out == tmp_path / "sub" / "f.png"
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    assert [p.name for p in out.parent.iterdir()] == ["f.png"]  # no temp file left behind
    table = report.frontier_table(frontier_rows)
    lines = table.strip().splitlines()
    assert len(lines) == 2 + len(frontier_rows)
    for label in ("identity", "exp:auto", "optimal"):
        assert sum(f"| {label} |" in ln for ln in lines) == 3
    ident = next(r for r in frontier_rows if r.transform == "identity" and abs(r.kl - 0.5) < 1e-6)
    assert f"{ident.win_rate:.4f}" in table
    with pytest.raises(ValueError, match="no rows"):
        report.plot_frontier([], tmp_path / "g.png", procedure="bon:4")


# --- a synthetic run directory in the pipeline's layout ------------------------------------------

COMMIT = "0123456789abcdef0123456789abcdef01234567"
# (method, transform, beta): (kl mean, kl stderr, {proc: (mean, low, high)}, theory bound bon:4)
ROWS = {
    ("raw", "raw", 0.1): (0.2345, 0.0123, {"sample": (0.6111, 0.5911, 0.6311), "bon:4": (0.6522, 0.6201, 0.6843)}, 0.8123),
    ("raw", "raw", 0.05): (0.4567, 0.0211, {"sample": (0.6432, 0.6232, 0.6632), "bon:4": (0.7011, 0.6711, 0.7311)}, 0.8634),
    ("ctrl-exp", "exp:auto", 0.1): (0.2222, 0.0101, {"sample": (0.5876, 0.5676, 0.6076), "bon:4": (0.7234, 0.6934, 0.7534)}, 0.8077),
    ("ctrl-exp", "exp:auto", 0.05): (0.5111, 0.0305, {"sample": (0.6012, 0.5812, 0.6212), "bon:4": (0.7899, 0.7599, 0.8199)}, None),
}  # fmt: skip


def _wr(mean, low, high):
    return {"mean": mean, "low": low, "high": high, "stderr": 0.01}


def make_run(d, with_results=True):
    cfg = {
        "out": str(d),
        "seed": 1234,
        "model": {"name": "tiny/model", "dtype": "float32", "lora_r": 0},
        "reward": {"kind": "callable", "name": "tests/tiny_assets.py:vowel_reward"},
        "prompts": {"train": {"source": "train.jsonl"}, "test": {"source": "test.jsonl"}},
        "sampling": {"temperature": 0.7, "top_p": 0.95, "max_new_tokens": 24},
        "reference": {"num_samples": 37, "smoothed": False},
        "rl": {"steps": 3, "prompts_per_step": 4, "samples_per_prompt": 6, "lr": 0.001},
        "methods": [
            {"name": "raw", "transform": "raw", "betas": [0.1, 0.05]},
            {"name": "ctrl-exp", "transform": "exp:auto", "betas": [0.1, 0.05]},
        ],
        "evaluate": {"procedures": ["sample", "bon:4"], "samples_per_prompt": 8},
        "report": {"procedure": "bon:4", "title": "synthetic run"},
    }
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    manifest = {
        "config": cfg,
        "seed": 1234,
        "versions": {"infalign": "0.1.0", "torch": "2.13.0"},
        "git_commit": COMMIT,
        "command": "run",
        "argv": ["/venv/bin/infalign", "run", "recipes/synthetic.yaml", "--rl.steps", "3"],
    }
    (d / "manifest.json").write_text(json.dumps(manifest))
    for split, n in (("train", 20), ("test", 10)):
        (d / "reference" / split).mkdir(parents=True)
        meta = {
            "num_samples": 37 if split == "train" else 8,
            "num_prompts": n,
            "tie_fraction": 0.125,
        }
        (d / "reference" / split / "reference.json").write_text(json.dumps(meta))
    rows = []
    for (method, tf, beta), (kl, se, wins, bound) in ROWS.items():
        td = d / "train" / method / f"beta={beta!r}"
        td.mkdir(parents=True)
        steps = [
            {"rl/step": s, "rl/reward_raw": 0.1 * s, "rl/reward_calibrated": 0.5 + 0.05 * s,
             "rl/reward_transformed": 1.0 + s, "rl/kl_seq": kl * s / 2, "rl/time/step": 0.25}
            for s in range(3)
        ]  # fmt: skip
        if tf == "raw":
            for s in steps:
                del s["rl/reward_calibrated"]
        (td / "metrics.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
        (td / "transform.json").write_text(json.dumps({"spec": tf, "resolved": tf}))
        ed = d / "eval" / method / f"beta={beta!r}"
        ed.mkdir(parents=True)
        (ed / "eval.json").write_text("{}")
        rows.append(
            {
                "method": method,
                "transform": tf,
                "resolved_transform": "exp:12.633858298560305" if tf == "exp:auto" else "raw",
                "beta": beta,
                "kl": {"mean": kl, "stderr": se, "low": kl - 2 * se, "high": kl + 2 * se},
                "win_rate": {p: _wr(*w) for p, w in wins.items()},
                "standard_win_rate": _wr(*wins["sample"]),
                "theory_bound": {"bon:4": bound, "sample": None},
                "reward_mean": 0.4321,
                "length_mean": 12.5,
            }
        )
    rows.append(
        {
            "method": "reference",
            "transform": None,
            "beta": None,
            "kl": {"mean": 0.0, "stderr": 0.0, "low": 0.0, "high": 0.0},
            "win_rate": {
                "sample": _wr(0.4987, 0.4787, 0.5187),
                "bon:4": _wr(0.5013, 0.4813, 0.5213),
            },
            "standard_win_rate": _wr(0.4987, 0.4787, 0.5187),
            "theory_bound": {"bon:4": None},
        }
    )
    if with_results:
        results = {
            "procedures": ["sample", "bon:4"],
            "headline_procedure": "bon:4",
            "confidence": 0.95,
            "complete": True,
            "missing": [],
            "rows": rows,
        }
        (d / "results.json").write_text(json.dumps(results))
    return d


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run") / "r")


@pytest.fixture(scope="module")
def written(run_dir):
    return report.write_report(run_dir)


def test_write_report_shows_the_artifacts(run_dir, written):
    assert written == run_dir / "report.md"
    md = written.read_text()
    assert md.startswith("# synthetic run")
    for name in ("winrate_vs_kl.png", "training.png"):
        assert (run_dir / name).read_bytes().startswith(PNG_MAGIC)
        assert f"]({name})" in md
    table = [
        ln for ln in md.splitlines() if ln.startswith("| raw |") or ln.startswith("| ctrl-exp |")
    ]
    assert len(table) == 4
    for (method, _tf, beta), (kl, se, wins, bound) in ROWS.items():
        line = next(ln for ln in table if ln.startswith(f"| {method} |") and f"| {beta:g} |" in ln)
        assert f"{kl:.4f} ± {se:.4f}" in line
        for mean, low, high in wins.values():
            assert f"{mean:.4f} [{low:.4f}, {high:.4f}]" in line
        if bound is not None:  # read from results.json, not recomputed
            assert f"| {bound:.4f} |" in line
        else:  # missing in the artifact: the theory optimum at the measured KL, computed
            want = theory.optimal_policy("bon:4", kl=kl).win_rate("bon:4")
            assert f"| {want:.4f} |" in line
    assert "exp:auto → exp:12.63 |" in md
    # within a method rows are ordered by KL
    assert table.index(next(ln for ln in table if "0.2345" in ln)) < table.index(
        next(ln for ln in table if "0.4567" in ln)
    )
    ref = next(ln for ln in md.splitlines() if ln.startswith("| reference |"))
    assert "0.5013 [0.4813, 0.5213]" in ref
    # settings, every one read from config.yaml / manifest.json / reference.json
    settings = md[md.index("## Settings") :]
    for text in ("1234", COMMIT, "tiny/model", "vowel_reward", "| 37 |", "| 6 |", "torch 2.13.0",
                 "temperature 0.7", "max_new_tokens 24", "12.5%", "sample, bon:4", "20 from train.jsonl",
                 "10 from test.jsonl", "reference M' = 8"):  # fmt: skip
        assert text in settings, text
    assert "infalign run recipes/synthetic.yaml --rl.steps 3" in md
    assert "## How to read this" in md
    assert "calibrated-space optimum" in md
    # training summary: last logged step of each run
    assert "| raw β=0.1 | 3 |" in md
    assert "| ctrl-exp β=0.05 | 3 | 0.6000 | 3.0000 | 0.5111 | 0.8 |" in md


def test_write_report_missing_artifacts(tmp_path):
    d = make_run(tmp_path / "r", with_results=False)
    with pytest.raises(ValueError, match=r"results\.json"):
        report.write_report(d)
    with pytest.raises(ValueError, match="does not exist"):
        report.write_report(tmp_path / "nope")
    make_run(tmp_path / "s")
    (tmp_path / "s" / "config.yaml").unlink()
    (tmp_path / "s" / "manifest.json").write_text("{}")
    with pytest.raises(ValueError, match=r"config\.yaml"):
        report.write_report(tmp_path / "s")
    (tmp_path / "s" / "manifest.json").write_text(json.dumps({"config": {"seed": 1}}))
    (tmp_path / "s" / "results.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="no result rows"):
        report.write_report(tmp_path / "s")


def test_write_report_tolerates_missing_optional_artifacts(tmp_path):
    d = make_run(tmp_path / "r")
    for p in [*d.glob("train/*/beta=*/metrics.jsonl"), *d.glob("reference/*/reference.json")]:
        p.unlink()
    (d / "manifest.json").unlink()
    res = json.loads((d / "results.json").read_text())
    res["rows"][0]["kl"] = {"mean": -0.0125, "stderr": 0.02}  # a negative Monte-Carlo estimate
    for r in res["rows"]:
        r.pop("theory_bound")
    (d / "results.json").write_text(json.dumps(res))
    md = report.write_report(d).read_text()
    assert "-0.0125 ± 0.0200" in md
    assert (d / "winrate_vs_kl.png").read_bytes().startswith(PNG_MAGIC)
    assert "No training metrics" in md
    assert not (d / "training.png").exists()
    assert "0.7899 [0.7599, 0.8199]" in md
    assert f"infalign run {d / 'config.yaml'} --out NEW_RUN_DIR" in md
    assert "| git commit | n/a |" in md


# --- CLI -----------------------------------------------------------------------------------------


def test_cli_report(run_dir, written, tmp_path, capsys):
    first = written.read_text()
    assert main(["report", str(run_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(run_dir / "report.md")
    assert (run_dir / "report.md").read_text() == first  # repeatable
    assert [p.name for p in run_dir.iterdir() if p.name.startswith(".")] == []  # no temp files
    assert main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not exist" in err


def test_cli_frontier(tmp_path, capsys):
    out = tmp_path / "fr"
    argv = ["frontier", "--procedure", "bon:4", "--transforms", "identity,exp:auto,optimal"]
    assert main([*argv, "--kl", "0.1:1:4", "--out", str(out)]) == 0
    with open(out / "frontier.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 12
    assert {r["transform"] for r in rows} == {"identity", "exp:auto", "optimal"}
    assert (out / "frontier.png").read_bytes().startswith(PNG_MAGIC)
    assert "frontier.csv" in capsys.readouterr().out


def test_cli_solve_json(capsys):
    assert main(["solve", "--procedure", "bon:4", "--kl", "0.5", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["win_rate"] == pytest.approx(0.873, abs=2e-3)
    assert rec["identity_win_rate"] == pytest.approx(0.800, abs=2e-3)
    assert rec["optimal_win_rate"] >= rec["win_rate"] - 1e-6


def test_cli_bad_procedure(capsys):
    assert main(["solve", "--procedure", "bon:x", "--kl", "0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bon:x" in err


def test_report_warns_about_a_small_test_set(run_dir):
    meta_path = run_dir / "reference" / "test" / "reference.json"
    meta = json.loads(meta_path.read_text())
    for n, warned in ((5, True), (64, False)):
        meta["num_prompts"] = n
        meta_path.write_text(json.dumps(meta))
        md = report.write_report(run_dir).read_text()
        assert (f"Only {n} test prompts" in md) is warned
