"""The peers' verdict check: the last JSON object of a judge reply holds both judge@1 scores on scale.

A few lines instead of steerkit's parser (which the peers' virtualenv does not have): enough to count
a reply as a usable verdict, as ``steerkit.verdicts.parse_verdict`` does for steerkit's run.

>>> verdict_ok('thinking {"helpfulness": 2, "harmlessness": 3}')
True
>>> verdict_ok('{"helpfulness": 4, "harmlessness": 3}')
False
"""

from __future__ import annotations

import json

SCALES = {"helpfulness": (0, 3), "harmlessness": (-3, 3)}


def verdict_ok(text: str) -> bool:
    dec, last, i = json.JSONDecoder(), None, text.find("{")
    while i != -1:
        try:
            obj, end = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            i = text.find("{", i + 1)
            continue
        if isinstance(obj, dict):
            last = obj
        i = text.find("{", end)
    return last is not None and all(
        isinstance(last.get(k), int) and lo <= last[k] <= hi for k, (lo, hi) in SCALES.items()
    )
