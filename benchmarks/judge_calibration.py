"""Judge calibration: how often does a judge's refusal call agree with human labels?

Runs judges on PyRIT's human-labelled refusal set (105 objective/response pairs, human_score 1 =
refusal; `steerkit.calibration`) and prints, per judge: how many rows it made a refusal call on
(coverage), accuracy and Cohen's kappa on those rows, the confusion counts, and why it made no call
on the rest (an unscored verdict is counted, never read as a score). Then the agreement of the rules
tutor's safety score with the rules judge's harmlessness on the same 105 turns (Spearman).

Judges: the offline ``rules`` judge; three scripted doubles that show the figures move as they must
(always says "refused", never says "refused", and the student-style ``scripted:refuser`` double,
whose replies hold no verdict at all, so every row is unscored); plus any role spec given with
``--judge`` (``smollm2``, ``openai:<model>@<url>``, ``hf:<path>``).

    python benchmarks/judge_calibration.py
    python benchmarks/judge_calibration.py --judge smollm2 --limit 40 --max-tokens 96
    python benchmarks/judge_calibration.py --json calibration.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace

from steerkit.backends.rules import RulesBackend
from steerkit.backends.scripted import ScriptedBackend
from steerkit.calibration import (
    load_refusal_labels,
    pyrit_refusal_csv,
    refusal_agreement,
    refusal_dialogue,
    turn_agreement,
)
from steerkit.clients import ChatClient, run_sync
from steerkit.judge import JUDGE_SAMPLING
from steerkit.roles import make_backend
from steerkit.tutor import tutor_request, tutor_turns

ALWAYS_REFUSED = '{"helpfulness": 2, "harmlessness": 3, "refused": true}'
NEVER_REFUSED = '{"helpfulness": 3, "harmlessness": 3, "refused": false}'


def judges(extra: list[str]) -> list[ChatClient]:
    out = [
        ChatClient(RulesBackend(), spec="rules"),
        ChatClient(ScriptedBackend(lambda r: ALWAYS_REFUSED, name="always-refused"), spec="scripted:always-refused"),
        ChatClient(ScriptedBackend(lambda r: NEVER_REFUSED, name="never-refused"), spec="scripted:never-refused"),
        ChatClient(make_backend("scripted:refuser"), spec="scripted:refuser"),
    ]
    return out + [ChatClient(make_backend(spec), spec=spec) for spec in extra]


def fmt(x: float) -> str:
    return "  nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:5.3f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--judge", action="append", default=[], help="another judge role spec (repeatable)")
    ap.add_argument("--limit", type=int, default=None, help="first N rows only (for slow judges)")
    ap.add_argument("--max-tokens", type=int, default=None, help="judge reply budget (default: the judge's own)")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)

    examples = load_refusal_labels()[: args.limit]
    sampling = replace(JUDGE_SAMPLING, max_tokens=args.max_tokens) if args.max_tokens else None
    n_ref = sum(e.refused for e in examples)
    print(f"labels: {pyrit_refusal_csv()}\n{len(examples)} rows, {n_ref} refusals, {len(examples) - n_ref} not\n")
    print(f"{'judge':28s} {'called':>7s} {'acc':>6s} {'kappa':>6s} {'tp':>4s} {'fp':>4s} {'fn':>4s} {'tn':>4s}"
          f" {'secs':>6s}  no call")
    rows, rules_verdicts = [], None
    for client in judges(args.judge):
        t0 = time.perf_counter()
        agr, verdicts = refusal_agreement(client, examples, sampling=sampling)
        secs = time.perf_counter() - t0
        if client.spec == "rules":
            rules_verdicts = verdicts
        c = agr.confusion
        print(f"{client.spec:28s} {agr.n_called:>3d}/{agr.n:<3d} {fmt(agr.accuracy)} {fmt(agr.kappa)} {c['tp']:4d}"
              f" {c['fp']:4d} {c['fn']:4d} {c['tn']:4d} {secs:6.1f}  {agr.no_call or ''}")
        rows.append({**agr.row(), "seconds": round(secs, 2)})

    # Tutor against judge on the same turns: rank agreement of tutor safety (1..10) and judge
    # harmlessness (-3..3); the scales differ, so kappa does not apply.
    dialogues = [refusal_dialogue(e, i) for i, e in enumerate(examples)]
    tutor = ChatClient(RulesBackend(), spec="rules")
    reqs = [tutor_request(d.messages[:1], d.messages[1].content, None) for d in dialogues]
    tutor_v = run_sync(tutor_turns(tutor, reqs))
    a = {(d.id, 1): v for d, v in zip(dialogues, rules_verdicts or [], strict=True)}
    b = {(d.id, 1): v for d, v in zip(dialogues, tutor_v, strict=True)}
    ta = turn_agreement(a, b, score_a="harmlessness", score_b="safety")
    print(f"\nrules judge harmlessness vs rules tutor safety on {ta.n_shared} shared turns: "
          f"{ta.n_scored} scored by both, Spearman {fmt(ta.spearman)}, unscored {ta.unscored or 'none'}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"refusal": rows, "tutor_vs_judge": vars(ta)}, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
