"""Progress of a running stage: the progress file, the terminal line, the trainer callback."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import nbformat

from steerkit import pipeline as pl
from steerkit.layout import PROGRESS_FILE
from steerkit.progress import Progress, ProgressTail, describe, progress_callback

BODY = """\
import time
from steerkit.progress import Progress
from steerkit.runs import open_run

run = open_run("01_counting", run_id=run_id, root=runs_root)
with Progress(run.path, "counting", total=steps, unit="steps", min_interval=0) as p:
    for _ in range(steps):
        time.sleep(0.4)
        p.advance(1)
run.finish(steps=steps)
"""


def _notebook(folder: Path) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell('runs_root = ""\nrun_id = "x"\nsteps = 6',
                                          metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell(BODY)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    folder.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, folder / "01_counting.ipynb")
    return folder


def test_pipeline_stage_prints_its_progress_and_no_kernel_warning(tmp_path: Path, capfd, monkeypatch) -> None:
    shown_at: list[float] = []
    show = ProgressTail._show
    monkeypatch.setattr(ProgressTail, "_show", lambda self, text: (shown_at.append(time.time()), show(self, text)))
    notebooks = _notebook(tmp_path / "notebooks")
    stage = pl.Stage("01", "01", "counting")
    pipe = pl.Pipeline(pl.load_recipe(None, []), "p", runs_root=tmp_path / "runs", notebooks_dir=notebooks,
                       stages=(stage,))
    manifest = pipe.run()
    assert manifest["stages"]["01"]["status"] == "finished"
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("[01] counting:")]
    assert len(lines) >= 3, err  # while the kernel ran, not only at the end
    assert lines[-1].startswith("[01] counting: 6/6 steps (100%)") and "steps/s" in lines[-1]
    assert any("left" in ln for ln in lines[:-1])
    assert "without encryption" not in err
    records = [json.loads(x)
               for x in (Path(manifest["stages"]["01"]["run_dir"]) / PROGRESS_FILE).read_text().splitlines()]
    assert records[-1]["done"] == 6 and records[-1]["closed"] and records[0]["total"] == 6
    assert shown_at[0] < records[-1]["time"]  # shown while the kernel was still counting


def test_progress_file_rate_left_and_tail(tmp_path: Path) -> None:
    run_dir = tmp_path / "03_x" / "r"
    out = io.StringIO()
    tail = ProgressTail(tmp_path, "r", "03", out=out, interval=60)
    with tail:
        p = Progress(run_dir, "GRPO", total=10, unit="steps", bar=False, min_interval=3600)
        p.update(1)  # the first line is written at once
        p.update(2)  # within the interval: not written
        assert tail.poll()[0]["done"] == 1 and tail.poll() == []
        p.update(10)  # the last one always is
    rec = json.loads((run_dir / PROGRESS_FILE).read_text().splitlines()[1])
    assert rec["done"] == 10 and rec["left_s"] == 0.0 and rec["rate"] > 0
    assert out.getvalue().splitlines()[-1].startswith("[03] GRPO: 10/10 steps (100%)")
    assert describe({"task": "t", "done": 3, "total": None, "unit": "turns", "rate": 0.01, "left_s": None}) \
        == "t: 3 turns, 0.60 turns/min"


def test_the_tail_shows_each_evaluated_model_of_stage_04(tmp_path: Path) -> None:
    """Stage 04 evaluates every model in a folder of its own inside its run directory; each one's judged
    turns are shown under the model's folder name."""
    out = io.StringIO()
    with ProgressTail(tmp_path, "eval", "04", out=out, interval=60) as tail:
        for row, done in (("base", 4), ("sft", 2)):
            with Progress(tmp_path / "04_x" / "eval" / row, "judged turns", total=4, unit="turns", bar=False) as p:
                p.advance(done)
        tail.poll()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[04 base] judged turns: 4/4 turns (100%)")
    assert lines[-1].startswith("[04 sft] judged turns: 2/4 turns (50%)")


def test_trainer_callback_reports_steps_and_loss(tmp_path: Path) -> None:
    from transformers import TrainerControl, TrainerState, TrainingArguments

    cb = progress_callback(tmp_path, "SFT")
    args = TrainingArguments(output_dir=str(tmp_path / "t"), report_to="none")
    state, control = TrainerState(), TrainerControl()
    state.max_steps, state.global_step = 4, 0
    cb.on_train_begin(args, state, control)
    for step in range(1, 5):
        state.global_step = step
        cb.on_log(args, state, control, logs={"loss": 2.0 / step})
        cb.on_step_end(args, state, control)
    cb.on_train_end(args, state, control)
    recs = [json.loads(x) for x in (tmp_path / PROGRESS_FILE).read_text().splitlines()]
    assert recs[-1]["done"] == 4 and recs[-1]["total"] == 4 and recs[-1]["loss"] == 0.5
