"""Every recipe key, discoverable: ``infalign config show [RECIPE]`` (key, type, default, one line
of help; with a recipe, its resolved values) and ``infalign config schema`` (a JSON Schema of the
recipe for editors). Both are generated from the dataclasses of :mod:`infalign.run.config`; the help
lives in :data:`HELP`, keyed by dotted path. A dataclass used in several places has one help entry:
``model.*`` also serves ``reference_model.*``, ``prompts.<split>.*`` both prompt sets and
``methods[].*`` every method.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Iterator
from typing import Any

from infalign.run.config import MethodConfig, ModelConfig, PromptSetConfig, RunConfig, to_dict

__all__ = ["HELP", "Key", "json_schema", "keys", "register", "show"]

# where the help of a dataclass used in several places lives
_HELP_PREFIX = {ModelConfig: "model", PromptSetConfig: "prompts.<split>", MethodConfig: "methods[]"}

HELP: dict[str, str] = {
    "out": "run directory: config.yaml, manifest.json, reference/, train/, eval/, results.json",
    "seed": "seeds the reference artifacts (train and test use derived seeds)",
    "task": "a shipped task (helpful | harmless): fills reward, prompts and report.procedure",
    "tracking": "experiment trackers: tensorboard, wandb, trackio, mlflow (files under <out>/tracking)",
    "model": "the policy that is trained; also pi_ref unless reference_model is set",
    "model.name": "hub name or local directory (safetensors) of a causal LM",
    "model.tokenizer": "tokenizer name or directory (null: the model's)",
    "model.gguf_file": "load the weights from this GGUF file inside `name` (transformers + gguf)",
    "model.dtype": "weights dtype: float32 | bfloat16 | float16 | auto",
    "model.device": "auto | cpu | cuda | cuda:N | mps",
    "model.trust_remote_code": "run the model repository's own code (off unless you trust it)",
    "model.lora_r": "LoRA rank through peft; 0 trains every weight",
    "model.lora_alpha": "LoRA scaling alpha",
    "model.lora_dropout": "LoRA dropout",
    "model.lora_target_modules": "LoRA target module names (empty: peft's default for the model)",
    "reference_model": "the frozen reference pi_ref (null: the same as model)",
    "reward": "the reward r(x, y): a sequence classifier or a Python function",
    "reward.kind": "hf (a sequence-classification model) | callable (module:function)",
    "reward.name": "reward model path / hub name, or module:function / file.py:function",
    "reward.batch_size": "texts per reward-model forward",
    "reward.max_length": "hf: truncate reward inputs to this many tokens",
    "reward.device": "hf: auto | cpu | cuda | cuda:N | mps",
    "reward.label_index": "hf: which logit is the reward when the model has several labels",
    "reward.dtype": "hf: reward-model weights dtype: float32 | bfloat16 | float16 | auto",
    "reward.pair": "hf: tokenize (prompt, completion) as a text pair instead of concatenating",
    "prompts": "the training and the held-out test prompt sets",
    "prompts.train": "training prompts (calibration and RL)",
    "prompts.test": "held-out prompts (evaluation)",
    "prompts.<split>.source": "a .jsonl/.json/.csv/.parquet file, a datasets directory or hf:NAME",
    "prompts.<split>.split": "dataset split to read (datasets sources)",
    "prompts.<split>.column": "the column that holds the prompt",
    "prompts.<split>.format": "plain | hh (Anthropic HH: the dialogue up to the final Assistant:)",
    "prompts.<split>.limit": "use the first N prompts (null: all)",
    "prompts.<split>.chat_template": "wrap each prompt with the tokenizer's chat template",
    "prompts.<split>.max_prompt_tokens": "longest prompt in tokens (null: no limit)",
    "prompts.<split>.truncate": "truncate a too-long prompt from the left instead of failing",
    "sampling": "one policy for reference sampling, RL rollouts and evaluation",
    "sampling.temperature": "sampling temperature (log-probs are tempered the same way)",
    "sampling.top_p": "nucleus sampling mass in (0, 1]",
    "sampling.top_k": "sample among the k most likely tokens only; 0: off",
    "sampling.max_new_tokens": "longest completion in tokens",
    "sampling.batch_size": "rows per sampling chunk (chunk i is seeded from (seed, i))",
    "sampling.backend": "hf (transformers' generate) | native (CPU decoding loop) | vllm",
    "reference": "the cached reference samples that calibrate the reward",
    "reference.num_samples": "K reference samples per training prompt",
    "reference.smoothed": "mid-rank calibration (never exactly 0 or 1)",
    "rl": "the CTRL trainer; each method x beta overrides transform and beta",
    "rl.algorithm": "rloo (on-policy RLOO) | regression (on the exact optimum, spec 6b)",
    "rl.transform": "transform spec (identity, log, exp:T, exp:auto[@KL], optimal, ...) or raw",
    "rl.beta": "KL coefficient beta",
    "rl.steps": "optimizer steps",
    "rl.prompts_per_step": "prompts per step (over all processes)",
    "rl.samples_per_prompt": "M: policy samples (rloo) / reference samples (regression) per prompt",
    "rl.lr": "AdamW learning rate",
    "rl.weight_decay": "AdamW weight decay",
    "rl.warmup_steps": "linear learning-rate warm-up steps",
    "rl.max_grad_norm": "clip the gradient norm to this (<= 0: no clipping)",
    "rl.onpolicy_samples": "regression: fresh policy samples added per prompt and step",
    "rl.ppo_epochs": "rloo: optimisation epochs per batch of samples",
    "rl.clip_eps": "rloo: PPO clipping epsilon (epochs 2 and later)",
    "rl.normalize_std": "rloo: divide advantages by the per-prompt std (changes the objective)",
    "rl.grad_accum": "gradient-accumulation micro-batches per step",
    "rl.bf16": "bf16 mixed precision where supported",
    "rl.save_every": "checkpoint every N steps",
    "rl.seed": "seeds prompt order, rollouts and LoRA initialisation",
    "rl.kl_target": "rloo: adapt beta toward this sequence KL in nats (null: fixed beta)",
    "rl.kl_horizon": "rloo: steps over which the KL controller adapts beta",
    "rl.target_kl": "KL budget (nats) at which exp:auto / negexp:auto / optimal are resolved",
    "methods": "the sweep: one training run per method x beta (empty: rl.transform at rl.beta)",
    "methods[].name": "method name (a directory name; not 'reference')",
    "methods[].transform": "transform spec of this method, or raw",
    "methods[].betas": "the betas to train this method at",
    "evaluate": "inference-time win rates and KL of every policy on the test prompts",
    "evaluate.procedures": "procedures to evaluate: sample | bon:N | won:N | kth:K:N",
    "evaluate.samples_per_prompt": "M policy samples per test prompt (>= N of every procedure)",
    "evaluate.reference_samples": "M' reference samples per test prompt",
    "evaluate.bootstrap": "bootstrap resamples over prompts for the intervals",
    "evaluate.confidence": "interval confidence level in (0, 1)",
    "evaluate.seed": "seeds evaluation sampling and the bootstrap",
    "evaluate.per_prompt": "also write per-prompt win-rate estimates into eval.json",
    "report": "report.md and its plots",
    "report.procedure": "the deployed procedure: resolves exp:auto and heads the report",
    "report.title": "the report's title",
}


@dataclasses.dataclass(frozen=True)
class Key:
    """One recipe key: its dotted ``path`` (``methods[].name``), the :data:`HELP` key, its
    annotated type, its default (null for a section) and whether it is a section."""

    path: str
    help_key: str
    type: Any
    default: Any
    section: bool


def _inner(tp: Any) -> tuple[Any, bool]:
    """(the type without ``| None``, whether it was optional)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return args[0], True
    return tp, False


def _dataclass_of(tp: Any) -> Any:
    """The dataclass a field holds (``X``, ``X | None``, ``tuple[X, ...]``), or None."""
    tp = _inner(tp)[0]
    if typing.get_origin(tp) is tuple:
        tp = typing.get_args(tp)[0]
    return tp if dataclasses.is_dataclass(tp) else None


def keys(cls: Any = RunConfig, path: str = "", help_path: str = "") -> Iterator[Key]:
    """Every key of ``cls`` depth-first, in declaration order; sections before their keys."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        p = f"{path}.{f.name}" if path else f.name
        h = f"{help_path}.{f.name}" if help_path else f.name
        sub = _dataclass_of(hints[f.name])
        if sub is None:
            default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            yield Key(p, h, hints[f.name], to_dict(default), False)
            continue
        yield Key(p, h, hints[f.name], None, True)
        many = typing.get_origin(_inner(hints[f.name])[0]) is tuple
        yield from keys(
            sub, f"{p}[]" if many else p, _HELP_PREFIX.get(sub, f"{h}[]" if many else h)
        )


def type_name(tp: Any) -> str:
    """``float``, ``int | null``, ``list[str]``, ``section``, ``list[section]``."""
    tp, optional = _inner(tp)
    if dataclasses.is_dataclass(tp):
        name = "section"
    elif typing.get_origin(tp) is tuple:
        name = f"list[{type_name(typing.get_args(tp)[0])}]"
    else:
        name = tp.__name__
    return f"{name} | null" if optional else name


def _value(cfg: Any, path: str) -> Any:
    """The value at ``path`` in a RunConfig as plain data (``methods[].name``: one per method)."""
    node: Any = to_dict(cfg)
    for part in path.split("."):
        many = part.endswith("[]")
        part = part.removesuffix("[]")
        node = [n.get(part) for n in node] if isinstance(node, list) else (node or {}).get(part)
        if many and node is None:
            node = []
    return node


def _text(value: Any) -> str:
    """YAML-like: ``null``, ``true``, ``[]``, ``""``, else the value as written."""
    plain = isinstance(value, (int, float, str)) and not isinstance(value, bool) and value != ""
    return str(value) if plain else json.dumps(value)


def show(cfg: RunConfig | None = None) -> str:
    """One line per key: path, type, default and help; with ``cfg``, its resolved value after the
    default (sections show no values)."""
    rows = []
    for k in keys():
        value = "" if cfg is None or k.section else _text(_value(cfg, k.path))
        default = "" if k.section else _text(k.default)
        row = [k.path, type_name(k.type), default, *([value] if cfg is not None else [])]
        rows.append([*row, HELP.get(k.help_key, "")])
    head = ["key", "type", "default", *(["value"] if cfg is not None else []), "help"]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head) - 1)]
    return "\n".join(
        "  ".join([*(c.ljust(w) for c, w in zip(r, widths, strict=False)), r[-1]]).rstrip()
        for r in [head, *rows]
    )


_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean"}


def _wrap(item: dict[str, Any], tp: Any) -> dict[str, Any]:
    """``item`` (the schema of one value) as the field type ``tp`` takes it: a ``tuple[X, ...]``
    field takes a list or a single item (as :func:`infalign.run.recipe.coerce` does), an optional
    one also null."""
    tp, optional = _inner(tp)
    out = (
        {"anyOf": [{"type": "array", "items": item}, item]}
        if typing.get_origin(tp) is tuple
        else item
    )
    return {"anyOf": [out, {"type": "null"}]} if optional else out


def json_schema() -> dict[str, Any]:
    """A JSON Schema (draft 2020-12) of a recipe, built from :func:`keys`: every section an object
    that admits only its keys; every key with its type, default and help as description."""
    root: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": {}}
    objects = {"": root}  # the path prefix of a section's keys -> its object schema
    for k in keys():
        parent, _, name = k.path.rpartition(".")
        if k.section:
            item = {"type": "object", "additionalProperties": False, "properties": {}}
            many = typing.get_origin(_inner(k.type)[0]) is tuple
            objects[f"{k.path}[]" if many else k.path] = item
        else:
            base = _inner(k.type)[0]
            base = typing.get_args(base)[0] if typing.get_origin(base) is tuple else base
            item = {"type": _JSON_TYPES[base]}
        prop = {**_wrap(item, k.type), "description": HELP.get(k.help_key, "")}
        if not k.section:
            prop["default"] = k.default
        objects[parent]["properties"][name] = prop
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "infalign recipe",
        "description": "infalign run RECIPE: see `infalign config show` and recipes/tiny.yaml",
        **root,
    }


# --- the CLI verb (registered by infalign.cli) ---------------------------------------------------


def register(sub: Any, load_recipe: Any) -> None:
    """Add ``infalign config show [RECIPE [--section.key VALUE ...]]`` and ``infalign config
    schema [--out FILE]``; ``load_recipe(args)`` is the CLI's recipe loader (with overrides)."""

    def cmd_show(args: Any) -> int:
        if args.recipe is None and args.extra:
            raise ValueError(f"config show: overrides {args.extra} need a recipe")
        print(show(None if args.recipe is None else load_recipe(args)))
        return 0

    def cmd_schema(args: Any) -> int:
        text = json.dumps(json_schema(), indent=2) + "\n"
        if args.out is None:
            print(text, end="")
            return 0
        from infalign.run.io import atomic_write_text

        atomic_write_text(args.out, text)
        print(f"wrote {args.out}")
        return 0

    p = sub.add_parser("config", help="every recipe key: its type, default and help; JSON Schema")
    verbs = p.add_subparsers(dest="config_command", required=True, parser_class=type(p))
    s = verbs.add_parser(
        "show",
        help="every key with type, default and help (and RECIPE's values)",
        allow_abbrev=False,
    )
    s.add_argument("recipe", nargs="?", help="a recipe YAML (then overrides may follow it)")
    s.set_defaults(func=cmd_show, overrides_ok=True)
    s = verbs.add_parser("schema", help="a JSON Schema of the recipe, for editors")
    s.add_argument("--out", help="write it to this file (default: stdout)")
    s.set_defaults(func=cmd_schema)
