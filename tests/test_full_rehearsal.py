"""A dress rehearsal of the full profile: ``steerkit run --profile full`` end to end on loopback.

`configs/pipeline_full.yaml` itself runs, with ``--set`` changing only sizes, model paths and URLs
(and where notebook 04 writes its figures): the roles the profile serves are served by real
OpenAI-compatible HTTP servers on loopback, laid out as the profile lays them out (generator, user
agents and tutor on one, evaluator and judge on the other), answering the project's own prompts
from the messages alone and, at seeded rates, with malformed, truncated or refused replies
(`steerkit.rehearsal`, `steerkit.backends.readback`). The student is a tiny Qwen2.5-VL-shaped
checkpoint in a folder, named by path where the profile names ``/models/Qwen2.5-VL-3B-Instruct``:
SFT fine-tunes all of it by epochs, GRPO keeps the profile's B prompts x K generations in
micro-batches with gradient accumulation over up to 10 turns, and notebook 04 evaluates every
checkpoint with the served judge. A second run of notebook 04 serves its judge as OpenAI's
reasoning models behave (``max_tokens``, ``temperature`` and ``top_p`` refused), configured as
docs/full_run.md says, and every turn is scored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from steerkit import pipeline as pl
from steerkit.backends.readback import SERVED_PROMPTS
from steerkit.rehearsal import RehearsalServers

PROFILE_STUDENT = "/models/Qwen2.5-VL-3B-Instruct"
#: Reply flaws a real model sends now and then; transport faults the client must retry.
FLAWS = {"malformed": 0.04, "truncated": 0.03, "refused": 0.02}
FAULTS = {"http500": 0.02, "http429": 0.01}
#: Sizes only: the profile's structure (epochs, B x K, turn limit, served roles) is kept.
SIZES = [
    "01.n_benign=6",
    "01.n_obfuscated=8",
    "01.n_redteam=2",
    "01.target_max_tokens=8",
    "01.tries=2",
    # 2 epochs of 6 steps (one dialogue a step): enough steps at the profile's lr 1e-5 for the probe
    # loss to fall measurably on the tiny student
    "02.batch_size=1",
    "02.per_device_batch_size=1",
    "02.max_length=2048",
    "02.n_prompts=2",
    "02.max_new_tokens=8",
    "03.n_prompts=4",
    "03.prompts_per_step=2",
    "03.num_generations=2",
    "03.max_steps=2",
    "03.max_new_tokens=8",
    "04.max_tokens=8",
    "04.n_resamples=50",
]


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from steerkit.cli import main
    from steerkit.tiny_vlm import build_tiny_vlm

    student = build_tiny_vlm(tmp_path_factory.mktemp("Qwen2.5-VL-3B-Instruct"))
    runs = tmp_path_factory.mktemp("papermill_runs")
    recipe = pl.load_recipe("full")
    with RehearsalServers(recipe, seed=0, flaws=FLAWS, faults=FAULTS, retry_after=0.05) as served:
        sets = [
            *SIZES,
            *served.sets({PROFILE_STUDENT: str(student)}),
            "04.figures_dir={pipeline}/figures",
        ]
        rc = main(
            [
                "run",
                "--profile",
                "full",
                "--runs-root",
                str(runs),
                "--run-id",
                "rehearsal",
                *(f"--set={s}" for s in sets),
            ]
        )
        counts = served.counts()
        urls = served.urls()
    manifest_path = runs / "rehearsal" / "pipeline.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    return {
        "rc": rc,
        "manifest": manifest,
        "counts": counts,
        "urls": urls,
        "student": student,
        "sets": sets,
        "runs": runs / "rehearsal",
    }


def _failure(r: dict[str, Any]) -> str:
    failed = {
        k: v.get("error", "")[-3000:]
        for k, v in r["manifest"].get("stages", {}).items()
        if v.get("status") != "finished"
    }
    return json.dumps(failed, indent=1)


def _run_dir(r: dict[str, Any], key: str) -> Path:
    """A stage's run directory, or a failure naming the stage that stopped the pipeline."""
    record = r["manifest"].get("stages", {}).get(key, {})
    if record.get("status") != "finished":
        pytest.fail(f"stage {key} did not finish; the pipeline stopped at {_failure(r)}")
    return Path(record["run_dir"])


@pytest.mark.slow
def test_the_full_profile_runs_end_to_end(rehearsal: dict[str, Any]) -> None:
    assert rehearsal["rc"] == 0, _failure(rehearsal)
    manifest = rehearsal["manifest"]
    assert manifest["status"] == "finished" and manifest["profile"] == "full"
    started = sorted(manifest["stages"], key=lambda k: manifest["stages"][k]["started_at"])
    assert started == [s.key for s in pl.STAGES]  # every stage, in pipeline order


@pytest.mark.slow
def test_only_sizes_paths_and_urls_were_changed(rehearsal: dict[str, Any]) -> None:
    """Every stage ran the profile's values except the overridden sizes, paths and URLs; a role
    naming an endpoint ran with the profile's model at the loopback URL."""
    recipe = pl.load_recipe("full")
    endpoints = {
        name: spec.replace(url, rehearsal["urls"].get(url, url))
        for name, spec in recipe.get("endpoints", {}).items()
        for url in [spec.rpartition("@")[2].partition("?")[0].partition("#")[0]]
    }
    changed = {s.partition("=")[0] for s in rehearsal["sets"]}
    sized = {s.partition("=")[0] for s in SIZES}
    assert all(
        c in sized or c.startswith("endpoints.") or "/" in s
        for c, s in ((s.partition("=")[0], s) for s in rehearsal["sets"])
    ), rehearsal["sets"]
    for key, record in rehearsal["manifest"]["stages"].items():
        stage = next(s for s in pl.STAGES if s.key == key)
        expected = {**recipe["stages"].get(stage.notebook, {}), **recipe["stages"].get(key, {})}
        for name, value in expected.items():
            if f"{stage.notebook}.{name}" in changed or f"{key}.{name}" in changed:
                continue
            assert record["parameters"][name] == pl.substitute(value, endpoints), (key, name)


@pytest.mark.slow
def test_served_roles_sit_where_the_profile_puts_them(rehearsal: dict[str, Any]) -> None:
    """Generator, user agents and tutor on one server; evaluator and judge on the other; every
    prompt recognised and read back; flawed replies and transport faults met and survived."""
    _run_dir(rehearsal, "04")
    counts = rehearsal["counts"]
    assert set(counts) == {"http://localhost:8000/v1", "http://localhost:8001/v1"}
    roles_8000 = set(counts["http://localhost:8000/v1"]["prompts"])
    roles_8001 = set(counts["http://localhost:8001/v1"]["prompts"])
    assert (
        {"benign", "obfuscated", "red_user", "blue_expert", "tutor"}
        <= roles_8000
        <= set(SERVED_PROMPTS)
    )
    assert {"evaluator", "judge"} <= roles_8001 <= {"evaluator", "judge"}
    for c in counts.values():
        assert "unrecognised" not in c["prompts"] and "unreadable" not in c["prompts"], c
    assert sum(sum(c["flawed"].values()) for c in counts.values()) > 0
    assert sum(c["server"]["outcomes"].get("http500", 0) for c in counts.values()) > 0


@pytest.mark.slow
def test_sft_trained_the_whole_student_by_epochs(rehearsal: dict[str, Any]) -> None:
    run = _run_dir(rehearsal, "02")
    m = json.loads((run / "manifest.json").read_text())
    assert m["parameters"]["finetune"] == "full" and m["parameters"]["max_steps"] == -1
    assert m["summary"]["global_step"] >= 2
    assert (run / "checkpoint" / "config.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("key", ["03_tcsr", "03_mean"])
def test_grpo_kept_the_profiles_structure(rehearsal: dict[str, Any], key: str) -> None:
    from steerkit.frames import grpo_frames

    run = _run_dir(rehearsal, key)
    m = json.loads((run / "manifest.json").read_text())
    assert m["parameters"]["lora"] is False and m["parameters"]["max_turns"] == 10
    # B x K rows a step in the profile's micro-batches of 2, the accumulation derived from them
    b = m["batching"]
    assert (b["prompts_per_step"], b["num_generations"], b["per_device_batch"]) == (2, 2, 2)
    assert b["rows_per_step"] == 4 and b["gradient_accumulation"] == 2
    _, turns = grpo_frames({key: run})
    per_step = turns.drop_duplicates(["step", "row"]).groupby("step").size()
    assert (per_step == 2 * 2).all() and len(per_step) == 2  # B x K trajectories, max_steps steps
    assert turns.turn.max() > 1 and turns.safety.notna().any()


@pytest.mark.slow
def test_04_evaluated_every_checkpoint_with_the_served_judge(rehearsal: dict[str, Any]) -> None:
    from steerkit import frames

    run = _run_dir(rehearsal, "04")
    evals = frames.evaluations(run)
    assert {e.label for e in evals} == {"base", "SFT", "GRPO-tcsr", "GRPO-mean"}
    judge = f"openai:Qwen/Qwen3-VL-30B-A3B-Instruct@{rehearsal['urls']['http://localhost:8001/v1']}"
    assert set(frames.runs_df(evals).judge) == {judge}
    turns = frames.turns_df(evals)
    # a flawed reply is asked again (reask@1), so a turn stays unscored only when its re-asks were flawed
    # too; nothing else may leave it unscored
    grader = rehearsal["counts"]["http://localhost:8001/v1"]
    flawed = grader["flawed"]
    judge_flawed = sum(n for k, n in flawed.items() if k.startswith("judge:"))
    assert grader["reasked"] >= flawed.get("judge:refused", 0)  # a refusal is never a verdict
    unscored = turns[~turns.scored]
    assert len(unscored) <= judge_flawed, unscored.unscored_reason.value_counts()
    assert set(unscored.unscored_reason) <= {"empty", "parse_failure", "off_scale"}


# ---- a judge that rejects max_tokens, configured as docs/full_run.md says ----------------------

#: The request options docs/full_run.md gives for OpenAI's reasoning models (GPT-5-nano, the
#: paper's judge).
REASONING_OPTIONS = (
    "?max_tokens_field=max_completion_tokens&omit=temperature,top_p&reasoning_effort=minimal"
)


@pytest.fixture(scope="module")
def reasoning_judge(
    rehearsal: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """Notebook 04 of the full profile alone, its judge served as a reasoning model: the server
    refuses ``max_tokens``, ``temperature`` and ``top_p`` as OpenAI's reasoning models do."""
    from steerkit.cli import main

    runs = tmp_path_factory.mktemp("reasoning_judge")
    recipe = pl.load_recipe("full")
    grader = "http://localhost:8001/v1"
    refuse = {grader: {"refuse": ("max_tokens", "temperature", "top_p"), "model": "gpt-5-nano"}}
    with RehearsalServers(recipe, seed=1, per_endpoint=refuse) as served:
        url = served.urls()[grader]
        sets = [
            *SIZES,
            f"04.student=hf:{rehearsal['student']}",
            f"endpoints.grader=openai:gpt-5-nano@{url}{REASONING_OPTIONS}",
            "04.figures_dir={pipeline}/figures",
            "04.max_turns=3",
        ]
        rc = main(
            [
                "stage",
                "04",
                "--profile",
                "full",
                "--runs-root",
                str(runs),
                "--run-id",
                "nano",
                *(f"--set={s}" for s in sets),
            ]
        )
        stats = served.servers[grader].stats()
    path = runs / "nano" / "pipeline.json"
    manifest = json.loads(path.read_text()) if path.exists() else {}
    return {"rc": rc, "manifest": manifest, "stats": stats}


@pytest.mark.slow
def test_a_judge_that_rejects_max_tokens_scores_every_turn(reasoning_judge: dict[str, Any]) -> None:
    from steerkit import frames

    r = reasoning_judge
    assert r["rc"] == 0, _failure(r)
    turns = frames.turns_df(frames.evaluations(_run_dir(r, "04")))
    assert len(turns) and turns.scored.all(), turns.unscored_reason.value_counts()
    fields = r["stats"]["body_fields"]
    assert "unsupported" not in r["stats"]["outcomes"], r["stats"]
    assert fields["max_completion_tokens"] == fields["reasoning_effort"] == r["stats"]["requests"]
    assert not {"max_tokens", "temperature", "top_p"} & set(fields)
