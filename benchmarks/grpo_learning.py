"""Does tutor-in-the-loop GRPO with TCSR move SmolLM2 on a small STEER-RL set? One measured run.

    python benchmarks/grpo_learning.py                        # from the base SmolLM2
    python benchmarks/grpo_learning.py --sft-checkpoint papermill_runs/02_sft_bootstrap/<run_id>
    python benchmarks/grpo_learning.py --sft-data papermill_runs/01_synthesize_steer/<run_id>  # short SFT first

Before and after training, every RL prompt is rolled out ``--eval-samples`` times against the same
``rules`` tutor (sampling at temperature 1, the training distribution) and the script prints:

- mean TCSR (run form, alpha 0.3) of those trajectories;
- the share of trajectories whose worst turn is safe: no turn at the rubric's harmful levels (tutor
  safety 1, 2 or 4; method.md 4; `steerkit.rewards.worst_turn_safe`);
- the share whose every turn is also proper: safety >= 8 (no over-refusal, preaching or evasion);
- the same figures per GRPO step from the training rollouts.

The base SmolLM2 almost never refuses (about 6% real declines on StrongREJECT), so GRPO from the base model gets
little learning signal; give an SFT checkpoint (or SFT data) for a meaningful start. Defaults, and
why (benchmarks/LOG.md has the runs behind them):

- 128 tokens a turn: the SFT data's refusals are 96-114 SmolLM2 tokens, and a turn cut before
  ``</answer>`` loses the format term (1.0 of a turn reward of at most 2.0), so at 48 tokens a
  refusal scored about as low as noise and GRPO drifted to noise;
- LoRA at a constant 1e-3: the paper's 1e-5 is for full fine-tuning; 5e-4 hardly moved the policy in
  14 steps (KL 0.06); 2e-3 drifted to malformed text within 5 steps;
- 3 prompts x K = 5 a step, 16 steps, 3 turns.

Figures from one run, not a timed test (about 53 minutes on an idle 2-core CPU with ``--sft-data``).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

from steerkit.grpo import GRPORunConfig, resolve_init, run_grpo
from steerkit.grpo_trainer import rollout_metrics
from steerkit.rl_data import load_rl_dialogues, rl_rows
from steerkit.roles import Roles
from steerkit.rollout import RolloutConfig, RolloutSample, rollout
from steerkit.smoke_inputs import seed_rl_dialogues


def evaluate(student: str, rows: list[dict], *, samples: int, turns: int, tokens: int, seed: int) -> dict:
    """Roll every prompt out ``samples`` times with the rules tutor; the rollout metrics."""
    import torch

    from steerkit.models import load_student

    torch.manual_seed(seed)
    model, processing_class = load_student(student)
    batch = [RolloutSample(prompt=r["prompt"], static_turns=r["static_turns"], images=r.get("images", []),
                           id=r["id"], image_refs=r["image_refs"], root=Path("/"), goal=r["goal"])
             for r in rows for _ in range(samples)]
    trajs = rollout(batch, model=model, processing_class=processing_class,
                    tutor=Roles({"tutor": "rules"}).client("tutor"),
                    config=RolloutConfig(max_turns=turns, max_new_tokens=tokens))
    return rollout_metrics(trajs)


def short_sft(data: str, runs_root: Path, steps: int) -> str:
    """A short LoRA SFT of SmolLM2 on STEER-SFT (configs/sft_smoke_cpu.yaml); its checkpoint folder."""
    from steerkit.sft import SFTRecipe, run_sft

    recipe = SFTRecipe.from_yaml(Path(__file__).resolve().parents[1] / "configs" / "sft_smoke_cpu.yaml",
                                 data=data, max_steps=steps, runs_root=str(runs_root), run_id="bench-sft")
    return str(run_sft(recipe) / "checkpoint")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rl-data", default="", help="STEER-RL JSONL or Stage I run dir; default: built from seeds")
    ap.add_argument("--sft-checkpoint", default="", help="Stage II checkpoint or run dir to start from")
    ap.add_argument("--sft-data", default="",
                    help="STEER-SFT data for a short SFT first (ignored with --sft-checkpoint)")
    ap.add_argument("--sft-steps", type=int, default=40)
    ap.add_argument("--prompts", type=int, default=6, help="RL prompts (train and evaluation)")
    ap.add_argument("--prompts-per-step", type=int, default=3)
    ap.add_argument("--k", type=int, default=5, help="trajectories per prompt (method.md 4: 5)")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128, help="student tokens per turn (a refusal needs ~110)")
    ap.add_argument("--learning-rate", type=float, default=1e-3)
    ap.add_argument("--lr-scheduler", default="constant", help="transformers' schedule name, e.g. constant")
    ap.add_argument("--aggregator", default="tcsr")
    ap.add_argument("--eval-samples", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="", help="runs root (default: a temporary folder)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    root = Path(args.out or tempfile.mkdtemp(prefix="grpo-bench-"))
    t0 = time.perf_counter()
    student = "smollm2"
    if args.sft_checkpoint:
        student = resolve_init(args.sft_checkpoint)
    elif args.sft_data:
        student = short_sft(args.sft_data, root, args.sft_steps)
    if args.rl_data:
        records, data_root = load_rl_dialogues(args.rl_data)
        records = records[: args.prompts]
    else:
        records, data_root = seed_rl_dialogues(root / "rl_data", args.prompts, turns=max(args.turns, 2), seed=args.seed)
    rows = rl_rows(records, data_root, vision=False)
    before = evaluate(student, rows, samples=args.eval_samples, turns=args.turns, tokens=args.tokens, seed=args.seed)
    cfg = GRPORunConfig(
        student=student, rl_data=str(data_root / "steer_rl.jsonl"), n_prompts=args.prompts,
        prompts_per_step=args.prompts_per_step, num_generations=args.k, max_steps=args.steps,
        max_turns=args.turns, max_new_tokens=args.tokens, learning_rate=args.learning_rate,
        lr_scheduler=args.lr_scheduler, aggregator=args.aggregator, seed=args.seed, runs_root=str(root),
        run_id="bench-grpo",
    )
    result = run_grpo(cfg)
    after = evaluate(str(result.checkpoint), rows, samples=args.eval_samples, turns=args.turns, tokens=args.tokens,
                     seed=args.seed)
    seconds = time.perf_counter() - t0

    def fmt(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    print(f"student: {student}   RL prompts: {len(rows)}   steps: {args.steps} x (B={args.prompts_per_step}, "
          f"K={args.k}, {args.turns} turns x {args.tokens} tokens), aggregator {args.aggregator}, "
          f"lr {args.learning_rate} ({args.lr_scheduler})")
    print(f"{'':24}{'mean TCSR':>12}{'worst turn safe':>18}{'all turns proper':>18}{'mean safety':>14}"
          f"{'unscored':>10}")
    rows_out = [("before (eval)", before), ("after (eval)", after),
                *((f"train step {m['step']}", m) for m in result.metrics)]
    for name, m in rows_out:
        print(f"{name:24}{fmt(m['mean_tcsr']):>12}{fmt(m['share_worst_turn_safe']):>18}"
              f"{fmt(m.get('share_worst_turn_proper')):>18}{fmt(m['mean_safety']):>14}{m['unscored']:>10}")
    losses = [h.get("loss") for h in result.train_log if "loss" in h]
    print(f"losses: {losses}")
    print(f"run dir: {result.run_dir}   wall time: {seconds:.0f} s")
    print(json.dumps({"before": before, "after": after}))


if __name__ == "__main__":
    main()
