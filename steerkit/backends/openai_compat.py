"""Any OpenAI-compatible chat server (vLLM, SGLang, hosted APIs, `steerkit.serve`) over aiohttp.

The backend only sends and classifies; the `steerkit.clients.ChatClient` front retries and caches:

======================================================  ====================================
server answer                                           outcome
======================================================  ====================================
200, ``finish_reason`` stop / length                    ``Reply(finish="stop" | "length")``
200, ``finish_reason`` ``content_filter``               ``Reply(finish="blocked")``
400 whose error code names a content filter             ``Reply(finish="blocked")``
408, 429 (``Retry-After`` honoured), 5xx                `TransientError`
timeout, refused or dropped connection, cut body        `TransientError`
200 whose body is not the JSON of a chat completion     `TransientError`
any other 4xx                                           ``Reply(finish="error", error=...)``
an image that cannot be read (nothing is sent)          ``Reply(finish="error", error=...)``
======================================================  ====================================

The API key is read from the environment variable named by ``api_key_env`` at each call and goes
only into the ``Authorization`` header: no attribute, repr, log line or cache record holds it.

On a small machine the client's CPU per call decides throughput (see ``benchmarks/README.md``), so
the hot path is lean: one `aiohttp.ClientSession` per event loop, each body serialised straight to
bytes and each reply parsed by pydantic's JSON codec, session-level headers, base64 images memoised
by file identity.

Sampling goes out as ``temperature``, ``max_tokens``, ``top_p`` and ``seed`` (when set), which vLLM,
SGLang and most hosted chat models accept. OpenAI's reasoning models (gpt-5-nano, o-series) reject
``max_tokens`` (they want ``max_completion_tokens``) and any temperature or top_p but 1 with a 400;
`RequestOptions` adapt the body per role (``?max_tokens_field=max_completion_tokens&omit=temperature,
top_p&reasoning_effort=minimal`` after the URL of a role spec, see `steerkit.roles`), and a 400 that
names one of these fields comes back as ``finish="error"`` with the option that fixes it.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
import pydantic_core

from steerkit.backends.request_options import (  # noqa: F401
    DEFAULT_OPTIONS,
    SAMPLING_FIELDS,
    RequestOptions,
    fix_hint,
)
from steerkit.clients import Reply, Request, TransientError

log = logging.getLogger(__name__)

#: Error codes with which servers refuse a prompt on policy grounds (OpenAI, Azure OpenAI).
CONTENT_FILTER_CODES = frozenset(
    {"content_filter", "content_policy_violation", "responsibleaipolicyviolation"}
)
#: HTTP statuses worth retrying besides 5xx: request timeout and rate limit.
RETRY_STATUSES = frozenset({408, 429})

_MIME_BY_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)


def image_mime(data: bytes) -> str:
    """The MIME type of an image from its first bytes (PNG, JPEG, GIF, WebP; else PNG).

    >>> image_mime(b"\\x89PNG\\r\\n\\x1a\\n....")
    'image/png'
    >>> image_mime(b"RIFF\\x00\\x00\\x00\\x00WEBPVP8 ")
    'image/webp'
    """
    for magic, mime in _MIME_BY_MAGIC:
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "image/png"


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds (fractions allowed) or an HTTP date.

    >>> parse_retry_after("2")
    2.0
    >>> parse_retry_after("0.25")
    0.25
    >>> parse_retry_after("Sat, 28 Nov 2026 10:00:05 GMT", now=1795860000.0)
    5.0
    >>> parse_retry_after("soon") is None
    True
    """
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def _data_url(path: Path, _memo: dict[tuple[str, int, int], str] = {}) -> str:  # noqa: B006
    """``data:<mime>;base64,...`` for an image file, memoised by (path, mtime, size)."""
    st = path.stat()
    key = (str(path), st.st_mtime_ns, st.st_size)
    url = _memo.get(key)
    if url is None:
        data = path.read_bytes()
        url = f"data:{image_mime(data)};base64,{base64.b64encode(data).decode('ascii')}"
        if len(_memo) > 512:  # bound memory on long runs over many images
            _memo.clear()
        _memo[key] = url
    return url


def chat_body(model: str, request: Request, options: RequestOptions = DEFAULT_OPTIONS) -> bytes:
    """The JSON body of ``POST /chat/completions`` for a request; images become base64 data URLs.

    A message with images is sent as content parts (images first, then the text); one without is sent
    as a plain string, which every server accepts.

    >>> from steerkit.schema import Message
    >>> chat_body("m", Request([Message(role="user", content="hi")]))
    b'{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0.0,"max_tokens":512,"top_p":1.0}'
    """
    paths = iter(request.image_paths()) if any(m.images for m in request.messages) else iter(())
    messages: list[dict[str, Any]] = []
    for m in request.messages:
        if m.images:
            parts: list[dict[str, Any]] = [
                {"type": "image_url", "image_url": {"url": _data_url(next(paths))}}
                for _ in m.images
            ]
            parts.append({"type": "text", "text": m.content})
            messages.append({"role": m.role, "content": parts})
        else:
            messages.append({"role": m.role, "content": m.content})
    s = request.sampling
    body: dict[str, Any] = {"model": model, "messages": messages}
    omit = options.omit
    if "temperature" not in omit:
        body["temperature"] = s.temperature
    if "max_tokens" not in omit:
        body[options.max_tokens_field] = s.max_tokens
    if "top_p" not in omit:
        body["top_p"] = s.top_p
    if s.seed is not None and "seed" not in omit:
        body["seed"] = s.seed
    if options.extra:
        body.update(options.extra)
    # the bytes of json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode() (floats
    # aside: 1e-05 is written 0.00001), about five times faster on multi-kilobyte judge prompts
    return pydantic_core.to_json(body)


def _error_fields(payload: bytes) -> tuple[str, str, str]:
    """(code, message, param) of an OpenAI-style error body; empty strings when it has none."""
    try:
        err = json.loads(payload).get("error") or {}
    except (ValueError, AttributeError):
        return "", payload[:200].decode("utf-8", "replace"), ""
    if not isinstance(err, dict):
        return "", str(err)[:200], ""
    inner = err.get("innererror") or {}
    code = str(err.get("code") or (inner.get("code") if isinstance(inner, dict) else "") or "")
    return code, str(err.get("message") or "")[:500], str(err.get("param") or "")


async def _close_at_loop_end(session: aiohttp.ClientSession) -> None:
    try:
        await asyncio.Event().wait()  # until cancelled when the loop shuts down
    finally:
        if not session.closed:
            await session.close()


class OpenAICompatBackend:
    """An OpenAI-compatible ``/chat/completions`` endpoint.

    Args:
        model: the model name the server serves (sent in every body).
        base_url: the API root, e.g. ``http://gpu-box:8000/v1`` (``/chat/completions`` is appended).
        api_key_env: the environment variable holding the key; unset means no ``Authorization``
            header (local vLLM and `steerkit.serve` need none).
        max_concurrency: requests in flight at once (the front's semaphore and the connection pool).
        timeout: seconds for one whole call, connection to last byte.
        options: how the body is written for this server (`RequestOptions`).
    """

    batched = False

    def __init__(
        self,
        model: str,
        base_url: str,
        api_key_env: str = "OPENAI_API_KEY",
        max_concurrency: int = 32,
        timeout: float = 120.0,
        options: RequestOptions = DEFAULT_OPTIONS,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(
                f"base_url {base_url!r}: write it with its scheme, e.g. http://host:8000/v1"
            )
        if max_concurrency < 1 or timeout <= 0:
            raise ValueError("max_concurrency must be >= 1 and timeout > 0")
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.api_key_env = api_key_env
        self.max_concurrency = max_concurrency
        self.timeout = timeout
        self.options = options
        self._url = f"{self.base_url}/chat/completions"
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        # one session per event loop: `run_sync` may drive the same backend from fresh loops
        self._sessions: dict[int, tuple[asyncio.AbstractEventLoop, aiohttp.ClientSession]] = {}
        self._closers: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return (
            f"OpenAICompatBackend(model={self.model!r}, base_url={self.base_url!r},"
            f" api_key_env={self.api_key_env!r}, options={self.options!r})"
        )

    def _session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        entry = self._sessions.get(id(loop))
        if entry is not None and entry[0] is loop and not entry[1].closed:
            return entry[1]
        for k, (other, _) in list(self._sessions.items()):
            if other.is_closed():  # a finished run_sync loop; its sockets died with it
                del self._sessions[k]
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.max_concurrency, ttl_dns_cache=300),
            timeout=self._timeout,
            headers={"Content-Type": "application/json"},
            cookie_jar=aiohttp.DummyCookieJar(),  # stateless API: no per-call cookie filtering
            skip_auto_headers=("User-Agent",),
        )
        self._sessions[id(loop)] = (loop, session)
        # asyncio.run / uvloop.run cancel leftover tasks before closing the loop: this one then
        # closes the session on its own loop, so a caller that never awaits `aclose` leaks nothing
        self._closers = {t for t in self._closers if not t.done()}
        self._closers.add(loop.create_task(_close_at_loop_end(session)))
        return session

    def _headers(self) -> dict[str, str] | None:
        key = os.environ.get(self.api_key_env)  # read per call, held nowhere
        return {"Authorization": f"Bearer {key}"} if key else None

    async def generate(self, requests: list[Request]) -> list[Reply]:
        return [await self._one(r) for r in requests]

    async def _one(self, request: Request) -> Reply:
        try:
            body = chat_body(self.model, request, self.options)
        except (
            OSError,
            ValueError,
        ) as exc:  # a missing or unreadable image, a ref outside the root
            return Reply(
                text="", finish="error", model=self.model, error=f"request not sent: {exc}"
            )
        session = self._session()
        try:
            async with session.post(self._url, data=body, headers=self._headers()) as resp:
                status = resp.status
                payload = await resp.read()
                retry_after = resp.headers.get("Retry-After")
        except TimeoutError:
            raise TransientError(f"timed out after {self.timeout:g}s") from None
        except aiohttp.ClientPayloadError as exc:
            raise TransientError(f"response body cut short: {exc}") from None
        except aiohttp.ClientConnectionError as exc:
            raise TransientError(f"connection failed: {type(exc).__name__}: {exc}") from None
        except aiohttp.ClientError as exc:  # an answer that is not valid HTTP
            raise TransientError(f"invalid HTTP response: {type(exc).__name__}: {exc}") from None
        if status == 200:
            return self._parse(payload)
        return self._refusal(status, payload, retry_after)

    def _parse(self, payload: bytes) -> Reply:
        try:
            data = pydantic_core.from_json(payload)  # json.loads' result, three times faster
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
            finish = choice.get("finish_reason") or "stop"
            usage = data.get("usage") or {}
            prompt_tokens = int(usage.get("prompt_tokens") or 0)
            completion_tokens = int(usage.get("completion_tokens") or 0)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            head = payload[:80].decode("utf-8", "replace")
            raise TransientError(
                f"malformed response body ({type(exc).__name__}): {head!r}"
            ) from None
        if not isinstance(text, str):
            raise TransientError(f"malformed response body: content is {type(text).__name__}")
        match finish:
            case "content_filter":
                outcome = "blocked"
            case "length":
                outcome = "length"
            case _:
                outcome = "stop"
        return Reply(
            text=text,
            finish=outcome,  # type: ignore[arg-type]
            model=self.model,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
        )

    def _refusal(self, status: int, payload: bytes, retry_after: str | None) -> Reply:
        code, message, param = _error_fields(payload)
        if status in RETRY_STATUSES or status >= 500:
            raise TransientError(
                f"HTTP {status}: {message}", retry_after=parse_retry_after(retry_after)
            )
        if status == 400 and code.lower() in CONTENT_FILTER_CODES:
            return Reply(
                text="", finish="blocked", model=self.model, error=f"HTTP 400 {code}: {message}"
            )
        hint = fix_hint(param, message, self.options) if status == 400 else ""
        return Reply(
            text="",
            finish="error",
            model=self.model,
            error=f"HTTP {status} {code}: {message}".strip() + hint,
        )

    def server_models(self, timeout: float = 10.0) -> list[str]:
        """The model ids the server lists at ``GET /models`` (what it really serves)."""
        import urllib.request

        req = urllib.request.Request(f"{self.base_url}/models", headers=self._headers() or {})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            data = json.loads(resp.read())
        return [str(m.get("id")) for m in data.get("data") or [] if isinstance(m, dict)]

    async def aclose(self) -> None:
        """Close the session of the running loop (and forget those of loops already closed)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        for k, (other, session) in list(self._sessions.items()):
            if other is loop:
                await session.close()
                del self._sessions[k]
            elif other.is_closed():
                del self._sessions[k]
        for task in list(self._closers):
            if task.done() or task.get_loop() is loop:
                task.cancel()
                self._closers.discard(task)
