"""synthesize(): the run directory contract, and a killed run resuming without repeated calls."""

from __future__ import annotations

import json

import pytest

from steerkit import layout
from steerkit.backends.rules import RulesBackend
from steerkit.clients import ChatClient
from steerkit.roles import Roles, make_backend
from steerkit.runs import open_run
from steerkit.schema import BenchItem, Dialogue, load_jsonl
from steerkit.synth.synthesize import SynthParams, synthesize


class Killed(RuntimeError):
    """Stands in for a kill in the middle of a run."""


class CountingRules(RulesBackend):
    """The rules backend, counting calls, optionally dying after ``die_after`` calls."""

    def __init__(self, die_after: int | None = None) -> None:
        self.calls = 0
        self.die_after = die_after

    async def generate(self, requests):
        self.calls += len(requests)
        if self.die_after is not None and self.calls > self.die_after:
            raise Killed("killed")
        return await super().generate(requests)


PARAMS = SynthParams(n_benign=4, n_obfuscated=4, n_redteam=4, chunk_size=2, bench_share=0.25)


def _roles(server_url: str, die_after: int | None = None) -> tuple[Roles, dict[str, CountingRules]]:
    roles = Roles({"generator": "rules", "red_user": "rules", "blue_expert": "rules", "evaluator": "rules",
                   "target": "scripted:complier"})
    backends = {r: CountingRules(die_after if r == "generator" else None)
                for r in ("generator", "red_user", "blue_expert", "evaluator")}
    for r, b in backends.items():
        roles.bind(r, ChatClient(b, role=r, spec="rules"))
    roles.bind("target", ChatClient(make_backend(f"openai:scripted:complier@{server_url}"), role="target",
                                    spec="openai:scripted:complier"))
    return roles, backends


def _open(root, run_id):
    return open_run("01_synthesize_steer", run_id=run_id, root=root, parameters=PARAMS.manifest())


@pytest.mark.slow
def test_killed_run_resumes_without_repeating_finished_calls(tmp_path, loopback_server):
    from steerkit.backends.scripted import named_double

    server = loopback_server(backend=named_double("complier"))
    # A clean run, for reference.
    roles, clean = _roles(server.base_url)
    summary = synthesize(_open(tmp_path, "clean"), roles, PARAMS)
    clean_target = server.stats()["requests"]
    clean_gen = clean["generator"].calls
    assert clean_target > 0 and clean_gen > 0

    # The same run killed part-way through Stage I, then resumed.
    roles, first = _roles(server.base_url, die_after=clean_gen // 2)
    with pytest.raises(Killed):
        synthesize(_open(tmp_path, "killed"), roles, PARAMS)
    before = server.stats()["requests"]
    roles, second = _roles(server.base_url)
    resumed = synthesize(_open(tmp_path, "killed"), roles, PARAMS)
    finished_before_kill = first["generator"].calls - 2 * PARAMS.tries  # at most one chunk was lost
    assert second["generator"].calls < clean_gen
    assert second["generator"].calls + finished_before_kill <= clean_gen + 2 * PARAMS.tries
    assert server.stats()["requests"] - before == clean_target  # M4 had not started before the kill
    assert resumed["splits"] == summary["splits"]

    # A finished run started again makes no calls at all, to any role or to the server.
    roles, third = _roles(server.base_url)
    before = server.stats()["requests"]
    again = synthesize(_open(tmp_path, "killed"), roles, PARAMS)
    assert all(b.calls == 0 for b in third.values()) and server.stats()["requests"] == before
    assert again["splits"] == summary["splits"]


def test_run_directory_contract(tmp_path):
    roles = Roles({"generator": "rules", "red_user": "rules", "blue_expert": "rules", "evaluator": "rules",
                   "target": "scripted:complier"})
    run = _open(tmp_path, "contract")
    summary = synthesize(run, roles, PARAMS)
    d = run.path
    for name in (layout.SFT_FILE, layout.RL_FILE, layout.BENCH_FILE, layout.CAPTIONS_FILE, layout.REJECTED_FILE,
                 "README.md", "manifest.json", "scripts.jsonl", "seeds.jsonl"):
        assert (d / name).is_file(), name
    sft = load_jsonl(Dialogue, d / layout.SFT_FILE)  # image refs resolve inside the run directory
    bench = load_jsonl(BenchItem, d / layout.BENCH_FILE)
    assert len(sft) == summary["splits"]["sft"]["records"] > 0 and len(bench) > 0
    captions = json.loads((d / layout.CAPTIONS_FILE).read_text())
    assert all(ref in captions for x in sft for ref in x.images)
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["summary"]["splits"] == summary["splits"]
    assert set(summary["scripts"]["by_kind"]) == {"benign", "obfuscated", "redteam"}
    assert summary["perturbed"] == 1  # ceil(10% of the red-team seeds with an image)
    red = [x for x in load_jsonl(Dialogue, d / layout.SFT_FILE) + load_jsonl(Dialogue, d / layout.RL_FILE)
           if x.kind == "redteam"]
    assert all(x.meta["seed_id"] and x.meta["license"] == "MIT" for x in red)
    for s in sft:
        assert s.meta["source"] and s.meta["license"] and s.meta["red_user"] == "rules"
    rej = [json.loads(line) for line in (d / layout.REJECTED_FILE).read_text().splitlines()]
    assert all(r["reason"] for r in rej)
    assert "config_name: bench" in (d / "README.md").read_text()
