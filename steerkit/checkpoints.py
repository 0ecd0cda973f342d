"""Trainer checkpoints of Stages II and III, and where a killed run resumes from.

SFT and GRPO save a trainer checkpoint every ``save_steps`` steps into ``<run>/trainer/checkpoint-N``
(`steerkit.layout.TRAINER_DIR`): weights or LoRA adapter, optimizer, scheduler, RNG states and
``trainer_state.json`` with the step. A kill can cut one short; resuming takes the newest complete
one and removes the others.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

from steerkit.layout import TRAINER_STATE

log = logging.getLogger(__name__)


def complete_checkpoint(folder: Path) -> bool:
    """True when a trainer checkpoint ``checkpoint-N`` was written to the end.

    transformers 5.24 writes a checkpoint into its final folder, not atomically (weights, optimizer,
    scheduler, RNG states, then ``trainer_state.json``), so a kill mid-save leaves ``checkpoint-N`` with
    some files and no state, or a state file cut short. Complete: the state parses and is at step N.
    """
    match = re.fullmatch(r"checkpoint-(\d+)", folder.name)
    try:
        state = json.loads((folder / TRAINER_STATE).read_text())
    except (OSError, ValueError):
        return False
    return match is not None and isinstance(state, dict) and state.get("global_step") == int(match[1])


def last_complete_checkpoint(trainer_dir: Path, *, remove_partial: bool = False) -> Path | None:
    """The newest complete trainer checkpoint in ``trainer_dir`` (None when there is none).

    ``transformers.trainer_utils.get_last_checkpoint`` takes the highest-numbered folder, complete or
    not. With ``remove_partial`` the partial folders are deleted: the trainer's rotation orders
    checkpoints by mtime and would count a stale one among the checkpoints it keeps.
    """
    if not trainer_dir.is_dir():
        return None
    folders = [f for f in trainer_dir.iterdir() if f.is_dir() and re.fullmatch(r"checkpoint-\d+", f.name)]
    complete = [f for f in folders if complete_checkpoint(f)]
    if remove_partial:
        for f in set(folders) - set(complete):
            log.warning("%s: removing a checkpoint cut short by a kill (no complete %s)", f, TRAINER_STATE)
            shutil.rmtree(f)
    return max(complete, key=lambda f: int(f.name.split("-")[1]), default=None)


def checkpoint_step(checkpoint: Path | None) -> int:
    """The optimiser steps a trainer checkpoint holds (0 for None)."""
    if checkpoint is None:
        return 0
    return int(json.loads((checkpoint / TRAINER_STATE).read_text())["global_step"])


def resume_point(trainer_dir: Path) -> Path | None:
    """The newest complete checkpoint under ``trainer_dir``; partial ones (cut by a kill) are removed."""
    return last_complete_checkpoint(trainer_dir, remove_partial=True)
