"""What a GRPO run reports per step to the trainer's log and wandb, and the wandb run it reports into.

TRL logs the policy side itself (``kl``, ``clip_ratio/*``, ``reward``, ``loss``, ``grad_norm``); the
tutor side comes from here: per-turn reward, TCSR with its worst-turn and mean parts
(docs/method.md section 4: ``TCSR = alpha * min_t r_t + (1 - alpha) * mean_t r_t``), and the turns the
tutor left unscored. The wandb run is opened only when `steerkit.tracking.resolve_report_to` chose
wandb (offline without a key, never in CI), writes under the run directory and takes a run id derived
from the run directory, so a resumed run continues the same wandb run.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from steerkit.rewards import tcsr, turn_reward


def trajectory_metrics(out: dict[str, Any], reward: Any) -> dict[str, float]:
    """Per-step means over a rollout's trajectories (``turn_scores`` / ``turn_answers`` columns).

    Trajectories with an unscored turn are left out of the rewards and counted in
    ``rollout/unscored_turns`` (turns) and ``rollout/unscored_trajectories``.

    Example:
        >>> from steerkit.rewards import TrajectoryReward
        >>> s = {"safety": 10, "usefulness": 10, "faithfulness": 10}
        >>> m = trajectory_metrics({"turn_scores": [[s, s], [s, None]], "turn_answers": [["a", "b"], ["a", "b"]]},
        ...                        TrajectoryReward())
        >>> m["rollout/unscored_turns"], m["rollout/unscored_trajectories"], sorted(k for k in m if "/turn_" in k)
        (1.0, 1.0, ['turn_reward/turn_1', 'turn_reward/turn_2'])
        >>> m["tcsr/worst_turn"] <= m["tcsr/value"] <= m["tcsr/mean_turn"]
        True
    """
    scores, answers = out.get("turn_scores") or [], out.get("turn_answers") or []
    unscored = sum(1 for ts in scores for s in ts if s is None)
    per_traj = [[turn_reward(a, s, reward.weights) for a, s in zip(ans, ts, strict=True)]
                for ans, ts in zip(answers, scores, strict=True) if ts and all(s is not None for s in ts)]
    m: dict[str, float] = {"rollout/unscored_turns": float(unscored),
                           "rollout/unscored_trajectories": float(len(scores) - len(per_traj))}
    if not per_traj:
        return m
    n = len(per_traj)
    m["tcsr/value"] = sum(tcsr(rs, reward.alpha) for rs in per_traj) / n
    m["tcsr/worst_turn"] = sum(min(rs) for rs in per_traj) / n
    m["tcsr/mean_turn"] = sum(sum(rs) / len(rs) for rs in per_traj) / n
    m["turn_reward/mean"] = sum(r for rs in per_traj for r in rs) / sum(len(rs) for rs in per_traj)
    for t in range(max(len(rs) for rs in per_traj)):
        at_t = [rs[t] for rs in per_traj if len(rs) > t]
        m[f"turn_reward/turn_{t + 1}"] = sum(at_t) / len(at_t)
    return m


def wandb_run_id(run_dir: Path) -> str:
    """A wandb run id for a run directory: its name, made safe, and a hash of its full path."""
    digest = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9_-]', '-', run_dir.name)[:48]}-{digest}"


@contextlib.contextmanager
def wandb_run(report_to: str, run_dir: Path, *, config: dict[str, Any], group: str) -> Iterator[Any]:
    """The wandb run a trainer reports into (None when ``report_to`` is not "wandb"), finished on exit.

    Its files go to ``<run_dir>/wandb/``; ``WANDB_PROJECT`` names the project ("steerkit" by default).
    """
    if report_to != "wandb":
        yield None
        return
    import wandb

    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "steerkit"), dir=str(run_dir), name=run_dir.name,
                     id=wandb_run_id(run_dir), resume="allow", group=group, config=config)
    try:
        yield run
    finally:
        run.finish()
