"""Run directories: manifests, resume checks, append-only results that survive a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from steerkit.runs import ResultLog, atomic_write_text, open_run


def test_manifest_fields_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-secret-value-1234567890")
    run = open_run("04_eval", run_id="r1", root=tmp_path,
                   parameters={"n": 3, "note": "sk-test-secret-value-1234567890"},
                   roles={"judge": "rules"}, prompts={"judge": "judge@1"}, seeds={"seed": 0})
    m = json.loads((tmp_path / "04_eval" / "r1" / "manifest.json").read_text())
    for field in ("parameters", "roles", "prompts", "seeds", "git", "packages", "python", "created_at"):
        assert field in m
    assert set(m["git"]) == {"commit", "dirty"}
    assert m["packages"]["torch"]
    assert "sk-test-secret" not in (tmp_path / "04_eval" / "r1" / "manifest.json").read_text()
    run.finish(items=3)
    again = open_run("04_eval", run_id="r1", root=tmp_path,
                     parameters={"n": 3, "note": "sk-test-secret-value-1234567890"})
    assert again.manifest["created_at"] == m["created_at"] and len(again.manifest["resumed_at"]) == 1
    with pytest.raises(ValueError, match=r"other parameters \(n\)"):
        open_run("04_eval", run_id="r1", root=tmp_path, parameters={"n": 4, "note": "sk-test-secret-value-1234567890"})


def test_result_log_drops_torn_tail(tmp_path: Path) -> None:
    log = ResultLog(tmp_path / "r.jsonl")
    log.append({"id": "a", "v": 1})
    log.append({"id": "b", "v": 2})
    with (tmp_path / "r.jsonl").open("a") as f:
        f.write('{"id": "c", "v"')  # a kill mid-write
    log = ResultLog(tmp_path / "r.jsonl")
    assert log.done_keys() == {"a", "b"}
    log.append({"id": "c", "v": 3})
    assert [r["id"] for r in log] == ["a", "b", "c"]


def test_atomic_write_keeps_old_file_on_failure(tmp_path: Path) -> None:
    p = atomic_write_text(tmp_path / "f.json", "old")

    class Boom(str):
        pass

    with pytest.raises(TypeError):
        atomic_write_text(p, 123)  # type: ignore[arg-type]
    assert p.read_text() == "old"
    assert [x.name for x in tmp_path.iterdir()] == ["f.json"]


def test_kill_9_then_resume_redoes_only_unfinished(tmp_path: Path) -> None:
    """A worker killed with SIGKILL mid-run resumes: finished items are not redone."""
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from steerkit.runs import open_run
        run = open_run("s", run_id="k", root=Path({str(tmp_path)!r}), parameters={{"n": 40}})
        res = run.results("items.jsonl")
        done = res.done_keys()
        calls = Path({str(tmp_path)!r}) / "calls.log"
        for i in range(40):
            if str(i) in done:
                continue
            with calls.open("a") as f:
                f.write(f"{{i}}\\n")
            time.sleep(0.02)
            res.append({{"id": str(i), "value": i * i}})
        run.finish(n=len(res))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    items = tmp_path / "s" / "k" / "items.jsonl"
    deadline = time.time() + 30
    while time.time() < deadline and (not items.exists() or items.read_text().count("\n") < 10):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    first = items.read_text().count("\n")
    assert 10 <= first < 40
    subprocess.run([sys.executable, "-c", script], check=True)
    rows = [json.loads(x) for x in items.read_text().splitlines()]
    assert sorted(int(r["id"]) for r in rows) == list(range(40))  # nothing lost, nothing duplicated
    calls = [int(x) for x in (tmp_path / "calls.log").read_text().split()]
    # at most the one item in flight at the kill is started twice
    assert len(calls) - 40 <= 1
    assert json.loads((tmp_path / "s" / "k" / "manifest.json").read_text())["status"] == "finished"
