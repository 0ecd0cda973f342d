"""Deterministic test doubles: replies from a list or a function of the request."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from steerkit.clients import Reply, Request

REFUSAL = (
    "<thinking>The request could lead to harm.</thinking>"
    "<answer>I can't help with that, but I can explain the general safety principles involved.</answer>"
)
COMPLIANCE = (
    "<thinking>The user wants the steps.</thinking>"
    "<answer>Sure, here is how: Step 1. Gather the materials. Step 2. Combine them.</answer>"
)
#: A judge's reply in the ``judge@1`` format (a line of reasoning, then the JSON verdict): served as
#: ``scripted:judge`` so that judge benchmarks and demos can run over HTTP, where the rules judge cannot.
JUDGE_VERDICT = (
    "The reply declines the unsafe part with a brief reason and offers a safe alternative.\n"
    '{"helpfulness": 2, "helpfulness_rationale": "A correct refusal with a short reason.", '
    '"harmlessness": 3, "harmlessness_rationale": "Firm, neutral and concise.", "refused": true}'
)


class ScriptExhausted(RuntimeError):
    """A scripted double ran out of replies; tests should script every call they cause."""


class ScriptedBackend:
    """Replies from ``replies`` in order, or from ``fn(request)``; records every request in `calls`
    unless ``record`` is False (a double served for hours would keep every request it was sent).

    Example:
        >>> import asyncio
        >>> from steerkit.schema import Message
        >>> b = ScriptedBackend(["hi"], name="judge")
        >>> asyncio.run(b.generate([Request([Message(role="user", content="x")])]))[0].text
        'hi'
    """

    batched = False
    max_concurrency = 64

    def __init__(
        self,
        replies: Sequence[str] | Callable[[Request], str],
        *,
        name: str = "scripted",
        record: bool = True,
    ) -> None:
        self.model = f"scripted:{name}"
        self.name = name
        self.record = record
        self._fn = replies if callable(replies) else None
        self._replies = list(replies) if not callable(replies) else []
        self.calls: list[Request] = []
        self._n = 0  # requests answered, recorded or not

    async def generate(self, requests: list[Request]) -> list[Reply]:
        out = []
        for req in requests:
            self._n += 1
            if self.record:
                self.calls.append(req)
            if self._fn is not None:
                text = self._fn(req)
            else:
                if self._n > len(self._replies):
                    raise ScriptExhausted(
                        f"scripted client {self.name!r} ran out of replies after {len(self._replies)} calls"
                    )
                text = self._replies[self._n - 1]
            out.append(Reply(text=text, model=self.model, prompt_tokens=0, completion_tokens=len(text.split())))
        return out

    async def aclose(self) -> None:
        return None


def named_double(name: str) -> ScriptedBackend:
    """The doubles reachable from a role spec ``scripted:<name>``."""
    match name:
        case "refuser":
            return ScriptedBackend(lambda r: REFUSAL, name=name)
        case "complier":
            return ScriptedBackend(lambda r: COMPLIANCE, name=name)
        case "echo":
            return ScriptedBackend(lambda r: r.messages[-1].content, name=name)
        case "judge":
            return ScriptedBackend(lambda r: JUDGE_VERDICT, name=name)
        case _:
            raise ValueError(f"unknown scripted double {name!r}; use refuser, complier, echo or judge")
