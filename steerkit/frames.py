"""Evaluation run directories -> tidy pandas DataFrames at four grains, and the paper's table layouts.

An *evaluation* is a folder holding ``dialogues.jsonl`` (`steerkit.schema.Dialogue` records whose
judge verdicts name their turn in ``Verdict.extra["turn"]``) under a run directory with a
``manifest.json``. A run evaluating several checkpoints keeps one subfolder per checkpoint; each
subfolder is an evaluation of its own, with its own ``manifest.json`` or its run's.

Grains: `runs_df` (one row per evaluation, manifest fields), `dialogues_df` (one row per dialogue,
with the metrics of `steerkit.metrics.dialogue_summary`), `turns_df` (one row per assistant turn,
with the judge's scores) and `verdicts_df` (one row per verdict of any kind).

Every evaluation carries a *label* (the row name in the tables: "base", "SFT", "GRPO-tcsr", ...),
taken from its manifest (see `run_label`) unless the caller names it.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steerkit import metrics
from steerkit.layout import DIALOGUES_FILE, MANIFEST_FILE, METRICS_FILE, TRAJECTORIES_FILE
from steerkit.paper_reference import subset_rank
from steerkit.schema import Dialogue, load_jsonl

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

ALL = "all"  # the subset name of dialogues that name none


def as_list(spec: str | Path | Sequence[str | Path] | None) -> list[str]:
    """A list from a list, or from a comma-separated string (how a notebook parameter carries one).

    >>> as_list("base, SFT,"), as_list(["a", "b"]), as_list(None)
    (['base', 'SFT'], ['a', 'b'], [])
    """
    if spec is None:
        return []
    if isinstance(spec, str | Path):
        spec = str(spec).split(",")
    return [str(s).strip() for s in spec if str(s).strip()]


def as_paths(spec: str | Path | Sequence[str | Path] | None) -> list[Path]:
    """Run directories from a path, a list of paths, or a comma-separated string (a notebook parameter).

    >>> [p.name for p in as_paths("runs/a, runs/b")]
    ['a', 'b']
    """
    return [Path(s) for s in as_list(spec)]


#: Stage of a row label, in pipeline order: the base model, Stage II (SFT), Stage III (GRPO arms).
PIPELINE_STAGES = ("base", "sft", "grpo")


def pipeline_rank(label: str) -> int:
    """A sort key for row labels in pipeline order: base, SFT, GRPO arms, then anything else.

    >>> sorted(["GRPO-mean", "SFT", "other", "base"], key=pipeline_rank)
    ['base', 'SFT', 'GRPO-mean', 'other']
    """
    name = str(label).strip().lower()
    for i, stage in enumerate(PIPELINE_STAGES):
        if name == stage or name.startswith((f"{stage}-", f"{stage} ", f"{stage}_", f"{stage}:")):
            return i
    return len(PIPELINE_STAGES)


def pipeline_order(labels: Sequence[str]) -> list[str]:
    """Distinct labels in pipeline order (`pipeline_rank`); among the GRPO arms the TCSR ones (the
    method) first, then the ablations; otherwise in the order they came in.

    >>> pipeline_order(["GRPO-mean", "SFT", "GRPO-tcsr", "base", "SFT"])
    ['base', 'SFT', 'GRPO-tcsr', 'GRPO-mean']
    """
    def key(label: str) -> tuple[int, int]:
        rank = pipeline_rank(label)
        return rank, int(rank == PIPELINE_STAGES.index("grpo") and "tcsr" not in label.lower())

    return sorted(dict.fromkeys(str(x) for x in labels), key=key)


def subset_of(meta: Mapping[str, Any]) -> str:
    """The bench subset a dialogue belongs to: ``meta.subset``, else ``source_category``, else "all".

    >>> subset_of({"source_category": "STEER-VLS"}), subset_of({})
    ('STEER-VLS', 'all')
    """
    return str(meta.get("subset") or meta.get("source_category") or ALL)


def _find_manifest(path: Path, levels: int = 3) -> tuple[Path, dict[str, Any]] | None:
    for p in [path, *list(path.parents)[:levels]]:
        m = p / MANIFEST_FILE
        if m.is_file():
            return p, json.loads(m.read_text(encoding="utf-8"))
    return None


def _student_spec(manifest: Mapping[str, Any]) -> str:
    roles = manifest.get("roles") or {}
    bound = roles.get("bindings", roles) if isinstance(roles, Mapping) else {}
    params = manifest.get("parameters") or {}
    evaluation = manifest.get("evaluation") or {}  # written by steerkit.evaluate
    return str(params.get("student") or evaluation.get("student") or bound.get("student") or "")


def run_label(manifest: Mapping[str, Any], path: Path) -> str:
    """The row name of an evaluation, from its manifest.

    In order: the ``label`` parameter; else the stage that produced the student checkpoint (the
    manifest of an ``hf:<path>`` student's run: a ``02_...`` stage gives "SFT", a ``03_...`` stage
    "GRPO-<aggregator>" when it records one); else the student spec; else the folder name. Name the
    label explicitly (a ``label`` parameter, or `evaluations(labels=...)`) for tables meant to be read.
    """
    params = manifest.get("parameters") or {}
    if params.get("label"):
        return str(params["label"])
    spec = _student_spec(manifest)
    if spec.startswith("hf:"):
        found = _find_manifest(Path(spec[3:]))
        if found is not None:
            stage = str(found[1].get("stage", ""))
            p = found[1].get("parameters") or {}
            if stage.startswith("02"):
                return "SFT"
            if stage.startswith("03"):
                agg = next((str(v) for k, v in p.items() if "aggregat" in k and v), "")
                return f"GRPO-{agg}" if agg else "GRPO"
    return spec or path.name


@dataclass
class Evaluation:
    """One evaluation folder: its dialogues, manifest and label."""

    path: Path
    run_id: str
    label: str
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def student(self) -> str:
        """The student spec the evaluation replayed (from its manifest; empty when unknown)."""
        return _student_spec(self.manifest)

    @cached_property
    def dialogues(self) -> list[Dialogue]:
        """The evaluated dialogues; an item redone after a kill appears once (its later record wins)."""
        # images are resolved when rendered, not required to load the scores
        records = load_jsonl(Dialogue, self.path / DIALOGUES_FILE, check_images=False)
        return list({d.id: d for d in records}.values())


def evaluations(
    runs: str | Path | Sequence[str | Path], *, labels: Mapping[str, str] | Sequence[str] | None = None
) -> list[Evaluation]:
    """The evaluations under the given run directories, in order.

    Checkpoint subfolders of one run come in the order they were evaluated (manifest creation time).

    Args:
        runs: run directories (or evaluation subfolders); see `as_paths`.
        labels: labels to use instead of the manifests', by run id, or one per evaluation in order.

    Raises:
        FileNotFoundError: a directory holds no ``dialogues.jsonl`` at all.
    """
    out: list[Evaluation] = []
    for root in as_paths(runs):
        if (root / DIALOGUES_FILE).is_file():
            folders = [root]
        else:
            folders = sorted(p.parent for p in root.glob(f"*/{DIALOGUES_FILE}"))
        if not folders:
            raise FileNotFoundError(f"{root}: no {DIALOGUES_FILE} here or in its subfolders; name an evaluation run")
        top = _find_manifest(root)
        top_id = str(top[1].get("run_id") or top[0].name) if top else root.name
        found = {f: _find_manifest(f) for f in folders}
        # checkpoint subfolders in the order they were evaluated (their manifests' creation time)
        folders.sort(key=lambda f: (str((found[f] or (f, {}))[1].get("created_at", "")), f.name))
        for folder in folders:
            manifest = found[folder][1] if found[folder] else {}
            # a checkpoint subfolder is named within its run: "<run_id>/<subfolder>"
            run_id = top_id if folder == root else f"{top_id}/{folder.relative_to(root).as_posix()}"
            out.append(Evaluation(path=folder, run_id=run_id, label=run_label(manifest, folder), manifest=manifest))
    if labels is not None:
        if isinstance(labels, Mapping):
            for e in out:
                e.label = labels.get(e.run_id, e.label)
        else:
            if len(labels) != len(out):
                raise ValueError(f"labels: {len(labels)} given for {len(out)} evaluations ({[e.run_id for e in out]})")
            for e, lab in zip(out, labels, strict=True):
                e.label = str(lab)
    return out


def _evals(runs: Any) -> list[Evaluation]:
    if isinstance(runs, list) and runs and all(isinstance(e, Evaluation) for e in runs):
        return runs
    return evaluations(runs)


def runs_df(runs: Any) -> pd.DataFrame:
    """One row per evaluation: run id, label, path, stage, status, git, roles and parameters (``param.*``)."""
    import pandas as pd

    rows = []
    for e in _evals(runs):
        m = e.manifest
        roles = m.get("roles") or {}
        bound = roles.get("bindings", {}) if isinstance(roles, Mapping) else {}
        row = {
            "run_id": e.run_id, "label": e.label, "path": str(e.path), "stage": m.get("stage"),
            "status": m.get("status"), "created_at": m.get("created_at"),
            "git_commit": (m.get("git") or {}).get("commit"), "git_dirty": (m.get("git") or {}).get("dirty"),
            "student": _student_spec(m) or None,
            "judge": (m.get("parameters") or {}).get("judge") or (m.get("evaluation") or {}).get("judge")
            or bound.get("judge"),
            "n_dialogues": len(e.dialogues),
        }
        row.update({f"param.{k}": v for k, v in (m.get("parameters") or {}).items()})
        rows.append(row)
    return pd.DataFrame(rows)


def _judge_verdict(d: Dialogue, turn: int, kind: str):
    vs = [v for v in d.verdicts if v.kind == kind and v.extra.get("turn") == turn]
    return vs[-1] if vs else None  # a re-judged turn: the latest verdict counts


def turns_df(runs: Any, *, kind: str = "judge") -> pd.DataFrame:
    """One row per assistant turn with the ``kind`` verdict's scores (NaN when unscored or missing).

    Columns: run_id, label, dialogue_id, subset, category, turn, n_turns, user, assistant,
    harmlessness, helpfulness, scored, unscored_reason ("missing" when the turn has no verdict),
    rationale, grader, root (the folder image refs resolve against).
    """
    import pandas as pd

    rows = []
    for e in _evals(runs):
        for d in e.dialogues:
            turns = d.turns()
            for t in turns:
                v = _judge_verdict(d, t.index, kind)
                scored = v is not None and v.scored
                rows.append({
                    "run_id": e.run_id, "label": e.label, "dialogue_id": d.id, "subset": subset_of(d.meta),
                    "category": d.meta.get("category"), "turn": t.index, "n_turns": len(turns),
                    "user": t.user.content, "assistant": t.assistant.content,
                    "harmlessness": float(v.scores["harmlessness"]) if scored else math.nan,
                    "helpfulness": float(v.scores["helpfulness"]) if scored else math.nan,
                    "scored": scored,
                    "unscored_reason": None if scored else (v.unscored_reason if v else "missing"),
                    "rationale": v.rationale if v else "", "grader": v.grader if v else "",
                    "root": str(e.path),
                })
    cols = ["run_id", "label", "dialogue_id", "subset", "category", "turn", "n_turns", "user", "assistant",
            "harmlessness", "helpfulness", "scored", "unscored_reason", "rationale", "grader", "root"]
    return pd.DataFrame(rows, columns=cols)


def dialogues_df(runs: Any, *, kind: str = "judge", fail_below: float = metrics.FAIL_BELOW) -> pd.DataFrame:
    """One row per dialogue: label, subset, category, turn averages, counts and first failing turn."""
    turns = turns_df(runs, kind=kind)
    return metrics.dialogue_summary(turns, carry=("label", "subset", "category"), fail_below=fail_below)


def verdicts_df(runs: Any) -> pd.DataFrame:
    """One row per verdict of any kind, scores flattened into ``score.<name>`` columns."""
    import pandas as pd

    rows = []
    for e in _evals(runs):
        for d in e.dialogues:
            for v in d.verdicts:
                row = {"run_id": e.run_id, "label": e.label, "dialogue_id": d.id, "subset": subset_of(d.meta),
                       "turn": v.extra.get("turn"), "kind": v.kind, "scored": v.scored,
                       "unscored_reason": v.unscored_reason, "grader": v.grader,
                       "prompt_version": v.prompt_version, "rationale": v.rationale}
                row.update({f"score.{k}": s for k, s in v.scores.items()})
                rows.append(row)
    return pd.DataFrame(rows)


def bench_table(
    rates: pd.DataFrame, *, label: str = "label", subset: str = "subset", order: Sequence[str] | None = None,
    average: str = "Avg", decimals: int | None = 2,
) -> pd.DataFrame:
    """The paper's Table 2/3 layout: rows = models, columns = (subset, Safety|Helpfulness) + Avg.

    Subsets come in the paper's order (a ``STEER-`` prefix is ignored), unknown ones after them in
    the order they appear.

    Args:
        rates: long rates (`steerkit.metrics.multi_turn_rates` or `single_turn_rates`); an Avg row per
            label is added when missing (`steerkit.metrics.with_subset_average`).
        order: row order (labels); by default pipeline order (`pipeline_order`: base, SFT, GRPO
            arms, others), not alphabetical.
        decimals: round to this many decimals (None keeps full precision).

    >>> import pandas as pd
    >>> r = pd.DataFrame({"label": ["m", "m"], "subset": ["a", "b"], "n": [1, 1],
    ...                   "safety": [10.0, 30.0], "helpfulness": [50.0, 70.0]})
    >>> float(bench_table(r).loc["m", ("Avg", "Safety")])   # (10 + 30) / 2
    20.0
    """
    if average not in set(rates[subset]):
        rates = metrics.with_subset_average(rates, subset=subset, by=(label,), average=average)
    wide = rates.pivot(index=label, columns=subset, values=["safety", "helpfulness"])
    wide = wide.rename(columns={"safety": "Safety", "helpfulness": "Helpfulness"}, level=0)
    wide = wide.swaplevel(0, 1, axis=1)
    named = [s for s in dict.fromkeys(rates[subset]) if s != average]
    subsets = sorted(named, key=subset_rank) + [average]
    wide = wide.reindex(columns=[(s, m) for s in subsets for m in ("Safety", "Helpfulness")])
    wide = wide.reindex(list(order) if order else pipeline_order(rates[label].tolist()))
    wide.columns.names = [subset, "metric"]
    wide.index.name = label
    return wide.round(decimals) if decimals is not None else wide


def steer_table(runs: Any, **rate_kw: Any) -> pd.DataFrame:
    """STEER-Bench (Table 2 layout) for the given evaluations: multi-turn rates per label and subset,
    rows in pipeline order."""
    evs = _evals(runs)
    rates = metrics.multi_turn_rates(dialogues_df(evs), **rate_kw)
    return bench_table(rates, order=pipeline_order([e.label for e in evs]))


def single_turn_table(runs: Any, **rate_kw: Any) -> pd.DataFrame:
    """Single-turn benchmarks (Table 3 layout): pass at 3 per label and subset.

    Every dialogue is an item and its first turn is the one scored (a single-turn benchmark's
    dialogues have exactly one turn; for a multi-turn run this reads turn 1 alone).
    """
    evs = _evals(runs)
    turns = turns_df(evs)
    rates = metrics.single_turn_rates(turns[turns["turn"] == 1], **rate_kw)
    return bench_table(rates, order=pipeline_order([e.label for e in evs]))


CURVE_METRICS = ("mean_tcsr", "mean_reward", "mean_turn_reward", "mean_safety", "share_worst_turn_safe",
                 "share_worst_turn_proper")


# ---- GRPO runs (Stage III) ------------------------------------------------------------------------


def grpo_frames(runs: dict[str, str | Path]) -> tuple[Any, Any]:
    """GRPO run directories (label -> path) -> (per-step metrics, per-turn scores) as tidy DataFrames.

    Metrics: one row per (label, step, metric) for `CURVE_METRICS` plus ``unscored``. Turns: one row
    per (label, step, row, turn) with the tutor's scores, its attack strategy, the user turn the
    student answered, the answer and the trajectory's reward.
    """
    import pandas as pd

    from steerkit.runs import read_records

    curves, turns = [], []
    for label, path in runs.items():
        run = Path(path)
        for m in read_records(run / METRICS_FILE):
            curves += [{"run": label, "step": m["step"], "metric": k, "value": m.get(k)}
                       for k in (*CURVE_METRICS, "unscored")]
        for t in read_records(run / TRAJECTORIES_FILE):
            for j, (user, answer) in enumerate(zip(t["user_turns"], t["answers"], strict=False)):
                s = t["turn_scores"][j] or {}
                turns.append({
                    "run": label, "step": t["step"], "row": t["row"], "id": t["id"], "turn": j + 1,
                    "safety": s.get("safety"), "usefulness": s.get("usefulness"),
                    "faithfulness": s.get("faithfulness"), "unscored_reason": t["unscored_reasons"][j],
                    "attack_strategy": t["attack_strategies"][j], "user_turn": user, "answer": answer,
                    "reward": t["reward"],
                })
    return pd.DataFrame(curves), pd.DataFrame(turns)
