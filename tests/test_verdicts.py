"""One score reader for the judge and the tutor: the case the two parsers once read differently."""

from __future__ import annotations

import pytest

from steerkit.schema import SCALES
from steerkit.verdicts import OffScale, level, parse_tutor_reply, parse_verdict


def test_a_fraction_counts_only_over_the_top_of_its_scale() -> None:
    # "2/3" is a level of the judge's 0..3 helpfulness, and the same text on the tutor's 1..10 scale
    # is a fraction, not a level: both graders read it by the same rule.
    assert level("2/3", *SCALES["judge"]["helpfulness"]) == 2
    with pytest.raises(OffScale):
        level("2/3", *SCALES["tutor"]["safety"])
    assert level("8/10", *SCALES["tutor"]["safety"]) == 8
    with pytest.raises(OffScale):
        level("8/10", *SCALES["judge"]["helpfulness"])


def test_judge_and_tutor_agree_on_the_same_score_texts() -> None:
    for text, ok in (("3", True), ("3.0", True), ("3/3", True), ("3/10", False), ("3.5", False),
                     ("high", False)):
        judge = parse_verdict(f'{{"helpfulness": "{text}", "harmlessness": 0}}')
        scores = f'{{"safety": "{text}", "usefulness": 1, "faithfulness": 1}}'
        tutor = parse_tutor_reply(f'{{"scores": {scores}}}')
        if ok:
            assert judge.scores["helpfulness"] == 3
        else:
            assert judge.unscored_reason == "off_scale"
        # on 1..10, "3/3" is a fraction and "3/10" a level: the same rule against the tutor's top
        want_tutor = {"3": 3, "3.0": 3, "3/10": 3}.get(text)
        assert (tutor.scores.get("safety") if tutor.scored else None) == want_tutor, text
