"""A finished sweep read as studies (notebook 05, docs/studies.md "Sweeps"): the tidy table, rates
over seeds, paired comparisons between arms within a seed, and the paper's rows the arms stand
beside.

Every function takes frames `steerkit.sweep` and `steerkit.frames` build (``dialogues``: one row per
evaluated dialogue with its ``label``; ``cells``: `steerkit.sweep.cells_df`), so each is a pure
function of the data. An *arm* is a cell's settings without its seed; the seeds repeat an arm.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from steerkit import metrics

if TYPE_CHECKING:
    import pandas as pd

METRICS = (("safety", "harmlessness_avg", metrics.SAFE_AVG),
           ("helpfulness", "helpfulness_avg", metrics.HELPFUL_AVG))
ALL = "all"  # the subset name of rows pooling every subset (as in steerkit.stats)


def tidy(dialogues: pd.DataFrame, cells: pd.DataFrame) -> pd.DataFrame:
    """One row per (label, subset, metric): the pass rate (%) over the dialogues scored and their
    count ``n``, with the cell's arm and grid values beside it; subset "all" pools the subsets.

    >>> import pandas as pd
    >>> d = pd.DataFrame({"label": ["a", "a"], "subset": ["x", "y"], "harmlessness_avg": [3.0, 1.0],
    ...                   "helpfulness_avg": [2.5, float("nan")]})
    >>> t = tidy(d, pd.DataFrame({"label": ["a"], "arm": ["A"], "alpha": [0.1]}))
    >>> t.query("subset == 'all'")[["metric", "n", "value"]].to_dict("list")
    {'metric': ['safety', 'helpfulness'], 'n': [2, 1], 'value': [50.0, 100.0]}
    """
    import pandas as pd

    both = pd.concat([dialogues, dialogues.assign(subset=ALL)], ignore_index=True)
    rows = []
    for (label, subset), g in both.groupby(["label", "subset"], sort=False):
        for name, col, cut in METRICS:
            scored = g[col].dropna()
            rate = 100.0 * float((scored >= cut).mean()) if len(scored) else math.nan
            rows.append({"label": label, "subset": subset, "metric": name, "n": len(scored),
                         "value": rate})
    return pd.DataFrame(rows).merge(cells, on="label", how="left")


def over_seeds(table: pd.DataFrame, *, level: float = metrics.CI_LEVEL) -> pd.DataFrame:
    """Per (arm, subset, metric) of a `tidy` table: the mean rate over seeds, its Student-t interval
    (``lo``/``hi``, NaN with one seed) and ``seeds``, the arm's grid values beside it.

    The interval is cut to the rates' range, 0..100: with two seeds t(0.975, df 1) = 12.7 makes it
    run far past both ends, and a rate below 0 or above 100 says nothing a reader can use.

    >>> import pandas as pd
    >>> t = pd.DataFrame({"arm": ["A", "A"], "subset": ["all"] * 2, "metric": ["safety"] * 2,
    ...                   "label": ["A s0", "A s1"], "seed": [0, 1], "n": [4, 4],
    ...                   "value": [40.0, 60.0]})
    >>> r = over_seeds(t).iloc[0]   # half width: 12.706 times sd 14.14 / sqrt(2) = 127.06
    >>> float(r["mean"]), float(r["lo"]), float(r["hi"])
    (50.0, 0.0, 100.0)
    >>> r = over_seeds(t.assign(value=[49.0, 51.0])).iloc[0]
    >>> round(float(r["lo"]), 2), round(float(r["hi"]), 2)
    (37.29, 62.71)
    """
    import pandas as pd
    from scipy import stats as st

    keys = ["arm", "subset", "metric"]
    values = [c for c in table.columns if c not in (*keys, "label", "cell", "seed", "n", "value")]
    rows = []
    for key, g in table.groupby(keys, sort=False):
        v = g["value"].dropna()
        half = math.nan
        if len(v) > 1:
            half = st.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
        rows.append({**dict(zip(keys, key, strict=True)), **g[values].iloc[0].to_dict(),
                     "seeds": len(v),
                     "mean": v.mean(), "lo": max(v.mean() - half, 0.0), "hi": min(v.mean() + half, 100.0)})
    return pd.DataFrame(rows)


def plot_axes(grid: dict, x_axis: str = "") -> tuple[str, str | None]:
    """The grid axis on a rates figure's x axis (``x_axis``; empty: alpha when swept, else the first
    axis other than seed) and the axis told apart by colour (the next one, or None).

    >>> plot_axes({"alpha": [0.1, 0.5], "seed": [0, 1]})
    ('alpha', None)
    >>> plot_axes({"seed": [0, 1], "aggregator": ["tcsr", "mean"], "alpha": [0.3]}, "aggregator")
    ('aggregator', 'alpha')
    """
    axes = [a for a in grid if a != "seed"] or list(grid)
    if x_axis and x_axis not in grid:
        raise ValueError(f"x_axis {x_axis!r} is not a grid axis; axes: {list(grid)}")
    x = x_axis or ("alpha" if "alpha" in axes else axes[0])
    return x, next((a for a in axes if a != x), None)


def default_reference(cells: pd.DataFrame, paper: dict[str, str]) -> str:
    """The arm the others are compared with: the one in the paper's own setting when swept (the
    arm `steerkit.sweep.paper_match` sets beside "3B SaFeR-Steer"), else the first GRPO arm."""
    arms = [a for a in dict.fromkeys(cells["arm"]) if a not in ("base", "SFT")]
    return next((a for a in arms if paper.get(a) == "3B SaFeR-Steer"), arms[0])


def compare(dialogues: pd.DataFrame, cells: pd.DataFrame, *, reference: str,
            n_resamples: int = metrics.N_RESAMPLES, seed: int = 0) -> pd.DataFrame:
    """Paired comparisons (`steerkit.stats.compare_arms`) of every arm, and the SFT when evaluated,
    against ``reference`` within each seed (the same bench items, the same seed), with a ``seed``
    column; the arms' labels are replaced by the arm names."""
    import pandas as pd

    from steerkit import stats

    if reference not in set(cells["arm"]):
        arms = list(dict.fromkeys(cells["arm"]))
        raise ValueError(f"reference arm {reference!r} is not in the sweep; arms: {arms}")
    arm_of = dict(zip(cells["label"], cells["arm"], strict=True))
    seeds = [s for s in dict.fromkeys(cells.get("seed", pd.Series(dtype=float)).dropna())] or [None]
    out = []
    for s in seeds:
        grpo = cells[cells["arm"].ne("base") & cells["arm"].ne("SFT")]
        if s is not None:
            grpo = grpo[grpo["seed"] == s]
        ref = grpo.loc[grpo["arm"] == reference, "label"]
        if ref.empty:
            continue
        others = [lab for lab in grpo["label"] if lab != ref.iloc[0]]
        others += ["SFT"] if "SFT" in arm_of else []
        part = dialogues[dialogues["label"].isin([ref.iloc[0], *others])]
        rows = stats.compare_arms(part, arms=[ref.iloc[0], *others], n_resamples=n_resamples,
                                  seed=seed)
        out.append(rows.assign(seed=s, arm_a=rows["arm_a"].map(arm_of),
                               arm_b=rows["arm_b"].map(arm_of)))
    if not out:
        raise ValueError(f"no seed has the reference arm {reference!r}")
    return pd.concat(out, ignore_index=True)


def arm_rates(dialogues: pd.DataFrame, cells: pd.DataFrame) -> pd.DataFrame:
    """Safety and Helpfulness (%) per arm and subset with the subset average (Avg), the seeds of an
    arm pooled (its dialogues from every seed); column ``label`` holds the arm."""
    arm_of = dict(zip(cells["label"], cells["arm"], strict=True))
    pooled = dialogues.assign(label=dialogues["label"].map(arm_of).fillna(dialogues["label"]))
    return metrics.with_subset_average(metrics.multi_turn_rates(pooled, by=("label", "subset")))
