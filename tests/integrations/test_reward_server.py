"""``infalign serve-reward`` as a live server on 127.0.0.1 (the real CLI in a subprocess) driven by a
real HTTP client: its rewards equal ``CalibratedReward`` on the same inputs, a bounded concurrent
load gets every answer right, bad inputs get a clear 4xx while it keeps serving, and SIGTERM
finishes the request in flight before the server exits 0. Every wait is bounded."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import RECIPE, ROOT
from tiny_assets import GATE, vowel_reward

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from infalign.core.transforms import Exp  # noqa: E402
from infalign.integrations.calibrated import CalibratedReward  # noqa: E402
from infalign.lm.rewards import score  # noqa: E402

LIMIT = 4096  # --max-request-bytes
WAIT = 180.0  # seconds: the longest any step may take (server start on a loaded 2-core machine)


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    stdout: queue.Queue
    stderr: queue.Queue
    gate: Path

    def wait_for(self, stream: queue.Queue, pattern: str) -> str:
        """The first line of ``stream`` matching ``pattern``; fails after WAIT seconds."""
        deadline = time.monotonic() + WAIT
        while (left := deadline - time.monotonic()) > 0:
            line = stream.get(timeout=left)
            assert line is not None, f"server output ended before {pattern!r}"
            if re.search(pattern, line):
                return line
        raise AssertionError(f"no {pattern!r} within {WAIT} s")


def _lines(pipe, out: queue.Queue) -> None:
    for line in pipe:
        out.put(line)
    out.put(None)


@contextlib.contextmanager
def _serve(ctrl_run, tmp_dir: Path):
    """A live ``serve-reward`` subprocess on 127.0.0.1 (any free port), killed on exit if alive."""
    gate = tmp_dir / "gate"
    os.mkfifo(gate)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "INFALIGN_TEST_GATE": str(gate),
    }
    cmd = [sys.executable, "-m", "infalign.cli", "serve-reward", RECIPE, "--host", "127.0.0.1"]
    cmd += ["--port", "0", "--max-request-bytes", str(LIMIT), "--max-batch", "32", *ctrl_run.argv]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT
    )
    out, err = queue.Queue(), queue.Queue()
    for pipe, q in ((proc.stdout, out), (proc.stderr, err)):
        threading.Thread(target=_lines, args=(pipe, q), daemon=True).start()
    try:
        srv = Server(proc, "", out, err, gate)
        line = srv.wait_for(out, r"^serving ")
        srv.url = re.search(r"http://127\.0\.0\.1:\d+/get_reward", line).group(0)
        yield srv
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=WAIT)


@pytest.fixture(scope="module")
def server(ctrl_run, tmp_path_factory):
    with _serve(ctrl_run, tmp_path_factory.mktemp("server")) as srv:
        yield srv


def _expected(ctrl_run, prompts, responses):
    """``CalibratedReward`` on the same inputs: the vowel reward through ``score`` (float32, as the
    artifact), each completion against its own prompt's reference rewards, exp with the served t."""
    ref = np.stack([ctrl_run.rewards[ctrl_run.prompts.index(p)] for p in prompts])
    cr = CalibratedReward(functools.partial(score, vowel_reward), Exp(ctrl_run.t))
    return cr.compute(prompts, responses, ref)


def _body(prompts, responses):
    return {"query": [p + r for p, r in zip(prompts, responses, strict=True)], "prompts": prompts}


def test_rewards_equal_calibrated_reward(ctrl_run, server):
    prompts, responses = [], []
    for i, p in enumerate(ctrl_run.prompts):
        for r in (" and a cat", ctrl_run.completions[i][0], ctrl_run.completions[i][1] + "<eos>"):
            prompts.append(p)
            responses.append(r)
    got = httpx.post(
        server.url, json={**_body(prompts, responses), "labels": [None] * len(prompts)}
    )
    assert got.status_code == 200, got.text
    got = got.json()
    # special tokens are dropped before scoring, as the reference completions were decoded
    want = _expected(ctrl_run, prompts, [r.replace("<eos>", "") for r in responses])
    assert got["rewards"] == want.reward.tolist()
    assert got["scores"] == want.calibrated.tolist()
    assert got["extra_logs"]["raw_reward"] == pytest.approx(float(want.raw.mean()), rel=1e-12)
    for p, r, w, c in zip(prompts, responses, got["rewards"], got["scores"], strict=True):
        _, c_hand, w_hand = ctrl_run.expected(p, r.replace("<eos>", ""))
        assert c == c_hand and w == pytest.approx(w_hand, rel=1e-12, abs=1e-15)
    health = httpx.get(server.url.replace("/get_reward", "/health")).json()
    assert health["method"] == "ctrl-exp" and health["transform"] == str(Exp(ctrl_run.t))


def test_bad_inputs_get_a_clear_4xx_and_the_server_keeps_serving(ctrl_run, server):
    p = ctrl_run.prompts[0]
    good = _body([p], [" yes"])
    want = _expected(ctrl_run, [p], [" yes"]).reward.tolist()
    cases = [
        (b'{"query": ["a"', 400, "not valid JSON"),
        (b'["a"]', 422, "must be a JSON object"),
        ({"prompts": [p]}, 422, "field 'query' must be a list of strings (got missing)"),
        ({"query": [p + "a", 7], "prompts": [p, p]}, 422, "query[1] must be a string, got int"),
        ({"query": [p + "a"], "prompts": [None]}, 422, "prompts[0] must be a string"),
        ({"query": [p + "a", p], "prompts": [p]}, 422, "lists differ in length"),
        ({**good, "labels": [1, 2]}, 422, "lists differ in length"),
        ({"query": ["x" * LIMIT], "prompts": [p]}, 413, f"over the limit of {LIMIT} bytes"),
        ((b"x" * (LIMIT // 2) for _ in range(3)), 413, "body is over the limit"),  # chunked
        ({"query": ["Elsewhere"], "prompts": ["Elsewhere"]}, 422, "prompts[0] 'Elsewhere' has no"),
        ({"query": ["Hello"], "prompts": [p]}, 422, "query[0] 'Hello' does not start with"),
    ]
    with httpx.Client(timeout=WAIT) as client:
        for body, status, detail in cases:
            kw = {"json": body} if isinstance(body, (dict, list)) else {"content": body}
            r = client.post(server.url, **kw)
            assert r.status_code == status, (body, r.text)
            assert detail in r.json()["detail"], (body, r.text)
            ok = client.post(server.url, json=good)
            assert ok.status_code == 200 and ok.json()["rewards"] == want


def test_bounded_concurrent_load_answers_every_request_right(ctrl_run, server):
    """256 one-query requests (OpenRLHF sends one query per request) at concurrency 16; the full
    2,000-request measurement is benchmarks/reward_server.py."""
    n, concurrency = 256, 16
    pairs = [
        (ctrl_run.prompts[i % len(ctrl_run.prompts)], " ab" + "cdeio"[: i % 6] * (i % 5))
        for i in range(n)
    ]
    want = _expected(ctrl_run, [p for p, _ in pairs], [r for _, r in pairs]).reward.tolist()
    got: list[float | None] = [None] * n
    errors: list[str] = []

    async def worker(client, todo):
        while todo:
            i = todo.pop()
            r = await client.post(server.url, json=_body(*map(list, zip(pairs[i], strict=True))))
            if r.status_code != 200:
                errors.append(f"{i}: {r.status_code} {r.text}")
            else:
                got[i] = r.json()["rewards"][0]

    async def run():
        todo = list(range(n))
        limits = httpx.Limits(max_connections=concurrency)
        async with httpx.AsyncClient(timeout=WAIT, limits=limits) as client:
            await asyncio.wait_for(
                asyncio.gather(*(worker(client, todo) for _ in range(concurrency))), WAIT
            )

    asyncio.run(run())
    assert errors == []
    assert got == want


def test_sigterm_finishes_the_request_in_flight_then_exits_0(ctrl_run, tmp_path):
    """A request is held inside the reward model (a FIFO gate), SIGTERM arrives, the server stops
    accepting, the held request completes with its reward, the process exits 0. Its own server, so
    the test order does not matter."""
    with _serve(ctrl_run, tmp_path) as server:
        _sigterm_with_a_request_in_flight(ctrl_run, server)


def _sigterm_with_a_request_in_flight(ctrl_run, server) -> None:
    p = ctrl_run.prompts[3]
    held: dict[str, httpx.Response] = {}
    request = threading.Thread(
        target=lambda: held.setdefault(
            "r", httpx.post(server.url, json=_body([p], [GATE]), timeout=WAIT)
        ),
        daemon=True,
    )
    request.start()
    opened: list = []
    opener = threading.Thread(target=lambda: opened.append(open(server.gate, "w")), daemon=True)
    opener.start()  # returns once the reward model has opened the gate: the request is in flight
    opener.join(WAIT)
    assert opened, "the request never reached the reward model"
    server.proc.send_signal(signal.SIGTERM)
    server.wait_for(server.stderr, r"shutting down; finishing 1 request\(s\) in flight")
    with pytest.raises(httpx.ConnectError):
        httpx.post(server.url, json=_body([p], [" no"]), timeout=WAIT)
    opened[0].write("go\n")
    opened[0].close()
    request.join(WAIT)
    assert held["r"].status_code == 200
    assert held["r"].json()["rewards"] == _expected(ctrl_run, [p], [GATE]).reward.tolist()
    assert server.proc.wait(timeout=WAIT) == 0
    server.wait_for(server.stdout, r"^stopped \(signal 15\)")


class _FakeReward:
    """Reward of response r: raw len(r), calibrated len(r)/10, CTRL 2 len(r); raises on a prompt
    "bad"; records the size of every call."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, prompts, responses):
        import torch

        from infalign.integrations.calibrated import CalibratedRewardOutput

        self.calls.append(len(prompts))
        if "bad" in prompts:
            raise ValueError("reward model failed on 'bad'")
        raw = torch.tensor([float(len(r)) for r in responses], dtype=torch.float64)
        return CalibratedRewardOutput(raw, raw / 10, 2 * raw)


def test_batcher_groups_queued_requests_and_isolates_a_failing_one():
    """Requests queued while the worker is busy go into one reward call of at most max_batch pairs
    (a larger request alone), each gets its own slice back, and a failing request fails alone."""
    from infalign.integrations.reward_server import _Batcher, _Job

    sizes = [1, 2, 1, 5, 1, 1]
    jobs_in = [(["p"] * n, ["x" * (10 * j + k) for k in range(n)]) for j, n in enumerate(sizes)]
    jobs_in[4] = (["bad"], ["y"])

    async def scenario():
        fake = _FakeReward()
        batcher = _Batcher(fake, max_batch=3)
        loop = asyncio.get_running_loop()
        jobs = [_Job(p, r, loop.create_future()) for p, r in jobs_in]
        for job in jobs:  # all queued before the worker starts
            batcher.queue.put_nowait(job)
        worker = asyncio.create_task(batcher.run())
        results = await asyncio.wait_for(
            asyncio.gather(*(j.future for j in jobs), return_exceptions=True), WAIT
        )
        worker.cancel()
        batcher.executor.shutdown()
        return fake.calls, results

    calls, results = asyncio.run(scenario())
    # [1, 2] | [1] (5 would overflow) | [5] alone | [bad, 1] fails, then each alone: [bad], [1]
    assert calls == [3, 1, 5, 2, 1, 1]
    for (_, responses), res in zip(jobs_in, results, strict=True):
        if responses == ["y"]:
            assert isinstance(res, ValueError) and "bad" in str(res)
        else:
            assert res.reward.tolist() == [2.0 * len(r) for r in responses]
            assert res.calibrated.tolist() == [len(r) / 10 for r in responses]


def test_bad_serve_arguments_fail_before_loading(ctrl_run, capsys):
    from infalign.cli import main

    for flags, msg in (
        (["--port", "70000"], "--port 70000: expected 0..65535"),
        (["--max-batch", "0"], "--max-batch 0: must be >= 1"),
        (["--method", "nope"], "nope"),
    ):
        assert main(["serve-reward", RECIPE, *flags, *ctrl_run.argv]) == 2
        assert msg in capsys.readouterr().err
