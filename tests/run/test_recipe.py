"""Reading recipes (``infalign.run.recipe``): values coerced to the annotated field types, errors
that name the dotted key, and a config that survives a dump and a reload unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from infalign.run.config import MethodConfig, RunConfig
from infalign.run.recipe import coerce, dump_config, from_dict, load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("tp", "value", "expected"),
    [
        (tuple[str, ...], "sample,bon:4", ("sample", "bon:4")),
        (tuple[str, ...], ["sample"], ("sample",)),
        (tuple[float, ...], 0.1, (0.1,)),
        (tuple[float, ...], "0.1,0.2", (0.1, 0.2)),
        (tuple[MethodConfig, ...], {"name": "m"}, (MethodConfig(name="m"),)),
        (int | None, None, None),
        (int | None, "7", 7),
        (int, 3.0, 3),
        (float, "1e-5", 1e-5),  # YAML 1.1 reads 1e-5 as text
        (float, 2, 2.0),
        (bool, "yes", True),
        (bool, False, False),
        (str, 12, "12"),
    ],
)
def test_coerce_follows_the_field_type(tp, value, expected):
    out = coerce(tp, value, "a.b")
    assert out == expected and type(out) is type(expected)


@pytest.mark.parametrize(
    ("tp", "value", "why"),
    [
        (int, 3.5, "expected an integer"),
        (int, True, "expected a number (int)"),
        (float, "fast", "expected a number (float)"),
        (bool, 1, "expected true or false"),
        (str, [1], "expected a string"),
        (MethodConfig, [1], "expected a mapping for MethodConfig"),
    ],
)
def test_coerce_errors_name_the_key(tp, value, why):
    with pytest.raises(ValueError) as err:
        coerce(tp, value, "a.b")
    assert str(err.value) == f"config a.b={value!r}: {why}"


def test_unknown_key_points_to_config_show():
    with pytest.raises(
        ValueError, match=r"config rl\.betta=0\.1: unknown key.*infalign config show"
    ):
        from_dict(RunConfig, {"rl": {"betta": 0.1}})


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_a_dumped_config_reloads_unchanged(recipe, tmp_path):
    cfg = load_config(recipe)
    assert from_dict(RunConfig, yaml.safe_load(dump_config(cfg))) == cfg
    assert from_dict(RunConfig, {}) == RunConfig()
