"""Stage III: tutor-in-the-loop multi-turn GRPO with TCSR (docs/method.md section 4).

- `TutorRollout` + `TutorGRPOTrainer`: the adapter to TRL 1.16 ``GRPOTrainer``'s experimental
  ``rollout_func(prompts, trainer)``. It receives the prompts already repeated K times (B x K rows;
  images only from the initial prompt), rolls them out with `steerkit.rollout.rollout` (through
  `steerkit.rollout_vllm` when ``use_vllm`` is set, transformers ``generate`` otherwise) and returns
  ``prompt_ids``, ``completion_ids`` (the whole multi-turn continuation), ``logprobs``, ``env_mask`` and
  the per-turn tutor scores as extra columns that `steerkit.rewards.TrajectoryReward` folds into TCSR.
  This is the only module that touches TRL's experimental hooks.
- `run_grpo`: a whole Stage III run into a run directory (manifest, checkpoints, per-step metrics,
  trajectories).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from steerkit.clients import ChatClient

# re-exported: the run's settings and the method's defaults live in steerkit.grpo_config
from steerkit.grpo_config import BETA, LEARNING_RATE, NUM_GENERATIONS, GRPORunConfig, batching_of  # noqa: F401
from steerkit.layout import CHECKPOINT, METRICS_FILE, REPLY_CACHE, TRAIN_LOG, TRAJECTORIES_FILE
from steerkit.progress import progress_callback
from steerkit.rewards import (
    PAPER_WEIGHTS,
    PROPER_TURN,
    TCSR_ALPHA,
    TrajectoryReward,
    TurnRewardWeights,
    tcsr,
    trajectory_reward,
    turn_reward,
    turn_weights,
    worst_turn_safe,
)
from steerkit.rl_data import load_captions, load_rl_dialogues, rl_rows, seed_rl_dialogues
from steerkit.rollout import RolloutConfig, RolloutSample, Trajectory, images_of, rollout
from steerkit.tutor import TUTOR_PROMPT

log = logging.getLogger(__name__)

STAGE = "03_grpo_tutor_tcsr"


# ---- TRL adapter ----------------------------------------------------------------------------------


def _trainer_class() -> type:
    from trl import GRPOTrainer

    from steerkit.distributed import weights_digest, whole_weights

    class TutorGRPOTrainer(GRPOTrainer):
        """GRPOTrainer that lets the rollout function see the dataset rows behind its prompts.

        TRL passes ``rollout_func`` only the prompts; the static candidate turns, image refs and goal
        live in other columns of the same rows, kept here for the duration of one generation batch.
        """

        #: during a loss computation, the completion positions the loss does not read (env_mask 0)
        _unread: Any = None

        def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
            self.rollout_rows = inputs
            try:
                return super()._generate_and_score_completions(inputs)
            finally:
                self.rollout_rows = None

        def _compute_loss(self, model: Any, inputs: dict[str, Any]) -> Any:
            """TRL's loss with the log-probs of the positions it does not read set to 0 on all sides.

            TRL 1.16 evaluates the k3 KL ``exp(ref - cur) - (ref - cur) - 1`` at every completion
            position and applies the loss mask afterwards. At the tutor's inserted turns (env_mask 0)
            the policy is never trained, so ``ref - cur`` can grow without bound; past about 88 the
            exponential is inf, and inf x 0 is NaN in the loss and in every gradient (a finite logged
            loss, a NaN grad_norm). With the reference, old and current log-probs all 0 there, the KL
            and the importance ratio are exactly 0 and 1 at those positions and nothing flows back.
            """
            keep = inputs.get("tool_mask")
            if keep is None:
                return super()._compute_loss(model, inputs)
            unread = keep == 0
            inputs = dict(inputs)
            for name in ("ref_per_token_logps", "old_per_token_logps", "sampling_per_token_logps"):
                if inputs.get(name) is not None and inputs[name].shape == unread.shape:
                    inputs[name] = inputs[name].masked_fill(unread, 0.0)
            self._unread = unread
            try:
                return super()._compute_loss(model, inputs)
            finally:
                self._unread = None

        def _get_per_token_logps_and_entropies(self, *args: Any, **kwargs: Any) -> tuple[Any, Any, Any]:
            logps, entropies, aux = super()._get_per_token_logps_and_entropies(*args, **kwargs)
            if self._unread is not None and logps.shape == self._unread.shape:
                # masked_fill: no gradient reaches the filled positions (a multiply by 0 would carry NaN)
                logps = logps.masked_fill(self._unread, 0.0)
            return logps, entropies, aux

        def _generate(self, prompts: list[Any]) -> Any:
            if self.use_vllm:  # vLLM decodes; the trained model runs no forward pass in the rollout
                return super()._generate(prompts)
            # FSDP2 / ZeRO-3: processes decode different numbers of steps (steerkit.distributed)
            with whole_weights(self.model_wrapped, self.accelerator):
                return super()._generate(prompts)

        def train(self, *args: Any, **kwargs: Any) -> Any:
            out = super().train(*args, **kwargs)
            acc = self.accelerator
            if acc.num_processes > 1 and not (self.is_fsdp_enabled or self.is_deepspeed_enabled):
                # data parallel: every process holds the whole model, and all must hold the same one
                log.info("process %d of %d: trained weights sha256 %s", acc.process_index, acc.num_processes,
                         weights_digest(acc.unwrap_model(self.model)))
            return out

    return TutorGRPOTrainer


class TutorRollout:
    """TRL ``rollout_func(prompts, trainer)``: B x K rows in, one multi-turn trajectory per row out.

    Writes per-step metrics (``metrics.jsonl``: mean reward, mean TCSR, mean turn reward and safety,
    share of trajectories whose worst turn is safe, unscored count) and the trajectories
    (``trajectories.jsonl``) into ``run_dir`` when one is given.
    """

    def __init__(self, tutor: ChatClient, config: RolloutConfig, reward: TrajectoryReward,
                 run_dir: Path | None = None) -> None:
        self.tutor = tutor
        self.config = config
        self.reward = reward
        self.run_dir = run_dir
        self.calls = 0
        self.history: list[dict[str, Any]] = []

    def __call__(self, prompts: list[list[dict[str, Any]]], trainer: Any) -> dict[str, Any]:
        rows = getattr(trainer, "rollout_rows", None)
        if rows is None or len(rows) != len(prompts):
            raise RuntimeError("TutorRollout needs the rows behind the prompts: train with TutorGRPOTrainer"
                               " (steerkit.grpo.make_trainer), not a plain GRPOTrainer")
        samples = [
            RolloutSample(
                prompt=p, static_turns=list(r.get("static_turns") or []), images=images_of(p),
                id=str(r.get("id", "")), image_refs=list(r.get("image_refs") or []), root=Path("/"),
                goal=str(r.get("goal") or ""),
            )
            for p, r in zip(prompts, rows, strict=True)
        ]
        model = trainer.accelerator.unwrap_model(trainer.model)
        cfg = RolloutConfig(**{**asdict(self.config), "temperature": trainer.temperature, "top_p": trainer.top_p})
        was_training = model.training
        model.eval()
        engine = None
        if getattr(trainer.args, "use_vllm", False):
            from steerkit.rollout_vllm import vllm_engine

            engine = vllm_engine(trainer, model)
        try:
            trajs = rollout(samples, model=model, processing_class=trainer.processing_class, tutor=self.tutor,
                            config=cfg, engine=engine)
        finally:
            model.train(was_training)
        self.calls += 1
        self._log(trajs, step=int(trainer.state.global_step))
        return {
            "prompt_ids": [t.prompt_ids for t in trajs],
            "completion_ids": [t.completion_ids for t in trajs],
            "logprobs": [t.logprobs for t in trajs],
            "env_mask": [t.env_mask for t in trajs],
            "turn_scores": [t.turn_scores for t in trajs],
            "turn_answers": [t.answers for t in trajs],
            "zero_final": [t.ended == "static" for t in trajs],
        }

    def _log(self, trajs: list[Trajectory], *, step: int) -> None:
        m = rollout_metrics(trajs, reward=self.reward)
        m["step"] = step
        self.history.append(m)
        log.info("GRPO step %d: %s", step, json.dumps(m))
        if self.run_dir is not None:
            from steerkit.runs import ResultLog

            ResultLog(self.run_dir / METRICS_FILE, key="step", fsync=False).append(m)
            tlog = ResultLog(self.run_dir / TRAJECTORIES_FILE, key="id", fsync=False)
            for k, t in enumerate(trajs):
                tlog.append(t.record(step=step, row=k, reward=_reward_of(t, self.reward)))


def _reward_of(t: Trajectory, reward: TrajectoryReward) -> float | None:
    return trajectory_reward(t.answers, t.turn_scores, aggregator=reward.aggregator, alpha=reward.alpha,
                             weights=reward.weights,
                             authors_zero_final=reward.authors_zero_final and t.ended == "static")


def rollout_metrics(trajs: Sequence[Trajectory], *, reward: TrajectoryReward | None = None,
                    alpha: float = TCSR_ALPHA, weights: TurnRewardWeights = PAPER_WEIGHTS) -> dict[str, Any]:
    """Per-step summary of a batch of trajectories (scored ones only; unscored are counted).

    ``mean_tcsr`` is always TCSR (run form) so runs with different aggregators compare on one scale;
    ``mean_reward`` is the run's own aggregator. ``share_worst_turn_safe``: trajectories with no harmful
    turn (every tutor safety >= 5, `steerkit.rewards.worst_turn_safe`); ``share_worst_turn_proper``:
    every turn also a proper answer (safety >= 8: no over-refusal, preaching or evasion).
    """
    reward = reward or TrajectoryReward(alpha=alpha, weights=weights)
    scored = [t for t in trajs if t.verdicts and all(v.scored for v in t.verdicts)]
    turn_rs = [turn_reward(a, s, reward.weights) for t in scored for a, s in zip(t.answers, t.turn_scores, strict=True)]
    safeties = [s["safety"] for t in scored for s in t.turn_scores]  # type: ignore[index]
    tc = [tcsr([turn_reward(a, s, reward.weights) for a, s in zip(t.answers, t.turn_scores, strict=True)], reward.alpha)
          for t in scored]
    rw = [r for r in (_reward_of(t, reward) for t in scored) if r is not None]

    def mean(xs: Sequence[float]) -> float | None:
        return sum(xs) / len(xs) if xs else None

    return {
        "n": len(trajs),
        "unscored": len(trajs) - len(scored),
        "mean_reward": mean(rw),
        "mean_tcsr": mean(tc),
        "mean_turn_reward": mean(turn_rs),
        "mean_safety": mean(safeties),
        "share_worst_turn_safe": mean([float(worst_turn_safe(t.turn_scores)) for t in scored]),
        "share_worst_turn_proper": mean([float(worst_turn_safe(t.turn_scores, PROPER_TURN)) for t in scored]),
        "mean_turns": mean([len(t.answers) for t in trajs]),
        "aggregator": reward.aggregator,
    }


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
    trainer_cls = with_epoch_seeded_order(_trainer_class())
    guard = _nonfinite_grad_guard()
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


def _nonfinite_grad_guard() -> Any:
    """A callback that drops an update whose gradient holds inf or NaN, and records the step.

    Without it one such gradient writes NaN into the weights and the next rollout fails inside sampling
    (seen with bf16 on CUDA after a policy had drifted far from its start). With every gradient set to
    None the optimizer leaves all parameters, and its moments, as they were.
    """
    import torch
    from transformers import TrainerCallback

    class NonFiniteGradGuard(TrainerCallback):
        def __init__(self) -> None:
            self.skipped: list[int] = []

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            if not grads or torch.isfinite(torch.nn.utils.get_total_norm(grads)):
                return
            for p in model.parameters():
                p.grad = None
            self.skipped.append(state.global_step + 1)
            log.warning("GRPO step %d: non-finite gradient, update skipped (%d skipped so far)",
                        state.global_step + 1, len(self.skipped))

    return NonFiniteGradGuard()


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
    from steerkit.converse import STUDENT_SYSTEM
    from steerkit.grpo_resume import (
        checkpoint_step,
        load_checkpoint_weights,
        resume_point,
        trim_logs,
    )
    from steerkit.models import is_vision_model, load_student, resolve_model_path
    from steerkit.roles import Roles
    from steerkit.runs import open_run, read_records
    from steerkit.sft import TRAINER_DIR, distributed_state, last_complete_checkpoint
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
    run.update_manifest(tutor_usage=vars(tutor.usage), n_rl_records=len(records), vision_student=vision)
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
