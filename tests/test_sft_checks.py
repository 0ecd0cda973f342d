"""Stage II's own checks hold for a run by epochs with one logged loss, as the full profile trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from steerkit.layout import MANIFEST_FILE
from steerkit.runs import REPO_ROOT
from steerkit.sft_checks import failed, training_checks


def _run(tmp_path: Path, **summary) -> Path:
    base = {"global_step": 18, "planned_steps": 18, "epochs": 2.0, "probe_rows": 16,
            "probe_loss_before": 7.64, "probe_loss_after": 7.63}
    (tmp_path / MANIFEST_FILE).write_text(json.dumps({
        "status": "finished", "parameters": {"max_steps": -1, "num_train_epochs": 2},
        "summary": {**base, **summary}}))
    return tmp_path


def test_a_run_by_epochs_passes_and_a_short_or_flat_run_fails(tmp_path: Path) -> None:
    assert not failed(training_checks(_run(tmp_path)))
    assert "17 of 18 optimizer steps (max_steps -1, epochs 2" in failed(training_checks(_run(tmp_path, global_step=17)))
    assert "7.6400 -> 7.6400" in failed(training_checks(_run(tmp_path, probe_loss_after=7.64)))
    assert "no probe loss" in failed(training_checks(_run(tmp_path, probe_loss_after=None)))


def test_notebook_02_passes_its_checks_with_the_full_profiles_values(tiny_vlm_dir: Path, tmp_path: Path) -> None:
    """The full profile's 02 (full fine-tuning, 2 epochs, logging every 10 steps, lr 1e-5) with only
    sizes and paths changed: its checks compared one logged loss with itself and asserted
    ``global_step == max_steps`` (-1) before they were made sound for epochs."""
    import yaml

    from steerkit.notebooks import execute
    from steerkit.smoke_inputs import offline_sft_data

    data = offline_sft_data(tmp_path / "data", run_id="d", n_benign=12, n_harmful=12)
    params = yaml.safe_load((REPO_ROOT / "configs/pipeline_full.yaml").read_text())["stages"]["02"]
    assert params["max_steps"] == -1 and params["finetune"] == "full"
    params.update(student=str(tiny_vlm_dir), synth_run=str(data), max_length=4096, batch_size=2,
                  per_device_batch_size=2, n_prompts=2, max_new_tokens=8, figure_png=False)
    done = execute("02", params, runs_root=tmp_path / "runs", run_id="full", env={"WANDB_MODE": "disabled"})
    manifest = json.loads((done.run_dir / MANIFEST_FILE).read_text())
    summary = manifest["summary"]
    assert summary["global_step"] == summary["planned_steps"] > 10 and summary["epochs"] == pytest.approx(2.0)
    logged = [json.loads(x) for x in (done.run_dir / "train_log.jsonl").read_text().splitlines()]
    # logging every 10 steps of 18 logs step 10 and the last step (always logged): two noisy values,
    # too few to judge training by; the probe loss on fixed rows is what the check reads
    assert [x["step"] for x in logged] == [10, summary["global_step"]]
    assert summary["probe_loss_after"] < summary["probe_loss_before"]
