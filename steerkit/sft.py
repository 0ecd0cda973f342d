"""Stage II training: supervised fine-tuning of the student on STEER-SFT (SPEC 3).

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
and ``run_id`` again resumes from the last complete trainer checkpoint (one cut short by a kill is removed).

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
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steerkit.layout import CAPTIONS_FILE, CHECKPOINT, MANIFEST_FILE, RL_FILE, SFT_FILE, TRAIN_LOG, TRAINER_STATE
from steerkit.progress import progress_callback
from steerkit.runs import DEFAULT_RUNS_ROOT, ResultLog, Run, new_run_id, open_run
from steerkit.schema import Dialogue, Message, RecordError, parse_line

log = logging.getLogger(__name__)

STAGE = "02_sft_bootstrap"
TRAINER_DIR = "trainer"  # resumable trainer checkpoints
#: ChatML turn openers (Qwen2.5-VL, SmolLM2): what Unsloth's response masker splits on.
CHATML_USER, CHATML_ASSISTANT = "<|im_start|>user\n", "<|im_start|>assistant\n"
#: Recipe fields that say where a run lives, not how it trains (left out of the manifest's parameters).
LOCATION_FIELDS = ("runs_root", "run_id")


@dataclass
class SFTRecipe:
    """Everything an SFT run depends on. Paper values (SPEC 3) are the defaults; the CPU smoke profile
    is ``configs/sft_smoke_cpu.yaml``."""

    student: str = "smollm2"  # a checkpoint folder, or "smollm2" (the embedded text-only student)
    data: str | None = None  # STEER-SFT JSONL of schema.Dialogue, or a Stage I run dir holding SFT_FILE
    eval_data: str | None = None  # held-out dialogues: eval loss before and after training
    captions: str | None = None  # JSON image ref -> caption, for text-only students
    backend: str = "auto"  # hf | unsloth | auto (unsloth when importable on an NVIDIA GPU)
    finetune: str = "full"  # full | lora; SPEC 3: full fine-tuning
    freeze_vision: bool = True  # SPEC 3: vision tower (incl. its merger) frozen in full fine-tuning
    lora_r: int = 16  # LoRA only; not in the paper
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]  # the language model only (STACK)
    )
    learning_rate: float = 1e-5  # SPEC 3
    num_train_epochs: float = 2  # SPEC 3
    max_steps: int = -1  # > 0 overrides epochs
    optim: str = "adamw_torch"  # SPEC 3: AdamW
    weight_decay: float = 0.01  # SPEC 3
    lr_scheduler_type: str = "linear"  # not in the paper (TRL's default)
    warmup_steps: float = 0  # not in the paper; < 1 is a fraction of the steps
    batch_size: int = 16  # SPEC 3: global batch (per device x accumulation x processes)
    per_device_batch_size: int = 1
    bf16: bool | str = "auto"  # SPEC 3: bf16; auto = on GPU only (TRL's bf16 does not autocast on CPU)
    max_length: int | None = 32768  # SPEC 3
    gradient_checkpointing: bool | str = "auto"  # auto = on GPU only (on CPU it only costs time, STACK)
    system_prompt: str = "student"  # student: SPEC 3's evaluation system prompt on every row | keep
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
            raise ValueError(f"{path}: unknown recipe field(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**values)

    def parameters(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in LOCATION_FIELDS}


# ---- data -----------------------------------------------------------------------------------------


def sft_data_file(data: str | Path) -> Path:
    """The STEER-SFT JSONL a recipe's ``data`` names (a file, or a Stage I run directory)."""
    path = Path(data)
    if path.is_dir():
        path = path / SFT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no STEER-SFT file (give a JSONL file or a Stage I run dir with {SFT_FILE})")
    return path


def read_dialogues(path: Path, limit: int | None = None) -> list[tuple[int, Dialogue]]:
    """(line number, dialogue) for each record; every dialogue must end with the assistant's turn."""
    out: list[tuple[int, Dialogue]] = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if limit is not None and len(out) >= limit:
                break
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise RecordError(f"{path}:{lineno}: not UTF-8") from None
            if not line.strip():
                continue
            d = parse_line(Dialogue, line, path=path, lineno=lineno)
            if d.messages[-1].role != "assistant":
                raise RecordError(f"{path}:{lineno}: field messages: the last message must be the assistant's")
            out.append((lineno, d))
    if not out:
        raise RecordError(f"{path}: no dialogues")
    return out


def load_captions(recipe_captions: str | None, data_file: Path) -> tuple[dict[str, str], str]:
    """Image ref -> caption, and where they came from (see the module docstring)."""
    path = Path(recipe_captions) if recipe_captions else data_file.parent / CAPTIONS_FILE
    if not path.is_file():
        if recipe_captions:
            raise FileNotFoundError(f"{path}: captions file not found")
        return {}, "record meta.captions"
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise RecordError(f"{path}: expected a JSON object of image ref -> caption text")
    return data, str(path)


def captioned(m: Message, captions: dict[str, str], *, where: str, index: int) -> str:
    """A message's text with each image as ``[Image: caption]`` before it, for text-only students.

    Example:
        >>> captioned(Message(role="user", content="Hi", images=["a.png"]), {"a.png": "a cat"},
        ...           where="f:1", index=1)
        '[Image: a cat]\\nHi'
    """
    lines = []
    for i, ref in enumerate(m.images):
        if ref not in captions:
            raise RecordError(
                f"{where}: field messages[{index}].images[{i}]: no caption for image {ref!r} (add it to the "
                f"recipe's captions file, {CAPTIONS_FILE} beside the data, or the record's meta.captions)"
            )
        lines.append(f"[Image: {captions[ref]}]")
    return "\n".join([*lines, m.content])


def with_system(d: Dialogue, system: str | None) -> list[Message]:
    """The dialogue's messages with ``system`` as the first message (replacing one), or as they are."""
    if system is None:
        return list(d.messages)
    body = [m for m in d.messages if m.role != "system"]
    return [Message(role="system", content=system), *body]


def sft_rows(
    dialogues: list[tuple[int, Dialogue]], path: Path, *, vision: bool, system: str | None,
    captions: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """TRL conversational rows: ``messages`` + ``images`` (absolute paths) for a vision student;
    ``messages`` with captions in the text for a text-only one."""
    from steerkit.images import load_image
    from steerkit.schema import to_trl_sft_row

    rows = []
    for lineno, d in dialogues:
        d = d.model_copy(update={"messages": with_system(d, system)})
        if vision:
            row = to_trl_sft_row(d, root=path.parent)
            for img in row["images"]:
                load_image(img)  # a corrupt or oversized image fails here, named, not mid-run
            rows.append({"messages": row["messages"], "images": row["images"]})
        else:
            caps = {**d.meta.get("captions", {}), **(captions or {})}
            rows.append({"messages": [
                {"role": m.role, "content": captioned(m, caps, where=f"{path}:{lineno}", index=j)}
                for j, m in enumerate(d.messages)
            ]})
    return rows


def _template_length(processing_class: Any, messages: list[dict[str, Any]], images: list[Any], *, vision: bool) -> int:
    """Tokens of ``messages`` as the trainer sees them (a VLM's image placeholders expanded)."""
    if vision:
        text = processing_class.apply_chat_template(messages, tokenize=False)
        return int(processing_class(text=[text], images=images or None, return_tensors="pt")["input_ids"].shape[1])
    ids = processing_class.apply_chat_template(messages, tokenize=True)
    return len(ids["input_ids"] if hasattr(ids, "keys") else ids)


def turns_past_max_length(rows: list[dict[str, Any]], processing_class: Any, max_length: int | None,
                          *, vision: bool) -> dict[str, int]:
    """How many assistant turns end beyond ``max_length`` tokens, which the trainer cuts off unseen.

    TRL keeps the first ``max_length`` tokens of a row, so in a multi-turn dialogue the last turns
    (where an escalating request is finally refused) are the ones lost. A row that fits whole costs one
    tokenisation; only a row over the limit is measured turn by turn.
    """
    from steerkit.images import load_image

    cut = {"assistant_turns": 0, "assistant_turns_cut": 0, "dialogues_cut": 0}
    for row in rows:
        messages = row["messages"]
        images = [load_image(p) for p in row.get("images", [])] if vision else []
        ends = [k + 1 for k, m in enumerate(messages) if m["role"] == "assistant"]
        cut["assistant_turns"] += len(ends)
        if max_length is None or _template_length(processing_class, messages, images, vision=vision) <= max_length:
            continue
        lost = 0
        for end in ends:
            shown = sum(1 for m in messages[:end] if isinstance(m["content"], list)
                        for part in m["content"] if part.get("type") == "image")
            if _template_length(processing_class, messages[:end], images[:shown], vision=vision) > max_length:
                lost += 1
        cut["assistant_turns_cut"] += lost
        cut["dialogues_cut"] += lost > 0
    return cut


def to_dataset(rows: list[dict[str, Any]], *, vision: bool):  # -> datasets.Dataset
    import datasets

    ds = datasets.Dataset.from_list(rows)
    if vision:
        ds = ds.cast_column("images", datasets.List(datasets.Image()))
    return ds


def data_summary(dialogues: list[tuple[int, Dialogue]]) -> dict[str, Any]:
    turns = [sum(m.role == "assistant" for m in d.messages) for _, d in dialogues]
    return {
        "dialogues": len(dialogues),
        "assistant_turns": sum(turns),
        "mean_turns": round(sum(turns) / len(turns), 3),
        "images": sum(len(m.images) for _, d in dialogues for m in d.messages),
    }


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


# ---- training -------------------------------------------------------------------------------------


def train_log_callback(path: Path):  # -> transformers.TrainerCallback
    """A callback writing one JSON line per trainer log (main process only)."""
    from transformers import TrainerCallback

    class _TrainLog(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.log = ResultLog(path, key="step")
            self.last = (time.perf_counter(), 0)  # TRL counts tokens from 0 in each process

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
        "backend": backend, "student_path": str(student), "weights_from": str(weights), "vision": vision, "data_file": str(data_file),
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


def distributed_state():  # -> accelerate.PartialState
    """This process's place in a launch; on a machine without CUDA, DDP over gloo (``cpu=True``: without
    it accelerate sees a torchrun launch on CPU as a single process)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def _shared_run_id(recipe: SFTRecipe) -> str:
    """One run id for all processes of a distributed launch."""
    from accelerate.utils import broadcast_object_list

    state = distributed_state()
    if recipe.run_id is not None or state.num_processes == 1:
        return recipe.run_id or new_run_id("sft-")
    ids = [new_run_id("sft-") if state.is_main_process else None]
    broadcast_object_list(ids)
    return ids[0]


def complete_checkpoint(folder: Path) -> bool:
    """True when a trainer checkpoint ``checkpoint-N`` was written to the end.

    transformers 5.24 writes a checkpoint into its final folder, not atomically (weights, optimizer,
    scheduler, RNG states, then ``trainer_state.json``), so a kill mid-save leaves ``checkpoint-N`` with
    some files and no state, or a state file cut short. Complete: the state parses and is at step N.
    """
    match = re.fullmatch(r"checkpoint-(\d+)", folder.name)
    try:
        state = json.loads((folder / TRAINER_STATE).read_text())
    except (OSError, ValueError):
        return False
    return match is not None and isinstance(state, dict) and state.get("global_step") == int(match[1])


def last_complete_checkpoint(trainer_dir: Path, *, remove_partial: bool = False) -> Path | None:
    """The newest complete trainer checkpoint in ``trainer_dir`` (None when there is none).

    ``transformers.trainer_utils.get_last_checkpoint`` takes the highest-numbered folder, complete or
    not. With ``remove_partial`` the partial folders are deleted: the trainer's rotation orders
    checkpoints by mtime and would count a stale one among the checkpoints it keeps.
    """
    if not trainer_dir.is_dir():
        return None
    folders = [f for f in trainer_dir.iterdir() if f.is_dir() and re.fullmatch(r"checkpoint-\d+", f.name)]
    complete = [f for f in folders if complete_checkpoint(f)]
    if remove_partial:
        for f in set(folders) - set(complete):
            log.warning("%s: removing a checkpoint cut short by a kill (no complete %s)", f, TRAINER_STATE)
            shutil.rmtree(f)
    return max(complete, key=lambda f: int(f.name.split("-")[1]), default=None)


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


# ---- data for smoke runs, and answers before and after -------------------------------------------


def offline_sft_data(runs_root: str | Path | None = None, *, run_id: str = "offline-sft", n_benign: int = 12,
                     n_harmful: int = 12, seed: int = 0) -> Path:
    """A small STEER-SFT set made offline, as a Stage I run directory (``01_synthesize_steer/<run_id>``).

    Stages I and II with the ``rules`` roles (template generator, keyword red user, blue expert and
    evaluator; `steerkit.synth`) on ``n_benign`` benign and ``n_harmful`` progressive-disclosure seeds,
    without the red-team module (it needs a target model). For smoke runs and the tutorial; a real run
    names notebook 01's run directory instead.
    """
    from steerkit.roles import Roles
    from steerkit.synth.synthesize import SynthParams, synthesize

    params = SynthParams(seed=seed, n_benign=n_benign, n_obfuscated=n_harmful, n_redteam=0, bench_share=0.0)
    roles = dict.fromkeys(("generator", "target", "red_user", "blue_expert", "evaluator"), "rules")
    run = open_run("01_synthesize_steer", run_id=run_id, root=runs_root, roles=roles,
                   parameters={**params.manifest(), "roles": roles}, seeds={"seed": seed})
    synthesize(run, Roles(roles, cache_dir=run.file("cache"), seed=seed), params)
    return run.path


def first_turn_requests(data: str | Path, *, n: int | None = None, max_tokens: int = 64, split: str = RL_FILE):
    """The student's view of the first user turn of each dialogue in a split (default the RL split,
    held out from SFT): evaluation system prompt, the turn, its images and their captions."""
    from steerkit.clients import Request, Sampling
    from steerkit.converse import student_system_prompt

    path = Path(data) / split if Path(data).is_dir() else Path(data)
    captions, _ = load_captions(None, path)
    system = Message(role="system", content=student_system_prompt())
    out = []
    for _, d in read_dialogues(path, n):
        first = next(m for m in d.messages if m.role == "user")
        out.append(Request([system, first], sampling=Sampling(max_tokens=max_tokens), root=path.parent,
                           captions={**d.meta.get("captions", {}), **captions}))
    return out


def answers(model: str | Path, requests: list) -> list[str]:
    """Greedy answers of a checkpoint (or ``"smollm2"``) to ``requests``, in one batched backend (on CPU
    from a bf16 copy of the weights: 1.5-2x faster, same text, STACK)."""
    import torch

    from steerkit.backends.hf_local import HFLocalBackend

    backend = HFLocalBackend.from_pretrained(model, generation_dtype=None if torch.cuda.is_available() else "bfloat16")
    return [reply.text for reply in backend.generate_sync(requests)]


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
