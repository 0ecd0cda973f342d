"""Stage II training: supervised fine-tuning of the student on STEER-SFT (method.md 3).

Every assistant turn of every dialogue is teacher-forced, with the loss on assistant tokens only, under
the same system prompt the student sees in evaluation. Two backends:

- ``hf``: TRL ``SFTTrainer`` with ``assistant_only_loss=True`` (the chat template's
  ``{% generation %}`` spans), full fine-tuning or LoRA (PEFT); runs anywhere, DDP with
  ``accelerate launch``;
- ``unsloth``: on an NVIDIA GPU in the Unsloth environment (``environment-unsloth.yml``),
  ``FastVisionModel`` with LoRA on the language layers and ``UnslothVisionDataCollator`` masking
  everything but the responses (Unsloth's pinned TRL refuses assistant-only loss on vision data).

A vision student sees the images; a text-only student reads each image as ``[Image: caption]`` before
the turn's text. Captions come from, in order: the recipe's ``captions`` file (JSON, image ref ->
caption), ``captions.json`` beside the data file (Stage I writes it from the image descriptions), or the
record's ``meta.captions``; an image with none is an error naming file, line and field.

The run directory ``papermill_runs/02_sft_bootstrap/<run_id>/`` holds ``manifest.json`` (the recipe,
data counts, backend, tracker), ``train_log.jsonl`` (loss, learning rate, tokens/s per logging step),
``trainer/checkpoint-N`` (resumable trainer checkpoints) and ``checkpoint/`` (the final model, LoRA
merged, loadable by ``steerkit.models.load_student`` and ``HFLocalBackend``). Running the same recipe
and ``run_id`` again resumes from the last complete trainer checkpoint (one cut short by a kill is removed;
`steerkit.checkpoints`).

This module holds the recipe, the run and the command line; the data is read by `steerkit.sft_data`
and the trainer built by `steerkit.sft_trainer`.

Command line, one process or DDP (on a CPU-only machine DDP runs over gloo; ``accelerate launch --cpu
--num_processes 2`` would start a single process unless MPI is set up, so use torchrun's launcher)::

    python -m steerkit.sft --config configs/sft_smoke_cpu.yaml --set data=papermill_runs/01_synthesize_steer/<id>
    accelerate launch --multi_gpu --num_processes 2 -m steerkit.sft --config configs/sft_smoke_cpu.yaml --set data=...
    python -m steerkit.sft --config configs/sft_unsloth_3b.yaml --backend unsloth --set data=...  (GPU, docs/gpu.md)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steerkit.checkpoints import last_complete_checkpoint
from steerkit.distributed import distributed_state
from steerkit.layout import CHECKPOINT, MANIFEST_FILE, TRAINER_DIR
from steerkit.parameters import named_fields
from steerkit.runs import DEFAULT_RUNS_ROOT, Run, new_run_id, open_run
from steerkit.sft_trainer import build_trainer, save_final

log = logging.getLogger(__name__)

STAGE = "02_sft_bootstrap"
#: Recipe fields that say where a run lives, not how it trains (left out of the manifest's parameters).
LOCATION_FIELDS = ("runs_root", "run_id")


@dataclass
class SFTRecipe:
    """Everything an SFT run depends on. Paper values (method.md 3) are the defaults; the CPU smoke profile
    is ``configs/sft_smoke_cpu.yaml``."""

    student: str = "smollm2"  # a checkpoint folder, or "smollm2" (the embedded text-only student)
    data: str | None = None  # STEER-SFT JSONL of schema.Dialogue, or a Stage I run dir holding SFT_FILE
    eval_data: str | None = None  # held-out dialogues: eval loss before and after training
    captions: str | None = None  # JSON image ref -> caption, for text-only students
    backend: str = "auto"  # hf | unsloth | auto (unsloth when importable on an NVIDIA GPU)
    finetune: str = "full"  # full | lora; method.md 3: full fine-tuning
    freeze_vision: bool = True  # method.md 3: vision tower (incl. its merger) frozen in full fine-tuning
    lora_r: int = 16  # LoRA only; not in the paper
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]  # the language model only (STACK)
    )
    learning_rate: float = 1e-5  # method.md 3
    num_train_epochs: float = 2  # method.md 3
    max_steps: int = -1  # > 0 overrides epochs
    optim: str = "adamw_torch"  # method.md 3: AdamW
    weight_decay: float = 0.01  # method.md 3
    lr_scheduler_type: str = "linear"  # not in the paper (TRL's default)
    warmup_steps: float = 0  # not in the paper; < 1 is a fraction of the steps
    batch_size: int = 16  # method.md 3: global batch (per device x accumulation x processes)
    per_device_batch_size: int = 1
    bf16: bool | str = "auto"  # method.md 3: bf16; auto = on GPU only (TRL's bf16 does not autocast on CPU)
    max_length: int | None = 32768  # method.md 3
    gradient_checkpointing: bool | str = "auto"  # auto = on GPU only (on CPU it only costs time, STACK)
    system_prompt: str = "student"  # student: method.md 3's evaluation system prompt on every row | keep
    max_dialogues: int | None = None  # first N dialogues only
    probe_rows: int = 16  # training rows whose loss is measured before and after (the "loss went down" check)
    logging_steps: int = 10
    save_steps: int = 200
    save_total_limit: int | None = 2
    seed: int = 0
    report_to: str = "none"  # none | wandb (see steerkit.tracking)
    runs_root: str | None = None
    run_id: str | None = None

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> SFTRecipe:
        """A recipe from a YAML file of field values, then ``overrides``; unknown keys are errors."""
        import yaml

        values = yaml.safe_load(Path(path).read_text()) or {}
        values.update(overrides)
        known = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(values) - known):
            raise ValueError(f"{path}: unknown recipe field(s) {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(known))})")
        return cls(**values)

    @classmethod
    def from_parameters(cls, path: str | Path, values: Mapping[str, Any], **overrides: Any) -> SFTRecipe:
        """The recipe file at ``path``, then the fields named in ``values`` (notebook 02's ``globals()``;
        other names are ignored), then ``overrides`` for fields the notebook names otherwise."""
        return cls.from_yaml(path, **named_fields(cls, values) | overrides)

    def parameters(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in LOCATION_FIELDS}


def _shared_run_id(recipe: SFTRecipe) -> str:
    """One run id for all processes of a distributed launch."""
    from accelerate.utils import broadcast_object_list

    state = distributed_state()
    if recipe.run_id is not None or state.num_processes == 1:
        return recipe.run_id or new_run_id("sft-")
    ids = [new_run_id("sft-") if state.is_main_process else None]
    broadcast_object_list(ids)
    return ids[0]


def _finished(run_dir: Path, recipe: SFTRecipe) -> bool:
    """True when the run already finished with these parameters (other parameters are an error)."""
    mpath = run_dir / MANIFEST_FILE
    if not mpath.is_file():
        return False
    manifest = json.loads(mpath.read_text())
    if manifest.get("status") != "finished" or not (run_dir / CHECKPOINT).is_dir():
        return False
    asked = json.loads(json.dumps(recipe.parameters()))
    if manifest.get("parameters") != asked:
        changed = sorted(k for k in set(asked) | set(manifest["parameters"])
                         if asked.get(k) != manifest["parameters"].get(k))
        raise ValueError(f"{mpath}: run {run_dir.name!r} finished with other parameters ({', '.join(changed)});"
                         " choose a new run_id")
    return True


def probe_rows(trainer, n: int):  # -> datasets.Dataset | None
    """The first ``n`` training rows as the trainer prepared them (None when ``n`` is 0)."""
    if n <= 0:
        return None
    data = trainer.train_dataset
    return data.select(range(min(n, len(data))))


def probe_loss(trainer, rows) -> float:
    """Mean loss on assistant tokens of ``rows``. Logged losses cannot show that training lowered the
    loss when the run is short next to ``logging_steps`` (one logged value), so the check uses this."""
    return float(trainer.evaluate(eval_dataset=rows, metric_key_prefix="probe")["probe_loss"])


def run_sft(recipe: SFTRecipe, *, callbacks: list | None = None) -> Path:
    """Train the student on STEER-SFT; returns the run directory (final model in ``checkpoint/``).

    Args:
        recipe: the run's settings (all of them are recorded in the manifest).
        callbacks: extra ``transformers.TrainerCallback`` objects (a progress bar, a stop rule).
    """
    state = distributed_state()
    run_id = _shared_run_id(recipe)
    root = Path(recipe.runs_root) if recipe.runs_root else DEFAULT_RUNS_ROOT
    run = Run(path=root / STAGE / run_id)
    if _finished(run.path, recipe):
        log.info("%s: already finished; nothing to do", run.path)
        return run.path
    state.wait_for_everyone()  # every process has read the status before the main one rewrites it
    if state.is_main_process:
        run = open_run(STAGE, run_id=run_id, root=root, parameters=recipe.parameters(),
                       roles={"student": recipe.student}, seeds={"seed": recipe.seed},
                       inputs={"data": str(recipe.data), "eval_data": str(recipe.eval_data)})
        last_complete_checkpoint(run.path / TRAINER_DIR, remove_partial=True)
    state.wait_for_everyone()
    trainer_dir = run.path / TRAINER_DIR
    found = last_complete_checkpoint(trainer_dir)
    last = str(found) if found else None
    trainer, info = build_trainer(recipe, run.path, callbacks=callbacks, resume_from=last)
    if state.is_main_process:
        run.update_manifest(training=info, resumed_from=last)
    summary: dict[str, Any] = {}
    if trainer.eval_dataset is not None and last is None:
        summary["eval_loss_before"] = trainer.evaluate()["eval_loss"]
    probe = probe_rows(trainer, recipe.probe_rows)
    # measured before the first step and kept in the manifest, so a resumed run compares with it
    # (read from the file: every process of a launch must take the same branch, evaluate is collective)
    before = json.loads((run.path / MANIFEST_FILE).read_text()).get("probe_loss_before") if last else None
    if before is None and probe is not None:
        before = probe_loss(trainer, probe)
        if state.is_main_process:
            run.update_manifest(probe_loss_before=before)
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=last)
    # planned_steps: what max_steps or the epochs came to (the trainer's own count), for the step check
    summary.update(global_step=trainer.state.global_step, planned_steps=trainer.state.max_steps,
                   epochs=trainer.state.epoch, train_loss=result.training_loss,
                   train_seconds=round(time.perf_counter() - t0, 2))
    if probe is not None:
        summary.update(probe_rows=len(probe), probe_loss_before=before, probe_loss_after=probe_loss(trainer, probe))
    if trainer.eval_dataset is not None:
        summary["eval_loss_after"] = trainer.evaluate()["eval_loss"]
    save_final(trainer, run.path / CHECKPOINT, info["backend"])
    if state.is_main_process:
        run.finish(**summary)
    return run.path


def main(argv: list[str] | None = None) -> Path:
    """``python -m steerkit.sft --config RECIPE.yaml [--set field=value ...]``."""
    import yaml

    parser = argparse.ArgumentParser(prog="python -m steerkit.sft", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="a recipe YAML (configs/sft_*.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a recipe field (VALUE is read as YAML)")
    parser.add_argument("--backend", choices=["hf", "unsloth", "auto"], default=None,
                        help="override the recipe's backend; unsloth needs an NVIDIA GPU, Unsloth's environment"
                             " and a LoRA recipe (configs/sft_unsloth_3b.yaml)")
    ns = parser.parse_args(argv)
    overrides = {}
    for item in ns.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected FIELD=VALUE")
        overrides[key] = yaml.safe_load(value)
    if ns.backend:
        overrides["backend"] = ns.backend
    recipe = SFTRecipe.from_yaml(ns.config, **overrides)
    if recipe.backend == "unsloth":  # refuse before a run directory is made
        from steerkit.models import unsloth_missing, unsloth_unavailable_message

        if recipe.finetune != "lora":
            parser.error(f"{ns.config}: field finetune: {recipe.finetune!r}: backend unsloth trains LoRA adapters"
                         " only; use a LoRA recipe (configs/sft_unsloth_3b.yaml) or --backend hf")
        if missing := unsloth_missing():
            parser.exit(2, f"{parser.prog}: error: {unsloth_unavailable_message(missing)}\n")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run_dir = run_sft(recipe)
    log.info("run directory: %s", run_dir)
    return run_dir


if __name__ == "__main__":
    main()
