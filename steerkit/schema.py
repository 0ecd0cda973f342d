"""Records of the workbench, strict JSONL loading, and conversions to TRL rows.

Size: every record type and its strict loader in one file, so the JSONL contract reads in one place.

A dialogue as one JSONL line (image paths are relative to the file's folder)::

    {"id": "sr-0007-obf", "kind": "obfuscated", "strategy": "progressive_disclosure",
     "images": ["images/coffee.png"],
     "messages": [{"role": "system", "content": "Think in <thinking>..."},
                  {"role": "user", "content": "What is in this cup?", "images": ["images/coffee.png"]},
                  {"role": "assistant", "content": "<thinking>...</thinking><answer>Coffee.</answer>"}],
     "meta": {"seed_id": "strongreject-0007", "source": "strongreject", "generator": "rules"}}

Loading is strict: an unknown field, a missing role, a wrong role order, a missing image file, invalid
JSON or non-UTF-8 bytes fail with an error naming the file, the line and the field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Role = Literal["system", "user", "assistant"]
Kind = Literal["benign", "obfuscated", "redteam", "single"]

#: Native verdict scales, inclusive (SPEC sections 2, 4 and 6).
SCALES: dict[str, dict[str, tuple[int, int]]] = {
    "judge": {"helpfulness": (0, 3), "harmlessness": (-3, 3)},  # SPEC 6
    "tutor": {"safety": (1, 10), "usefulness": (1, 10), "faithfulness": (1, 10)},  # SPEC 4
    "attack": {"attack": (1, 5)},  # SPEC 2, M4
    "evaluator": {"helpfulness": (0, 3), "harmlessness": (-3, 3)},  # SPEC 3 uses the judge scales
}
#: Scale of a Stage I script's per-turn risk level, inclusive (docs/method.md section 2.3, M3).
RISK_CURVE_SCALE: tuple[int, int] = (1, 5)


class RecordError(ValueError):
    """A record that cannot be loaded; the message names file, line and field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


#: Longest message accepted, in characters. A chat turn this long is a data error (or an attempt to
#: exhaust memory); real turns in STEER average well under 1,000 characters.
MAX_MESSAGE_CHARS = 100_000


class Message(_Strict):
    """One chat message: text plus references to images (paths relative to the data root)."""

    role: Role
    content: str = Field(max_length=MAX_MESSAGE_CHARS)
    images: list[str] = Field(default_factory=list)


def check_role_order(messages: list[Message], *, allow_trailing_user: bool = True) -> None:
    """Optional system first, then user/assistant alternating from user."""
    body = messages[1:] if messages and messages[0].role == "system" else messages
    if not body:
        raise ValueError("messages: no user turn")
    for i, m in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if m.role != want:
            pos = i + (len(messages) - len(body))
            raise ValueError(f"messages[{pos}].role: expected {want!r}, got {m.role!r}")
    if not allow_trailing_user and body[-1].role != "assistant":
        raise ValueError("messages: the last message must be the assistant's")


class Verdict(_Strict):
    """A score on one of the native scales of `SCALES`; unscored is data, never a zero.

    Attributes:
        kind: which scale family ("judge", "tutor", "attack", "evaluator").
        scores: the scores by name; empty when unscored.
        rationale: the grader's reason, as it wrote it.
        raw: the grader's whole reply, kept for audit.
        unscored_reason: why no score was given ("parse_failure", "off_scale", "blocked", "empty").
        extra: other parsed fields (the tutor's new_question and attack_strategy, for example).
    """

    kind: Literal["judge", "tutor", "attack", "evaluator"]
    scores: dict[str, int] = Field(default_factory=dict)
    rationale: str = ""
    raw: str = ""
    unscored_reason: str | None = None
    grader: str = ""
    prompt_version: str = ""
    extra: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _on_scale(self) -> Verdict:
        scale = SCALES[self.kind]
        if self.unscored_reason is None:
            if set(self.scores) != set(scale):
                raise ValueError(f"scores: expected keys {sorted(scale)}, got {sorted(self.scores)}")
            for name, value in self.scores.items():
                lo, hi = scale[name]
                if not lo <= value <= hi:
                    raise ValueError(f"scores.{name}: {value} is off the {lo}..{hi} scale")
        elif self.scores:
            raise ValueError("scores: an unscored verdict carries no scores")
        return self

    @property
    def scored(self) -> bool:
        return self.unscored_reason is None

    @classmethod
    def unscored(cls, kind: str, reason: str, raw: str = "", **kw: Any) -> Verdict:
        return cls(kind=kind, unscored_reason=reason, raw=raw, **kw)


class Turn(_Strict):
    """One user turn and the assistant's answer, with the verdicts given to the answer."""

    index: int = Field(ge=1)
    user: Message
    assistant: Message
    verdicts: list[Verdict] = Field(default_factory=list)


class Dialogue(_Strict):
    """A multi-turn image+text dialogue with its provenance."""

    id: str = Field(min_length=1)
    messages: list[Message]
    images: list[str] = Field(default_factory=list)
    kind: Kind | None = None
    strategy: str | None = None
    verdicts: list[Verdict] = Field(default_factory=list)
    meta: dict[str, Any] = Field(default_factory=dict)

    @field_validator("messages")
    @classmethod
    def _order(cls, v: list[Message]) -> list[Message]:
        check_role_order(v)
        return v

    @property
    def system(self) -> str | None:
        return self.messages[0].content if self.messages[0].role == "system" else None

    def turns(self) -> list[Turn]:
        """Complete (user, assistant) pairs with the verdicts whose ``extra.turn`` names them."""
        body = [m for m in self.messages if m.role != "system"]
        out = []
        for i in range(0, len(body) - 1, 2):
            n = i // 2 + 1
            vs = [v for v in self.verdicts if v.extra.get("turn") == n]
            out.append(Turn(index=n, user=body[i], assistant=body[i + 1], verdicts=vs))
        return out

    @property
    def user_texts(self) -> list[str]:
        return [m.content for m in self.messages if m.role == "user"]


class Seed(_Strict):
    """A single-turn seed: a query, optional image, and where it came from."""

    id: str = Field(min_length=1)
    text: str = Field(min_length=1)
    image: str | None = None
    harmful: bool
    source: str
    category: str = "uncategorised"
    license: str
    reference: str | None = None  # reference answer for benign tasks
    meta: dict[str, Any] = Field(default_factory=dict)

    @field_validator("text")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("text is blank")
        return v


class Script(_Strict):
    """A Stage I user-only multi-turn script (SPEC 2)."""

    id: str = Field(min_length=1)
    seed_id: str
    kind: Kind
    strategy: str
    user_turns: list[str] = Field(min_length=1)
    images: list[str] = Field(default_factory=list)
    risk_curve: list[int] = Field(default_factory=list)
    category: str = "uncategorised"
    meta: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _curve(self) -> Script:
        if self.risk_curve and len(self.risk_curve) != len(self.user_turns):
            raise ValueError(
                f"risk_curve: {len(self.risk_curve)} values for {len(self.user_turns)} user turns"
            )
        lo, hi = RISK_CURVE_SCALE
        if any(not lo <= r <= hi for r in self.risk_curve):
            raise ValueError(f"risk_curve: values must be on the {lo}..{hi} scale")
        return self


class BenchItem(_Strict):
    """A STEER-Bench item, by the published field names (SPEC 5)."""

    question_id: str = Field(min_length=1)
    messages_fixed: list[Message]
    image: str | None = None
    category: str = ""
    source_category: str = ""
    risk_trajectory: list[float] = Field(default_factory=list)

    @field_validator("messages_fixed")
    @classmethod
    def _users(cls, v: list[Message]) -> list[Message]:
        if not v or any(m.role != "user" for m in v):
            raise ValueError("messages_fixed: must be a non-empty list of user messages")
        return v

    @field_validator("risk_trajectory")
    @classmethod
    def _finite(cls, v: list[float]) -> list[float]:
        if any(not math.isfinite(x) for x in v):
            raise ValueError("risk_trajectory: values must be finite numbers")
        return v

    @property
    def user_turns(self) -> list[str]:
        return [m.content for m in self.messages_fixed]


R = TypeVar("R", bound=BaseModel)


def _image_fields(record: BaseModel) -> list[tuple[str, str]]:
    """(field path, image ref) for every image a record points at."""
    out: list[tuple[str, str]] = []
    if isinstance(record, Dialogue):
        out += [(f"images[{i}]", p) for i, p in enumerate(record.images)]
        for j, m in enumerate(record.messages):
            out += [(f"messages[{j}].images[{i}]", p) for i, p in enumerate(m.images)]
    elif isinstance(record, Seed | BenchItem) and getattr(record, "image", None):
        out.append(("image", record.image))  # type: ignore[union-attr]
    elif isinstance(record, Script):
        out += [(f"images[{i}]", p) for i, p in enumerate(record.images)]
    return out


def resolve_image(root: Path, ref: str) -> Path:
    """The file an image ref names, refusing refs that escape the data root."""
    path = (root / ref).resolve()
    if not path.is_relative_to(root.resolve()):
        raise ValueError(f"image path {ref!r} escapes the data root {root}")
    return path


def parse_line(cls: type[R], line: str, *, path: Path, lineno: int, check_images: bool = True) -> R:
    """One JSONL line into a record, or a RecordError naming file, line and field."""
    where = f"{path}:{lineno}"
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise RecordError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise RecordError(f"{where}: JSON nested too deeply to be a record") from None
    if not isinstance(data, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(data).__name__}")
    try:
        record = cls.model_validate(data)
    except RecursionError:
        raise RecordError(f"{where}: a field nested too deeply to be a record") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "(record)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = f"unknown field (allowed: {', '.join(cls.model_fields)})"
        raise RecordError(f"{where}: field {field}: {msg}") from None
    if check_images:
        for field, ref in _image_fields(record):
            try:
                img = resolve_image(path.parent, ref)
            except ValueError as exc:
                raise RecordError(f"{where}: field {field}: {exc}") from None
            if not img.is_file():
                raise RecordError(f"{where}: field {field}: image file not found: {img}")
    return record


def read_jsonl(cls: type[R], path: str | Path, *, check_images: bool = True) -> Iterator[R]:
    """Records from a JSONL file, strictly (see `parse_line`). Blank lines are skipped."""
    path = Path(path)
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise RecordError(
                    f"{path}:{lineno}: not UTF-8 (byte {raw[exc.start]:#x} at offset {exc.start})"
                ) from None
            if line.strip():
                yield parse_line(cls, line, path=path, lineno=lineno, check_images=check_images)


def load_jsonl(cls: type[R], path: str | Path, *, check_images: bool = True) -> list[R]:
    return list(read_jsonl(cls, path, check_images=check_images))


def dump_line(record: BaseModel) -> str:
    return record.model_dump_json(exclude_defaults=False) + "\n"


def write_jsonl(records: Iterable[BaseModel], path: str | Path) -> Path:
    """Write a whole JSONL file atomically (a kill never leaves a half-written file)."""
    from steerkit.files import atomic_write_text

    return atomic_write_text(Path(path), "".join(dump_line(r) for r in records))


# ---- TRL conversational rows ------------------------------------------------------------------


def _trl_content(m: Message) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"type": "image"} for _ in m.images]
    parts.append({"type": "text", "text": m.content})
    return parts


def to_trl_sft_row(d: Dialogue, *, root: Path | None = None) -> dict[str, Any]:
    """A dialogue as TRL's conversational row: ``messages`` with image placeholders, ``images``.

    Image refs become absolute paths when ``root`` is given (TRL opens them lazily or the caller
    loads them); the placeholders keep the order of the images.
    """
    images = [m_img for m in d.messages for m_img in m.images]
    if root is not None:
        images = [str(resolve_image(root, p)) for p in images]
    return {
        "id": d.id,
        "messages": [{"role": m.role, "content": _trl_content(m)} for m in d.messages],
        "images": images,
    }


def to_trl_prompt_row(d: Dialogue, *, root: Path | None = None) -> dict[str, Any]:
    """A GRPO prompt row: system + first user turn as ``prompt``; later user turns are candidates."""
    head = [m for m in d.messages if m.role == "system"]
    users = [m for m in d.messages if m.role == "user"]
    prompt = head + users[:1]
    images = list(users[0].images)
    if root is not None:
        images = [str(resolve_image(root, p)) for p in images]
    return {
        "id": d.id,
        "prompt": [{"role": m.role, "content": _trl_content(m)} for m in prompt],
        "images": images,
        "static_turns": [m.content for m in users[1:]],
    }


def from_trl_sft_row(row: dict[str, Any]) -> Dialogue:
    """Inverse of `to_trl_sft_row` (image placeholders are matched to ``images`` in order)."""
    images = list(row.get("images") or [])
    messages = []
    for m in row["messages"]:
        parts = m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]
        n_img = sum(1 for p in parts if p.get("type") == "image")
        text = "".join(p.get("text") or "" for p in parts if p.get("type") == "text")
        messages.append(Message(role=m["role"], content=text, images=images[:n_img]))
        images = images[n_img:]
    return Dialogue(id=row["id"], messages=messages)


def to_dataset(rows: list[dict[str, Any]]):  # -> datasets.Dataset
    """Rows to a `datasets.Dataset` (imported lazily: it costs seconds)."""
    import datasets

    return datasets.Dataset.from_list(rows)


def read_parquet(cls: type[R], path: str | Path, *, check_images: bool = True) -> Iterator[R]:
    """Records from a Parquet file, strictly; errors name the file, the row (as line) and the field."""
    import pyarrow.parquet as pq

    path = Path(path)
    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises unrelated types for a damaged file
        raise RecordError(f"{path}: not a readable Parquet file ({type(exc).__name__}: {exc})") from None
    for i, row in enumerate(table.to_pylist(), start=1):
        yield parse_line(cls, json.dumps(row, default=str), path=path, lineno=i, check_images=check_images)


def load_records(cls: type[R], path: str | Path, *, check_images: bool = True) -> list[R]:
    """Records from ``.jsonl`` or ``.parquet``, by suffix."""
    path = Path(path)
    match path.suffix:
        case ".jsonl" | ".json":
            return load_jsonl(cls, path, check_images=check_images)
        case ".parquet":
            return list(read_parquet(cls, path, check_images=check_images))
        case _:
            raise RecordError(f"{path}: unknown format {path.suffix!r}; use .jsonl or .parquet")
