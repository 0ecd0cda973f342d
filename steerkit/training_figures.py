"""Figures of the training stages (notebooks 01 to 03): the data's turns per dialogue, the SFT loss,
GRPO's reward curves and the tutor's safety per turn. Each builder takes what its stage wrote (or
`steerkit.frames.grpo_frames` of it) and returns a plotly Figure; `steerkit.plots.save_figure` writes it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go

    from steerkit.schema import Dialogue

#: GRPO curves shown by default: the trained reward and the two shares of safe trajectories (method.md 4).
REWARD_CURVES = ("mean_tcsr", "mean_turn_reward", "share_worst_turn_safe", "share_worst_turn_proper")
ATTACKS = ("persistence", "bait_and_switch", "deepen")  # the tutor's strategies that press an attack


def turn_lengths_figure(splits: Mapping[str, Sequence[Dialogue]], *, title: str = "Turns per dialogue") -> go.Figure:
    """User turns per dialogue, stacked by script kind (benign, obfuscated, redteam), one panel per split
    (``{"SFT": dialogues, "RL": dialogues}``)."""
    import pandas as pd
    import plotly.express as px

    lengths = pd.DataFrame([{"split": name, "kind": d.kind, "turns": len(d.user_texts)}
                            for name, dialogues in splits.items() for d in dialogues])
    return px.histogram(lengths, x="turns", color="kind", facet_col="split", barmode="stack", title=title)


def loss_figure(train_log: Sequence[Mapping], *, title: str = "SFT loss on assistant tokens") -> go.Figure:
    """The logged training loss against the optimizer step (`steerkit.sft_trainer.training_log`)."""
    import pandas as pd
    import plotly.express as px

    log = pd.DataFrame([r for r in train_log if "loss" in r])
    return px.line(log, x="step", y="loss", markers=True, title=title)


def reward_curves_figure(curves: pd.DataFrame, *, metrics: Sequence[str] = REWARD_CURVES,
                         title: str = "Reward curves per step") -> go.Figure:
    """GRPO's per-step curves (the first frame of `steerkit.frames.grpo_frames`), one panel per run."""
    import plotly.express as px

    shown = curves[curves["metric"].isin(list(metrics))]
    return px.line(shown, x="step", y="value", color="metric", facet_col="run", markers=True, title=title)


def turn_safety_heatmap(turns: pd.DataFrame, *, title: str = "Tutor safety per turn, last step "
                        "(1 = full breach, 10 = ideal)") -> go.Figure:
    """The tutor's safety score (1-10) of every turn of every trajectory of each run's last step (the
    second frame of `steerkit.frames.grpo_frames`): one row per trajectory, one column per turn."""
    import plotly.express as px

    last = turns[turns["step"] == turns.groupby("run")["step"].transform("max")]
    heat = last.pivot_table(index=["run", "row"], columns="turn", values="safety")
    return px.imshow(heat.values, x=[f"turn {t}" for t in heat.columns], y=[f"{r} #{i}" for r, i in heat.index],
                     zmin=1, zmax=10, color_continuous_scale="RdYlGn", text_auto=True, aspect="auto", title=title)


def attacked_turns(turns: pd.DataFrame, n: int) -> pd.DataFrame:
    """Every turn of the first ``n`` trajectories in which the tutor pressed an attack (`ATTACKS`)."""
    attacked = turns[turns["attack_strategy"].isin(ATTACKS)]
    picked = attacked.drop_duplicates(["run", "step", "row"]).head(n)[["run", "step", "row"]]
    return turns.merge(picked)[["run", "step", "row", "turn", "user_turn", "answer", "safety", "attack_strategy"]]
