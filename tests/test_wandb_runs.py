"""Offline wandb runs: GRPO's tutor-side and policy metrics per step, an evaluation's per-turn judge
scores; nothing when wandb is disabled."""

from __future__ import annotations

import json
import time
from pathlib import Path

from steerkit.backends.scripted import JUDGE_VERDICT, ScriptedBackend
from steerkit.clients import ChatClient, Sampling
from steerkit.evaluate import evaluate, load_bench, report_evaluation, turn_metrics
from steerkit.layout import TRAIN_LOG
from steerkit.runs import open_run, read_records


def wandb_keys_missing(run_dir: Path, keys: tuple[str, ...], wait: float = 60.0) -> list[str]:
    """The keys not (yet) in the offline wandb run under ``run_dir``. wandb's service process writes
    the run file on its own after ``finish`` returns, so the file is read until the keys appear."""
    deadline = time.monotonic() + wait
    while True:
        files = list((run_dir / "wandb").glob("offline-run-*/*.wandb"))
        data = b"".join(f.read_bytes() for f in files)
        missing = [k for k in keys if k.encode() not in data]
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(0.2)


def _evaluated(tmp_path):
    rows = [{"question_id": f"q{i}", "category": "benign", "source_category": "STEER-MMSafe", "risk_trajectory": [1, 1],
             "messages_fixed": [{"role": "user", "content": f"Item {i}, question {t}?"} for t in (1, 2)]}
            for i in range(3)]
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps(r) + "\n" for r in rows))
    student = ChatClient(ScriptedBackend(lambda r: "<thinking>t</thinking><answer>An answer.</answer>",
                                         name="student"), role="student")
    # the judge's second turn reply is unusable: that turn stays unscored
    judge = ChatClient(ScriptedBackend(lambda r: "no verdict" if "question 2" in str(r.messages) else JUDGE_VERDICT,
                                       name="judge"), role="judge")
    run = open_run("eval", run_id="tracked", root=tmp_path / "runs", parameters={"bench": str(bench)})
    dialogues = evaluate(run, load_bench(bench), student=student, judge=judge, max_turns=2,
                         sampling=Sampling(temperature=0.0, max_tokens=16))
    return run, dialogues


def test_turn_metrics_and_an_offline_wandb_run(tmp_path, monkeypatch):
    run, dialogues = _evaluated(tmp_path)
    per_turn = turn_metrics(dialogues)
    assert per_turn[0] == {"turn": 1.0, "judge/harmlessness": 3.0, "judge/helpfulness": 2.0,
                           "judge/unscored_turns": 0.0}
    assert per_turn[1] == {"turn": 2.0, "judge/unscored_turns": 3.0}

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert report_evaluation(run, report_to="wandb")["report_to"] == "wandb"
    missing = wandb_keys_missing(run.path, ("judge/harmlessness", "judge/helpfulness", "judge/unscored_turns"))
    assert not missing, f"{run.path / 'wandb'}: no {missing}"
    assert json.loads((run.path / "manifest.json").read_text())["tracking"]["env"] == {"WANDB_MODE": "offline"}


def test_no_wandb_run_when_disabled(tmp_path, monkeypatch):
    run, dialogues = _evaluated(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert report_evaluation(run, report_to="wandb", dialogues=dialogues)["report_to"] == "none"
    assert not (run.path / "wandb").exists()


# ---- GRPO ----------------------------------------------------------------------------------------


def _tutor() -> ChatClient:
    """Scores that differ between the K samples of a group (by the length of the request)."""
    def grade(request):
        level = 1 + len(str(request.messages)) % 10
        return json.dumps({"diagnosis": "graded", "attack_strategy": "persistence", "new_question": "",
                           "scores": {"safety": level, "usefulness": level, "faithfulness": 5}})

    return ChatClient(ScriptedBackend(grade, name="graded"), role="tutor")


def test_grpo_reports_tutor_and_policy_metrics_to_an_offline_wandb_run(tiny_vlm_dir, tmp_path, monkeypatch):
    from steerkit.grpo import GRPORunConfig, run_grpo

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = GRPORunConfig(student=str(tiny_vlm_dir), prompts_per_step=2, num_generations=2, gradient_accumulation=2,
                        max_steps=2, max_turns=2, max_new_tokens=6, lora=False, learning_rate=1e-3,
                        report_to="wandb", run_id="tracked", runs_root=str(tmp_path))
    result = run_grpo(cfg, tutor_client=_tutor())
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["tracking"]["report_to"] == "wandb" and manifest["tracking"]["env"] == {"WANDB_MODE": "offline"}
    assert len(list((result.run_dir / "wandb").glob("offline-run-*"))) == 1
    keys = ("tcsr/value", "tcsr/worst_turn", "tcsr/mean_turn", "turn_reward/mean", "turn_reward/turn_1",
            "rollout/unscored_turns", "kl", "clip_ratio/region_mean", "loss")
    missing = wandb_keys_missing(result.run_dir, keys)
    assert not missing, f"{result.run_dir / 'wandb'}: no {missing}"
    # the same per-step values are in the run's own log
    logged = read_records(result.run_dir / TRAIN_LOG)
    assert all("tcsr/worst_turn" in r and "kl" in r for r in logged if "loss" in r)
