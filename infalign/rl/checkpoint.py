"""Checkpoints of the CTRL trainer (:mod:`infalign.rl.base`): the file names, the trainer state
(step, optimizer, scheduler, RNG states, prompt order, configs), the atomic write of a checkpoint
directory, the checks before a resume, weight loading and the truncation of ``metrics.jsonl`` to the
resumed step.

Layout of ``out_dir/checkpoint/``: the model (or LoRA adapter) and tokenizer as written by
``save_pretrained`` (safetensors), and ``trainer_state.pt`` (``torch.save``, loaded with
``weights_only=True``). A save writes a temp directory, then renames; ``checkpoint.old`` is what a save
interrupted between its two renames leaves behind.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from infalign.lm.prompts import prompts_sha256
from infalign.run.config import RLConfig, SamplingConfig, to_dict
from infalign.run.io import atomic_write_text, disk_errors, read_jsonl
from infalign.run.lock import remove_stale_checkpoint_tmp

__all__ = [
    "CHECKPOINT_DIR",
    "METRICS_FILE",
    "STATE_FILE",
    "check_resumable",
    "find_checkpoint",
    "load_state",
    "load_weights",
    "restore_rng_state",
    "rng_state",
    "trainer_state",
    "truncate_metrics",
    "write_checkpoint",
]

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "trainer_state.pt"
METRICS_FILE = "metrics.jsonl"
# fields that may change between an interrupted run and its resumption
RESUMABLE_CHANGES = {"steps", "save_every"}


# --- RNG states ----------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """The torch, CUDA, Python and legacy numpy global RNG states (numpy's key as an int64 tensor so
    the state loads with ``weights_only=True``)."""
    np_state: Any = np.random.get_state()  # noqa: NPY002 - the legacy global RNG is what we restore
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [
            np_state[0],
            torch.from_numpy(np_state[1].astype(np.int64)),
            *np_state[2:],
        ],
    }


def restore_rng_state(rng: dict[str, Any]) -> None:
    """Set the global RNG states captured by :func:`rng_state`."""
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available() and rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
    random.setstate(_tuplify(rng["python"]))
    npst = rng["numpy"]
    np.random.set_state((npst[0], npst[1].numpy().astype(np.uint32), *npst[2:]))  # noqa: NPY002


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


# --- trainer state -------------------------------------------------------------------------------


def trainer_state(
    *,
    step: int,
    optimizer: Any,
    scheduler: Any,
    prompts: Sequence[str],
    rl: RLConfig,
    sampling: SamplingConfig,
    transform: str,
    num_processes: int,
) -> dict[str, Any]:
    """The content of ``trainer_state.pt`` after ``step`` completed steps (RNG states taken now)."""
    n, pps = len(prompts), rl.prompts_per_step
    return {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "prompt_order": {
            "epoch": step * pps // n,
            "position": step * pps % n,
            "seed": rl.seed,
            "num_prompts": n,
            "prompts_sha256": prompts_sha256(prompts),
        },
        "rl": to_dict(rl),
        "sampling": to_dict(sampling),
        "transform": transform,
        "num_processes": num_processes,
        "versions": {"torch": str(torch.__version__)},
    }


def write_checkpoint(
    out_dir: Path, model: Any, tokenizer: Any, state_dict: dict[str, Any], state: dict[str, Any]
) -> Path:
    """Write ``out_dir/checkpoint`` atomically: a temp dir ``.checkpoint.tmp-<pid>`` with the model
    (``save_pretrained`` of ``state_dict``, safetensors), the tokenizer and ``trainer_state.pt``, then
    renamed into place (the previous checkpoint goes to ``checkpoint.old`` in between and is removed
    after). A failed write (e.g. a full disk: a one-line ValueError) removes the temp dir and leaves
    the previous checkpoint in place; temp dirs of dead processes are removed first."""
    final = out_dir / CHECKPOINT_DIR
    tmp = out_dir / f".{CHECKPOINT_DIR}.tmp-{os.getpid()}"
    old = out_dir / f"{CHECKPOINT_DIR}.old"
    remove_stale_checkpoint_tmp(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with disk_errors(final):
            tmp.mkdir(parents=True)
            model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            torch.save(state, tmp / STATE_FILE)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(out_dir: Path) -> Path | None:
    """``out_dir/checkpoint``, else the ``checkpoint.old`` of an interrupted save, else None."""
    ckpt = out_dir / CHECKPOINT_DIR
    if not (ckpt / STATE_FILE).is_file():
        ckpt = out_dir / f"{CHECKPOINT_DIR}.old"
    if not (ckpt / STATE_FILE).is_file():
        return None
    return ckpt


def _corrupt(path: Path, err: BaseException) -> ValueError:
    first = (str(err).strip().splitlines() or [""])[0][:200]
    return ValueError(
        f"resume: {str(path)!r} is corrupt or truncated ({type(err).__name__}: {first}); delete "
        f"{str(path.parent)!r} to restart this training run from step 0"
    )


def load_state(ckpt: Path) -> dict[str, Any]:
    """``ckpt/trainer_state.pt`` (``weights_only=True``); a corrupt file is a one-line ValueError
    naming it and the remedy."""
    f = ckpt / STATE_FILE
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, bad pickle, ... : torch raises many types
        raise _corrupt(f, err) from None
    if not isinstance(state, dict) or "step" not in state:
        raise _corrupt(f, ValueError("no trainer state in it"))
    return state


def check_resumable(
    state: dict[str, Any], ckpt: Path, rl: RLConfig, prompts: Sequence[str]
) -> None:
    """ValueError unless ``rl`` matches the checkpoint's (``steps`` and ``save_every`` may change)
    and the training prompts are the same, in the same order."""
    saved, now = state["rl"], to_dict(rl)
    for k in sorted(set(saved) | set(now)):
        if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k):
            raise ValueError(
                f"resume: rl.{k}={now.get(k)!r} but the checkpoint in {ckpt} was trained with "
                f"rl.{k}={saved.get(k)!r}"
            )
    order = state["prompt_order"]
    if order["num_prompts"] != len(prompts) or order["prompts_sha256"] != prompts_sha256(prompts):
        raise ValueError(f"resume: the training prompts differ from those of {ckpt}")


# --- weights and metrics -------------------------------------------------------------------------


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric records of steps >= ``step`` (written after the checkpoint we resume from) and a
    torn last line (a crash in the middle of an append); a bad line elsewhere is a ValueError naming
    the file and the line."""
    if not path.is_file():
        return
    rows = read_jsonl(path, strict=False)
    keep = [r for r in rows if r.get("rl/step", -1) < step]
    lines = [ln for ln in path.read_text(encoding="utf-8").split("\n") if ln.strip()]
    if len(keep) != len(lines):
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


def load_weights(model: Any, ckpt: Path, is_peft: bool) -> None:
    """Load the checkpoint's safetensors into ``model`` (the LoRA adapter only if ``is_peft``);
    ValueError on unexpected keys or on missing weights that are not tied to a loaded one."""
    from safetensors.torch import load_file as _load_file

    def load_file(f: str) -> dict[str, torch.Tensor]:
        try:
            return _load_file(f)
        except Exception as err:  # SafetensorError (truncated header or data), OSError
            raise _corrupt(Path(f), err) from None

    if is_peft:
        from peft import set_peft_model_state_dict

        f = ckpt / "adapter_model.safetensors"
        if not f.is_file():
            raise ValueError(f"resume: {f} is missing")
        res = set_peft_model_state_dict(model, load_file(str(f)))
        unexpected = list(getattr(res, "unexpected_keys", None) or [])
        if unexpected:
            raise ValueError(f"resume: unexpected adapter keys {unexpected[:3]} in {f}")
        return
    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        raise ValueError(f"resume: no *.safetensors model files in {ckpt}")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected:
        raise ValueError(f"resume: unexpected keys {unexpected[:3]} in {ckpt}")
    # keys dropped by save_pretrained are tied to a loaded one (e.g. lm_head.weight <- wte.weight)
    full = model.state_dict(keep_vars=True)
    loaded_ptrs = {full[k].data_ptr() for k in sd if k in full}
    untied = [k for k in missing if full[k].data_ptr() not in loaded_ptrs]
    if untied:
        raise ValueError(f"resume: checkpoint {ckpt} lacks weights {untied[:3]}")
