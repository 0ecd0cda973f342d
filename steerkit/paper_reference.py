"""The paper's reported numbers (method.md 4 and 7), as data, and tables that put ours beside them.

All values are Safety / Helpfulness in percent, copied from SaFeR-Steer (arXiv 2604.16358):

- `HEADLINE`: single-turn average (BeaverTails-V, MM-SafetyBench, SPA-VL, VLGuard, VLSBench) and
  STEER-Bench average for Qwen2.5-VL-3B/7B base, + SFT (Stage II) and + SaFeR-Steer (method.md 7);
- `STEER_SUBSETS`: STEER-Bench per subset for the 3B base and 3B SaFeR-Steer models (method.md 7);
- `ABLATIONS`: 3B STEER-Bench averages of the ablations (method.md 4).

What holds in these numbers (`tests/test_metrics.py` recomputes it): the paper's STEER-Bench Avg of
the 3B models is the unweighted mean of its five subsets, to the printed two decimals (3B base:
62.76 / 5 = 12.552 -> 12.55 and 135.63 / 5 = 27.126 -> 27.13; 3B SaFeR-Steer: 277.89 / 5 = 55.578 ->
55.58 and 351.33 / 5 = 70.266 -> 70.27). The per-subset numbers of the other models are not given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

PAPER = "SaFeR-Steer (arXiv 2604.16358)"
SUBSETS = ("Beaver", "MMSafe", "VLS", "SPA", "DyS")  # STEER-Bench subsets, method.md 5

#: model -> {benchmark: (safety, helpfulness)}, method.md 7.
HEADLINE: dict[str, dict[str, tuple[float, float]]] = {
    "3B base": {"single-turn": (48.30, 45.86), "STEER-Bench": (12.55, 27.13)},
    "3B SFT": {"single-turn": (79.85, 66.46), "STEER-Bench": (41.61, 57.57)},
    "3B SaFeR-Steer": {"single-turn": (81.84, 70.77), "STEER-Bench": (55.58, 70.27)},
    "7B base": {"single-turn": (56.21, 60.32), "STEER-Bench": (24.66, 46.48)},
    "7B SFT": {"single-turn": (83.64, 72.83), "STEER-Bench": (50.31, 66.86)},
    "7B SaFeR-Steer": {"single-turn": (87.89, 77.40), "STEER-Bench": (64.89, 72.35)},
}

#: model -> {subset: (safety, helpfulness)}, STEER-Bench, method.md 7.
STEER_SUBSETS: dict[str, dict[str, tuple[float, float]]] = {
    "3B base": {"Beaver": (21.79, 42.88), "MMSafe": (4.92, 15.91), "VLS": (11.76, 34.12),
                "SPA": (14.89, 23.28), "DyS": (9.40, 19.44)},
    "3B SaFeR-Steer": {"Beaver": (50.27, 71.20), "MMSafe": (69.03, 85.98), "VLS": (54.43, 72.48),
                       "SPA": (54.76, 66.27), "DyS": (49.40, 55.40)},
}

#: ablation -> (safety, helpfulness), 3B, STEER-Bench average, method.md 4.
ABLATIONS: dict[str, tuple[float, float]] = {
    "full SaFeR-Steer": (55.58, 70.27),
    "without SFT warm start": (24.48, 42.44),
    "without TCSR (mean)": (51.09, 65.91),
    "without feedback dynamics (static turns)": (51.09, 63.96),
    "single-turn data: SFT": (21.77, 41.92),
    "single-turn data: SFT+GRPO": (17.14, 32.39),
}


#: Our row label -> the paper's ablation it reproduces (3B, STEER-Bench Avg, method.md 4): `beside_paper`
#: sets such an arm beside that row unless the label is matched to a paper model explicitly.
#: "GRPO-mean" is the label `steerkit.frames.run_label` gives a GRPO run with the mean aggregator.
LABEL_ABLATIONS: dict[str, str] = {"GRPO-mean": "without TCSR (mean)"}


def subset_rank(subset: str) -> int:
    """A sort key putting subsets in the paper's order (Beaver, MMSafe, VLS, SPA, DyS), others after.

    >>> sorted(["ours", "STEER-DyS", "Beaver"], key=subset_rank)
    ['Beaver', 'STEER-DyS', 'ours']
    """
    name = str(subset).removeprefix("STEER-")
    return SUBSETS.index(name) if name in SUBSETS else len(SUBSETS)


def paper_table(which: str = "headline") -> pd.DataFrame:
    """One of the paper's tables as a long frame with columns model, benchmark, subset, safety, helpfulness.

    Args:
        which: ``"headline"`` (method.md 7 table), ``"subsets"`` (3B per subset, with the paper's Avg as
            subset ``"Avg"``) or ``"ablations"`` (method.md 4).

    >>> paper_table("subsets").query("model == '3B base' and subset == 'MMSafe'").safety.item()
    4.92
    >>> len(paper_table("headline")), len(paper_table("ablations"))
    (12, 6)
    """
    import pandas as pd

    rows: list[dict[str, object]] = []
    match which:
        case "headline":
            for model, benches in HEADLINE.items():
                for bench, (s, h) in benches.items():
                    rows.append({"model": model, "benchmark": bench, "subset": "Avg", "safety": s, "helpfulness": h})
        case "subsets":
            for model, subsets in STEER_SUBSETS.items():
                for subset, (s, h) in subsets.items():
                    rows.append({"model": model, "benchmark": "STEER-Bench", "subset": subset,
                                 "safety": s, "helpfulness": h})
                s, h = HEADLINE[model]["STEER-Bench"]
                rows.append({"model": model, "benchmark": "STEER-Bench", "subset": "Avg",
                             "safety": s, "helpfulness": h})
        case "ablations":
            for model, (s, h) in ABLATIONS.items():
                rows.append({"model": model, "benchmark": "STEER-Bench", "subset": "Avg",
                             "safety": s, "helpfulness": h})
        case _:
            raise ValueError(f"unknown paper table {which!r}; use 'headline', 'subsets' or 'ablations'")
    return pd.DataFrame(rows)


def subset_mean(model: str) -> tuple[float, float]:
    """The unweighted mean of a model's five STEER-Bench subsets (to compare with its printed Avg).

    >>> [round(v, 3) for v in subset_mean("3B base")]   # 62.76 / 5, 135.63 / 5
    [12.552, 27.126]
    """
    vals = list(STEER_SUBSETS[model].values())
    return sum(v[0] for v in vals) / len(vals), sum(v[1] for v in vals) / len(vals)


def parse_match(text: str) -> dict[str, str]:
    """``"ours: paper model, ..."`` pairs (a notebook parameter) as a mapping for `beside_paper`.

    A colon, not "=": papermill reads notebook parameters line by line and cannot parse a value with "=".
    A paper model is one of `HEADLINE`'s or one of the 3B `ABLATIONS`.

    >>> parse_match("base: 3B base, GRPO-tcsr: 3B SaFeR-Steer, GRPO-static: without feedback dynamics (static turns)")
    {'base': '3B base', 'GRPO-tcsr': '3B SaFeR-Steer', 'GRPO-static': 'without feedback dynamics (static turns)'}
    """
    out = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        ours, sep, theirs = pair.partition(":")
        if not sep or (theirs.strip() not in HEADLINE and theirs.strip() not in ABLATIONS):
            raise ValueError(f"paper match {pair!r}: write <our label>: <paper model>, models: "
                             f"{', '.join([*HEADLINE, *ABLATIONS])}")
        out[ours.strip()] = theirs.strip()
    return out


def beside_paper(
    ours: pd.DataFrame,
    *,
    match: Mapping[str, str] | None = None,
    subsets: Sequence[str] = ("Avg",),
    label: str = "label",
    subset: str = "subset",
) -> pd.DataFrame:
    """Our rates beside the paper's: one row per (model, subset, source), source "ours" or "paper".

    Args:
        ours: rates from `steerkit.metrics` (columns ``label``, ``subset``, ``safety``, ``helpfulness``;
            ``n`` is kept when present), usually with the Avg rows of `with_subset_average`.
        match: our label -> the paper's model it corresponds to (e.g. ``{"base": "3B base"}``), a
            `HEADLINE` model or a 3B ablation of `ABLATIONS` (compared on the Avg only); a label
            left out is set beside its ablation in `LABEL_ABLATIONS` (GRPO-mean beside "without
            TCSR (mean)", 51.09 / 65.91), else shown without a paper counterpart.
        subsets: which subsets to compare, by the paper's names (``"Avg"`` is the STEER-Bench
            average); our subset names may carry a ``STEER-`` prefix.
        label: the column of ``ours`` that names the model.
        subset: the column of ``ours`` that names the subset.

    Returns:
        Columns ``model`` (our label), ``paper_model``, ``subset``, ``source``, ``safety``,
        ``helpfulness``, ``n`` (NaN for the paper).

    >>> import pandas as pd
    >>> ours = pd.DataFrame({"label": ["base"], "subset": ["Avg"], "safety": [10.0], "helpfulness": [20.0]})
    >>> beside_paper(ours, match={"base": "3B base"})[["source", "safety"]].to_dict("list")
    {'source': ['ours', 'paper'], 'safety': [10.0, 12.55]}
    >>> mean = pd.DataFrame({"label": ["GRPO-mean"], "subset": ["Avg"], "safety": [30.0], "helpfulness": [40.0]})
    >>> beside_paper(mean)[["paper_model", "safety", "helpfulness"]].iloc[1].to_dict()
    {'paper_model': '3B without TCSR (mean)', 'safety': 51.09, 'helpfulness': 65.91}
    """
    import pandas as pd

    match = dict(match or {})
    paper = paper_table("subsets").set_index(["model", "subset"])
    head = paper_table("headline").query("benchmark == 'STEER-Bench'").set_index("model")
    rows = []
    wanted = set(subsets)
    for _, r in ours.iterrows():
        name = str(r[subset]).removeprefix("STEER-")  # the bench's "STEER-Beaver" is the paper's "Beaver"
        if name not in wanted:
            continue
        pm = match.get(r[label], LABEL_ABLATIONS.get(str(r[label])))
        if pm in ABLATIONS:
            pm = f"3B {pm}"  # the ablations are of the 3B model (method.md 4)
        rows.append({"model": r[label], "paper_model": pm, "subset": r[subset], "source": "ours",
                     "safety": r["safety"], "helpfulness": r["helpfulness"], "n": r.get("n")})
        if pm is None:
            continue
        if pm.startswith("3B ") and pm[3:] in ABLATIONS:
            if name != "Avg":
                continue  # the paper reports its ablations as STEER-Bench averages only
            s, h = ABLATIONS[pm[3:]]
            p = {"safety": s, "helpfulness": h}
        elif (pm, name) in paper.index:
            p = paper.loc[(pm, name)]
        elif name == "Avg" and pm in head.index:
            p = head.loc[pm]
        else:
            continue
        rows.append({"model": r[label], "paper_model": pm, "subset": r[subset], "source": "paper",
                     "safety": float(p["safety"]), "helpfulness": float(p["helpfulness"]), "n": None})
    return pd.DataFrame(rows, columns=["model", "paper_model", "subset", "source", "safety", "helpfulness", "n"])
