"""The CLI verbs of the integrations: ``serve-reward`` and ``export-reward``.

``add_commands`` registers them on ``infalign``'s subparsers; cli.py passes its recipe loader and
its ``print`` (only cli.py prints).
"""

from __future__ import annotations

import argparse
import pprint
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from infalign.integrations.recipe_reward import RewardSpec

__all__ = ["add_commands", "export_reward_file"]

_EXPORTED = '''"""CTRL reward for OpenRLHF and verl, written by `infalign export-reward` (do not edit).

Method {method}: reward Phi(C_hat(x, y)) with Phi = {transform}, calibrated against
{reference_dir} (K = {num_samples} reference rewards per prompt). The reward model and the reference
rewards load once per process, on the first call.

OpenRLHF: --reward.remote_url {path}   (reward_func; --remote_rm_url before OpenRLHF 0.10.2)
verl:     custom_reward_function.path={path} custom_reward_function.name=compute_score
          (or name=compute_score_batch with reward_model.reward_manager=batch); every dataset row
          needs extra_info.prompt = its prompt text as in the reference artifact (docs/verl.md).
"""

from infalign.integrations import openrlhf, verl
from infalign.integrations.recipe_reward import LazyReward

SPEC = {spec}

REWARD = LazyReward(SPEC)


def reward_func(queries, prompts, labels, **kwargs):
    """OpenRLHF: rewards = CTRL reward, scores = calibrated reward, extra_logs = means."""
    return openrlhf.reward_func(REWARD, queries, prompts, labels)


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    """verl, one sample: {{"score": CTRL reward, "raw_reward": ..., "calibrated_reward": ...}}."""
    return verl.compute_score(REWARD, solution_str, extra_info)


def compute_score_batch(data_sources, solution_strs, ground_truths, extra_infos, **kwargs):
    """verl's batch reward manager: one dict (as compute_score) per sample."""
    return verl.compute_score_batch(REWARD, solution_strs, extra_infos)
'''


def export_reward_file(spec: RewardSpec, out: str | Path) -> Path:
    """Write the OpenRLHF ``reward_func`` / verl ``compute_score`` file of ``spec`` (atomically)."""
    from infalign.core.transforms import transform_from_dict
    from infalign.run.io import atomic_write_text

    path = Path(out)
    if path.suffix != ".py":
        raise ValueError(f"output {str(path)!r}: OpenRLHF and verl import a .py file")
    tf = "raw reward" if spec.transform is None else str(transform_from_dict(spec.transform))
    text = _EXPORTED.format(
        method=spec.method,
        transform=tf,
        reference_dir=spec.reference_dir,
        num_samples=spec.num_samples,
        path=path.resolve(),
        spec=pprint.pformat(spec.to_dict(), indent=4, width=96, sort_dicts=False),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    return path


def _spec(args: argparse.Namespace, load_recipe: Callable[[argparse.Namespace], Any]) -> RewardSpec:
    from infalign.integrations.recipe_reward import spec_from_recipe

    return spec_from_recipe(load_recipe(args), args.method, not args.keep_special_tokens)


def _cmd_serve(
    args: argparse.Namespace,
    load_recipe: Callable[[argparse.Namespace], Any],
    echo: Callable[[str], None],
) -> int:
    """``infalign serve-reward``: check the flags, load the reward, serve until a signal."""
    from infalign.integrations.recipe_reward import CTRLReward

    try:
        from infalign.integrations.reward_server import serve
    except ImportError as err:
        raise ValueError(
            f"serve-reward needs FastAPI and uvicorn ({err}): pip install 'infalign[serve]'"
        ) from None

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port}: expected 0..65535")
    for flag, value in (
        ("--max-batch", args.max_batch),
        ("--max-request-bytes", args.max_request_bytes),
    ):
        if value < 1:
            raise ValueError(f"{flag} {value}: must be >= 1")
    reward = CTRLReward(_spec(args, load_recipe))

    def ready(host: str, port: int) -> None:
        tf = "raw" if reward.transform is None else str(reward.transform)
        where = f"[{host}]" if ":" in host else host
        echo(f"serving {reward.spec.method} ({tf}) on http://{where}:{port}/get_reward")

    stopped = serve(
        reward, args.host, args.port, args.max_batch, args.max_request_bytes, on_ready=ready
    )
    echo(f"stopped ({', '.join(f'signal {s}' for s in stopped) or 'no signal'})")
    return 0


def _cmd_export(
    args: argparse.Namespace,
    load_recipe: Callable[[argparse.Namespace], Any],
    echo: Callable[[str], None],
) -> int:
    """``infalign export-reward``: write the reward file."""
    spec = _spec(args, load_recipe)
    path = export_reward_file(spec, args.output)
    echo(f"wrote {path} (method {spec.method}; OpenRLHF reward_func, verl compute_score)")
    return 0


def add_commands(
    sub: Any,
    load_recipe: Callable[[argparse.Namespace], Any],
    echo: Callable[[str], None],
    epilog: str,
) -> None:
    """Register ``serve-reward`` and ``export-reward`` on the ``infalign`` subparsers ``sub``."""

    bound = {"load_recipe": load_recipe, "echo": echo}
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("recipe", help="recipe YAML (its train reference artifact must exist)")
    common.add_argument(
        "--method", help="the method whose transform to serve (default: the first non-raw one)"
    )
    common.add_argument(
        "--keep-special-tokens",
        action="store_true",
        help="score responses as sent (default: drop the policy tokenizer's special tokens, as "
        "the reference completions were decoded)",
    )
    p = sub.add_parser(
        "serve-reward",
        parents=[common],
        help="serve the CTRL reward over HTTP (OpenRLHF's remote reward protocol)",
        allow_abbrev=False,
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback)")
    p.add_argument("--port", type=int, default=5000, help="port (0: any free port)")
    p.add_argument("--max-batch", type=int, default=256, help="pairs per reward-model call")
    p.add_argument(
        "--max-request-bytes", type=int, default=8 * 1024 * 1024, help="larger bodies get 413"
    )
    p.set_defaults(func=partial(_cmd_serve, **bound), overrides_ok=True)
    p.epilog = epilog

    p = sub.add_parser(
        "export-reward",
        parents=[common],
        help="write the CTRL reward as an OpenRLHF reward_func / verl compute_score file",
        allow_abbrev=False,
    )
    p.add_argument("output", metavar="OUT.py", help="the .py file to write")
    p.set_defaults(func=partial(_cmd_export, **bound), overrides_ok=True)
    p.epilog = epilog
