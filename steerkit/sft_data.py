"""Stage II's data: STEER-SFT dialogues read and checked, turned into TRL rows.

- `read_dialogues`, `load_captions`, `sft_rows`: the dialogues of a STEER-SFT file (every one ending
  with the assistant's turn), the captions a text-only student reads in place of images (the recipe's
  file, ``captions.json`` beside the data, or the record's ``meta.captions``), and TRL conversational
  rows under the student's system prompt;
- `turns_past_max_length`: the assistant turns the trainer would cut off unseen;
- `first_turn_requests` and `answers`: the student's first-turn answers, to compare before and after
  training (notebook 02).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from steerkit.layout import CAPTIONS_FILE, RL_FILE, SFT_FILE
from steerkit.schema import Dialogue, Message, RecordError, parse_line


def sft_data_file(data: str | Path) -> Path:
    """The STEER-SFT JSONL a recipe's ``data`` names (a file, or a Stage I run directory)."""
    path = Path(data)
    if path.is_dir():
        path = path / SFT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no STEER-SFT file (give a JSONL file or a Stage I run dir with {SFT_FILE})")
    return path


def read_dialogues(path: Path, limit: int | None = None) -> list[tuple[int, Dialogue]]:
    """(line number, dialogue) for each record; every dialogue must end with the assistant's turn."""
    out: list[tuple[int, Dialogue]] = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if limit is not None and len(out) >= limit:
                break
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise RecordError(f"{path}:{lineno}: not UTF-8") from None
            if not line.strip():
                continue
            d = parse_line(Dialogue, line, path=path, lineno=lineno)
            if d.messages[-1].role != "assistant":
                raise RecordError(f"{path}:{lineno}: field messages: the last message must be the assistant's")
            out.append((lineno, d))
    if not out:
        raise RecordError(f"{path}: no dialogues")
    return out


def load_captions(recipe_captions: str | None, data_file: Path) -> tuple[dict[str, str], str]:
    """Image ref -> caption, and where they came from (see the module docstring)."""
    path = Path(recipe_captions) if recipe_captions else data_file.parent / CAPTIONS_FILE
    if not path.is_file():
        if recipe_captions:
            raise FileNotFoundError(f"{path}: captions file not found")
        return {}, "record meta.captions"
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise RecordError(f"{path}: expected a JSON object of image ref -> caption text")
    return data, str(path)


def captioned(m: Message, captions: dict[str, str], *, where: str, index: int) -> str:
    """A message's text with each image as ``[Image: caption]`` before it, for text-only students.

    Example:
        >>> captioned(Message(role="user", content="Hi", images=["a.png"]), {"a.png": "a cat"},
        ...           where="f:1", index=1)
        '[Image: a cat]\\nHi'
    """
    lines = []
    for i, ref in enumerate(m.images):
        if ref not in captions:
            raise RecordError(
                f"{where}: field messages[{index}].images[{i}]: no caption for image {ref!r} (add it to the "
                f"recipe's captions file, {CAPTIONS_FILE} beside the data, or the record's meta.captions)"
            )
        lines.append(f"[Image: {captions[ref]}]")
    return "\n".join([*lines, m.content])


def with_system(d: Dialogue, system: str | None) -> list[Message]:
    """The dialogue's messages with ``system`` as the first message (replacing one), or as they are."""
    if system is None:
        return list(d.messages)
    body = [m for m in d.messages if m.role != "system"]
    return [Message(role="system", content=system), *body]


def sft_rows(
    dialogues: list[tuple[int, Dialogue]], path: Path, *, vision: bool, system: str | None,
    captions: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """TRL conversational rows: ``messages`` + ``images`` (absolute paths) for a vision student;
    ``messages`` with captions in the text for a text-only one."""
    from steerkit.images import load_image
    from steerkit.schema import to_trl_sft_row

    rows = []
    for lineno, d in dialogues:
        d = d.model_copy(update={"messages": with_system(d, system)})
        if vision:
            row = to_trl_sft_row(d, root=path.parent)
            for img in row["images"]:
                load_image(img)  # a corrupt or oversized image fails here, named, not mid-run
            rows.append({"messages": row["messages"], "images": row["images"]})
        else:
            caps = {**d.meta.get("captions", {}), **(captions or {})}
            rows.append({"messages": [
                {"role": m.role, "content": captioned(m, caps, where=f"{path}:{lineno}", index=j)}
                for j, m in enumerate(d.messages)
            ]})
    return rows


def _template_length(processing_class: Any, messages: list[dict[str, Any]], images: list[Any], *, vision: bool) -> int:
    """Tokens of ``messages`` as the trainer sees them (a VLM's image placeholders expanded)."""
    if vision:
        text = processing_class.apply_chat_template(messages, tokenize=False)
        return int(processing_class(text=[text], images=images or None, return_tensors="pt")["input_ids"].shape[1])
    ids = processing_class.apply_chat_template(messages, tokenize=True)
    return len(ids["input_ids"] if hasattr(ids, "keys") else ids)


def turns_past_max_length(rows: list[dict[str, Any]], processing_class: Any, max_length: int | None,
                          *, vision: bool) -> dict[str, int]:
    """How many assistant turns end beyond ``max_length`` tokens, which the trainer cuts off unseen.

    TRL keeps the first ``max_length`` tokens of a row, so in a multi-turn dialogue the last turns
    (where an escalating request is finally refused) are the ones lost. A row that fits whole costs one
    tokenisation; only a row over the limit is measured turn by turn.
    """
    from steerkit.images import load_image

    cut = {"assistant_turns": 0, "assistant_turns_cut": 0, "dialogues_cut": 0}
    for row in rows:
        messages = row["messages"]
        images = [load_image(p) for p in row.get("images", [])] if vision else []
        ends = [k + 1 for k, m in enumerate(messages) if m["role"] == "assistant"]
        cut["assistant_turns"] += len(ends)
        if max_length is None or _template_length(processing_class, messages, images, vision=vision) <= max_length:
            continue
        lost = 0
        for end in ends:
            shown = sum(1 for m in messages[:end] if isinstance(m["content"], list)
                        for part in m["content"] if part.get("type") == "image")
            if _template_length(processing_class, messages[:end], images[:shown], vision=vision) > max_length:
                lost += 1
        cut["assistant_turns_cut"] += lost
        cut["dialogues_cut"] += lost > 0
    return cut


def to_dataset(rows: list[dict[str, Any]], *, vision: bool):  # -> datasets.Dataset
    import datasets

    ds = datasets.Dataset.from_list(rows)
    if vision:
        ds = ds.cast_column("images", datasets.List(datasets.Image()))
    return ds


def data_summary(dialogues: list[tuple[int, Dialogue]]) -> dict[str, Any]:
    turns = [sum(m.role == "assistant" for m in d.messages) for _, d in dialogues]
    return {
        "dialogues": len(dialogues),
        "assistant_turns": sum(turns),
        "mean_turns": round(sum(turns) / len(turns), 3),
        "images": sum(len(m.images) for _, d in dialogues for m in d.messages),
    }


# ---- answers before and after ---------------------------------------------------------------------


def first_turn_requests(data: str | Path, *, n: int | None = None, max_tokens: int = 64, split: str = RL_FILE):
    """The student's view of the first user turn of each dialogue in a split (default the RL split,
    held out from SFT): evaluation system prompt, the turn, its images and their captions."""
    from steerkit.clients import Request, Sampling
    from steerkit.converse import student_system_prompt

    path = Path(data) / split if Path(data).is_dir() else Path(data)
    captions, _ = load_captions(None, path)
    system = Message(role="system", content=student_system_prompt())
    out = []
    for _, d in read_dialogues(path, n):
        first = next(m for m in d.messages if m.role == "user")
        out.append(Request([system, first], sampling=Sampling(max_tokens=max_tokens), root=path.parent,
                           captions={**d.meta.get("captions", {}), **captions}))
    return out


def answers(model: str | Path, requests: list) -> list[str]:
    """Greedy answers of a checkpoint (or ``"smollm2"``) to ``requests``, in one batched backend (on CPU
    from a bf16 copy of the weights: 1.5-2x faster, same text, STACK)."""
    import torch

    from steerkit.backends.hf_local import HFLocalBackend

    backend = HFLocalBackend.from_pretrained(model, generation_dtype=None if torch.cuda.is_available() else "bfloat16")
    return [reply.text for reply in backend.generate_sync(requests)]
