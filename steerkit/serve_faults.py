"""Fault injection of the loopback server (`steerkit.serve.LoopbackServer`): which fault, and its answer.

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
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter

from aiohttp import web

from steerkit.serve_wire import error_response

FAULTS = ("http500", "http429", "timeout", "malformed", "truncated", "disconnect", "blocked")
#: Faults answered before the request is served; ``malformed`` and ``truncated`` spoil a served answer.
BEFORE_SERVING = ("timeout", "http500", "http429", "disconnect", "blocked")


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


def draw_fault(faults: dict[str, float], seed: int, seen: Counter[bytes], raw: bytes) -> str | None:
    """The fault for this arrival of body ``raw``: a hash of (seed, body, arrival count of the body).

    ``seen`` counts the arrivals of each body (by digest) and is updated here.

    >>> seen = Counter()
    >>> [draw_fault({"http500": 0.5}, 0, seen, b"{}") for _ in range(4)]
    ['http500', None, 'http500', 'http500']
    >>> draw_fault({}, 0, seen, b"{}") is None
    True
    """
    digest = hashlib.sha256(raw).digest()
    n = seen[digest]
    seen[digest] = n + 1
    h = hashlib.sha256(b"%d:%d:" % (seed, n) + digest).digest()
    u = int.from_bytes(h[:8], "big") / 2.0**64
    edge = 0.0
    for name, rate in faults.items():
        edge += rate
        if u < edge:
            return name
    return None


async def fault_response(request: web.Request, fault: str, *, retry_after: float,
                         hang: float) -> web.StreamResponse:
    """The answer to a request drawn for a fault of `BEFORE_SERVING`."""
    match fault:
        case "http500":
            return error_response(500, "injected server error", "server_error")
        case "http429":
            resp = error_response(429, "injected rate limit", "rate_limit_exceeded")
            resp.headers["Retry-After"] = f"{retry_after:g}"
            return resp
        case "blocked":
            return error_response(400, "injected content filter", "content_filter")
        case "timeout":
            await asyncio.sleep(hang)
            return error_response(504, "injected timeout", "timeout")
        case _:  # disconnect
            return await cut_short(request, b"")


def malformed(payload: bytes) -> web.Response:
    """Status 200 with half of ``payload`` and then HTML: a body that is not JSON."""
    return web.Response(body=payload[: len(payload) // 2] + b"<html>", content_type="application/json")


async def cut_short(request: web.Request, payload: bytes) -> web.StreamResponse:
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
