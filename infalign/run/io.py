"""Artifact I/O shared by every stage: atomic writes (temp file in the same directory, fsync,
``os.replace``), jsonl, safetensors, and the run manifest (config, seed, versions, git commit)."""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "append_jsonl",
    "atomic_save_safetensors",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "disk_errors",
    "git_commit",
    "read_json",
    "read_jsonl",
    "run_manifest",
    "sha256_path",
    "stat_key_current",
    "to_jsonable",
    "write_manifest",
]

log = logging.getLogger(__name__)

_FULL = (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def disk_errors(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn a full disk (``OSError`` ENOSPC / EDQUOT, or safetensors' wrapped form of it) while
    writing ``path`` into a one-line ValueError naming the path and the remedy."""
    try:
        yield
    except Exception as err:
        full = isinstance(err, OSError) and err.errno in _FULL
        full = full or "No space left" in str(err) or "StorageFull" in str(err)
        if not full:
            raise
        raise ValueError(
            f"no space left on the device while writing {str(path)!r}: free some space and rerun "
            "the same command (finished stages and the last checkpoint are kept)"
        ) from None


@contextlib.contextmanager
def _atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success fsync and ``os.replace`` it onto ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # make the rename durable where the OS allows it
        dfd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with disk_errors(path), _atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (utf-8) to ``path`` atomically: readers see the old file or the new one."""
    atomic_write_bytes(path, text.encode("utf-8"))


def to_jsonable(obj: Any) -> Any:
    """Tensors / numpy arrays / scalars / paths / dataclasses / tuples as plain JSON values."""
    import dataclasses

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist") and callable(obj.tolist):  # torch / numpy
        return obj.tolist()
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    return obj


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON atomically (tensors and numpy values converted; NaN is an error)."""
    atomic_write_text(
        path,
        json.dumps(to_jsonable(obj), indent=indent, allow_nan=False, ensure_ascii=False) + "\n",
    )


def read_json(path: str | os.PathLike[str]) -> Any:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{str(p)!r} does not exist")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(p)!r} is not valid JSON: {err}") from None


def atomic_save_safetensors(
    path: str | os.PathLike[str], tensors: dict[str, Any], metadata: dict[str, Any] | None = None
) -> None:
    """Save a dict of tensors as safetensors atomically; metadata values are stored as strings
    (non-string values JSON-encoded)."""
    from safetensors.torch import save_file

    meta = None
    if metadata is not None:
        meta = {
            str(k): v if isinstance(v, str) else json.dumps(to_jsonable(v))
            for k, v in metadata.items()
        }
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with disk_errors(path), _atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def append_jsonl(path: str | os.PathLike[str], rows: Iterable[Any]) -> None:
    """Append rows (one JSON object per line) and fsync, so a crash never loses a finished row.

    A torn last line left by a crash mid-write is dropped by :func:`read_jsonl` (``strict=False``).
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(
        json.dumps(to_jsonable(r), allow_nan=False, ensure_ascii=False) + "\n" for r in rows
    )
    with disk_errors(p), open(p, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike[str], strict: bool = True) -> list[Any]:
    """Rows of a jsonl file (blank lines skipped).

    ``strict=False`` tolerates a torn (unterminated, unparsable) last line, as left by an
    interrupted :func:`append_jsonl`; any other bad line is a ValueError naming file and line.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{str(p)!r} does not exist")
    raw = p.read_text(encoding="utf-8")
    lines = raw.split("\n")
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if not strict and i == len(lines) - 1:  # no trailing newline: torn final write
                log.warning("%s: dropping a torn last line (%d chars)", p, len(line))
                break
            raise ValueError(f"{str(p)!r} line {i + 1} is not valid JSON: {err}") from None
    return rows


def _stat_key(p: Path) -> str:
    st = p.stat()
    return f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"


def stat_key_current(key: str) -> bool:
    """Whether a :func:`sha256_path` cache key still describes its file (same size, mtime, inode)."""
    path = Path(key.split("|", 1)[0])
    return path.is_file() and _stat_key(path) == key


def sha256_path(path: str | os.PathLike[str], cache: dict[str, str] | None = None) -> str:
    """SHA-256 of a file's bytes, or of a directory: of the sorted (relative path, file hash) pairs of
    every regular file below it (hidden files and directories skipped, e.g. ``.lock``, ``.git``).

    ``cache``: ``{path|size|mtime_ns|inode: sha256}`` of files hashed before, read and extended, so
    an unchanged multi-GB model is not read again (a file rewritten in place changes its mtime)."""
    p = Path(path)
    if p.is_file():
        key = _stat_key(p) if cache is not None else ""
        if cache is not None and key in cache:
            return cache[key]
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        if cache is not None:
            cache[key] = h.hexdigest()
        return h.hexdigest()
    h = hashlib.sha256()
    for f in sorted(p.rglob("*")):
        rel = f.relative_to(p)
        if f.is_file() and not any(part.startswith(".") for part in rel.parts):
            h.update(f"{rel.as_posix()}\0{sha256_path(f, cache)}\n".encode())
    return h.hexdigest()


def git_commit(path: str | os.PathLike[str] | None = None) -> str | None:
    """The HEAD commit (with ``-dirty`` if the tree has changes) of the repo holding ``path``."""
    cwd = str(path) if path is not None else str(Path(__file__).resolve().parent)
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def run_manifest(config_dict: Any, seed: int | None, **extra: Any) -> dict[str, Any]:
    """What produced an artifact: config, seed, package versions, python, platform, git commit, time."""
    import torch

    import infalign

    versions = {"infalign": infalign.__version__, "torch": torch.__version__}
    for mod in ("transformers", "datasets", "peft", "trl", "accelerate", "numpy"):
        m = sys.modules.get(mod)
        if m is None:
            from importlib.metadata import PackageNotFoundError, version

            with contextlib.suppress(PackageNotFoundError):
                versions[mod] = version(mod)
        else:
            versions[mod] = getattr(m, "__version__", "unknown")
    return {
        "config": to_jsonable(config_dict),
        "seed": seed,
        "versions": versions,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "git_commit": git_commit(Path.cwd()) or git_commit(),
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": list(sys.argv),
        **extra,
    }


def write_manifest(
    out_dir: str | os.PathLike[str],
    config_dict: Any,
    seed: int | None,
    name: str = "manifest.json",
    **extra: Any,
) -> Path:
    """Write :func:`run_manifest` as ``out_dir/name`` atomically; returns the path."""
    path = Path(out_dir) / name
    atomic_write_json(path, run_manifest(config_dict, seed, **extra))
    return path
