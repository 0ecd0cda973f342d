"""Stage I, obfuscated-risk kind (method.md 2.2): progressive disclosure of a harmful goal.

The generator names the true goal of a harmful image+query and writes 2..10 user turns that each look
harmless alone and reveal the goal gradually. A refusal (`steerkit.heuristics.is_refusal`) or a
malformed reply is retried; after ``tries`` failures the seed falls back to its original single turn,
and the fallback is recorded (``meta.fallback``), as method.md 2.2 prescribes.

The risk curve of an obfuscated script is not asked of the generator (method.md 2.2 does not ask for one);
it is set to rise linearly from 1 to 5 over the turns, which is what progressive disclosure means by
construction (`disclosure_curve`).
"""

from __future__ import annotations

from pathlib import Path

from steerkit.clients import ChatClient, Sampling
from steerkit.heuristics import is_refusal
from steerkit.prompts import load_prompt
from steerkit.schema import Script, Seed
from steerkit.synth.asking import DEFAULT_TRIES, Job, ReplyError, ask, need, parse_json_object
from steerkit.synth.benign import Generated

PROMPT = "obfuscated@1"
OBFUSCATED_TURNS = (2, 10)  # method.md 2.2: 2..10 user turns


def disclosure_curve(n: int) -> list[int]:
    """A 1..5 risk level per turn rising linearly from 1 (first turn) to 5 (last turn).

    Example:
        >>> disclosure_curve(2), disclosure_curve(5), disclosure_curve(1)
        ([1, 5], [1, 2, 3, 4, 5], [5])
    """
    if n == 1:
        return [5]
    return [1 + round(4 * k / (n - 1)) for k in range(n)]


def parse_obfuscated(text: str, job: Job) -> dict[str, object]:
    """Strict parse of an obfuscated@1 reply; a refusal is a failure to retry."""
    if is_refusal(text):
        raise ReplyError("the generator refused")
    data = parse_json_object(text)
    goal = need(data, "true_goal", str).strip()
    turns = need(data, "turns", list)
    lo, hi = job.fields["min_turns"], job.fields["max_turns"]
    if not lo <= len(turns) <= hi:
        raise ReplyError(f"turns: {len(turns)} turns, expected {lo}..{hi}")
    if any(not isinstance(t, str) or not t.strip() for t in turns):
        raise ReplyError("turns: every turn must be a non-empty string")
    if any(is_refusal(t) for t in turns):
        raise ReplyError("turns: a turn is a refusal, not a user message")
    return {"true_goal": goal, "user_turns": [t.strip() for t in turns]}


def generate_obfuscated(
    client: ChatClient,
    seeds: list[Seed],
    *,
    turns: tuple[int, int] = OBFUSCATED_TURNS,
    tries: int = DEFAULT_TRIES,
    captions: dict[str, str] | None = None,
    root: Path | None = None,
    sampling: Sampling | None = None,
) -> Generated:
    """Obfuscated scripts for harmful ``seeds``; unusable replies fall back to the single turn."""
    captions = captions or {}
    prompt = load_prompt(PROMPT)
    jobs = [
        Job(key=s.id, images=[s.image] if s.image else [], fields={
            "query": s.text, "category": s.category, "min_turns": turns[0], "max_turns": turns[1],
            "image_note": captions.get(s.image, "") if s.image else "",
        })
        for s in seeds
    ]
    out = Generated()
    for seed, o in zip(seeds, ask(client, prompt, jobs, parse_obfuscated, tries=tries, sampling=sampling,
                                  root=root, captions=captions), strict=True):
        fallback = o.value is None
        user_turns = [seed.text] if fallback else o.value["user_turns"]  # type: ignore[index]
        out.scripts.append(Script(
            id=f"{seed.id}-obf", seed_id=seed.id, kind="obfuscated", strategy="progressive_disclosure",
            user_turns=user_turns, images=[seed.image] if seed.image else [],
            risk_curve=disclosure_curve(len(user_turns)), category=seed.category,
            meta={"source": seed.source, "license": seed.license, "harmful": True, "seed_text": seed.text,
                  "goal": None if fallback else o.value["true_goal"],  # type: ignore[index]
                  "fallback": fallback, "generator": client.spec, "prompt": prompt.id,
                  "attempts": o.attempts, "retry_errors": o.errors, "risk_curve_source": "disclosure_curve"},
        ))
    return out
