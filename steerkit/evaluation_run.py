"""Stage 04 in a few calls: open the evaluation run, find its bench, evaluate every model, write the tables.

Notebook 04 (and anything else that evaluates checkpoints side by side) calls these in order:

1. `EvaluationParameters.from_parameters` takes the notebook's parameters once;
2. `open_evaluation` opens ``<runs_root>/04_steer_bench_analysis/<run_id>/`` with them in its manifest;
3. `prepare_bench` reads the given bench (or a notebook-01 run's), or, when neither is given, makes
   the smoke runs' small offline bench inside the run (its ``bench/`` subfolder;
   `steerkit.smoke_inputs.small_bench`);
4. `evaluate_models` replays the bench with the base student and each model run's checkpoint, one
   subfolder each, judged turn by turn (`steerkit.evaluate.evaluate`, method.md 6);
5. `write_tables` writes the run's tables (``rates.csv``, ``survival.csv``, ``failure_turns.csv``;
   names in `steerkit.layout`) and ``metrics.json``, and finishes the run.

The tables themselves are computed in the notebook from `steerkit.metrics`, where a reader sees them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steerkit import frames, metrics
from steerkit.clients import Sampling
from steerkit.evaluate import evaluate as replay_and_judge
from steerkit.evaluate import load_bench, report_evaluation
from steerkit.layout import (
    BENCH_FILE,
    CAPTIONS_FILE,
    FAILURE_TURNS_FILE,
    RATES_FILE,
    RESULTS_FILE,
    SURVIVAL_FILE,
)
from steerkit.parameters import named_fields
from steerkit.roles import Roles
from steerkit.runs import Run, atomic_write_json, open_run
from steerkit.served import served_students
from steerkit.smoke_inputs import small_bench

if TYPE_CHECKING:
    import pandas as pd

    from steerkit.schema import BenchItem

STAGE = "04_steer_bench_analysis"
BASE = "base"  # the row of the base student


@dataclass
class EvaluationParameters:
    """Notebook 04's parameters (their meaning is documented in the notebook's parameters cell)."""

    runs_root: str = ""
    run_id: str = ""
    synth_run: str = ""
    bench: str = ""
    model_runs: list[str] | str = ""
    eval_runs: list[str] | str = ""
    labels: list[str] | str = ""
    served: str | dict[str, str] = ""
    student: str = "smollm2"
    judge: str = "rules"
    n_items: int = 0
    max_turns: int = 3
    max_tokens: int = 48
    n_benign: int = 4
    n_obfuscated: int = 6
    n_redteam: int = 4
    seed: int = 0
    n_resamples: int = 1000
    report_to: str = "none"
    paper_match: str = "base: 3B base, SFT: 3B SFT, GRPO-tcsr: 3B SaFeR-Steer"

    def __post_init__(self) -> None:
        # a notebook parameter carries a list as a comma-separated string
        self.model_runs = frames.as_list(self.model_runs)
        self.eval_runs = frames.as_list(self.eval_runs)
        self.labels = frames.as_list(self.labels)

    @classmethod
    def from_parameters(cls, values: Mapping[str, Any]) -> EvaluationParameters:
        """The fields named in ``values`` (a notebook's ``globals()``); other names are ignored.

        >>> p = EvaluationParameters.from_parameters({"model_runs": "a, b", "figure_png": True})
        >>> p.model_runs
        ['a', 'b']
        """
        return cls(**named_fields(cls, values))

    def manifest(self) -> dict[str, Any]:
        """What the run's manifest records: the parameters and the metric thresholds the tables use
        (method.md 6)."""
        # where the run lives and where its scores are sent are not results' parameters
        out = {k: v for k, v in asdict(self).items() if k not in ("runs_root", "run_id", "report_to")}
        return out | {"safe_avg": metrics.SAFE_AVG, "helpful_avg": metrics.HELPFUL_AVG,
                      "fail_below": metrics.FAIL_BELOW, "horizon": metrics.HORIZON}


def open_evaluation(p: EvaluationParameters) -> Run:
    """Open (or reopen, resuming its evaluations) the evaluation run, parameters in its manifest."""
    return open_run(STAGE, run_id=p.run_id, root=p.runs_root, parameters=p.manifest(),
                    roles={"student": p.student, "judge": p.judge}, seeds={"seed": p.seed},
                    inputs={"synth_run": p.synth_run, "bench": p.bench})


@dataclass
class Bench:
    """The bench a run evaluates: its items, the file they came from and the image captions."""

    items: list[BenchItem]
    file: Path | None
    captions: dict[str, str]


def prepare_bench(run: Run, p: EvaluationParameters) -> Bench:
    """The bench file if given, else the notebook-01 run's, else the small synthesized one; none is
    needed when the run only compares earlier evaluations (``eval_runs``)."""
    synth_run = p.synth_run
    if not p.eval_runs and not p.bench and not synth_run:
        bench_run = open_run(STAGE, run_id=f"{run.id}/bench", root=p.runs_root, parameters={"seed": p.seed})
        synth_run = str(small_bench(bench_run, n_benign=p.n_benign, n_obfuscated=p.n_obfuscated,
                                    n_redteam=p.n_redteam, max_turns=p.max_turns, seed=p.seed))
    file = Path(p.bench) if p.bench else (Path(synth_run) / BENCH_FILE if synth_run else None)
    items = load_bench(file)[: p.n_items or None] if file else []
    captions_file = Path(synth_run) / CAPTIONS_FILE if synth_run else None
    captions = json.loads(captions_file.read_text()) if captions_file and captions_file.is_file() else {}
    return Bench(items, file, captions)


def students_of(p: EvaluationParameters) -> dict[str, str]:
    """Row name -> student spec: the base student, then each model run's ``checkpoint/``."""
    if p.eval_runs:
        return {}
    return {BASE: p.student} | {Path(r).name: f"hf:{Path(r).resolve() / 'checkpoint'}" for r in p.model_runs}


def evaluate_models(run: Run, bench: Bench, p: EvaluationParameters) -> list[str]:
    """Replay ``bench`` with every student of `students_of` (served rows through their server), each in
    the subfolder ``<run>/<row>``; reopening the run resumes each where it stopped. Returns the rows."""
    students, served_rows = served_students(students_of(p), p.served)
    judge = Roles({"judge": p.judge}).client("judge")
    for name, spec in students.items():
        sub = open_run(STAGE, run_id=f"{run.id}/{name}", root=p.runs_root,
                       parameters={"label": BASE if name == BASE else None, "student": spec, "judge": p.judge,
                                   "max_turns": p.max_turns, "max_tokens": p.max_tokens, "bench": str(bench.file)},
                       roles={"student": spec, "judge": p.judge},
                       prompts={"judge": "judge@1", "judge_reask": "reask@1", "student_system": "student_system@1"},
                       seeds={"seed": p.seed})
        replay_and_judge(sub, bench.items, student=Roles({"student": spec}).client("student"), judge=judge,
                         root=bench.file.parent if bench.file else None, captions=bench.captions,
                         max_turns=p.max_turns, sampling=Sampling(temperature=0.0, max_tokens=p.max_tokens),
                         served=served_rows.get(name))
        sub.finish(**sub.manifest["evaluation"]["counts"])
        report_evaluation(sub, report_to=p.report_to)  # per-turn judge scores to wandb
    return list(students)


def write_tables(run: Run, *, rates: pd.DataFrame, curves: pd.DataFrame, failures: pd.DataFrame,
                 turns: pd.DataFrame, sources: list[str], figures_dir: Path) -> dict[str, Any]:
    """Write the run's tables and ``metrics.json``, finish it, and return its manifest summary."""
    rates.to_csv(run.file(RATES_FILE), index=False)
    curves.to_csv(run.file(SURVIVAL_FILE), index=False)
    failures.to_csv(run.file(FAILURE_TURNS_FILE), index=False)
    atomic_write_json(run.file(RESULTS_FILE), {"sources": sources, "table": rates.to_dict("records"),
                                               "unscored_turns": int((~turns.scored).sum())})
    n_dialogues = int(turns.groupby(["run_id", "dialogue_id"]).ngroups)
    run.finish(dialogues=n_dialogues, evaluations=len(sources), figures=str(figures_dir))
    return run.manifest["summary"]
