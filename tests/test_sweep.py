"""`steerkit sweep` and notebook 05: the grid, the wiring, resume per cell after a real kill, and one
real sweep (3 alphas x 2 seeds on the tiny VLM) read by notebook 05.

The kill test runs on stand-in notebooks (fast kernels that open real runs, as in test_pipeline.py).
The real sweep runs the real notebooks 01, 03, 04 and 05; notebook 02 is a stand-in that hands the
tiny VLM on as the SFT checkpoint (the real 02 checks that training taught the answer format, which a
randomly initialised model cannot show in a few steps; test_notebooks.py runs the real 02).
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
import yaml

from steerkit import sweep as sw
from steerkit.runs import REPO_ROOT

# ---- stand-in notebooks --------------------------------------------------------------------------

PARAMS = {
    "01": ["seed = 0  # int"],
    "02": [
        'synth_run = ""  # str',
        'student = ""  # str: a checkpoint folder handed on as the SFT checkpoint',
    ],
    "03": [
        'synth_run = ""  # str',
        'sft_run = ""  # str',
        'compare_aggregator = "mean"  # str',
        'aggregator = "tcsr"  # str',
        "alpha = 0.3  # float",
        "seed = 0  # int",
        "feedback = True  # bool",
        'hold_file = ""  # str: wait while it exists ...',
        'hold_run = ""  # str: ... in this run',
    ],
    "04": [
        'synth_run = ""  # str',
        "model_runs = []  # list",
        "labels = []  # list",
        'paper_match = ""  # str',
    ],
    "05": ['sweep_dir = ""  # str'],
}
STAGE_NAMES = {
    "01": "01_synthesize_steer",
    "02": "02_sft_bootstrap",
    "03": "03_grpo_tutor_tcsr",
    "04": "04_steer_bench_analysis",
    "05": "05_studies",
}
BODY = """\
import json, os, pathlib, shutil, time
from steerkit.runs import open_run
params = {{k: v for k, v in globals().items() if k in {names!r}}}
run = open_run("{stage}", run_id=run_id, root=runs_root, parameters=params)
with open(run.file("executions.log"), "a") as f:
    f.write(f"{{os.getpid()}}\\n")
if "{number}" == "02" and student:
    shutil.copytree(student, run.path / "checkpoint", dirs_exist_ok=True)
if "{number}" == "04":
    for p in model_runs:
        assert json.loads((pathlib.Path(p) / "manifest.json").read_text())["status"] == "finished", p
        (run.path / pathlib.Path(p).name).mkdir(exist_ok=True)
while "{number}" == "03" and hold_file and run_id == hold_run and pathlib.Path(hold_file).exists():
    time.sleep(0.1)
run.finish()
"""


def write_stand_in(folder: Path, number: str, extra: tuple[str, ...] = ()) -> None:
    params = [*PARAMS[number], *extra]
    names = [line.split(" =")[0] for line in params]
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell(f"# Stand-in for stage {number}"),
        nbformat.v4.new_code_cell(
            "\n".join(['runs_root = ""  # str', 'run_id = ""  # str', *params]),
            metadata={"tags": ["parameters"]},
        ),
        nbformat.v4.new_code_cell(
            BODY.format(names=names, stage=STAGE_NAMES[number], number=number)
        ),
    ]
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nbformat.write(nb, folder / f"{number}_stand_in.ipynb")


@pytest.fixture
def stand_ins(tmp_path: Path) -> Path:
    folder = tmp_path / "notebooks"
    folder.mkdir()
    for number in PARAMS:
        write_stand_in(folder, number)
    return folder


def executions(run_dir: str | Path) -> int:
    return len((Path(run_dir) / "executions.log").read_text().split())


# ---- the grid -------------------------------------------------------------------------------------


def test_the_smoke_profile_plans_three_alphas_by_two_seeds(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from steerkit.cli import main

    assert main(["sweep", "--profile", "smoke", "--plan"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6 and lines[0].startswith(
        "cell=cell-alpha_0.1-seed_0  label=GRPO-tcsr alpha 0.1 seed 0"
    )
    recipe = sw.load_recipe("full")
    assert recipe["grid"]["alpha"] == [0.1, 0.3, 0.5, 0.7]
    # the tutor is the profile's served endpoint, named once under endpoints
    assert recipe["stages"]["03"]["tutor"] == "{policy}"
    assert recipe["endpoints"]["policy"].startswith("openai:")


def test_the_alpha_study_runs_the_demos_grpo_and_evaluation(capsys: pytest.CaptureFixture[str]) -> None:
    """configs/sweep_alpha_cpu.yaml puts back the demo's sizes over the smoke sweep's, so its cell
    alpha 0.3 seed 0 is the demo's GRPO-TCSR run; the two recipes must not drift apart."""
    from steerkit import pipeline as pl
    from steerkit.cli import main

    alpha_study = str(REPO_ROOT / "configs" / "sweep_alpha_cpu.yaml")
    assert main(["sweep", "--profile", "smoke", "--config", alpha_study, "--plan"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == [
        f"cell=cell-alpha_{a}-seed_{s}" for a in ("0.0", "0.3", "1.0") for s in (0, 1)]
    demo = pl.load_recipe("smoke")["stages"]
    study = sw.load_recipe("smoke", [alpha_study])["stages"]
    for stage in ("01", "02", "03", "04"):
        own = yaml.safe_load(Path(alpha_study).read_text())["stages"][stage]
        assert {k: study[stage][k] for k in own} == {k: demo[stage][k] for k in own}, stage


def test_bad_grids_and_sets_are_refused_before_anything_runs(
    tmp_path: Path, stand_ins: Path
) -> None:
    def sweep(grid: list[str], sets: tuple[str, ...] = ()) -> sw.Sweep:
        return sw.Sweep(
            sw.load_recipe(None, grid=grid),
            "s",
            runs_root=tmp_path,
            notebooks_dir=stand_ins,
            sets=sets,
        )

    with pytest.raises(ValueError, match="grid axis 'alpah': not a notebook-03 parameter"):
        sweep(["alpah=0.1,0.2"]).cells()
    with pytest.raises(ValueError, match="grid axis 'sft_run'"):
        sweep(["sft_run=a,b"]).cells()
    with pytest.raises(ValueError, match="the sweep sets alpha"):
        sweep(["alpha=0.1,0.2"], ("alpha=0.3",)).cells()
    with pytest.raises(ValueError, match="the sweep has no grid"):
        sweep([]).cells()
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"grid": {"alpha": 0.1}}))
    with pytest.raises(ValueError, match=r"bad\.yaml: grid\.alpha must be a non-empty list"):
        sw.load_recipe(None, [bad])
    bad.write_text(yaml.safe_dump({"grids": {"alpha": [0.1]}}))
    with pytest.raises(ValueError, match=r"unknown sweep recipe key\(s\) grids"):
        sw.load_recipe(None, [bad])
    assert not any(p.name == "s" for p in tmp_path.iterdir())


def test_a_tutor_axis_gets_short_distinct_names(stand_ins: Path, tmp_path: Path) -> None:
    tutors = "tutor=[rules, 'openai:Qwen/Qwen3-VL-32B-Instruct@http://h:8000/v1']"
    recipe = sw.load_recipe(None, grid=[tutors])
    write_stand_in(stand_ins, "03", extra=('tutor = "rules"  # str',))
    cells = sw.Sweep(recipe, "t", runs_root=tmp_path, notebooks_dir=stand_ins).cells()
    assert [c.label for c in cells] == [
        "GRPO-tcsr tutor rules",
        "GRPO-tcsr tutor Qwen/Qwen3-VL-32B-Instruct",
    ]
    assert len(cells[1].run_id) < 60 and cells[0].key != cells[1].key


# ---- resume after a real kill --------------------------------------------------------------------


@pytest.mark.slow
def test_a_sweep_killed_mid_cell_reruns_only_that_cell(stand_ins: Path, tmp_path: Path) -> None:
    runs, hold = tmp_path / "runs", tmp_path / "hold"
    hold.write_text("")
    held_cell = "cell-alpha_0.5-seed_0"
    command = [
        sys.executable,
        "-m",
        "steerkit.cli",
        "sweep",
        "--profile",
        "none",
        "--notebooks-dir",
        str(stand_ins),
        "--runs-root",
        str(runs),
        "--run-id",
        "killed",
        "--grid",
        "alpha=0.1,0.5",
        "--grid",
        "seed=0",
        "--set",
        f"03.hold_file={hold}",
        "--set",
        f"03.hold_run={held_cell}",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    first = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    held = runs / "killed" / "03_grpo_tutor_tcsr" / held_cell / "executions.log"
    deadline = time.monotonic() + 180
    while not held.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert held.exists(), (
        first.stderr.read().decode() if first.poll() is not None else "the held cell never started"
    )
    kernel_pid = int(held.read_text().split()[0])
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    try:  # the kernel runs in a session of its own; stop it too, so it cannot finish the cell behind our back
        os.kill(kernel_pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    killed = sw.load(runs / "killed")
    assert [c["status"] for c in killed["cells"]] == ["finished", "running"] and killed[
        "status"
    ] == "running"
    finished_cell = Path(killed["cells"][0]["grpo_run"])

    hold.unlink()
    second = subprocess.run(
        command, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert second.returncode == 0, second.stderr
    done = json.loads((runs / "killed" / "sweep.json").read_text())
    assert done["status"] == "finished" and [c["status"] for c in done["cells"]] == [
        "finished",
        "finished",
    ]
    assert executions(finished_cell) == 1  # the finished cell did not run again ...
    assert (
        executions(done["cells"][1]["grpo_run"]) == 2
    )  # ... the killed one did, under its own run id
    assert (
        executions(done["synth_run"])
        == executions(done["sft_run"])
        == executions(done["eval_run"])
        == 1
    )
    assert executions(done["studies_run"]) == 1
    assert "already finished" in second.stderr
    # each cell got its own values, the shared SFT run and one aggregator; 04 got every cell and their labels
    for cell in done["cells"]:
        params = json.loads((Path(cell["grpo_run"]) / "manifest.json").read_text())["parameters"]
        assert params["alpha"] == cell["values"]["alpha"] and params["seed"] == 0
        assert params["sft_run"] == done["sft_run"] and params["compare_aggregator"] == ""
        assert cell["evaluation"] == str(Path(done["eval_run"]) / cell["run_id"])
    evaluated = json.loads((Path(done["eval_run"]) / "manifest.json").read_text())["parameters"]
    assert evaluated["labels"] == [
        "base",
        "SFT",
        "GRPO-tcsr alpha 0.1 seed 0",
        "GRPO-tcsr alpha 0.5 seed 0",
    ]
    assert evaluated["paper_match"] == "base: 3B base, SFT: 3B SFT"
    # the grid of a started sweep cannot change
    changed = subprocess.run(
        [*command[:-4], "--grid", "alpha=0.1,0.2"],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert changed.returncode == 1 and "was started with another grid" in changed.stderr


# ---- one real sweep, read by notebook 05 ---------------------------------------------------------

ALPHAS, SEEDS = [0.1, 0.3, 0.5], [0, 1]


@pytest.fixture(scope="module")
def real_sweep(tmp_path_factory: pytest.TempPathFactory, tiny_vlm_dir: Path) -> dict:
    """3 alphas x 2 seeds, one GRPO step a cell on the tiny VLM, evaluated by 04 and read by 05."""
    tmp = tmp_path_factory.mktemp("sweep")
    notebooks = tmp / "notebooks"
    notebooks.mkdir()
    for number in ("01", "03", "04", "05"):
        source = next((REPO_ROOT / "notebooks").glob(f"{number}_*.ipynb"))
        (notebooks / source.name).symlink_to(source)
    write_stand_in(notebooks, "02")
    figures = tmp / "figures"
    recipe = tmp / "sweep.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "offline": True,
                "grid": {"alpha": ALPHAS, "seed": SEEDS},
                "stages": {
                    "01": {
                        "n_benign": 6,
                        "n_obfuscated": 6,
                        "n_redteam": 0,
                        "image_share": 0.0,
                        "bench_share": 0.34,
                    },
                    "02": {"student": str(tiny_vlm_dir)},
                    "03": {
                        "n_prompts": 2,
                        "prompts_per_step": 2,
                        "num_generations": 2,
                        "max_steps": 1,
                        "max_turns": 2,
                        "max_new_tokens": 8,
                    },
                    "04": {
                        "student": f"hf:{tiny_vlm_dir}",
                        "max_turns": 2,
                        "max_tokens": 8,
                        "n_resamples": 100,
                        "figure_png": False,
                    },
                    "05": {"n_resamples": 100, "figures_dir": str(figures), "figure_png": True},
                },
            }
        )
    )
    start = time.monotonic()
    sweep = sw.Sweep(
        sw.load_recipe(None, [recipe]), "real", runs_root=tmp / "runs", notebooks_dir=notebooks
    )
    manifest = sweep.run()
    return {
        "manifest": manifest,
        "path": sweep.path,
        "figures": figures,
        "seconds": time.monotonic() - start,
    }


@pytest.mark.slow
def test_every_cell_is_a_grpo_run_of_its_own_from_the_shared_sft(real_sweep: dict) -> None:
    m = real_sweep["manifest"]
    assert m["status"] == "finished" and len(m["cells"]) == len(ALPHAS) * len(SEEDS)
    assert {(c["values"]["alpha"], c["values"]["seed"]) for c in m["cells"]} == {
        (a, s) for a in ALPHAS for s in SEEDS
    }
    for cell in m["cells"]:
        manifest = json.loads((Path(cell["grpo_run"]) / "manifest.json").read_text())
        assert (
            manifest["status"] == "finished"
            and manifest["parameters"]["alpha"] == cell["values"]["alpha"]
        )
        assert (
            manifest["parameters"]["seed"] == cell["values"]["seed"]
            and manifest["parameters"]["aggregator"] == "tcsr"
        )
        assert manifest["parameters"]["init_checkpoint"] == m["sft_run"]
        assert (Path(cell["grpo_run"]) / "checkpoint" / "config.json").is_file()
        assert (Path(cell["evaluation"]) / "dialogues.jsonl").is_file()
    labels = [e.label for e in sw.evaluations(real_sweep["path"])]
    assert labels == ["base", "SFT", *(c["label"] for c in m["cells"])]


@pytest.mark.slow
def test_notebook_05_reads_the_sweep_and_writes_its_figures(real_sweep: dict) -> None:
    import pandas as pd

    m = real_sweep["manifest"]
    studies = Path(m["studies_run"])
    tidy = pd.read_csv(studies / "tidy.csv")
    assert set(tidy.label) == {"base", "SFT", *(c["label"] for c in m["cells"])}
    assert len(tidy) == tidy.label.nunique() * tidy.subset.nunique() * 2 and "all" in set(
        tidy.subset
    )
    paired = pd.read_csv(studies / "paired.csv")
    assert set(paired.seed) == set(SEEDS) and set(paired.metric) == {
        "safety",
        "helpfulness",
        "survival",
    }
    assert set(paired.arm_a) == {"GRPO-tcsr alpha 0.3"}  # the paper's alpha is the reference arm
    executed = nbformat.read(studies.parent / "studies.ipynb", as_version=4)
    text = "".join(
        o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.outputs
    )
    assert "Judge rules against human harm labels" in text and "Tutor vs judge (judge rules" in text
    assert "Tutor vs judge (tutor rules" in text and "paired items for 80% power" in text
    sources = {e.run_id for e in sw.evaluations(real_sweep["path"])}
    for name in ("rates_vs_alpha", "survival_arms", "beside_paper", "paired_differences"):
        assert (real_sweep["figures"] / f"{name}.html").is_file()
        assert (real_sweep["figures"] / f"{name}.png").stat().st_size > 1000
        sidecar = json.loads((real_sweep["figures"] / f"{name}.json").read_text())
        assert set(sidecar["sources"]) == sources and sidecar["git"]["commit"]
    print(f"real sweep of {len(m['cells'])} cells: {real_sweep['seconds']:.0f} s")


# ---- reading a sweep (steerkit.studies) on hand-made frames ----------------------------------------


def test_arms_are_compared_within_each_seed_against_the_reference() -> None:
    import pandas as pd

    from steerkit import studies

    cells = pd.DataFrame(
        {
            "label": ["SFT", "A s0", "B s0", "A s1", "B s1"],
            "arm": ["SFT", "A", "B", "A", "B"],
            "seed": [None, 0, 0, 1, 1],
            "paper": ["3B SFT", "3B SaFeR-Steer", None, "3B SaFeR-Steer", None],
        }
    )
    # four items; in seed 0 arm B passes Safety on every item A fails (4 discordant: exact p = 2/16)
    passes = {
        "SFT": [1, 1, 0, 0],
        "A s0": [0, 0, 0, 0],
        "B s0": [1, 1, 1, 1],
        "A s1": [1, 0, 1, 0],
        "B s1": [1, 0, 1, 0],
    }
    dialogues = pd.DataFrame(
        [
            {
                "label": lab,
                "dialogue_id": f"d{i}",
                "subset": "x",
                "harmlessness_avg": 3.0 if p else 1.0,
                "helpfulness_avg": 3.0,
                "n_turns": 2,
                "first_failure": None if p else 1,
            }
            for lab, ps in passes.items()
            for i, p in enumerate(ps)
        ]
    )
    reference = studies.default_reference(cells, dict(zip(cells.arm, cells.paper)))
    assert reference == "A"
    paired = studies.compare(dialogues, cells, reference=reference, n_resamples=200)
    safety = paired.query("metric == 'safety'").set_index(["seed", "arm_b"])
    assert set(paired.arm_a) == {"A"} and set(safety.index) == {
        (0, "B"),
        (0, "SFT"),
        (1, "B"),
        (1, "SFT"),
    }
    assert safety.loc[(0, "B"), "diff"] == 100.0 and safety.loc[
        (0, "B"), "p_value"
    ] == pytest.approx(2 / 16)
    assert safety.loc[(1, "B"), "diff"] == 0.0 and safety.loc[(1, "B"), "p_value"] == 1.0
    table = studies.tidy(dialogues, cells)
    spread = (
        studies.over_seeds(table)
        .query("arm == 'B' and subset == 'all' and metric == 'safety'")
        .iloc[0]
    )
    assert (spread["mean"], spread["seeds"]) == (75.0, 2) and spread["lo"] < 75.0 < spread["hi"]
    with pytest.raises(ValueError, match="reference arm 'C' is not in the sweep"):
        studies.compare(dialogues, cells, reference="C")
