"""The design's size limits, kept true by the suite: modules <= 400 lines, functions <= 60 lines
(docstrings not counted), and the tree's layers import only downwards."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "infalign"
MODULES = sorted(PKG.rglob("*.py"))
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
# what each layer may import from infalign: core is pure math, theory solves it exactly, lm and rl
# use the configs and the atomic-write helpers of run/ (config, io, lock) but not the stages, which
# build on them
LAYERS = {
    "core": ("core",),
    "theory": ("core", "theory"),
    "lm": ("core", "lm", "run.config", "run.io"),
    "rl": ("core", "lm", "rl", "run.config", "run.io", "run.lock"),
}


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            doc = 0
            if (
                body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                doc = body[0].end_lineno - body[0].lineno + 1
            yield node, node.end_lineno - node.lineno + 1 - doc


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PKG)))
def test_module_and_function_sizes(path):
    src = path.read_text()
    n = len(src.splitlines())
    assert n <= MAX_MODULE_LINES, f"{path.relative_to(PKG)} has {n} lines > {MAX_MODULE_LINES}"
    long = [
        f"{f.name} ({k} lines, line {f.lineno})"
        for f, k in _functions(ast.parse(src))
        if k > MAX_FUNCTION_LINES
    ]
    assert not long, f"{path.relative_to(PKG)}: functions over {MAX_FUNCTION_LINES} lines: {long}"


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_layers_import_only_downwards(layer):
    bad = []
    for path in sorted((PKG / layer).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                inner = name.removeprefix("infalign.")
                if name.startswith("infalign.") and not any(
                    inner == ok or inner.startswith(ok + ".") for ok in LAYERS[layer]
                ):
                    bad.append(f"{path.relative_to(PKG)} imports {name}")
    assert not bad, bad
