"""Notebook 01 run headlessly with papermill into tmp_path, with a tiny offline parameter set."""

from __future__ import annotations

import json

import pytest

from steerkit.notebooks import execute
from steerkit.schema import BenchItem, Dialogue, load_jsonl
from steerkit.synth import splits as sp

TINY = {"n_benign": 3, "n_obfuscated": 3, "n_redteam": 3, "target": "scripted:complier", "show_dialogues": 1}


@pytest.mark.slow
def test_notebook_01_writes_the_run_directory_contract(tmp_path):
    ex = execute("01", TINY, runs_root=tmp_path, run_id="tiny")
    d = ex.run_dir
    assert d == tmp_path / "01_synthesize_steer" / "tiny" and ex.executed_notebook.is_file()
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["parameters"]["n_redteam"] == 3
    assert manifest["parameters"]["roles"]["target"] == "scripted:complier"
    sft = load_jsonl(Dialogue, d / sp.SFT_FILE)
    load_jsonl(Dialogue, d / sp.RL_FILE)
    bench = load_jsonl(BenchItem, d / sp.BENCH_FILE)
    assert len(sft) == manifest["summary"]["splits"]["sft"]["records"] > 0 and bench
    assert any((d / "images").glob("*.png")) and (d / "README.md").is_file()
    assert (d / "figures" / "turn_lengths.html").is_file() and (d / "figures" / "turn_lengths.json").is_file()
