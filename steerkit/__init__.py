"""steerkit: a workbench for multi-turn safety alignment of vision-language chat models.

It implements SaFeR-Steer (Stage I synthesis, Stage II SFT, Stage III tutor-in-the-loop GRPO with
TCSR, and multi-turn evaluation; docs/method.md). The names below are the public API, what notebooks
and scripts import (``from steerkit import open_run, Roles, run_grpo``). Each is resolved on first
use, and heavy libraries are imported inside the functions that need them, so ``import steerkit``
is instant.
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing would double the import time
if TYPE_CHECKING:
    from typing import Any

__version__ = "0.1.0"

#: Public name -> the module (below ``steerkit``) that defines it, grouped by layer. No name may
#: be a submodule's: importing the submodule would replace the package attribute with the module.
_API: dict[str, str] = {
    # records and the run-directory contract
    "Dialogue": "schema", "Message": "schema", "Verdict": "schema", "Seed": "schema",
    "Script": "schema", "BenchItem": "schema", "load_jsonl": "schema", "write_jsonl": "schema",
    "Run": "runs", "open_run": "runs", "MAX_TURNS": "layout",
    # roles and their clients
    "Roles": "roles", "ChatClient": "clients", "Sampling": "clients",
    # the method
    "turn_reward": "rewards", "tcsr": "rewards", "tcsr_paper": "rewards", "aggregate": "rewards",
    "parse_verdict": "verdicts", "judge_dialogues": "judge", "survival_curves": "metrics",
    # the stages
    "SynthParams": "synth.synthesize", "synthesize": "synth.synthesize",
    "SFTRecipe": "sft", "run_sft": "sft",
    "GRPORunConfig": "grpo", "run_grpo": "grpo",
    "load_bench": "evaluate",  # evaluate() itself: `steerkit.evaluate.evaluate` (a module's name)
    # reading runs back and showing them
    "grpo_frames": "frames", "evaluations": "frames", "steer_table": "frames",
    "dialogue_html": "render", "save_figure": "plots", "Inspector": "inspector",
}

__all__ = ["__version__", *_API]  # noqa: PLE0604 (one table; tests/test_api.py resolves each)


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'steerkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"steerkit.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
