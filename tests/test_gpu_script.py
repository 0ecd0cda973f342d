"""scripts/gpu_smoke.py on CPU at tiny sizes (what the GPU box runs, minus the GPU), its report and
budget, and the Unsloth command line's refusals where Unsloth cannot run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from steerkit.runs import REPO_ROOT
from steerkit.sft import SFTRecipe, main

SMOKE = REPO_ROOT / "scripts" / "gpu_smoke.py"
MARKER = "GPU_SMOKE "


def smoke(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SMOKE), *args], check=False, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO_ROOT,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"})


def results(stdout: str) -> dict[str, dict]:
    rows = [json.loads(ln[len(MARKER):]) for ln in stdout.splitlines() if ln.startswith(MARKER)]
    return {r["phase"]: r for r in rows}


@pytest.mark.slow
def test_dry_run_reports_every_phase_on_cpu(tmp_path: Path) -> None:
    proc = smoke("run", "--out", str(tmp_path), "--dry-run")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = results(proc.stdout)
    assert list(r) == ["environment", "build", "sft_hf", "sft_unsloth", "sft_full", "grpo_lora", "rollout", "grpo_full"]
    assert r["environment"]["device"] == "cpu" and r["build"]["shape"] == "tiny"
    for name in ("sft_hf", "sft_full"):
        assert r[name]["status"] == "ok" and r[name]["step_s"] > 0 and r[name]["tokens_per_s"] > 0, r[name]
        assert r[name]["steps_timed"] == 2 and r[name]["peak_gib"] is None  # no CUDA, no peak
    assert r["sft_hf"]["finetune"] == "lora" and r["sft_hf"]["vision_params_frozen"] == 0
    assert r["sft_hf"]["loss_on"] == "assistant tokens"  # transformers >= 5.18 here
    assert r["sft_full"]["finetune"] == "full" and r["sft_full"]["vision_params_frozen"] > 0
    assert r["sft_full"]["trainable_params"] > r["sft_hf"]["trainable_params"]
    assert r["sft_unsloth"]["status"] == "unavailable"
    assert "no CUDA GPU is visible" in r["sft_unsloth"]["reason"]
    lora, full = r["grpo_lora"], r["grpo_full"]
    assert (lora["learning_rate"], lora["lr_scheduler"], full["learning_rate"]) == (1e-3, "constant", 2e-6)
    for g in (lora, full):
        assert g["status"] == "ok" and g["steps_run"] == 2, g
        assert (g["B"] * g["K"], g["mini_batch"], g["accumulation"]) == (4, 2, 2)
        assert g["rollout_s"] > 0 and g["step_s"] >= g["rollout_s"] and g["rollout_tokens_per_step"] > 0
        assert g["grad_norms_logged"] == 2 and g["grad_norms_finite"] == 2 and g["skipped_nonfinite_steps"] == []
    assert set(r["rollout"]["by_batch"]) == {"2", "4"}
    assert all(v["tokens_per_s"] > 0 for v in r["rollout"]["by_batch"].values())
    # a readable line per phase, and the results file holds the same rows
    assert "sft_unsloth: unavailable" in proc.stdout and "rollout: tokens/s by trajectories" in proc.stdout
    assert "Unsloth vs HF SFT: not measured (no Unsloth result: unavailable)" in proc.stdout
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 8


@pytest.mark.slow
def test_isolated_phase_and_a_spent_budget(tmp_path: Path) -> None:
    """A phase in its own process (as on the GPU box) reports through its result line; with no
    budget left the phases are skipped, not started."""
    work = str(tmp_path / "work")  # the second run reuses the model built by the first
    proc = smoke("run", "--out", str(tmp_path / "a"), "--work", work, "--dry-run", "--isolate",
                 "--phases", "sft_unsloth")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert results(proc.stdout)["sft_unsloth"]["status"] == "unavailable"
    proc = smoke("run", "--out", str(tmp_path / "b"), "--work", work, "--dry-run", "--budget-s", "0",
                 "--phases", "sft_hf,rollout")
    r = results(proc.stdout)
    assert proc.returncode == 0 and r["sft_hf"]["status"] == r["rollout"]["status"] == "skipped", proc.stdout


def test_report_compares_unsloth_with_the_goal(tmp_path: Path) -> None:
    def write(unsloth_tps: float, unsloth_gib: float) -> str:
        rows = [{"phase": "sft_hf", "status": "ok", "step_s": 2.0, "tokens_per_s": 1000.0, "peak_gib": 40.0,
                 "batch": 4, "dialogue_tokens": 1500, "finetune": "lora"},
                {"phase": "sft_unsloth", "status": "ok", "step_s": 1.0, "tokens_per_s": unsloth_tps,
                 "peak_gib": unsloth_gib, "batch": 4, "dialogue_tokens": 1500, "finetune": "lora"}]
        (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return smoke("report", str(tmp_path), timeout=60).stdout

    assert ("Unsloth vs HF SFT: 1.60x the tokens/s, 0.50x the peak memory; goal >= 1.5x at <= 60%: met"
            in write(1600, 20))
    assert "1.20x the tokens/s, 0.75x the peak memory; goal >= 1.5x at <= 60%: not met" in write(1200, 30)


def test_unsloth_recipe_is_lora_in_bf16() -> None:
    r = SFTRecipe.from_yaml(REPO_ROOT / "configs/sft_unsloth_3b.yaml")
    assert (r.backend, r.finetune, r.bf16, r.freeze_vision) == ("unsloth", "lora", True, True)
    assert (r.lora_r, r.lora_alpha, r.learning_rate, r.batch_size) == (16, 16, 2e-4, 16)


def test_cli_backend_unsloth_stops_with_what_is_missing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--config", str(REPO_ROOT / "configs/sft_unsloth_3b.yaml"), "--backend", "unsloth",
              "--set", f"runs_root={tmp_path}", "--set", "data=x"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "backend='unsloth' is unavailable" in err and "no CUDA GPU is visible" in err
    assert "scripts/gpu_wheels.txt" in err and "environment-unsloth.yml" in err
    assert not any(tmp_path.iterdir())  # refused before a run directory was made


def test_cli_backend_unsloth_refuses_full_fine_tuning(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--config", str(REPO_ROOT / "configs/sft_paper_3b.yaml"), "--backend", "unsloth"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "sft_paper_3b.yaml: field finetune: 'full'" in err and "configs/sft_unsloth_3b.yaml" in err
