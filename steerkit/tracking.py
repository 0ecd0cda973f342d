"""Where training metrics are reported: the ``report_to`` value a trainer gets, and why.

Experiment trackers fail in ways that stop a run for nothing: wandb without an API key stops at once
("No API key configured"), and CI machines must never write to a tracker. So the choice is resolved
once, from what was asked and the environment, and the reason is recorded in the run manifest:

===========================  =====================================  ==========================
asked                        environment                            result
===========================  =====================================  ==========================
``None`` / ``"none"``        anything                               ``none``
``"wandb"``                  ``CI`` set                             ``none`` (disabled in CI)
``"wandb"``                  ``WANDB_MODE=disabled``                ``none``
``"wandb"``                  ``WANDB_MODE=offline``                 ``wandb``, offline
``"wandb"``                  ``WANDB_API_KEY`` set                  ``wandb``, online
``"wandb"``                  no key                                 ``wandb``, offline
===========================  =====================================  ==========================

wandb's offline mode writes a local run folder (``wandb sync`` uploads it later). `wandb_run` opens
the wandb run of a run directory (GRPO, evaluation) inside it, under an id derived from it, so a
resumed run continues the same wandb run.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Trackers the workbench knows how to resolve; others are an error rather than a silent no-op.
TRACKERS = ("none", "wandb")


@dataclass(frozen=True)
class Tracking:
    """A resolved tracker choice.

    Attributes:
        report_to: the value for ``transformers.TrainingArguments.report_to``.
        env: environment variables to set before the trainer starts (``WANDB_MODE``).
        reason: why this was chosen, for the run manifest.
    """

    report_to: str
    env: dict[str, str] = field(default_factory=dict)
    reason: str = ""

    def apply(self) -> None:
        """Set ``env`` in this process (the trainer's integrations read it at start)."""
        os.environ.update(self.env)

    def manifest(self) -> dict[str, object]:
        return {"report_to": self.report_to, "env": dict(self.env), "reason": self.reason}


def in_ci(env: Mapping[str, str]) -> bool:
    """True on a CI machine (``CI`` set to anything but empty/false/0).

    Example:
        >>> in_ci({"CI": "true"}), in_ci({"CI": "0"}), in_ci({})
        (True, False, False)
    """
    return env.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def resolve_report_to(asked: str | None, env: Mapping[str, str] | None = None) -> Tracking:
    """Resolve the tracker to use (the table in the module docstring).

    Args:
        asked: ``None``, ``"none"`` or ``"wandb"``.
        env: the environment to read (``os.environ`` when omitted).

    Raises:
        ValueError: for a tracker outside `TRACKERS`.

    Example:
        >>> resolve_report_to("wandb", {}).env
        {'WANDB_MODE': 'offline'}
        >>> resolve_report_to("wandb", {"CI": "1"}).report_to
        'none'
    """
    env = os.environ if env is None else env
    name = (asked or "none").strip().lower()
    if name not in TRACKERS:
        raise ValueError(f"report_to: {asked!r} is not one of {', '.join(TRACKERS)}")
    if name == "none":
        return Tracking("none", reason="no tracker asked for")
    if in_ci(env):
        return Tracking("none", {"WANDB_MODE": "disabled"}, reason="wandb disabled in CI")
    mode = env.get("WANDB_MODE", "").strip().lower()
    if mode == "disabled":
        return Tracking("none", reason="WANDB_MODE=disabled")
    if mode in ("offline", "dryrun"):
        return Tracking("wandb", {"WANDB_MODE": "offline"}, reason=f"WANDB_MODE={mode}")
    if env.get("WANDB_API_KEY"):
        return Tracking("wandb", {"WANDB_MODE": mode or "online"}, reason="WANDB_API_KEY set")
    return Tracking("wandb", {"WANDB_MODE": "offline"}, reason="no WANDB_API_KEY: logging offline")


def wandb_run_id(run_dir: Path) -> str:
    """A wandb run id for a run directory: its name, made safe, and a hash of its full path."""
    digest = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9_-]', '-', run_dir.name)[:48]}-{digest}"


@contextlib.contextmanager
def wandb_run(report_to: str, run_dir: Path, *, config: dict[str, Any], group: str) -> Iterator[Any]:
    """The wandb run to report into (None when ``report_to`` is not "wandb"), finished on exit.

    ``report_to`` is a resolved choice (`Tracking.report_to`). Files go to ``<run_dir>/wandb/``;
    ``WANDB_PROJECT`` names the project ("steerkit" by default). A trainer's wandb callback reports
    into this run when it is open.
    """
    if report_to != "wandb":
        yield None
        return
    import wandb

    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "steerkit"), dir=str(run_dir), name=run_dir.name,
                     id=wandb_run_id(run_dir), resume="allow", group=group, config=config)
    try:
        yield run
    finally:
        run.finish()
