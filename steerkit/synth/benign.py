"""Stage I, benign kind (method.md 2.1): a benign task split into 2..6 first-person user turns.

The generator keeps the task unchanged, later turns lean on earlier ones, the last asks for the final
answer; it may also write the answers. When the seed has a reference answer, the generator's final
answer must agree with it (`answers_agree`), else the reply is retried like any malformed one. A
script as stored::

    {"id": "benign-arithmetic-0000-benign", "seed_id": "benign-arithmetic-0000", "kind": "benign",
     "strategy": "task_split", "user_turns": ["I have a small maths question.", "...",
     "So what is the total? Just the number, please."], "risk_curve": [1, 1, 1], ...}
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steerkit.clients import ChatClient, Sampling
from steerkit.prompts import load_prompt
from steerkit.schema import Script, Seed
from steerkit.synth.asking import DEFAULT_TRIES, Job, ReplyError, ask, need, parse_json_object

PROMPT = "benign@1"
BENIGN_TURNS = (2, 6)  # method.md 2.1: 2..6 user turns


@dataclass
class Generated:
    """Scripts a Stage I module produced, and the seeds it skipped, each with its reason."""

    scripts: list[Script] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)


_NUM = re.compile(r"-?\d+(?:\.\d+)?")
_WORD = re.compile(r"[a-z0-9]+")
_STOP = {"a", "an", "the", "of", "in", "on", "with", "and", "to", "is", "it", "this", "that", "for", "at", "from"}


def answers_agree(answer: str, reference: str) -> bool:
    """Whether a final answer agrees with a reference answer.

    Numbers must match numerically (the last number in the answer against the reference's); short
    references (up to 4 words) must appear in the answer; longer ones must share at least half of
    their content words with it.

    Example:
        >>> answers_agree("The total is 41 pencils.", "41"), answers_agree("It is 40.", "41")
        (True, False)
        >>> answers_agree("['b', 'c', 'a']", "['b', 'c', 'a']")
        True
        >>> answers_agree("A cat lying on a sofa.", "a close-up photograph of a tabby cat named Chelsea")
        False
    """
    ref_nums = _NUM.findall(reference)
    if ref_nums and len(_WORD.findall(reference.lower())) == len(ref_nums):
        got = _NUM.findall(answer)
        return bool(got) and float(got[-1]) == float(ref_nums[-1])
    ref_words = [w for w in _WORD.findall(reference.lower()) if w not in _STOP]
    ans_words = set(_WORD.findall(answer.lower()))
    if len(_WORD.findall(reference.lower())) <= 4:
        return " ".join(_WORD.findall(reference.lower())) in " ".join(_WORD.findall(answer.lower()))
    return bool(ref_words) and sum(w in ans_words for w in ref_words) / len(ref_words) >= 0.5


def parse_benign(text: str, job: Job) -> dict[str, Any]:
    """Strict parse of a benign@1 reply: turns within the range, final answer agrees with reference."""
    data = parse_json_object(text)
    turns = need(data, "turns", list)
    lo, hi = job.fields["min_turns"], job.fields["max_turns"]
    if not lo <= len(turns) <= hi:
        raise ReplyError(f"turns: {len(turns)} turns, expected {lo}..{hi}")
    users, answers = [], []
    for k, t in enumerate(turns):
        if not isinstance(t, dict) or not isinstance(t.get("user"), str) or not t["user"].strip():
            raise ReplyError(f"turns[{k}].user: missing or empty")
        users.append(t["user"].strip())
        a = t.get("answer")
        answers.append(a.strip() if isinstance(a, str) and a.strip() else None)
    final = data.get("final_answer")
    final = final.strip() if isinstance(final, str) and final.strip() else None
    ref = job.fields["reference"]
    if ref:
        if final is None:
            raise ReplyError("final_answer: missing, but the task has a reference answer")
        if not answers_agree(final, ref):
            raise ReplyError(f"final_answer: {final[:60]!r} does not agree with the reference {ref[:60]!r}")
    return {"user_turns": users, "answers": answers, "final_answer": final}


def generate_benign(
    client: ChatClient,
    seeds: list[Seed],
    *,
    turns: tuple[int, int] = BENIGN_TURNS,
    with_answers: bool = True,
    tries: int = DEFAULT_TRIES,
    captions: dict[str, str] | None = None,
    root: Path | None = None,
    sampling: Sampling | None = None,
) -> Generated:
    """Benign scripts for ``seeds``; a seed whose replies never parse is skipped with the reasons."""
    captions = captions or {}
    prompt = load_prompt(PROMPT)
    jobs = [
        Job(key=s.id, images=[s.image] if s.image else [], fields={
            "task": s.text, "reference": s.reference or "", "min_turns": turns[0], "max_turns": turns[1],
            "with_answers": with_answers, "image_note": captions.get(s.image, "") if s.image else "",
            "category": s.category,
        })
        for s in seeds
    ]
    out = Generated()
    for seed, o in zip(seeds, ask(client, prompt, jobs, parse_benign, tries=tries, sampling=sampling,
                                  root=root, captions=captions), strict=True):
        if o.value is None:
            out.skipped.append({"id": seed.id, "kind": "benign", "reason": "no usable reply", "errors": o.errors})
            continue
        v = o.value
        out.scripts.append(Script(
            id=f"{seed.id}-benign", seed_id=seed.id, kind="benign", strategy="task_split",
            user_turns=v["user_turns"], images=[seed.image] if seed.image else [],
            risk_curve=[1] * len(v["user_turns"]), category=seed.category,
            meta={"source": seed.source, "license": seed.license, "harmful": False, "seed_text": seed.text,
                  "reference": seed.reference, "answers": v["answers"], "final_answer": v["final_answer"],
                  "generator": client.spec, "prompt": prompt.id, "attempts": o.attempts,
                  "retry_errors": o.errors},
        ))
    return out
