"""The settings of a Stage III GRPO run and the method's defaults (docs/method.md section 4).

`GRPORunConfig` is recorded whole in the run manifest; `batching_of` checks its batch layout
(`steerkit.grpo_batching`). `steerkit.grpo` re-exports both.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from steerkit.layout import MAX_TURNS
from steerkit.parameters import named_fields
from steerkit.rewards import TCSR_ALPHA

NUM_GENERATIONS = 5  # method.md 4: K = 5 trajectories per sample
LEARNING_RATE = 1e-5  # method.md 4: lr 1e-5 (paper and published scripts)
#: KL coefficient. The paper's text says 0.1; the published scripts that produced the tables use
#: 0.001 as a low-variance (k3) KL loss, which is what TRL's beta implements. Default: the scripts.
BETA = 0.001


@dataclass
class GRPORunConfig:
    """A Stage III run; every field is recorded in the run manifest.

    Attributes:
        student: a checkpoint folder or "smollm2" (the base model when ``init_checkpoint`` is empty).
        init_checkpoint: start from this (SFT) checkpoint instead; the paper's warm start (method.md 4
            ablation "without the SFT warm start": leave it empty).
        tutor: the tutor's role spec ("rules", "openai:<model>@<url>", ...).
        rl_data: STEER-RL JSONL or a run directory with ``steer_rl.jsonl``; empty builds a small set
            from packaged seeds (`seed_rl_dialogues`).
        n_prompts: how many RL dialogues to use (0: all).
        prompts_per_step: B, prompts per optimiser step (each rolled out K times).
        num_generations: K (method.md 4: 5).
        per_device_batch: rows per forward/backward pass on one process (0: derived; both this and
            ``gradient_accumulation`` 0 put the whole step of B x K rows in one pass).
        gradient_accumulation: micro-batches per step on each process (0: derived). B x K must equal
            per_device_batch x gradient_accumulation x processes (`steerkit.grpo_batching`).
        generation_batch: rows rolled out at once, all processes (0: one step's B x K rows; a multiple
            of B x K rolls out several steps at a time).
        max_steps: optimiser steps.
        learning_rate: method.md 4: 1e-5.
        lr_scheduler: the learning-rate schedule (transformers' names); the paper does not give one, so
            the default is TRL's own ("linear" decay to 0 over ``max_steps``).
        beta: KL coefficient (see `BETA`).
        alpha: TCSR weight of the worst turn (method.md 4: 0.3).
        aggregator: tcsr | tcsr_paper | mean | min | last | soft_linear | harmonic.
        turn_weights: "paper" (0.4/0.4/0.2) or "alt" (0.6/0.3/0.1).
        authors_zero_final: score the final turn 0 as the authors' code did (replication only).
        feedback: tutor-written next turns (False: static next turns, the ablation).
        scale_rewards: TRL's "group" divides advantages by the group std as the authors' runs did;
            "none" keeps A = R - mean (the paper's formula).
        loss_type: TRL's loss ("dapo" is TRL's default; "grpo" the original per-sequence mean).
        max_turns: method.md 4: 10.
        max_new_tokens: per turn.
        temperature, top_p: sampling.
        generation_dtype: sample from a copy in this dtype ("bfloat16"); None: the trained weights.
        lora: train a LoRA adapter (q/k/v/o of the language model) instead of all weights (CPU).
        lora_r: LoRA rank.
        use_vllm: TRL's vLLM flag, passed through (GPU only; see the module docstring).
        vllm_mode: "colocate" or "server".
        save_steps: a resumable trainer checkpoint every this many steps (0: none; a killed run then
            starts again from step 0). See `steerkit.grpo_resume`.
        save_total_limit: trainer checkpoints kept (the newest ones).
        gradient_checkpointing: recompute activations in the backward pass (saves GPU memory on long
            multi-turn rows; on CPU it only costs time).
        report_to: "none" or "wandb" (`steerkit.tracking`: offline without a key, never in CI).
        seed: everything random.
        with_images: give the seed-built RL set packaged photos (VLM students only).
        run_id: the run directory's name ("" for a new timestamped one); runs_root: its root
            ("" for the repository's papermill_runs/).
    """

    student: str = "smollm2"
    init_checkpoint: str = ""
    tutor: str = "rules"
    rl_data: str = ""
    n_prompts: int = 0
    prompts_per_step: int = 2
    num_generations: int = NUM_GENERATIONS
    per_device_batch: int = 0
    gradient_accumulation: int = 0
    generation_batch: int = 0
    max_steps: int = 2
    learning_rate: float = LEARNING_RATE
    lr_scheduler: str = "linear"
    beta: float = BETA
    alpha: float = TCSR_ALPHA
    aggregator: str = "tcsr"
    turn_weights: str = "paper"
    authors_zero_final: bool = False
    feedback: bool = True
    scale_rewards: str = "group"
    loss_type: str = "dapo"
    max_turns: int = MAX_TURNS
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    generation_dtype: str | None = None
    lora: bool = True
    lora_r: int = 16
    use_vllm: bool = False
    vllm_mode: str = "colocate"
    save_steps: int = 0
    save_total_limit: int = 2
    gradient_checkpointing: bool = False
    report_to: str = "none"
    seed: int = 0
    with_images: bool = False
    run_id: str = ""
    runs_root: str = ""

    @classmethod
    def from_parameters(cls, values: Mapping[str, Any], **overrides: Any) -> GRPORunConfig:
        """A config from a notebook's parameters: each field named in ``values`` (other names are
        ignored), then ``overrides`` for fields the notebook names otherwise.

        >>> c = GRPORunConfig.from_parameters({"alpha": 0.5, "seed": 3, "show_trajectories": 2}, seed=4)
        >>> c.alpha, c.seed
        (0.5, 4)
        """
        return cls(**{**named_fields(cls, values), **overrides})


def batching_of(config: GRPORunConfig) -> Any:
    """The run's checked `steerkit.grpo_batching.Batching` (processes from ``WORLD_SIZE``)."""
    from steerkit.grpo_batching import resolve_batching

    return resolve_batching(config.prompts_per_step, config.num_generations, per_device_batch=config.per_device_batch,
                            gradient_accumulation=config.gradient_accumulation,
                            generation_batch=config.generation_batch,
                            processes=int(os.environ.get("WORLD_SIZE", "1")), save_steps=config.save_steps)
