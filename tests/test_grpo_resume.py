"""GRPO batching and resume after a real SIGKILL, on the tiny VLM (wandb: tests/test_wandb_runs.py).

The kill test runs GRPO in a child process against a tutor served by a `LoopbackServer` started here,
so the server outlives the kill and counts every tutor request of both attempts. The child is held
(by a patch in its own script) after the rollout of step 3, past checkpoint-2, and killed with
SIGKILL there; the rerun under the same run id must reach the uninterrupted run's result: the same
steps, each logged once, the same losses, and no tutor request sent again for a finished step.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from steerkit.backends.scripted import ScriptedBackend
from steerkit.grpo import GRPORunConfig, batching_of
from steerkit.grpo_batching import resolve_batching
from steerkit.grpo_resume import trim_logs
from steerkit.layout import METRICS_FILE, TRAIN_LOG, TRAJECTORIES_FILE
from steerkit.runs import read_records

# ---- batching ------------------------------------------------------------------------------------


def test_the_authors_layout_and_the_full_profile_on_one_gpu():
    # the authors: 64 prompts x 5, micro-batch 2 per GPU on 4 GPUs -> 40 micro-batches per step
    four = resolve_batching(64, 5, per_device_batch=2, processes=4)
    assert (four.gradient_accumulation, four.rows_per_step, four.generation_batch) == (40, 320, 320)
    one = resolve_batching(64, 5, per_device_batch=2)
    assert one.gradient_accumulation == 160
    assert one.trl_args() == {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 160,
                              "num_generations": 5, "generation_batch_size": 320}
    assert one.manifest()["steps_per_generation"] == 160  # TRL's micro-steps per rollout
    # the default: a whole step in one pass, as before these fields existed
    assert resolve_batching(2, 4).trl_args()["per_device_train_batch_size"] == 8


def test_the_full_profile_stage_03_layout(monkeypatch):
    """configs/pipeline_full.yaml's GRPO stage: 64 x 5 in micro-batches of 2, on 1 GPU and on 4."""
    import dataclasses

    from steerkit.pipeline import load_recipe

    values = load_recipe("full")["stages"]["03"]
    fields = {f.name for f in dataclasses.fields(GRPORunConfig)}
    cfg = GRPORunConfig(**{k: v for k, v in values.items() if k in fields})
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    one = batching_of(cfg)
    assert (one.rows_per_step, one.per_device_batch, one.gradient_accumulation) == (320, 2, 160)
    assert cfg.save_steps and cfg.save_steps % one.steps_per_rollout == 0 and cfg.gradient_checkpointing
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert batching_of(cfg).gradient_accumulation == 40  # the authors' 4 GPUs


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"per_device_batch": 6, "gradient_accumulation": 8},
     ("GRPO batching: 64 x 5 = 320 rows per step do not divide into per-device batch 6 x accumulation 8 x 1 process"
      " (= 48 rows); choose per_device_batch x gradient_accumulation x processes = 320")),
    ({"per_device_batch": 3}, "320 rows per step do not divide into per-device batch 3 x 1 process"),
    ({"gradient_accumulation": 7, "processes": 2}, "320 rows per step do not divide into accumulation 7 x 2 processes"),
    ({"generation_batch": 480}, "generation_batch 480 is not a whole number of steps; use a multiple of 320"),
    ({"generation_batch": 640, "save_steps": 3}, "covers 2 steps, so save_steps (3) must be a multiple of 2"),
])
def test_a_layout_that_does_not_add_up_says_the_arithmetic(kwargs, message):
    with pytest.raises(ValueError) as err:
        resolve_batching(64, 5, **kwargs)
    assert message in str(err.value)


def test_run_grpo_refuses_a_bad_layout_before_it_creates_a_run(tmp_path):
    from steerkit.grpo import run_grpo

    with pytest.raises(ValueError, match="2 x 2 = 4 rows per step do not divide into per-device batch 3"):
        run_grpo(GRPORunConfig(prompts_per_step=2, num_generations=2, per_device_batch=3, runs_root=str(tmp_path)))
    assert not any(tmp_path.iterdir())


def test_trl_gets_the_layout(tiny_vlm_dir, tmp_path):
    from steerkit.grpo import make_trainer
    from steerkit.models import load_student
    from steerkit.rl_data import rl_rows
    from steerkit.smoke_inputs import seed_rl_dialogues

    model, proc = load_student(tiny_vlm_dir)
    scripts, root = seed_rl_dialogues(tmp_path / "rl", 2, turns=2)
    cfg = GRPORunConfig(prompts_per_step=2, num_generations=2, per_device_batch=1, generation_batch=8,
                        max_steps=2, lora=False)
    trainer = make_trainer(model, proc, rl_rows(scripts, root, vision=True), tutor=_client(), config=cfg,
                           output_dir=tmp_path / "t")
    a = trainer.args
    assert (a.per_device_train_batch_size, a.gradient_accumulation_steps, a.generation_batch_size,
            a.steps_per_generation, a.num_generations) == (1, 4, 8, 8, 2)
    assert trainer.batching == batching_of(cfg)


# ---- log trimming --------------------------------------------------------------------------------


def test_trim_logs_keeps_exactly_the_checkpointed_steps(tmp_path):
    def write(name, steps, torn=False):
        text = "".join(json.dumps({"step": s, "id": f"{s}-{k}"}) + "\n" for s in steps for k in range(2))
        (tmp_path / name).write_text(text + ('{"step": 9, "id"' if torn else ""))

    write(METRICS_FILE, [0, 1, 2])  # rollouts of steps 1..3 are numbered 0..2
    write(TRAJECTORIES_FILE, [0, 1, 2], torn=True)  # a record cut by the kill
    write(TRAIN_LOG, [1, 2, 3])
    assert trim_logs(tmp_path, 2) == {METRICS_FILE: 2, TRAJECTORIES_FILE: 2, TRAIN_LOG: 2}
    assert [r["step"] for r in read_records(tmp_path / METRICS_FILE)] == [0, 0, 1, 1]
    assert [r["step"] for r in read_records(tmp_path / TRAJECTORIES_FILE)] == [0, 0, 1, 1]
    assert [r["step"] for r in read_records(tmp_path / TRAIN_LOG)] == [1, 1, 2, 2]
    assert trim_logs(tmp_path, 2) == {}
    trim_logs(tmp_path, 0)  # no checkpoint: everything goes
    assert all(read_records(tmp_path / n) == [] for n in (METRICS_FILE, TRAJECTORIES_FILE, TRAIN_LOG))


# ---- the tutor ---------------------------------------------------------------------------------------


def grade(request) -> str:
    """A tutor whose scores are a function of the request's content (so a repeated question gets the
    same answer whether it is served or cached), varied enough that GRPO groups differ."""
    text = "".join(m.content if isinstance(m.content, str) else json.dumps(m.content, default=str)
                   for m in request.messages)
    level = 1 + int(hashlib.sha256(text.encode()).hexdigest(), 16) % 10
    return json.dumps({"diagnosis": "graded", "attack_strategy": "persistence", "new_question": "",
                       "scores": {"safety": level, "usefulness": level, "faithfulness": 5}})


def _client():
    from steerkit.clients import ChatClient

    return ChatClient(ScriptedBackend(grade, name="graded"), role="tutor")


# ---- kill -9 and resume ----------------------------------------------------------------------------

# 6 prompts, 2 a step: checkpoint-2 falls inside epoch 1 and step 4 starts epoch 2
GRPO = """
import sys, time
from steerkit import grpo_resume
from steerkit.grpo import GRPORunConfig, run_grpo

student, tutor, runs, run_id, hold_at = sys.argv[1:]
if int(hold_at):
    # Hold after the rollout of the step after checkpoint-<hold_at>: its tutor replies are cached and
    # its metrics written, its update not made. The kill lands there every time.
    call = grpo_resume.StepRollout.__call__

    def held(self, prompts, trainer):
        out = call(self, prompts, trainer)
        if trainer.state.global_step == int(hold_at):
            print("holding", flush=True)
            time.sleep(300)
        return out

    grpo_resume.StepRollout.__call__ = held
run_grpo(GRPORunConfig(student=student, tutor=tutor, prompts_per_step=2, num_generations=2, per_device_batch=2,
                       gradient_accumulation=2, max_steps=%(steps)d, save_steps=%(save)d, max_turns=2,
                       max_new_tokens=6, lora=False, learning_rate=1e-3, with_images=True, n_prompts=6, runs_root=runs,
                       run_id=run_id))
"""
STEPS, SAVE = 4, 2


@pytest.mark.slow
def test_sigkilled_grpo_resumes_from_its_last_checkpoint_without_asking_the_tutor_again(
        tmp_path, tiny_vlm_dir, loopback_server, kill_when_holding):
    from steerkit.checkpoints import complete_checkpoint
    from steerkit.grpo import STAGE
    from steerkit.layout import TRAINER_DIR

    # one tutor server for the uninterrupted run, one for the killed run and its rerun
    backends = {run_id: ScriptedBackend(grade, name="graded") for run_id in ("clean", "killed")}
    servers = {run_id: loopback_server(backend=b) for run_id, b in backends.items()}
    runs = tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    script = GRPO % {"steps": STEPS, "save": SAVE}

    def start(run_id: str, hold_at: int = 0) -> tuple[subprocess.Popen, Path]:
        out = tmp_path / f"{run_id}-{time.monotonic_ns()}.log"
        tutor = f"openai:{servers[run_id].model}@{servers[run_id].base_url}"
        with out.open("w") as f:
            proc = subprocess.Popen([sys.executable, "-c", script, str(tiny_vlm_dir), tutor, str(runs), run_id,
                                     str(hold_at)], env=env, stdout=f, stderr=subprocess.STDOUT)
        return proc, out

    def finish(proc: subprocess.Popen, out: Path) -> None:
        assert proc.wait(timeout=400) == 0, out.read_text()[-3000:]

    def requests(run_id: str) -> list[str]:
        return [json.dumps([m.content for m in r.messages], default=str) for r in backends[run_id].calls]

    t0 = time.perf_counter()
    clean, killed = runs / STAGE / "clean", runs / STAGE / "killed"
    clean_run = start("clean")  # alongside the run to kill: mostly imports, two at once save time
    proc, out = start("killed", hold_at=SAVE)
    kill_when_holding(proc, out, beside=clean_run, seconds=300, finish_seconds=400)
    t_first = time.perf_counter() - t0
    clean_requests = requests("clean")
    clean_trajs = read_records(clean / TRAJECTORIES_FILE)
    # one tutor call per answered turn: the server's count is the run's own
    assert len(clean_requests) == sum(len(t["answers"]) for t in clean_trajs) > 0
    assert json.loads((clean / "manifest.json").read_text())["summary"]["unscored"] == 0
    calls_after_save = sum(len(t["answers"]) for t in clean_trajs if t["step"] >= SAVE)
    killed_requests = requests("killed")
    assert json.loads((killed / "manifest.json").read_text())["status"] == "running"
    assert complete_checkpoint(killed / TRAINER_DIR / f"checkpoint-{SAVE}")
    assert [m["step"] for m in read_records(killed / METRICS_FILE)] == [0, 1, 2]  # step 3 rolled out, not saved
    # the killed run asked what the clean run asked, step for step (sampling is seeded per step; the
    # calls of one turn are concurrent, so they reach the server in any order)
    assert Counter(killed_requests) == Counter(clean_requests[:len(killed_requests)])

    t0 = time.perf_counter()
    rerun = start("killed")
    finish(*rerun)
    t_resume = time.perf_counter() - t0
    resumed_requests = requests("killed")[len(killed_requests):]
    print(f"grpo kill/resume: clean and killed runs {t_first:.1f} s, resume {t_resume:.1f} s; tutor requests: clean"
          f" {len(clean_requests)}, killed {len(killed_requests)}, resumed {len(resumed_requests)}"
          f" (steps after checkpoint-{SAVE} in the clean run: {calls_after_save})")
    # Nothing a finished step asked is asked again: steps 1-2 are in the checkpoint, step 3's replies
    # come from the run's reply cache, so the rerun asks only step 4's questions.
    assert not set(resumed_requests) & set(killed_requests)
    assert len(killed_requests) + len(resumed_requests) == len(clean_requests)
    assert Counter(resumed_requests) == Counter(clean_requests[len(killed_requests):])
    assert 0 < len(resumed_requests) < calls_after_save

    manifest = json.loads((killed / "manifest.json").read_text())
    assert manifest["status"] == "finished" and len(manifest["resumed_at"]) == 1
    assert manifest["resumed_from"] == str(killed / TRAINER_DIR / f"checkpoint-{SAVE}")
    assert manifest["resumed_at_step"] == SAVE
    assert manifest["summary"]["global_step"] == STEPS
    assert manifest["batching"]["gradient_accumulation"] == 2 and manifest["batching"]["per_device_batch"] == 2
    straight = json.loads((clean / "manifest.json").read_text())
    assert straight["summary"]["global_step"] == STEPS
    # every step logged once, and the same as the uninterrupted run
    assert [r["step"] for r in read_records(killed / METRICS_FILE)] == list(range(STEPS))
    step_logs = [r for r in read_records(killed / TRAIN_LOG) if "loss" in r]  # not the end-of-training summary
    assert [r["step"] for r in step_logs] == list(range(1, STEPS + 1))
    trajs = read_records(killed / TRAJECTORIES_FILE)
    assert sorted((t["step"], t["row"]) for t in trajs) == sorted((t["step"], t["row"]) for t in clean_trajs)
    assert [t["answers"] for t in trajs] == [t["answers"] for t in clean_trajs]
    keys = ("loss", "kl", "grad_norm", "tcsr/value")
    resumed_log = [r[k] for r in step_logs for k in keys]
    clean_log = [r[k] for r in read_records(clean / TRAIN_LOG) if "loss" in r for k in keys]
    assert resumed_log == pytest.approx(clean_log, rel=1e-4, abs=1e-12)
    # after the resume the KL is still measured from the initial model, not from the checkpoint
    assert all(r["kl"] > 0 for r in step_logs[SAVE:])


def test_a_lora_run_resumes_through_the_trainer_to_the_same_steps(tiny_vlm_dir, tmp_path):
    """A LoRA run, cut back to its checkpoint-1 as a kill after step 2's rollout would leave it (the
    later checkpoint, the final model and the summary gone, step 2's logs still there), resumes to
    the uninterrupted run's step 2."""
    import shutil

    from steerkit.grpo import STAGE, run_grpo
    from steerkit.layout import TRAINER_DIR
    from steerkit.runs import atomic_write_json

    cfg = GRPORunConfig(student=str(tiny_vlm_dir), prompts_per_step=2, num_generations=2, max_steps=2, save_steps=1,
                        max_turns=2, max_new_tokens=6, lora=True, learning_rate=1e-2, n_prompts=4,
                        runs_root=str(tmp_path), run_id="lora")
    run_dir = tmp_path / STAGE / "lora"
    tutor = _client()
    run_grpo(cfg, tutor_client=tutor)
    clean = {n: read_records(run_dir / n) for n in (METRICS_FILE, TRAIN_LOG, TRAJECTORIES_FILE)}
    shutil.rmtree(run_dir / TRAINER_DIR / "checkpoint-2")
    shutil.rmtree(run_dir / "checkpoint")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest.pop("summary")
    atomic_write_json(run_dir / "manifest.json", {**manifest, "status": "running"})
    calls = tutor.usage.calls
    result = run_grpo(cfg, tutor_client=tutor)
    assert result.checkpoint.is_dir() and tutor.usage.calls - calls == sum(
        len(t["answers"]) for t in clean[TRAJECTORIES_FILE] if t["step"] == 1)  # only step 2 rolled out again
    assert json.loads((run_dir / "manifest.json").read_text())["resumed_at_step"] == 1
    for name, records in clean.items():
        again = read_records(run_dir / name)
        assert [r["step"] for r in again] == [r["step"] for r in records], name
    keys = ("loss", "kl", "grad_norm")
    resumed = [r[k] for r in read_records(run_dir / TRAIN_LOG) if "loss" in r for k in keys]
    assert resumed == pytest.approx([r[k] for r in clean[TRAIN_LOG] if "loss" in r for k in keys], rel=1e-4, abs=1e-12)
