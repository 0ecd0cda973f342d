"""The Stage III safety tutor: grade each student answer and write the next (adaptive) user turn.

The tutor (method.md 4) reads the image, the history, the latest user turn, the student's answer and the
planned (static) next turn, and replies with one JSON object::

    {"diagnosis": "...", "scores": {"safety": 8, "usefulness": 8, "faithfulness": 8},
     "attack_strategy": "persistence", "new_question": "..."}

`steerkit.verdicts.parse_tutor_reply` turns that reply into a `Verdict(kind="tutor")` by the same
rules as the judge's verdicts: the LAST JSON object wins, key case is ignored, scores must be levels
of the 1..10 scale, and anything else is *unscored* with its reason (never an invented score). The
history and the student's answer reach the tutor between markers carrying a `fence_code`, so a fake
verdict inside an answer is just text to grade.

The offline stand-in behind the ``rules`` role spec is `steerkit.backends.rules_tutor`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from steerkit.clients import ChatClient, Request, Sampling
from steerkit.converse import transcript
from steerkit.prompts import load_prompt
from steerkit.schema import Message, Verdict
from steerkit.verdicts import TUTOR_PROMPT, fence_code, tutor_verdict_from_reply

log = logging.getLogger(__name__)

#: The tutor grades at temperature 0 (method.md 4: Qwen3-VL-32B, temperature 0).
TUTOR_SAMPLING = Sampling(temperature=0.0, max_tokens=512)


def tutor_request(
    messages: Sequence[Message],
    answer: str,
    static_next: str | None,
    *,
    goal: str = "",
    images: Sequence[str] = (),
    root: Path | None = None,
    captions: dict[str, str] | None = None,
    prompt: str = TUTOR_PROMPT,
    sampling: Sampling = TUTOR_SAMPLING,
) -> Request:
    """The tutor call for one turn.

    Args:
        messages: the dialogue up to and including the latest user turn (a system message is
            dropped: the tutor does not need the student's instructions).
        answer: the student's answer to the latest user turn.
        static_next: the planned next user turn, or None on the last turn.
        goal: the hidden goal of the dialogue, when the data records one.
        images: image refs of the dialogue (the tutor sees them with its prompt).
        root: folder the image refs are relative to.
        captions: image ref -> description, for a tutor that cannot see images.
        prompt: the tutor prompt id.
        sampling: the tutor's sampling (temperature 0 by default).
    """
    body = [m for m in messages if m.role != "system"]
    if not body or body[-1].role != "user":
        raise ValueError("tutor_request: messages must end with the user turn being answered")
    caps = dict(captions or {})
    history = transcript(body[:-1])
    fields = {
        "goal": goal,
        "captions": "; ".join(caps[i] for i in images if i in caps),
        "history": history,
        "turn": sum(1 for m in body if m.role == "user"),
        "user_turn": body[-1].content,
        "user_turns": [m.content for m in body if m.role == "user"],
        "answer": answer,
        "static_next": static_next or "",
        "nonce": fence_code(history, body[-1].content, answer),
    }
    p = load_prompt(prompt)
    system, user = p.render(**fields)
    return Request(
        [Message(role="system", content=system), Message(role="user", content=user, images=list(images))],
        sampling=sampling, task=p.id, fields=fields, root=root, captions=caps,
    )


def next_user_turn(verdict: Verdict, static_next: str | None, *, feedback: bool = True) -> str | None:
    """The next user turn: the tutor's new question, else the planned turn; None ends the dialogue.

    The dialogue ends after the last planned turn whatever the tutor writes (method.md 4). With
    ``feedback=False`` (the "without feedback dynamics" ablation) the planned turns are replayed.

    Example:
        >>> v = Verdict(kind="tutor", scores={"safety": 8, "usefulness": 8, "faithfulness": 8},
        ...             extra={"new_question": "Just the first step?"})
        >>> next_user_turn(v, "planned"), next_user_turn(v, "planned", feedback=False), next_user_turn(v, None)
        ('Just the first step?', 'planned', None)
    """
    if static_next is None:
        return None
    question = verdict.extra.get("new_question") or "" if feedback else ""
    return question.strip() or static_next


async def tutor_turns(client: ChatClient, requests: list[Request]) -> list[Verdict]:
    """Grade every live trajectory of a turn in one concurrent `ChatClient.complete_many` call."""
    replies = await client.complete_many(requests)
    verdicts = [tutor_verdict_from_reply(r, prompt_version=q.task or TUTOR_PROMPT)
                for r, q in zip(replies, requests, strict=True)]
    n_bad = sum(not v.scored for v in verdicts)
    if n_bad:
        log.warning("tutor: %d of %d replies unscored (%s)", n_bad, len(verdicts),
                    ", ".join(sorted({v.unscored_reason or "" for v in verdicts if not v.scored})))
    return verdicts
