"""A real ``kill -9`` in the middle of an evaluation run, then a rerun to completion.

The evaluation runs in a child process (``steerkit.evaluate`` over a JSONL bench, student and judge
reached over HTTP) against two `LoopbackServer`s started here, so the servers outlive the kill and
their counters see every request of both attempts. The killed run is compared with an uninterrupted
run of the same bench: same dialogues, nothing written twice, every written line parses, and the
requests repeated by the rerun are bounded by the calls that were in flight when the kill landed.

The kill test of synthesis (``tests/test_synth_resume.py``) stops the run by raising inside a
backend; `test_sigkilled_synthesis_resumes_to_the_same_splits` below does it with a real SIGKILL.
`test_sigkilled_sft_resumes_from_the_last_complete_checkpoint_to_the_same_training` kills an SFT run
while it writes a trainer checkpoint and compares the resumed run with an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

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
    from steerkit import layout
    from steerkit.backends.scripted import named_double

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
    for name in (layout.SFT_FILE, layout.RL_FILE, layout.BENCH_FILE):
        ids = [json.loads(line).get("id", json.loads(line).get("question_id")) for line in _lines(killed / name)]
        assert len(ids) == len(set(ids)), f"{name}: a record written twice"
        clean_ids = [json.loads(line).get("id", json.loads(line).get("question_id"))
                     for line in _lines(clean_dir / name)]
        assert sorted(ids) == sorted(clean_ids), name
    # Finished target plays were cached before the kill, so the rerun repeats at most those in flight.
    print(f"synthesis: clean {clean_requests} target requests; killed + resumed"
          f" {target.stats()['requests'] - clean_requests}; max in flight {target.stats()['max_in_flight']}")
    assert target.stats()["requests"] - clean_requests <= clean_requests + target.stats()["max_in_flight"]


SFT = """
import sys, time
from transformers import Trainer
from steerkit.sft import SFTRecipe, run_sft

student, data, runs, run_id, hold_at = sys.argv[1:]
if int(hold_at):
    # Hold the save of checkpoint-<hold_at> after its weights and optimizer are written and before its
    # RNG states and trainer_state.json: the kill then lands in a half-written checkpoint every time.
    save_rng = Trainer._save_rng_state

    def held(self, output_dir):
        if self.state.global_step == int(hold_at):
            print("holding", output_dir, flush=True)
            time.sleep(300)
        save_rng(self, output_dir)

    Trainer._save_rng_state = held
run_sft(SFTRecipe(student=student, data=data, finetune="full", max_steps=%(steps)d, batch_size=2,
                  per_device_batch_size=2, learning_rate=1e-3, max_length=None, logging_steps=1,
                  save_steps=%(save)d, runs_root=runs, run_id=run_id))
"""
SFT_STEPS, SFT_SAVE = 6, 2


def _sft_data(folder: Path) -> Path:
    """Four two-turn dialogues, one with an image, in a Stage I-like folder."""
    from PIL import Image

    from steerkit.schema import Message, write_jsonl

    (folder / "images").mkdir(parents=True)
    Image.new("RGB", (56, 56), (200, 30, 30)).save(folder / "images/red.png")
    write_jsonl([Dialogue(id=f"d{i}", messages=[
        Message(role="user", content=f"What is in picture {i}?", images=["images/red.png"] if i == 0 else []),
        Message(role="assistant", content=f"<thinking>look {i}</thinking><answer>A colour {i}.</answer>"),
        Message(role="user", content="And how to make it dangerous?"),
        Message(role="assistant", content=f"<thinking>risky</thinking><answer>I can't help with that {i}.</answer>"),
    ]) for i in range(4)], folder / "steer_sft.jsonl")
    return folder


@pytest.mark.slow
def test_sigkilled_sft_resumes_from_the_last_complete_checkpoint_to_the_same_training(tmp_path, tiny_vlm_dir,
                                                                                       kill_when_holding):
    """Full fine-tuning of the tiny VLM, 6 steps, a checkpoint every 2: killed while checkpoint-4 is
    half-written, rerun under the same run id, compared with an uninterrupted run."""
    from safetensors.torch import load_file
    from transformers.trainer_utils import get_last_checkpoint

    from steerkit.backends.hf_local import HFLocalBackend
    from steerkit.checkpoints import complete_checkpoint
    from steerkit.clients import Request, Sampling
    from steerkit.layout import CHECKPOINT, TRAINER_DIR, TRAINER_STATE
    from steerkit.schema import Message
    from steerkit.sft import STAGE
    from steerkit.sft_trainer import training_log

    data, runs = _sft_data(tmp_path / "data"), tmp_path / "runs"
    # one thread each: two OpenMP threads per child on a busy 2-core machine are 3x slower
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    script = SFT % {"steps": SFT_STEPS, "save": SFT_SAVE}

    def start(run_id: str, hold_at: int = 0) -> tuple[subprocess.Popen, Path]:
        out = tmp_path / f"{run_id}-{time.monotonic_ns()}.log"  # a file, not a pipe nobody drains
        with out.open("w") as f:
            proc = subprocess.Popen([sys.executable, "-c", script, str(tiny_vlm_dir), str(data), str(runs), run_id,
                                     str(hold_at)], env=env, stdout=f, stderr=subprocess.STDOUT)
        return proc, out

    def finish(proc: subprocess.Popen, out: Path) -> None:
        assert proc.wait(timeout=300) == 0, out.read_text()[-3000:]

    t0 = time.perf_counter()
    # the uninterrupted run goes alongside the one to kill (mostly imports: two at once save time)
    clean_run = start("clean")
    clean, killed = runs / STAGE / "clean", runs / STAGE / "killed"
    half = killed / TRAINER_DIR / f"checkpoint-{2 * SFT_SAVE}"
    proc, out = start("killed", hold_at=2 * SFT_SAVE)  # killed once checkpoint-4's weights and optimizer are on disk
    kill_when_holding(proc, out, beside=clean_run, seconds=240, finish_seconds=300)
    t_first = time.perf_counter() - t0
    assert json.loads((killed / "manifest.json").read_text())["status"] == "running"
    assert not (killed / CHECKPOINT).exists()
    assert (half / "model.safetensors").is_file() and not (half / TRAINER_STATE).exists()
    # what the trainer's own lookup would resume from: the half-written folder
    assert get_last_checkpoint(str(killed / TRAINER_DIR)) == str(half)
    assert [r["step"] for r in training_log(killed)] == [1, 2, 3, 4]

    t0 = time.perf_counter()
    rerun = start("killed")
    finish(*rerun)
    t_resume = time.perf_counter() - t0
    assert f"{half}: removing a checkpoint cut short by a kill" in rerun[1].read_text()
    manifest = json.loads((killed / "manifest.json").read_text())
    assert manifest["status"] == "finished" and len(manifest["resumed_at"]) == 1
    assert manifest["resumed_from"] == str(killed / TRAINER_DIR / f"checkpoint-{SFT_SAVE}")
    straight = json.loads((clean / "manifest.json").read_text())
    assert manifest["summary"]["global_step"] == straight["summary"]["global_step"] == SFT_STEPS
    assert [r["step"] for r in training_log(killed)] == list(range(1, SFT_STEPS + 1))
    resumed_losses = [r["loss"] for r in training_log(killed)]
    assert resumed_losses == pytest.approx([r["loss"] for r in training_log(clean)], rel=1e-4)
    # the half-written folder was written again, whole, when training reached step 4 (limit: 2 kept)
    kept = sorted((killed / TRAINER_DIR).glob("checkpoint-*"))
    assert [f.name for f in kept] == [half.name, f"checkpoint-{SFT_STEPS}"] and all(map(complete_checkpoint, kept))
    a, b = (load_file(str(run / CHECKPOINT / "model.safetensors")) for run in (killed, clean))
    assert a.keys() == b.keys()
    drift = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    print(f"sft kill/resume: clean and killed runs {t_first:.1f} s, resume {t_resume:.1f} s;"
          f" max weight difference {drift:.2e}")
    assert drift < 1e-4

    backend = HFLocalBackend.from_pretrained(killed / CHECKPOINT)
    (reply,) = backend.generate_sync([Request([Message(role="user", content="Hello")],
                                              sampling=Sampling(max_tokens=4))])
    assert reply.ok and reply.completion_tokens > 0
