"""Every CLI user error: exit status 2, exactly one line on stderr naming the culprit, no traceback,
nothing left in ``--out`` (issue 11, items 3, 5, 8 and 10, and the earlier bad-input table).

Each case builds its argv in a temp directory on the tiny assets; the CLI runs in-process, so an
exception escaping ``main`` (the traceback a user would see) fails the test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from tiny_assets import RECIPE, REWARD, recipe_overrides, write_tiny_assets

import infalign
from infalign.cli import build_parser, main

FNS = Path(__file__).resolve().parents[1] / "reward_fns.py"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_tiny_assets(tmp_path_factory.mktemp("assets"))


def _run(**over: object) -> Callable[[dict, Path], list[str]]:
    """A case that runs the tiny recipe with these overrides (``out`` is the case's --out)."""
    return lambda a, out: ["run", str(RECIPE), *recipe_overrides(a, out, **over)]


def _reward(fn: str) -> Callable[[dict, Path], list[str]]:
    return _run(**{"reward.name": f"{FNS}:{fn}"})


def _recipe_file(text: bytes) -> Callable[[dict, Path], list[str]]:
    def make(a: dict, out: Path) -> list[str]:
        recipe = out.parent / "recipe.yaml"
        recipe.write_bytes(text)
        return ["run", str(recipe)]

    return make


def _prompts_file(text: bytes) -> Callable[[dict, Path], list[str]]:
    def make(a: dict, out: Path) -> list[str]:
        src = out.parent / "prompts.jsonl"
        src.write_bytes(text)
        return _run(**{"prompts.train.source": src})(a, out)

    return make


def _out_below_file(a: dict, out: Path) -> list[str]:
    (out.parent / "afile").write_text("not a directory")
    return _run()(a, out.parent / "afile" / "run")


def _out_is_file(a: dict, out: Path) -> list[str]:
    (out.parent / "afile").write_text("not a directory")
    return _run()(a, out.parent / "afile")


def _frontier_out_file(a: dict, out: Path) -> list[str]:
    (out.parent / "afile").write_text("not a directory")
    return ["frontier", "--kl", "0.5", "--out", str(out.parent / "afile")]


# case -> (argv maker, substrings the one error line must contain)
CASES: dict[str, tuple[Callable[[dict, Path], list[str]], list[str]]] = {
    # the earlier bad-input table
    "empty prompt set": (
        lambda a, o: _run(**{"prompts.train.source": a["empty"]})(a, o),
        ["prompts.train.source", "empty"],
    ),
    "nan reward": (
        _run(**{"reward.name": REWARD.replace("vowel_reward", "nan_reward")}),
        ["nan", "prompt 0, completion 0"],
    ),
    "M < N": (
        _run(**{"evaluate.samples_per_prompt": 3}),
        ["evaluate.samples_per_prompt=3", "bon:4"],
    ),
    "unknown transform": (
        _run(methods="[{name: bad, transform: 'expo:3', betas: [0.1]}]"),
        ["methods[0].transform='expo:3'", "unknown transform"],
    ),
    "KL pin on a fixed transform": (
        _run(methods="[{name: bad, transform: 'identity@0.3', betas: [0.1]}]"),
        ["methods[0].transform='identity@0.3'", "only follows"],
    ),
    "unknown procedure": (
        _run(**{"evaluate.procedures": "sample,bestof:4"}),
        ["evaluate.procedures[1]='bestof:4'", "unknown procedure"],
    ),
    "missing column": (
        lambda a, o: _run(**{"prompts.test.source": a["other"]})(a, o),
        ["column 'prompt' missing", "other.jsonl"],
    ),
    "unknown key": (_run(**{"rl.betta": 0.1}), ["rl.betta", "unknown key"]),
    "missing model dir": (
        lambda a, o: _run(**{"model.name": str(a["model"]) + "-gone"})(a, o),
        ["model.name", "no such file"],
    ),
    "bad method name": (_run(methods="[{name: ../up, transform: raw}]"), ["methods[0].name"]),
    # item 3: a causal LM as the reward classifier (its score head would be random)
    "causal LM as reward model": (
        lambda a, o: _run(**{"reward.kind": "hf", "reward.name": a["model"]})(a, o),
        ["not a trained sequence classifier", "score.weight"],
    ),
    # item 5: a KL outside the documented range, as a number
    "frontier KL out of range": (
        lambda a, o: ["frontier", "--kl", "20", "--transforms", "identity", "--out", str(o)],
        ["kl must be in (0, 12] nats, got 20"],
    ),
    # item 8: tracebacks for user errors
    "malformed YAML": (
        _recipe_file(b"out: [1,\nrl: {beta: 0.1}\n"),
        ["recipe.yaml", "not valid yaml", "at line 3, column 1"],
    ),
    "out is a file": (_out_is_file, ["afile", "is a file"]),
    "out below a file": (_out_below_file, ["afile", "which is a file"]),
    "frontier --out a file": (_frontier_out_file, ["--out=", "afile", "is a file"]),
    "reward raises": (
        _reward("failing_reward"),
        ["failing_reward raised Boom: reward backend crashed", "reward_fns.py:"],
    ),
    "reward calls sys.exit": (_reward("exiting_reward"), ["exiting_reward called sys.exit(3)"]),
    # item 10: messages that named nothing or misled
    "inf beta": (_run(**{"rl.beta": ".inf"}), ["rl.beta", "finite"]),
    "nan lr": (_run(**{"rl.lr": "nan"}), ["rl.lr", "finite"]),
    "inf max_grad_norm": (_run(**{"rl.max_grad_norm": "inf"}), ["rl.max_grad_norm", "finite"]),
    "inf in a list of betas": (
        _run(methods="[{name: m, transform: raw, betas: [0.1, .inf]}]"),
        ["methods[0].betas[1]", "finite"],
    ),
    "negative weight_decay": (_run(**{"rl.weight_decay": -5}), ["rl.weight_decay", ">= 0"]),
    "non-UTF-8 prompts": (
        _prompts_file(b'{"prompt": "caf\xe9"}\n'),
        ["prompts.jsonl' line 1 is not utf-8"],
    ),
    "recipe is a directory": (lambda a, o: ["run", str(o.parent)], ["is a directory"]),
    "non-UTF-8 recipe": (_recipe_file(b"out: caf\xe9\n"), ["recipe.yaml", "not utf-8"]),
    "reward of 1e300": (_reward("huge_reward"), ["1e+300", "exceeds float32"]),
    "None reward": (_reward("none_reward"), ["none_reward returned none"]),
    "malformed override": (_run(**{"rl.beta": "[0.1"}), ["rl.beta", "not valid yaml"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_user_error_is_one_line_exit_2_and_leaves_nothing(case, assets, tmp_path, capsys):
    make, needles = CASES[case]
    out = tmp_path / "case" / "run"
    out.parent.mkdir()
    argv = make(assets, out)
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    verb = argv[0]
    errors = [line for line in err if "error" in line.lower() or "Traceback" in line]
    assert errors == [err[-1]] and err[-1].startswith(f"infalign {verb}: error: "), err
    for needle in needles:
        assert needle.lower() in err[-1].lower(), (needle, err[-1])
    assert not out.exists(), sorted(str(p) for p in out.rglob("*"))


def test_read_only_output_directory_is_refused_before_any_work(
    assets, tmp_path, capsys, monkeypatch
):
    """(os.access, as root ignores a chmod: the directory is read-only for this test's purposes.)"""
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != locked and real(p, mode))
    argv = ["run", str(RECIPE), *recipe_overrides(assets, locked / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err == f"infalign run: error: out='{locked / 'run'}': directory '{locked}' is not writable"
    )
    assert list(locked.iterdir()) == []


def test_a_permission_error_while_writing_is_one_line(tmp_path, capsys, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "x" / "frontier.csv"))

    monkeypatch.setattr("infalign.theory.frontier", denied)
    assert main(["frontier", "--kl", "0.5", "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err == (
        f"infalign frontier: error: cannot write '{tmp_path / 'x' / 'frontier.csv'}': "
        "Permission denied\n"
    )


def test_malformed_yaml_in_a_real_process_is_one_line(tmp_path):
    """The same through the console entry point: one stderr line, status 2, no traceback."""
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("out: [1,\n")
    proc = subprocess.run(
        [sys.executable, "-m", "infalign.cli", "run", str(recipe)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"infalign run: error: recipe '{recipe}' is not valid YAML")


def test_verbose_is_accepted_after_the_verb(capsys):
    parser = build_parser()
    for argv in (
        ["-v", "run", "r.yaml"],
        ["run", "r.yaml", "--verbose"],
        ["run", "r.yaml", "-v"],
        ["serve-reward", "r.yaml", "-v"],  # a verb registered with parents of its own
    ):
        args, extra = parser.parse_known_args([*argv, "--rl.steps", "2"])
        assert args.verbose is True and extra == ["--rl.steps", "2"], argv
    args, _ = parser.parse_known_args(["run", "r.yaml"])
    assert args.verbose is False


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"infalign {infalign.__version__}\n"
