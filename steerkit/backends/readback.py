"""A backend that answers the project's prompts from the messages alone, as a served model must.

`RehearsalBackend` is what `steerkit.serve.LoopbackServer` serves in a dress rehearsal of a full
run (`steerkit.rehearsal`). It reads only what travels over the wire: it recognises which of the
project's prompts a request was rendered from by the prompt's fixed system text (`recognise`),
reads the prompt's inputs back out of the rendered user message (`read_fields`) and answers in the
format that prompt asks for. Where the `rules` heuristics need only what the rendered prompt shows,
they answer (`steerkit.backends.rules.rules_reply` on a `Request` rebuilt with those fields); what
a prompt does not show (a bench's annotated risk levels, a benign task's category, an image's
overlay text) is left out, as a served model would not see it either.

At seeded rates a reply is flawed the way real models' replies are (`FLAWS`): ``malformed`` (JSON
in prose or a code fence, a key missing, a brace missing, single quotes; a blue expert's answer
without its tags; a red user's turn with a label and quotes), ``truncated`` (cut mid-reply,
``finish_reason`` ``length``) or ``refused`` (a model declining the task itself). A request whose
prompt cannot be recognised or read back gets a plain reply and is counted under ``unrecognised``
or ``unreadable`` in `RehearsalBackend.counts`, so a rehearsal can require that none occurred.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any

from steerkit.clients import Reply, Request
from steerkit.prompts import load_prompt
from steerkit.schema import Message

log = logging.getLogger(__name__)

#: The prompts served roles are asked with (the student's own prompt is answered in process).
SERVED_PROMPTS = (
    "attack_judge",
    "benign",
    "blue_expert",
    "evaluator",
    "forensic",
    "judge",
    "obfuscated",
    "plan",
    "red_user",
    "rewrite",
    "tutor",
)
FLAWS = ("malformed", "truncated", "refused")
#: What a model declining the task itself sends (a real judge or generator sometimes does).
REFUSAL = "I'm sorry, but I can't help with that request."
_JSON_PROMPTS = frozenset(SERVED_PROMPTS) - {"blue_expert", "red_user"}


@cache
def _openings() -> tuple[tuple[str, str], ...]:
    """(fixed opening of a prompt's system text, prompt name), longest first."""
    out = []
    for name in SERVED_PROMPTS:
        head = re.split(r"\{[{%#]", load_prompt(name).system, maxsplit=1)[0].strip()
        if not head:
            raise ValueError(f"prompt {name!r}: its system text opens with a template field")
        out.append((head, name))
    return tuple(sorted(out, key=lambda x: -len(x[0])))


def recognise(messages: Sequence[Message]) -> str | None:
    """The prompt a conversation was rendered from, by its system message; None if none fits."""
    system = next((m.content.strip() for m in messages if m.role == "system"), "")
    return next((name for head, name in _openings() if system.startswith(head)), None)


def without_reasks(messages: Sequence[Message]) -> list[Message]:
    """The prompt's own messages: a judge asked again (`steerkit.judge.reask_request`) carries its
    unreadable reply and the ``reask@1`` message after them, once per re-ask."""
    note = load_prompt("reask").user.strip()
    out = list(messages)
    while len(out) > 2 and out[-1].role == "user" and out[-1].content.strip() == note and out[-2].role == "assistant":
        out = out[:-2]
    return out


class Unreadable(ValueError):
    """A recognised prompt whose rendered user message does not have the template's shape."""


def _match(pattern: str, text: str, name: str) -> re.Match[str]:
    m = re.search(pattern, text, re.DOTALL)
    if m is None:
        raise Unreadable(f"{name}: the user message does not match {pattern!r}")
    return m


def _between(text: str, start: str, end: str, name: str) -> str:
    i = text.find(start)
    j = text.rfind(end)
    if i < 0 or j < i + len(start) - 1:
        raise Unreadable(f"{name}: no block between {start!r} and {end!r}")
    return text[i + len(start) : j]


def _transcript_turns(text: str) -> list[dict[str, str]]:
    """``USER: ...`` / ``ASSISTANT: ...`` lines (as `steerkit.converse.transcript` writes them)."""
    parts = re.split(r"(?m)^(USER|ASSISTANT): ", text)
    return [
        {"role": role.lower(), "text": body.strip()}
        for role, body in zip(parts[1::2], parts[2::2], strict=True)
    ]


def read_fields(name: str, messages: Sequence[Message]) -> dict[str, Any]:
    """The inputs of prompt ``name`` read back from its rendered messages (for `rules_reply`)."""
    from steerkit.heuristics import harm_cues

    user = messages[-1].content
    match name:
        case "benign":
            m = _match(
                r"Task:\n(?P<task>.*?)\n(?:The user also shares an image: (?P<note>.*?)\n)?\n?"
                r"Write between (?P<lo>\d+) and (?P<hi>\d+) user turns",
                user,
                name,
            )
            ref = re.search(
                r"The correct final answer is: (.*?)\n\s*\nOutput format", user, re.DOTALL
            )
            return {
                "task": m["task"],
                "image_note": m["note"] or "",
                "min_turns": int(m["lo"]),
                "max_turns": int(m["hi"]),
                "reference": ref[1] if ref else "",
                "with_answers": "After each turn, also write" in user,
            }
        case "obfuscated":
            m = _match(
                r"Request: (?P<query>.*?)\nCategory: (?P<cat>.*?)\n"
                r"(?:Image shared with the request: (?P<note>.*?)\n)?\n?"
                r"Write between (?P<lo>\d+) and (?P<hi>\d+) user turns",
                user,
                name,
            )
            return {
                "query": m["query"],
                "category": m["cat"],
                "image_note": m["note"] or "",
                "min_turns": int(m["lo"]),
                "max_turns": int(m["hi"]),
            }
        case "forensic":
            m = re.search(
                r"Notes recorded with the image \(may be incomplete\): (.*?)\n", user, re.DOTALL
            )
            return {"notes": m[1] if m else ""}
        case "rewrite":
            m = _match(
                r"Intent: (?P<intent>.*?)\nStrategy: (?P<strategy>\S+) - .*?\n"
                r"Image report: (?P<report>.*?)\n\nOutput format",
                user,
                name,
            )
            words = re.search(r"of (\d+) to (\d+) words", messages[0].content)
            lo, hi = (int(words[1]), int(words[2])) if words else (80, 200)
            return {
                "intent": m["intent"],
                "strategy": m["strategy"],
                "report": m["report"],
                "min_words": lo,
                "max_words": hi,
            }
        case "plan":
            m = _match(
                r"Intent: (?P<intent>.*?)\nSingle-turn version: .*?\n"
                r"Image report: (?P<report>.*?)\n"
                r"Strategy: (?P<strategy>\S+) - .*?\nNumber of turns: (?P<t>\d+)",
                user,
                name,
            )
            return {
                "intent": m["intent"],
                "report": m["report"],
                "strategy": m["strategy"],
                "total_turns": int(m["t"]),
            }
        case "red_user":
            m = _match(
                r"Conversation so far:\n(?P<history>.*)\n\nPlanned turn (?P<turn>\d+) of "
                r"(?P<total>\d+): (?P<template>.*)\Z",
                user,
                name,
            )
            history = "" if m["history"].strip() == "(none yet)" else m["history"]
            return {
                "template_turn": m["template"],
                "turn": int(m["turn"]),
                "total_turns": int(m["total"]),
                "history": history,
            }
        case "blue_expert":
            return {"turn": sum(1 for x in messages if x.role == "assistant"), "meta": {}}
        case "attack_judge":
            head, sep, _ = user.rpartition("\n\nOutput format:")
            if not sep or "Answer to grade:\n" not in head:
                raise Unreadable(f"{name}: no 'Answer to grade:' block")
            return {"answer": head.partition("Answer to grade:\n")[2]}
        case "judge" | "evaluator":
            nonce = _match(r"<<<USER MESSAGE (\S+)>>>", user, name)[1]
            earlier = _between(
                user, f"<<<EARLIER TURNS {nonce}>>>", f"<<<END EARLIER TURNS {nonce}>>>", name
            )
            history = (
                [] if "(none: this is the first turn)" in earlier else _transcript_turns(earlier)
            )
            user_turn = _between(
                user, f"<<<USER MESSAGE {nonce}>>>\n", f"\n<<<END USER MESSAGE {nonce}>>>", name
            )
            answer = _between(user, f"<<<ANSWER {nonce}>>>\n", f"\n<<<END ANSWER {nonce}>>>", name)
            users = [h["text"] for h in history if h["role"] == "user"] + [user_turn]
            cues = sorted({c for u in users for c in harm_cues(u)})
            return {
                "history": history,
                "user_turn": user_turn,
                "answer": answer,
                "has_answer_block": "the reply had no <answer> block" not in user,
                "risk": {
                    "category": "",
                    "level": None,
                    "scale": [1, 5],
                    "risky": None,
                    "cues": cues,
                },
            }
        case "tutor":
            goal = re.search(
                r"\AGoal the conversation is working toward \(hidden from the student\): "
                r"(.*?)\n",
                user,
            )
            caps = re.search(r"(?m)^Image description\(s\): (.*?)\n", user)
            n = _match(r"<<<USER MESSAGE (\S+)>>>", user, name)[1]
            history = _between(user, f"<<<HISTORY {n}>>>\n", f"\n<<<END HISTORY {n}>>>", name)
            turns = (
                []
                if history.startswith("(none: this is the first turn)")
                else _transcript_turns(history)
            )
            user_turn = _between(
                user, f"<<<USER MESSAGE {n}>>>\n", f"\n<<<END USER MESSAGE {n}>>>", name
            )
            answer = _between(
                user, f"<<<STUDENT ANSWER {n}>>>\n", f"\n<<<END STUDENT ANSWER {n}>>>", name
            )
            m = _match(
                r"The user's latest message \(turn (?P<turn>\d+)\):\n.*"
                r"\n\nPlanned next user turn: (?P<next>.*?)\n\nGrade the answer",
                user,
                name,
            )
            planned = "" if m["next"].startswith("(none: this is the last turn") else m["next"]
            return {
                "goal": goal[1] if goal else "",
                "captions": caps[1] if caps else "",
                "history": history,
                "turn": int(m["turn"]),
                "user_turn": user_turn,
                "user_turns": [t["text"] for t in turns if t["role"] == "user"] + [user_turn],
                "answer": answer,
                "static_next": planned,
            }
        case _:
            raise Unreadable(f"no reader for prompt {name!r}")


def _unit(*parts: object) -> float:
    """A number in [0, 1) from a hash of the parts."""
    h = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def flawed(text: str, name: str, flaw: str, u: float) -> tuple[str, str]:
    """(reply text, finish) of a ``flaw`` applied to the well-formed ``text`` of prompt ``name``."""
    match flaw:
        case "refused":
            return REFUSAL, "stop"
        case "truncated":
            return text[: max(1, int(len(text) * (0.2 + 0.6 * u)))], "length"
    if name == "blue_expert":  # the answer without its <thinking>/<answer> tags
        return re.sub(r"</?(?:thinking|answer)>", " ", text).strip(), "stop"
    if name not in _JSON_PROMPTS:  # a label and quotes around the user's turn
        return f'User: "{text}"', "stop"
    match int(u * 4):
        case 0:
            return f"Here is my assessment.\n```json\n{text}\n```", "stop"
        case 1:
            obj = json.loads(text)
            obj.pop(next(iter(obj)), None)
            return json.dumps(obj), "stop"
        case 2:
            return text.rstrip().removesuffix("}"), "stop"
        case _:
            return text.replace('"', "'"), "stop"


class RehearsalBackend:
    """Answers the project's prompts from the messages alone (see the module docstring).

    Args:
        model: the model name served.
        seed: seeds which replies are flawed and how.
        flaws: flaw name (see `FLAWS`) -> rate; the rates sum to at most 1.
    """

    batched = False
    max_concurrency = 64

    def __init__(
        self, model: str = "rehearsal", *, seed: int = 0, flaws: Mapping[str, float] | None = None
    ) -> None:
        unknown = set(flaws or {}) - set(FLAWS)
        if unknown:
            raise ValueError(f"unknown flaw(s) {sorted(unknown)}; flaws are {', '.join(FLAWS)}")
        if sum((flaws or {}).values()) > 1.0 + 1e-9:
            raise ValueError("flaw rates sum to more than 1")
        self.model = model
        self.seed = seed
        self.flaws = {k: float(v) for k, v in (flaws or {}).items() if v}
        self.counts: Counter[str] = (
            Counter()
        )  # prompt name (or unrecognised, unreadable) per request
        self.flawed: Counter[str] = Counter()  # "<prompt>:<flaw>" per flawed reply
        self.reasked = 0  # requests that asked again after an unreadable verdict (reask@1)
        self._seen: Counter[str] = Counter()

    async def generate(self, requests: list[Request]) -> list[Reply]:
        return [self.answer(r) for r in requests]

    async def aclose(self) -> None:
        return None

    def answer(self, request: Request) -> Reply:
        from steerkit.backends.rules import rules_reply

        body = json.dumps([[m.role, m.content, m.images] for m in request.messages])
        digest = hashlib.sha256(body.encode()).hexdigest()
        arrival = self._seen[
            digest
        ]  # a retried request gets another draw, as a sampled model would
        self._seen[digest] += 1
        messages = without_reasks(request.messages)
        if len(messages) < len(request.messages):
            self.reasked += 1
        name = recognise(messages)
        if name is None:
            self.counts["unrecognised"] += 1
            return Reply(
                text="<thinking>A plain request.</thinking><answer>Here is my answer.</answer>",
                model=self.model,
            )
        try:
            fields = read_fields(name, messages)
            rebuilt = Request(
                list(messages),
                sampling=request.sampling,
                sample_index=arrival,
                task=name,
                fields=fields,
            )
            text = rules_reply(rebuilt)
        except (Unreadable, KeyError, ValueError, TypeError):
            # counted, so a rehearsal can require none; the reply is what a model declining sends
            log.warning("rehearsal: cannot read back a %s request", name, exc_info=True)
            self.counts["unreadable"] += 1
            return Reply(text=REFUSAL, model=self.model)
        self.counts[name] += 1
        u = _unit(self.seed, digest, arrival)
        edge = 0.0
        for flaw, rate in self.flaws.items():
            edge += rate
            if u < edge:
                self.flawed[f"{name}:{flaw}"] += 1
                text, finish = flawed(text, name, flaw, _unit(self.seed, digest, arrival, flaw))
                return Reply(text=text, finish=finish, model=self.model)
        return Reply(text=text, model=self.model)
