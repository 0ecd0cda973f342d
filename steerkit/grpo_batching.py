"""GRPO batch arithmetic: B prompts x K generations per step, in micro-batches with accumulation.

One optimiser step trains on ``B x K`` rows (docs/method.md section 4: B prompts, K = 5 trajectories
each). TRL 1.16 has no notion of B: it trains ``per_device_train_batch_size x
gradient_accumulation_steps x processes`` rows per step and rolls out ``generation_batch_size`` rows
at a time (all processes together; ``steps_per_generation``, in micro-steps, follows from it). This
module turns the method's numbers into TRL's and refuses, at start-up, a combination that does not
add up, with the arithmetic in the message.

A rollout covers whole steps here (``generation_batch`` a multiple of ``B x K``): a rollout cut
across steps would leave a step's metrics in two places and a checkpoint inside a rollout whose
remaining micro-batches a resume cannot rebuild, so checkpoints also fall on rollout boundaries.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Batching:
    """A checked GRPO batch layout (build with `resolve_batching`); recorded in the run manifest.

    Attributes:
        prompts_per_step: B.
        num_generations: K.
        per_device_batch: rows per forward/backward pass on one process (the micro-batch).
        gradient_accumulation: micro-batches per optimiser step on each process.
        processes: data-parallel processes (``WORLD_SIZE``).
        generation_batch: rows rolled out at once, all processes together.
    """

    prompts_per_step: int
    num_generations: int
    per_device_batch: int
    gradient_accumulation: int
    processes: int
    generation_batch: int

    @property
    def rows_per_step(self) -> int:
        return self.prompts_per_step * self.num_generations

    @property
    def steps_per_rollout(self) -> int:
        return self.generation_batch // self.rows_per_step

    def trl_args(self) -> dict[str, int]:
        """The values for TRL's ``GRPOConfig`` (``steps_per_generation`` is derived by TRL)."""
        return {
            "per_device_train_batch_size": self.per_device_batch,
            "gradient_accumulation_steps": self.gradient_accumulation,
            "num_generations": self.num_generations,
            "generation_batch_size": self.generation_batch,
        }

    def manifest(self) -> dict[str, int]:
        return {**asdict(self), "rows_per_step": self.rows_per_step, "steps_per_rollout": self.steps_per_rollout,
                "steps_per_generation": self.generation_batch // (self.per_device_batch * self.processes)}


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}es"


def resolve_batching(prompts_per_step: int, num_generations: int, *, per_device_batch: int = 0,
                     gradient_accumulation: int = 0, generation_batch: int = 0, processes: int = 1,
                     save_steps: int = 0) -> Batching:
    """Check and complete a batch layout; 0 means "derive it".

    ``per_device_batch`` 0 with ``gradient_accumulation`` 0 puts a whole step in one micro-batch per
    process; either one alone is derived from the other. ``generation_batch`` 0 rolls out one step's
    rows at a time.

    Raises:
        ValueError: with the arithmetic that fails.

    Example:
        >>> resolve_batching(64, 5, per_device_batch=2, gradient_accumulation=0).gradient_accumulation
        160
        >>> resolve_batching(64, 5, per_device_batch=6, gradient_accumulation=8)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: GRPO batching: 64 x 5 = 320 rows per step do not divide into per-device batch 6 x ...
    """
    for name, value in (("prompts_per_step", prompts_per_step), ("processes", processes)):
        if value < 1:
            raise ValueError(f"GRPO batching: {name} must be at least 1, got {value}")
    if num_generations < 2:
        raise ValueError(f"GRPO batching: num_generations (K) must be at least 2 (GRPO compares a group), "
                         f"got {num_generations}")
    for name, value in (("per_device_batch", per_device_batch), ("gradient_accumulation", gradient_accumulation),
                        ("generation_batch", generation_batch), ("save_steps", save_steps)):
        if value < 0:
            raise ValueError(f"GRPO batching: {name} must be 0 (derive) or positive, got {value}")
    rows = prompts_per_step * num_generations
    head = f"GRPO batching: {prompts_per_step} x {num_generations} = {rows} rows per step"
    per_device, accumulation = per_device_batch, gradient_accumulation
    if not per_device and not accumulation:
        accumulation = 1
    if not per_device:
        per_device = rows // (accumulation * processes)
        if per_device * accumulation * processes != rows:
            raise ValueError(f"{head} do not divide into accumulation {accumulation} x "
                             f"{_plural(processes, 'process')}")
    if not accumulation:
        accumulation = rows // (per_device * processes)
        if per_device * accumulation * processes != rows:
            raise ValueError(f"{head} do not divide into per-device batch {per_device} x "
                             f"{_plural(processes, 'process')} (= {per_device * processes} rows a micro-step)")
    if per_device * accumulation * processes != rows:
        raise ValueError(f"{head} do not divide into per-device batch {per_device} x accumulation {accumulation}"
                         f" x {_plural(processes, 'process')} (= {per_device * accumulation * processes} rows);"
                         f" choose per_device_batch x gradient_accumulation x processes = {rows}")
    generation = generation_batch or rows
    if generation % rows:
        raise ValueError(f"{head}: generation_batch {generation} is not a whole number of steps; use a"
                         f" multiple of {rows} (one rollout covers whole steps)")
    steps = generation // rows
    if save_steps and save_steps % steps:
        raise ValueError(f"{head}: one rollout of {generation} rows covers {steps} steps, so save_steps"
                         f" ({save_steps}) must be a multiple of {steps} (a checkpoint inside a rollout"
                         " cannot be resumed)")
    return Batching(prompts_per_step, num_generations, per_device, accumulation, processes, generation)
