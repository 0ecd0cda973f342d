"""The one message-level multi-turn loop: a user agent and an assistant take turns.

Used by Stage I M4 (script against a target), Stage II (red user against blue expert), evaluation
replay (static turns against the student) and the inspector's fork-from-turn-k. Each turn, every live
dialogue's user message is produced together, then every live dialogue's answer in one
`ChatClient.complete_many` call (one batched ``generate`` for local models, concurrent requests for
servers). GRPO's token-level engine (`steerkit.grpo`) is the batched form of the same turn order.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from steerkit.clients import ChatClient, Reply, Request, Sampling
from steerkit.prompts import load_prompt
from steerkit.schema import Dialogue, Message

STUDENT_SYSTEM = "student_system@1"


def student_system_prompt() -> str:
    return load_prompt(STUDENT_SYSTEM).system


@dataclass
class DialogueState:
    """A dialogue being played.

    Attributes:
        id: the dialogue id.
        script: the template (static) user turns; the user agent may rewrite or replace them.
        images: image refs, sent with the first user turn.
        messages: the conversation so far, system prompt first.
        captions: image ref -> description, for text-only models.
        replies: the assistant's raw `Reply` per turn (finish reasons, token counts).
        meta: provenance carried to the output record.
    """

    id: str
    script: list[str]
    images: list[str] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    root: Path | None = None
    captions: dict[str, str] = field(default_factory=dict)
    replies: list[Reply] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    finished: bool = False

    @property
    def turn(self) -> int:
        """Completed turns."""
        return sum(1 for m in self.messages if m.role == "assistant")

    def to_dialogue(self, **fields: Any) -> Dialogue:
        return Dialogue(id=self.id, messages=list(self.messages), images=list(self.images), meta=dict(self.meta),
                        **fields)

    @classmethod
    def start(
        cls, id: str, script: list[str], *, images: list[str] | None = None, system: str | None = None,
        root: Path | None = None, captions: dict[str, str] | None = None, meta: dict[str, Any] | None = None,
    ) -> DialogueState:
        msgs = [Message(role="system", content=system)] if system else []
        return cls(id=id, script=list(script), images=list(images or []), messages=msgs, root=root,
                   captions=dict(captions or {}), meta=dict(meta or {}))

    @classmethod
    def from_prefix(cls, d: Dialogue, *, keep_turns: int, script: list[str], root: Path | None = None,
                    captions: dict[str, str] | None = None) -> DialogueState:
        """Resume a finished dialogue after its first ``keep_turns`` turns (the inspector's fork)."""
        head = [m for m in d.messages if m.role == "system"]
        body = [m for m in d.messages if m.role != "system"][: 2 * keep_turns]
        return cls(id=d.id, script=list(script), images=list(d.images), messages=head + body, root=root,
                   captions=dict(captions or {}), meta=dict(d.meta))


class UserAgent(Protocol):
    """Produces the next user message for each live dialogue, or None to end that dialogue."""

    async def next_user(self, states: list[DialogueState]) -> list[str | None]: ...


class StaticUser:
    """Replays the script as written (evaluation replay, method.md 6)."""

    async def next_user(self, states: list[DialogueState]) -> list[str | None]:
        return [s.script[s.turn] if s.turn < len(s.script) else None for s in states]


class PromptedUser:
    """A model that writes each user turn from the template turn and the history (Stage II red user).

    Falls back to the template turn when the model's reply is empty or failed, and records that in
    the dialogue's meta, so a flaky user model never ends a dialogue early.
    """

    def __init__(self, client: ChatClient, prompt: str = "red_user@1", sampling: Sampling | None = None) -> None:
        self.client = client
        self.prompt = load_prompt(prompt)
        self.sampling = sampling or Sampling(temperature=0.7, max_tokens=256)

    async def next_user(self, states: list[DialogueState]) -> list[str | None]:
        out: list[str | None] = [None] * len(states)
        reqs, idx = [], []
        for i, s in enumerate(states):
            if s.turn >= len(s.script):
                continue
            fields = {
                "template_turn": s.script[s.turn],
                "turn": s.turn + 1,
                "total_turns": len(s.script),
                "history": transcript(s.messages),
                "goal": s.meta.get("goal", ""),
            }
            system, user = self.prompt.render(**fields)
            reqs.append(Request(
                [Message(role="system", content=system), Message(role="user", content=user, images=s.images)],
                sampling=self.sampling, task=self.prompt.id, fields=fields, root=s.root, captions=s.captions,
            ))
            idx.append(i)
        replies = await self.client.complete_many(reqs)
        for i, r in zip(idx, replies, strict=True):
            text = r.text.strip() if r.ok else ""
            if not text:
                states[i].meta.setdefault("user_fallbacks", []).append(states[i].turn + 1)
                text = states[i].script[states[i].turn]
            out[i] = text
        return out


def transcript(messages: list[Message], *, limit: int | None = None) -> str:
    """The conversation as plain text (system prompt left out), for prompts that read a history."""
    lines = [f"{m.role.upper()}: {m.content}" for m in messages if m.role != "system"]
    return "\n".join(lines[-limit:] if limit else lines)


def assistant_request(s: DialogueState, sampling: Sampling, task: str) -> Request:
    return Request(list(s.messages), sampling=sampling, task=task, root=s.root, captions=s.captions,
                   fields={"dialogue_id": s.id, "turn": s.turn, "meta": s.meta})


async def play(
    states: list[DialogueState],
    *,
    user: UserAgent,
    assistant: ChatClient,
    sampling: Sampling | None = None,
    max_turns: int = 10,
    task: str = "student",
    after_turn: Callable[[list[DialogueState]], Awaitable[None]] | None = None,
) -> list[DialogueState]:
    """Play every dialogue until its user agent stops or ``max_turns`` (method.md 4: at most 10)."""
    sampling = sampling or Sampling()
    live = [s for s in states if not s.finished]
    while live:
        nexts = await user.next_user(live)
        for s, text in zip(live, nexts, strict=True):
            if text is None or s.turn >= max_turns:
                s.finished = True
                continue
            imgs = s.images if s.turn == 0 else []
            s.messages.append(Message(role="user", content=text, images=imgs))
        live = [s for s in live if not s.finished]
        if not live:
            break
        replies = await assistant.complete_many([assistant_request(s, sampling, task) for s in live])
        for s, r in zip(live, replies, strict=True):
            s.replies.append(r)
            s.messages.append(Message(role="assistant", content=r.text))
        if after_turn is not None:
            await after_turn(live)
        live = [s for s in live if not s.finished]
    return states
