"""Prompt sets: a .jsonl file, Hugging Face ``datasets`` (``hf:NAME``, a ``save_to_disk`` directory, or a
local .json/.jsonl/.csv/.parquet file), formatted as plain text or Anthropic HH, optionally wrapped in the
tokenizer's chat template, length-checked in tokens of the policy tokenizer.

Sources:
    ``path/to/prompts.jsonl``  one JSON object per line, field ``column``
    ``hf:NAME``                ``datasets.load_dataset(NAME, split=split)``
    ``path/to/dataset_dir``    ``datasets.load_from_disk`` (a DatasetDict is indexed by ``split``)
    ``path/to/file.csv``       ``datasets.load_dataset("csv", data_files=...)`` (also .json, .parquet)

Format ``hh``: the text up to and including the final ``Assistant:`` of an Anthropic HH dialogue
(``"\\n\\nHuman: ...\\n\\nAssistant: ...``), i.e. the context the assistant's last turn answers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from infalign.run.config import PromptSetConfig

__all__ = ["check_prompt_list", "hh_prompt", "hh_to_messages", "load_prompts", "prompts_sha256"]

log = logging.getLogger(__name__)

_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_DATASETS_TYPES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def prompts_sha256(prompts: Sequence[str]) -> str:
    """SHA-256 of a prompt list (order included): of its JSON text, ``json.dumps(list(prompts),
    ensure_ascii=False)`` in utf-8. The one key of a prompt set in artifacts, checkpoints and stage
    manifests."""
    return hashlib.sha256(json.dumps(list(prompts), ensure_ascii=False).encode("utf-8")).hexdigest()


def hh_prompt(text: str, index: int = 0) -> str:
    """The HH dialogue up to and including its final ``Assistant:``; ValueError if there is none."""
    pos = text.rfind("Assistant:")
    if pos < 0:
        raise ValueError(f"prompt {index}: HH format needs an 'Assistant:' turn, got {text[:80]!r}")
    return text[: pos + len("Assistant:")]


def hh_to_messages(prompt: str) -> list[dict[str, str]]:
    """HH prompt (ending in ``Assistant:``) -> chat messages; the empty final assistant turn is
    dropped (the chat template adds the generation prompt)."""
    parts = _HH_TURN.split(prompt)
    messages = []
    # parts = [preamble, role, content, role, content, ...]
    for role, content in zip(parts[1::2], parts[2::2], strict=True):
        messages.append(
            {"role": "user" if role == "Human" else "assistant", "content": content.strip()}
        )
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    if parts[0].strip():
        messages.insert(0, {"role": "user", "content": parts[0].strip()})
    return messages


def check_prompt_list(prompts: Any, name: str = "prompts") -> list[str]:
    """``prompts`` as a list of str: a non-empty list or tuple of strings, else ValueError naming
    the first bad item (its index and type)."""
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"{name} must be a non-empty list of strings, got {prompts!r:.80}")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise ValueError(f"{name}[{bad[0]}] is {type(prompts[bad[0]]).__name__}, expected str")
    return list(prompts)


def _read_jsonl_column(path: Path, column: str, limit: int | None) -> list[Any]:
    rows: list[Any] = []
    keys: set[str] = set()
    with open(path, "rb") as f:
        for i, raw in enumerate(f):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"{str(path)!r} line {i + 1} is not UTF-8 text (byte {raw[err.start]:#04x} at "
                    f"column {err.start + 1})"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{str(path)!r} line {i + 1} is not valid JSON: {err}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{str(path)!r} line {i + 1}: expected a JSON object per line")
            if column not in row:
                keys.update(row)
                raise ValueError(
                    f"prompts column {column!r} missing in {str(path)!r} line {i + 1}; "
                    f"columns there: {sorted(keys)}"
                )
            rows.append(row[column])
            if limit is not None and len(rows) >= limit:
                break
    return rows


def _dataset_column(ds: Any, cfg: PromptSetConfig, where: str) -> list[Any]:
    if isinstance(ds, dict):  # a DatasetDict: pick the split
        if cfg.split not in ds:
            raise ValueError(
                f"prompts split {cfg.split!r} not in {where}; splits there: {sorted(ds.keys())}"
            )
        ds = ds[cfg.split]
    cols = list(ds.column_names)
    if cfg.column not in cols:
        raise ValueError(f"prompts column {cfg.column!r} not in {where}; columns there: {cols}")
    if cfg.limit is not None and cfg.limit < len(ds):
        ds = ds.select(range(cfg.limit))
    return list(ds[cfg.column])


def _load_raw(cfg: PromptSetConfig) -> list[Any]:
    src = cfg.source
    if src.startswith("hf:"):
        import datasets

        name = src[3:]
        try:
            ds = datasets.load_dataset(name, split=cfg.split)
        except Exception as err:
            raise ValueError(
                f"prompts source {src!r} (split {cfg.split!r}) cannot be loaded: "
                f"{type(err).__name__}: {err}"
            ) from err
        return _dataset_column(ds, cfg, src)
    path = Path(src).expanduser()
    if not path.exists():
        raise ValueError(f"prompts source {src!r} does not exist")
    if path.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as err:
            raise ValueError(
                f"prompts source {src!r} is not a datasets directory: {type(err).__name__}: {err}"
            ) from err
        return _dataset_column(ds, cfg, src)
    if path.suffix == ".jsonl":
        return _read_jsonl_column(path, cfg.column, cfg.limit)
    if path.suffix in _DATASETS_TYPES:
        import datasets

        try:
            ds = datasets.load_dataset(
                _DATASETS_TYPES[path.suffix], data_files=str(path), split="train"
            )
        except Exception as err:
            raise ValueError(
                f"prompts source {src!r} cannot be read: {type(err).__name__}: {err}"
            ) from err
        return _dataset_column(ds, cfg, src)
    raise ValueError(
        f"prompts source {src!r}: expected a .jsonl/.json/.csv/.parquet file, a datasets "
        "directory or hf:NAME"
    )


def _truncate_left(tokenizer: Any, text: str, max_tokens: int) -> str:
    from infalign.lm.models import encode_prompt

    body = tokenizer(text, add_special_tokens=False)["input_ids"]
    extra = len(encode_prompt(tokenizer, text)) - len(body)
    keep = max(1, max_tokens - extra)
    while keep > 0:
        out = tokenizer.decode(body[-keep:], skip_special_tokens=False)
        if len(encode_prompt(tokenizer, out)) <= max_tokens:
            return out
        keep -= 1
    raise ValueError(f"cannot truncate a prompt to max_prompt_tokens={max_tokens}")


def load_prompts(cfg: PromptSetConfig, tokenizer: Any = None, path: str = "prompts") -> list[str]:
    """The prompt strings of a prompt set, formatted and length-checked.

    Order: read (first ``limit`` rows), check every entry is a non-empty string, apply the HH format,
    then the chat template (``cfg.chat_template``; needs a tokenizer that has one), then the
    ``max_prompt_tokens`` check in tokens of ``tokenizer`` (ValueError naming the index and length,
    or keep the last tokens when ``cfg.truncate``).
    """
    cfg.validate(path)
    if cfg.max_prompt_tokens is not None and cfg.max_prompt_tokens < 1:
        raise ValueError(f"{path}.max_prompt_tokens={cfg.max_prompt_tokens}: must be >= 1")
    if cfg.max_prompt_tokens is not None and tokenizer is None:
        raise ValueError(f"{path}.max_prompt_tokens is set: a tokenizer is needed to count tokens")
    if cfg.chat_template:
        if tokenizer is None:
            raise ValueError(f"{path}.chat_template=true needs a tokenizer")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"{path}.chat_template=true but the tokenizer "
                f"{getattr(tokenizer, 'name_or_path', '')!r} has no chat template"
            )
    raw = _load_raw(cfg)
    if cfg.limit is not None:
        raw = raw[: cfg.limit]
    if not raw:
        raise ValueError(f"{path}.source={cfg.source!r}: the prompt set is empty")
    prompts: list[str] = []
    for i, x in enumerate(raw):
        if not isinstance(x, str):
            raise ValueError(
                f"{path}: entry {i} of column {cfg.column!r} is {type(x).__name__} ({x!r:.60}), "
                "expected a string"
            )
        if not x.strip():
            raise ValueError(f"{path}: entry {i} of column {cfg.column!r} is an empty string")
        prompts.append(hh_prompt(x, i) if cfg.format == "hh" else x)
    if cfg.chat_template:
        prompts = [
            tokenizer.apply_chat_template(
                hh_to_messages(p) if cfg.format == "hh" else [{"role": "user", "content": p}],
                add_generation_prompt=True,
                tokenize=False,
            )
            for p in prompts
        ]
    if cfg.max_prompt_tokens is not None:
        from infalign.lm.models import encode_prompt

        n_cut = 0
        for i, p in enumerate(prompts):
            n = len(encode_prompt(tokenizer, p))
            if n > cfg.max_prompt_tokens:
                if not cfg.truncate:
                    raise ValueError(
                        f"{path}: prompt {i} has {n} tokens > max_prompt_tokens="
                        f"{cfg.max_prompt_tokens} (set truncate: true to keep the last tokens)"
                    )
                prompts[i] = _truncate_left(tokenizer, p, cfg.max_prompt_tokens)
                n_cut += 1
        if n_cut:
            log.warning(
                "%s: truncated %d prompt(s) to %d tokens", path, n_cut, cfg.max_prompt_tokens
            )
    log.info("%s: %d prompts from %s", path, len(prompts), cfg.source)
    return prompts
