"""Resuming a killed GRPO run from its last complete trainer checkpoint.

A Stage III run saves a trainer checkpoint every ``save_steps`` steps into ``<run>/trainer/``
(weights or LoRA adapter, optimizer, scheduler, RNG states, ``trainer_state.json`` with the step;
the data position follows from the step). A rerun with the same run id:

1. removes checkpoints cut short by a kill and takes the newest complete one
   (`steerkit.sft.last_complete_checkpoint`);
2. trims the per-step logs to the steps that checkpoint holds, so no step is counted twice;
3. loads full fine-tuned weights from it itself (transformers' own resume loads a VLM's saved key
   names into nothing, see `steerkit.sft.build_trainer`), keeping the initial model as TRL's KL
   reference; a LoRA adapter resumes through the trainer;
4. trains on from the step after it.

Tutor replies go through the run's reply cache (``<run>/cache/``), and each step's sampling is
seeded by (seed, step, process) (`StepRollout`), so a step redone after the checkpoint samples the
same answers from the same weights and asks the tutor the same questions: on a deterministic device
they come from the cache. On a GPU whose kernels are not bitwise deterministic the redone steps may
sample differently and then ask the tutor anew; steps up to the checkpoint are never rolled out again.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from steerkit.layout import METRICS_FILE, TRAIN_LOG, TRAINER_STATE, TRAJECTORIES_FILE
from steerkit.runs import ResultLog, atomic_write_text

log = logging.getLogger(__name__)


def checkpoint_step(checkpoint: Path | None) -> int:
    """The optimiser steps a trainer checkpoint holds (0 for None)."""
    if checkpoint is None:
        return 0
    return int(json.loads((checkpoint / TRAINER_STATE).read_text())["global_step"])


def resume_point(trainer_dir: Path) -> Path | None:
    """The newest complete checkpoint under ``trainer_dir``; partial ones (cut by a kill) are removed."""
    from steerkit.sft import last_complete_checkpoint

    return last_complete_checkpoint(trainer_dir, remove_partial=True)


def trim_logs(run_dir: Path, step: int) -> dict[str, int]:
    """Drop the log records of steps after ``step`` (all of them for 0); returns how many per file.

    Rollout records (metrics, trajectories) carry the step count at rollout time, before that step's
    update: the rollouts of steps 1..N are numbered 0..N-1. Trainer log records carry the step count
    after the update: 1..N.
    """
    kept_below = {METRICS_FILE: step, TRAJECTORIES_FILE: step, TRAIN_LOG: step + 1}
    dropped: dict[str, int] = {}
    for name, limit in kept_below.items():
        path = run_dir / name
        if not path.is_file():
            continue
        records = list(ResultLog(path, key="step", fsync=False))  # repairs a torn last line first
        keep = [r for r in records if int(r.get("step", 0)) < limit]
        if len(keep) != len(records):
            atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in keep))
            dropped[name] = len(records) - len(keep)
    if dropped:
        log.info("%s: resuming after step %d; dropped the records of later steps %s", run_dir, step, dropped)
    return dropped


def load_checkpoint_weights(checkpoint: Path, reference: str) -> tuple[Any, Any]:
    """A full fine-tuned student from a trainer checkpoint, with ``reference`` (the model the run
    started from) kept as its name, which TRL loads as the KL reference model."""
    from steerkit.models import load_student

    model, processing_class = load_student(checkpoint)
    model.config._name_or_path = reference
    return model, processing_class


def with_epoch_seeded_order(trainer_cls: type) -> type:
    """``trainer_cls`` whose prompt order in epoch e is a function of (seed, e) alone.

    TRL's ``RepeatSampler`` draws each epoch's permutation from one generator seeded once, so a run
    resumed in epoch 3 would draw epoch 0's order there (the skipped epochs drew nothing). Seeding per
    epoch (transformers calls the sampler's ``set_epoch`` at every epoch, resumed or not) gives a
    resumed run the prompts the uninterrupted one had; the data position within the epoch is the
    trainer's own batch skipping.
    """

    class EpochSeededOrder(trainer_cls):  # type: ignore[misc, valid-type]
        def _get_train_sampler(self, dataset: Any = None) -> Any:
            return _EpochSeededSampler(super()._get_train_sampler(dataset))

    EpochSeededOrder.__name__ = EpochSeededOrder.__qualname__ = trainer_cls.__name__
    return EpochSeededOrder


class _EpochSeededSampler:
    """A TRL ``RepeatSampler`` with ``set_epoch``: reseeds its generator with seed + epoch."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def set_epoch(self, epoch: int) -> None:
        if getattr(self.inner, "shuffle", False) and self.inner.seed is not None:
            self.inner.generator.manual_seed(self.inner.seed + epoch)

    def __iter__(self) -> Any:
        return iter(self.inner)

    def __len__(self) -> int:
        return len(self.inner)


class StepRollout:
    """A rollout function seeded per step, whose trajectory metrics join the trainer's log.

    The seed is a function of the run's seed, the step and the process, not of the random state the
    trainer has reached, so a step redone after a resume samples what it sampled before; the global
    random state is restored afterwards. The metrics (`steerkit.grpo_tracking.trajectory_metrics`)
    go into TRL's per-step metrics, which reach ``train_log.jsonl`` and wandb.
    """

    def __init__(self, inner: Any, *, seed: int, reward: Any) -> None:
        self.inner = inner
        self.seed = seed
        self.reward = reward

    def seed_for(self, step: int, process: int) -> int:
        return (self.seed * 1_000_003 + step * 1_009 + process) % 2**63

    def __call__(self, prompts: list[Any], trainer: Any) -> dict[str, Any]:
        import torch

        from steerkit.grpo_tracking import trajectory_metrics

        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(self.seed_for(int(trainer.state.global_step), trainer.accelerator.process_index))
            out = self.inner(prompts, trainer)
        metrics = getattr(trainer, "_metrics", {}).get("train")
        if metrics is not None:
            for key, value in trajectory_metrics(out, self.reward).items():
                metrics[key].append(value)
        return out

    def __getattr__(self, name: str) -> Any:  # the wrapped rollout's counters (calls, history)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)
