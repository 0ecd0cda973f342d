"""Tracker resolution: the table in steerkit.tracking's docstring, row by row."""

from __future__ import annotations

import pytest

from steerkit.tracking import resolve_report_to


@pytest.mark.parametrize(
    ("asked", "env", "report_to", "wandb_mode"),
    [
        (None, {}, "none", None),
        ("none", {"WANDB_API_KEY": "k"}, "none", None),
        ("NONE", {}, "none", None),
        ("wandb", {"CI": "true"}, "none", "disabled"),  # CI never writes to a tracker
        ("wandb", {"CI": "true", "WANDB_API_KEY": "k"}, "none", "disabled"),
        ("wandb", {"CI": "false"}, "wandb", "offline"),  # CI=false is not CI
        ("wandb", {"WANDB_MODE": "disabled"}, "none", None),
        ("wandb", {"WANDB_MODE": "offline", "WANDB_API_KEY": "k"}, "wandb", "offline"),
        ("wandb", {"WANDB_MODE": "dryrun"}, "wandb", "offline"),
        ("wandb", {"WANDB_API_KEY": "k"}, "wandb", "online"),
        ("wandb", {}, "wandb", "offline"),  # no key: offline instead of "No API key configured"
    ],
)
def test_resolution_table(asked, env, report_to, wandb_mode) -> None:
    t = resolve_report_to(asked, env)
    assert t.report_to == report_to
    assert t.env.get("WANDB_MODE") == wandb_mode
    assert t.reason


def test_unknown_tracker_is_an_error() -> None:
    with pytest.raises(ValueError, match="report_to: 'mlflow' is not one of none, wandb"):
        resolve_report_to("mlflow", {})


def test_apply_sets_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    resolve_report_to("wandb", {}).apply()
    import os

    assert os.environ["WANDB_MODE"] == "offline"


def test_manifest_is_plain_data() -> None:
    m = resolve_report_to("wandb", {"CI": "1"}).manifest()
    assert m == {"report_to": "none", "env": {"WANDB_MODE": "disabled"}, "reason": "wandb disabled in CI"}
