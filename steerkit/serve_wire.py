"""The OpenAI wire format of the loopback server (`steerkit.serve.LoopbackServer`), nothing added.

A chat-completions body becomes a `Request` rebuilt from the messages (text, images saved under the
server's image folder and referenced from ``Request.root``) and the sampling parameters, with no
``task`` or ``fields``; a `Reply` becomes a ``chat.completion`` body; errors are OpenAI-style error
bodies. `refused` answers as OpenAI's reasoning models (gpt-5-nano, o-series) do: 400
``unsupported_parameter`` for ``max_tokens`` ("Use 'max_completion_tokens' instead"), 400
``unsupported_value`` for ``temperature`` or ``top_p`` other than 1, each naming the field in the
error's ``param``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydantic_core
from aiohttp import web

from steerkit.clients import Reply, Request, Sampling
from steerkit.schema import Message

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


def error_response(status: int, message: str, code: str, param: str | None = None) -> web.Response:
    """An OpenAI-style error body with ``status``."""
    kind = "invalid_request_error" if code.startswith("unsupported") else code
    return web.json_response(
        {"error": {"message": message, "type": kind, "code": code, "param": param}}, status=status
    )


def check_refusable(refuse: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The fields to refuse, each one of `REFUSABLE`.

    >>> check_refusable(["top_p"])
    ('top_p',)
    >>> check_refusable(["seed"])
    Traceback (most recent call last):
    ...
    ValueError: refuse=seed: the server can refuse max_tokens, temperature, top_p
    """
    if bad := sorted(set(refuse) - set(REFUSABLE)):
        raise ValueError(f"refuse={', '.join(bad)}: the server can refuse {', '.join(REFUSABLE)}")
    return tuple(refuse)


def refused(refuse: tuple[str, ...], body: dict[str, Any]) -> web.Response | None:
    """The 400 a reasoning model sends for the first refused field the body holds, else None."""
    for name in refuse:
        if name == "max_tokens" and name in body:
            return error_response(
                400, "Unsupported parameter: 'max_tokens' is not supported with this model."
                " Use 'max_completion_tokens' instead.", "unsupported_parameter", param=name,
            )
        if name in body and body[name] != 1:
            return error_response(
                400, f"Unsupported value: '{name}' does not support {body[name]} with this model."
                " Only the default (1) value is supported.", "unsupported_value", param=name,
            )
    return None


def to_request(body: dict[str, Any], image_dir: Path | None, on_image: Callable[[], object]) -> Request:
    """The `Request` a chat-completions body asks for; ``on_image`` is called for each image saved."""
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
                    save_image(
                        (part.get("image_url") or {}).get("url", ""),
                        f"messages[{i}].content[{j}]",
                        image_dir,
                    )
                )
                on_image()
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
    return Request(messages=out, sampling=sampling, root=image_dir)


def save_image(url: str, where: str, image_dir: Path | None) -> str:
    """Decode a base64 data URL into ``image_dir``; the file name is its sha256."""
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
    assert image_dir is not None
    path = image_dir / name
    if not path.exists():
        path.write_bytes(raw)
    return name


def completion(reply: Reply, request: Request, *, model: str, number: int) -> bytes:
    """The ``chat.completion`` body of ``reply``, numbered ``chatcmpl-<number>``."""
    # a backend that does not count tokens gets ~4 characters a token: enough to test accounting
    prompt_tokens = (
        reply.prompt_tokens or 1 + sum(len(m.content) for m in request.messages) // 4
    )
    completion_tokens = reply.completion_tokens or 1 + len(reply.text) // 4
    finish = {"blocked": "content_filter", "length": "length"}.get(reply.finish, "stop")
    return pydantic_core.to_json(
        {
            "id": f"chatcmpl-{number}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
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


def last_user_text(body: dict[str, Any]) -> str:
    """The text of the body's last user message, cut to 200 characters (for the server's journal)."""
    for m in reversed(body.get("messages") or []):
        if isinstance(m, dict) and m.get("role") == "user":
            c = m.get("content")
            if isinstance(c, list):
                c = " ".join(
                    p.get("text", "") for p in c if isinstance(p, dict) and p.get("type") == "text"
                )
            return str(c)[:200]
    return ""
