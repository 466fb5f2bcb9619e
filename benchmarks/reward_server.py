"""Reward server under load: ``infalign serve-reward`` answering OpenRLHF-style requests.

Claim (issue 12): the server answers a bounded concurrent load (default 2,000 one-query requests, as
OpenRLHF sends them, at concurrency 16) with zero errors; printed: p50 / p99 latency and requests/s.
Peers measured in the same run, through the same client:

- ``bare``: a FastAPI + uvicorn app that returns a constant answer of the same shape (the HTTP floor);
- ``serve-reward --max-batch 1``: the same server without cross-request batching;
- ``in-process``: the exported ``reward_func`` (``infalign export-reward``) called once per query.

The recipe is ``recipes/tiny.yaml`` on the tiny assets of ``tests/tiny_assets.py`` (a cheap callable
reward), so the numbers are the server's own overhead, not a reward model's. Client and server share
the machine's cores. Run: ``OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/reward_server.py``.
Timings are not asserted; every answer is checked against the in-process reward.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from infalign.run.io import git_commit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
BARE = """
import contextlib, socket, uvicorn
from fastapi import FastAPI
sock = socket.socket()
sock.bind(("127.0.0.1", 0))
sock.listen(2048)
@contextlib.asynccontextmanager
async def lifespan(app):
    print("serving on http://127.0.0.1:%d/get_reward" % sock.getsockname()[1], flush=True)
    yield
app = FastAPI(lifespan=lifespan)
@app.post("/get_reward")
async def get_reward(body: dict):
    n = len(body["query"])
    return {"rewards": [0.5] * n, "scores": [0.5] * n, "extra_logs": {"raw_reward": 0.5}}
uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])
"""


def _start(cmd: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """A server process and its URL (from its first ``... http://host:port/get_reward`` line)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    m = re.search(r"http://127\.0\.0\.1:\d+/get_reward", line)
    if m is None:
        proc.kill()
        raise RuntimeError(f"server did not start: {line!r}")
    return proc, m.group(0)


async def _load(url: str, bodies: list[dict], concurrency: int) -> tuple[list, np.ndarray, float]:
    """POST every body at ``concurrency``; (answers, latencies in s, wall s)."""
    import httpx

    answers: list = [None] * len(bodies)
    lat = np.zeros(len(bodies))
    todo = list(range(len(bodies)))[::-1]

    async def worker(client: httpx.AsyncClient) -> None:
        while todo:
            i = todo.pop()
            t0 = time.perf_counter()
            r = await client.post(url, json=bodies[i])
            lat[i] = time.perf_counter() - t0
            answers[i] = r.json() if r.status_code == 200 else r.status_code

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker(client) for _ in range(concurrency))), 1800)
        wall = time.perf_counter() - t0
    return answers, lat, wall


def _row(name: str, lat: np.ndarray, wall: float, errors: int) -> str:
    p50, p99 = np.percentile(lat, [50, 99]) * 1e3
    return f"| {name} | {len(lat) / wall:.0f} | {p50:.1f} | {p99:.1f} | {errors} |"


def _measure(
    name: str, cmd: list[str], env: dict[str, str], bodies: list, want: list, concurrency: int
) -> tuple[str, float]:
    """Start one server, warm it up, time the load; (table row, requests/s). Answers of the
    infalign servers that differ from ``want`` count as errors."""
    proc, url = _start(cmd, env)
    try:
        asyncio.run(_load(url, bodies[:100], concurrency))  # warm-up
        answers, lat, wall = asyncio.run(_load(url, bodies, concurrency))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    errors = sum(not isinstance(a, dict) for a in answers)
    if name.startswith("serve-reward"):
        got = [a["rewards"][0] if isinstance(a, dict) else None for a in answers]
        errors += sum(g is None or abs(g - w) > 1e-6 for g, w in zip(got, want, strict=True))
    return _row(name, lat, wall, errors), len(lat) / wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()
    from tiny_assets import write_tiny_assets

    from infalign.cli import main as cli

    print(
        f"# benchmarks/reward_server.py  commit={git_commit()}  python={platform.python_version()}"
    )
    print(f"# {os.cpu_count()} cpus, load average {os.getloadavg()[0]:.1f} at start")
    print(f"# {args.requests} one-query requests at concurrency {args.concurrency}")
    tmp = Path(tempfile.mkdtemp(prefix="reward_server_"))
    assets = write_tiny_assets(tmp / "assets")
    over = {
        "model.name": assets["model"],
        "prompts.train.source": assets["train"],
        "prompts.test.source": assets["test"],
        "reward.name": f"{ROOT / 'tests' / 'tiny_assets.py'}:vowel_reward",
        "out": tmp / "run",
    }
    argv = [tok for k, v in over.items() for tok in (f"--{k}", str(v))]
    recipe = str(ROOT / "recipes" / "tiny.yaml")
    assert cli(["reference", recipe, "--split", "train", *argv]) == 0
    assert cli(["export-reward", recipe, str(tmp / "rf.py"), *argv]) == 0
    spec = importlib.util.spec_from_file_location("reward_func", tmp / "rf.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]

    prompts = module.REWARD.get().prompts
    pairs = [
        (prompts[i % len(prompts)], " ab" + "cdeio"[: i % 6] * (i % 7))
        for i in range(args.requests)
    ]
    bodies = [{"query": [p + r], "prompts": [p], "labels": [None]} for p, r in pairs]
    t0 = time.perf_counter()
    want = [module.reward_func([p + r], [p], [None])["rewards"].item() for p, r in pairs]
    inproc = time.perf_counter() - t0

    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    serve = [sys.executable, "-m", "infalign.cli", "serve-reward", recipe, "--port", "0"]
    peers = [
        ("serve-reward", [*serve, *argv]),
        ("serve-reward --max-batch 1", [*serve, "--max-batch", "1", *argv]),
        ("bare FastAPI (constant answer)", [sys.executable, "-c", BARE]),
    ]
    rows, rate = [], {}
    for name, cmd in peers:
        row, rate[name] = _measure(name, cmd, env, bodies, want, args.concurrency)
        rows.append(row)
    print("\n| server | requests/s | p50 latency (ms) | p99 latency (ms) | errors |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    print(
        f"| in-process reward_func, one query a call | {args.requests / inproc:.0f} | - | - | 0 |"
    )
    base = rate["serve-reward"]
    print(f"\nserve-reward / bare FastAPI: {base / rate['bare FastAPI (constant answer)']:.2f}x")
    print(f"serve-reward / --max-batch 1: {base / rate['serve-reward --max-batch 1']:.2f}x")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
