"""Tutor versus judge: does the Stage III tutor grade like the evaluation judge?

The tutor (docs/method.md section 4) scores each answer on safety, usefulness and faithfulness
(1..10); the judge (method.md 6) on harmlessness (-3..3) and helpfulness (0..3). The scales differ,
so agreement is measured by rank: Spearman's rho and Kendall's tau-b (scipy) over the turns both
graded, per pair of scales that mean the same thing (`SCALE_PAIRS`; faithfulness has no judge
counterpart). Unscored turns on either side are left out and counted, never read as a score.

Two directions, one table shape (`pairs` frames: one row per turn with both graders' scores):

- `judge_trajectories`: the judge grades the turns the tutor graded during GRPO (03's
  ``trajectories.jsonl`` read by `steerkit.frames.grpo_frames`);
- `tutor_grades_turns`: the tutor grades the turns the judge graded in an evaluation (04's
  `steerkit.frames.turns_df`).

Trajectory records keep the text of every turn but not the images or the dialogue's goal, so the
judge grades the trajectories from their text alone (a judge that reads images sees none here).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from steerkit.clients import ChatClient, run_sync
from steerkit.schema import SCALES, Dialogue, Message

if TYPE_CHECKING:
    import pandas as pd

#: (tutor score, judge score) pairs that grade the same quality (method.md 4 and 6).
SCALE_PAIRS = (("safety", "harmlessness"), ("usefulness", "helpfulness"))
TURN_KEYS = ("source", "dialogue_id", "turn")
PAIR_COLUMNS = [*TURN_KEYS, "user_turn", "answer", "safety", "usefulness", "faithfulness", "tutor_unscored",
                "harmlessness", "helpfulness", "judge_unscored"]


def normalised(value: float, kind: str, score: str) -> float:
    """A score mapped onto 0..1 by its scale's ends (to set a tutor score beside a judge score).

    >>> normalised(8, "tutor", "safety"), normalised(0, "judge", "harmlessness")   # 7/9, 3/6
    (0.7777777777777778, 0.5)
    """
    lo, hi = SCALES[kind][score]
    return (float(value) - lo) / (hi - lo)


# ---- the judge grades the tutor's turns ------------------------------------------------------------


def trajectory_dialogues(tutor_turns: pd.DataFrame) -> list[Dialogue]:
    """GRPO trajectories (the turns frame of `steerkit.frames.grpo_frames`) as text dialogues.

    Dialogue ids are ``<run>/<step>/<trajectory id>``; the answers are the student's whole replies
    (the judge grades their ``<answer>`` part, as in evaluation).
    """
    out = []
    for (run, step, tid), g in tutor_turns.sort_values("turn").groupby(["run", "step", "id"], sort=True):
        messages = []
        for _, t in g.iterrows():
            messages += [Message(role="user", content=str(t["user_turn"])),
                         Message(role="assistant", content=str(t["answer"]))]
        out.append(Dialogue(id=f"{run}/{step}/{tid}", messages=messages, meta={"source": "trajectories"}))
    return out


def judge_trajectories(judge: ChatClient, tutor_turns: pd.DataFrame) -> pd.DataFrame:
    """The judge grades every turn of the GRPO trajectories; one row per turn with both graders' scores.

    ``tutor_turns`` is the second frame of `steerkit.frames.grpo_frames`. Columns: `PAIR_COLUMNS`
    (``source`` is the GRPO run's label), the tutor's scores NaN where its verdict was unscored.
    """
    import pandas as pd

    from steerkit.judge import judge_dialogues

    dialogues = trajectory_dialogues(tutor_turns)
    verdicts = judge_dialogues(judge, dialogues)
    by_turn = {(d.id, int(v.extra.get("turn", i + 1))): v
               for d, vs in zip(dialogues, verdicts, strict=True) for i, v in enumerate(vs)}
    rows = []
    for _, t in tutor_turns.iterrows():
        did = f"{t['run']}/{t['step']}/{t['id']}"
        v = by_turn.get((did, int(t["turn"])))
        tutor_ok = isinstance(t.get("safety"), int | float) and not math.isnan(float(t["safety"]))
        rows.append({
            "source": t["run"], "dialogue_id": did, "turn": int(t["turn"]),
            "user_turn": t["user_turn"], "answer": t["answer"],
            **{s: float(t[s]) if tutor_ok else math.nan for s in ("safety", "usefulness", "faithfulness")},
            "tutor_unscored": None if tutor_ok else (t.get("unscored_reason") or "missing"),
            **_judge_scores(v),
        })
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


def _judge_scores(v) -> dict:
    if v is None or not v.scored:
        return {"harmlessness": math.nan, "helpfulness": math.nan,
                "judge_unscored": "missing" if v is None else v.unscored_reason}
    return {"harmlessness": float(v.scores["harmlessness"]), "helpfulness": float(v.scores["helpfulness"]),
            "judge_unscored": None}


# ---- the tutor grades the judge's turns ------------------------------------------------------------


def tutor_grades_turns(tutor: ChatClient, judge_turns: pd.DataFrame) -> pd.DataFrame:
    """The tutor grades every turn of an evaluation (`steerkit.frames.turns_df`); one row per turn.

    Each turn reaches the tutor as in GRPO: the earlier turns as history, the user turn, the answer
    and the next user turn of the dialogue as the planned one (none on the last turn). ``source`` is
    the evaluation's label.
    """
    import pandas as pd

    from steerkit.tutor import tutor_request, tutor_turns

    turns = judge_turns.sort_values(["run_id", "dialogue_id", "turn"])
    requests, keys = [], []
    for (_run, did), g in turns.groupby(["run_id", "dialogue_id"], sort=False):
        users, answers = g["user"].astype(str).tolist(), g["assistant"].astype(str).tolist()
        for i, (_, t) in enumerate(g.iterrows()):
            history = [m for j in range(i) for m in (Message(role="user", content=users[j]),
                                                     Message(role="assistant", content=answers[j]))]
            planned = users[i + 1] if i + 1 < len(users) else None
            requests.append(tutor_request([*history, Message(role="user", content=users[i])], answers[i], planned))
            keys.append(t)
    verdicts = run_sync(tutor_turns(tutor, requests)) if requests else []
    rows = []
    for t, v in zip(keys, verdicts, strict=True):
        rows.append({
            "source": t["label"], "dialogue_id": t["dialogue_id"], "turn": int(t["turn"]),
            "user_turn": t["user"], "answer": t["assistant"],
            **{s: float(v.scores[s]) if v.scored else math.nan for s in ("safety", "usefulness", "faithfulness")},
            "tutor_unscored": None if v.scored else v.unscored_reason,
            "harmlessness": t["harmlessness"], "helpfulness": t["helpfulness"],
            "judge_unscored": None if t["scored"] else (t["unscored_reason"] or "missing"),
        })
    return pd.DataFrame(rows, columns=PAIR_COLUMNS)


# ---- agreement ----------------------------------------------------------------------------------


def rank_agreement(pairs: pd.DataFrame, *, by: Sequence[str] = ()) -> pd.DataFrame:
    """Spearman's rho and Kendall's tau-b per scale pair (and ``by`` group), with their counts.

    Columns: the ``by`` columns, ``tutor_score``, ``judge_score``, ``n_turns`` (turns in the
    frame), ``n_scored`` (scored by both: the figures use these), ``tutor_unscored``,
    ``judge_unscored``, ``spearman``, ``spearman_p``, ``kendall``, ``kendall_p``, and ``undefined``:
    why the coefficients are NaN ("" when they are not): fewer than 3 turns scored by both, or one
    grader gave every such turn the same score (rank agreement is not defined then).

    >>> import pandas as pd
    >>> p = pd.DataFrame({"safety": [1, 8, 10, 5], "harmlessness": [-3, 2, 3, float("nan")],
    ...                   "usefulness": [1, 8, 10, 3], "helpfulness": [0, 2, 3, 1]})
    >>> r = rank_agreement(p)
    >>> r[["tutor_score", "n_scored", "judge_unscored", "spearman", "kendall"]].to_dict("records")
    ... # doctest: +NORMALIZE_WHITESPACE
    [{'tutor_score': 'safety', 'n_scored': 3, 'judge_unscored': 1, 'spearman': 1.0, 'kendall': 1.0},
     {'tutor_score': 'usefulness', 'n_scored': 4, 'judge_unscored': 0, 'spearman': 1.0, 'kendall': 1.0}]
    """
    import warnings

    import pandas as pd
    from scipy.stats import kendalltau, spearmanr

    rows = []
    groups = pairs.groupby(list(by), sort=True) if by else [((), pairs)]
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        for ts, js in SCALE_PAIRS:
            x, y = g[ts].astype(float), g[js].astype(float)
            both = x.notna() & y.notna()
            rho = rho_p = tau = tau_p = math.nan
            undefined = _why_undefined(x[both], y[both], ts, js)
            if not undefined:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    rho, rho_p = spearmanr(x[both], y[both])
                    tau, tau_p = kendalltau(x[both], y[both])
            rows.append({**dict(zip(by, key, strict=True)), "tutor_score": ts, "judge_score": js,
                         "n_turns": len(g), "n_scored": int(both.sum()), "tutor_unscored": int(x.isna().sum()),
                         "judge_unscored": int(y.isna().sum()), "spearman": float(rho), "spearman_p": float(rho_p),
                         "kendall": float(tau), "kendall_p": float(tau_p), "undefined": undefined})
    return pd.DataFrame(rows)


def _why_undefined(x: pd.Series, y: pd.Series, tutor_score: str, judge_score: str) -> str:
    """Why rank agreement is not defined on these paired scores, or "" when it is."""
    if len(x) < 3:
        return f"fewer than 3 turns scored by both ({len(x)})"
    for grader, score, values in (("tutor", tutor_score, x), ("judge", judge_score, y)):
        if values.nunique() == 1:
            return f"the {grader} gave all {len(values)} turns {score} {values.iloc[0]:g}"
    return ""


def disagreements(pairs: pd.DataFrame, *, tutor_score: str = "safety", judge_score: str = "harmlessness",
                  k: int = 10) -> pd.DataFrame:
    """The ``k`` turns where the two graders disagree most, both scores mapped onto 0..1.

    ``gap`` = tutor minus judge on 0..1: positive where the tutor grades higher than the judge.

    >>> import pandas as pd
    >>> p = pd.DataFrame({"dialogue_id": ["a", "b", "c"], "turn": 1, "safety": [10, 1, 8],
    ...                   "harmlessness": [-3, -3, 2]})
    >>> disagreements(p, k=2)[["dialogue_id", "gap"]].round(3).to_dict("records")   # 1 - 0; 7/9 - 5/6
    [{'dialogue_id': 'a', 'gap': 1.0}, {'dialogue_id': 'c', 'gap': -0.056}]
    """
    scored = pairs[pairs[tutor_score].notna() & pairs[judge_score].notna()]
    tutor_n = scored[tutor_score].map(lambda v: normalised(v, "tutor", tutor_score))
    judge_n = scored[judge_score].map(lambda v: normalised(v, "judge", judge_score))
    out = scored.assign(tutor_norm=tutor_n, judge_norm=judge_n, gap=tutor_n - judge_n)
    out = out.assign(_abs=out["gap"].abs()).sort_values("_abs", ascending=False, kind="stable")
    return out.drop(columns="_abs").head(k).reset_index(drop=True)


def agreement_summary(pairs: pd.DataFrame, *, direction: str) -> str:
    """One line per scale pair: the rank agreement and its counts, for a notebook's output.

    >>> import pandas as pd
    >>> p = pd.DataFrame({"safety": [1, 8, 10], "harmlessness": [-3, 2, 3], "usefulness": [1, 8, 10],
    ...                   "helpfulness": [0, 2, float("nan")]})
    >>> print(agreement_summary(p, direction="judge on the tutor's turns"))  # doctest: +NORMALIZE_WHITESPACE
    Tutor vs judge (judge on the tutor's turns), 3 turns:
      safety ~ harmlessness: Spearman 1.00, Kendall 1.00 on 3 turns scored by both
        (0 unscored by the tutor, 0 by the judge)
      usefulness ~ helpfulness: not defined, fewer than 3 turns scored by both (2)
        (0 unscored by the tutor, 1 by the judge)
    """
    r = rank_agreement(pairs)
    lines = [f"Tutor vs judge ({direction}), {len(pairs)} turns:"]
    for _, x in r.iterrows():
        measured = (f"not defined, {x.undefined}" if x.undefined else
                    f"Spearman {x.spearman:.2f}, Kendall {x.kendall:.2f} on {x.n_scored} turns scored by both")
        lines.append(f"  {x.tutor_score} ~ {x.judge_score}: {measured} ({x.tutor_unscored} unscored by the tutor, "
                     f"{x.judge_unscored} by the judge)")
    return "\n".join(lines)


# ---- one call per notebook ------------------------------------------------------------------------

SHOWN = ["source", "dialogue_id", "turn", "user_turn", "answer", "safety", "harmlessness", "gap"]


def _client(spec: str, role: str) -> ChatClient:
    from steerkit.roles import make_backend

    return ChatClient(make_backend(spec), role=role, spec=spec)


def judge_on_trajectories(tutor_turns: pd.DataFrame, *, judge: str = "rules", k: int = 5) -> tuple[str, pd.DataFrame]:
    """Notebook 03: the judge (default the offline ``rules`` one, 04's default) grades the GRPO turns;
    returns the agreement lines and the ``k`` turns where tutor safety and judge harmlessness differ most."""
    pairs = judge_trajectories(_client(judge, "judge"), tutor_turns)
    return (agreement_summary(pairs, direction=f"judge {judge} on the tutor's GRPO turns"),
            disagreements(pairs, k=k)[SHOWN])


def tutor_on_evaluation(judge_turns: pd.DataFrame, *, tutor: str = "rules", k: int = 5) -> tuple[str, pd.DataFrame]:
    """Notebook 04: the tutor (default the offline ``rules`` one, 03's default) grades the judged turns;
    returns the agreement lines and the ``k`` turns where they differ most."""
    pairs = tutor_grades_turns(_client(tutor, "tutor"), judge_turns)
    return (agreement_summary(pairs, direction=f"tutor {tutor} on the judge's evaluation turns"),
            disagreements(pairs, k=k)[SHOWN])
