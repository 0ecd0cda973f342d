"""The ordered pipeline 01 -> 02 -> 03 (TCSR and mean) -> 04, resumable stage by stage.

Size: recipes, their precedence and the stage loop are read together; they stay in one module.

Each stage executes one numbered notebook (`steerkit.notebooks.execute`) into
``papermill_runs/<pipeline_run>/``; a later stage is handed the run directories of the stages it
reads as parameters. ``pipeline.json`` in the pipeline folder records the recipe, each stage's run
directory, executed notebook and wall time. A stage counts as finished only when its own run
manifest says ``status: finished`` (`steerkit.runs.Run.finish`), so a killed pipeline, started
again with the same ``run_id``, skips the finished stages and reruns the interrupted one under the
same run id, which resumes from the results it already wrote.

A recipe (``configs/pipeline_<profile>.yaml``) holds values only::

    offline: true            # set HF_HUB_OFFLINE and friends for every kernel
    stages:
      "03": {alpha: 0.3}     # parameters for every run of notebook 03
      03_mean: {aggregator: mean}   # parameters for one stage

Precedence: notebook defaults < recipe ``stages[<notebook>]`` < ``stages[<stage>]`` < ``--set``.
In recipe and ``--set`` strings, ``{repo}`` is the repository and ``{pipeline}`` the pipeline folder,
so a recipe writes to the same places wherever the command is started.

Served models are named once, in the recipe's ``endpoints`` (name -> role spec), and the stages'
roles refer to them by name, so moving a server is one change (``--set endpoints.<name>=<spec>``)::

    endpoints:
      policy: openai:Qwen/Qwen3-VL-32B-Instruct@http://localhost:8000/v1
    stages:
      "03": {tutor: "{policy}"}
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import logging
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steerkit.layout import MANIFEST_FILE, PIPELINE_MANIFEST
from steerkit.notebooks import (
    NOTEBOOKS_DIR,
    StageError,
    check_parameters,
    execute,
    notebook_parameters,
    notebook_path,
)
from steerkit.progress import ProgressTail
from steerkit.runs import DEFAULT_RUNS_ROOT, REPO_ROOT, atomic_write_json, git_revision, new_run_id

log = logging.getLogger(__name__)

CONFIGS_DIR = REPO_ROOT / "configs"
#: Environment for offline recipes: nothing is fetched from a model hub, nothing reports to wandb.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
}


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline: a notebook, the run id it writes, and the run dirs it reads.

    ``inputs`` maps a notebook parameter to a value in which ``{<stage key>}`` stands for that
    stage's run directory (strings, lists and dicts are substituted recursively; recipe values may
    use ``{repo}`` and ``{pipeline}`` the same way).
    """

    key: str
    notebook: str
    run_id: str
    inputs: dict[str, Any] = field(default_factory=dict)

    def needs(self) -> set[str]:
        """The stage keys whose run directories this stage reads."""
        return set(re.findall(r"\{([0-9A-Za-z_]+)\}", json.dumps(self.inputs)))


#: The SaFeR-Steer pipeline: synthesis, SFT warm start, GRPO with TCSR and with the mean aggregator
#: (the paper's "without TCSR" ablation, method.md 4), and the evaluation of base, +SFT and both GRPO runs.
#: The two GRPO runs are separate stages (notebook 03 with ``compare_aggregator=""`` in the recipes),
#: so a kill during the second does not repeat the first.
STAGES: tuple[Stage, ...] = (
    Stage("01", "01", "synth"),
    Stage("02", "02", "sft", inputs={"synth_run": "{01}"}),
    Stage("03_tcsr", "03", "grpo-tcsr", inputs={"synth_run": "{01}", "sft_run": "{02}"}),
    Stage("03_mean", "03", "grpo-mean", inputs={"synth_run": "{01}", "sft_run": "{02}"}),
    Stage(
        "04", "04", "eval",
        inputs={"synth_run": "{01}", "model_runs": ["{02}", "{03_tcsr}", "{03_mean}"]},
    ),
)


def substitute(value: Any, run_dirs: dict[str, str]) -> Any:
    """Replace ``{<stage key>}`` in strings (recursively in lists and dicts) by run directories.

    >>> substitute({"a": "{01}", "b": ["{02}", 3]}, {"01": "/r/1", "02": "/r/2"})
    {'a': '/r/1', 'b': ['/r/2', 3]}
    """
    match value:
        case str():
            return re.sub(r"\{([0-9A-Za-z_]+)\}", lambda m: run_dirs.get(m.group(1), m.group(0)), value)
        case list():
            return [substitute(v, run_dirs) for v in value]
        case dict():
            return {k: substitute(v, run_dirs) for k, v in value.items()}
        case _:
            return value


def parse_assignment(text: str) -> tuple[str | None, str, Any]:
    """``"03.alpha=0.5"`` -> ``("03", "alpha", 0.5)``; the value is read as YAML; no prefix: every stage.

    >>> parse_assignment("03_mean.aggregator=mean")
    ('03_mean', 'aggregator', 'mean')
    >>> parse_assignment("seed=7"), parse_assignment("03.tutor={policy}")  # a placeholder: a string
    ((None, 'seed', 7), ('03', 'tutor', '{policy}'))
    >>> parse_assignment("04.labels=[base, sft]")
    ('04', 'labels', ['base', 'sft'])
    """
    import yaml

    name, sep, raw = text.partition("=")
    if not sep or not name.strip():
        raise ValueError(f"--set {text!r}: write <param>=<value> or <stage>.<param>=<value>")
    scope, dot, param = name.strip().rpartition(".")
    plain = re.match(r"\s*(\{\w+\}|$)", raw)  # YAML would read "{policy}/x" as a mapping or fail
    try:
        return (scope if dot else None), param, raw.strip() if plain else yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ValueError(f"--set {text!r}: the value is not YAML ({e.problem}); quote it") from None


def load_recipe(profile: str | None = None, configs: Sequence[str | Path] = ()) -> dict[str, Any]:
    """The profile's recipe (``configs/pipeline_<profile>.yaml``) with each ``configs`` file merged on top."""
    import yaml

    paths = ([CONFIGS_DIR / f"pipeline_{profile}.yaml"] if profile else []) + [Path(p) for p in configs]
    recipe: dict[str, Any] = {"profile": profile, "offline": False, "stages": {}, "recipe_files": []}
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(
                f"recipe {path} does not exist (profiles: smoke, full, full_7b; or give a YAML path)")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict) or not isinstance(data.get("stages", {}), dict):
            raise ValueError(f"{path}: a recipe is a mapping with an optional 'stages' mapping")  # noqa: TRY004 - a bad file, not a bad call
        unknown = set(data) - {"offline", "stages", "description", "endpoints"}
        if unknown:
            raise ValueError(
                f"{path}: unknown recipe key(s) {', '.join(sorted(unknown))};"
                " use offline, stages, endpoints, description"
            )
        endpoints = data.get("endpoints") or {}
        if not isinstance(endpoints, dict) or not all(
            isinstance(k, str) and re.fullmatch(r"[A-Za-z_][0-9A-Za-z_]*", k) and isinstance(v, str)
            for k, v in endpoints.items()
        ):
            raise ValueError(f"{path}: endpoints must map names (letters, digits, _) to role spec strings")
        recipe.setdefault("endpoints", {}).update(endpoints)
        for key, params in (data.get("stages") or {}).items():
            if not isinstance(params, dict):
                raise ValueError(f"{path}: stages.{key} must map parameter names to values")  # noqa: TRY004 - a bad file
            recipe["stages"].setdefault(str(key), {}).update(params)
        if "offline" in data:
            recipe["offline"] = bool(data["offline"])
        recipe["recipe_files"].append(str(path))
    return recipe


@dataclass
class Pipeline:
    """A pipeline run folder ``<runs_root>/<run_id>`` and the stages executed into it."""

    recipe: dict[str, Any]
    run_id: str
    runs_root: Path = DEFAULT_RUNS_ROOT
    notebooks_dir: Path = NOTEBOOKS_DIR
    stages: tuple[Stage, ...] = STAGES
    sets: Sequence[str] = ()
    log_output: bool = False
    #: Print each running stage's progress (steps, rollouts, judged turns) on stderr.
    show_progress: bool = True

    @property
    def path(self) -> Path:
        return Path(self.runs_root) / self.run_id

    @property
    def manifest_path(self) -> Path:
        return self.path / PIPELINE_MANIFEST

    def stage(self, key: str) -> Stage:
        for s in self.stages:
            if s.key == key:
                return s
        raise KeyError(f"no stage {key!r}; stages are {', '.join(s.key for s in self.stages)}")

    def select(self, wanted: Iterable[str] | None) -> list[Stage]:
        """Stages named by key or notebook number (``"03"`` selects both GRPO runs), in pipeline order."""
        if wanted is None:
            return list(self.stages)
        wanted = [w.strip() for w in wanted if w.strip()]
        unknown = [w for w in wanted if not any(w in (s.key, s.notebook) for s in self.stages)]
        if unknown:
            raise ValueError(
                f"unknown stage(s) {', '.join(unknown)}; stages are {', '.join(s.key for s in self.stages)}")
        return [s for s in self.stages if s.key in wanted or s.notebook in wanted]

    @property
    def endpoints(self) -> dict[str, str]:
        """The recipe's served models by name, with ``--set endpoints.<name>=<spec>`` applied."""
        out = dict(self.recipe.get("endpoints", {}))
        for text in self.sets:
            scope, name, value = parse_assignment(text)
            if scope == "endpoints":
                if name not in out:
                    raise ValueError(
                        f"--set {text!r}: no endpoint {name!r};"
                        f" the recipe's endpoints are {', '.join(sorted(out)) or 'none'}"
                    )
                out[name] = str(value)
        return out

    def parameters(self, stage: Stage) -> dict[str, Any]:
        """Recipe and ``--set`` values for one stage (without the run directories it reads), with
        ``{<endpoint>}`` replaced by the endpoint's spec."""
        declared = notebook_parameters(notebook_path(stage.notebook, self.notebooks_dir))
        params: dict[str, Any] = {}
        for scope in dict.fromkeys((stage.notebook, stage.key)):  # notebook-wide first, then the stage's own
            params.update(copy.deepcopy(self.recipe["stages"].get(scope, {})))
        for text in self.sets:
            scope, name, value = parse_assignment(text)
            if scope in (stage.key, stage.notebook) or (scope is None and name in declared):
                params[name] = value
        return substitute(params, self.endpoints)

    def check(self, selected: Sequence[Stage]) -> None:
        """Fail before running anything: unknown recipe keys, unknown parameters, unknown --set scopes."""
        keys = {s.key for s in (*STAGES, *self.stages)} | {s.notebook for s in (*STAGES, *self.stages)}
        stray = sorted(set(self.recipe["stages"]) - keys)
        if stray:
            raise ValueError(f"recipe stages {', '.join(stray)} match no stage; stages are {', '.join(sorted(keys))}")
        for text in self.sets:
            scope, name, _ = parse_assignment(text)
            if scope is not None and scope not in keys and scope != "endpoints":
                raise ValueError(f"--set {text!r}: no stage {scope!r}; stages are {', '.join(sorted(keys))}")
            if scope == "endpoints":
                continue
            if scope is None and not any(
                name in notebook_parameters(notebook_path(s.notebook, self.notebooks_dir)) for s in self.stages
            ):
                raise ValueError(f"--set {text!r}: no notebook declares a parameter {name!r}")
        for stage in selected:
            source = notebook_path(stage.notebook, self.notebooks_dir)
            params = {**self.parameters(stage), **{k: "" for k in stage.inputs}, "runs_root": "", "run_id": ""}
            check_parameters(source, params)
            left = set(re.findall(r"\{([A-Za-z_][0-9A-Za-z_]*)\}", json.dumps(params))) - {"repo", "pipeline"}
            if left:
                raise ValueError(
                    f"stage {stage.key}: {{{'}, {'.join(sorted(left))}}} names no endpoint; the recipe's"
                    f" endpoints are {', '.join(sorted(self.endpoints)) or 'none'}"
                )

    def read_manifest(self) -> dict[str, Any] | None:
        if not self.manifest_path.exists():
            return None
        return json.loads(self.manifest_path.read_text())

    def stage_finished(self, record: dict[str, Any] | None) -> bool:
        """Whether a recorded stage's run manifest says ``finished``."""
        if not record or not record.get("run_dir"):
            return False
        manifest = Path(record["run_dir"]) / MANIFEST_FILE
        return manifest.exists() and json.loads(manifest.read_text()).get("status") == "finished"

    def run(self, only: Iterable[str] | None = None) -> dict[str, Any]:
        """Execute the selected stages in order, skipping finished ones; returns the pipeline manifest."""
        selected = self.select(only)
        self.check(selected)
        manifest = self.read_manifest()
        now = _dt.datetime.now(_dt.UTC).isoformat()
        if manifest is None:
            manifest = {
                "pipeline_run": self.run_id,
                "profile": self.recipe.get("profile"),
                "recipe_files": self.recipe.get("recipe_files", []),
                "offline": self.recipe.get("offline", False),
                "endpoints": self.endpoints,
                "created_at": now,
                "git": git_revision(),
                "stages": {},
            }
        else:
            manifest.setdefault("resumed_at", []).append(now)
        manifest["status"] = "running"
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.manifest_path, manifest)
        env = OFFLINE_ENV if self.recipe.get("offline") else {}
        for stage in selected:
            record = manifest["stages"].get(stage.key)
            params = self.parameters(stage)
            if record and record.get("parameters") != params:
                changed = sorted(
                    k for k in set(record["parameters"]) | set(params)
                    if record["parameters"].get(k) != params.get(k)
                )
                raise ValueError(
                    f"{self.manifest_path}: stage {stage.key} was started with other parameters"
                    f" ({', '.join(changed)}); resume with the same recipe and --set values or choose a new run id"
                )
            if self.stage_finished(record):
                log.info("stage %s already finished: %s", stage.key, record["run_dir"])
                continue
            run_dirs = {}
            for need in sorted(stage.needs()):
                if not self.stage_finished(manifest["stages"].get(need)):
                    raise RuntimeError(
                        f"stage {stage.key} reads stage {need}'s run, which has not finished in"
                        f" pipeline {self.run_id}; run stage {need} first (--stages {need},{stage.key})"
                    )
                run_dirs[need] = manifest["stages"][need]["run_dir"]
            inputs = substitute(stage.inputs, run_dirs)
            values = substitute(params, {"repo": str(REPO_ROOT), "pipeline": str(self.path.resolve())})
            record = manifest["stages"][stage.key] = {
                "notebook": notebook_path(stage.notebook, self.notebooks_dir).name,
                "run_id": stage.run_id,
                "parameters": params,
                "inputs": inputs,
                "status": "running",
                "started_at": _dt.datetime.now(_dt.UTC).isoformat(),
                "attempts": (record or {}).get("attempts", 0) + 1,
            }
            atomic_write_json(self.manifest_path, manifest)
            log.info("stage %s: %s (run %s)", stage.key, record["notebook"], stage.run_id)
            start = time.monotonic()
            try:
                with ProgressTail(self.path, stage.run_id, stage.key, enabled=self.show_progress):
                    done = execute(
                        stage.notebook, {**values, **inputs}, runs_root=self.path, run_id=stage.run_id,
                        notebooks_dir=self.notebooks_dir, log_output=self.log_output, env=env,
                    )
            except Exception as e:
                record.update(status="failed", error=str(e), seconds=round(time.monotonic() - start, 1))
                if isinstance(e, StageError) and e.kernel_cpu_seconds is not None:
                    record["kernel_cpu_seconds"] = round(e.kernel_cpu_seconds, 1)
                manifest["status"] = "failed"
                atomic_write_json(self.manifest_path, manifest)
                raise
            record.update(
                run_dir=str(done.run_dir), executed_notebook=str(done.executed_notebook),
                seconds=round(done.seconds, 1), kernel_cpu_seconds=round(done.kernel_cpu_seconds, 1),
                finished_at=_dt.datetime.now(_dt.UTC).isoformat(),
            )
            if not self.stage_finished(record):
                record["status"] = "failed"
                manifest["status"] = "failed"
                atomic_write_json(self.manifest_path, manifest)
                raise RuntimeError(
                    f"stage {stage.key}: {record['notebook']} ran to the end but its run manifest"
                    f" {done.run_dir / MANIFEST_FILE} does not say status 'finished'"
                    " (the notebook must call run.finish())"
                )
            record["status"] = "finished"
            atomic_write_json(self.manifest_path, manifest)
        if all(self.stage_finished(manifest["stages"].get(s.key)) for s in self.stages):
            manifest["status"] = "finished"
        else:
            manifest["status"] = "partial"
        atomic_write_json(self.manifest_path, manifest)
        return manifest


def latest_unfinished(runs_root: Path = DEFAULT_RUNS_ROOT, profile: str | None = None) -> str | None:
    """The id of the most recently created pipeline run that has not finished (for ``--resume``)."""
    candidates = []
    for path in Path(runs_root).glob(f"*/{PIPELINE_MANIFEST}"):
        m = json.loads(path.read_text())
        if m.get("status") != "finished" and (profile is None or m.get("profile") == profile):
            candidates.append((m.get("created_at", ""), path.parent.name))
    return max(candidates)[1] if candidates else None


def new_pipeline_id(profile: str | None) -> str:
    return new_run_id(f"{profile}-" if profile else "")


def resume_command(command: str, args: Any, run_id: str) -> str:
    """The command line that resumes this run: a resume must repeat the recipes, ``--set`` values and
    grid it was started with (a changed recipe is refused), so the hint carries them all.

    >>> from argparse import Namespace
    >>> a = Namespace(profile="smoke", config=["my.yaml"], sets=["03.alpha=0.5"], grid=["seed=0,1"],
    ...               stages=None, runs_root=DEFAULT_RUNS_ROOT, notebooks_dir=NOTEBOOKS_DIR)
    >>> resume_command("sweep", a, "sweep-smoke-1")
    'steerkit sweep --profile smoke --config my.yaml --set 03.alpha=0.5 --grid seed=0,1 --run-id sweep-smoke-1'
    """
    import shlex

    words = ["steerkit", command, "--profile", args.profile]
    for flag, values in (("--config", args.config), ("--set", args.sets), ("--grid", getattr(args, "grid", None))):
        words += [w for v in values or () for w in (flag, str(v))]
    if getattr(args, "stages", None):
        words += ["--stages", args.stages]
    for flag, value, default in (("--runs-root", args.runs_root, DEFAULT_RUNS_ROOT),
                                 ("--notebooks-dir", args.notebooks_dir, NOTEBOOKS_DIR)):
        if Path(value).resolve() != Path(default).resolve():
            words += [flag, str(value)]
    return shlex.join([*words, "--run-id", run_id])


def summary_lines(manifest: dict[str, Any]) -> list[str]:
    """One line per stage: key, status, wall time, kernel CPU time and run directory."""
    stages = manifest.get("stages", {})
    lines = [f"{'stage':8} {'status':9} {'wall s':>8} {'cpu s':>8}  run directory"]
    for key, rec in stages.items():
        wall, cpu = rec.get("seconds"), rec.get("kernel_cpu_seconds")
        lines.append(f"{key:8} {rec.get('status', '?'):9} {_num(wall)} {_num(cpu)}  {rec.get('run_dir', '')}")
    total = [sum(r.get(k) or 0 for r in stages.values()) for k in ("seconds", "kernel_cpu_seconds")]
    lines.append(f"{'total':8} {manifest.get('status', '?'):9} {_num(total[0])} {_num(total[1])}")
    return lines


def _num(value: float | None) -> str:
    return f"{'':>8}" if value is None else f"{value:8.1f}"
