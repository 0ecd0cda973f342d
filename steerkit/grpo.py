"""Stage III: tutor-in-the-loop multi-turn GRPO with TCSR (docs/method.md section 4).

- `make_trainer`: a `steerkit.grpo_trainer.TutorGRPOTrainer` (the adapter to TRL 1.16
  ``GRPOTrainer``'s experimental ``rollout_func``) wired to the tutor rollout, the TCSR (or ablation)
  reward and the checked batch layout.
- `run_grpo`: a whole Stage III run into a run directory (manifest, checkpoints, per-step metrics,
  trajectories).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from steerkit.clients import ChatClient

# re-exported: the run's settings and the method's defaults live in steerkit.grpo_config
from steerkit.grpo_config import BETA, LEARNING_RATE, NUM_GENERATIONS, GRPORunConfig, batching_of  # noqa: F401
from steerkit.grpo_trainer import TutorRollout, nonfinite_grad_guard, tutor_trainer_class
from steerkit.layout import CHECKPOINT, METRICS_FILE, REPLY_CACHE, TRAIN_LOG, TRAJECTORIES_FILE
from steerkit.progress import progress_callback
from steerkit.rewards import TrajectoryReward, turn_weights
from steerkit.rl_data import load_captions, load_rl_dialogues, rl_rows
from steerkit.rollout import RolloutConfig
from steerkit.smoke_inputs import seed_rl_dialogues
from steerkit.tutor import TUTOR_PROMPT

log = logging.getLogger(__name__)

STAGE = "03_grpo_tutor_tcsr"



# ---- the run ------------------------------------------------------------------------------------


@dataclass
class GRPOResult:
    run_dir: Path
    checkpoint: Path
    metrics: list[dict[str, Any]]
    train_log: list[dict[str, Any]]


def make_trainer(model: Any, processing_class: Any, rows: list[dict[str, Any]], *, tutor: ChatClient,
                 config: GRPORunConfig, output_dir: Path, run_dir: Path | None = None,
                 reward: TrajectoryReward | None = None) -> Any:
    """A `TutorGRPOTrainer` wired to the tutor rollout and the TCSR (or ablation) reward.

    The batch layout is checked first (`steerkit.grpo_batching.resolve_batching`, processes from
    ``WORLD_SIZE``); the trainer carries it as ``trainer.batching`` and the tracker choice as
    ``trainer.tracking``.
    """
    import datasets
    from trl import GRPOConfig

    from steerkit.grpo_resume import StepRollout, with_epoch_seeded_order
    from steerkit.tracking import resolve_report_to

    batching = batching_of(config)
    tracking = resolve_report_to(config.report_to)
    tracking.apply()
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    reward = reward or TrajectoryReward(aggregator=config.aggregator, alpha=config.alpha,
                              weights=turn_weights(config.turn_weights), authors_zero_final=config.authors_zero_final)
    rcfg = RolloutConfig(max_turns=config.max_turns, max_new_tokens=config.max_new_tokens,
                         temperature=config.temperature, top_p=config.top_p, feedback=config.feedback,
                         generation_dtype=config.generation_dtype)
    args = GRPOConfig(
        output_dir=str(output_dir),
        **batching.trl_args(),
        max_steps=config.max_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        beta=config.beta,
        scale_rewards=config.scale_rewards,
        loss_type=config.loss_type,
        temperature=config.temperature,
        top_p=config.top_p,
        top_k=0,
        max_completion_length=config.max_turns * config.max_new_tokens,
        use_vllm=config.use_vllm,
        vllm_mode=config.vllm_mode,
        **{_CHECKPOINTING: config.gradient_checkpointing},  # TRL's default is on; on CPU it only costs time
        logging_steps=1,
        save_strategy="steps" if config.save_steps else "no",
        save_steps=config.save_steps or 500,
        save_total_limit=config.save_total_limit,
        report_to=tracking.report_to,
        run_name=Path(output_dir).parent.name,
        seed=config.seed,
        use_cpu=not _cuda(),
        bf16=_cuda(),
        dataloader_num_workers=0,
        remove_unused_columns=False,
        log_completions=False,
    )
    peft_config = None
    if config.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=config.lora_r, lora_alpha=2 * config.lora_r, lora_dropout=0.0,
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
    trainer_cls = with_epoch_seeded_order(tutor_trainer_class())
    guard = nonfinite_grad_guard()
    trainer = trainer_cls(
        model=model, processing_class=processing_class, reward_funcs=[reward], args=args,
        train_dataset=datasets.Dataset.from_list(rows), peft_config=peft_config,
        rollout_func=TutorRollout(tutor, rcfg, reward, run_dir=run_dir),
        callbacks=[guard, progress_callback(run_dir, "GRPO")],
    )
    trainer.skipped_nonfinite_steps = guard.skipped  # filled in during training
    # sampling seeded per step, so a step redone after a resume asks the tutor what it asked before
    trainer.rollout_func = StepRollout(trainer.rollout_func, seed=config.seed, reward=reward)
    trainer.batching, trainer.tracking = batching, tracking
    return trainer


#: transformers 5.2x renamed ``gradient_checkpointing``; the old name only warns (see steerkit.sft).
_CHECKPOINTING = "activation_checkpointing"


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_init(path: str) -> str:
    """A checkpoint folder, a run directory holding ``checkpoint/`` (Stage II's), or "smollm2"."""
    p = Path(path)
    if path != "smollm2" and not (p / "config.json").is_file() and (p / CHECKPOINT / "config.json").is_file():
        return str(p / CHECKPOINT)
    return path


def run_grpo(config: GRPORunConfig, *, tutor_client: ChatClient | None = None) -> GRPOResult:
    """Run Stage III into ``<runs_root>/03_grpo_tutor_tcsr/<run_id>/`` and return where things are.

    The run directory holds ``manifest.json`` (with the batch layout), ``metrics.jsonl`` (per step),
    ``trajectories.jsonl``, ``train_log.jsonl`` (TRL's loss, KL, clipped ratio, grad norm and the
    tutor-side metrics per step), ``trainer/checkpoint-N`` every ``save_steps`` steps, the tutor's
    reply cache ``cache/`` and ``checkpoint/`` (the trained model, LoRA merged, with its processing
    class: loadable as ``hf:<run>/checkpoint``). A finished run with the same id is returned as it is;
    an interrupted one continues from its last complete trainer checkpoint (`steerkit.grpo_resume`),
    or from step 0 when it has none.
    """
    from steerkit.checkpoints import checkpoint_step, last_complete_checkpoint, resume_point
    from steerkit.converse import STUDENT_SYSTEM
    from steerkit.distributed import distributed_state, summed_over_processes
    from steerkit.grpo_resume import load_checkpoint_weights, trim_logs
    from steerkit.layout import TRAINER_DIR
    from steerkit.models import is_vision_model, load_student, resolve_model_path
    from steerkit.roles import Roles
    from steerkit.runs import open_run, read_records
    from steerkit.tracking import wandb_run

    batching_of(config)  # a batch layout that does not add up stops here, before any run directory
    student = resolve_init(config.init_checkpoint) if config.init_checkpoint else config.student
    run = open_run(
        STAGE, run_id=config.run_id or None, root=config.runs_root or None, parameters=asdict(config),
        roles={"student": student, "tutor": config.tutor},
        prompts={"tutor": TUTOR_PROMPT, "student_system": STUDENT_SYSTEM}, seeds={"seed": config.seed},
        inputs={"rl_data": config.rl_data, "init_checkpoint": config.init_checkpoint},
    )
    logs = {name: run.path / name for name in (METRICS_FILE, TRAJECTORIES_FILE, TRAIN_LOG)}
    if run.manifest.get("summary") and (run.path / CHECKPOINT).is_dir():  # finished before
        log.info("%s: already finished; nothing to do", run.path)
        run.update_manifest(status="finished")
        return GRPOResult(run.path, run.path / CHECKPOINT, read_records(logs[METRICS_FILE]),
                          read_records(logs[TRAIN_LOG]))
    state = distributed_state()
    if state.is_main_process:  # one process tidies the run directory; the others wait and then read it
        trim_logs(run.path, checkpoint_step(resume_point(run.path / TRAINER_DIR)))
    state.wait_for_everyone()
    resume = last_complete_checkpoint(run.path / TRAINER_DIR)
    import torch

    torch.manual_seed(config.seed)
    vision = is_vision_model(resolve_model_path(student))
    if config.rl_data:
        records, root = load_rl_dialogues(config.rl_data)
    else:
        # as many turns as the run plays (2..3), so the harmful request arrives within max_turns
        records, root = seed_rl_dialogues(run.path / "rl_data", max(config.n_prompts, config.prompts_per_step),
                                          turns=max(2, min(3, config.max_turns)), seed=config.seed,
                                          with_images=config.with_images and vision)
    if config.n_prompts:
        records = records[: config.n_prompts]
    rows = rl_rows(records, root, vision=vision, captions=None if vision else load_captions(root, records))
    if resume is not None and not config.lora:  # a LoRA adapter resumes through the trainer
        model, processing_class = load_checkpoint_weights(resume, str(resolve_model_path(student)))
    else:
        model, processing_class = load_student(student)
    tutor = tutor_client or Roles({"tutor": config.tutor}, cache_dir=run.path / REPLY_CACHE).client("tutor")
    trainer = make_trainer(model, processing_class, rows, tutor=tutor, config=config,
                           output_dir=run.path / TRAINER_DIR, run_dir=run.path)
    trainer.add_callback(_jsonl_log_callback(logs[TRAIN_LOG]))
    run.update_manifest(world_size=trainer.accelerator.num_processes,  # B counts every process's rows
                        batching=trainer.batching.manifest(), tracking=trainer.tracking.manifest(),
                        resumed_from=str(resume) if resume else None, resumed_at_step=checkpoint_step(resume))
    with wandb_run(trainer.tracking.report_to, run.path, config=asdict(config), group=STAGE):
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    ckpt = save_checkpoint(trainer, run.path / CHECKPOINT)
    metrics, train_log = read_records(logs[METRICS_FILE]), read_records(logs[TRAIN_LOG])
    first, last = metrics[0], metrics[-1]
    usage = summed_over_processes(vars(tutor.usage), trainer.accelerator)  # every process called the tutor
    run.update_manifest(tutor_usage=usage, n_rl_records=len(records), vision_student=vision)
    run.finish(start_mean_tcsr=first["mean_tcsr"], end_mean_tcsr=last["mean_tcsr"],
               start_share_worst_turn_safe=first["share_worst_turn_safe"],
               end_share_worst_turn_safe=last["share_worst_turn_safe"],
               unscored=sum(m["unscored"] for m in metrics), steps=len(metrics),
               global_step=trainer.state.global_step, skipped_nonfinite_steps=trainer.skipped_nonfinite_steps)
    return GRPOResult(run.path, ckpt, metrics, train_log)


def save_checkpoint(trainer: Any, dest: Path) -> Path:
    """The trained student as a plain checkpoint (a LoRA adapter merged in) with its processing class.

    In a multi-process launch the main process writes it. With FSDP or ZeRO-3 the weights are sharded:
    every process takes part in gathering them (``Trainer.save_model``), and a LoRA run leaves the
    adapter, not merged weights (docs/multi_gpu.md).
    """
    from peft import PeftModel

    acc = trainer.accelerator
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        trainer.save_model(str(dest))
        if acc.is_main_process:
            trainer.processing_class.save_pretrained(dest)
    elif acc.is_main_process:
        model = acc.unwrap_model(trainer.model)
        if isinstance(model, PeftModel):
            model = model.merge_and_unload()
        model.save_pretrained(dest)
        trainer.processing_class.save_pretrained(dest)
    acc.wait_for_everyone()
    return dest


def _jsonl_log_callback(path: Path) -> Any:
    from transformers import TrainerCallback

    from steerkit.runs import ResultLog

    class JsonlLog(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            if logs:
                clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in logs.items()}
                ResultLog(path, key="step", fsync=False).append({"step": state.global_step, **clean})

    return JsonlLog()


if __name__ == "__main__":  # python -m steerkit.grpo / accelerate launch -m steerkit.grpo (steerkit.grpo_cli)
    from steerkit.grpo_cli import main

    main()
