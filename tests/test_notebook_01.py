"""Notebook 01 run headlessly with papermill into tmp_path, with a tiny offline parameter set."""

from __future__ import annotations

import json

import pytest

from steerkit.notebooks import execute
from steerkit.schema import BenchItem, Dialogue, load_jsonl
from steerkit import layout

TINY = {"n_benign": 3, "n_obfuscated": 3, "n_redteam": 3, "target": "scripted:complier", "show_dialogues": 1}


@pytest.mark.slow
def test_notebook_01_writes_the_run_directory_contract(tmp_path):
    ex = execute("01", TINY, runs_root=tmp_path, run_id="tiny")
    d = ex.run_dir
    assert d == tmp_path / "01_synthesize_steer" / "tiny" and ex.executed_notebook.is_file()
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["parameters"]["n_redteam"] == 3
    assert manifest["parameters"]["roles"]["target"] == "scripted:complier"
    sft = load_jsonl(Dialogue, d / layout.SFT_FILE)
    load_jsonl(Dialogue, d / layout.RL_FILE)
    bench = load_jsonl(BenchItem, d / layout.BENCH_FILE)
    assert len(sft) == manifest["summary"]["splits"]["sft"]["records"] > 0 and bench
    assert any((d / "images").glob("*.png")) and (d / "README.md").is_file()
    assert (d / "figures" / "turn_lengths.html").is_file() and (d / "figures" / "turn_lengths.json").is_file()


@pytest.mark.slow
def test_notebook_01_runs_without_red_team_seeds_or_a_bench(tmp_path):
    """The learning-check data (benchmarks/LOG.md): no M4 scripts and no bench split, so steer_bench.jsonl
    is empty; the notebook's own checks and loaders must accept that."""
    ex = execute("01", {"n_benign": 3, "n_obfuscated": 3, "n_redteam": 0, "bench_share": 0.0, "show_dialogues": 1},
                 runs_root=tmp_path, run_id="no-bench")
    summary = json.loads((ex.run_dir / "manifest.json").read_text())["summary"]
    assert set(summary["scripts"]["by_kind"]) == {"benign", "obfuscated"}
    assert summary["splits"]["bench"]["records"] == 0 and (ex.run_dir / layout.BENCH_FILE).read_text() == ""
    assert summary["splits"]["sft"]["records"] > 0
