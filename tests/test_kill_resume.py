"""A real ``kill -9`` in the middle of an evaluation run, then a rerun to completion.

The evaluation runs in a child process (``steerkit.evaluate`` over a JSONL bench, student and judge
reached over HTTP) against two `LoopbackServer`s started here, so the servers outlive the kill and
their counters see every request of both attempts. The killed run is compared with an uninterrupted
run of the same bench: same dialogues, nothing written twice, every written line parses, and the
requests repeated by the rerun are bounded by the calls that were in flight when the kill landed.

The kill test of synthesis (``tests/test_synth_resume.py``) stops the run by raising inside a
backend; `test_sigkilled_synthesis_resumes_to_the_same_splits` below does it with a real SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from steerkit.backends.scripted import JUDGE_VERDICT, ScriptedBackend
from steerkit.clients import Request
from steerkit.schema import Dialogue

N_ITEMS = 40
MAX_TURNS = 3
CHUNK = 4
LATENCY = 0.08  # seconds per answer: the whole run takes a few seconds, so the kill lands inside it

EVALUATE = """
import sys
from pathlib import Path
from steerkit.clients import Sampling
from steerkit.evaluate import evaluate, load_bench
from steerkit.roles import Roles
from steerkit.runs import open_run

bench, runs, run_id, student, judge, max_turns, chunk = sys.argv[1:]
roles = Roles({"student": student, "judge": judge}, cache_dir=Path(runs) / run_id / "cache")
run = open_run("eval", run_id=run_id, root=runs, parameters={"bench": bench})
evaluate(run, load_bench(bench), student=roles.client("student"), judge=roles.client("judge"),
         max_turns=int(max_turns), chunk_size=int(chunk), sampling=Sampling(temperature=0.0, max_tokens=32))
run.finish()
"""


def _student(req: Request) -> str:
    last = req.messages[-1].content
    return f"<thinking>turn {len(req.messages) // 2}</thinking><answer>A careful answer about: {last}</answer>"


def _bench(path: Path) -> Path:
    rows = [
        {"question_id": f"q{i:02d}", "category": "benign", "source_category": "STEER-MMSafe",
         "risk_trajectory": [1] * MAX_TURNS,
         "messages_fixed": [{"role": "user", "content": f"Item {i}, question {t}: name a prime above {i * 7 + t}."}
                            for t in range(1, MAX_TURNS + 1)]}
        for i in range(N_ITEMS)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _start(bench: Path, runs: Path, run_id: str, student_url: str, judge_url: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", EVALUATE, str(bench), str(runs), run_id,
         f"openai:scripted:student@{student_url}", f"openai:scripted:judge@{judge_url}", str(MAX_TURNS), str(CHUNK)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )


def _requests(*servers) -> int:
    return sum(s.stats()["requests"] for s in servers)


def _lines(path: Path) -> list[str]:
    """The whole lines of a JSONL file (a torn last line, which readers drop, is left out)."""
    data = path.read_text(encoding="utf-8") if path.exists() else ""
    return data.split("\n")[:-1]


def _every_file_parses(run_dir: Path) -> None:
    for f in sorted(run_dir.rglob("*")):
        if f.suffix == ".jsonl":
            for n, line in enumerate(_lines(f), start=1):
                try:  # a half-written record must never sit on a whole line
                    json.loads(line)
                except ValueError as exc:
                    raise AssertionError(f"{f}:{n} does not parse: {exc}") from None
        elif f.suffix == ".json":
            json.loads(f.read_text())


def _outcome(run_dir: Path) -> dict[str, tuple]:
    """Dialogue id -> (message texts, per-turn judge scores), from every whole line of dialogues.jsonl."""
    out: dict[str, tuple] = {}
    for line in _lines(run_dir / "dialogues.jsonl"):
        d = Dialogue.model_validate_json(line)
        assert d.id not in out, f"dialogue {d.id} written twice"
        scores = tuple(sorted((v.extra["turn"], tuple(sorted(v.scores.items()))) for v in d.verdicts))
        out[d.id] = (tuple((m.role, m.content) for m in d.messages), scores)
    return out


def test_sigkilled_evaluation_resumes_to_the_uninterrupted_result(tmp_path, loopback_server):
    student = loopback_server(backend=ScriptedBackend(_student, name="student"), latency=LATENCY)
    judge = loopback_server(backend=ScriptedBackend(lambda r: JUDGE_VERDICT, name="judge"), latency=LATENCY)
    bench, runs = _bench(tmp_path / "bench" / "bench.jsonl"), tmp_path / "runs"
    args = (bench, runs)

    clean = _start(*args, "clean", student.base_url, judge.base_url)
    assert clean.wait(timeout=300) == 0, clean.stdout.read().decode()
    clean_requests = _requests(student, judge)
    assert clean_requests == N_ITEMS * MAX_TURNS * 2  # one student and one judge call per turn
    expected = _outcome(runs / "eval" / "clean")
    assert len(expected) == N_ITEMS

    killed_dir = runs / "eval" / "killed"
    proc = _start(*args, "killed", student.base_url, judge.base_url)
    deadline = time.monotonic() + 240
    # wait for a chunk on disk and requests on the wire, so the kill lands mid-run, mid-chunk
    while not (_lines(killed_dir / "dialogues.jsonl") and student.stats()["in_flight"] + judge.stats()["in_flight"]):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.005)
    before = [s.stats() for s in (student, judge)]
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    after = [s.stats() for s in (student, judge)]
    written = _outcome(killed_dir)
    assert 0 < len(written) < N_ITEMS, f"the kill landed outside the run ({len(written)} items written)"
    _every_file_parses(killed_dir)
    # Calls whose reply was lost to the kill: those in flight at the snapshot before it, those started
    # between that snapshot and the kill, and replies the server sent that the child had not read and
    # cached yet (at most its concurrency, CHUNK student calls plus the judge calls of the chunk's turns).
    lost = sum(b["in_flight"] for b in before) + sum(a["requests"] - b["requests"] for a, b in zip(after, before))
    lost += CHUNK * (1 + MAX_TURNS)
    killed_requests = _requests(student, judge) - clean_requests

    resumed = _start(*args, "killed", student.base_url, judge.base_url)
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read().decode()
    total = _requests(student, judge) - clean_requests
    # The rerun skips the items in dialogues.jsonl and answers the finished calls of the cut chunk from
    # the reply cache, so only the calls lost to the kill go to the servers again.
    print(f"clean {clean_requests} requests; killed {killed_requests} + resumed {total - killed_requests};"
          f" lost-to-kill bound {lost}; {len(written)} of {N_ITEMS} items on disk at the kill")
    assert total <= clean_requests + lost, (total, clean_requests, lost, killed_requests)
    assert total >= clean_requests  # every call was made at least once
    _every_file_parses(killed_dir)
    assert _outcome(killed_dir) == expected
    manifest = json.loads((killed_dir / "manifest.json").read_text())
    assert manifest["status"] == "finished" and len(manifest["resumed_at"]) == 1
    assert manifest["evaluation"]["counts"]["dialogues"] == N_ITEMS


SYNTHESIZE = """
import sys
from steerkit.roles import Roles
from steerkit.runs import open_run
from steerkit.synth.synthesize import SynthParams, synthesize

runs, run_id, target = sys.argv[1:]
params = SynthParams(n_benign=4, n_obfuscated=4, n_redteam=4, chunk_size=2, bench_share=0.25)
roles = Roles({"generator": "rules", "red_user": "rules", "blue_expert": "rules", "evaluator": "rules",
               "target": target}, cache_dir=f"{runs}/cache-{run_id}")
synthesize(open_run("01_synthesize_steer", run_id=run_id, root=runs, parameters=params.manifest()), roles, params)
"""


def test_sigkilled_synthesis_resumes_to_the_same_splits(tmp_path, loopback_server):
    from steerkit.backends.scripted import named_double
    from steerkit.synth import splits as sp

    target = loopback_server(backend=named_double("complier"), latency=LATENCY)
    runs = tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "HF_HUB_OFFLINE": "1"}

    def start(run_id: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", SYNTHESIZE, str(runs), run_id,
                                 f"openai:scripted:complier@{target.base_url}"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    clean = start("clean")
    assert clean.wait(timeout=300) == 0, clean.stdout.read().decode()
    clean_requests = target.stats()["requests"]
    proc = start("killed")
    deadline = time.monotonic() + 240
    while not target.stats()["in_flight"]:  # the kill lands while the target's plays are on the wire
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.005)
    time.sleep(LATENCY * 3)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    killed = runs / "01_synthesize_steer" / "killed"
    assert json.loads((killed / "manifest.json").read_text())["status"] == "running"
    _every_file_parses(killed)
    resumed = start("killed")
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read().decode()
    _every_file_parses(killed)
    clean_dir = runs / "01_synthesize_steer" / "clean"
    manifests = [json.loads((d / "manifest.json").read_text()) for d in (clean_dir, killed)]
    assert manifests[1]["status"] == "finished"
    assert manifests[0]["summary"]["splits"] == manifests[1]["summary"]["splits"]
    for name in (sp.SFT_FILE, sp.RL_FILE, sp.BENCH_FILE):
        ids = [json.loads(line).get("id", json.loads(line).get("question_id")) for line in _lines(killed / name)]
        assert len(ids) == len(set(ids)), f"{name}: a record written twice"
        clean_ids = [json.loads(line).get("id", json.loads(line).get("question_id")) for line in _lines(clean_dir / name)]
        assert sorted(ids) == sorted(clean_ids), name
    # Finished target plays were cached before the kill, so the rerun repeats at most those in flight.
    print(f"synthesis: clean {clean_requests} target requests; killed + resumed"
          f" {target.stats()['requests'] - clean_requests}; max in flight {target.stats()['max_in_flight']}")
    assert target.stats()["requests"] - clean_requests <= clean_requests + target.stats()["max_in_flight"]
