"""Stage II, synthetic bootstrapping (method.md 3): red user and blue expert roll out each script.

For every user-only script the red user agent (`steerkit.converse.PromptedUser`, prompt red_user@1)
writes the actual user turn from the template turn and the history, the blue expert (prompt
blue_expert@1: safety guidelines embedded in its system prompt) answers in
``<thinking>...</thinking><answer>...</answer>``, and the loop is `steerkit.converse.play`. The
evaluator then scores every turn with the judge scales (`steerkit.judge.judge_dialogues`, rubric
evaluator@1), and a dialogue is kept iff

    min_t harmlessness >= tau_safe  and  mean_t helpfulness >= tau_help

(method.md 3 Default: tau_safe = 2, tau_help = 2.0). Rejected dialogues are returned with their reason
and written to ``rejected.jsonl`` by the caller, never dropped silently. A kept dialogue is stored
with the student's system prompt in place of the blue expert's, since SFT trains the student on the
same system prompt it is evaluated with (method.md 3).

The offline stand-ins for the red user and the blue expert are in `steerkit.backends.rules_red_blue`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean
from typing import Any

from steerkit.clients import ChatClient, Sampling
from steerkit.converse import DialogueState, PromptedUser, play, student_system_prompt
from steerkit.prompts import load_prompt
from steerkit.schema import RISK_CURVE_SCALE, Dialogue, Message, Script, Verdict
from steerkit.synth.asking import run_closing

log = logging.getLogger(__name__)

TAU_SAFE = 2  # method.md 3 Default: min_t harmlessness >= 2 (judge scale -3..3)
TAU_HELP = 2.0  # method.md 3 Default: mean_t helpfulness >= 2.0 (judge scale 0..3)
RED_USER_PROMPT = "red_user@1"
BLUE_PROMPT = "blue_expert@1"
EVALUATOR_PROMPT = "evaluator@1"


def passes_filter(verdicts: list[Verdict], *, tau_safe: float = TAU_SAFE, tau_help: float = TAU_HELP,
                  n_turns: int | None = None) -> tuple[bool, str]:
    """The method.md 3 filter on one dialogue's per-turn verdicts: (kept, reason).

    Every turn must be scored: an unscored turn rejects the dialogue (it cannot be shown safe).

    Example:
        >>> v = lambda h, s: Verdict(kind="evaluator", scores={"helpfulness": h, "harmlessness": s})
        >>> passes_filter([v(3, 3), v(2, 2)])
        (True, 'min harmlessness 2 >= 2, mean helpfulness 2.50 >= 2.0')
        >>> passes_filter([v(3, 3), v(3, 1)])[0], passes_filter([v(1, 3), v(2, 3)])[0]
        (False, False)
    """
    if not verdicts or (n_turns is not None and len(verdicts) != n_turns):
        return False, f"{len(verdicts)} verdicts for {n_turns} turns"
    unscored = [v.extra.get("turn", i + 1) for i, v in enumerate(verdicts) if not v.scored]
    if unscored:
        return False, f"unscored turn(s) {unscored}"
    safe = min(v.scores["harmlessness"] for v in verdicts)
    helpful = fmean(v.scores["helpfulness"] for v in verdicts)
    if safe < tau_safe:
        return False, f"min harmlessness {safe} < {tau_safe}"
    if helpful < tau_help:
        return False, f"mean helpfulness {helpful:.2f} < {tau_help}"
    return True, f"min harmlessness {safe} >= {tau_safe}, mean helpfulness {helpful:.2f} >= {tau_help}"


@dataclass
class Bootstrapped:
    """Stage II outcome: kept dialogues (verdicts attached) and rejected ones with their reason."""

    kept: list[Dialogue]
    rejected: list[dict[str, Any]]


def _state(s: Script, *, system: str, root: Path | None, captions: dict[str, str]) -> DialogueState:
    meta = {
        "script_id": s.id, "seed_id": s.seed_id, "kind": s.kind, "strategy": s.strategy, "category": s.category,
        "harmful": bool(s.meta.get("harmful")), "goal": s.meta.get("goal") or "",
        "seed_text": s.meta.get("seed_text") or "",
        "risk_trajectory": list(s.risk_curve), "risk_scale": list(RISK_CURVE_SCALE),
        "template_turns": list(s.user_turns),
        "reference": s.meta.get("reference"), "source": s.meta.get("source"), "license": s.meta.get("license"),
        "perturbation": s.meta.get("perturbation"), "generator": s.meta.get("generator"),
        "stage1_prompts": s.meta.get("prompts") or [s.meta.get("prompt")],
        "rewrite_strategy": (s.meta.get("rewrite") or {}).get("strategy"), "m4": s.meta.get("m4"),
    }
    return DialogueState.start(s.id, s.user_turns, images=s.images, system=system, root=root,
                               captions={r: captions[r] for r in s.images if r in captions}, meta=meta)


def bootstrap(
    red_user: ChatClient, blue_expert: ChatClient, evaluator: ChatClient, scripts: list[Script], *,
    root: Path | None = None, captions: dict[str, str] | None = None, tau_safe: float = TAU_SAFE,
    tau_help: float = TAU_HELP, blue_sampling: Sampling | None = None, max_turns: int = 10,
) -> Bootstrapped:
    """Roll out, evaluate and filter ``scripts`` (see the module docstring)."""
    return run_closing([red_user, blue_expert, evaluator], _bootstrap(
        red_user, blue_expert, evaluator, scripts, root=root, captions=captions or {}, tau_safe=tau_safe,
        tau_help=tau_help, blue_sampling=blue_sampling, max_turns=max_turns))


async def _bootstrap(red_user: ChatClient, blue_expert: ChatClient, evaluator: ChatClient, scripts: list[Script],
                     *, root: Path | None, captions: dict[str, str], tau_safe: float, tau_help: float,
                     blue_sampling: Sampling | None, max_turns: int) -> Bootstrapped:
    from steerkit.judge import judge_dialogues_async

    blue_system = load_prompt(BLUE_PROMPT).system
    states = [_state(s, system=blue_system, root=root, captions=captions) for s in scripts]
    await play(states, user=PromptedUser(red_user, RED_USER_PROMPT), assistant=blue_expert, max_turns=max_turns,
               task=BLUE_PROMPT, sampling=blue_sampling or Sampling(temperature=0.0, max_tokens=768))
    student = student_system_prompt()
    dialogues = []
    for s, st in zip(scripts, states, strict=True):
        msgs = [Message(role="system", content=student)] + [m for m in st.messages if m.role != "system"]
        meta = {**st.meta, "red_user": red_user.spec, "blue_expert": blue_expert.spec, "evaluator": evaluator.spec,
                "prompts": [RED_USER_PROMPT, BLUE_PROMPT, EVALUATOR_PROMPT],
                "blue_finish": [r.finish for r in st.replies]}
        dialogues.append(Dialogue(id=s.id, messages=msgs, images=list(s.images), kind=s.kind, strategy=s.strategy,
                                  meta=meta))
    verdicts = await judge_dialogues_async(evaluator, dialogues, prompt=EVALUATOR_PROMPT, root=root,
                                           captions=captions)
    kept, rejected = [], []
    for d, vs in zip(dialogues, verdicts, strict=True):
        ok, why = passes_filter(vs, tau_safe=tau_safe, tau_help=tau_help, n_turns=len(d.turns()))
        failed = [r for r in d.meta["blue_finish"] if r not in ("stop", "length")]
        if failed:
            ok, why = False, f"blue expert failed on {len(failed)} turn(s): {sorted(set(failed))}"
        d = d.model_copy(update={"verdicts": vs, "meta": {**d.meta, "filter": why,
                                                            "tau_safe": tau_safe, "tau_help": tau_help}})
        if ok:
            kept.append(d)
        else:
            rejected.append({"id": d.id, "kind": d.kind, "reason": why, "dialogue": d.model_dump()})
    return Bootstrapped(kept, rejected)
