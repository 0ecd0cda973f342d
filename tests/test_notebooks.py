"""The numbered notebooks: committed clean, and run headlessly through papermill with smoke parameters.

nbval runs the source notebooks with their own defaults (``make test`` passes ``notebooks`` and
``--nbval-lax``); this file checks what nbval cannot see: the parameter plumbing between stages.
The whole smoke pipeline runs once into tmp_path (`steerkit.pipeline` with the ``smoke`` recipe at
smaller sizes, so the demo's recipe and its parameter names are exercised too), then each stage's run
directory is checked against the contract of papermill_runs/README.md: manifest fields, data files that
parse back into schema records, the executed notebook kept, figures with their sidecars.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import nbformat
import pytest

from steerkit import pipeline as pl
from steerkit.runs import REPO_ROOT

NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
MANIFEST_FIELDS = (
    "stage", "run_id", "created_at", "status", "finished_at", "parameters", "roles", "prompts", "seeds",
    "inputs", "git", "packages", "python", "platform", "summary",
)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_source_notebook_is_committed_clean(path: Path) -> None:
    """Outputs stripped, cell 1 markdown with a title, cell 2 the parameters cell of primitives, no
    def or class anywhere (the library holds the logic)."""
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code), "commit with outputs stripped"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.lstrip().startswith("# ")
    params = nb.cells[1]
    assert params.cell_type == "code" and "parameters" in params.metadata.get("tags", [])
    for node in ast.parse(params.source).body:
        assert isinstance(node, ast.Assign), f"parameters cell: only assignments ({ast.unparse(node)})"
        ast.literal_eval(node.value)  # primitives only: papermill can inject nothing else
    for cell in code:
        tree = ast.parse("\n".join(l for l in cell.source.splitlines() if not l.lstrip().startswith(("%", "!"))))
        defs = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)]
        assert not defs, f"{path.name}: define {[d.name for d in defs]} in steerkit, not in the notebook"


#: Each stage notebook's config object, and the notebook's parameters that are not its fields: where the
#: run lives, what it reads from earlier stages, what the notebook itself shows.
STAGE_CONFIGS = {
    "01_synthesize_steer": ("steerkit.synth.synthesize", "SynthParams", {
        "runs_root", "run_id", "generator", "target", "red_user", "blue_expert", "evaluator", "figure_png",
        "show_dialogues"}),
    "02_sft_bootstrap": ("steerkit.sft", "SFTRecipe", {
        "recipe_file", "synth_run", "n_prompts", "max_new_tokens", "figure_png"}),
    "03_grpo_tutor_tcsr": ("steerkit.grpo_config", "GRPORunConfig", {
        "synth_run", "sft_run", "compare_aggregator", "figure_png", "show_trajectories"}),
    "04_steer_bench_analysis": ("steerkit.evaluation_run", "EvaluationParameters", {"figures_dir", "figure_png"}),
}


@pytest.mark.parametrize("stem", sorted(STAGE_CONFIGS))
def test_every_parameter_reaches_the_stage_config_by_its_name(stem: str) -> None:
    """The notebooks hand their parameters to the package once (``X.from_parameters(globals())``), which
    takes the names that are fields and ignores the rest: a parameter renamed on one side only would be
    dropped without a word. So every parameter is a field or one of the notebook's own, and no own
    name shadows a field."""
    import dataclasses
    import importlib

    import papermill

    module, name, own = STAGE_CONFIGS[stem]
    fields = {f.name for f in dataclasses.fields(getattr(importlib.import_module(module), name))}
    params = set(papermill.inspect_notebook(str(REPO_ROOT / "notebooks" / f"{stem}.ipynb")))
    assert params - fields == own, f"{stem}: parameters that are not {name} fields: {sorted(params - fields)}"
    assert not own & fields


def test_notebook_04_defaults_are_the_evaluation_defaults() -> None:
    """Notebook 04's defaults and `EvaluationParameters`' are one set of values (every field is a parameter)."""
    import dataclasses

    import papermill

    from steerkit.evaluation_run import EvaluationParameters

    declared = papermill.inspect_notebook(str(REPO_ROOT / "notebooks" / "04_steer_bench_analysis.ipynb"))
    for f in dataclasses.fields(EvaluationParameters):
        assert ast.literal_eval(declared[f.name]["default"]) == f.default, f.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_papermill_reads_every_parameter_of_the_parameters_cell(path: Path) -> None:
    """papermill's own reading of the cell (what `papermill --help-notebook` shows and what it checks
    ``-p`` names against) finds every assigned name: its line parser gives up on a line whose value
    or comment it cannot split, e.g. one with "=" in the comment."""
    import papermill

    assigned = {t.id for node in ast.parse(nbformat.read(path, as_version=4).cells[1].source).body
                for t in node.targets}
    assert set(papermill.inspect_notebook(str(path))) == assigned


def test_every_pipeline_stage_has_its_notebook() -> None:
    names = {p.name[:2] for p in NOTEBOOKS}
    assert {s.notebook for s in pl.STAGES} <= names, f"notebooks present: {sorted(p.name for p in NOTEBOOKS)}"


# ---- the smoke pipeline through papermill -------------------------------------------------------

EVALUATED = {"base", "SFT", "GRPO-tcsr", "GRPO-mean"}  # notebook 04's rows: base, +SFT, +SFT+GRPO (TCSR, mean)


# The demo's recipe at smaller sizes: these tests check what each stage writes and reads, not what the
# training achieves (`make demo` runs the recipe's own sizes; the README reports what they produced).
SMALLER = ["01.n_benign=12", "01.n_obfuscated=12", "02.max_steps=12", "03.n_prompts=4", "03.num_generations=2",
           "03.max_steps=2", "03.max_new_tokens=16", "04.max_turns=3", "04.max_tokens=48"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The demo's recipe, at smaller sizes, run once through papermill into tmp_path (figures too)."""
    runs = tmp_path_factory.mktemp("papermill_runs")
    figures = tmp_path_factory.mktemp("figures")
    pipe = pl.Pipeline(pl.load_recipe("smoke"), "smoke", runs_root=runs, sets=[*SMALLER, f"04.figures_dir={figures}"])
    manifest = pipe.run()
    runs = {k: Path(v["run_dir"]) for k, v in manifest["stages"].items()}
    return {"manifest": manifest, "figures": figures, "run": runs}


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def assert_figure(folder: Path, name: str, *, png: bool = False) -> dict[str, Any]:
    """A figure's HTML (and PNG) exist beside a sidecar naming its sources and the git commit."""
    assert (folder / f"{name}.html").is_file(), sorted(p.name for p in folder.iterdir())
    if png:
        assert (folder / f"{name}.png").stat().st_size > 1000
    sidecar = read_json(folder / f"{name}.json")
    assert sidecar["figure"] == name and sidecar["sources"] and "commit" in sidecar["git"]
    return sidecar


@pytest.mark.slow
def test_every_stage_ran_and_kept_its_executed_notebook(smoke: dict[str, Any]) -> None:
    manifest = smoke["manifest"]
    assert manifest["status"] == "finished" and list(manifest["stages"]) == [s.key for s in pl.STAGES]
    for key, record in manifest["stages"].items():
        executed = nbformat.read(record["executed_notebook"], as_version=4)
        injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
        assert len(injected) == 1, key
        for value in record["inputs"].values():  # each input run dir was handed to the notebook
            for path in value if isinstance(value, list) else [value]:
                assert repr(path) in injected[0].source or json.dumps(path) in injected[0].source, (key, path)
        errors = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
        assert not errors, (key, errors)
        assert Path(record["executed_notebook"]).parent == Path(record["run_dir"]).parent


@pytest.mark.slow
@pytest.mark.parametrize("key", [s.key for s in pl.STAGES])
def test_run_manifest_contract(smoke: dict[str, Any], key: str) -> None:
    manifest = read_json(smoke["run"][key] / "manifest.json")
    missing = [f for f in MANIFEST_FIELDS if f not in manifest]
    assert not missing, f"{key}: manifest lacks {missing}"
    stage = pl.STAGES[[s.key for s in pl.STAGES].index(key)]
    assert manifest["status"] == "finished" and manifest["run_id"] == stage.run_id
    assert manifest["git"]["commit"] and manifest["packages"]["torch"]


@pytest.mark.slow
def test_01_splits_parse_back_into_records(smoke: dict[str, Any]) -> None:
    from steerkit.schema import BenchItem, Dialogue, Script, load_jsonl

    run = smoke["run"]["01"]
    sft = load_jsonl(Dialogue, run / "steer_sft.jsonl")
    load_jsonl(Dialogue, run / "steer_rl.jsonl")
    bench = load_jsonl(BenchItem, run / "steer_bench.jsonl")
    scripts = load_jsonl(Script, run / "scripts.jsonl", check_images=False)
    assert sft and bench and scripts
    assert_figure(run / "figures", "turn_lengths")


@pytest.mark.slow
def test_02_and_03_leave_loadable_checkpoints(smoke: dict[str, Any]) -> None:
    for key in ("02", "03_tcsr", "03_mean"):
        run = smoke["run"][key]
        assert (run / "checkpoint" / "config.json").is_file(), key
        assert [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines() if line.strip()], key
    assert_figure(smoke["run"]["02"] / "figures", "sft_loss")
    for key, aggregator in (("03_tcsr", "tcsr"), ("03_mean", "mean")):
        run = smoke["run"][key]
        assert read_json(run / "manifest.json")["parameters"]["aggregator"] == aggregator
        # GRPO started from the SFT checkpoint of stage 02, not from the base student
        assert str(smoke["run"]["02"]) in json.dumps(read_json(run / "manifest.json")["parameters"])
        assert_figure(run / "figures", "reward_curves")


@pytest.mark.slow
def test_04_compares_the_four_models_and_writes_the_figures(smoke: dict[str, Any]) -> None:
    from steerkit import frames
    from steerkit.schema import Dialogue, load_jsonl

    evals = frames.evaluations(smoke["run"]["04"])
    assert {e.label for e in evals} == EVALUATED
    for e in evals:
        dialogues = load_jsonl(Dialogue, e.path / "dialogues.jsonl", check_images=False)
        assert dialogues and all(d.verdicts for d in dialogues), e.label
    metrics = read_json(smoke["run"]["04"] / "metrics.json")
    assert {row["label"] for row in metrics["table"]} == EVALUATED
    for name in ("steer_table", "survival"):
        sidecar = assert_figure(smoke["figures"], name, png=True)
        assert len(sidecar["sources"]) == len(EVALUATED)
