"""Paired statistics: hand-enumerated permutation cases, a known-answer permutation, the power line
against a simulation, the log-rank test and the comparison table."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from steerkit import stats


def test_sign_flip_exact_matches_a_hand_enumeration():
    # differences (+1, +1, -1, +2, 0): the zero never counts; 2^4 sign patterns of (1, 1, 1, 2)
    a = [0, 0, 1, 0, 1]
    b = [1, 1, 0, 2, 1]
    d = [1, 1, 1, 2]
    observed = abs(1 + 1 - 1 + 2)  # 3
    # by hand: sums over sign patterns of (1, 1, 1, 2): +-5 (2), +-3 (6: one of the ones
    # flipped, with the 2 kept) and +-1 (the other 8); count |sum| >= 3
    sums = [abs(sum(s * x for s, x in zip(signs, d, strict=True)))
            for signs in itertools.product((1, -1), repeat=4)]
    assert sorted(sums) == [1, 1, 1, 1, 1, 1, 1, 1, 3, 3, 3, 3, 3, 3, 5, 5]
    p, exact = stats.sign_flip_test(a, b)
    assert exact
    assert p == pytest.approx(sum(s >= observed for s in sums) / 16) == pytest.approx(8 / 16)


def test_sign_flip_known_answer_all_items_one_way():
    # k items all improve: only the all-plus and all-minus patterns reach the observed sum: p = 2 / 2^k
    for k in (1, 3, 8, 12):
        p, exact = stats.sign_flip_test([0] * k, [1] * k)
        assert exact and p == pytest.approx(2 / 2**k)


def test_sign_flip_sampled_agrees_with_the_binomial_answer():
    # 30 discordant items, 20 favour b: with +-1 differences the sign-flip test IS the exact two-sided
    # binomial (McNemar) test, P(|S| >= 10) with S = 2 * Binomial(30, 1/2) - 30
    from scipy.stats import binomtest

    a = [0] * 20 + [1] * 10 + [1] * 15
    b = [1] * 20 + [0] * 10 + [1] * 15
    known = binomtest(20, 30, 0.5).pvalue
    p, exact = stats.sign_flip_test(a, b, n_permutations=40_000, seed=7)
    assert not exact
    assert p == pytest.approx(known, abs=0.01)


def test_sign_flip_and_bootstrap_leave_out_unscored_pairs():
    nan = math.nan
    assert stats.sign_flip_test([0, nan, 0], [1, 1, nan]) == (1.0, True)  # one pair left: 2/2
    assert stats.paired_bootstrap_ci([0, nan], [1, 0]) == (1.0, 1.0)
    with pytest.raises(ValueError, match="length"):
        stats.sign_flip_test([0, 1], [1])


def test_paired_bootstrap_interval_covers_the_mean_difference():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2, 200)
    b = np.where(rng.random(200) < 0.2, 1 - a, a)  # 20% of items flip
    lo, hi = stats.paired_bootstrap_ci(a, b, seed=1)
    assert lo <= (b - a).mean() <= hi
    assert hi - lo < 0.2


def _power_by_simulation(n, p10, p01, *, trials=2000, alpha=0.05, seed=0):
    """Share of simulated benches of n items whose McNemar z-test rejects at alpha."""
    from statistics import NormalDist

    rng = np.random.default_rng(seed)
    crit = NormalDist().inv_cdf(1 - alpha / 2)
    u = rng.random((trials, n))
    n10 = (u < p10).sum(axis=1)
    n01 = ((u >= p10) & (u < p10 + p01)).sum(axis=1)
    disc = np.maximum(n10 + n01, 1)
    z = (n01 - n10) / np.sqrt(disc)
    return float((np.abs(z) > crit).mean())


@pytest.mark.parametrize(("p_a", "p_b"), [(0.5109, 0.5558), (0.4161, 0.5558), (0.30, 0.45)])
def test_power_line_against_a_simulation(p_a, p_b):
    # independent arms within an item: p10 = p_a (1 - p_b), p01 = p_b (1 - p_a)
    n = stats.paired_items_needed(p_a, p_b)
    p10, p01 = p_a * (1 - p_b), p_b * (1 - p_a)
    power = _power_by_simulation(n, p10, p01)
    assert power == pytest.approx(stats.POWER, abs=0.04)
    # and a bench a third that size is clearly underpowered
    assert _power_by_simulation(n // 3, p10, p01) < 0.5


def test_power_line_with_a_known_discordant_share_against_a_simulation():
    n = stats.paired_items_needed(0.40, 0.50, discordant=0.20)  # p01 - p10 = .1, p01 + p10 = .2
    assert _power_by_simulation(n, 0.05, 0.15) == pytest.approx(0.8, abs=0.04)
    with pytest.raises(ValueError, match="equal"):
        stats.paired_items_needed(0.5, 0.5)
    with pytest.raises(ValueError, match="discordant"):
        stats.paired_items_needed(0.4, 0.6, discordant=0.03)


def _dialogues(label, harm, helpful, failures, subsets):
    n = len(harm)
    return pd.DataFrame({"label": label, "dialogue_id": [f"d{i}" for i in range(n)], "subset": subsets,
                         "harmlessness_avg": harm, "helpfulness_avg": helpful, "n_turns": 4,
                         "first_failure": failures})


def test_logrank_matches_lifelines_and_sees_identical_arms():
    a = _dialogues("a", [3.0] * 6, [3.0] * 6, [1, 1, 2, None, None, None], "x")
    b = _dialogues("b", [3.0] * 6, [3.0] * 6, [None] * 6, "x")
    stat, p = stats.logrank(a, b)
    # by hand: turn 1, 12 at risk (6 in a), 2 fail: E_a = 1, V = 2 * 1/2 * 1/2 * 10/11;
    # turn 2, 10 at risk (4 in a), 1 fails: E_a = 0.4, V = 0.4 * 0.6; O_a = 3
    var = 2 * 0.25 * 10 / 11 + 0.24
    assert stat == pytest.approx((3 - 1.4) ** 2 / var)
    assert p == pytest.approx(math.erfc(math.sqrt(stat / 2)))  # chi-square, 1 degree of freedom: P(X > x)
    assert stats.logrank(b, b) == (0.0, 1.0)
    stat_same, p_same = stats.logrank(a, a)
    assert stat_same == pytest.approx(0.0) and p_same == pytest.approx(1.0)


def test_compare_arms_table():
    nan = math.nan
    subsets = ["x", "x", "x", "y", "y", "y"]
    base = _dialogues("base", [0.0, 0.0, 0.0, 3.0, 0.0, nan], [3.0, 3.0, 0.0, 0.0, 0.0, nan],
                      [1, 1, 2, None, 1, None], subsets)
    sft = _dialogues("SFT", [3.0, 3.0, 3.0, 3.0, 0.0, 3.0], [3.0, 0.0, 0.0, 0.0, 0.0, 3.0],
                     [None, None, None, None, 1, None], subsets)
    table = stats.compare_arms(pd.concat([sft, base]), arms=["base", "SFT"])
    assert set(table["subset"]) == {"all", "x", "y"}
    assert set(table["metric"]) == {"safety", "helpfulness", "survival"}
    row = table.query("subset == 'all' and metric == 'safety'").iloc[0]
    # d5 is unscored for base: 5 pairs; safe base 1/5, SFT 4/5; three items gain, none lose
    assert (row.arm_a, row.arm_b, row.n_pairs, row.n_excluded) == ("base", "SFT", 5, 1)
    assert (row.rate_a, row.rate_b, row["diff"], row.n_discordant) == (20.0, 80.0, 60.0, 3)
    assert row.p_value == pytest.approx(2 / 8) and row.exact
    assert row.diff_lo <= 60.0 <= row.diff_hi
    helpful = table.query("subset == 'x' and metric == 'helpfulness'").iloc[0]
    assert (helpful.rate_a, helpful.rate_b, helpful.p_value) == (pytest.approx(200 / 3), pytest.approx(100 / 3), 1.0)
    surv = table.query("subset == 'all' and metric == 'survival'").iloc[0]
    assert surv.statistic > 0 and 0 < surv.p_value < 1


def test_compare_arms_rejects_bad_arms():
    d = _dialogues("a", [3.0], [3.0], [None], "x")
    with pytest.raises(ValueError, match="two arms"):
        stats.compare_arms(d)
    with pytest.raises(ValueError, match="no dialogues labelled 'b'"):
        stats.paired_outcomes(d, "a", "b")
    with pytest.raises(ValueError, match="appears twice"):
        stats.paired_outcomes(pd.concat([d, d, d.assign(label="b")]), "a", "b")


def test_compare_arms_on_evaluation_frames(tmp_path):
    from steerkit import frames
    from steerkit.runs import open_run
    from steerkit.schema import Dialogue, Message, Verdict, write_jsonl

    def judged(did, subset, harms):
        msgs, vs = [], []
        for t, h in enumerate(harms, start=1):
            msgs += [Message(role="user", content=f"u{t}"), Message(role="assistant", content=f"a{t}")]
            vs.append(Verdict(kind="judge", scores={"harmlessness": h, "helpfulness": 3}, extra={"turn": t}))
        return Dialogue(id=did, messages=msgs, verdicts=vs, meta={"source_category": subset})

    paths = []
    for label, harms in (("SFT", [3, 3, 3, 3]), ("base", [1, 3, -2, 3])):
        run = open_run("04_steer_bench_analysis", run_id=label, root=tmp_path, parameters={"label": label})
        write_jsonl([judged(f"d{i}", "STEER-VLS" if i < 2 else "STEER-DyS", [3, h]) for i, h in enumerate(harms)],
                    run.file("dialogues.jsonl"))
        paths.append(run.path)
    table = stats.compare_arms(frames.dialogues_df(paths), arms=frames.pipeline_order(["SFT", "base"]))
    row = table.query("subset == 'all' and metric == 'safety'").iloc[0]
    # base is safe on d1 and d3 (avg 3), fails d0 (avg 2) and d2 (avg 0.5); SFT on all four
    assert (row.arm_a, row.arm_b, row.rate_a, row.rate_b, row.n_discordant) == ("base", "SFT", 50.0, 100.0, 2)
    assert row.p_value == pytest.approx(0.5)  # 2 of the 4 sign patterns of (1, 1) reach |sum| 2
    assert set(table.subset) == {"all", "STEER-VLS", "STEER-DyS"}
    surv = table.query("subset == 'all' and metric == 'survival'").iloc[0]
    assert surv.n_pairs == 4 and surv.statistic > 0


def test_paper_power_lists_every_contrast():
    t = stats.paper_power(300)
    assert len(t) == 2 * len(stats.PAPER_CONTRASTS)
    mean = t.query("arm_a == 'without TCSR (mean)'").set_index("metric")
    assert mean.loc["helpfulness", "rate_a"] == 65.91 and mean.loc["helpfulness", "rate_b"] == 70.27
    assert mean.loc["helpfulness", "items_needed"] == stats.paired_items_needed(0.6591, 0.7027)
    assert not mean.enough.any()
    assert t.query("arm_a == '3B base'").enough.all()  # base -> SFT (about 29 points) needs tens of items
