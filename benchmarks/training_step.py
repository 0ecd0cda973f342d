"""What one training step costs: SFT and GRPO seconds per optimizer step and peak memory, SmolLM2 on CPU.

    python benchmarks/training_step.py                       # sft-lora, sft-full, grpo at the default sizes
    python benchmarks/training_step.py --phases sft-lora grpo --sft-steps 10 --json figures.json

Each phase runs the project's own training path in a fresh subprocess, so the peak resident memory of
one phase is not masked by another's:

- ``sft-lora``: `steerkit.sft.run_sft` with ``configs/sft_smoke_cpu.yaml`` (LoRA) on a small STEER-SFT
  set made offline (`steerkit.smoke_inputs.offline_sft_data`, the ``rules`` roles);
- ``sft-full``: the same recipe with full fine-tuning (learning rate 1e-5, method.md 3);
- ``grpo``: `steerkit.grpo.run_grpo` (LoRA, TCSR, the ``rules`` tutor) on `seed_rl_dialogues` prompts.

Per step, a ``TrainerCallback`` times ``on_step_begin`` to ``on_step_end``; the figure is the median
over the steps after the first (the warm-up step is reported apart). Tokens per step come from the
trainer's ``num_tokens`` (SFT: the non-padding tokens of the batch; GRPO: prompt plus completion
tokens, inserted user turns included). A GRPO step is split by timing, inside the step: the rollout
(`TutorRollout` call: batched generation, tutor grading, the rest such as encoding and the per-step
metrics log), the trainer's scoring around it (rewards, reference and old log-probs), and what remains
(loss, backward, optimizer). Memory: the process's RSS high-water mark (``ru_maxrss``) before training
(imports and model load), at the end of training, and at exit (the final checkpoint save included); the
peak torch allocation on CUDA when there is one. Checkpoint saves between steps are turned off: they are
not part of a step.

Figures from one run, not a timed test; the script prints the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SMOKE_RECIPE = REPO / "configs" / "sft_smoke_cpu.yaml"
PHASES = ("sft-lora", "sft-full", "grpo")


# ---- measuring inside a phase --------------------------------------------------------------------


def max_rss_mb() -> float:
    """The process's RSS high-water mark in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


def torch_peak_mb() -> float | None:
    """Peak CUDA allocation in MiB; None on CPU (torch keeps no allocation high-water mark there)."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


class Parts:
    """Seconds spent in named parts of the current optimizer step (filled by `timed` wrappers)."""

    def __init__(self) -> None:
        self.now: dict[str, float] = {}

    def timed(self, name: str, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.now[name] = self.now.get(name, 0.0) + time.perf_counter() - t0

        return wrapper


def step_timer(parts: Parts):  # -> transformers.TrainerCallback
    """Per optimizer step: wall seconds from ``on_step_begin`` to ``on_step_end`` and the parts timed in it;
    RSS high-water marks at the start and the end of training."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.steps: list[dict[str, Any]] = []
            self.rss_begin_mb = self.rss_end_mb = None

        def on_train_begin(self, args, state, control, **kw):
            self.rss_begin_mb = max_rss_mb()

        def on_step_begin(self, args, state, control, **kw):
            parts.now = {}
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.steps.append({"step": state.global_step, "seconds": time.perf_counter() - self.t0, **parts.now})

        def on_train_end(self, args, state, control, **kw):
            self.rss_end_mb = max_rss_mb()

    return StepTimer()


def token_counts(log: list[dict[str, Any]]) -> dict[int, int]:
    """Step -> tokens in that step, from the trainer's cumulative ``num_tokens``."""
    out, last = {}, 0
    for rec in sorted((r for r in log if r.get("num_tokens") is not None), key=lambda r: r["step"]):
        out[rec["step"]] = int(rec["num_tokens"]) - last
        last = int(rec["num_tokens"])
    return out


def phase_sft(args: argparse.Namespace, full: bool) -> dict[str, Any]:
    from steerkit.sft import SFTRecipe, run_sft
    from steerkit.sft_trainer import training_log

    parts = Parts()
    timer = step_timer(parts)
    full_ft = {"finetune": "full", "learning_rate": 1e-5} if full else {}
    recipe = SFTRecipe.from_yaml(
        SMOKE_RECIPE, data=args.sft_data, max_steps=args.sft_steps, batch_size=args.sft_batch,
        per_device_batch_size=min(args.sft_per_device, args.sft_batch), max_length=args.max_length,
        logging_steps=1, save_steps=10**6, seed=args.seed, runs_root=str(args.root), run_id=args.phase, **full_ft,
    )
    run_dir = run_sft(recipe, callbacks=[timer])
    tokens = token_counts(training_log(run_dir))
    steps = [{**s, "tokens": tokens.get(s["step"])} for s in timer.steps]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    return {"steps": steps, "rss_before_training_mb": timer.rss_begin_mb, "rss_training_peak_mb": timer.rss_end_mb,
            "finetune": recipe.finetune, "batch_size": recipe.batch_size, "max_length": recipe.max_length,
            "gradient_accumulation_steps": manifest["training"]["gradient_accumulation_steps"],
            "dialogues": manifest["training"]["data"]["dialogues"]}


def phase_grpo(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import GenerationMixin

    from steerkit import grpo, grpo_trainer, rollout
    from steerkit.layout import TRAJECTORIES_FILE

    parts = Parts()
    timer = step_timer(parts)
    make_trainer = grpo.make_trainer

    def instrumented_trainer(*a, **kw):
        trainer = make_trainer(*a, **kw)
        trainer.add_callback(timer)
        # TRL's per-step generation batch: the rollout plus rewards and the reference / old log-probs
        trainer._generate_and_score_completions = parts.timed("generate_and_score",
                                                              trainer._generate_and_score_completions)
        return trainer

    # run_grpo looks these names up in its module at call time; the wrappers only add timing
    grpo.make_trainer = instrumented_trainer
    grpo_trainer.TutorRollout.__call__ = parts.timed("rollout", grpo_trainer.TutorRollout.__call__)
    rollout.run_sync = parts.timed("tutor", rollout.run_sync)  # the rollout's one tutor batch per turn
    # every model's ``generate`` (the student, or the rollout's generation copy); only the rollout generates
    GenerationMixin.generate = parts.timed("generation", GenerationMixin.generate)
    cfg = grpo.GRPORunConfig(
        student="smollm2", n_prompts=args.prompts * args.grpo_steps, prompts_per_step=args.prompts,
        num_generations=args.k, max_steps=args.grpo_steps, max_turns=args.turns, max_new_tokens=args.tokens,
        learning_rate=1e-4, generation_dtype=args.generation_dtype, seed=args.seed, runs_root=str(args.root),
        run_id=args.phase,
    )
    result = grpo.run_grpo(cfg)
    tokens = token_counts(result.train_log)
    student_tokens: dict[int, int] = {}
    for line in (result.run_dir / TRAJECTORIES_FILE).read_text().splitlines():
        rec = json.loads(line)  # "step" is the trainer's global step when the rollout ran: one less
        student_tokens[rec["step"] + 1] = student_tokens.get(rec["step"] + 1, 0) + rec["student_tokens"]
    steps = [{**s, "tokens": tokens.get(s["step"]), "student_tokens": student_tokens.get(s["step"])}
             for s in timer.steps]
    return {"steps": steps, "rss_before_training_mb": timer.rss_begin_mb, "rss_training_peak_mb": timer.rss_end_mb,
            "rollouts": len(result.metrics), "mean_turns": [m["mean_turns"] for m in result.metrics]}


def run_phase(args: argparse.Namespace) -> None:
    import torch

    t0 = time.perf_counter()
    out = phase_grpo(args) if args.phase == "grpo" else phase_sft(args, full=args.phase == "sft-full")
    out.update(phase=args.phase, wall_s=time.perf_counter() - t0, rss_peak_mb=max_rss_mb(),
               torch_peak_mb=torch_peak_mb(), torch_threads=torch.get_num_threads(),
               torch_interop_threads=torch.get_num_interop_threads())
    Path(args.result).write_text(json.dumps(out))


# ---- the parent: data, phases, report -------------------------------------------------------------


def summarise(phase: dict[str, Any]) -> dict[str, Any]:
    """Medians over the steps after the warm-up step (all steps when there is only one)."""
    steps = phase["steps"]
    timed = steps[1:] or steps

    def med(key: str) -> float | None:
        xs = [s[key] for s in timed if s.get(key) is not None]
        return statistics.median(xs) if xs else None

    out = {"steps": len(steps), "warmup_s": steps[0]["seconds"] if steps else None, "step_s": med("seconds"),
           "step_s_min": min((s["seconds"] for s in timed), default=None),
           "step_s_max": max((s["seconds"] for s in timed), default=None), "tokens_per_step": med("tokens")}
    rates = [s["tokens"] / s["seconds"] for s in timed if s.get("tokens")]
    out["tokens_per_s"] = statistics.median(rates) if rates else None
    if phase["phase"] == "grpo":
        for s in steps:
            s["training"] = s["seconds"] - s.get("rollout", 0.0)
            s["scoring"] = s.get("generate_and_score", 0.0) - s.get("rollout", 0.0)
            s["loss_backward_optimizer"] = s["seconds"] - s.get("generate_and_score", 0.0)
            s["rollout_other"] = s.get("rollout", 0.0) - s.get("generation", 0.0) - s.get("tutor", 0.0)
        for key in ("rollout", "generation", "tutor", "rollout_other", "training", "scoring",
                    "loss_backward_optimizer", "student_tokens"):
            out[f"{key}_s" if key != "student_tokens" else key] = med(key)
        gen = [s["student_tokens"] / s["generation"] for s in timed if s.get("student_tokens") and s.get("generation")]
        out["generated_tokens_per_s"] = statistics.median(gen) if gen else None
    return out


def code_version() -> dict[str, Any]:
    """Which steerkit was measured: its folder, and the git commit there (with uncommitted changes or not)."""
    import steerkit

    pkg = Path(steerkit.__file__).resolve().parent

    def git(*cmd: str) -> str | None:
        try:
            return subprocess.run(["git", "-C", str(pkg), *cmd], capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    status = git("status", "--porcelain", "--", ".")
    return {"steerkit": str(pkg), "commit": git("rev-parse", "--short", "HEAD"),
            "uncommitted_changes": None if status is None else bool(status)}


def machine_facts() -> dict[str, Any]:
    import torch

    return {**code_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(), "cuda": torch.cuda.is_available(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def report(figures: dict[str, Any]) -> None:
    m = figures["machine"]
    print(f"machine: {m['cpus']} CPUs, {m['platform']}, Python {m['python']}, torch {m['torch']} "
          f"({m['torch_threads']} threads, {m['torch_interop_threads']} inter-op), CUDA {m['cuda']}, "
          f"OMP_NUM_THREADS={m['OMP_NUM_THREADS']}")
    print(f"steerkit: {m['steerkit']} at commit {m['commit']}"
          + (" with uncommitted changes" if m["uncommitted_changes"] else ""))
    lb, la = figures["load_before"], figures["load_after"]
    loads = [lb[0], la[0], *(p[k][0] for p in figures["phases"].values() for k in ("load_before", "load_after"))]
    print(f"load average before: {lb[0]:.2f} {lb[1]:.2f} {lb[2]:.2f}   after: {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}"
          + ("   (busy machine: figures are slower than on an idle one)" if max(loads) > 2 else ""))
    s = figures["settings"]
    print(f"SFT: {s['sft_steps']} steps, batch {s['sft_batch']} ({s['sft_per_device']} per device), max_length "
          f"{s['max_length']}, {SMOKE_RECIPE.relative_to(REPO)}; GRPO: {s['grpo_steps']} steps, {s['prompts']} "
          f"prompts x K={s['k']}, {s['turns']} turns x {s['tokens']} tokens, rules tutor, generation from "
          + (f"a {s['generation_dtype']} copy" if s["generation_dtype"] else "the student"))
    print("medians over the steps after the first (warm-up) step; load: 1-minute load average before-after"
          " the phase\n")
    print(f"{'phase':10}{'step s':>9}{'(min-max)':>17}{'warm-up s':>11}{'tokens/step':>13}{'tokens/s':>10}"
          f"{'RSS load MiB':>14}{'RSS train MiB':>15}{'RSS exit MiB':>14}{'torch MiB':>11}{'load':>12}")
    for name, p in figures["phases"].items():
        r = p["summary"]
        span = f"({fmt(r['step_s_min'])}-{fmt(r['step_s_max'])})"
        load = f"{p['load_before'][0]:.1f}-{p['load_after'][0]:.1f}"
        print(f"{name:10}{fmt(r['step_s']):>9}{span:>17}"
              f"{fmt(r['warmup_s']):>11}{fmt(r['tokens_per_step'], '.0f'):>13}{fmt(r['tokens_per_s'], '.0f'):>10}"
              f"{fmt(p['rss_before_training_mb'], '.0f'):>14}{fmt(p['rss_training_peak_mb'], '.0f'):>15}"
              f"{fmt(p['rss_peak_mb'], '.0f'):>14}{fmt(p['torch_peak_mb'], '.0f'):>11}"
              f"{load:>12}")
    if "grpo" in figures["phases"]:
        r = figures["phases"]["grpo"]["summary"]
        print(f"\nGRPO step {fmt(r['step_s'])} s = rollout {fmt(r['rollout_s'])} s "
              f"(generation {fmt(r['generation_s'])}, "
              f"tutor {fmt(r['tutor_s'], '.3f')}, other {fmt(r['rollout_other_s'], '.3f')}) + training "
              f"{fmt(r['training_s'])} s (scoring {fmt(r['scoring_s'])}, loss/backward/optimizer "
              f"{fmt(r['loss_backward_optimizer_s'])}); {fmt(r['student_tokens'], '.0f')} student tokens generated "
              f"per step, {fmt(r['generated_tokens_per_s'], '.1f')} tokens/s in generation")
    for name, p in figures["phases"].items():
        print(f"\n{name} per step: " + ", ".join(
            f"{s['step']}: {s['seconds']:.2f} s / {s.get('tokens')} tok" for s in p["steps"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    ap.add_argument("--sft-steps", type=int, default=6, help="SFT optimizer steps (the first is the warm-up)")
    ap.add_argument("--sft-batch", type=int, default=2, help="SFT global batch (dialogues per step)")
    ap.add_argument("--sft-per-device", type=int, default=2, help="SFT micro-batch (the rest is accumulation)")
    ap.add_argument("--max-length", type=int, default=512, help="SFT max tokens per dialogue")
    ap.add_argument("--sft-seeds", type=int, default=12, help="benign and harmful synthesis seeds each")
    ap.add_argument("--grpo-steps", type=int, default=3, help="GRPO optimizer steps (the first is the warm-up)")
    ap.add_argument("--prompts", type=int, default=2, help="GRPO prompts per step")
    ap.add_argument("--k", type=int, default=4, help="GRPO trajectories per prompt")
    ap.add_argument("--turns", type=int, default=2, help="GRPO turns per trajectory")
    ap.add_argument("--tokens", type=int, default=32, help="GRPO student tokens per turn")
    ap.add_argument("--generation-dtype", default=None,
                    help="GRPO rollouts sample from a copy in this dtype, LoRA merged (default: the student itself)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--root", type=Path, default=None,
                    help="where runs go and stay (default: a temporary folder, removed at the end)")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    ap.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)  # internal: run one phase
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--sft-data", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    if args.phase:
        run_phase(args)
        return

    from steerkit.smoke_inputs import offline_sft_data
    from steerkit.smollm2 import smollm2_path

    root = args.root or Path(tempfile.mkdtemp(prefix="training-step-"))
    print(f"runs: {root}" + ("" if args.root else " (removed at the end; a failed phase leaves it)"), flush=True)
    smollm2_path()  # materialise the embedded model once, outside the measured phases
    data = offline_sft_data(root, run_id="data", n_benign=args.sft_seeds, n_harmful=args.sft_seeds, seed=args.seed) \
        if any(p.startswith("sft") for p in args.phases) else None
    figures: dict[str, Any] = {"machine": machine_facts(), "load_before": os.getloadavg(), "settings": {
        k: getattr(args, k) for k in ("sft_steps", "sft_batch", "sft_per_device", "max_length", "sft_seeds",
                                      "grpo_steps", "prompts", "k", "turns", "tokens", "generation_dtype",
                                      "seed")}, "phases": {}}
    for phase in args.phases:
        result = root / f"{phase}.json"
        cmd = [sys.executable, __file__, "--phase", phase, "--result", str(result), "--root", str(root),
               "--sft-data", str(data), *sys.argv[1:]]
        load = os.getloadavg()
        subprocess.run(cmd, check=True, cwd=REPO)
        out = json.loads(result.read_text())
        out["load_before"], out["load_after"] = load, os.getloadavg()
        out["summary"] = summarise(out)
        figures["phases"][phase] = out
    figures["load_after"] = os.getloadavg()
    report(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    if not args.root:  # the runs' checkpoints take about 3 GB at the default sizes
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
