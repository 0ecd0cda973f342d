"""The measurements behind ``scripts/gpu_smoke.py``: one function per phase, each returning its figures.

Every phase runs on the model folder `gpu_smoke.build` wrote (Qwen2.5-VL-3B's shape with random
weights, or the tiny VLM in a dry run) and returns a JSON-ready dict. Timings synchronise CUDA first;
peak memory is ``torch.cuda.max_memory_allocated`` since the phase began (None on CPU).
"""

from __future__ import annotations

import math
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The authors' GRPO learning rate for the 3B student (their published 3B script; docs/method.md 4
#: gives 1e-5 for 7B), full fine-tuning, no LoRA.
AUTHORS_3B_GRPO_LR = 2e-6
#: The LoRA settings whose H200 runs logged a NaN grad_norm (benchmarks/README.md): constant 1e-3.
NAN_LORA_LR = 1e-3


@dataclass(frozen=True)
class Sizes:
    """How big each phase is. ``FULL`` fits the whole script in about 8 minutes on one H200."""

    sft_batch: int  # dialogues per optimiser step (one device, no accumulation)
    sft_steps: int  # timed steps, after one warm-up step
    dialogue_tokens: int  # target length of an SFT dialogue, image tokens included
    image_size: tuple[int, int]  # SFT images (width, height), scaled by the processor's own bounds
    turns: int  # GRPO and rollout turns
    grpo_prompts: int  # B
    grpo_k: int  # K
    grpo_mini_batch: int  # rows per forward/backward; B x K / this = gradient accumulation steps
    grpo_full_steps: int
    grpo_lora_steps: int
    grpo_new_tokens: int  # per turn
    rollout_batches: tuple[int, ...]
    rollout_new_tokens: int  # per turn


#: STEER-SFT dialogues run to 1-2k tokens; 640x480 is a typical photo (391 visual tokens unscaled).
FULL = Sizes(sft_batch=4, sft_steps=4, dialogue_tokens=1500, image_size=(640, 480), turns=3, grpo_prompts=4,
             grpo_k=5, grpo_mini_batch=4, grpo_full_steps=5, grpo_lora_steps=20, grpo_new_tokens=48,
             rollout_batches=(8, 32, 64), rollout_new_tokens=128)
TINY = Sizes(sft_batch=2, sft_steps=2, dialogue_tokens=160, image_size=(56, 56), turns=2, grpo_prompts=2,
             grpo_k=2, grpo_mini_batch=2, grpo_full_steps=2, grpo_lora_steps=2, grpo_new_tokens=6,
             rollout_batches=(2, 4), rollout_new_tokens=6)


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gib() -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def step_timer():  # -> transformers.TrainerCallback with .durations (seconds per optimiser step)
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.durations: list[float] = []
            self.t = 0.0

        def on_step_begin(self, args, state, control, **kw):
            sync()
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync()
            self.durations.append(time.perf_counter() - self.t)

    return StepTimer()


def deadline_stop(deadline: float, timer):  # -> TrainerCallback
    """Stop training before ``deadline`` (epoch seconds) when another step would not fit."""
    from transformers import TrainerCallback

    class DeadlineStop(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            last = timer.durations[-1] if timer.durations else 0.0
            if time.time() + 1.5 * last > deadline:
                control.should_training_stop = True

    return DeadlineStop()


def median_after_warmup(durations: list[float]) -> float | None:
    return statistics.median(durations[1:] if len(durations) > 1 else durations) if durations else None


# ---- SFT ------------------------------------------------------------------------------------------


def sft_data(folder: Path, model: Path, sizes: Sizes, n: int) -> tuple[Path, int]:
    """``n`` three-turn dialogues of about ``sizes.dialogue_tokens`` tokens with a photo-sized image in
    the first turn; returns the folder and the measured tokens of one dialogue (as the trainer sees it)."""
    import numpy as np
    from PIL import Image

    from steerkit.images import load_image
    from steerkit.models import load_processor
    from steerkit.schema import Dialogue, Message, write_jsonl
    from steerkit.sft_data import sft_rows

    processor = load_processor(model)
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    width, height = sizes.image_size
    sentence = "The picture shows a street with cars, a shop front and people walking past in the rain."

    def dialogue(i: int, repeats: int) -> Dialogue:
        answer = " ".join([sentence] * repeats)
        msgs = [Message(role="user", content="What is in this picture?", images=[f"images/{i}.png"])]
        for t in range(3):
            msgs.append(Message(role="assistant", content=f"<thinking>turn {t}</thinking><answer>{answer}</answer>"))
            if t < 2:
                msgs.append(Message(role="user", content="Tell me more about it, in detail."))
        return Dialogue(id=f"smoke-{i}", messages=msgs)

    def tokens(d: Dialogue) -> int:
        path = folder / "probe.jsonl"
        write_jsonl([d], path)
        row = sft_rows([(1, d)], path, vision=True, system=None)[0]
        text = processor.apply_chat_template(row["messages"], tokenize=False)
        images = [load_image(p) for p in row["images"]]
        return int(processor(text=[text], images=images, return_tensors="pt")["input_ids"].shape[1])

    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(folder / f"images/{i}.png")
    one = tokens(dialogue(0, 1))
    per_repeat = max(1, tokens(dialogue(0, 2)) - one)
    repeats = max(1, 1 + round((sizes.dialogue_tokens - one) / per_repeat))
    (folder / "probe.jsonl").unlink()
    write_jsonl([dialogue(i, repeats) for i in range(n)], folder / "steer_sft.jsonl")
    return folder, tokens(dialogue(0, repeats))


def sft(model: Path, work: Path, sizes: Sizes, *, backend: str, finetune: str) -> dict[str, Any]:
    """Seconds per optimiser step (median after a warm-up step), tokens/s and peak memory of SFT with
    the workbench's own trainer (`steerkit.sft_trainer.build_trainer`) on the same data and batch."""
    from steerkit.models import StudentUnavailable, unsloth_available

    if backend == "unsloth" and unsloth_available():
        import unsloth  # noqa: F401  (before trl and transformers, as Unsloth requires)
    from steerkit.sft import SFTRecipe
    from steerkit.sft_trainer import build_trainer

    n = sizes.sft_batch * (sizes.sft_steps + 1)
    data, dialogue_tokens = sft_data(work / "data", model, sizes, n)
    recipe = SFTRecipe(student=str(model), data=str(data), backend=backend, finetune=finetune,
                       max_steps=sizes.sft_steps + 1, batch_size=sizes.sft_batch,
                       per_device_batch_size=sizes.sft_batch, learning_rate=1e-5, max_length=None,
                       logging_steps=1, save_steps=10**9, report_to="none", runs_root=str(work / "runs"),
                       run_id=f"{backend}-{finetune}")
    run_dir = work / "runs" / recipe.run_id
    run_dir.mkdir(parents=True)
    reset_peak()
    try:
        if backend == "unsloth":  # Unsloth's collator masks everything but the responses
            trainer, info = build_trainer(recipe, run_dir)
            loss_on = "assistant tokens (UnslothVisionDataCollator)"
        else:
            with vision_loss_for_this_transformers() as loss_on:
                trainer, info = build_trainer(recipe, run_dir)
    except StudentUnavailable as exc:
        return {"status": "unavailable", "reason": str(exc)}
    timer = step_timer()
    trainer.add_callback(timer)
    trainer.train()
    step_s = median_after_warmup(timer.durations)
    tokens_per_step = sizes.sft_batch * dialogue_tokens
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {
        "status": "ok", "backend": backend, "finetune": finetune, "batch": sizes.sft_batch,
        "steps_timed": max(0, len(timer.durations) - 1), "dialogue_tokens": dialogue_tokens,
        "step_s": round(step_s, 4), "tokens_per_s": round(tokens_per_step / step_s, 1), "peak_gib": peak_gib(),
        "trainable_params": trainable, "vision_params_frozen": info["vision_params_frozen"],
        "gradient_checkpointing": info["gradient_checkpointing"], "bf16": info["bf16"], "loss_on": loss_on,
        "loss": [round(r["loss"], 4) for r in trainer.state.log_history if "loss" in r],
    }


@contextmanager
def vision_loss_for_this_transformers():
    """Yields what the SFT loss covers. TRL 1.15 refuses assistant-only loss on vision data under
    transformers < 5.18 (Unsloth's environment pins 5.17): there the HF path trains on every token,
    which costs the same time and memory as the assistant-only mask."""
    import transformers
    import trl

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    if (major, minor) >= (5, 18):
        yield "assistant tokens"
        return
    base = trl.SFTConfig

    class AllTokens(base):  # still the same dataclass: build_trainer reads its fields
        def __post_init__(self) -> None:
            self.assistant_only_loss = False
            super().__post_init__()

    trl.SFTConfig = AllTokens
    try:
        yield f"all tokens (transformers {transformers.__version__} < 5.18: no assistant-only loss on vision data)"
    finally:
        trl.SFTConfig = base


# ---- GRPO -----------------------------------------------------------------------------------------


def rl_rows(work: Path, n: int, turns: int) -> list[dict[str, Any]]:
    """``n`` seed-built STEER-RL rows with a packaged photo in the first turn, at its own size."""
    from steerkit.rl_data import rl_rows as rows_of
    from steerkit.smoke_inputs import seed_rl_dialogues

    records, root = seed_rl_dialogues(work / "rl_data", n, turns=turns, seed=0, with_images=True)
    return rows_of(records, root, vision=True)


def grpo(model: Path, work: Path, sizes: Sizes, *, lora: bool, deadline: float) -> dict[str, Any]:
    """GRPO steps through `steerkit.grpo.make_trainer` (rules tutor, TCSR): rollout and training
    seconds per step, peak memory, and how many logged grad_norms are finite."""
    import torch

    from steerkit.grpo import GRPORunConfig, make_trainer
    from steerkit.models import load_student
    from steerkit.roles import Roles

    steps = sizes.grpo_lora_steps if lora else sizes.grpo_full_steps
    config = GRPORunConfig(
        student=str(model), prompts_per_step=sizes.grpo_prompts, num_generations=sizes.grpo_k, max_steps=steps,
        learning_rate=NAN_LORA_LR if lora else AUTHORS_3B_GRPO_LR, lr_scheduler="constant" if lora else "linear",
        max_turns=sizes.turns, max_new_tokens=sizes.grpo_new_tokens, lora=lora, with_images=True, seed=0,
        # B x K rows in mini-batches with gradient accumulation, one rollout per optimiser step
        per_device_batch=sizes.grpo_mini_batch, gradient_accumulation=0, generation_batch=0,
    )
    rows = rl_rows(work, sizes.grpo_prompts, sizes.turns)
    torch.manual_seed(0)
    reset_peak()
    student, processor = load_student(model)
    trainer = make_trainer(student, processor, rows, tutor=Roles({"tutor": "rules"}).client("tutor"),
                           config=config, output_dir=work / "trainer", run_dir=work)
    rollout_s: list[float] = []
    rollout_tokens: list[int] = []
    inner = trainer.rollout_func

    def timed_rollout(prompts, tr):
        sync()
        t = time.perf_counter()
        out = inner(prompts, tr)
        sync()
        rollout_s.append(time.perf_counter() - t)
        rollout_tokens.append(sum(sum(m) for m in out["env_mask"]))
        return out

    trainer.rollout_func = timed_rollout
    timer = step_timer()
    trainer.add_callback(timer)
    trainer.add_callback(deadline_stop(deadline, timer))
    trainer.train()
    norms = [r["grad_norm"] for r in trainer.state.log_history if "grad_norm" in r]
    finite = [g for g in norms if g is not None and math.isfinite(g)]
    step_s = median_after_warmup(timer.durations)
    roll_s = median_after_warmup(rollout_s)
    return {
        "status": "ok", "finetune": "lora" if lora else "full", "learning_rate": config.learning_rate,
        "lr_scheduler": config.lr_scheduler, "B": sizes.grpo_prompts, "K": sizes.grpo_k,
        "mini_batch": sizes.grpo_mini_batch, "accumulation": sizes.grpo_prompts * sizes.grpo_k // sizes.grpo_mini_batch,
        "turns": sizes.turns, "new_tokens_per_turn": sizes.grpo_new_tokens, "steps_asked": steps,
        "steps_run": len(timer.durations), "step_s": round(step_s, 3) if step_s else None,
        "rollout_s": round(roll_s, 3) if roll_s else None,
        "train_s": round(step_s - roll_s, 3) if step_s and roll_s else None,
        "rollout_tokens_per_step": round(statistics.mean(rollout_tokens), 1) if rollout_tokens else None,
        "peak_gib": peak_gib(), "grad_norms_logged": len(norms), "grad_norms_finite": len(finite),
        "grad_norm_max": max(finite) if finite else None,
        "skipped_nonfinite_steps": list(trainer.skipped_nonfinite_steps),
    }


# ---- rollout engine -------------------------------------------------------------------------------


def rollout_throughput(model: Path, work: Path, sizes: Sizes, *, deadline: float) -> dict[str, Any]:
    """Student tokens per second of `steerkit.rollout.rollout` (``generate`` engine, KV cache kept
    across turns, rules tutor) at each batch of trajectories; larger batches are left out when the
    deadline is near."""
    from steerkit.models import load_student
    from steerkit.roles import Roles
    from steerkit.rollout import RolloutConfig, RolloutSample, rollout

    rows = rl_rows(work, 8, sizes.turns)
    student, processor = load_student(model)
    tutor = Roles({"tutor": "rules"}).client("tutor")
    cfg = RolloutConfig(max_turns=sizes.turns, max_new_tokens=sizes.rollout_new_tokens)

    def samples(n: int) -> list[RolloutSample]:
        return [RolloutSample(prompt=r["prompt"], static_turns=list(r["static_turns"]), images=list(r["images"]),
                              id=f"{r['id']}-{i}", image_refs=list(r["image_refs"]), root=Path("/"), goal=r["goal"])
                for i, r in ((i, rows[i % len(rows)]) for i in range(n))]

    reset_peak()
    rollout(samples(2), model=student, processing_class=processor, tutor=tutor,
            config=RolloutConfig(max_turns=1, max_new_tokens=4))  # warm-up
    by_batch: dict[str, Any] = {}
    last = 0.0
    for n in sizes.rollout_batches:
        if by_batch and time.time() + 2.5 * last > deadline:
            by_batch[str(n)] = "skipped: the phase's time ran out"
            continue
        sync()
        t = time.perf_counter()
        trajs = rollout(samples(n), model=student, processing_class=processor, tutor=tutor, config=cfg)
        sync()
        last = time.perf_counter() - t
        produced = sum(sum(tr.env_mask) for tr in trajs)
        by_batch[str(n)] = {"seconds": round(last, 3), "student_tokens": produced,
                            "tokens_per_s": round(produced / last, 1)}
    return {"status": "ok", "engine": "generate", "turns": sizes.turns, "new_tokens_per_turn": sizes.rollout_new_tokens,
            "by_batch": by_batch, "peak_gib": peak_gib()}
