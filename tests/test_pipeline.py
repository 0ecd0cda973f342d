"""The pipeline's wiring and resume logic, on fast stand-in notebooks written into tmp_path.

The stand-ins declare the same wiring parameters as the real notebooks (``runs_root``, ``run_id``
and the run directories they read), open a real run with `steerkit.runs.open_run`, check that every
run directory they are handed is finished, count their executions, and can be held (waiting on a
file) or made to fail, so that a pipeline can be killed inside stage 03 and resumed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from steerkit import pipeline as pl
from steerkit.notebooks import StageError, execute, notebook_path
from steerkit.runs import REPO_ROOT

#: The run-directory parameters each stand-in reads (as the pipeline's STAGES wire them).
INPUTS = {
    "01": [],
    "02": ["synth_run"],
    "03": ["synth_run", "sft_run"],
    "04": ["synth_run", "model_runs"],
}

BODY = '''\
import json, os, pathlib, time
from steerkit.runs import open_run
handed = [v for k, v in sorted(globals().items()) if k in {inputs!r}]
handed = [p for v in handed for p in (v if isinstance(v, list) else [v])]
for p in handed:
    assert json.loads((pathlib.Path(p) / "manifest.json").read_text())["status"] == "finished", p
run = open_run("{stem}", run_id=run_id, root=runs_root, parameters={{"aggregator": aggregator, "handed": handed}})
with open(run.file("executions.log"), "a") as f:
    f.write(f"{{os.getpid()}}\\n")
while hold_file and pathlib.Path(hold_file).exists():
    time.sleep(0.1)
assert not fail, "asked to fail"
run.finish(handed=handed)
'''


def write_stand_in(folder: Path, number: str) -> Path:
    stem = f"{number}_stand_in"
    params = ["runs_root = None  # str: pipeline folder", "run_id = None  # str: run directory name"]
    params += [f"{name} = None  # run dir(s) read" for name in INPUTS[number]]
    params += ['aggregator = "none"  # str', 'hold_file = ""  # str: wait while it exists', "fail = False  # bool"]
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell(f"# Stand-in for stage {number}"),
        nbformat.v4.new_code_cell("\n".join(params), metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(BODY.format(inputs=INPUTS[number], stem=stem)),
    ]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = folder / f"{stem}.ipynb"
    nbformat.write(nb, path)
    return path


@pytest.fixture
def stand_ins(tmp_path: Path) -> Path:
    folder = tmp_path / "notebooks"
    folder.mkdir()
    for number in INPUTS:
        write_stand_in(folder, number)
    return folder


def recipe(tmp_path: Path, **stage_params: dict) -> Path:
    import yaml

    stages = {"03_tcsr": {"aggregator": "tcsr"}, "03_mean": {"aggregator": "mean"}, **stage_params}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"offline": True, "stages": stages}))
    return path


def executions(run_dir: Path) -> int:
    return len((run_dir / "executions.log").read_text().split())


@pytest.mark.parametrize("argv", [
    ["sweep", "--profile", "smoke", "--config", "my recipes/a.yaml", "--set", "03.alpha=0.5", "--grid", "seed=0,1"],
    ["run", "--profile", "full", "--config", "b.yaml", "--set", "endpoints.grader=openai:m@http://h:8001/v1",
     "--stages", "03_tcsr,04", "--runs-root", "/data/runs"],
])
def test_the_resume_hint_repeats_everything_the_run_was_started_with(argv: list[str]) -> None:
    """A resume with another recipe or --set is refused, so the logged hint must parse back to the
    same arguments, run id added."""
    import shlex

    from steerkit.cli import build_parser

    args = build_parser().parse_args(argv)
    again = build_parser().parse_args(shlex.split(pl.resume_command(argv[0], args, "ID"))[1:])
    assert vars(again) == {**vars(args), "run_id": "ID"}


def test_stage_key_names_one_notebook(stand_ins: Path) -> None:
    assert notebook_path("03", stand_ins).name == "03_stand_in.ipynb"
    with pytest.raises(FileNotFoundError, match="numbered notebooks there: 01_stand_in"):
        notebook_path("07", stand_ins)


def test_execute_keeps_the_executed_notebook_beside_the_run(stand_ins: Path, tmp_path: Path) -> None:
    done = execute("01", {"aggregator": "x"}, runs_root=tmp_path / "p", run_id="synth", notebooks_dir=stand_ins)
    assert done.run_dir == (tmp_path / "p" / "01_stand_in" / "synth").resolve()
    assert done.executed_notebook == done.run_dir.parent / "synth.ipynb"
    executed = nbformat.read(done.executed_notebook, as_version=4)
    injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and "run_id = \"synth\"" in injected[0].source
    assert json.loads((done.run_dir / "manifest.json").read_text())["status"] == "finished"


def test_unknown_parameter_is_refused_before_running(stand_ins: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) alpah; the notebook declares"):
        execute("01", {"alpah": 0.3}, runs_root=tmp_path / "p", run_id="synth", notebooks_dir=stand_ins)
    assert not (tmp_path / "p").exists()


def test_failing_cell_names_the_executed_notebook(stand_ins: Path, tmp_path: Path) -> None:
    with pytest.raises(StageError, match=r"AssertionError: asked to fail; the executed notebook .*synth\.ipynb"):
        execute("01", {"fail": True}, runs_root=tmp_path / "p", run_id="synth", notebooks_dir=stand_ins)


@pytest.mark.slow
def test_pipeline_wires_run_dirs_and_skips_finished_stages(stand_ins: Path, tmp_path: Path) -> None:
    pipe = pl.Pipeline(pl.load_recipe(None, [recipe(tmp_path)]), "p1", runs_root=tmp_path / "runs",
                       notebooks_dir=stand_ins)
    manifest = pipe.run()
    assert manifest["status"] == "finished"
    stages = manifest["stages"]
    assert list(stages) == ["01", "02", "03_tcsr", "03_mean", "04"]
    run = {k: Path(v["run_dir"]) for k, v in stages.items()}
    # Each stage got the run dirs of the stages before it, and each 03 run its own aggregator.
    assert json.loads((run["02"] / "manifest.json").read_text())["summary"]["handed"] == [str(run["01"])]
    eval_manifest = json.loads((run["04"] / "manifest.json").read_text())
    assert eval_manifest["summary"]["handed"] == [str(run[k]) for k in ("02", "03_tcsr", "03_mean", "01")]
    assert json.loads((run["03_mean"] / "manifest.json").read_text())["parameters"]["aggregator"] == "mean"
    assert all(Path(v["executed_notebook"]).exists() for v in stages.values())
    assert all(v["kernel_cpu_seconds"] > 0 for v in stages.values())  # the kernel's CPU time is counted
    assert (tmp_path / "runs" / "p1" / "pipeline.json").exists()
    # Started again: nothing reruns.
    again = pl.Pipeline(pl.load_recipe(None, [recipe(tmp_path)]), "p1", runs_root=tmp_path / "runs",
                        notebooks_dir=stand_ins).run()
    assert again["status"] == "finished" and len(again["resumed_at"]) == 1
    assert all(executions(p) == 1 for p in run.values())
    # Another value for a finished stage is an error, not a silent mix of two recipes.
    changed = pl.Pipeline(pl.load_recipe(None, [recipe(tmp_path)]), "p1", runs_root=tmp_path / "runs",
                          notebooks_dir=stand_ins, sets=["03_mean.aggregator=min"])
    with pytest.raises(ValueError, match="stage 03_mean was started with other parameters \\(aggregator\\)"):
        changed.run()


def test_selected_stage_needs_its_inputs_finished(stand_ins: Path, tmp_path: Path) -> None:
    pipe = pl.Pipeline(pl.load_recipe(None, [recipe(tmp_path)]), "p2", runs_root=tmp_path / "runs",
                       notebooks_dir=stand_ins)
    with pytest.raises(RuntimeError, match="stage 02 reads stage 01's run, which has not finished"):
        pipe.run(["02"])


def test_recipe_and_set_precedence(stand_ins: Path, tmp_path: Path) -> None:
    pipe = pl.Pipeline(
        pl.load_recipe(None, [recipe(tmp_path, **{"03": {"hold_file": "a", "aggregator": "x"}})]), "p3",
        runs_root=tmp_path / "runs", notebooks_dir=stand_ins, sets=["03.fail=true", "03_mean.hold_file=b"],
    )
    assert pipe.parameters(pipe.stage("03_tcsr")) == {"hold_file": "a", "aggregator": "tcsr", "fail": True}
    assert pipe.parameters(pipe.stage("03_mean")) == {"hold_file": "b", "aggregator": "mean", "fail": True}
    with pytest.raises(ValueError, match="no stage '05'"):
        pl.Pipeline(pipe.recipe, "p3", runs_root=tmp_path / "runs", notebooks_dir=stand_ins,
                    sets=["05.x=1"]).check(pipe.stages)
    with pytest.raises(ValueError, match="unknown parameter"):
        pl.Pipeline(pl.load_recipe(None, [recipe(tmp_path, **{"02": {"alpha": 1}})]), "p3",
                    runs_root=tmp_path / "runs", notebooks_dir=stand_ins).check(pipe.stages)


def test_profiles_parse_and_name_only_declared_parameters() -> None:
    """The shipped recipes load, and each names only parameters its notebook declares."""
    for profile in ("smoke", "full"):
        recipe_ = pl.load_recipe(profile)
        assert recipe_["offline"] is (profile == "smoke")
        pl.Pipeline(recipe_, "check").check(pl.STAGES)


@pytest.mark.slow
def test_killed_during_03_resumes_without_rerunning_01_and_02(stand_ins: Path, tmp_path: Path) -> None:
    hold = tmp_path / "hold"
    hold.touch()
    runs = tmp_path / "runs"
    command = [
        sys.executable, "-m", "steerkit.cli", "run", "--profile", "none",
        "--config", str(recipe(tmp_path, **{"03": {"hold_file": str(hold)}})),
        "--notebooks-dir", str(stand_ins), "--runs-root", str(runs), "--run-id", "killed",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    first = subprocess.Popen(command, cwd=tmp_path, env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    held = runs / "killed" / "03_stand_in" / "grpo-tcsr" / "executions.log"
    deadline = time.monotonic() + 120
    while not held.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert held.exists(), first.stderr.read().decode() if first.poll() is not None else "stage 03 never started"
    kernel_pid = int(held.read_text().split()[0])
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    try:  # the kernel runs in its own session; stop it too, so it cannot finish stage 03 behind our back
        os.kill(kernel_pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    interrupted = json.loads((runs / "killed" / "pipeline.json").read_text())
    assert interrupted["status"] == "running" and interrupted["stages"]["03_tcsr"]["status"] == "running"
    first_01 = Path(interrupted["stages"]["01"]["executed_notebook"]).stat().st_mtime_ns

    hold.unlink()
    second = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert second.returncode == 0, second.stderr
    manifest = json.loads((runs / "killed" / "pipeline.json").read_text())
    assert manifest["status"] == "finished"
    run = {k: Path(v["run_dir"]) for k, v in manifest["stages"].items()}
    assert executions(run["01"]) == executions(run["02"]) == 1  # not rerun
    assert Path(manifest["stages"]["01"]["executed_notebook"]).stat().st_mtime_ns == first_01
    assert executions(run["03_tcsr"]) == 2  # rerun under the same run id ...
    assert len(json.loads((run["03_tcsr"] / "manifest.json").read_text())["resumed_at"]) == 1  # ... which resumed
    assert manifest["stages"]["03_tcsr"]["attempts"] == 2
    assert executions(run["03_mean"]) == executions(run["04"]) == 1
    assert "stage 01 already finished" in second.stderr


def test_stage_command_runs_one_notebook_with_inputs_from_set(stand_ins: Path, tmp_path: Path) -> None:
    from steerkit.cli import main

    base = ["--profile", "none", "--notebooks-dir", str(stand_ins), "--runs-root", str(tmp_path / "runs")]
    assert main(["stage", "01", *base, "--run-id", "alone"]) == 0
    synth = tmp_path / "runs" / "alone" / "01_stand_in" / "synth"
    assert main(["stage", "02", *base, "--run-id", "alone2", "--set", f"synth_run={synth}"]) == 0
    sft = json.loads((tmp_path / "runs" / "alone2" / "02_stand_in" / "sft" / "manifest.json").read_text())
    assert sft["summary"]["handed"] == [str(synth)]
    assert main(["stage", "02", *base, "--run-id", "alone3", "--set", "synth_runn=x"]) == 1  # typo named, not run


def test_command_line_help_and_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from steerkit.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["run", "--help"])
    assert exit_.value.code == 0 and "--stages" in capsys.readouterr().out
    assert main(["run", "--profile", "nonesuch", "--runs-root", str(tmp_path)]) == 1  # named, not a traceback
    assert main(["run", "--profile", "smoke", "--runs-root", str(tmp_path), "--set", "nonsense"]) == 1
    assert not any(tmp_path.iterdir())  # nothing started


def test_resume_picks_the_latest_unfinished_pipeline_of_the_profile(tmp_path: Path) -> None:
    for run_id, profile, status, created in (
        ("a", "smoke", "running", "2026-01-01"), ("b", "smoke", "finished", "2026-01-03"),
        ("c", "smoke", "failed", "2026-01-02"), ("d", "full", "running", "2026-01-04"),
    ):
        (tmp_path / run_id).mkdir()
        (tmp_path / run_id / "pipeline.json").write_text(
            json.dumps({"profile": profile, "status": status, "created_at": created}))
    assert pl.latest_unfinished(tmp_path, "smoke") == "c"
    assert pl.latest_unfinished(tmp_path, "full") == "d"
    assert pl.latest_unfinished(tmp_path / "a", "smoke") is None
