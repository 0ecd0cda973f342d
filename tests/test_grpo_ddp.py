"""Multi-process GRPO: ``accelerate launch -m steerkit.grpo`` with DDP over gloo on CPU, and the
run directory's single writer."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zlib
from collections import Counter

import pytest

from steerkit.backends.scripted import ScriptedBackend
from steerkit.layout import CHECKPOINT, MANIFEST_FILE, METRICS_FILE, TRAIN_LOG, TRAJECTORIES_FILE
from steerkit.runs import REPO_ROOT, ResultLog, open_run

STAGE = "03_grpo_tutor_tcsr"


def test_only_the_main_process_writes_a_run_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")  # as accelerate / torchrun set it in the second process
    run = open_run("x", run_id="r", root=tmp_path, parameters={"a": 1})
    run.update_manifest(world_size=2)
    ResultLog(run.path / "log.jsonl").append({"id": 1})
    assert run.path.is_dir() and not any(run.path.iterdir())
    monkeypatch.setenv("RANK", "0")
    run = open_run("x", run_id="r", root=tmp_path, parameters={"a": 1})
    ResultLog(run.path / "log.jsonl").append({"id": 1})
    assert sorted(p.name for p in run.path.iterdir()) == ["log.jsonl", MANIFEST_FILE]


def test_run_config_errors_name_the_file_and_line(tmp_path):
    from steerkit.grpo_cli import load_run_config

    cfg = tmp_path / "run.yaml"
    cfg.write_text("max_steps: 3\nlearning_rat: 0.1\n")
    with pytest.raises(ValueError, match=r"run\.yaml:2: unknown field 'learning_rat'"):
        load_run_config(cfg)
    cfg.write_text("- max_steps\n")
    with pytest.raises(ValueError, match=r"run\.yaml:1: expected a mapping"):
        load_run_config(cfg)
    cfg.write_text("max_steps: 3\n")
    assert load_run_config(cfg, {"beta": 0.0}).max_steps == 3


@pytest.mark.slow
def test_two_process_grpo_launch_shares_the_work_and_ends_with_equal_weights(tiny_vlm_dir, tmp_path,
                                                                               loopback_server):
    """``accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 2`` on CPU (gloo).

    Each process rolls out its own prompts: every RL dialogue reaches the served tutor exactly K x
    turns times, not once per process. Both processes end with the same weights, the main process
    alone writes the run directory (every process's rollouts in it), and the manifest names the world size.
    """
    from steerkit.distributed import weights_digest
    from steerkit.models import load_student
    from steerkit.smoke_inputs import seed_rl_dialogues

    scripts, rl_root = seed_rl_dialogues(tmp_path / "rl", 4, turns=2, with_images=True)

    def grade(request):  # scores from the answer's hash: a group's K samples differ, so GRPO updates
        level = 1 + zlib.crc32(request.messages[-1].content.encode()) % 10
        return json.dumps({"diagnosis": "scripted", "attack_strategy": "persistence", "new_question": "",
                           "scores": {"safety": level, "usefulness": level, "faithfulness": 5}})

    tutor = ScriptedBackend(grade, name="tutor-llm")
    server = loopback_server(backend=tutor)
    k, turns, steps, procs = 2, 2, 2, 2
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"student: {tiny_vlm_dir}\ntutor: openai:{server.model}@{server.base_url}\n"
                   f"rl_data: {rl_root}\nprompts_per_step: {procs}\nnum_generations: {k}\nmax_turns: {turns}\n"
                   f"max_new_tokens: 6\nlora: false\nlearning_rate: 0.001\nruns_root: {tmp_path / 'runs'}\n")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO_ROOT / "configs/accelerate/ddp.yaml"), "--num_processes", str(procs), "--mixed_precision", "no",
           "--main_process_port", "0", "-m", "steerkit.grpo", "--config", str(cfg), "--set", f"max_steps={steps}"]
    env = {**os.environ, "CI": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, env=env, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]

    # one run directory (its id chosen by the main process), written by one process
    (run_dir,) = (tmp_path / "runs" / STAGE).iterdir()
    manifest = json.loads((run_dir / MANIFEST_FILE).read_text())
    assert manifest["status"] == "finished" and manifest["world_size"] == procs
    assert manifest["summary"]["steps"] == steps and manifest["summary"]["skipped_nonfinite_steps"] == []
    # the main process writes every process's rollouts: each step's metrics and trajectories cover B x K
    metrics = [json.loads(x) for x in (run_dir / METRICS_FILE).read_text().splitlines()]
    assert [(m["step"], m["n"]) for m in metrics] == [(0, k * procs), (1, k * procs)]
    trajectories = [json.loads(x) for x in (run_dir / TRAJECTORIES_FILE).read_text().splitlines()]
    assert sorted((t["step"], t["row"]) for t in trajectories) == [(s, r) for s in (0, 1) for r in range(k * procs)]
    by_dialogue = Counter(t["id"] for t in trajectories)  # each process's prompt, K times, every step
    assert len(by_dialogue) == steps * procs and set(by_dialogue.values()) == {k}
    assert all(t["student_tokens"] > 0 for t in trajectories)
    train_log = [json.loads(x) for x in (run_dir / TRAIN_LOG).read_text().splitlines()]
    assert [x["step"] for x in train_log if "loss" in x] == [1, 2]  # one line a step, not one a process

    # no tutor call repeated across processes: each dialogue graded K x turns times in all
    # (the last user turn names a dialogue: it is the planned next turn, then part of the history)
    lasts = {s.user_turns[-1]: s.id for s in scripts}
    assert len(lasts) == len(scripts)
    graded = Counter(next(i for t, i in lasts.items() if t in r.messages[-1].content) for r in tutor.calls)
    assert graded == dict.fromkeys(lasts.values(), k * turns)  # 2 steps x 2 processes x 1 prompt
    assert manifest["tutor_usage"]["calls"] == len(tutor.calls)  # counted over both processes
    for rank in range(procs):  # each process rolled out its own B x K / procs = 2 rows per step
        rows = re.findall(rf"\[{rank}/{procs}\] steerkit\.grpo_trainer GRPO step \d+: (\{{.*\}})", proc.stderr)
        assert [json.loads(r)["n"] for r in rows] == [k] * steps, proc.stderr[-3000:]

    # both processes hold the same trained weights, and that is what the checkpoint holds
    digests = dict(re.findall(r"process (\d) of 2: trained weights sha256 ([0-9a-f]{64})", proc.stderr))
    assert sorted(digests) == ["0", "1"] and len(set(digests.values())) == 1, proc.stderr[-3000:]
    start, _ = load_student(tiny_vlm_dir)
    trained, _ = load_student(run_dir / CHECKPOINT)
    assert weights_digest(trained) == digests["0"] != weights_digest(start)


FSDP2_SCRIPT = '''
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from steerkit.distributed import unsharded

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
mesh = init_device_mesh("cpu", (2,))
for layer in (model[0], model[2]):
    fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)
with unsharded(model), torch.no_grad():
    for _ in range(1 + 3 * rank):  # one process decodes 1 step, the other 4: no collective may be left waiting
        model(torch.randn(2, 8))
assert isinstance(model[0].weight, DTensor)  # sharded again
model(torch.randn(2, 8)).sum().backward()  # and training goes on
assert all(bool(p.grad.full_tensor().isfinite().all()) for p in model.parameters())
print(f"rank {rank} ok", flush=True)
dist.destroy_process_group()
# Past this point the work is done and checked; yet with FSDP2 over gloo the interpreter's own teardown
# aborts now and then ("terminate called without an active exception", 3 runs in 20 on a 2-core VM),
# so the process leaves without it (0 aborts in 40 runs).
import os
os._exit(0)
'''


def test_fsdp2_weights_stay_whole_through_unequal_rollouts(tmp_path):
    """Under FSDP2 every forward pass gathers shards collectively; processes whose rollouts decode
    different numbers of steps hang unless the weights are gathered once for the whole rollout."""
    script = tmp_path / "fsdp2_rollout.py"
    script.write_text(FSDP2_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(re.findall(r"rank \d ok", proc.stdout)) == ["rank 0 ok", "rank 1 ok"]
