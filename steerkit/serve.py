"""A real OpenAI-compatible chat server on loopback, for tests, benchmarks and offline demos.

`LoopbackServer` serves any steerkit backend (a `ScriptedBackend` function, the embedded SmolLM2,
an ``hf:`` checkpoint) over aiohttp in a background thread with its own event loop, and can inject
faults at given rates so that the client's retry and classification paths meet real sockets::

    server = LoopbackServer(ScriptedBackend(lambda r: "ok"), latency=0.05,
                            faults={"http500": 0.05, "http429": 0.02, "timeout": 0.01}).start()
    client = ChatClient(make_backend(f"openai:scripted:scripted@{server.base_url}"))
    ...
    server.stats()   # {"requests": ..., "outcomes": {"ok": ..., "http500": ...}, "max_in_flight": ...}
    server.stop()

From a shell (``--fault`` repeats; ``--backend`` takes a role spec)::

    python -m steerkit.serve --port 8000 --latency 0.05
    python -m steerkit.serve --backend smollm2 --fault http500=0.05 --fault http429=0.02
    python -m steerkit.serve --api-key-env STEERKIT_API_KEY    # require that key (never on argv)
    python -m steerkit.serve --refuse max_tokens --refuse temperature   # as OpenAI's reasoning models

Endpoints: ``POST /v1/chat/completions`` (non-streamed, ``n=1``), ``GET /v1/models``, ``GET /stats``
(request counters by outcome, requests in flight and the most seen at once, images received).
Requests that arrive together for a ``batched`` backend (a local model) share one ``generate`` call
(`steerkit.serve_batching`).

The wire format is plain OpenAI, nothing added (`steerkit.serve_wire`): the served backend sees a
`Request` rebuilt from the messages (text, images saved under a temporary folder and referenced
from ``Request.root``) and the sampling parameters, with no ``task`` or ``fields``. So backends
that answer from the messages (scripted functions, real models) can be served; the ``rules``
backend, which dispatches on ``Request.task``, cannot, and is used in-process instead. Any client
that speaks OpenAI can use the server unchanged, and no client needs a special case for it.

Faults (``http500``, ``http429``, ``timeout``, ``malformed``, ``truncated``, ``disconnect``,
``blocked``) are drawn per request by `steerkit.serve_faults`, so a run's fault pattern does not
depend on the order in which concurrent requests land. ``refuse`` makes the server answer as OpenAI's
reasoning models (gpt-5-nano, o-series) do (`steerkit.serve_wire.refused`). `stats` counts the body
fields received (``body_fields``), so a test can see that an extra field such as
``reasoning_effort`` arrived.

The server binds loopback addresses only: its key check (``api_key``) is a test of the client, not
protection, and it is not a production server.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import shutil
import tempfile
import threading
from collections import Counter
from pathlib import Path
from typing import Any, Self

import pydantic_core
from aiohttp import web

from steerkit.clients import Backend, Reply, Request
from steerkit.serve_batching import RequestBatcher
from steerkit.serve_faults import (
    BEFORE_SERVING,
    check_faults,
    cut_short,
    draw_fault,
    fault_response,
    malformed,
)
from steerkit.serve_wire import (
    BadRequest,
    check_refusable,
    completion,
    error_response,
    last_user_text,
    refused,
    to_request,
)

log = logging.getLogger(__name__)


def check_loopback(host: str) -> str:
    """The host if it is a loopback address, else a ValueError.

    >>> check_loopback("127.0.0.1")
    '127.0.0.1'
    >>> check_loopback("0.0.0.0")
    Traceback (most recent call last):
    ...
    ValueError: LoopbackServer binds loopback addresses only (127.0.0.1, ::1, localhost), not '0.0.0.0'
    """
    if host == "localhost":
        return host
    try:
        ok = ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"LoopbackServer binds loopback addresses only (127.0.0.1, ::1, localhost), not {host!r}"
        )
    return host


class LoopbackServer:
    """An OpenAI-compatible server on loopback in a background thread (see the module docstring).

    Args:
        backend: the model behind the server; None serves the ``scripted:echo`` double.
        latency: seconds added before every answer (a stand-in for model time).
        host: a loopback address.
        port: 0 picks a free port; read it back from `base_url`.
        faults: fault name -> rate (see `steerkit.serve_faults.FAULTS`).
        seed: seeds the fault pattern.
        retry_after: the ``Retry-After`` value, in seconds, of injected 429s.
        hang: seconds an injected timeout holds the request before answering 504.
        model: the model name served; requests naming another get 404 (as vLLM does).
            Defaults to ``backend.model``.
        journal: keep (last user message, outcome) for every request; read with `journal`.
        api_key: when set, requests must carry ``Authorization: Bearer <api_key>`` or get 401 (as
            ``vllm serve --api-key`` does); lets tests check that a client sends its key.
        max_batch: for a ``batched`` backend (a local model), the most concurrent requests joined
            into one ``generate`` call; requests that arrive while a batch runs form the next one.
        refuse: body fields answered with a 400 as OpenAI's reasoning models answer them (see
            `steerkit.serve_wire.REFUSABLE`).
    """

    def __init__(
        self,
        backend: Backend | None = None,
        *,
        latency: float = 0.0,
        host: str = "127.0.0.1",
        port: int = 0,
        faults: dict[str, float] | None = None,
        seed: int = 0,
        retry_after: float = 1.0,
        hang: float = 30.0,
        model: str | None = None,
        journal: bool = False,
        api_key: str | None = None,
        max_batch: int = 32,
        refuse: tuple[str, ...] | list[str] = (),
    ) -> None:
        if backend is None:
            from steerkit.backends.scripted import named_double

            backend = named_double("echo")
        self.backend = backend
        self.model = model or backend.model
        self.latency = float(latency)
        self.host = check_loopback(host)
        self.port = port
        self.faults = check_faults(faults)
        self.seed = seed
        self.retry_after = retry_after
        self.hang = hang
        self._keep_journal = journal
        self._auth = None if api_key is None else f"Bearer {api_key}"
        self._journal: list[tuple[str, str]] = []
        self._outcomes: Counter[str] = Counter()
        self._seen: Counter[bytes] = Counter()
        self._requests = 0
        self._in_flight = 0
        self._max_in_flight = 0
        self._images = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._image_dir: Path | None = None
        self.max_batch = max_batch
        self.refuse = check_refusable(refuse)
        self._fields: Counter[str] = Counter()
        self._batcher: RequestBatcher | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """The API root to give a client, e.g. ``http://127.0.0.1:41234/v1``."""
        if self._runner is None:
            raise RuntimeError("the server is not started; call start() first")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    def start(self) -> Self:
        """Bind the port and serve from a background thread; returns self."""
        if self._thread is not None:
            raise RuntimeError("the server is already started")
        try:
            import uvloop

            loop = uvloop.new_event_loop()
        except ImportError:
            loop = asyncio.new_event_loop()
        self._loop = loop
        self._image_dir = Path(tempfile.mkdtemp(prefix="steerkit-serve-"))
        self._thread = threading.Thread(target=loop.run_forever, name="steerkit-serve", daemon=True)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._bind(), loop).result(timeout=30)
        except BaseException:
            self.stop()
            raise
        log.info("serving %s on %s", self.model, self.base_url)
        return self

    async def _bind(self) -> None:
        app = web.Application(client_max_size=256 * 1024**2)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/stats", self._stats_endpoint)
        # handler_cancellation: a client that gives up (timeout) frees its hanging handler at once
        runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0
        )
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        await site.start()
        self._runner = runner
        if self.backend.batched:
            self._batcher = RequestBatcher(self.backend, self.max_batch)
        self.port = runner.addresses[0][1]

    def stop(self) -> None:
        """Stop serving, cancel hanging requests, join the thread; safe to call twice."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if self._runner is not None and loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=30)
            except Exception:  # a failed shutdown must not hide the test's own result
                log.exception("loopback server: shutdown failed")
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        if not thread.is_alive():
            loop.close()
        self._thread = self._loop = self._runner = self._batcher = None
        if self._image_dir is not None:
            shutil.rmtree(self._image_dir, ignore_errors=True)

    async def _shutdown(self) -> None:
        if self._batcher is not None:
            self._batcher.cancel()
        assert self._runner is not None
        await self._runner.cleanup()

    def __enter__(self) -> Self:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- observation ---------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """A snapshot of the counters (taken on the server's loop, so it is consistent)."""
        if self._loop is None:
            return self._snapshot()

        async def snap() -> dict[str, Any]:
            return self._snapshot()

        return asyncio.run_coroutine_threadsafe(snap(), self._loop).result(timeout=30)

    def journal(self) -> list[tuple[str, str]]:
        """(last user message, outcome) per finished request, in finishing order (``journal=True``)."""
        if self._loop is None:
            return list(self._journal)

        async def snap() -> list[tuple[str, str]]:
            return list(self._journal)

        return asyncio.run_coroutine_threadsafe(snap(), self._loop).result(timeout=30)

    def _count_image(self) -> None:
        self._images += 1

    def _snapshot(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "requests": self._requests,
            "outcomes": dict(self._outcomes),
            "in_flight": self._in_flight,
            "max_in_flight": self._max_in_flight,
            "images": self._images,
            "body_fields": dict(self._fields),
        }

    async def _stats_endpoint(self, request: web.Request) -> web.Response:
        return web.json_response(self._snapshot())

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "object": "list",
                "data": [{"id": self.model, "object": "model", "owned_by": "steerkit"}],
            }
        )

    # -- serving -------------------------------------------------------------------------------

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self._requests += 1
        self._in_flight += 1
        self._max_in_flight = max(self._max_in_flight, self._in_flight)
        outcome, label = "cancelled", ""
        try:
            if self._auth is not None and request.headers.get("Authorization") != self._auth:
                outcome = "unauthorized"
                return error_response(401, "missing or wrong API key", "invalid_api_key")
            raw = await request.read()
            fault = draw_fault(self.faults, self.seed, self._seen, raw) if self.faults else None
            if self.latency:
                await asyncio.sleep(self.latency)
            try:
                body = pydantic_core.from_json(raw)  # json.loads' result, faster
                if not isinstance(body, dict):
                    raise BadRequest("the body must be a JSON object")
                if self._keep_journal:
                    label = last_user_text(body)
                if fault in BEFORE_SERVING:
                    outcome = fault
                    return await fault_response(request, fault, retry_after=self.retry_after,
                                                hang=self.hang)
                if body.get("model") != self.model:
                    outcome = "not_found"
                    return error_response(
                        404, f"The model `{body.get('model')}` does not exist.", "model_not_found"
                    )
                self._fields.update(body.keys())
                if refusal := refused(self.refuse, body):
                    outcome = "unsupported"
                    return refusal
                if body.get("stream") or (body.get("n") or 1) != 1:
                    raise BadRequest("this server answers non-streamed requests with n=1 only")
                chat_request = to_request(body, self._image_dir, self._count_image)
            except BadRequest as exc:
                outcome = "bad_request"
                return error_response(400, str(exc), "invalid_request_error")
            except ValueError as exc:  # invalid JSON
                outcome = "bad_request"
                return error_response(400, f"invalid JSON body: {exc}", "invalid_request_error")
            try:
                reply = await self._generate(chat_request)
            except Exception as exc:
                log.exception("loopback server: backend %s failed", self.model)
                outcome = "backend_error"
                return error_response(500, f"backend failed: {type(exc).__name__}: {exc}", "server_error")
            if reply.finish == "error":
                outcome = "backend_error"
                return error_response(500, f"backend failed: {reply.error}", "server_error")
            payload = completion(reply, chat_request, model=self.model, number=self._requests)
            match fault:
                case "malformed":
                    outcome = fault
                    return malformed(payload)
                case "truncated":
                    outcome = fault
                    return await cut_short(request, payload)
            outcome = "blocked" if reply.finish == "blocked" else "ok"
            return web.Response(body=payload, content_type="application/json")
        finally:
            self._in_flight -= 1
            self._outcomes[outcome] += 1
            if self._keep_journal:
                self._journal.append((label, outcome))

    async def _generate(self, request: Request) -> Reply:
        if self._batcher is None:
            (reply,) = await self.backend.generate([request])
            return reply
        return await self._batcher.generate(request)


if __name__ == "__main__":  # python -m steerkit.serve (steerkit.serve_cli)
    from steerkit.serve_cli import main

    main()
