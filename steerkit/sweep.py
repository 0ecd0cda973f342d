"""Sweeps: a grid over notebook 03's parameters, every cell a GRPO run from one shared SFT
checkpoint, all evaluated by notebook 04 on one bench and read by notebook 05 (docs/studies.md,
"Sweeps").

Size: sweep.json is written and read back here, so its format lives in one module.

A sweep is a `steerkit.pipeline.Pipeline` with generated stages: 01 and 02 once, one 03 stage per
cell, one 04 over the SFT checkpoint and every cell, then 05 over the sweep. Resume, parameter
checks, executed notebooks and ``pipeline.json`` are the pipeline's, so a killed sweep started again
with the same run id skips every finished cell and reruns the interrupted one under its own run id
(which resumes from what it wrote). ``sweep.json`` names every cell, its parameters, its label and
its run directories.

A sweep recipe (``configs/sweep_<profile>.yaml``) is merged over the pipeline recipe of the same
profile (``configs/pipeline_<profile>.yaml``) and adds::

    grid:             # notebook-03 parameter -> values; the cells are the product, in order
      alpha: [0.1, 0.3, 0.5]
      seed: [0, 1]
    synth_run: ""     # optional: an existing 01 run instead of running 01 ("": none, 03 and 04
    sft_run: ""       #   build their own data); a 02 run instead of 02 ("": the base student)
    studies: true     # end with notebook 05 over the sweep

``--grid alpha=0.1,0.3`` on the command line replaces one axis. A ``--set`` may not name a grid axis
(it would silently override every cell). The grid of a started sweep cannot change: a different
grid is a new sweep (a new run id).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import itertools
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from steerkit import pipeline as pl
from steerkit.layout import MANIFEST_FILE, PIPELINE_MANIFEST, SWEEP_MANIFEST
from steerkit.notebooks import NOTEBOOKS_DIR, notebook_parameters, notebook_path
from steerkit.runs import DEFAULT_RUNS_ROOT, atomic_write_json, git_revision

#: Notebook-03 parameters a grid may not vary: the wiring a sweep sets itself.
WIRING = ("runs_root", "run_id", "synth_run", "sft_run", "compare_aggregator")
RECIPE_KEYS = ("description", "offline", "stages", "grid", "synth_run", "sft_run", "studies")
#: The paper's ablation a GRPO arm reproduces (3B, STEER-Bench Avg, method.md 4), by its settings.
PAPER_SETTING = {"aggregator": "tcsr", "alpha": 0.3, "feedback": True}


@dataclass(frozen=True)
class Cell:
    """One point of the grid: its values, GRPO run id, pipeline stage key and row labels."""

    values: dict[str, Any]
    run_id: str
    key: str
    arm: str  # the row label without the seed: arms are compared, seeds repeat an arm
    label: str


def _slug(value: Any) -> str:
    text = re.sub(r"[^0-9A-Za-z.\-]+", "_", str(value)).strip("_") or "x"
    if len(text) > 24:  # a tutor spec or a path: keep it short and still distinct
        text = f"{text[:16]}_{hashlib.sha1(str(value).encode()).hexdigest()[:6]}"
    return text


def short(value: Any) -> str:
    """A value as a row label shows it: a role spec by its model name, booleans as on/off.

    >>> short("openai:Qwen/Qwen3-VL-32B-Instruct@http://h:8000/v1"), short(False), short(0.3)
    ('Qwen/Qwen3-VL-32B-Instruct', 'off', '0.3')
    """
    if isinstance(value, bool):
        return "on" if value else "off"
    text = str(value)
    if "@" in text and ":" in text:
        text = text.split("@")[0].partition(":")[2]
    # a label must survive notebook 04's "ours: paper" pairs
    return re.sub(r"[,:]", " ", text).strip()


def parse_axis(text: str) -> tuple[str, list[Any]]:
    """``"alpha=0.1,0.3"`` or ``"alpha=[0.1, 0.3]"`` -> ``("alpha", [0.1, 0.3])`` (read as YAML).

    >>> parse_axis("alpha=0.1,0.3"), parse_axis("feedback=[true, false]"), parse_axis("seed=3")
    (('alpha', [0.1, 0.3]), ('feedback', [True, False]), ('seed', [3]))
    """
    import yaml

    name, sep, raw = text.partition("=")
    if not sep or not name.strip() or not raw.strip():
        raise ValueError(f"--grid {text!r}: write <param>=<value>,<value>,... or <param>=[...]")
    value = yaml.safe_load(raw)
    if not isinstance(value, list):
        value = [yaml.safe_load(v) for v in raw.split(",")] if "," in raw else [value]
    return name.strip(), value


def load_recipe(
    profile: str | None, configs: Sequence[str | Path] = (), grid: Sequence[str] = ()
) -> dict[str, Any]:
    """The pipeline recipe of ``profile`` with ``configs/sweep_<profile>.yaml`` and ``configs``
    merged on top, then the ``--grid`` axes; returns a pipeline recipe with ``grid``, ``synth_run``
    and ``sft_run`` added."""
    import yaml

    recipe = pl.load_recipe(profile)
    recipe.update(profile=f"sweep-{profile}" if profile else "sweep", grid={}, synth_run=None,
                  sft_run=None, studies=True)
    paths = [pl.CONFIGS_DIR / f"sweep_{profile}.yaml"] if profile else []
    paths += [Path(p) for p in configs]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(
                f"sweep recipe {path} does not exist (profiles: smoke, full; or give a YAML path)")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a sweep recipe is a mapping")  # noqa: TRY004
        unknown = sorted(set(data) - set(RECIPE_KEYS))
        if unknown:
            raise ValueError(f"{path}: unknown sweep recipe key(s) {', '.join(unknown)};"
                             f" use {', '.join(RECIPE_KEYS)}")
        for key, params in (data.get("stages") or {}).items():
            if not isinstance(params, dict):
                raise ValueError(f"{path}: stages.{key} must map names to values")  # noqa: TRY004
            recipe["stages"].setdefault(str(key), {}).update(params)
        for name, values in (data.get("grid") or {}).items():
            if not isinstance(values, list) or not values:
                raise ValueError(f"{path}: grid.{name} must be a non-empty list of values")
            recipe["grid"][str(name)] = values
        for key in ("offline", "synth_run", "sft_run", "studies"):
            if key in data:
                recipe[key] = bool(data[key]) if key in ("offline", "studies") else data[key]
        recipe["recipe_files"].append(str(path))
    for text in grid:
        name, values = parse_axis(text)
        recipe["grid"][name] = values
    return recipe


def plan_cells(grid: dict[str, list[Any]], settings: dict[str, Any]) -> list[Cell]:
    """The cells of a grid in order (the product, first axis slowest), with run ids and labels.

    ``settings`` are notebook 03's effective values outside the grid (for the aggregator's name).

    >>> cells = plan_cells({"alpha": [0.1, 0.5], "seed": [0, 1]}, {"aggregator": "tcsr"})
    >>> [c.label for c in cells][1:3]
    ['GRPO-tcsr alpha 0.1 seed 1', 'GRPO-tcsr alpha 0.5 seed 0']
    >>> plan_cells({"aggregator": ["tcsr", "mean"]}, {})[1].run_id
    'cell-aggregator_mean'
    """
    names = list(grid)
    cells, seen = [], {}
    for combo in itertools.product(*(grid[n] for n in names)):
        values = dict(zip(names, combo, strict=True))
        run_id = "-".join(["cell", *(f"{n}_{_slug(v)}" for n, v in values.items())])
        key = "03_" + re.sub(r"[^0-9A-Za-z]", "_", run_id)
        if key in seen:
            raise ValueError(f"grid values {seen[key]} and {values} give one cell name {run_id!r}")
        seen[key] = values
        aggregator = values.get("aggregator", settings.get("aggregator", "tcsr"))
        arm = " ".join([f"GRPO-{aggregator}"] + [f"{n} {short(v)}" for n, v in values.items()
                                                   if n not in ("aggregator", "seed")])
        label = f"{arm} seed {values['seed']}" if "seed" in values else arm
        cells.append(Cell(values=values, run_id=run_id, key=key, arm=arm, label=label))
    return cells


def paper_match(values: dict[str, Any], settings: dict[str, Any]) -> str | None:
    """The paper's 3B row a cell's arm stands beside (method.md 4 and 7), or None.

    >>> paper = {"alpha": 0.3, "feedback": True}
    >>> [paper_match({"aggregator": a}, paper) for a in ("tcsr", "mean", "min")]
    ['3B SaFeR-Steer', 'without TCSR (mean)', None]
    """
    eff = {**settings, **values}
    if eff.get("aggregator") == "mean" and eff.get("feedback", True):
        return "without TCSR (mean)"
    static = eff.get("feedback") is False and eff.get("alpha") == PAPER_SETTING["alpha"]
    if eff.get("aggregator") == "tcsr" and static:
        return "without feedback dynamics (static turns)"
    if all(eff.get(k) == v for k, v in PAPER_SETTING.items()):
        return "3B SaFeR-Steer"
    return None


@dataclass
class Sweep:
    """A sweep folder ``<runs_root>/<run_id>``: the pipeline of its stages and ``sweep.json``."""

    recipe: dict[str, Any]
    run_id: str
    runs_root: Path = DEFAULT_RUNS_ROOT
    notebooks_dir: Path = NOTEBOOKS_DIR
    sets: Sequence[str] = ()
    log_output: bool = False

    @property
    def path(self) -> Path:
        return Path(self.runs_root) / self.run_id

    def settings(self) -> dict[str, Any]:
        """Notebook 03's values outside the grid: its defaults, the recipe's, the ``--set`` ones."""
        source = notebook_path("03", self.notebooks_dir)
        probe = pl.Pipeline(self.recipe, self.run_id, self.runs_root, self.notebooks_dir,
                            stages=(pl.Stage("03", "03", "probe"),), sets=self.sets)
        return {**notebook_parameters(source), **probe.parameters(probe.stages[0])}

    def cells(self) -> list[Cell]:
        grid = self.recipe["grid"]
        if not grid:
            raise ValueError("the sweep has no grid: give one in the recipe (grid:) or with"
                             " --grid PARAM=V1,V2")
        declared = notebook_parameters(notebook_path("03", self.notebooks_dir))
        for name in grid:
            if name in WIRING or name not in declared:
                raise ValueError(f"grid axis {name!r}: not a notebook-03 parameter a sweep can vary"
                                 f" ({', '.join(sorted(set(declared) - set(WIRING)))})")
        for text in self.sets:
            scope, name, _ = pl.parse_assignment(text)
            if name in (*grid, "compare_aggregator") and (scope is None or scope.startswith("03")):
                raise ValueError(f"--set {text!r}: the sweep sets {name} (grid axis or wiring);"
                                 " change the grid instead (--grid)")
        return plan_cells(grid, self.settings())

    def stages(self, cells: Sequence[Cell]) -> tuple[pl.Stage, ...]:
        """01 and 02 (unless the recipe names existing runs), 03 per cell, 04 over all, then 05."""
        synth, sft = self.recipe.get("synth_run"), self.recipe.get("sft_run")
        stages = []
        if synth is None:
            stages.append(pl.Stage("01", "01", "synth"))
            synth = "{01}"
        if sft is None:
            stages.append(pl.Stage("02", "02", "sft", inputs={"synth_run": synth}))
            sft = "{02}"
        for c in cells:
            inputs = {"synth_run": synth, "sft_run": sft}
            stages.append(pl.Stage(c.key, "03", c.run_id, inputs=inputs))
        settings = self.settings()
        labels = ["base", *(["SFT"] if sft else []), *(c.label for c in cells)]
        pairs = ["base: 3B base", *(["SFT: 3B SFT"] if sft else [])]
        pairs += [f"{c.label}: {m}" for c in cells if (m := paper_match(c.values, settings))]
        models = [*([sft] if sft else []), *(f"{{{c.key}}}" for c in cells)]
        stages.append(pl.Stage("04", "04", "eval", inputs={
            "synth_run": synth, "model_runs": models, "labels": labels,
            "paper_match": ", ".join(pairs)}))
        if self.recipe.get("studies", True):
            inputs = {"sweep_dir": str(self.path.resolve())}
            stages.append(pl.Stage("05", "05", "studies", inputs=inputs))
        return tuple(stages)

    def pipeline(self, cells: Sequence[Cell]) -> pl.Pipeline:
        recipe = {**self.recipe, "stages": {k: dict(v) for k, v in self.recipe["stages"].items()}}
        for c in cells:  # the cell's values at its own stage's level; one aggregator per cell
            recipe["stages"][c.key] = {**c.values, "compare_aggregator": ""}
        return pl.Pipeline(recipe, self.run_id, runs_root=self.runs_root,
                           notebooks_dir=self.notebooks_dir, stages=self.stages(cells),
                           sets=self.sets, log_output=self.log_output)

    def plan(self) -> list[dict[str, Any]]:
        """One row per cell: label, GRPO run id and the grid values (what ``--plan`` prints)."""
        return [{"cell": c.run_id, "label": c.label, **c.values} for c in self.cells()]

    def run(self) -> dict[str, Any]:
        """Run (or resume) every stage; returns ``sweep.json``'s content."""
        cells = self.cells()
        pipe = self.pipeline(cells)
        pipe.check(pipe.stages)
        path = self.path / SWEEP_MANIFEST
        old = json.loads(path.read_text()) if path.is_file() else None
        if old is not None:
            before = {c["cell"]: c["values"] for c in old["cells"]}
            now = {c.run_id: json.loads(json.dumps(c.values)) for c in cells}
            if before != now or old.get("grid") != self.recipe["grid"]:
                raise ValueError(f"{path}: sweep {self.run_id!r} was started with another grid"
                                 f" ({old.get('grid')}); start a new sweep (another --run-id)")
        manifest = old or {
            "sweep_run": self.run_id, "profile": self.recipe.get("profile"),
            "recipe_files": self.recipe.get("recipe_files", []), "grid": self.recipe["grid"],
            "sets": list(self.sets), "created_at": _dt.datetime.now(_dt.UTC).isoformat(),
            "git": git_revision(), "settings": self.settings(),
            "cells": [asdict(c) | {"cell": c.run_id} for c in cells],
        }
        manifest["status"] = "running"
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, manifest)
        try:
            pipe.run()
        finally:
            manifest = load(self.path)
            atomic_write_json(path, manifest)
        return manifest


def _finished(run_dir: str | None) -> bool:
    manifest = Path(run_dir or "") / MANIFEST_FILE
    if not run_dir or not manifest.is_file():
        return False
    return json.loads(manifest.read_text()).get("status") == "finished"


def load(sweep_dir: str | Path) -> dict[str, Any]:
    """``sweep.json`` with each cell's status and run directories read from its pipeline.json
    (so it is current even after a kill): ``grpo_run``, ``evaluation`` (its folder in the 04 run),
    and the shared ``synth_run``, ``sft_run``, ``eval_run``, ``studies_run``."""
    folder = Path(sweep_dir)
    path = folder / SWEEP_MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder}: no {SWEEP_MANIFEST}; give the folder `steerkit sweep` ran into")
    manifest = json.loads(path.read_text())
    pipe = folder / PIPELINE_MANIFEST
    stages = json.loads(pipe.read_text()).get("stages", {}) if pipe.is_file() else {}
    run_dir = {k: v.get("run_dir") for k, v in stages.items() if _finished(v.get("run_dir"))}
    shared = {"synth_run": run_dir.get("01"), "sft_run": run_dir.get("02"),
              "eval_run": run_dir.get("04"), "studies_run": run_dir.get("05")}
    if "02" not in stages:  # an existing 02 run, or none: what the cells were handed
        first = stages.get(manifest["cells"][0]["key"], {})
        shared["sft_run"] = (first.get("inputs") or {}).get("sft_run") or None
    manifest.update(shared)
    for cell in manifest["cells"]:
        cell["grpo_run"] = run_dir.get(cell["key"])
        status = (stages.get(cell["key"]) or {}).get("status", "pending")
        cell["status"] = "finished" if cell["grpo_run"] else status
        evaluation = Path(shared["eval_run"] or "") / cell["run_id"]
        cell["evaluation"] = str(evaluation) if shared["eval_run"] and evaluation.is_dir() else None
    finished = [s for s in stages.values() if s.get("status") == "finished"]
    failed = any(s.get("status") == "failed" for s in stages.values())
    done = stages and len(finished) == len(stages) and shared["eval_run"]
    manifest["status"] = "finished" if done else "failed" if failed else "running"
    return manifest


def evaluations(sweep_dir: str | Path) -> list[Any]:
    """The sweep's evaluations (`steerkit.frames.Evaluation`) labelled as the sweep names them:
    SFT, then every cell's label."""
    from steerkit import frames

    manifest = load(sweep_dir)
    if not manifest["eval_run"]:
        raise FileNotFoundError(f"{sweep_dir}: stage 04 has not finished; resume the sweep first")
    labels = {"base": "base", **{c["run_id"]: c["label"] for c in manifest["cells"]}}
    if manifest["sft_run"]:
        labels[Path(manifest["sft_run"]).name] = "SFT"
    evals = frames.evaluations(manifest["eval_run"])
    for e in evals:
        e.label = labels.get(e.run_id.split("/", 1)[-1], e.label)
    return evals


def cells_df(sweep_dir: str | Path) -> Any:
    """One row per evaluated label: label, arm, cell run id, the paper's row it stands beside
    (``paper``, None when it has none) and the grid values (NaN for base and SFT)."""
    import pandas as pd

    manifest = load(sweep_dir)
    rows = [{"label": "base", "arm": "base", "paper": "3B base"}]
    rows += [{"label": "SFT", "arm": "SFT", "paper": "3B SFT"}] if manifest["sft_run"] else []
    rows += [{"label": c["label"], "arm": c["arm"], "cell": c["run_id"],
              "paper": paper_match(c["values"], manifest["settings"]), **c["values"]}
             for c in manifest["cells"]]
    return pd.DataFrame(rows)


def tiny_sweep(runs_root: str | Path | None = None, *, grid: str = "{alpha: [0.1, 0.5]}",
               run_id: str = "tiny-sweep", notebooks_dir: Path = NOTEBOOKS_DIR) -> Path:
    """A sweep small enough for notebook 05's defaults (a few minutes on two cores), into
    ``<runs_root>/<run_id>``; a finished one is returned as it is.

    The student is the tiny Qwen2.5-VL built in code (random weights: its rates mean nothing); no
    SFT (GRPO starts from the base student), 01 synthesizes a handful of text-only rules scripts
    for the RL set and the bench, each cell takes one GRPO step of 2 x 2 two-turn rollouts with the
    rules tutor, and 04 replays the bench with the rules judge. ``grid`` is a YAML mapping of axes.
    """
    from steerkit.tiny_vlm import build_tiny_vlm

    root = Path(runs_root) if runs_root else DEFAULT_RUNS_ROOT
    student = root / run_id / "tiny_vlm"
    if not (student / "config.json").is_file():
        build_tiny_vlm(student)
    import yaml

    recipe = load_recipe(None)
    axes = yaml.safe_load(grid)
    if not isinstance(axes, dict) or not all(isinstance(v, list) and v for v in axes.values()):
        raise ValueError(f"tiny sweep grid {grid!r}: a YAML mapping of lists, as {{alpha: [0.1]}}")
    recipe.update(offline=True, sft_run="", studies=False, grid=axes)
    recipe["stages"] = {
        "01": {"n_benign": 6, "n_obfuscated": 6, "n_redteam": 0, "image_share": 0.0,
               "bench_share": 0.34},
        "03": {"student": str(student), "n_prompts": 2, "prompts_per_step": 2, "num_generations": 2,
               "max_steps": 1, "max_turns": 2, "max_new_tokens": 8},
        "04": {"student": f"hf:{student}", "max_turns": 2, "max_tokens": 8, "n_resamples": 200,
               "figure_png": False},
    }
    Sweep(recipe, run_id, runs_root=root, notebooks_dir=notebooks_dir).run()
    return root / run_id


def command(args: Any, profile: str | None) -> int:
    """``steerkit sweep``: plan, run or resume a sweep; prints one line per stage (or per cell with
    ``--plan``). Returns the exit status."""
    import logging

    from steerkit.notebooks import StageError

    log = logging.getLogger("steerkit")
    try:
        recipe = load_recipe(profile, args.config, args.grid)
        run_id = args.run_id
        if args.resume and run_id is None:
            run_id = pl.latest_unfinished(args.runs_root, recipe["profile"])
            if run_id is None:
                raise ValueError(
                    f"no unfinished {recipe['profile']} sweep under {args.runs_root} to resume")
        run_id = run_id or pl.new_pipeline_id(recipe["profile"])
        sweep = Sweep(recipe, run_id, runs_root=args.runs_root, notebooks_dir=args.notebooks_dir,
                      sets=args.sets, log_output=args.verbose)
        if args.plan:
            for row in sweep.plan():
                print("  ".join(f"{k}={v}" for k, v in row.items()))
            return 0
        log.info("sweep %s (resume it with: %s)", sweep.path, pl.resume_command("sweep", args, run_id))
        sweep.run()
    except (StageError, ValueError, RuntimeError, FileNotFoundError, KeyError) as e:
        log.error("%s", e)
        return 1
    print("\n".join(pl.summary_lines(json.loads((sweep.path / PIPELINE_MANIFEST).read_text()))))
    print(f"sweep manifest: {sweep.path / SWEEP_MANIFEST}")
    return 0
