"""The ``vllm`` sampling backend: vLLM's engine, for reference sampling and evaluation at scale.

vLLM loads its own weights from a directory, so ``model`` is either a local model directory (str or
Path) or a loaded transformers model whose weights are exactly those saved under its
``name_or_path`` directory (checked tensor by tensor against the safetensors files, once per state of
the weights): the reference model, or a checkpoint loaded for evaluation. A policy being trained
(a parameter requires grad), a peft model, or a model whose in-memory weights differ from its
directory is a ValueError: vLLM cannot take it (use ``sampling.backend: hf`` or ``native`` there).

Mapping (one request per row b = p * M + m, rows ordered as every Sampler's):
    prompt           the unpadded ids :func:`infalign.lm.models.encode_prompt` gives (what the
                     ``hf`` backend feeds after left padding)
    SamplingParams   temperature, top_p, top_k (0: off), max_tokens = max_new_tokens,
                     seed = ``derive_seed(seed, b)``, stop_token_ids = the EOS ids of the model's
                     generation config and the tokenizer (as ``hf``), min_tokens 0, no penalties,
                     logprobs = 0 (the sampled token's only), no detokenization
Results depend only on (prompts, M, sampling, seed), not on ``sampling.batch_size`` (vLLM batches).
The completion is cut after its first EOS and decoded by infalign's tokenizer, as in ``hf``.

Log-probs: the engine runs with ``logprobs_mode="processed_logprobs"``, i.e. log softmax of the
logits after temperature and top-k/top-p. Without truncation (top_k = 0, top_p = 1) that is the
Sampler contract's ``log softmax(logits / temperature)[y_t]`` and ``Generation.logprobs`` (B, T) is
filled (summed per sequence: ``(logprobs * completion_mask).sum(-1)``); with truncation it is the
renormalised distribution, so ``Generation.logprobs`` is left None and the scorer computes them.

The engine, ``LLM(model=DIR, enforce_eager=True, ...)``, is created on first use and kept for the
process (one at a time; :func:`shutdown` frees it). vLLM starts worker processes: call from a
``if __name__ == "__main__":`` block (the ``infalign`` CLI is one). Extra engine arguments come from
the environment variable ``INFALIGN_VLLM_ARGS``, a JSON object, e.g. ``{"enforce_eager": false,
"gpu_memory_utilization": 0.6}`` on a GPU; on vLLM's CPU build the KV cache defaults to 1 GiB
(``kv_cache_memory_bytes``). Setup: docs/vllm.md.
"""

from __future__ import annotations

import json
import logging
import os
import weakref
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from infalign.lm.models import Generation, derive_seed, encode_prompt
from infalign.lm.sampling import check_positions, eos_token_ids, generation_from_tokens
from infalign.run.config import SamplingConfig

__all__ = ["ENV_ARGS", "engine_args", "model_dir", "request_params", "sample", "shutdown"]

log = logging.getLogger(__name__)

ENV_ARGS = "INFALIGN_VLLM_ARGS"
# set by this module: the rest of it relies on them
_FIXED_ARGS = {
    "skip_tokenizer_init": True,  # prompts go in as ids; infalign's tokenizer decodes
    "generation_config": "vllm",  # the model's generation_config.json defaults do not leak in
    "logprobs_mode": "processed_logprobs",
}
_DEFAULT_ARGS: dict[str, Any] = {"enforce_eager": True, "seed": 0}
_CPU_KV_CACHE = 1 << 30

_engine: dict[str, Any] = {}  # {"key": (dir, dtype, args), "llm": vllm.LLM}
# model -> (dir, the versions of its parameters) when its weights were last found equal to the dir's
_verified: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _vllm() -> Any:
    """The ``vllm`` module, or an ImportError saying how to install it."""
    try:
        import vllm
        import vllm.platforms  # vllm.platforms.current_platform
    except ImportError as err:
        raise ImportError(
            f"sampling.backend='vllm' needs vLLM, which is not importable here ({err}): on a GPU "
            "`pip install 'infalign[vllm]'`; on a CPU, vLLM's CPU build in its own virtual "
            "environment (docs/vllm.md, `make test-vllm`)"
        ) from err
    return vllm


def _differing_weight(model: Any, d: Path) -> str | None:
    """The first tensor whose in-memory value differs from the safetensors files in ``d`` (compared
    in the model's dtype), ``"<no common tensor>"`` if none can be compared, else None."""
    from safetensors import safe_open

    state = model.state_dict()
    compared = 0
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                if key not in state:
                    continue
                mine = state[key].detach()
                disk = st.get_tensor(key).to(device=mine.device, dtype=mine.dtype)
                if mine.shape != disk.shape or not torch.equal(mine, disk):
                    return key
                compared += 1
    return None if compared else "<no common tensor>"


def _loadable(d: Path, what: str) -> Path:
    """``d`` if it is a directory vLLM can load (config.json and safetensors), else ValueError."""
    if not d.is_dir() or not any(d.glob("*.safetensors")) or not (d / "config.json").is_file():
        raise ValueError(
            f"{what}: {str(d)!r} is not a directory with config.json and *.safetensors"
        )
    return d


def model_dir(model: Any) -> Path:
    """The directory vLLM loads for ``model`` (module docstring); ValueError if vLLM cannot take it."""
    if isinstance(model, (str, Path)):
        return _loadable(Path(model).expanduser(), "sampling.backend='vllm': model")
    what = f"sampling.backend='vllm': the model {type(model).__name__}"
    if hasattr(model, "peft_config"):
        raise ValueError(f"{what} is a peft model; merge it and save it (save_pretrained) first")
    if any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            f"{what} has trainable parameters (a policy being trained): vLLM loads weights from "
            "disk, not from memory; sample it with sampling.backend hf or native"
        )
    name = str(getattr(model, "name_or_path", "") or "")
    if not name or not Path(name).expanduser().is_dir():
        raise ValueError(f"{what} was not loaded from a local directory (name_or_path={name!r})")
    d = _loadable(Path(name).expanduser(), f"{what} (name_or_path)")
    versions = tuple(p._version for p in model.parameters())
    if _verified.get(model) == (str(d), versions):
        return d
    bad = _differing_weight(model, d)
    if bad is not None:
        raise ValueError(
            f"{what}: its in-memory weights differ from {str(d)!r} (tensor {bad}); vLLM loads "
            "weights from disk: save the model and pass its directory, or use sampling.backend "
            "hf or native"
        )
    _verified[model] = (str(d), versions)
    return d


def engine_args(dtype: str, cpu: bool = False) -> dict[str, Any]:
    """Keyword arguments of ``vllm.LLM`` (besides ``model``): the defaults, then the JSON object in
    ``$INFALIGN_VLLM_ARGS``, then the ones this module relies on. ValueError naming the variable.

    ``cpu`` (vLLM's CPU build): a 1 GiB KV cache unless the variable sizes it, instead of vLLM's
    default of 0.92 of the machine's memory (which it refuses to start without)."""
    raw = os.environ.get(ENV_ARGS, "").strip()
    try:
        extra = json.loads(raw) if raw else {}
    except json.JSONDecodeError as err:
        raise ValueError(f"{ENV_ARGS}={raw!r}: not JSON ({err})") from None
    if not isinstance(extra, dict):
        raise ValueError(f"{ENV_ARGS}={raw!r}: expected a JSON object of vllm.LLM arguments")
    fixed = sorted(set(extra) & {*_FIXED_ARGS, "model"})
    if fixed:
        raise ValueError(f"{ENV_ARGS}: {fixed[0]!r} is set by infalign.lm.sampling_vllm")
    sized = {"kv_cache_memory_bytes", "gpu_memory_utilization"} & set(extra)
    cache = {"kv_cache_memory_bytes": _CPU_KV_CACHE} if cpu and not sized else {}
    return {**_DEFAULT_ARGS, **cache, "dtype": dtype, **extra, **_FIXED_ARGS}


def _llm(d: Path, dtype: str) -> Any:
    """The cached engine for (``d``, dtype, engine args); a different key replaces it."""
    vllm = _vllm()
    args = engine_args(dtype, cpu=vllm.platforms.current_platform.is_cpu())
    key = (str(d.resolve()), dtype, json.dumps(args, sort_keys=True, default=str))
    if _engine.get("key") != key:
        shutdown()
        log.info("vllm: starting an engine on %s (%s)", d, args)
        _engine["llm"] = vllm.LLM(model=str(d), **args)
        _engine["key"] = key
    return _engine["llm"]


def shutdown() -> None:
    """Drop the cached engine (vLLM stops its worker processes when the engine is collected)."""
    import gc

    llm = _engine.pop("llm", None)
    _engine.pop("key", None)
    if llm is not None:
        engine = getattr(llm, "llm_engine", None)
        stop = getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if callable(stop):
            stop()
        del llm
        gc.collect()


def request_params(sampling: SamplingConfig, seeds: list[int], eos_ids: list[int]) -> list[dict]:
    """``vllm.SamplingParams`` keyword arguments, one dict per row (module docstring)."""
    base = {
        "n": 1,
        "temperature": float(sampling.temperature),
        "top_p": float(sampling.top_p),
        "top_k": int(sampling.top_k),
        "min_p": 0.0,
        "max_tokens": int(sampling.max_new_tokens),
        "min_tokens": 0,
        "repetition_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "stop_token_ids": list(eos_ids),
        "ignore_eos": False,
        "logprobs": 0,
        "detokenize": False,
    }
    return [{**base, "seed": int(s)} for s in seeds]


def _completions(
    outputs: list[Any], sampling: SamplingConfig, eos_ids: list[int], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (B, T) long right-padded with pad_id, sampled-token log-probs (B, T) float32, 0 on
    padding) from vLLM's RequestOutputs. RuntimeError if a row stopped for another reason than an
    EOS or the ``max_new_tokens`` budget (the two ends the ``hf`` backend has)."""
    rows: list[list[int]] = []
    lps: list[list[float]] = []
    for b, out in enumerate(outputs):
        c = out.outputs[0]
        ids = [int(t) for t in c.token_ids]
        at_eos = bool(ids) and ids[-1] in eos_ids
        if not (at_eos or len(ids) == sampling.max_new_tokens):
            raise RuntimeError(
                f"vllm: row {b} ended after {len(ids)} tokens ({c.finish_reason}) without an EOS"
            )
        steps = c.logprobs or []
        if len(steps) != len(ids):
            raise RuntimeError(f"vllm: row {b} has {len(ids)} tokens but {len(steps)} log-probs")
        rows.append(ids)
        lps.append([float(step[t].logprob) for t, step in zip(ids, steps, strict=True)])
    T = max(1, *(len(r) for r in rows))
    tokens = torch.full((len(rows), T), pad_id, dtype=torch.long)
    logprobs = torch.zeros(len(rows), T)
    for b, (r, lp) in enumerate(zip(rows, lps, strict=True)):
        tokens[b, : len(r)] = torch.tensor(r, dtype=torch.long)
        logprobs[b, : len(lp)] = torch.tensor(lp, dtype=torch.float32)
    return tokens, logprobs


def sample(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    num_samples: int,
    sampling: SamplingConfig,
    seed: int,
    progress: bool = True,
) -> Generation:
    """The ``vllm`` Sampler (module docstring); inputs checked by :func:`infalign.lm.sampling.sample`.
    Fills ``Generation.logprobs`` when ``top_k == 0`` and ``top_p == 1``."""
    d = model_dir(model)  # bad input fails before vLLM is imported
    vllm = _vllm()
    if isinstance(model, (str, Path)):
        from transformers import AutoConfig, GenerationConfig

        try:
            gen_cfg = GenerationConfig.from_pretrained(d)
        except OSError:  # no generation_config.json
            gen_cfg = None
        model = SimpleNamespace(config=AutoConfig.from_pretrained(d), generation_config=gen_cfg)
        dtype = "auto"
    else:
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    eos_ids = eos_token_ids(model, tokenizer)
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    check_positions(model, max(len(e) for e in encoded), sampling)
    M = num_samples
    seeds = [derive_seed(seed, b) for b in range(len(prompts) * M)]
    params = [vllm.SamplingParams(**kw) for kw in request_params(sampling, seeds, eos_ids)]
    requests = [{"prompt_token_ids": encoded[b // M]} for b in range(len(seeds))]
    outputs = _llm(d, dtype).generate(requests, params, use_tqdm=progress)
    tokens, logprobs = _completions(outputs, sampling, eos_ids, int(tokenizer.pad_token_id))
    exact = sampling.top_k == 0 and sampling.top_p == 1.0
    if not exact:
        log.info("vllm: top-k/top-p on: vLLM's log-probs are truncated; Generation.logprobs=None")
    lp = [logprobs] if exact else None
    return generation_from_tokens(tokenizer, prompts, M, [tokens], eos_ids, logprobs=lp)
