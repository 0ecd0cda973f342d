"""Figure builders and save_figure (HTML + PNG through kaleido/Chromium + sidecar), offline."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
from PIL import Image

from steerkit import frames, metrics, paper_reference, plots

NAN = math.nan


@pytest.fixture
def dialogues():
    return pd.DataFrame({
        "label": ["base"] * 4 + ["SFT"] * 4,
        "subset": ["a", "a", "b", "b"] * 2,
        "n_turns": [3, 4, 3, 5, 3, 4, 3, 5],
        "first_failure": [1, 2, NAN, 3, NAN, NAN, NAN, 4],
        "harmlessness_avg": [1.0, 2.0, 3.0, 2.2, 3.0, 3.0, 2.9, 2.6],
        "helpfulness_avg": [1.0, 2.5, 3.0, 2.0, 3.0, 2.0, 2.5, 3.0],
        "n_unscored": 0,
    })


def test_survival_figure_has_a_band_and_a_line_per_model_and_subset(dialogues):
    fig = plots.survival_figure(metrics.survival_curves(dialogues, horizon=5))
    lines = [t for t in fig.data if t.fill != "toself"]
    bands = [t for t in fig.data if t.fill == "toself"]
    assert len(lines) == len(bands) == 4  # 2 models x 2 subsets
    assert {t.name for t in lines} == {"base", "SFT"}
    assert all(t.y[0] == 1.0 for t in lines)
    assert [a.text for a in fig.layout.annotations] == ["a", "b"]


def test_table_rates_histogram_and_beside_paper(dialogues):
    rates = metrics.multi_turn_rates(dialogues, ci=True, n_resamples=200)
    table = frames.bench_table(rates)
    tf = plots.table_figure(table)
    assert tf.data[0].header.values[0] == "label" and len(tf.data[0].cells.values) == 1 + 6
    bars = plots.rates_figure(rates)
    assert len(bars.data) == 4 and bars.data[0].error_y.array is not None
    hist = plots.failure_histogram(metrics.failure_turns(dialogues, horizon=5))
    base = next(t for t in hist.data if t.name == "base")
    # base fails at turns 1, 2, 3 out of 4 dialogues (both subsets summed): 25% each
    assert list(base.y) == [25.0, 25.0, 25.0, 0.0, 0.0]
    ours = metrics.with_subset_average(rates)
    beside = paper_reference.beside_paper(ours, match={"base": "3B base", "SFT": "3B SFT"})
    fig = plots.beside_paper_figure(beside)
    paper = [t for t in fig.data if t.name == "paper"]
    assert 12.55 in list(paper[0].y) and 41.61 in list(paper[0].y)


def test_save_figure_writes_html_png_and_sidecar(tmp_path, dialogues):
    fig = plots.survival_figure(metrics.survival_curves(dialogues, horizon=5))
    paths = plots.save_figure(fig, "survival", out_dir=tmp_path, sources=["run-a", "run-b"], extra={"horizon": 5})
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(paths["png"]) as img:
        assert img.size == (2000, 900)  # 1000 x 450 at scale 2
    page = paths["html"].read_text()
    assert "plotly.min.js" in page and (tmp_path / "plotly.min.js").is_file()  # opens offline
    side = json.loads(paths["sidecar"].read_text())
    assert side["sources"] == ["run-a", "run-b"] and side["extra"] == {"horizon": 5}
    assert side["files"] == {"html": "survival.html", "png": "survival.png"}
    assert "commit" in side["git"]


def test_save_figure_rejects_bad_names(tmp_path):
    import plotly.graph_objects as go

    with pytest.raises(ValueError, match="figure name"):
        plots.save_figure(go.Figure(), "../evil", out_dir=tmp_path, png=False)
    paths = plots.save_figure(go.Figure(), "html-only", out_dir=tmp_path, png=False)
    assert set(paths) == {"html", "sidecar"}


ARMS = ["GRPO-mean", "GRPO-tcsr", "SFT", "base"]  # alphabetical, as groupby leaves them


@pytest.fixture
def four_arms(dialogues):
    one = dialogues[dialogues.label == "SFT"]
    return pd.concat([one.assign(label=lab) for lab in ARMS], ignore_index=True)


def test_models_come_in_pipeline_order_not_alphabetical(four_arms):
    assert frames.pipeline_order(ARMS) == ["base", "SFT", "GRPO-tcsr", "GRPO-mean"]
    rates = metrics.multi_turn_rates(four_arms)
    assert rates.label.tolist()[:4] != ["base", "SFT", "GRPO-tcsr", "GRPO-mean"]  # the frame is alphabetical
    assert [t.name for t in plots.rates_figure(rates).data[:4]] == ["base", "SFT", "GRPO-tcsr", "GRPO-mean"]
    assert frames.bench_table(rates).index.tolist() == ["base", "SFT", "GRPO-tcsr", "GRPO-mean"]
    hist = plots.failure_histogram(metrics.failure_turns(four_arms, horizon=5))
    assert [t.name for t in hist.data] == ["base", "SFT", "GRPO-tcsr", "GRPO-mean"]
    surv = plots.survival_figure(metrics.survival_curves(four_arms, by=("label",), horizon=5))
    assert [t.name for t in surv.data if t.fill != "toself"] == ["base", "SFT", "GRPO-tcsr", "GRPO-mean"]


def test_coinciding_survival_curves_stay_distinguishable(four_arms):
    # four arms with identical dialogues: identical curves, which must not hide one another
    fig = plots.survival_figure(metrics.survival_curves(four_arms, by=("label",), horizon=5))
    lines = [t for t in fig.data if t.fill != "toself"]
    assert len({tuple(t.y) for t in lines}) == 1  # the same survival values ...
    assert len({t.line.dash for t in lines}) == 4 and len({t.marker.symbol for t in lines}) == 4
    assert len({t.line.color for t in lines}) == 4
    starts = sorted(t.x[0] for t in lines)  # ... drawn side by side, a small offset apart
    assert starts == pytest.approx([-0.09, -0.03, 0.03, 0.09])
    assert [row[0] for row in lines[0].customdata] == list(range(5))  # hover keeps the true turn (0..4)


def test_the_mean_arm_is_set_beside_the_papers_ablation(four_arms):
    ours = metrics.with_subset_average(metrics.multi_turn_rates(four_arms))
    beside = paper_reference.beside_paper(ours, match={"base": "3B base", "GRPO-tcsr": "3B SaFeR-Steer"})
    mean = beside[(beside.model == "GRPO-mean") & (beside.source == "paper")]
    assert mean[["paper_model", "subset", "safety", "helpfulness"]].values.tolist() == [
        ["3B without TCSR (mean)", "Avg", 51.09, 65.91]]
    fig = plots.beside_paper_figure(beside)
    paper = next(t for t in fig.data if t.name == "paper")
    assert list(paper.x) == ["base · Avg", "GRPO-tcsr · Avg", "GRPO-mean · Avg"]
    assert list(paper.y) == [12.55, 55.58, 51.09]
    # an explicit match wins, and an ablation can be named in the notebook parameter
    assert paper_reference.parse_match("GRPO-x: without SFT warm start") == {"GRPO-x": "without SFT warm start"}
