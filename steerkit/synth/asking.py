"""Ask the generator for structured output, parse it strictly, retry the bad replies.

Every Stage I module asks the same way: render a versioned prompt per item, send all items at once
(`ChatClient.complete_many`: concurrent for servers, batched for local models), parse each reply with
a strict parser, and ask again, up to ``tries`` times, only for the items whose reply failed (a new
``sample_index`` each time, so a cached bad reply is not served back). What could not be parsed is
returned with the reasons, for the caller to fall back or skip, never raised.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from steerkit.clients import ChatClient, Request, Sampling
from steerkit.prompts import Prompt
from steerkit.schema import Message

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Default tries per item before falling back or skipping (our choice; a parameter).
DEFAULT_TRIES = 3


class ReplyError(ValueError):
    """A reply that does not have the required form; the message says what is wrong."""


@dataclass
class Job:
    """One item to ask about.

    Attributes:
        key: the item's id (a seed or script id).
        fields: everything the prompt is rendered from; also sent as `Request.fields` so the offline
            rules backend can answer from the same inputs.
        images: image refs sent with the user message.
    """

    key: str
    fields: dict[str, Any]
    images: list[str] = field(default_factory=list)


@dataclass
class Outcome(Generic[T]):
    """The parsed value of one job, or None with the reason of every failed try."""

    key: str
    value: T | None
    attempts: int
    errors: list[str] = field(default_factory=list)
    raw: str = ""

    @property
    def ok(self) -> bool:
        return self.value is not None


def parse_json_object(text: str) -> dict[str, Any]:
    """The JSON object a reply holds: the whole text, a fenced block, or the outermost braces.

    Example:
        >>> parse_json_object('Here: ```json\\n{"a": 1}\\n```')
        {'a': 1}
        >>> parse_json_object("no json")
        Traceback (most recent call last):
        ...
        steerkit.synth.asking.ReplyError: no JSON object in the reply
    """
    text = text.strip()
    fence = re.search(r"```(?:json)?\s*(\{.*\})\s*```", text, re.DOTALL)
    candidates = [text] + ([fence.group(1)] if fence else [])
    if "{" in text and "}" in text:
        candidates.append(text[text.index("{") : text.rindex("}") + 1])
    for c in candidates:
        try:
            data = json.loads(c)
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict):
            return data
    raise ReplyError("no JSON object in the reply")


def need(data: dict[str, Any], key: str, typ: type | tuple[type, ...]) -> Any:
    """``data[key]``, checked to be a ``typ`` (bool never passes for int)."""
    if key not in data:
        raise ReplyError(f"missing field {key!r}")
    value = data[key]
    if not isinstance(value, typ) or (
        isinstance(value, bool) and bool not in (typ if isinstance(typ, tuple) else (typ,))
    ):
        raise ReplyError(f"field {key!r}: expected {getattr(typ, '__name__', typ)}, got {type(value).__name__}")
    return value


def ask(
    client: ChatClient,
    prompt: Prompt,
    jobs: list[Job],
    parse: Callable[[str, Job], T],
    *,
    tries: int = DEFAULT_TRIES,
    sampling: Sampling | None = None,
    root: Path | None = None,
    captions: dict[str, str] | None = None,
) -> list[Outcome[T]]:
    """Ask for every job, parse, retry the failures; outcomes in job order (see the module doc)."""
    return run_closing([client], ask_async(client, prompt, jobs, parse, tries=tries, sampling=sampling,
                                           root=root, captions=captions))


def run_closing(clients: list[ChatClient], coro: Any) -> Any:
    """Run ``coro`` to completion from sync code (Jupyter too), then close the clients' backends:
    each sync call gets a fresh event loop, and HTTP sessions must not outlive theirs."""
    from steerkit.clients import run_sync

    async def go() -> Any:
        try:
            return await coro
        finally:
            for c in clients:
                await c.backend.aclose()

    return run_sync(go())


async def ask_async(
    client: ChatClient,
    prompt: Prompt,
    jobs: list[Job],
    parse: Callable[[str, Job], T],
    *,
    tries: int = DEFAULT_TRIES,
    sampling: Sampling | None = None,
    root: Path | None = None,
    captions: dict[str, str] | None = None,
) -> list[Outcome[T]]:
    sampling = sampling or Sampling(temperature=0.7, max_tokens=1024)
    outcomes = [Outcome[T](key=j.key, value=None, attempts=0) for j in jobs]
    pending = list(range(len(jobs)))
    for attempt in range(tries):
        if not pending:
            break
        requests = []
        for i in pending:
            system, user = prompt.render(**jobs[i].fields)
            msgs = [Message(role="system", content=system), Message(role="user", content=user, images=jobs[i].images)]
            requests.append(Request(msgs, sampling=sampling, sample_index=attempt, task=prompt.id,
                                    fields=jobs[i].fields, root=root, captions=dict(captions or {})))
        replies = await client.complete_many(requests)
        still = []
        for i, reply in zip(pending, replies, strict=True):
            o = outcomes[i]
            o.attempts = attempt + 1
            o.raw = reply.text
            if not reply.ok:
                o.errors.append(f"try {attempt + 1}: {reply.finish} ({reply.error or 'no text'})")
                still.append(i)
                continue
            try:
                o.value = parse(reply.text, jobs[i])
            except ReplyError as exc:
                o.errors.append(f"try {attempt + 1}: {exc}")
                still.append(i)
        pending = still
    for i in pending:
        log.info("%s: no usable %s reply after %d tries: %s", jobs[i].key, prompt.id, tries, outcomes[i].errors[-1])
    return outcomes
