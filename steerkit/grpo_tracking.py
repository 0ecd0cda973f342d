"""What a GRPO run reports per step to the trainer's log and wandb, and the wandb run it reports into.

TRL logs the policy side itself (``kl``, ``clip_ratio/*``, ``reward``, ``loss``, ``grad_norm``); the
tutor side comes from here: per-turn reward, TCSR with its worst-turn and mean parts
(docs/method.md section 4: ``TCSR = alpha * min_t r_t + (1 - alpha) * mean_t r_t``), and the turns the
tutor left unscored. They join TRL's per-step log (`steerkit.grpo_resume.StepRollout`), which goes to
``train_log.jsonl`` and to the wandb run `steerkit.tracking.wandb_run` opens.
"""

from __future__ import annotations

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
