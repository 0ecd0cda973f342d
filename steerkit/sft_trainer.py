"""Stage II's trainer: TRL ``SFTTrainer`` (or Unsloth's LoRA) configured from an `SFTRecipe`.

`build_trainer` reads the recipe's data (`steerkit.sft_data`), loads the student (``hf`` or
``unsloth`` backend), sets LoRA or full fine-tuning with the vision tower frozen, and logs each step
to ``train_log.jsonl``; `save_final` writes the trained model as a plain checkpoint. The run around
it (run directory, resume, before/after losses) is `steerkit.sft.run_sft`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steerkit.distributed import distributed_state
from steerkit.layout import TRAIN_LOG, TRAINER_DIR
from steerkit.progress import progress_callback
from steerkit.runs import ResultLog
from steerkit.sft_data import (
    data_summary,
    load_captions,
    read_dialogues,
    sft_data_file,
    sft_rows,
    to_dataset,
    turns_past_max_length,
)

if TYPE_CHECKING:
    from steerkit.sft import SFTRecipe

log = logging.getLogger(__name__)

#: ChatML turn openers (Qwen2.5-VL, SmolLM2): what Unsloth's response masker splits on.
CHATML_USER, CHATML_ASSISTANT = "<|im_start|>user\n", "<|im_start|>assistant\n"


# ---- backend and model ------------------------------------------------------------------------------


def resolve_backend(asked: str) -> str:
    """``hf`` or ``unsloth``; ``auto`` takes Unsloth when it can run here (`models.load_student`
    raises a clear `StudentUnavailable` when ``unsloth`` is asked for where it cannot run)."""
    from steerkit.models import unsloth_available

    match asked:
        case "hf" | "unsloth":
            return asked
        case "auto":
            return "unsloth" if unsloth_available() else "hf"
        case _:
            raise ValueError(f"backend: {asked!r} is not one of hf, unsloth, auto")


def freeze_vision_tower(model) -> int:
    """Freeze the vision encoder (and its merger); returns how many parameters were frozen."""
    frozen = 0
    for name, p in model.named_parameters():
        if any(part in name.split(".") for part in ("visual", "vision_tower", "vision_model")):
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen


def train_log_callback(path: Path):  # -> transformers.TrainerCallback
    """A callback writing one JSON line per trainer log (main process only).

    The last step is always logged: a run shorter than ``logging_steps`` (a few epochs of a small
    data set) would otherwise leave no loss at all, and its plot and checks nothing to read.
    """
    from transformers import TrainerCallback

    class _TrainLog(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.log = ResultLog(path, key="step")
            self.last = (time.perf_counter(), 0)  # TRL counts tokens from 0 in each process

        def on_step_end(self, args, state, control, **kw):
            if state.max_steps and state.global_step >= state.max_steps:
                control.should_log = True

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or not logs or "loss" not in logs:
                return
            now, tokens = time.perf_counter(), logs.get("num_tokens")
            rate = None
            if tokens is not None:
                rate = (tokens - self.last[1]) / max(now - self.last[0], 1e-9)
                self.last = (now, tokens)
            self.log.append({
                "step": state.global_step, "epoch": logs.get("epoch"), "loss": logs["loss"],
                "learning_rate": logs.get("learning_rate"), "grad_norm": logs.get("grad_norm"),
                "num_tokens": tokens, "tokens_per_s": rate, "time": time.time(),
            })

    return _TrainLog()


def training_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """The run's log, one record per step (after a resume the replayed steps supersede the first)."""
    by_step = {r["step"]: r for r in ResultLog(Path(run_dir) / TRAIN_LOG, key="step")}
    return [by_step[s] for s in sorted(by_step)]


def _auto(value: bool | str, on_gpu: bool) -> bool:
    return on_gpu if value == "auto" else bool(value)


def build_trainer(recipe: SFTRecipe, run_dir: Path, *, callbacks: list | None = None, resume_from: str | None = None):
    """The configured trainer and what the manifest should know (backend, data, tracking).

    ``resume_from`` (a trainer checkpoint) matters for full fine-tuning: the weights are loaded from it
    here, since the trainer's own resume loads a vision model's state dict under its saved key names
    (``visual.*``, ``model.layers.*``), matches none of them and keeps the initial weights (transformers
    5.24 only warns). LoRA adapters resume correctly through the trainer.
    """
    from steerkit import models  # before trl: Unsloth must be imported first when it is used
    from steerkit.converse import STUDENT_SYSTEM, student_system_prompt
    from steerkit.tracking import resolve_report_to

    backend = resolve_backend(recipe.backend)
    student = models.resolve_model_path(recipe.student)
    vision = models.is_vision_model(student)
    weights = Path(resume_from) if resume_from and recipe.finetune == "full" else student
    model, processing_class = models.load_student(weights, backend=backend)

    import torch
    from trl import SFTConfig, SFTTrainer

    if recipe.data is None:
        raise ValueError("recipe.data: name the STEER-SFT file or the Stage I run directory")
    data_file = sft_data_file(recipe.data)
    system = student_system_prompt() if recipe.system_prompt == "student" else None
    captions, captions_source = ({}, None) if vision else load_captions(recipe.captions, data_file)
    dialogues = read_dialogues(data_file, recipe.max_dialogues)
    evals = None
    if recipe.eval_data:
        eval_file = sft_data_file(recipe.eval_data)
        eval_caps = {} if vision else load_captions(recipe.captions, eval_file)[0]
        evals = to_dataset(sft_rows(read_dialogues(eval_file), eval_file, vision=vision, system=system,
                                    captions=eval_caps), vision=vision)

    rows = sft_rows(dialogues, data_file, vision=vision, system=system, captions=captions)
    cut = turns_past_max_length(rows, processing_class, recipe.max_length, vision=vision)
    if cut["assistant_turns_cut"]:
        log.warning("%s: %d of %d assistant turns (in %d dialogues) end after max_length=%d tokens and are not "
                    "trained on; raise max_length to keep them", data_file, cut["assistant_turns_cut"],
                    cut["assistant_turns"], cut["dialogues_cut"], recipe.max_length)
    train = to_dataset(rows, vision=vision)
    on_gpu = torch.cuda.is_available()
    world = distributed_state().num_processes
    accumulation = max(1, recipe.batch_size // (recipe.per_device_batch_size * world))
    if accumulation * recipe.per_device_batch_size * world != recipe.batch_size:
        log.warning("batch_size %d is not a multiple of %d per device x %d processes; the global batch is %d",
                    recipe.batch_size, recipe.per_device_batch_size, world,
                    accumulation * recipe.per_device_batch_size * world)
    tracking = resolve_report_to(recipe.report_to)
    tracking.apply()
    # transformers 5.2x renamed it; Unsloth's pinned 5.17 knows only the old name
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in SFTConfig.__dataclass_fields__ \
        else "gradient_checkpointing"
    args = dict(
        output_dir=str(run_dir / TRAINER_DIR), learning_rate=recipe.learning_rate,
        num_train_epochs=recipe.num_train_epochs, max_steps=recipe.max_steps, optim=recipe.optim,
        weight_decay=recipe.weight_decay, lr_scheduler_type=recipe.lr_scheduler_type,
        warmup_steps=recipe.warmup_steps, per_device_train_batch_size=recipe.per_device_batch_size,
        per_device_eval_batch_size=recipe.per_device_batch_size, gradient_accumulation_steps=accumulation,
        bf16=_auto(recipe.bf16, on_gpu), max_length=recipe.max_length,
        **{checkpointing: _auto(recipe.gradient_checkpointing, on_gpu)},
        logging_steps=recipe.logging_steps, save_steps=recipe.save_steps,
        save_total_limit=recipe.save_total_limit, seed=recipe.seed, report_to=tracking.report_to,
        run_name=run_dir.name, use_cpu=not on_gpu, dataloader_num_workers=0,
    )
    peft_config, data_collator = None, None
    frozen = 0
    if backend == "unsloth" and vision:
        model, data_collator = _unsloth_vision_lora(model, processing_class, recipe)
        args.update(assistant_only_loss=False, remove_unused_columns=False, dataset_text_field="",
                    dataset_kwargs={"skip_prepare_dataset": True})
    elif backend == "unsloth":  # text-only student: Unsloth's LoRA, TRL's assistant-only loss
        model = _unsloth_text_lora(model, recipe)
        args.update(assistant_only_loss=True)
    else:
        args.update(assistant_only_loss=True)
        if recipe.finetune == "lora":
            from peft import LoraConfig

            peft_config = LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
                                     target_modules=list(recipe.lora_target_modules), task_type="CAUSAL_LM")
        elif recipe.finetune == "full":
            frozen = freeze_vision_tower(model) if (vision and recipe.freeze_vision) else 0
        else:
            raise ValueError(f"finetune: {recipe.finetune!r} is not one of full, lora")
    trainer = SFTTrainer(
        model=model, args=SFTConfig(**args), train_dataset=train, eval_dataset=evals,
        processing_class=processing_class, peft_config=peft_config, data_collator=data_collator,
        callbacks=[train_log_callback(run_dir / TRAIN_LOG), progress_callback(run_dir, "SFT"), *(callbacks or [])],
    )
    info = {
        "backend": backend, "student_path": str(student), "weights_from": str(weights), "vision": vision,
        "data_file": str(data_file),
        "data": data_summary(dialogues), "max_length_cut": cut, "captions_source": captions_source,
        "system_prompt": STUDENT_SYSTEM if system else "from the data",
        "gradient_accumulation_steps": accumulation, "processes": world, "vision_params_frozen": frozen,
        "tracking": tracking.manifest(), "bf16": args["bf16"],
        "gradient_checkpointing": args[checkpointing],
    }
    return trainer, info


def _unsloth_text_lora(model, recipe: SFTRecipe):
    from unsloth import FastLanguageModel

    if recipe.finetune != "lora":
        raise ValueError("backend='unsloth' trains LoRA adapters here; set finetune='lora' or backend='hf'")
    return FastLanguageModel.get_peft_model(
        model, r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
        target_modules=list(recipe.lora_target_modules), bias="none", random_state=recipe.seed,
    )


def _unsloth_vision_lora(model, processor, recipe: SFTRecipe):
    """Unsloth's LoRA on the language layers (vision frozen) and its response-only collator."""
    from unsloth import FastVisionModel
    from unsloth.trainer import UnslothVisionDataCollator

    if recipe.finetune != "lora":
        raise ValueError("backend='unsloth' trains LoRA adapters here; set finetune='lora' or backend='hf'")
    model = FastVisionModel.get_peft_model(
        model, finetune_vision_layers=False, finetune_language_layers=True, finetune_attention_modules=True,
        finetune_mlp_modules=True, r=recipe.lora_r, lora_alpha=recipe.lora_alpha,
        lora_dropout=recipe.lora_dropout, bias="none", random_state=recipe.seed,
    )
    FastVisionModel.for_training(model)
    collator = UnslothVisionDataCollator(
        model, processor, max_seq_length=recipe.max_length, train_on_responses_only=True,
        instruction_part=CHATML_USER, response_part=CHATML_ASSISTANT,
    )
    return model, collator


def save_final(trainer, dest: Path, backend: str) -> Path:
    """Save the trained model as a plain checkpoint (LoRA merged) with its processing class."""
    from peft import PeftModel

    model = trainer.model
    if trainer.accelerator.is_main_process:
        if backend == "unsloth":
            model.save_pretrained_merged(str(dest), trainer.processing_class, save_method="merged_16bit")
        elif isinstance(model, PeftModel):
            model.merge_and_unload().save_pretrained(dest)
            trainer.processing_class.save_pretrained(dest)
        else:
            trainer.save_model(str(dest))
    trainer.accelerator.wait_for_everyone()
    return dest
