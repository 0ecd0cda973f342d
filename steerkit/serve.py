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
Requests that arrive together for a ``batched`` backend (a local model) share one ``generate`` call.

The wire format is plain OpenAI, nothing added: the served backend sees a `Request` rebuilt from the
messages (text, images saved under a temporary folder and referenced from ``Request.root``) and the
sampling parameters, with no ``task`` or ``fields``. So backends that answer from the messages
(scripted functions, real models) can be served; the ``rules`` backend, which dispatches on
``Request.task``, cannot, and is used in-process instead. Any client that speaks OpenAI can use the
server unchanged, and no client needs a special case for it.

Faults (rates in [0, 1], summing to at most 1), decided per request by a hash of the seed, the body
and how many times that same body has arrived, so a run's fault pattern does not depend on the order
in which concurrent requests land:

- ``http500``: status 500 with an OpenAI-style error body;
- ``http429``: status 429 with ``Retry-After: <retry_after>``;
- ``timeout``: no answer for ``hang`` seconds (the client's timeout should fire first), then 504;
- ``malformed``: status 200 with a body that is not JSON;
- ``truncated``: status 200 promising the whole body, half of it sent, then the connection dropped;
- ``disconnect``: the connection closed before any response;
- ``blocked``: status 400 with error code ``content_filter`` (a policy refusal: not retried).

``refuse`` makes the server answer as OpenAI's reasoning models (gpt-5-nano, o-series) do: 400
``unsupported_parameter`` for a body with ``max_tokens`` ("Use 'max_completion_tokens' instead"),
400 ``unsupported_value`` for ``temperature`` or ``top_p`` other than 1, each naming the field in
the error's ``param``. `stats` counts the body fields received (``body_fields``), so a test can see
that an extra field such as ``reasoning_effort`` arrived.

The server binds loopback addresses only: its key check (``api_key``) is a test of the client, not
protection, and it is not a production server.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hashlib
import ipaddress
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Self

import pydantic_core
from aiohttp import web

from steerkit.clients import Backend, Reply, Request, Sampling
from steerkit.schema import Message

log = logging.getLogger(__name__)

FAULTS = ("http500", "http429", "timeout", "malformed", "truncated", "disconnect", "blocked")
#: Body fields a server can be told to refuse, as OpenAI's reasoning models refuse them.
REFUSABLE = ("max_tokens", "temperature", "top_p")
_EXT_BY_MIME = {
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/gif": ".gif",
    "image/webp": ".webp",
}


class BadRequest(ValueError):
    """A request body the server cannot serve; answered with 400 and this message."""


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


def check_faults(faults: dict[str, float] | None) -> dict[str, float]:
    """Validated fault rates in the fixed order of `FAULTS`.

    >>> check_faults({"http429": 0.02, "http500": 0.05})
    {'http500': 0.05, 'http429': 0.02}
    >>> check_faults({"http404": 0.1})
    Traceback (most recent call last):
    ...
    ValueError: unknown fault 'http404'; faults are http500, http429, timeout, malformed, truncated, disconnect, blocked
    """
    faults = dict(faults or {})
    for name, rate in faults.items():
        if name not in FAULTS:
            raise ValueError(f"unknown fault {name!r}; faults are {', '.join(FAULTS)}")
        if not 0.0 <= float(rate) <= 1.0:
            raise ValueError(f"fault {name!r}: rate {rate} is not in [0, 1]")
    if sum(faults.values()) > 1.0 + 1e-9:
        raise ValueError(f"fault rates sum to {sum(faults.values()):.3f} > 1")
    return {name: float(faults[name]) for name in FAULTS if faults.get(name)}


class LoopbackServer:
    """An OpenAI-compatible server on loopback in a background thread (see the module docstring).

    Args:
        backend: the model behind the server; None serves the ``scripted:echo`` double.
        latency: seconds added before every answer (a stand-in for model time).
        host: a loopback address.
        port: 0 picks a free port; read it back from `base_url`.
        faults: fault name -> rate (see `FAULTS`).
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
            `REFUSABLE` and the module docstring).
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
        if bad := sorted(set(refuse) - set(REFUSABLE)):
            raise ValueError(f"refuse={', '.join(bad)}: the server can refuse {', '.join(REFUSABLE)}")
        self.refuse = tuple(refuse)
        self._fields: Counter[str] = Counter()
        self._queue: asyncio.Queue[tuple[Request, asyncio.Future[Reply]]] | None = None
        self._batcher: asyncio.Task[None] | None = None

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
            self._queue = asyncio.Queue()
            self._batcher = asyncio.get_running_loop().create_task(self._batch_forever())
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
        self._thread = self._loop = self._runner = self._queue = self._batcher = None
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

    def _draw_fault(self, raw: bytes) -> str | None:
        """The fault for this arrival: a hash of (seed, body, arrival count of the body)."""
        digest = hashlib.sha256(raw).digest()
        n = self._seen[digest]
        self._seen[digest] = n + 1
        h = hashlib.sha256(b"%d:%d:" % (self.seed, n) + digest).digest()
        u = int.from_bytes(h[:8], "big") / 2.0**64
        edge = 0.0
        for name, rate in self.faults.items():
            edge += rate
            if u < edge:
                return name
        return None

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self._requests += 1
        self._in_flight += 1
        self._max_in_flight = max(self._max_in_flight, self._in_flight)
        outcome, label = "cancelled", ""
        try:
            if self._auth is not None and request.headers.get("Authorization") != self._auth:
                outcome = "unauthorized"
                return _error(401, "missing or wrong API key", "invalid_api_key")
            raw = await request.read()
            fault = self._draw_fault(raw) if self.faults else None
            if self.latency:
                await asyncio.sleep(self.latency)
            try:
                body = pydantic_core.from_json(raw)  # json.loads' result, faster
                if not isinstance(body, dict):
                    raise BadRequest("the body must be a JSON object")
                if self._keep_journal:
                    label = _last_user_text(body)
                if fault in ("timeout", "http500", "http429", "disconnect", "blocked"):
                    outcome = fault
                    return await self._fault_response(request, fault)
                if body.get("model") != self.model:
                    outcome = "not_found"
                    return _error(
                        404, f"The model `{body.get('model')}` does not exist.", "model_not_found"
                    )
                self._fields.update(body.keys())
                if refused := self._refused(body):
                    outcome = "unsupported"
                    return refused
                if body.get("stream") or (body.get("n") or 1) != 1:
                    raise BadRequest("this server answers non-streamed requests with n=1 only")
                chat_request = self._to_request(body)
            except BadRequest as exc:
                outcome = "bad_request"
                return _error(400, str(exc), "invalid_request_error")
            except ValueError as exc:  # invalid JSON
                outcome = "bad_request"
                return _error(400, f"invalid JSON body: {exc}", "invalid_request_error")
            try:
                reply = await self._generate(chat_request)
            except Exception as exc:
                log.exception("loopback server: backend %s failed", self.model)
                outcome = "backend_error"
                return _error(500, f"backend failed: {type(exc).__name__}: {exc}", "server_error")
            if reply.finish == "error":
                outcome = "backend_error"
                return _error(500, f"backend failed: {reply.error}", "server_error")
            payload = self._completion(reply, chat_request)
            match fault:
                case "malformed":
                    outcome = fault
                    return web.Response(
                        body=payload[: len(payload) // 2] + b"<html>",
                        content_type="application/json",
                    )
                case "truncated":
                    outcome = fault
                    return await self._cut_short(request, payload)
            outcome = "blocked" if reply.finish == "blocked" else "ok"
            return web.Response(body=payload, content_type="application/json")
        finally:
            self._in_flight -= 1
            self._outcomes[outcome] += 1
            if self._keep_journal:
                self._journal.append((label, outcome))

    def _refused(self, body: dict[str, Any]) -> web.Response | None:
        """The 400 a reasoning model sends for the first refused field the body holds, else None."""
        for name in self.refuse:
            if name == "max_tokens" and name in body:
                return _error(
                    400, "Unsupported parameter: 'max_tokens' is not supported with this model."
                    " Use 'max_completion_tokens' instead.", "unsupported_parameter", param=name,
                )
            if name in body and body[name] != 1:
                return _error(
                    400, f"Unsupported value: '{name}' does not support {body[name]} with this model."
                    " Only the default (1) value is supported.", "unsupported_value", param=name,
                )
        return None

    async def _generate(self, request: Request) -> Reply:
        if self._queue is None:
            (reply,) = await self.backend.generate([request])
            return reply
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        await self._queue.put((request, future))
        return await future

    async def _batch_forever(self) -> None:
        """Join the requests waiting for a batched backend into one ``generate`` call at a time."""
        assert self._queue is not None
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            batch = [(r, f) for r, f in batch if not f.done()]  # skip requests whose client left
            if not batch:
                continue
            try:
                replies = await self.backend.generate([r for r, _ in batch])
            except Exception as exc:  # noqa: BLE001 - the waiting handlers answer 500 with it
                for _, f in batch:
                    if not f.done():
                        f.set_exception(exc)
                continue
            for (_, f), reply in zip(batch, replies, strict=True):
                if not f.done():
                    f.set_result(reply)

    async def _fault_response(self, request: web.Request, fault: str) -> web.StreamResponse:
        match fault:
            case "http500":
                return _error(500, "injected server error", "server_error")
            case "http429":
                resp = _error(429, "injected rate limit", "rate_limit_exceeded")
                resp.headers["Retry-After"] = f"{self.retry_after:g}"
                return resp
            case "blocked":
                return _error(400, "injected content filter", "content_filter")
            case "timeout":
                await asyncio.sleep(self.hang)
                return _error(504, "injected timeout", "timeout")
            case _:  # disconnect
                return await self._cut_short(request, b"")

    async def _cut_short(self, request: web.Request, payload: bytes) -> web.StreamResponse:
        """Send headers promising ``payload`` (none if empty), half the body, then drop the socket."""
        transport = request.transport
        if payload:
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            resp.content_length = len(payload)
            await resp.prepare(request)
            await resp.write(payload[: len(payload) // 2])
        if transport is not None:
            transport.abort()
        raise asyncio.CancelledError  # aiohttp ends the handler quietly; nothing more is written

    def _to_request(self, body: dict[str, Any]) -> Request:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty list")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise BadRequest(f"messages[{i}].role must be system, user or assistant")
            content = m.get("content")
            if isinstance(content, str):
                # roles and types are checked here: skip pydantic's second pass on the hot path
                out.append(Message.model_construct(role=m["role"], content=content, images=[]))
                continue
            if not isinstance(content, list):
                raise BadRequest(f"messages[{i}].content must be a string or a list of parts")
            texts, images = [], []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    texts.append(str(part.get("text", "")))
                elif kind == "image_url":
                    images.append(
                        self._save_image(
                            (part.get("image_url") or {}).get("url", ""),
                            f"messages[{i}].content[{j}]",
                        )
                    )
                else:
                    raise BadRequest(f"messages[{i}].content[{j}].type must be text or image_url")
            out.append(
                Message.model_construct(role=m["role"], content="\n".join(texts), images=images)
            )
        try:
            sampling = Sampling(
                temperature=float(body.get("temperature", 1.0)),
                max_tokens=int(body.get("max_tokens") or body.get("max_completion_tokens") or 512),
                top_p=float(body.get("top_p", 1.0)),
                seed=None if body.get("seed") is None else int(body["seed"]),
            )
        except (TypeError, ValueError) as exc:
            raise BadRequest(f"sampling parameters: {exc}") from None
        return Request(messages=out, sampling=sampling, root=self._image_dir)

    def _save_image(self, url: str, where: str) -> str:
        """Decode a base64 data URL into the image folder; the file name is its sha256."""
        head, sep, data = url.partition(",")
        if not (url.startswith("data:") and sep and head.endswith(";base64")):
            raise BadRequest(
                f"{where}: only base64 data URLs are accepted (this server cannot fetch)"
            )
        try:
            raw = base64.b64decode(data, validate=True)
        except binascii.Error as exc:
            raise BadRequest(f"{where}: invalid base64 ({exc})") from None
        name = hashlib.sha256(raw).hexdigest() + _EXT_BY_MIME.get(head[5:-7], ".img")
        assert self._image_dir is not None
        path = self._image_dir / name
        if not path.exists():
            path.write_bytes(raw)
        self._images += 1
        return name

    def _completion(self, reply: Reply, request: Request) -> bytes:
        # a backend that does not count tokens gets ~4 characters a token: enough to test accounting
        prompt_tokens = (
            reply.prompt_tokens or 1 + sum(len(m.content) for m in request.messages) // 4
        )
        completion_tokens = reply.completion_tokens or 1 + len(reply.text) // 4
        finish = {"blocked": "content_filter", "length": "length"}.get(reply.finish, "stop")
        return pydantic_core.to_json(
            {
                "id": f"chatcmpl-{self._requests}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": reply.text},
                        "finish_reason": finish,
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            }
        )


def _last_user_text(body: dict[str, Any]) -> str:
    for m in reversed(body.get("messages") or []):
        if isinstance(m, dict) and m.get("role") == "user":
            c = m.get("content")
            if isinstance(c, list):
                c = " ".join(
                    p.get("text", "") for p in c if isinstance(p, dict) and p.get("type") == "text"
                )
            return str(c)[:200]
    return ""


def _error(status: int, message: str, code: str, param: str | None = None) -> web.Response:
    kind = "invalid_request_error" if code.startswith("unsupported") else code
    return web.json_response(
        {"error": {"message": message, "type": kind, "code": code, "param": param}}, status=status
    )


def _parse_fault(text: str) -> tuple[str, float]:
    name, sep, rate = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--fault {text!r}: write NAME=RATE, e.g. http500=0.05")
    try:
        return name, float(rate)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--fault {text!r}: the rate must be a number") from None


def main(argv: list[str] | None = None) -> None:
    """``python -m steerkit.serve``: serve until interrupted; prints the base URL on the first line."""
    p = argparse.ArgumentParser(prog="python -m steerkit.serve", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1", help="a loopback address")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--latency", type=float, default=0.0, help="seconds added to every answer")
    p.add_argument(
        "--backend", default="scripted:echo", help="role spec of the served model (not openai:)"
    )
    p.add_argument("--model", default=None, help="served model name (default: the backend's)")
    p.add_argument(
        "--fault", type=_parse_fault, action="append", default=[], help="NAME=RATE, repeatable"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--retry-after", type=float, default=1.0)
    p.add_argument("--hang", type=float, default=30.0)
    p.add_argument("--api-key-env", default=None, help="require the key held in this variable")
    p.add_argument(
        "--refuse", action="append", default=[], choices=REFUSABLE,
        help="answer a body with this field 400, as OpenAI's reasoning models do; repeatable",
    )
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from steerkit.backends.scripted import ScriptedBackend
    from steerkit.roles import make_backend

    if args.backend.startswith("openai:"):
        p.error("--backend openai:... would proxy another server; serve a local backend")
    backend = make_backend(args.backend)
    if isinstance(backend, ScriptedBackend):
        backend.record = False  # nobody reads its calls here, and it serves until interrupted
    server = LoopbackServer(
        backend,
        latency=args.latency,
        host=args.host,
        port=args.port,
        faults=dict(args.fault),
        seed=args.seed,
        retry_after=args.retry_after,
        hang=args.hang,
        model=args.model,
        api_key=os.environ[args.api_key_env] if args.api_key_env else None,
        refuse=args.refuse,
    ).start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    print(server.base_url, flush=True)  # the first line: scripts read the port from it
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
