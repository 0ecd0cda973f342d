"""Paired comparisons of models replayed on the same bench items (docs/method.md section 6).

Every model answers the same STEER-Bench items, so two arms are compared item by item: each item
gives a pass indicator per arm (Safety: turn-averaged harmlessness >= `steerkit.metrics.SAFE_AVG`;
Helpfulness: turn-averaged helpfulness >= `steerkit.metrics.HELPFUL_AVG`), and the statistics use
the per-item differences, which removes the variation between items that an unpaired comparison
pays for. An item that has no scored turn in either arm is left out of the pair (and counted).

- `paired_bootstrap_ci`: percentile interval of the difference in pass rates (points of %),
  resampling items;
- `sign_flip_test`: the paired permutation test (under "no difference" each item's two outcomes are
  exchangeable, so each difference's sign is a coin flip); exact when few items differ;
- `logrank`: lifelines' log-rank test between two arms' survival (first turn with harmlessness below
  `steerkit.metrics.FAIL_BELOW`, as in `steerkit.metrics.survival_curves`);
- `paired_items_needed`: the power line, how many items a difference of a given size needs;
- `compare_arms`: all of it for two or more arms of a `steerkit.frames.dialogues_df` frame, as a
  tidy table.

Differences are ``b - a`` (the second arm minus the first), in points of percent.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import TYPE_CHECKING

import numpy as np

from steerkit import metrics

if TYPE_CHECKING:
    import pandas as pd

EXACT_MAX = 16  # enumerate all 2^k sign flips up to k differing items (65,536); sample beyond (our choice)
N_PERMUTATIONS = 10_000  # sign-flip samples when the test is not exact (our choice)
ALPHA = 0.05  # two-sided level of the power line (our choice, the usual one)
POWER = 0.8  # power of the power line (our choice, the usual one)
OVERALL = "all"  # the subset name of the rows pooling every subset
METRICS = (("safety", "harmlessness_avg", metrics.SAFE_AVG), ("helpfulness", "helpfulness_avg", metrics.HELPFUL_AVG))


def _pairs(a: Sequence[float], b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired outcomes differ in length: {x.size} and {y.size}")
    keep = ~(np.isnan(x) | np.isnan(y))
    return x[keep], y[keep]


def paired_bootstrap_ci(
    a: Sequence[float], b: Sequence[float], *, n_resamples: int = metrics.N_RESAMPLES,
    level: float = metrics.CI_LEVEL, seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``mean(b - a)``, resampling items (both arms together).

    Pairs with a NaN on either side are left out.

    >>> paired_bootstrap_ci([0, 0, 1], [1, 1, 2])   # every item gains exactly 1: no spread
    (1.0, 1.0)
    >>> lo, hi = paired_bootstrap_ci([0, 1] * 30, [1, 1] * 30, seed=3)   # half the items gain 1
    >>> 0.3 < lo < 0.5 < hi < 0.7
    True
    """
    x, y = _pairs(a, b)
    return metrics.bootstrap_ci((y - x).tolist(), n_resamples=n_resamples, level=level, seed=seed)


def sign_flip_test(
    a: Sequence[float], b: Sequence[float], *, n_permutations: int = N_PERMUTATIONS,
    exact_max: int = EXACT_MAX, seed: int = 0,
) -> tuple[float, bool]:
    """Two-sided paired permutation test of ``mean(b - a) == 0``; returns (p-value, exact).

    Under the null each item's difference is as likely to have either sign, so the reference
    distribution is the mean difference over all 2^k sign patterns of the k non-zero differences
    (items without a difference contribute 0 whatever their sign). p = share of patterns whose
    |mean| is at least the observed |mean| (the observed pattern is one of them, so p > 0). With
    more than ``exact_max`` non-zero differences the patterns are sampled (``n_permutations``, seeded)
    and p = (hits + 1) / (n_permutations + 1).

    Worked case: differences (1, 1, 1, -1): |sum| = 2; of the 16 sign patterns, the sums are
    +-4 (2 patterns), +-2 (8 patterns) and 0 (6 patterns), so 10 reach |sum| >= 2: p = 10/16.

    >>> sign_flip_test([0, 0, 0, 1], [1, 1, 1, 0])
    (0.625, True)
    >>> sign_flip_test([0, 0, 0], [1, 1, 1])   # 2 of the 8 patterns (all +, all -) reach |sum| = 3
    (0.25, True)
    >>> sign_flip_test([1, 1], [1, 1])   # no item differs: nothing speaks against the null
    (1.0, True)
    """
    x, y = _pairs(a, b)
    d = (y - x)[(y - x) != 0]
    k = d.size
    if k == 0:
        return 1.0, True
    observed = abs(d.sum())
    tol = 1e-9 * max(1.0, observed)  # sums of equal magnitude must count as reaching the observed one
    if k <= exact_max:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=k)))
        sums = np.abs(signs @ d)
        return float((sums >= observed - tol).mean()), True
    rng = np.random.default_rng(seed)
    signs = rng.choice((1.0, -1.0), size=(n_permutations, k))
    hits = int((np.abs(signs @ d) >= observed - tol).sum())
    return (hits + 1) / (n_permutations + 1), False


def paired_items_needed(
    p_a: float, p_b: float, *, discordant: float | None = None, alpha: float = ALPHA, power: float = POWER
) -> int:
    """Items a paired pass/fail comparison needs to detect pass rates ``p_a`` vs ``p_b`` (0..1).

    McNemar's test in its normal approximation (Connor 1987): with p10 and p01 the shares of items
    only arm a passes and only arm b passes, delta = p01 - p10 = p_b - p_a and psi = p10 + p01::

        n = (z_{1-alpha/2} sqrt(psi) + z_{power} sqrt(psi - delta^2))^2 / delta^2

    Assumption: only the marginal rates are known (the paper reports no per-item outcomes), so by
    default the arms are taken as independent within an item: psi = p_a (1 - p_b) + p_b (1 - p_a).
    Arms that pass and fail the same items (positively correlated, as successive checkpoints of one
    model are) have fewer discordant items and need fewer; pass ``discordant`` (psi) when it is known,
    for example measured on a pilot run.

    The paper's mean-aggregator ablation against full TCSR (Safety 51.09% vs 55.58%, 3B): psi =
    .5109 x .4442 + .5558 x .4891 = .4988, delta = .0449; (1.960 x .7062 + .8416 x .7048)^2 / .002016
    = 3.910 / .002016 = 1939.6:

    >>> paired_items_needed(0.5109, 0.5558)
    1940
    >>> paired_items_needed(0.5109, 0.5558, discordant=0.10)   # 10% of items decided differently
    387
    """
    delta = p_b - p_a
    if delta == 0:
        raise ValueError("paired_items_needed: the two rates are equal; no sample size detects no difference")
    psi = p_a * (1 - p_b) + p_b * (1 - p_a) if discordant is None else discordant
    if not delta**2 < psi <= 1:
        raise ValueError(f"discordant share {psi} must exceed the squared difference {delta**2:.4f} and be <= 1")
    z = NormalDist()
    za, zb = z.inv_cdf(1 - alpha / 2), z.inv_cdf(power)
    return math.ceil((za * math.sqrt(psi) + zb * math.sqrt(psi - delta**2)) ** 2 / delta**2)


def logrank(a: pd.DataFrame, b: pd.DataFrame, *, horizon: int = metrics.HORIZON) -> tuple[float, float]:
    """Log-rank test between the survival of two arms' dialogues; returns (chi-square, p).

    ``a`` and ``b`` are `steerkit.metrics.dialogue_summary` rows (``n_turns``, ``first_failure``),
    turned into durations and events exactly as `steerkit.metrics.survival_curves` does.
    """
    from lifelines.statistics import logrank_test

    da, ea = metrics.survival_durations(a["n_turns"].tolist(), a["first_failure"].tolist(), horizon=horizon)
    db, eb = metrics.survival_durations(b["n_turns"].tolist(), b["first_failure"].tolist(), horizon=horizon)
    if not any(ea) and not any(eb):
        return 0.0, 1.0  # no dialogue fails in either arm: the curves are identical
    r = logrank_test(da, db, event_observed_A=ea, event_observed_B=eb)
    return float(r.test_statistic), float(r.p_value)


def paired_outcomes(
    dialogues: pd.DataFrame, a: str, b: str, *, label: str = "label", item: str = "dialogue_id"
) -> pd.DataFrame:
    """One row per item both arms answered: ``<metric>_a`` / ``<metric>_b`` pass indicators (0/1,
    NaN when the arm has no scored turn on the item), plus ``subset``.

    Raises:
        ValueError: an arm is missing, or an item appears twice within an arm.
    """
    import pandas as pd

    parts = []
    for arm in (a, b):
        g = dialogues[dialogues[label] == arm]
        if g.empty:
            raise ValueError(f"no dialogues labelled {arm!r} (labels: {sorted(dialogues[label].unique())})")
        dup = g[item][g[item].duplicated()]
        if len(dup):
            raise ValueError(f"arm {arm!r}: item {dup.iloc[0]!r} appears twice; one evaluation per label")
        cols = {"subset": g.get("subset", OVERALL)}
        for name, col, cut in METRICS:
            cols[name] = (g[col] >= cut).astype(float).where(g[col].notna())
        parts.append(pd.DataFrame({item: g[item], **cols}).set_index(item))
    left, right = parts
    joined = left.join(right, how="inner", lsuffix="_a", rsuffix="_b")
    return joined.rename(columns={"subset_a": "subset"}).drop(columns="subset_b").reset_index()


def compare_arms(
    dialogues: pd.DataFrame, *, arms: Sequence[str] | None = None, reference: str | None = None,
    label: str = "label", n_resamples: int = metrics.N_RESAMPLES, level: float = metrics.CI_LEVEL,
    seed: int = 0,
) -> pd.DataFrame:
    """Paired comparison of arms (labels) of a `steerkit.frames.dialogues_df` frame, as a tidy table.

    Each arm after the reference (default: the first arm) is compared with the reference, per subset
    and over all subsets (subset ``"all"``). One row per (arm_a, arm_b, subset, metric):

    - metric ``safety`` / ``helpfulness``: ``n_pairs`` (items scored in both), ``n_excluded`` (items
      of both arms scored in only one or neither), ``rate_a``, ``rate_b`` (%), ``diff`` (b - a, points),
      ``diff_lo``/``diff_hi`` (paired bootstrap), ``n_discordant``, ``p_value`` (sign-flip test),
      ``exact``;
    - metric ``survival``: ``statistic`` (log-rank chi-square) and ``p_value``, ``n_pairs`` = items
      in both arms.

    Arms are the labels in order of first appearance unless ``arms`` names them (pipeline order).
    """
    import pandas as pd

    arms = list(arms) if arms else list(dict.fromkeys(dialogues[label]))
    if len(arms) < 2:
        raise ValueError(f"compare_arms needs two arms or more; got {arms}")
    ref = reference or arms[0]
    if ref not in arms:
        raise ValueError(f"reference {ref!r} is not among the arms {arms}")
    rows = []
    for other in (x for x in arms if x != ref):
        pairs = paired_outcomes(dialogues, ref, other, label=label)
        subsets = [OVERALL, *sorted(set(pairs["subset"]), key=str)] if len(set(pairs["subset"])) > 1 else [OVERALL]
        for sub in subsets:
            p = pairs if sub == OVERALL else pairs[pairs["subset"] == sub]
            base = {"arm_a": ref, "arm_b": other, "subset": sub}
            for name, _, _ in METRICS:
                x, y = p[f"{name}_a"].to_numpy(), p[f"{name}_b"].to_numpy()
                xs, ys = _pairs(x, y)
                pval, exact = sign_flip_test(xs, ys, seed=seed)
                lo, hi = paired_bootstrap_ci(xs, ys, n_resamples=n_resamples, level=level, seed=seed)
                rows.append({**base, "metric": name, "n_pairs": len(xs), "n_excluded": len(x) - len(xs),
                             "rate_a": 100 * xs.mean() if len(xs) else math.nan,
                             "rate_b": 100 * ys.mean() if len(xs) else math.nan,
                             "diff": 100 * (ys - xs).mean() if len(xs) else math.nan,
                             "diff_lo": 100 * lo, "diff_hi": 100 * hi, "n_discordant": int((xs != ys).sum()),
                             "p_value": pval, "exact": exact, "statistic": math.nan})
            ids = set(p["dialogue_id"])
            da = dialogues[(dialogues[label] == ref) & dialogues["dialogue_id"].isin(ids)]
            db = dialogues[(dialogues[label] == other) & dialogues["dialogue_id"].isin(ids)]
            stat, pval = logrank(da, db)
            rows.append({**base, "metric": "survival", "n_pairs": len(ids), "n_excluded": 0,
                         "statistic": stat, "p_value": pval})
    cols = ["arm_a", "arm_b", "subset", "metric", "n_pairs", "n_excluded", "rate_a", "rate_b", "diff", "diff_lo",
            "diff_hi", "n_discordant", "p_value", "exact", "statistic"]
    return pd.DataFrame(rows, columns=cols)


def power_line(n_items: int, p_a: float, p_b: float, *, discordant: float | None = None,
               alpha: float = ALPHA, power: float = POWER) -> str:
    """One sentence: how many items a difference of this size needs, against the bench's size.

    >>> print(power_line(40, 0.5109, 0.5558))   # doctest: +NORMALIZE_WHITESPACE
    A difference of 4.5 points (51.1% -> 55.6%) needs about 1940 paired items for 80% power at a
    two-sided 5% level (McNemar, normal approximation, arms independent within an item); this bench
    has 40, so it can only show larger differences.
    """
    need = paired_items_needed(p_a, p_b, discordant=discordant, alpha=alpha, power=power)
    assumption = "arms independent within an item" if discordant is None else f"{discordant:.0%} discordant items"
    verdict = "enough for it" if n_items >= need else "so it can only show larger differences"
    return (f"A difference of {abs(p_b - p_a) * 100:.1f} points ({p_a:.1%} -> {p_b:.1%}) needs about {need} "
            f"paired items for {power:.0%} power at a two-sided {alpha:.0%} level (McNemar, normal "
            f"approximation, {assumption}); this bench has {n_items}, {verdict}.")


#: The paper's own 3B STEER-Bench contrasts (method.md 4 and 7): (first arm, second arm), by the names
#: of `steerkit.paper_reference.HEADLINE` models or `ABLATIONS` rows.
PAPER_CONTRASTS = (
    ("without TCSR (mean)", "full SaFeR-Steer"),
    ("without feedback dynamics (static turns)", "full SaFeR-Steer"),
    ("3B SFT", "3B SaFeR-Steer"),
    ("3B base", "3B SFT"),
)


def _paper_rates(name: str) -> tuple[float, float]:
    from steerkit.paper_reference import ABLATIONS, HEADLINE

    if name in ABLATIONS:
        return ABLATIONS[name]
    return HEADLINE[name]["STEER-Bench"]


def paper_power(n_items: int | None = None, *, discordant: float | None = None, alpha: float = ALPHA,
                power: float = POWER) -> pd.DataFrame:
    """The power line for each of the paper's contrasts: items needed per metric, beside ``n_items``.

    Columns: ``arm_a``, ``arm_b``, ``metric``, ``rate_a``, ``rate_b`` (%), ``diff`` (points),
    ``items_needed`` and, with ``n_items``, ``bench_items`` and ``enough``.

    >>> t = paper_power(500)
    >>> t.query("arm_a == 'without TCSR (mean)' and metric == 'safety'")[["diff", "items_needed",
    ...                                                                   "enough"]].values.tolist()
    [[4.49, 1940, False]]
    """
    import pandas as pd

    rows = []
    for a, b in PAPER_CONTRASTS:
        ra, rb = _paper_rates(a), _paper_rates(b)
        for i, (name, _, _) in enumerate(METRICS):
            need = paired_items_needed(ra[i] / 100, rb[i] / 100, discordant=discordant, alpha=alpha, power=power)
            row = {"arm_a": a, "arm_b": b, "metric": name, "rate_a": ra[i], "rate_b": rb[i],
                   "diff": round(rb[i] - ra[i], 2), "items_needed": need}
            if n_items is not None:
                row.update(bench_items=n_items, enough=n_items >= need)
            rows.append(row)
    return pd.DataFrame(rows)
