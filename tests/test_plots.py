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


def test_rates_against_the_swept_parameter_with_base_and_sft_levels():
    from steerkit import studies

    rows = [("base", None, 10.0), ("SFT", None, 40.0), ("a=0.1", 0.1, 50.0), ("a=0.5", 0.5, 70.0)]
    table = pd.DataFrame([{"arm": arm, "alpha": alpha, "subset": "all", "metric": m, "label": f"{arm} s{s}",
                           "seed": s, "n": 8, "value": v + 10 * s + (5 if m == "helpfulness" else 0)}
                          for arm, alpha, v in rows for m in ("safety", "helpfulness") for s in (0, 1)])
    by_arm = studies.over_seeds(table)
    x, colour = studies.plot_axes({"alpha": [0.1, 0.5], "seed": [0, 1]})
    fig = plots.rates_vs_param_figure(by_arm, x=x, color=colour, note="judge: not calibrated")
    assert len(fig.data) == 2  # one line a panel: the swept arms only, base and SFT drawn as levels
    safety = next(t for t in fig.data if t.xaxis == "x")
    assert list(safety.x) == [0.1, 0.5] and list(safety.y) == [55.0, 75.0]  # means over the two seeds
    # t(0.975, 1) x 10 / 2 = 63.53 either side, cut to the rates' range 0..100
    assert list(safety.error_y.array) == pytest.approx([45.0, 25.0])
    assert list(safety.error_y.arrayminus) == pytest.approx([55.0, 63.53], abs=0.01)
    levels = sorted((s.y0, s.line.dash) for s in fig.layout.shapes)
    assert levels == [(15.0, "dot"), (20.0, "dot"), (45.0, "dash"), (50.0, "dash")]
    texts = [a.text for a in fig.layout.annotations]
    assert {"safety", "helpfulness", "base", "SFT"} <= set(texts) and "judge: not calibrated" in texts
    with pytest.raises(ValueError, match="x_axis 'beta' is not a grid axis"):
        studies.plot_axes({"alpha": [0.1]}, "beta")


def test_paired_differences_one_point_per_arm_and_seed():
    base = {"subset": "all", "arm_a": "tcsr", "p_value": 0.5}
    paired = pd.DataFrame([
        {**base, "metric": "safety", "arm_b": "mean", "seed": 0.0, "diff": -4.0, "diff_lo": -9.0, "diff_hi": 1.0},
        {**base, "metric": "safety", "arm_b": "mean", "seed": 1.0, "diff": 2.0, "diff_lo": -3.0, "diff_hi": 6.0},
        {**base, "metric": "helpfulness", "arm_b": "SFT", "seed": NAN, "diff": 1.0, "diff_lo": 0.0, "diff_hi": 3.0},
        {**base, "metric": "survival", "arm_b": "mean", "seed": 0.0, "diff": NAN, "diff_lo": NAN, "diff_hi": NAN},
        {**base, "metric": "safety", "subset": "a", "arm_b": "mean", "seed": 0.0, "diff": 9.0, "diff_lo": 8.0,
         "diff_hi": 10.0},
    ])
    fig = plots.paired_differences_figure(paired, reference="tcsr")
    points = {(t.name, t.xaxis): (list(t.x), list(t.error_x.array), list(t.error_x.arrayminus)) for t in fig.data}
    assert points == {("seed 0", "x"): ([-4.0], [5.0], [5.0]), ("seed 1", "x"): ([2.0], [4.0], [5.0]),
                      ("no seed axis", "x2"): ([1.0], [2.0], [1.0])}
    assert [s.x0 for s in fig.layout.shapes] == [0, 0] and "tcsr" in fig.layout.title.text


def test_training_stage_figures():
    from steerkit import training_figures as tf
    from steerkit.schema import Dialogue

    def dialogue(i, kind, turns):
        msgs = [m for t in range(turns) for m in ({"role": "user", "content": f"q{t}"},
                                                  {"role": "assistant", "content": f"a{t}"})]
        return Dialogue(id=f"d{i}", messages=msgs, kind=kind)

    fig = tf.turn_lengths_figure({"SFT": [dialogue(0, "benign", 2), dialogue(1, "obfuscated", 3)],
                                  "RL": [dialogue(2, "obfuscated", 3)]})
    assert sorted((t.name, t.xaxis, tuple(t.x)) for t in fig.data) == [
        ("benign", "x", (2,)), ("obfuscated", "x", (3,)), ("obfuscated", "x2", (3,))]

    fig = tf.loss_figure([{"step": 1, "loss": 2.0}, {"step": 2, "learning_rate": 1e-3}, {"step": 3, "loss": 1.5}])
    assert list(fig.data[0].x) == [1, 3] and list(fig.data[0].y) == [2.0, 1.5]

    curves = pd.DataFrame({"run": ["tcsr"] * 3, "step": [0, 0, 1], "metric": ["mean_tcsr", "unscored", "mean_tcsr"],
                           "value": [1.0, 0.0, 1.5]})
    assert [t.name for t in tf.reward_curves_figure(curves).data] == ["mean_tcsr"]

    turns = pd.DataFrame({"run": ["tcsr"] * 6, "step": [0, 0, 1, 1, 1, 1], "row": [0, 0, 0, 0, 1, 1],
                          "turn": [1, 2, 1, 2, 1, 2], "safety": [9, 9, 10, 2, 8, NAN],
                          "attack_strategy": ["", "deepen", "", "persistence", "", "praise"],
                          "user_turn": "u", "answer": "a"})
    heat = tf.turn_safety_heatmap(turns).data[0]  # the last step only: rows 0 and 1 of step 1
    assert list(heat.y) == ["tcsr #0", "tcsr #1"] and list(heat.x) == ["turn 1", "turn 2"]
    assert heat.z[0].tolist() == [10, 2] and heat.z[1][0] == 8 and math.isnan(heat.z[1][1])
    picked = tf.attacked_turns(turns, 1)  # every turn of the first attacked trajectory
    assert picked[["step", "row", "turn"]].values.tolist() == [[0, 0, 1], [0, 0, 2]]
