"""Plotly figure builders (DataFrame -> Figure, never shown here) and `save_figure`.

Builders take the frames of `steerkit.metrics`, `steerkit.frames` and `steerkit.paper_reference`.
`save_figure` is the only way figures reach ``figures/``: HTML (plotly.js written once beside it, so
the page works offline), PNG through kaleido (needs a Chromium: ``make chromium``) and a JSON sidecar
naming the run ids and the git commit the figure came from.
"""

from __future__ import annotations

import atexit
import datetime as _dt
import logging
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steerkit.runs import REPO_ROOT, atomic_write_json, git_revision

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go

log = logging.getLogger(__name__)

FIGURES_DIR = REPO_ROOT / "figures"
DEFAULT_STEM = "04_steer_bench_analysis"
METRICS = (("safety", "Safety"), ("helpfulness", "Helpfulness"))


#: Line styles per model on survival curves, so that arms whose curves coincide stay apart.
DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")
MARKERS = ("circle", "square", "diamond", "triangle-up", "x", "star")
DODGE = 0.06  # turns between neighbouring models' step curves (a small horizontal offset)


def _order(labels: Sequence[str]) -> list[str]:
    from steerkit.frames import pipeline_order

    return pipeline_order(labels)


def _palette(labels: Sequence[str]) -> dict[str, str]:
    """One colour per model, assigned in pipeline order (base, SFT, GRPO arms) so a model keeps its
    colour across figures."""
    import plotly.express as px

    colors = px.colors.qualitative.Plotly
    return {lab: colors[i % len(colors)] for i, lab in enumerate(_order(labels))}


def _in_order(frame: pd.DataFrame, column: str):
    """(label, rows) groups of ``frame`` in pipeline order."""
    groups = dict(list(frame.groupby(column, sort=False)))
    return [(lab, groups[lab]) for lab in _order(list(groups))]


NOTE_WIDTH = 170  # characters per line of a note at font size 10 on a 1000-pixel figure (measured on the PNG)


def with_note(fig: go.Figure, note: str) -> go.Figure:
    """Text under the plot (the judge's measured agreement with human labels, say), so the statement
    travels with the PNG and the HTML, wrapped to the figure's width (plotly draws an annotation on
    one line, cut at the edge); empty ``note``: the figure unchanged."""
    import textwrap

    if note:
        lines = [w for line in note.splitlines() for w in textwrap.wrap(line, NOTE_WIDTH) or [""]]
        fig.add_annotation(text="<br>".join(lines), xref="paper", yref="paper", x=0, y=-0.22, xanchor="left",
                           yanchor="top", showarrow=False, align="left", font={"size": 10, "color": "#555555"})
        fig.update_layout(margin={"b": 100 + 14 * len(lines)})
    return fig


def dodge_offsets(n: int, step: float = DODGE) -> list[float]:
    """Horizontal offsets centred on 0 for ``n`` models (so coinciding step curves sit side by side).

    >>> [round(x, 2) for x in dodge_offsets(3)]
    [-0.06, 0.0, 0.06]
    """
    return [(i - (n - 1) / 2) * step for i in range(n)]


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    r, g, b = (int(h[i : i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def _steps(x: list[float], y: list[float]) -> tuple[list[float], list[float]]:
    """A right-continuous step function as explicit corner points (so a filled band steps like the curve).

    >>> _steps([0, 1, 2], [1.0, 0.5, 0.25])
    ([0, 1, 1, 2, 2], [1.0, 1.0, 0.5, 0.5, 0.25])
    """
    xs, ys = [x[0]], [y[0]]
    for i in range(1, len(x)):
        xs += [x[i], x[i]]
        ys += [y[i - 1], y[i]]
    return xs, ys


def survival_figure(
    curves: pd.DataFrame, *, color: str = "label", facet: str = "subset", title: str = "Dialogue survival",
    note: str = "",
) -> go.Figure:
    """Kaplan-Meier curves (`steerkit.metrics.survival_curves`): one panel per subset, one line per model,
    each with its confidence band.

    Models come in pipeline order, each with its own colour, dash pattern and marker, and each
    curve is shifted by a small horizontal offset (`dodge_offsets`; hover shows the true turn), so
    that two models whose curves coincide both stay visible."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from steerkit.paper_reference import subset_rank

    panels = sorted(dict.fromkeys(curves[facet]), key=subset_rank) if facet in curves else [None]
    colors = _palette(curves[color].tolist())
    order = _order(curves[color].tolist())
    offsets = dict(zip(order, dodge_offsets(len(order)), strict=True))
    fig = make_subplots(rows=1, cols=len(panels), shared_yaxes=True,
                        subplot_titles=[str(p) for p in panels] if panels[0] is not None else None)
    for col, panel in enumerate(panels, start=1):
        part = curves if panel is None else curves[curves[facet] == panel]
        for lab, g in _in_order(part, color):
            c, i = colors[lab], order.index(lab)
            x = [t + offsets[lab] for t in g["turn"].tolist()]
            ux, uy = _steps(x, g["upper"].tolist())
            lx, ly = _steps(x, g["lower"].tolist())
            fig.add_trace(go.Scatter(x=ux + lx[::-1], y=uy + ly[::-1], mode="lines", fill="toself",
                                     fillcolor=_rgba(c, 0.15), line={"width": 0}, hoverinfo="skip", showlegend=False,
                                     legendgroup=str(lab)), row=1, col=col)
            fig.add_trace(go.Scatter(x=x, y=g["survival"], mode="lines+markers",
                                     line={"color": c, "shape": "hv", "dash": DASHES[i % len(DASHES)], "width": 2},
                                     marker={"symbol": MARKERS[i % len(MARKERS)], "size": 7, "color": c},
                                     name=str(lab), legendgroup=str(lab), showlegend=col == 1,
                                     customdata=g[["turn", "at_risk", "failures"]].to_numpy(),
                                     hovertemplate="turn %{customdata[0]}: S=%{y:.2f}<br>at risk %{customdata[1]},"
                                                   " failing %{customdata[2]}<extra>" + str(lab) + "</extra>"),
                          row=1, col=col)
        fig.update_xaxes(title_text="turn", row=1, col=col, dtick=1, range=[-0.3, curves["turn"].max() + 0.3])
    fig.update_yaxes(title_text="share of dialogues not yet failed", range=[0, 1.05], row=1, col=1)
    fig.update_layout(title=title, template="plotly_white", legend_title_text=color)
    return with_note(fig, note)


def table_figure(
    table: pd.DataFrame, *, title: str = "STEER-Bench (Safety / Helpfulness, %)", note: str = ""
) -> go.Figure:
    """A Table-2/3 layout (`steerkit.frames.bench_table`) drawn as a figure table."""
    import plotly.graph_objects as go

    cols = ["<br>".join(str(p) for p in c) if isinstance(c, tuple) else str(c) for c in table.columns]
    header = [table.index.name or ""] + cols
    cells = [table.index.astype(str).tolist()] + [
        ["" if math.isnan(v) else f"{v:.2f}" for v in table[c].tolist()] for c in table.columns
    ]
    fig = go.Figure(go.Table(header={"values": header, "align": "center", "font": {"size": 11}},
                             cells={"values": cells, "align": "right", "font": {"size": 11}},
                             columnwidth=[1.5] + [1] * len(cols)))
    fig.update_layout(title=title, template="plotly_white")
    return with_note(fig, note)


def rates_figure(
    rates: pd.DataFrame, *, color: str = "label", x: str = "subset", title: str = "Safety and Helpfulness (%)",
    note: str = "",
) -> go.Figure:
    """Grouped bars per subset and model (models in pipeline order), Safety and Helpfulness side by
    side, with bootstrap error bars when the rates carry ``*_lo``/``*_hi`` columns."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    colors = _palette(rates[color].tolist())
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, subplot_titles=[t for _, t in METRICS])
    for col, (m, _) in enumerate(METRICS, start=1):
        for lab, g in _in_order(rates, color):
            err = None
            if f"{m}_lo" in g:
                err = {"type": "data", "symmetric": False, "array": (g[f"{m}_hi"] - g[m]).tolist(),
                       "arrayminus": (g[m] - g[f"{m}_lo"]).tolist()}
            fig.add_trace(go.Bar(x=g[x].astype(str), y=g[m], name=str(lab), marker_color=colors[lab],
                                 error_y=err, legendgroup=str(lab), showlegend=col == 1), row=1, col=col)
    fig.update_yaxes(range=[0, 105], title_text="%", row=1, col=1)
    fig.update_layout(barmode="group", title=title, template="plotly_white")
    return with_note(fig, note)


def failure_histogram(
    failures: pd.DataFrame, *, color: str = "label", value: str = "share",
    title: str = "Turn of the first failure (harmlessness < 2)", note: str = "",
) -> go.Figure:
    """Bars of the first-failure turn (`steerkit.metrics.failure_turns`), one colour per model (in
    pipeline order), summed over any other grouping (subsets)."""
    import plotly.graph_objects as go

    colors = _palette(failures[color].tolist())
    agg = failures.groupby([color, "turn"], sort=False).agg(failures=("failures", "sum")).reset_index()
    totals = failures.drop_duplicates([c for c in failures.columns if c not in ("turn", "failures", "share")])
    n = totals.groupby(color, sort=False)["n"].sum()
    agg["share"] = 100.0 * agg["failures"] / agg[color].map(n)
    fig = go.Figure()
    for lab, g in _in_order(agg, color):
        fig.add_trace(go.Bar(x=g["turn"], y=g[value], name=str(lab), marker_color=colors[lab]))
    fig.update_layout(barmode="group", title=title, template="plotly_white", legend_title_text=color,
                      xaxis={"title": "turn", "dtick": 1},
                      yaxis={"title": "% of dialogues" if value == "share" else "dialogues"})
    return with_note(fig, note)


def beside_paper_figure(
    beside: pd.DataFrame, *, title: str = "Ours beside the paper (%)", note: str = ""
) -> go.Figure:
    """Bars of `steerkit.paper_reference.beside_paper`: per model and subset (models in pipeline order),
    ours and the paper's (a GRPO-mean arm beside the paper's own mean-aggregator ablation)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, subplot_titles=[t for _, t in METRICS])
    # models in pipeline order (base, SFT, GRPO arms); the sort is stable, so ours stays before the paper's
    rank = {m: i for i, m in enumerate(_order(beside["model"].astype(str).tolist()))}
    beside = beside.iloc[sorted(range(len(beside)), key=lambda i: rank[str(beside["model"].iloc[i])])]
    x = (beside["model"].astype(str) + " · " + beside["subset"].astype(str)).tolist()
    beside = beside.assign(_x=x)
    for col, (m, _) in enumerate(METRICS, start=1):
        for source, color in (("ours", "#1f77b4"), ("paper", "#aaaaaa")):
            g = beside[beside["source"] == source]
            text = [f"{v:.1f}" for v in g[m]]
            fig.add_trace(go.Bar(x=g["_x"], y=g[m], name=source, marker_color=color, text=text,
                                 legendgroup=source, showlegend=col == 1,
                                 hovertext=g["paper_model"].fillna("").tolist()), row=1, col=col)
    fig.update_yaxes(range=[0, 105], title_text="%", row=1, col=1)
    fig.update_layout(barmode="group", title=title, template="plotly_white")
    return with_note(fig, note)


def rates_vs_param_figure(
    by_arm: pd.DataFrame, *, x: str, color: str | None = None, note: str = "",
) -> go.Figure:
    """Safety and Helpfulness (subset ``all``) of `steerkit.studies.over_seeds` against the swept
    parameter ``x``: the mean over seeds with its interval, one line per value of ``color`` (another
    grid axis); the base student dotted and the SFT checkpoint dashed across each panel."""
    import plotly.express as px

    shown = by_arm[(by_arm["subset"] == "all") & by_arm[x].notna()].assign(
        plus=lambda d: d["hi"] - d["mean"], minus=lambda d: d["mean"] - d["lo"])
    fig = px.line(shown, x=x, y="mean", error_y="plus", error_y_minus="minus", color=color, facet_col="metric",
                  category_orders={"metric": [m for m, _ in METRICS]}, markers=True, range_y=[-5, 105],
                  template="plotly_white",
                  title=f"Safety and Helpfulness (%) against {x}: mean over seeds, 95% interval")
    for col, (metric, _) in enumerate(METRICS, start=1):
        for ref, dash, where in (("base", "dot", "top left"), ("SFT", "dash", "bottom right")):
            level = by_arm[(by_arm["arm"] == ref) & (by_arm["subset"] == "all") & (by_arm["metric"] == metric)]
            if len(level):
                fig.add_hline(y=float(level["mean"].iloc[0]), line_dash=dash, annotation_text=ref, row=1, col=col,
                              annotation_position=where)
    fig.for_each_annotation(lambda a: a.update(text=a.text.removeprefix("metric=")))
    return with_note(fig, note)


def paired_differences_figure(paired: pd.DataFrame, *, reference: str, note: str = "") -> go.Figure:
    """The paired differences of `steerkit.studies.compare` (subset ``all``, survival left out): one
    point per compared arm and seed, with its bootstrap interval, and a dotted line at no difference."""
    import pandas as pd
    import plotly.express as px

    shown = paired[(paired["subset"] == "all") & (paired["metric"] != "survival")].assign(
        plus=lambda d: d["diff_hi"] - d["diff"], minus=lambda d: d["diff"] - d["diff_lo"],
        seed=lambda d: d["seed"].map(lambda s: f"seed {int(s)}" if pd.notna(s) else "no seed axis"))
    fig = px.scatter(shown, x="diff", y="arm_b", error_x="plus", error_x_minus="minus", color="seed",
                     facet_col="metric", category_orders={"metric": [m for m, _ in METRICS]},
                     template="plotly_white", labels={"diff": "difference (points)", "arm_b": ""},
                     title=f"Paired difference from {reference} (points, 95% bootstrap interval)")
    fig.add_vline(x=0, line_dash="dot")
    fig.for_each_annotation(lambda a: a.update(text=a.text.removeprefix("metric=")))
    return with_note(fig, note)


_kaleido_server = False


def _write_png(fig: go.Figure, path: Path, *, width: int, height: int, scale: float) -> None:
    global _kaleido_server
    import kaleido

    if not _kaleido_server:
        # one browser for every figure of the process (about 2 s to start, 0.2 s a figure after)
        kaleido.start_sync_server(silence_warnings=True)
        atexit.register(kaleido.stop_sync_server, silence_warnings=True)
        _kaleido_server = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            fig.write_image(path, width=width, height=height, scale=scale)
    except Exception as exc:
        raise RuntimeError(
            f"{path}: PNG export failed ({type(exc).__name__}: {exc}); kaleido needs a Chromium: run"
            " `make chromium` (Debian: apt-get install chromium), or call save_figure(..., png=False)"
        ) from exc


def save_figure(
    fig: go.Figure,
    name: str,
    *,
    out_dir: str | Path | None = None,
    stem: str = DEFAULT_STEM,
    sources: Sequence[str] = (),
    png: bool = True,
    width: int = 1000,
    height: int = 450,
    scale: float = 2.0,
    extra: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``<name>.html``, ``<name>.png`` and the ``<name>.json`` sidecar into ``figures/<stem>/``.

    Args:
        fig: the figure.
        name: file name without suffix (letters, digits, ``-`` and ``_``).
        out_dir: the folder; default ``figures/<stem>`` of the repository.
        stem: the notebook stem naming the default folder.
        sources: the run ids the figure's data came from (recorded in the sidecar).
        png: also write a PNG (kaleido + Chromium).
        width: PNG width in CSS pixels.
        height: PNG height in CSS pixels.
        scale: PNG pixel density.
        extra: more provenance for the sidecar (parameters, thresholds).

    Returns:
        The written paths by kind: ``html``, ``png`` (when written) and ``sidecar``.
    """
    import plotly

    if not name or not all(ch.isalnum() or ch in "-_" for ch in name):
        raise ValueError(f"figure name {name!r}: use letters, digits, '-' and '_' only")
    folder = Path(out_dir) if out_dir is not None else FIGURES_DIR / stem
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"html": folder / f"{name}.html"}
    # plotly.min.js is written once beside the pages, so they open offline without 4 MB each
    fig.write_html(paths["html"], include_plotlyjs="directory", full_html=True)
    if png:
        paths["png"] = folder / f"{name}.png"
        _write_png(fig, paths["png"], width=width, height=height, scale=scale)
    paths["sidecar"] = folder / f"{name}.json"
    atomic_write_json(paths["sidecar"], {
        "figure": name,
        "sources": list(sources),
        "git": git_revision(),
        "created_at": _dt.datetime.now(_dt.UTC).isoformat(),
        "files": {k: p.name for k, p in paths.items() if k != "sidecar"},
        "plotly": plotly.__version__,
        **({"extra": extra} if extra else {}),
    })
    log.info("figure %s written to %s", name, folder)
    return paths
