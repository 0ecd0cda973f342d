"""The TRL adapter of Stage III's tutor-in-the-loop GRPO (docs/method.md section 4).

- `tutor_trainer_class` builds `TutorGRPOTrainer`: TRL 1.16 ``GRPOTrainer`` that lets its
  experimental ``rollout_func(prompts, trainer)`` see the dataset rows behind the prompts, keeps the
  loss finite at the tutor's inserted turns and gathers sharded weights for the rollout.
- `TutorRollout`: the ``rollout_func``. It receives the prompts already repeated K times (B x K rows;
  images only from the initial prompt), rolls them out with `steerkit.rollout.rollout` (through
  `steerkit.rollout_vllm` when ``use_vllm`` is set, transformers ``generate`` otherwise) and returns
  ``prompt_ids``, ``completion_ids`` (the whole multi-turn continuation), ``logprobs``, ``env_mask`` and
  the per-turn tutor scores as extra columns that `steerkit.rewards.TrajectoryReward` folds into TCSR.
- `rollout_metrics`: the per-step summary of a batch of trajectories.
- `nonfinite_grad_guard`: the callback that skips an update whose gradient is not finite.

This is the only module that touches TRL's experimental hooks; `steerkit.grpo` wires it into a run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from steerkit.clients import ChatClient
from steerkit.distributed import gathered
from steerkit.layout import METRICS_FILE, TRAJECTORIES_FILE
from steerkit.rewards import (
    PAPER_WEIGHTS,
    PROPER_TURN,
    TCSR_ALPHA,
    TrajectoryReward,
    TurnRewardWeights,
    tcsr,
    trajectory_reward,
    turn_reward,
    worst_turn_safe,
)
from steerkit.rollout import RolloutConfig, RolloutSample, Trajectory, images_of, rollout

log = logging.getLogger(__name__)


def tutor_trainer_class() -> type:
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

        def _get_per_token_logps_and_entropies(self, model: Any, input_ids: Any, attention_mask: Any,
                                               logits_to_keep: int, batch_size: int | None = None,
                                               **kwargs: Any) -> tuple[Any, Any, Any]:
            import torch

            base = super()._get_per_token_logps_and_entropies
            chunks = image_chunks(input_ids.size(0), batch_size or input_ids.size(0), kwargs)
            if chunks is None:
                logps, entropies, aux = base(model, input_ids, attention_mask, logits_to_keep, batch_size, **kwargs)
            else:
                parts = [base(model, input_ids[a:b], attention_mask[a:b], logits_to_keep, b - a, **kw)
                         for a, b, kw in chunks]
                logps = torch.cat([p[0] for p in parts])
                entropies = torch.cat([p[1] for p in parts]) if parts[0][1] is not None else None
                aux = torch.stack([p[2] for p in parts]).mean() if parts[0][2] is not None else None
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


def image_chunks(rows: int, chunk: int, kwargs: dict[str, Any]) -> list[tuple[int, int, dict[str, Any]]] | None:
    """The forward passes over ``rows`` rows in chunks of ``chunk`` rows: (start, end, model inputs).

    TRL slices Qwen-style image inputs (``pixel_values`` and ``image_grid_thw``, ``num_images`` per
    row) for each chunk itself, but hands a chunk whose rows carry no image an empty
    ``image_grid_thw`` instead of none, and the vision tower fails on it. GRPO rows with and without
    an image meet in one rollout whenever only some RL dialogues open with an image (notebook 01's
    ``image_share``), and a micro-batch or log-prob chunk smaller than the rollout (``per_device_batch``
    below B x K) can hold only image-free rows. Such a chunk gets no image inputs here, so the model
    takes its positions as text; a chunk with images gets its own rows' pixels and grids.
    """
    pixels, grid, counts = kwargs.get("pixel_values"), kwargs.get("image_grid_thw"), kwargs.get("num_images")
    if pixels is None or grid is None or counts is None:
        return None  # no Qwen-style image inputs: TRL's own chunking is right
    per_image = grid.prod(dim=-1).tolist()
    first_image = [sum(counts[:i]) for i in range(rows + 1)]
    first_pixel = [sum(per_image[:first_image[i]]) for i in range(rows + 1)]
    image_keys = {"pixel_values", "image_grid_thw", "num_images"}
    out = []
    for a in range(0, rows, chunk):
        b = min(a + chunk, rows)
        kw = {k: (v[a:b] if k not in image_keys and hasattr(v, "shape") and v.ndim and v.shape[0] == rows else v)
              for k, v in kwargs.items()}
        if first_image[b] == first_image[a]:
            kw.update(pixel_values=None, image_grid_thw=None, num_images=None)
        else:
            kw.update(pixel_values=pixels[first_pixel[a]:first_pixel[b]],
                      image_grid_thw=grid[first_image[a]:first_image[b]], num_images=list(counts[a:b]))
        out.append((a, b, kw))
    return out


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
        step = int(trainer.state.global_step)
        own = rollout_metrics(trajs, reward=self.reward)
        log.info("GRPO step %d: %s", step, json.dumps(own))
        # the main process writes the whole step, every process's share: only the text side and the
        # student-token mask travel, the token ids and log-probs stay where they are trained on
        everyone = gathered([replace(t, prompt_ids=[], completion_ids=[], logprobs=[]) for t in trajs],
                            trainer.accelerator)
        if len(everyone) != len(trajs):
            own = rollout_metrics(everyone, reward=self.reward)
            log.info("GRPO step %d, all processes: %s", step, json.dumps(own))
        self._log(everyone, own, step=step)
        return {
            "prompt_ids": [t.prompt_ids for t in trajs],
            "completion_ids": [t.completion_ids for t in trajs],
            "logprobs": [t.logprobs for t in trajs],
            "env_mask": [t.env_mask for t in trajs],
            "turn_scores": [t.turn_scores for t in trajs],
            "turn_answers": [t.answers for t in trajs],
            "zero_final": [t.ended == "static" for t in trajs],
        }

    def _log(self, trajs: list[Trajectory], metrics: dict[str, Any], *, step: int) -> None:
        m = {**metrics, "step": step}
        self.history.append(m)
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



def nonfinite_grad_guard() -> Any:
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
