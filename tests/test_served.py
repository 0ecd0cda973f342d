"""Evaluating a checkpoint through a server that serves it: `steerkit.serve.LoopbackServer` serving the
tiny VLM checkpoint (``--backend hf:<ckpt>``) stands in for ``vllm serve <run>/checkpoint``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from steerkit.backends.rules import RulesBackend
from steerkit.clients import ChatClient, Sampling
from steerkit.evaluate import evaluate
from steerkit.roles import Roles, make_backend
from steerkit.runs import open_run
from steerkit.schema import BenchItem
from steerkit.served import parse_served, served_model_id, served_students


def test_parse_served_forms() -> None:
    assert parse_served("") == {} and parse_served(None) == {}
    assert parse_served("sft=http://127.0.0.1:8000, /r/grpo=http://h:9/v1/") == {
        "sft": "http://127.0.0.1:8000/v1", "/r/grpo": "http://h:9/v1"}
    assert parse_served({"base": "https://x/v1"}) == {"base": "https://x/v1"}
    with pytest.raises(ValueError, match="is not <checkpoint or row>=<server URL>"):
        parse_served("sft")
    with pytest.raises(ValueError, match="not an http"):
        parse_served("sft=localhost:8000")


def test_a_server_that_is_down_or_serves_several_models_is_refused(loopback_server) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConnectionError, match="did not answer"):
        served_model_id(f"http://127.0.0.1:{port}/v1", timeout=2)
    server = loopback_server(model="only-one")
    assert served_model_id(server.base_url) == "only-one"
    with pytest.raises(ValueError, match="matches no evaluated row; rows are base, sft"):
        served_students({"base": "smollm2", "sft": "hf:/nowhere/sft/checkpoint"}, {"grpo": server.base_url})


@pytest.mark.parametrize("key", ["row", "run", "checkpoint"])
def test_a_checkpoint_evaluated_through_its_server(tmp_path: Path, tiny_vlm_dir: Path, loopback_server,
                                                   key: str) -> None:
    run_dir = tmp_path / "sft"
    run_dir.mkdir()
    (run_dir / "checkpoint").symlink_to(tiny_vlm_dir, target_is_directory=True)
    ckpt = run_dir / "checkpoint"
    # like `vllm serve <run>/checkpoint`: the served model id is the path it was given
    server = loopback_server(backend=make_backend(f"hf:{ckpt}"), model=str(ckpt))
    students = {"base": "smollm2", "sft": f"hf:{run_dir.resolve() / 'checkpoint'}"}  # as notebook 04 writes it
    served = {"row": "sft", "run": str(run_dir), "checkpoint": str(ckpt)}[key]
    specs, info = served_students(students, f"{served}={server.base_url}")
    assert specs == {"base": "smollm2", "sft": f"openai:{ckpt}@{server.base_url}"}  # base stays in process
    assert info == {"sft": {"checkpoint": str(ckpt.resolve()), "url": server.base_url, "model": str(ckpt)}}

    items = [BenchItem(question_id=f"q{i}", category="benign",
                       messages_fixed=[{"role": "user", "content": f"Name {i + 2} prime numbers."},
                                       {"role": "user", "content": "And their sum?"}])
             for i in range(2)]
    run = open_run("04_eval", run_id="served", root=tmp_path / "runs")
    out = evaluate(run, items, student=Roles({"student": specs["sft"]}).client("student"),
                   judge=ChatClient(RulesBackend()), sampling=Sampling(temperature=0.0, max_tokens=6),
                   served=info["sft"])
    assert [len(d.turns()) for d in out] == [2, 2] and all(v.scored for d in out for v in d.verdicts)
    assert server.stats()["outcomes"].get("ok") == 4  # every student turn was answered by the server
    manifest = json.loads((run.path / "manifest.json").read_text())["evaluation"]
    assert manifest["served"] == info["sft"] and manifest["student"] == specs["sft"]
    assert manifest["status"] == "finished"


def test_notebook_04_evaluates_a_served_row_through_its_server(tmp_path: Path, tiny_vlm_dir: Path,
                                                              loopback_server) -> None:
    """Notebook 04's ``served`` parameter reaches `steerkit.evaluation_run`: the row it names is replayed
    by its server and recorded so, the base student in process."""
    from steerkit import evaluation_run as er
    from steerkit.notebooks import notebook_parameters

    nb = Path(__file__).resolve().parent.parent / "notebooks" / "04_steer_bench_analysis.ipynb"
    assert notebook_parameters(nb)["served"] == ""
    run_dir = tmp_path / "sft"
    run_dir.mkdir()
    (run_dir / "checkpoint").symlink_to(tiny_vlm_dir, target_is_directory=True)
    ckpt = run_dir / "checkpoint"
    server = loopback_server(backend=make_backend(f"hf:{ckpt}"), model=str(ckpt))
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps({"question_id": f"q{i}", "category": "benign", "messages_fixed": [
        {"role": "user", "content": f"Name {i + 2} prime numbers."}, {"role": "user", "content": "And their sum?"}]})
        + "\n" for i in range(2)))
    p = er.EvaluationParameters(runs_root=str(tmp_path / "runs"), run_id="e", bench=str(bench), model_runs=str(run_dir),
                                served=f"sft={server.base_url}", student=f"hf:{tiny_vlm_dir}", max_turns=2,
                                max_tokens=6)
    run = er.open_evaluation(p)
    assert er.evaluate_models(run, er.prepare_bench(run, p), p) == ["base", "sft"]
    assert server.stats()["outcomes"].get("ok") == 4  # the sft row's 2 x 2 turns, none of base's
    evaluation = {row: json.loads((run.path / row / "manifest.json").read_text())["evaluation"]
                  for row in ("base", "sft")}
    assert evaluation["sft"]["served"]["url"] == server.base_url and evaluation["base"]["served"] is None
    assert evaluation["sft"]["student"] == f"openai:{ckpt}@{server.base_url}"
