"""The calibrated reward server (``infalign serve-reward``): OpenRLHF's remote reward protocol on
FastAPI + uvicorn.

``POST /get_reward`` with JSON ``{"query": [B strings], "prompts": [B strings], "labels": [B, optional,
unused]}``, ``query[i]`` = ``prompts[i]`` + response, answers ``{"rewards": [B], "scores": [B],
"extra_logs": {...}}`` (``openrlhf.payload``: CTRL reward, calibrated reward, means over the request).
``GET /health`` describes the reward. Errors are ``{"detail": one line}``:

- 400 the body is not JSON; 413 it is over ``max_body_bytes``;
- 422 a missing or non-list field, a non-string entry, lists of different lengths, a query that does
  not start with its prompt, a prompt with no reference rewards (each named by field and index);
- 500 the reward model failed on a request (the other requests of its batch are scored alone).

**Batching.** Handlers queue their (prompt, response) pairs; one worker takes everything queued (up to
``max_batch`` pairs, whole requests) and scores it in one reward-model call on a worker thread, so
concurrent requests share forward passes while the event loop keeps accepting. **Shutdown.** SIGTERM /
SIGINT (uvicorn's handlers): stop accepting, finish the requests in flight, stop the worker, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from infalign.integrations.calibrated import CalibratedRewardOutput
from infalign.integrations.openrlhf import payload
from infalign.integrations.recipe_reward import CTRLReward

__all__ = ["DEFAULT_MAX_BODY_BYTES", "RequestError", "create_app", "parse_request", "serve"]

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
LOOPBACK = ("127.0.0.1", "::1", "localhost")


class RequestError(ValueError):
    """A bad request: HTTP ``status`` and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _string_list(body: dict[str, Any], key: str) -> list[str]:
    value = body.get(key)
    if not isinstance(value, list):
        got = "missing" if key not in body else type(value).__name__
        raise RequestError(422, f"field {key!r} must be a list of strings (got {got})")
    for i, x in enumerate(value):
        if not isinstance(x, str):
            raise RequestError(
                422, f"{key}[{i}] must be a string, got {type(x).__name__}: {x!r:.60}"
            )
    return value


def parse_request(raw: bytes) -> tuple[list[str], list[str]]:
    """(queries, prompts) of a ``/get_reward`` body; RequestError (400 / 422) naming the field."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError(400, f"body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise RequestError(422, f"body must be a JSON object, got {type(body).__name__}")
    queries, prompts = _string_list(body, "query"), _string_list(body, "prompts")
    labels = body.get("labels")
    if labels is not None and not isinstance(labels, list):
        raise RequestError(422, f"field 'labels' must be a list, got {type(labels).__name__}")
    lengths = {"query": len(queries), "prompts": len(prompts)}
    if labels is not None:
        lengths["labels"] = len(labels)
    if len(set(lengths.values())) > 1:
        raise RequestError(422, f"lists differ in length: {lengths}")
    return queries, prompts


@dataclass
class _Job:
    prompts: list[str]
    responses: list[str]
    future: asyncio.Future[CalibratedRewardOutput] = field(repr=False)


class _Batcher:
    """Scores queued jobs in batches of whole jobs (at most ``max_batch`` pairs unless one job is
    larger) on one worker thread."""

    def __init__(self, reward: CTRLReward, max_batch: int) -> None:
        self.reward, self.max_batch = reward, max_batch
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="reward")
        self._carry: _Job | None = None
        self.batches = 0

    async def submit(self, prompts: list[str], responses: list[str]) -> CalibratedRewardOutput:
        job = _Job(prompts, responses, asyncio.get_running_loop().create_future())
        await self.queue.put(job)
        return await job.future

    async def _next_batch(self) -> list[_Job]:
        """The first queued job and the jobs queued behind it, up to ``max_batch`` pairs in all."""
        first = self._carry if self._carry is not None else await self.queue.get()
        self._carry = None
        jobs, size = [first], len(first.prompts)
        while not self.queue.empty():
            job = self.queue.get_nowait()
            if size + len(job.prompts) > self.max_batch:
                self._carry = job  # the next batch starts with it
                break
            jobs.append(job)
            size += len(job.prompts)
        return jobs

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._next_batch()
            results = await loop.run_in_executor(self.executor, self._score, jobs)
            self.batches += 1
            for job, res in zip(jobs, results, strict=True):
                if job.future.done():  # the client went away
                    continue
                if isinstance(res, BaseException):
                    job.future.set_exception(res)
                else:
                    job.future.set_result(res)

    def _score(self, jobs: list[_Job]) -> list[CalibratedRewardOutput | BaseException]:
        """One reward call for all jobs; if it fails, each job alone (so one bad request fails alone)."""
        prompts = [p for j in jobs for p in j.prompts]
        responses = [r for j in jobs for r in j.responses]
        try:
            out = self.reward(prompts, responses)
        except Exception as err:
            if len(jobs) == 1:
                return [err]
            return [self._score([j])[0] for j in jobs]
        results: list[CalibratedRewardOutput | BaseException] = []
        start = 0
        for j in jobs:
            s = slice(start, start + len(j.prompts))
            cal = None if out.calibrated is None else out.calibrated[s]
            results.append(CalibratedRewardOutput(out.raw[s], cal, out.reward[s]))
            start = s.stop
        return results


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, RequestError 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"body of {int(declared)} bytes is over the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _get_reward(
    request: Request, reward: CTRLReward, batcher: _Batcher, max_body_bytes: int
) -> Any:
    """``POST /get_reward``: check the request (4xx), queue its pairs, answer OpenRLHF's payload."""
    try:
        queries, prompts = parse_request(await _read_body(request, max_body_bytes))
        try:
            responses = reward.split(queries, prompts)
        except ValueError as err:
            raise RequestError(422, str(err)) from None
    except RequestError as err:
        return JSONResponse({"detail": str(err)}, status_code=err.status)
    if not queries:
        return {"rewards": [], "scores": [], "extra_logs": {}}
    try:
        out = await batcher.submit(prompts, responses)
    except Exception as err:
        log.error("reward server: scoring failed: %s: %s", type(err).__name__, err)
        return JSONResponse(
            {"detail": f"the reward model failed: {type(err).__name__}: {err}"}, status_code=500
        )
    return payload(out)


def _report_worker_exit(task: asyncio.Task[None]) -> None:
    """Log the batching worker's failure (it only ends by cancellation at shutdown otherwise)."""
    if not task.cancelled() and task.exception() is not None:
        log.error("reward server: the batching worker failed: %r", task.exception())


def create_app(
    reward: CTRLReward,
    max_batch: int = 256,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    on_ready: Callable[[], None] | None = None,
) -> FastAPI:
    """The FastAPI app serving ``reward`` (see the module docstring)."""
    if max_batch < 1:
        raise ValueError(f"max_batch={max_batch!r}: must be >= 1")
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes={max_body_bytes!r}: must be >= 1")
    batcher = _Batcher(reward, max_batch)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker = asyncio.create_task(batcher.run())
        worker.add_done_callback(_report_worker_exit)
        if on_ready is not None:
            on_ready()
        yield
        worker.cancel()  # uvicorn calls this after the requests in flight have finished
        with contextlib.suppress(asyncio.CancelledError):
            await worker
        batcher.executor.shutdown(wait=True)
        log.info("reward server: stopped after %d reward batches", batcher.batches)

    app = FastAPI(title="infalign calibrated reward", lifespan=lifespan)
    info = {
        "method": reward.spec.method,
        "transform": "raw" if reward.transform is None else str(reward.transform),
        "smoothed": reward.spec.smoothed,
        "reference_dir": reward.spec.reference_dir,
        "num_prompts": len(reward.prompts),
        "num_samples": int(reward.reference.shape[1]),
    }

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", **info}

    @app.post("/get_reward")
    async def get_reward(request: Request) -> Any:
        return await _get_reward(request, reward, batcher, max_body_bytes)

    return app


def _server_class() -> Any:
    import uvicorn

    class _Server(uvicorn.Server):  # type: ignore[misc]
        """uvicorn's server, but a graceful stop on SIGTERM / SIGINT returns instead of re-raising
        the signal afterwards (uvicorn re-raises it, so the exit status would depend on the
        signal disposition the process inherited)."""

        stopped_by: list[int]

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            with super().capture_signals():
                yield
                captured = getattr(self, "_captured_signals", [])
                self.stopped_by = list(captured)
                captured.clear()

        async def shutdown(self, sockets: list[Any] | None = None) -> None:
            for server in getattr(self, "servers", []):  # stop accepting, then say so
                server.close()
            log.info(
                "reward server: shutting down; finishing %d request(s) in flight",
                len(self.server_state.tasks),
            )
            await super().shutdown(sockets=sockets)

    return _Server


def serve(
    reward: CTRLReward,
    host: str = "127.0.0.1",
    port: int = 5000,
    max_batch: int = 256,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    on_ready: Callable[[str, int], None] | None = None,
) -> list[int]:
    """Serve ``reward`` with uvicorn until SIGTERM / SIGINT; returns the signals that stopped it.

    ``on_ready(host, port)`` is called once the socket listens (``port=0`` picks a free port,
    reported there); connections made before uvicorn accepts wait in the listen backlog.
    """
    import socket

    import uvicorn

    if host not in LOOPBACK:
        log.warning("reward server: listening on %s, reachable from other machines", host)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as err:
        sock.close()
        raise ValueError(f"--host {host} --port {port}: cannot listen there: {err}") from None
    bound = sock.getsockname()[1]
    ready = None if on_ready is None else (lambda: on_ready(host, bound))
    app = create_app(reward, max_batch=max_batch, max_body_bytes=max_body_bytes, on_ready=ready)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    server = _server_class()(config)
    server.stopped_by = []
    with sock:
        server.run(sockets=[sock])
    if not server.started:
        raise RuntimeError("the reward server did not start (see uvicorn's error above)")
    return server.stopped_by
