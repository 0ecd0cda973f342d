"""The one front for every chat model: retries, bounded concurrency, cache, accounting.

Backends (`steerkit.backends`) only generate and classify their errors: a retryable failure is raised
as `TransientError`; anything else becomes a reply with ``finish="error"``. The front owns the retry
loop (exponential backoff with jitter, honouring Retry-After), the content-addressed cache and the
per-role counters. Blocked and failed calls are data (`Reply.finish`), never exceptions.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import threading
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import pydantic_core

from steerkit.schema import Message

log = logging.getLogger(__name__)

Finish = Literal["stop", "length", "blocked", "error"]
T = TypeVar("T")


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters; part of the cache key."""

    temperature: float = 0.0
    max_tokens: int = 512
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class Request:
    """One chat call.

    Attributes:
        messages: the conversation; image refs resolve against ``root``.
        sampling: sampling parameters.
        sample_index: distinguishes repeated samples of the same prompt (part of the cache key).
        task: the prompt id that built the messages (e.g. ``"judge@1"``); offline rule backends
            answer by task.
        fields: the structured inputs the prompt was rendered from, for offline rule backends.
        root: the folder image refs are relative to.
        captions: image ref -> text description, for models that cannot see images (text-only
            students read ``[Image: caption]`` in place of the picture).
    """

    messages: list[Message]
    sampling: Sampling = field(default_factory=Sampling)
    sample_index: int = 0
    task: str = ""
    fields: dict[str, Any] = field(default_factory=dict)
    root: Path | None = None
    captions: dict[str, str] = field(default_factory=dict)

    def image_paths(self) -> list[Path]:
        from steerkit.schema import resolve_image

        root = self.root or Path.cwd()
        return [resolve_image(root, ref) for m in self.messages for ref in m.images]


@dataclass
class Reply:
    """A model's answer, or why there is none."""

    text: str
    finish: Finish = "stop"
    model: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False
    attempts: int = 1
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.finish in ("stop", "length")


class TransientError(Exception):
    """A failure worth retrying (429, 5xx, timeout, dropped connection, malformed body)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Backend(Protocol):
    """What a backend provides. ``batched`` backends get many requests per call (local models)."""

    model: str
    batched: bool
    max_concurrency: int

    async def generate(self, requests: list[Request]) -> list[Reply]: ...

    async def aclose(self) -> None: ...


@dataclass
class Usage:
    """Per-role counters."""

    calls: int = 0
    cache_hits: int = 0
    retries: int = 0
    errors: int = 0
    blocked: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


def _image_digest(path: Path, _memo: dict[tuple[str, float, int], str] = {}) -> str:  # noqa: B006
    st = path.stat()
    k = (str(path), st.st_mtime, st.st_size)
    if k not in _memo:
        _memo[k] = hashlib.sha256(path.read_bytes()).hexdigest()
    return _memo[k]


def cache_key(model: str, request: Request) -> str:
    """Content address of a call: model, messages with image bytes, sampling and sample index.

    Timeouts, retry counts and concurrency are not part of it: they do not change the answer.
    """
    has_images = any(m.images for m in request.messages)
    images = iter([_image_digest(p) for p in request.image_paths()] if has_images else [])
    msgs = [
        {"role": m.role, "content": m.content, "images": [next(images) for _ in m.images]}
        for m in request.messages
    ]
    s = request.sampling  # spelled out: dataclasses.asdict costs more than the hash on this path
    sampling = {"temperature": s.temperature, "max_tokens": s.max_tokens, "top_p": s.top_p, "seed": s.seed}
    body = json.dumps(
        {"model": model, "messages": msgs, "sampling": sampling, "i": request.sample_index},
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(body.encode()).hexdigest()


class ReplyCache:
    """An append-only JSONL file of replies by content key; safe to kill at any point.

    Each record is one ``O_APPEND`` write, so a kill leaves whole lines (a torn last line is dropped
    on the next open by `steerkit.files.ResultLog`) and clients sharing the file do not interleave.
    The values of secret environment variables (`steerkit.files.SECRET_ENV` plus ``secret_env``, e.g.
    the backend's key variable) are replaced by ``***`` before anything is written.
    """

    def __init__(self, path: Path, *, secret_env: tuple[str, ...] = ()) -> None:
        from steerkit.files import SECRET_ENV, ResultLog

        self.path = Path(path)
        self._mem: dict[str, dict[str, Any]] = {r["key"]: r for r in ResultLog(self.path, key="key", fsync=False)}
        self._secret_env = tuple(dict.fromkeys((*SECRET_ENV, *secret_env)))
        self._secrets: tuple[bytes, ...] = ()
        self.refresh_secrets()

    def refresh_secrets(self) -> None:
        """Re-read the secret values to scrub (`ChatClient` does it before each batch: the
        environment lookups cost more than the write, so they are not repeated per record)."""
        self._secrets = tuple(
            v.encode("utf-8", "surrogateescape") for k in self._secret_env if (v := os.environ.get(k))
        )

    def get(self, key: str) -> Reply | None:
        r = self._mem.get(key)
        return None if r is None else Reply(**{**r["reply"], "cached": True})

    def put(self, key: str, reply: Reply) -> None:
        rec = {"key": key, "reply": {**vars(reply), "cached": False}}  # fields are flat: no deep copy
        self._mem[key] = rec
        line = pydantic_core.to_json(rec)  # UTF-8 JSON, as json.dumps(ensure_ascii=False), faster
        for secret in self._secrets:
            line = line.replace(secret, b"***")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line + b"\n")
        finally:
            os.close(fd)

    def __len__(self) -> int:
        return len(self._mem)


@dataclass
class RetryPolicy:
    """Exponential backoff with full jitter; Retry-After wins when the server sends it."""

    max_retries: int = 6
    base: float = 0.25
    cap: float = 20.0

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        if retry_after is not None:
            return min(retry_after, self.cap)
        return rng.uniform(0, min(self.cap, self.base * 2**attempt))


class ChatClient:
    """A role's model: call `complete_many` (async) or `complete_many_sync`."""

    def __init__(
        self,
        backend: Backend,
        *,
        role: str = "",
        spec: str = "",
        cache_dir: Path | None = None,
        retry: RetryPolicy | None = None,
        seed: int = 0,
    ) -> None:
        self.backend = backend
        self.role = role
        self.spec = spec or backend.model
        self.retry = retry or RetryPolicy()
        self.usage = Usage()
        self._rng = random.Random(seed)
        self.cache: ReplyCache | None = None
        if cache_dir is not None:
            name = hashlib.sha256(self.spec.encode()).hexdigest()[:16]
            key_env = getattr(backend, "api_key_env", None)
            self.cache = ReplyCache(Path(cache_dir) / f"{name}.jsonl", secret_env=(key_env,) if key_env else ())

    async def _call_one(self, request: Request, sem: asyncio.Semaphore) -> Reply:
        attempt = 0
        while True:
            async with sem:
                try:
                    (reply,) = await self.backend.generate([request])
                    reply.attempts = attempt + 1
                    return reply
                except TransientError as exc:
                    err = exc
            if attempt >= self.retry.max_retries:
                return Reply(text="", finish="error", model=self.backend.model, attempts=attempt + 1,
                             error=f"gave up after {attempt + 1} attempts: {err}")
            wait = self.retry.delay(attempt, err.retry_after, self._rng)
            self.usage.retries += 1
            log.debug("%s: retry %d in %.2fs after %s", self.role, attempt + 1, wait, err)
            await asyncio.sleep(wait)
            attempt += 1

    async def complete_many(
        self, requests: list[Request], *, on_reply: Callable[[int, Reply], None] | None = None
    ) -> list[Reply]:
        """All replies in request order; cached ones are not sent. ``on_reply`` sees each as it lands."""
        out: list[Reply | None] = [None] * len(requests)
        keys: list[str | None] = [None] * len(requests)
        if self.cache is not None:
            self.cache.refresh_secrets()

        def from_cache(i: int) -> bool:
            if self.cache is None:
                return False
            try:
                keys[i] = cache_key(self.backend.model, requests[i])
            except (OSError, ValueError):  # an unreadable image: the backend reports it for this request
                return False
            hit = self.cache.get(keys[i])  # type: ignore[arg-type]
            if hit is None:
                return False
            out[i] = hit
            self.usage.cache_hits += 1
            if on_reply:
                on_reply(i, hit)
            return True

        def land(i: int, reply: Reply) -> None:
            out[i] = reply
            self._count(reply)
            if self.cache is not None and reply.ok and keys[i] is not None:
                self.cache.put(keys[i], reply)
            if on_reply:
                on_reply(i, reply)

        if self.backend.batched:
            todo = [i for i in range(len(requests)) if not from_cache(i)]
            replies = await self.backend.generate([requests[i] for i in todo]) if todo else []
            for i, reply in zip(todo, replies, strict=True):
                land(i, reply)
        else:
            # A pool of workers pulling the next index, not one task per request: the first calls go
            # out at once instead of after every cache key and task is made, and the loop stays
            # small. Twice the limit in workers keeps every slot busy while some wait out a backoff
            # (the semaphore, released during the wait, bounds what is in flight).
            sem = asyncio.Semaphore(self.backend.max_concurrency)
            pending = iter(range(len(requests)))

            async def worker() -> None:
                for i in pending:
                    if not from_cache(i):
                        reply = await self._call_one(requests[i], sem)
                        # Refill the freed slot before processing the reply. Replies often land
                        # together (a server finishing a batch, a fixed latency), and parsing them,
                        # writing them to the cache and building the next requests would otherwise
                        # hold back every request waiting for one of the freed slots. The first
                        # yield lets the replies that landed with this one free their slots, the
                        # second lets the requests waiting for those slots go out.
                        await asyncio.sleep(0)
                        await asyncio.sleep(0)
                        land(i, reply)

            n = min(len(requests), 2 * self.backend.max_concurrency)
            await asyncio.gather(*(worker() for _ in range(n)))
        return out  # type: ignore[return-value]

    def _count(self, reply: Reply) -> None:
        u = self.usage
        u.calls += reply.attempts if not self.backend.batched else 1
        u.prompt_tokens += reply.prompt_tokens
        u.completion_tokens += reply.completion_tokens
        u.errors += reply.finish == "error"
        u.blocked += reply.finish == "blocked"

    def complete_many_sync(self, requests: list[Request], **kw: Any) -> list[Reply]:
        return run_sync(self._complete_and_close(requests, **kw))

    async def _complete_and_close(self, requests: list[Request], **kw: Any) -> list[Reply]:
        try:
            return await self.complete_many(requests, **kw)
        finally:
            await self.backend.aclose()

    def complete_sync(self, request: Request) -> Reply:
        return self.complete_many_sync([request])[0]


def run_sync(coro: Coroutine[Any, Any, T] | Awaitable[T]) -> T:
    """Run a coroutine to completion from sync code, also inside Jupyter's running loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _run_fresh(coro)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["v"] = _run_fresh(coro)
        except BaseException as exc:  # re-raised in the caller's thread
            box["e"] = exc

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if "e" in box:
        raise box["e"]
    return box["v"]


def _run_fresh(coro: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)
