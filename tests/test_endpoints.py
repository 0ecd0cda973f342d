"""The full profiles name every served model once, and docs/full_run.md serves exactly those."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import steerkit.pipeline as pl
from steerkit.roles import openai_backend
from steerkit.runs import REPO_ROOT

FULL = ("full", "full_7b")
SERVED = {"01": ("generator", "red_user", "blue_expert", "evaluator"), "03_tcsr": ("tutor",),
          "03_mean": ("tutor",), "04": ("judge",)}


def served(pipe: pl.Pipeline) -> dict[str, str]:
    """role -> spec across the stages (the same role names the same model in every stage)."""
    out: dict[str, str] = {}
    for key, roles in SERVED.items():
        params = pipe.parameters(pipe.stage(key))
        for role in roles:
            assert out.setdefault(role, params[role]) == params[role]
    return out


@pytest.mark.parametrize("profile", FULL)
def test_roles_refer_to_two_servers_named_once(profile: str) -> None:
    recipe = pl.load_recipe(profile)
    pipe = pl.Pipeline(recipe, "check")
    pipe.check(pl.STAGES)
    assert set(recipe["endpoints"]) == {"policy", "grader"}
    specs = served(pipe)
    for role in ("generator", "red_user", "blue_expert", "tutor"):
        assert specs[role] == recipe["endpoints"]["policy"]
    assert specs["evaluator"] == specs["judge"] == recipe["endpoints"]["grader"]
    assert "@http" not in str(recipe["stages"])  # no URL outside the endpoints


@pytest.mark.parametrize("profile", FULL)
def test_docs_serve_exactly_the_profiles_models_on_its_ports(profile: str) -> None:
    docs = (REPO_ROOT / "docs/full_run.md").read_text()
    commands = {(m, int(p)) for m, p in re.findall(r"vllm serve (\S+) --port (\d+)", docs)}
    wanted = set()
    for spec in pl.load_recipe(profile)["endpoints"].values():
        backend = openai_backend(spec)
        wanted.add((backend.model, int(re.search(r":(\d+)/", backend.base_url)[1])))
    assert commands == wanted


def test_one_set_moves_a_server_and_unknown_names_are_refused(tmp_path: Path) -> None:
    nano = "openai:gpt-5-nano@https://api.openai.com/v1?max_tokens_field=max_completion_tokens&omit=temperature,top_p"
    pipe = pl.Pipeline(pl.load_recipe("full"), "check", sets=[f"endpoints.grader={nano}"])
    pipe.check(pl.STAGES)
    specs = served(pipe)
    assert specs["judge"] == specs["evaluator"] == nano and specs["tutor"].endswith("@http://localhost:8000/v1")
    assert openai_backend(specs["judge"]).options.max_tokens_field == "max_completion_tokens"
    with pytest.raises(ValueError, match="no endpoint 'judge'; the recipe's endpoints are grader, policy"):
        pl.Pipeline(pl.load_recipe("full"), "check", sets=["endpoints.judge=x"]).check(pl.STAGES)
    typo = tmp_path / "typo.yaml"
    typo.write_text('stages:\n  "04": {judge: "{gradr}"}\n')
    with pytest.raises(ValueError, match=r"stage 04: \{gradr\} names no endpoint"):
        pl.Pipeline(pl.load_recipe("full", [typo]), "check").check(pl.STAGES)
    bad = tmp_path / "bad.yaml"
    bad.write_text("endpoints: {policy: 3}\n")
    with pytest.raises(ValueError, match="bad.yaml: endpoints must map names"):
        pl.load_recipe(None, [bad])


@pytest.mark.parametrize(("profile", "lr", "response"), [("full", 2e-6, 10_240), ("full_7b", 1e-5, 6_144)])
def test_grpo_follows_the_authors_scripts(profile: str, lr: float, response: int) -> None:
    grpo = pl.load_recipe(profile)["stages"]["03"]
    assert grpo["lora"] is False and grpo["learning_rate"] == lr and grpo["beta"] == 0.001
    assert grpo["max_turns"] == 10 and response - 10 < grpo["max_turns"] * grpo["max_new_tokens"] <= response
    sft = pl.load_recipe(profile)["stages"]["02"]
    assert sft["finetune"] == "full" and sft["max_steps"] == -1 and sft["learning_rate"] == 1e-5


def test_a_stage_runs_with_the_moved_endpoint_and_the_pipeline_records_it(tmp_path: Path) -> None:
    import json

    import nbformat
    import yaml

    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell('runs_root = None\nrun_id = None\njudge = "rules"',
                                  metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("from steerkit.runs import open_run\n"
                                  "open_run('01_x', run_id=run_id, root=runs_root, parameters={'judge': judge})"
                                  ".finish()"),
    ]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, notebooks / "01_x.ipynb")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"endpoints": {"grader": "openai:m@http://localhost:8001/v1"},
                                    "stages": {"01": {"judge": "{grader}"}}}))
    moved = "openai:m@http://gpu-2:9001/v1"
    pipe = pl.Pipeline(pl.load_recipe(None, [path]), "p", runs_root=tmp_path / "runs", notebooks_dir=notebooks,
                       stages=(pl.Stage("01", "01", "synth"),), sets=[f"endpoints.grader={moved}"])
    manifest = pipe.run()
    assert manifest["endpoints"] == {"grader": moved} and manifest["stages"]["01"]["parameters"]["judge"] == moved
    run = json.loads((Path(manifest["stages"]["01"]["run_dir"]) / "manifest.json").read_text())
    assert run["parameters"]["judge"] == moved
