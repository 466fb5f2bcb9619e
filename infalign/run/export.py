"""The aligned policy as a standard model: ``infalign export RECIPE --method M [--beta B] --to DIR``
(``--beta`` defaults to the method's beta when it has one).

The train stage's ``checkpoint/`` is a ``save_pretrained`` directory, but it also holds the trainer
state, and with LoRA only the adapter. The export is a plain Hugging Face model directory that
``AutoModelForCausalLM.from_pretrained(DIR)`` loads without infalign or peft:

    DIR/model.safetensors, config.json, generation_config.json   the policy (a LoRA adapter merged in)
    DIR/tokenizer files                                           the checkpoint's tokenizer
    DIR/README.md                                                 model card: method, transform, beta,
                                                                  KL and win rates with intervals, commands
    DIR/infalign.json                                             the same facts as data: eval.json,
                                                                  transform.json, the train stage's config

It exports only a finished training run that has a finished evaluation made with the same config
(one-line errors name the command to run), and never writes into a non-empty DIR (it writes a temp
directory next to it, then renames).
"""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path
from typing import Any

from infalign.run.config import RunConfig
from infalign.run.io import atomic_write_json, read_json
from infalign.run.keys import eval_key, train_key
from infalign.run.runs import MANIFEST, RunEnv, eval_dir, get_method, stage_state, train_dir

__all__ = ["export_policy", "model_card", "register"]

CARD = "README.md"
FACTS = "infalign.json"


def _require(cfg: RunConfig, method: str, beta: float) -> tuple[Path, Path]:
    """The finished train and eval directories of ``method`` at ``beta`` made with this config, or
    a ValueError naming the command that makes them."""
    from infalign.rl.checkpoint import CHECKPOINT_DIR

    m, env = get_method(cfg, method), RunEnv(cfg)
    td, ed = train_dir(cfg, m.name, beta), eval_dir(cfg, m.name, beta)
    run = f"--method {m.name} --beta {beta!r}"
    train_state = stage_state(td, train_key(env, m, beta), f"train/{m.name}")
    if train_state != "done" or not (td / CHECKPOINT_DIR).is_dir():
        raise ValueError(
            f"export: no finished training run in {str(td)!r}; run `infalign train RECIPE {run}` "
            "(or `infalign run RECIPE`) first"
        )
    eval_state = stage_state(ed, eval_key(env, m, beta), str(ed.relative_to(cfg.out)))
    if eval_state != "done" or not (ed / "eval.json").is_file():
        raise ValueError(
            f"export: no finished evaluation in {str(ed)!r}; run `infalign evaluate RECIPE {run}` "
            "(or `infalign run RECIPE`) first"
        )
    return td, ed


def _command(manifest: dict[str, Any]) -> str:
    argv = list(manifest.get("argv") or [])
    if argv:
        argv[0] = Path(argv[0]).name
    return shlex.join(argv)


def _ci(d: dict[str, Any]) -> str:
    return f"{d['mean']:.4f} [{d['low']:.4f}, {d['high']:.4f}]"


def _eval_rows(ev: dict[str, Any]) -> list[str]:
    """Markdown table rows of an eval.json: KL (± stderr, interval), each procedure's win rate
    with its interval and the calibrated-space bound at that KL, and the standard win rate."""
    kl = ev["kl"]
    se = "" if kl.get("stderr") is None else f" ± {kl['stderr']:.4f}"
    rows = [f"| KL(pi ‖ pi_ref), nats | {kl['mean']:.4f}{se} [{kl['low']:.4f}, {kl['high']:.4f}] |"]
    for proc, w in ev["win_rate"].items():
        bound = (ev.get("theory_bound") or {}).get(proc, {}).get("win_rate")
        extra = "" if bound is None else f" (calibrated-space optimum at this KL: {bound:.4f})"
        rows.append(f"| {proc} win rate vs pi_ref | {_ci(w)}{extra} |")
    if "sample" not in ev["win_rate"]:
        rows.append(f"| standard win rate vs pi_ref | {_ci(ev['standard_win_rate'])} |")
    return rows


def model_card(cfg: RunConfig, facts: dict[str, Any], exported_by: str) -> str:
    """The model card (markdown with a YAML header for the Hub) of an exported policy from its
    ``facts`` (:data:`FACTS`): what was trained, and what its evaluation measured."""
    ev, tf, pol = facts["eval"], facts["transform"], facts["eval"]["policy"]
    conf = ev["standard_win_rate"]["confidence"]
    rows = _eval_rows(ev)
    s = ev["settings"]["sampling"]
    rl = facts["train_config"]["rl"]
    lora = cfg.model.lora_r > 0
    local = Path(cfg.model.name).expanduser().exists()
    header = ["---", "library_name: transformers", "tags: [infalign, ctrl, rlhf]"]
    if not local:
        header.insert(2, f"base_model: {cfg.model.name}")
    resolved = tf.get("resolved")
    how = (
        f" (resolved for {tf['procedure']} at KL {tf['target_kl']:g})" if "procedure" in tf else ""
    )
    return "\n".join(
        [
            *header,
            "---",
            "",
            f"# {pol['method']} at beta={pol['beta']!r}: {Path(cfg.model.name).name}, aligned by infalign",
            "",
            "KL-regularised RL on the calibrated, transformed reward (CTRL, InfAlign) for the deployed "
            f"procedure `{cfg.report.procedure}`. Load it with "
            "`AutoModelForCausalLM.from_pretrained(this_dir)`"
            + (" (the LoRA adapter is merged into the weights)." if lora else "."),
            "",
            "| training | |",
            "|---|---|",
            f"| method | {pol['method']} |",
            f"| transform | {tf['spec']} -> {resolved}{how} |",
            f"| beta | {pol['beta']!r} |",
            f"| RL | {rl['algorithm']}, {rl['steps']} steps x {rl['prompts_per_step']} prompts, lr {rl['lr']:g} |",
            f"| base model | {cfg.model.name}"
            + (f", LoRA r={cfg.model.lora_r} merged |" if lora else " |"),
            f"| reward | {cfg.reward.kind}: {cfg.reward.name} |",
            "",
            f"## Evaluation ({ev['num_prompts']} held-out prompts; {ev['samples_per_prompt']} policy vs "
            f"{ev['reference_samples']} reference samples per prompt; {conf:.0%} intervals)",
            "",
            "| measure | value |",
            "|---|---|",
            *rows,
            "",
            f"Sampled at temperature {s['temperature']:g}, top_p {s['top_p']:g}, at most "
            f"{s['max_new_tokens']} new tokens; the win rates hold for these settings.",
            "",
            "## How it was made",
            "",
            f"- trained by: `{facts['train_command']}`",
            f"- evaluated by: `{facts['eval_command']}`",
            f"- exported by: `{exported_by}`",
            f"- infalign {facts['versions'].get('infalign')}, git {facts['git_commit']}",
            "",
            f"`{FACTS}` holds eval.json, transform.json and the training config.",
            "",
        ]
    )


def export_policy(
    cfg: RunConfig, method: str, beta: float | None, to: str | Path, command: str = ""
) -> Path:
    """Write the trained ``method`` at ``beta`` (default: the method's beta, if it has one) as a
    Hugging Face model directory ``to`` with a model card (module docstring); returns ``to``."""
    from transformers import AutoTokenizer

    from infalign.rl.checkpoint import CHECKPOINT_DIR
    from infalign.run.evaluate import load_policy

    betas = get_method(cfg, method).betas
    if beta is None and len(betas) != 1:
        raise ValueError(f"export: --beta is required: method {method!r} has betas {list(betas)}")
    b = float(betas[0] if beta is None else beta)
    out = Path(to)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"export: {str(out)!r} exists and is not an empty directory")
    td, ed = _require(cfg, method, b)
    train_manifest, eval_manifest = read_json(td / MANIFEST), read_json(ed / MANIFEST)
    facts = {
        "eval": read_json(ed / "eval.json"),
        "transform": read_json(td / "transform.json"),
        "train_config": train_manifest["config"],
        "train_command": _command(train_manifest),
        "eval_command": _command(eval_manifest),
        "versions": eval_manifest.get("versions", {}),
        "git_commit": eval_manifest.get("git_commit"),
        "train_dir": str(td),
    }
    model = load_policy(cfg, td / CHECKPOINT_DIR)  # a LoRA adapter is merged
    tokenizer = AutoTokenizer.from_pretrained(str(td / CHECKPOINT_DIR))
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / CARD).write_text(model_card(cfg, facts, command), encoding="utf-8")
        atomic_write_json(tmp / FACTS, facts)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# --- the CLI verb (registered by infalign.cli) ---------------------------------------------------


def register(sub: Any, load_recipe: Any, method_name: Any) -> None:
    """Add ``infalign export RECIPE --method M [--beta B] --to DIR`` (config overrides follow the
    recipe, as for ``run``), with the CLI's ``load_recipe(args)`` and ``method_name(cfg, args)``."""

    def cmd(args: Any) -> int:
        cfg = load_recipe(args)
        method = method_name(cfg, args)
        beta = [] if args.beta is None else ["--beta", repr(args.beta)]
        argv = ["infalign", "export", args.recipe, "--method", method, *beta, "--to", args.to]
        out = export_policy(cfg, method, args.beta, args.to, shlex.join([*argv, *args.extra]))
        print(f"exported {method} to {out}: AutoModelForCausalLM.from_pretrained({str(out)!r})")
        return 0

    p = sub.add_parser(
        "export",
        help="a trained, evaluated policy as a Hugging Face model directory with a model card",
        allow_abbrev=False,
    )
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("--method", help="a method name of the recipe (required if it has several)")
    p.add_argument("--beta", type=float, help="KL coefficient (default: the method's only beta)")
    p.add_argument("--to", required=True, metavar="DIR", help="output directory (new or empty)")
    p.set_defaults(func=cmd, overrides_ok=True)
