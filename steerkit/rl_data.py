"""STEER-RL records -> GRPO rows: what Stage III reads from a Stage I run directory.

`load_rl_dialogues` reads the STEER-RL file; `rl_rows` turns its records into the prompt rows TRL's
trainer iterates over (the first user turn as the prompt, the later user turns as static candidates the
tutor may replace). The smoke fallback when no Stage I run is named is
`steerkit.smoke_inputs.seed_rl_dialogues`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from steerkit.layout import CAPTIONS_FILE, RL_FILE
from steerkit.schema import Dialogue, Script

RLRecord = Dialogue | Script


def load_rl_dialogues(path: str | Path) -> tuple[list[RLRecord], Path]:
    """STEER-RL records from a JSONL file or a run directory holding ``steer_rl.jsonl``; (records, root).

    A line is a user-only `Script` (it has ``user_turns``) or a `Dialogue` (its user turns are used;
    assistant turns are dropped: the student writes its own).
    """
    from steerkit.schema import load_jsonl

    p = Path(path)
    if p.is_dir():
        if not (p / RL_FILE).is_file():
            found = sorted(x.name for x in p.glob("*.jsonl"))
            raise FileNotFoundError(f"{p}: no {RL_FILE} (found: {', '.join(found) or 'no JSONL files'});"
                                    " name the STEER-RL file itself")
        p = p / RL_FILE
    first = next((line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()), "")
    cls = Script if '"user_turns"' in first else Dialogue
    return list(load_jsonl(cls, p)), p.parent


def _user_turns(record: RLRecord) -> tuple[list[str], list[str]]:
    """(user turns, image refs of the first turn) of a script or dialogue."""
    if isinstance(record, Script):
        return list(record.user_turns), list(record.images)
    users = [m for m in record.messages if m.role == "user"]
    return [m.content for m in users], list(users[0].images or record.images)


def rl_rows(records: Sequence[RLRecord], root: Path, *, vision: bool, system: str | None = None,
            captions: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """GRPO rows: ``prompt`` (system + first user turn), ``images`` (PIL, VLMs only), ``static_turns``,
    ``image_refs`` (absolute paths, for the tutor), ``goal`` and ``id``.

    The system prompt is the student's (``student_system@1``, as in SFT and evaluation) unless given.
    A text-only student gets each image as ``[Image: caption]`` text in place of the picture.
    """
    from steerkit.converse import student_system_prompt
    from steerkit.images import load_image

    sys_text = system if system is not None else student_system_prompt()
    caps = dict(captions or {})
    rows = []
    for r in records:
        users, first_images = _user_turns(r)
        refs = [str((root / ref).resolve()) for ref in first_images]
        row: dict[str, Any] = {"id": r.id, "static_turns": users[1:], "image_refs": refs,
                               "goal": str(r.meta.get("goal", ""))}
        if vision:
            content: list[dict[str, Any]] = [*({"type": "image"} for _ in refs), {"type": "text", "text": users[0]}]
            row["prompt"] = [{"role": "system", "content": [{"type": "text", "text": sys_text}]},
                             {"role": "user", "content": content}]
            row["images"] = [load_image(Path(x)) for x in refs]
        else:
            text = "".join(f"[Image: {caps.get(ref, 'an image')}]\n" for ref in first_images)
            row["prompt"] = [{"role": "system", "content": sys_text}, {"role": "user", "content": text + users[0]}]
        rows.append(row)
    return rows


def load_captions(data_root: Path, records: Sequence[RLRecord]) -> dict[str, str]:
    """Image ref -> caption: ``captions.json`` beside the RL file, then each record's ``meta.captions``."""
    caps: dict[str, str] = {}
    f = data_root / CAPTIONS_FILE
    if f.is_file():
        caps.update(json.loads(f.read_text(encoding="utf-8")))
    for r in records:
        caps.update({k: v for k, v in (r.meta.get("captions") or {}).items() if isinstance(v, str)})
    return caps
