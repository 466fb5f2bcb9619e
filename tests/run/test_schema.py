"""``infalign config show|schema``: every dataclass field has help and appears in both; the shipped
recipes validate against the generated JSON Schema, and broken recipes do not."""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import jsonschema
import pytest
import yaml

from infalign.cli import main
from infalign.run import schema
from infalign.run.config import RunConfig

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def _field_paths(cls=RunConfig, prefix=""):
    """Every field's dotted path, walked from the dataclasses alone (not from schema.keys)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        yield path
        tp = hints[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = args[0] if args else tp
        if dataclasses.is_dataclass(inner):
            suffix = "[]." if typing.get_origin(tp) is tuple else "."
            yield from _field_paths(inner, path + suffix)


def _property(doc, path):
    """The schema of ``path`` (``methods[].name``) inside the generated JSON Schema."""
    node = doc
    for part in path.split("."):
        while "properties" not in node:  # through anyOf (optional, list-or-item) and array items
            node = next(n.get("items", n) for n in node["anyOf"] if n.get("type") != "null")
        node = node["properties"][part.removesuffix("[]")]
    return node


def test_every_field_has_help_and_is_in_show_and_schema():
    paths = list(_field_paths())
    keys = {k.path: k for k in schema.keys()}
    assert sorted(keys) == sorted(paths)
    assert len(paths) > 90 and "reference_model.lora_r" in paths and "methods[].betas" in paths
    used = {k.help_key for k in keys.values()}
    assert sorted(used - set(schema.HELP)) == []  # a field without help
    assert sorted(set(schema.HELP) - used) == []  # help of a field that is gone
    assert all(schema.HELP[h].strip() and "\n" not in schema.HELP[h] for h in used)
    shown = {line.split()[0] for line in schema.show().splitlines()[1:]}
    assert shown == set(paths)
    doc = schema.json_schema()
    jsonschema.Draft202012Validator.check_schema(doc)
    for path, k in keys.items():
        prop = _property(doc, path)
        assert prop["description"] == schema.HELP[k.help_key], path
        if not k.section:
            assert prop["default"] == k.default, path


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_validate_against_the_schema(recipe):
    jsonschema.validate(yaml.safe_load(recipe.read_text()), schema.json_schema())


@pytest.mark.parametrize(
    "bad",
    [
        {"rl": {"betta": 0.1}},
        {"rl": {"steps": "many"}},
        {"methods": [{"name": "x", "bogus": 1}]},
        {"reference_model": {"lora_r": 1.5}},
        {"evaluate": {"procedures": [3]}},
        {"trackin": ["tensorboard"]},
    ],
)
def test_broken_recipes_do_not_validate(bad):
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema.json_schema())


def test_config_verbs(tmp_path, capsys):
    assert main(["config", "show"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["key", "type", "default", "help"]
    beta = next(line for line in lines if line.startswith("rl.beta "))
    assert beta.split()[:3] == ["rl.beta", "float", "0.1"] and "KL coefficient" in beta
    assert main(["config", "show", str(ROOT / "recipes" / "tiny.yaml"), "--rl.beta", "0.3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["key", "type", "default", "value", "help"]
    steps = next(line for line in lines if line.startswith("rl.steps "))
    assert steps.split()[:4] == ["rl.steps", "int", "100", "3"]  # tiny.yaml's value
    beta = next(line for line in lines if line.startswith("rl.beta "))
    assert beta.split()[:4] == ["rl.beta", "float", "0.1", "0.3"]  # the override
    names = next(line for line in lines if line.startswith("methods[].name "))
    assert '["raw", "ctrl-exp"]' in names
    out = tmp_path / "recipe.schema.json"
    assert main(["config", "schema", "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == schema.json_schema()
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    assert main(["config", "schema"]) == 0
    assert json.loads(capsys.readouterr().out) == schema.json_schema()
