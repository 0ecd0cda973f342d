"""Per-turn reward, TCSR and the aggregators: tables with the arithmetic in comments, and properties."""

from __future__ import annotations

import math
import random

import pytest

from steerkit.rewards import (
    AGGREGATORS,
    ALT_PUBLISHED_WEIGHTS,
    PAPER_WEIGHTS,
    PROPER_TURN,
    TrajectoryReward,
    aggregate,
    harmonic,
    repetition_penalty,
    soft_linear,
    tcsr,
    tcsr_paper,
    trajectory_reward,
    turn_reward,
    turn_weights,
    with_authors_zero,
    worst_turn_safe,
)

FMT = "<thinking>The user asks for a recipe.</thinking><answer>Here is a safe version.</answer>"
BAD_FMT = "<answer>No thinking block.</answer>"
TWO_ANSWERS = "<thinking>t</thinking><answer>a</answer><answer>b</answer>"
LOOP = "<thinking>t</thinking><answer>" + "I cannot help. " * 10 + "</answer>"  # 30 tokens, 3-token cycle


def s(safety: int, usefulness: int, faithfulness: int) -> dict[str, int]:
    return {"safety": safety, "usefulness": usefulness, "faithfulness": faithfulness}


@pytest.mark.parametrize(
    ("text", "scores", "weights", "expected"),
    [
        (FMT, s(10, 10, 10), PAPER_WEIGHTS, 2.0),  # 1 + (4 + 4 + 2) / 10
        (FMT, s(8, 8, 10), PAPER_WEIGHTS, 1.84),  # 1 + (3.2 + 3.2 + 2) / 10
        (FMT, s(1, 1, 1), PAPER_WEIGHTS, 1.1),  # 1 + (0.4 + 0.4 + 0.2) / 10
        (BAD_FMT, s(10, 10, 10), PAPER_WEIGHTS, 1.0),  # format fails: 0 + 1.0
        (TWO_ANSWERS, s(6, 8, 5), PAPER_WEIGHTS, 0.66),  # 0 + (2.4 + 3.2 + 1.0) / 10
        (FMT, s(4, 1, 7), ALT_PUBLISHED_WEIGHTS, 1.34),  # 1 + (0.6*4 + 0.3*1 + 0.1*7) / 10 = 1 + 3.4/10
        # 30 tokens, 28 trigrams, 3 distinct -> share 25/28; 1 + 0.9 + ... - 0.2 * 25/28
        (LOOP, s(8, 8, 10), PAPER_WEIGHTS, 1.84 - 0.2 * 25 / 28),
        # no format, lowest scores, looping answer: 0.1 - 0.2 * 25/28 < 0 -> floored at 0
        ("I cannot help. " * 10, s(1, 1, 1), PAPER_WEIGHTS, 0.0),
    ],
)
def test_turn_reward_table(text, scores, weights, expected):
    assert turn_reward(text, scores, weights) == pytest.approx(expected, abs=1e-9)


def test_turn_reward_rejects_missing_scores():
    with pytest.raises(ValueError, match="faithfulness"):
        turn_reward(FMT, {"safety": 1, "usefulness": 1})


def test_repetition_penalty_threshold_is_24_tokens():
    assert repetition_penalty("a b c " * 7 + "a b c") == pytest.approx(0.2 * 19 / 22)  # 24 tokens
    assert repetition_penalty("a b c " * 7 + "a b") == 0.0  # 23 tokens: below the threshold


def test_turn_weights_variants():
    assert turn_weights("paper") == PAPER_WEIGHTS
    assert (ALT_PUBLISHED_WEIGHTS.safety, ALT_PUBLISHED_WEIGHTS.usefulness, ALT_PUBLISHED_WEIGHTS.faithfulness) == (
        0.6, 0.3, 0.1,
    )
    with pytest.raises(ValueError, match="paper"):
        turn_weights("custom")


@pytest.mark.parametrize(
    ("rewards", "method", "alpha", "expected"),
    [
        ([1.0, 0.0, 1.0], "tcsr", 0.3, 0.3 * 0 + 0.7 * 2 / 3),  # 0.4667
        ([2.0, 2.0, 2.0], "tcsr", 0.3, 2.0),  # constant: min = mean
        ([2.0, 1.0], "tcsr", 0.5, 0.5 * 1 + 0.5 * 1.5),  # 1.25
        ([1.0, 0.0], "tcsr_paper", 0.3, 1.0 + (0.3 * 0 + 0.7 * 0.5)),  # t1: 1; t2: 0.35 -> 1.35
        ([2.0, 1.0, 2.0], "tcsr_paper", 0.3, 2.0 + (0.3 + 0.7 * 1.5) + (0.3 + 0.7 * 5 / 3)),
        ([0.5, 1.5], "mean", 0.3, 1.0),
        ([0.5, 1.5], "min", 0.3, 0.5),
        ([0.5, 1.5], "last", 0.3, 1.5),
        ([1.0, 1.0, 0.0], "soft_linear", 0.3, (1.0 + 1.1 + 0) / 3.3),  # weights 1.0, 1.1, 1.2
        ([1.0, 2.0, 4.0], "harmonic", 0.3, 3 / (1 + 0.5 + 0.25)),  # 1.7143
        ([1.0, 0.0], "harmonic", 0.3, 0.0),  # a zero turn zeroes the harmonic mean
    ],
)
def test_aggregators_table(rewards, method, alpha, expected):
    assert aggregate(rewards, method, alpha=alpha) == pytest.approx(expected)


def test_named_functions_match_dispatch():
    rs = [1.2, 0.4, 1.9]
    assert tcsr(rs) == aggregate(rs, "tcsr")
    assert tcsr_paper(rs) == aggregate(rs, "tcsr_paper")
    assert soft_linear(rs) == aggregate(rs, "soft_linear")
    assert harmonic(rs) == aggregate(rs, "harmonic")


@pytest.mark.parametrize("method", AGGREGATORS)
def test_empty_trajectory_is_an_error(method):
    with pytest.raises(ValueError, match="at least one"):
        aggregate([], method)


def test_unknown_aggregator_and_bad_alpha():
    with pytest.raises(ValueError, match="unknown aggregator"):
        aggregate([1.0], "median")
    with pytest.raises(ValueError, match="alpha"):
        tcsr([1.0], alpha=1.5)
    with pytest.raises(ValueError, match="finite"):
        tcsr([1.0, math.nan])


def test_tcsr_properties_on_random_trajectories():
    rng = random.Random(7)
    for _ in range(500):
        rs = [rng.uniform(0, 2) for _ in range(rng.randint(1, 10))]
        mean, low = sum(rs) / len(rs), min(rs)
        alpha = rng.random()
        r = tcsr(rs, alpha)
        assert low - 1e-12 <= r <= mean + 1e-12  # min <= TCSR <= mean
        assert tcsr(rs, 0.0) == pytest.approx(mean)  # alpha 0 = mean
        assert tcsr(rs, 1.0) == pytest.approx(low)  # alpha 1 = min
        # paper form: each cumulative term lies between the prefix min and prefix mean
        assert tcsr_paper(rs, 0.0) == pytest.approx(sum(sum(rs[:t]) / t for t in range(1, len(rs) + 1)))
        assert tcsr_paper(rs, 1.0) == pytest.approx(sum(min(rs[:t]) for t in range(1, len(rs) + 1)))
        assert min(rs) <= soft_linear(rs) <= max(rs)
        assert harmonic(rs) <= mean + 1e-12


def test_one_bad_turn_costs_more_under_tcsr_than_under_mean():
    safe = [1.9, 1.9, 1.9, 1.9]
    one_bad = [1.9, 1.9, 0.2, 1.9]
    drop_mean = aggregate(safe, "mean") - aggregate(one_bad, "mean")  # 1.7 / 4 = 0.425
    drop_tcsr = aggregate(safe, "tcsr") - aggregate(one_bad, "tcsr")  # 0.3 * 1.7 + 0.7 * 0.425 = 0.8075
    assert drop_mean == pytest.approx(0.425)
    assert drop_tcsr == pytest.approx(0.8075)


def test_authors_zero_forces_min_to_zero():
    assert with_authors_zero([1.5, 1.8]) == [1.5, 0.0]
    fmt_scores = [s(10, 10, 10), s(10, 10, 10)]
    assert trajectory_reward([FMT, FMT], fmt_scores) == pytest.approx(2.0)
    # replication flag: [2.0, 0.0] -> 0.3 * 0 + 0.7 * 1.0
    assert trajectory_reward([FMT, FMT], fmt_scores, authors_zero_final=True) == pytest.approx(0.7)


def test_trajectory_reward_unscored_turn_is_none_not_zero():
    assert trajectory_reward([FMT, FMT], [s(10, 10, 10), None]) is None
    with pytest.raises(ValueError, match="2 answers but 1"):
        trajectory_reward([FMT, FMT], [s(10, 10, 10)])


def test_worst_turn_safe():
    # safe = no harmful turn: method.md 4's levels 1, 2 and 4 are harm; 5 and 6 are safe but poor answers
    assert worst_turn_safe([s(10, 10, 9), s(8, 8, 9)]) is True
    assert worst_turn_safe([s(10, 10, 9), s(6, 8, 9)]) is True
    assert worst_turn_safe([s(10, 10, 9), s(5, 8, 9)]) is True
    assert worst_turn_safe([s(10, 10, 9), s(4, 1, 9)]) is False
    assert worst_turn_safe([s(2, 1, 9), s(10, 10, 9)]) is False
    # proper = every turn at 8 or more
    assert worst_turn_safe([s(10, 10, 9), s(8, 8, 9)], PROPER_TURN) is True
    assert worst_turn_safe([s(10, 10, 9), s(6, 8, 9)], PROPER_TURN) is False
    assert worst_turn_safe([s(10, 10, 9), None]) is None
    assert worst_turn_safe([]) is None


def test_trajectory_reward_follows_trl_contract_and_logs_unscored():
    logged = {}
    fn = TrajectoryReward()  # TCSR run form, alpha 0.3
    out = fn(
        completions=[[{"role": "assistant", "content": "x"}]] * 3,
        turn_scores=[[s(10, 10, 10), s(1, 1, 1)], [s(10, 10, 10)], [None]],
        turn_answers=[[FMT, FMT], [BAD_FMT], [FMT]],
        log_metric=lambda k, v: logged.__setitem__(k, v),
        prompts=["ignored column"] * 3,
    )
    # row 0: turns 2.0 and 1.1 -> 0.3 * 1.1 + 0.7 * 1.55 = 1.415; row 1: 1.0; row 2: unscored
    assert out[0] == pytest.approx(1.415)
    assert out[1] == pytest.approx(1.0)
    assert out[2] is None
    assert logged == {"unscored_trajectories": 1.0}
    assert fn.__name__ == "tcsr_reward"


def test_trajectory_reward_zero_final_only_where_static_turns_ran_out():
    fn = TrajectoryReward(aggregator="mean", authors_zero_final=True)
    out = fn(["a", "b"], turn_scores=[[s(10, 10, 10)] * 2] * 2, turn_answers=[[FMT, FMT]] * 2,
             zero_final=[True, False])
    assert out == [pytest.approx(1.0), pytest.approx(2.0)]  # mean(2, 0) and mean(2, 2)


def test_trajectory_reward_length_mismatch():
    with pytest.raises(ValueError, match="2 completions"):
        TrajectoryReward()(["a", "b"], turn_scores=[[]], turn_answers=[[]])
    with pytest.raises(ValueError, match="unknown aggregator"):
        TrajectoryReward(aggregator="median")
