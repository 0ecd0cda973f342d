"""STEER-Bench in its published format, read as strictly as the project's own records (method.md 5).

A published item is one JSON object (a JSONL line, a Parquet row or a `datasets` row) with the fields
``question_id``, ``messages_fixed``, ``image``, ``category``, ``source_category`` and
``risk_trajectory``. Turns are plain strings or ``{role: "user", content}`` objects (the project's own
bench records also carry ``images`` in a turn); the image goes with the first turn. Every record is
checked when the file is loaded, and the first bad one stops the load with a `RecordError` naming
file, line (or row) and field:

- ``question_id``: a non-empty string;
- ``messages_fixed``: a non-empty list of non-blank user turns, each within `MAX_MESSAGE_CHARS`;
- ``image``: absent/null, or a path relative to the file's folder that stays inside it and names a
  readable image (an image embedded by `datasets` is saved into ``image_dir``);
- ``category``, ``source_category``: absent/null or strings;
- ``risk_trajectory``: absent/null, or one finite number per turn (its scale is not fixed: the
  project's own benches use 1..5, and `steerkit.evaluate` records the scale it was told).

Fields beyond the published ones are ignored and logged: releases carry extra columns.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from steerkit.schema import MAX_MESSAGE_CHARS, BenchItem, Message, RecordError, resolve_image

log = logging.getLogger(__name__)

PUBLISHED_FIELDS = ("question_id", "messages_fixed", "image", "category", "source_category",
                    "risk_trajectory")
TURN_FIELDS = ("role", "content", "images")  # a turn object (the project's records add images)


def load_steer_bench(source: str | Path, *, split: str = "test",
                     image_dir: Path | None = None) -> list[BenchItem]:
    """STEER-Bench items from a file (JSONL, JSON, Parquet), a data-set folder or a hub name.

    A local folder is read from its ``<split>.*`` / ``<split>-*`` files (also under ``data/``) with
    the same strict reader as a file; a hub name goes through `datasets.load_dataset` (only when
    online; offline it fails with an error that says so). Image refs are relative to the file's
    folder (a folder's own for a data-set folder). Embedded images are saved into ``image_dir``,
    whose ref is ``<image_dir.name>/<file>.png`` (so ``image_dir`` sits in the data folder).

    Raises:
        RecordError: the first bad record, naming file, line (or row) and field.
    """
    path = Path(source)
    if path.is_file():
        rows, root = _file_rows(path), path.parent
    elif path.is_dir():
        files = split_files(path, split)
        if not files:
            raise RecordError(f"{path}: no files for split {split!r} (looked for {split}.jsonl, "
                              f"{split}-*.parquet and the like, also under data/)")
        rows, root = (r for f in files for r in _file_rows(f)), path
    else:
        rows, root = _hub_rows(str(source), split), None
    items: list[BenchItem] = []
    extra: Counter[str] = Counter()
    for where, row in rows:
        extra.update(k for k in row if k not in PUBLISHED_FIELDS)
        items.append(bench_item_from_row(row, where=where, root=root, image_dir=image_dir))
    if extra:
        log.info("%s: ignored fields %s", source, dict(extra))
    return items


def split_files(folder: Path, split: str) -> list[Path]:
    """The files of one split in a data-set folder, by `datasets`' naming conventions."""
    found: list[Path] = []
    for base in (folder, folder / "data"):
        for pattern in (f"{split}.*", f"{split}-*", f"{split}_*"):
            found += [p for p in sorted(base.glob(pattern))
                      if p.is_file() and p.suffix in (".jsonl", ".json", ".parquet")]
    return list(dict.fromkeys(found))


# ---- rows from files ----------------------------------------------------------------------------


def _file_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    match path.suffix:
        case ".jsonl":
            yield from _jsonl_rows(path)
        case ".json":
            head = path.read_bytes()[:4096].lstrip()
            yield from (_json_array_rows(path) if head.startswith(b"[") else _jsonl_rows(path))
        case ".parquet":
            yield from _parquet_rows(path)
        case _:
            raise RecordError(f"{path}: unknown format {path.suffix!r}; use .jsonl, .json or .parquet")


def _decode_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecordError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise RecordError(f"{where}: invalid JSON (nested too deeply)") from None


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise RecordError(f"{where}: not UTF-8 (byte {raw[exc.start]:#x} at offset {exc.start})") from None
            if not line.strip():
                continue
            yield where, _object(_decode_json(line, where), where)


def _json_array_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RecordError(f"{path}: not UTF-8 (offset {exc.start})") from None
    data = _decode_json(text, str(path))
    if not isinstance(data, list):
        raise RecordError(f"{path}: expected a JSON array of objects, got {type(data).__name__}")
    for i, row in enumerate(data):
        yield f"{path}: item {i}", _object(row, f"{path}: item {i}")


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001  (pyarrow raises several unrelated types)
        raise RecordError(f"{path}: not a readable Parquet file ({type(exc).__name__}: {exc})") from None
    for i, row in enumerate(table.to_pylist(), start=1):
        yield f"{path}:{i}", row


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(value).__name__}")
    return value


def _hub_rows(name: str, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
    from steerkit.synth.seed_files import load_hub_dataset

    for i, row in enumerate(load_hub_dataset(name, split=split)):
        yield f"{name}[{split}] row {i}", dict(row)


# ---- one record ---------------------------------------------------------------------------------


def bench_item_from_row(row: dict[str, Any], *, where: str, root: Path | None,
                        image_dir: Path | None = None) -> BenchItem:
    """One published record as a `BenchItem`, or a `RecordError` naming ``where`` and the field."""

    def fail(field: str, msg: str) -> RecordError:
        return RecordError(f"{where}: field {field}: {msg}")

    qid = row.get("question_id")
    if qid is None:
        raise fail("question_id", "missing (every item needs a non-empty string id)")
    if not isinstance(qid, str) or not qid.strip():
        raise fail("question_id", f"expected a non-empty string, got {_shown(qid)}")
    image = _image(row.get("image"), qid=qid, root=root, image_dir=image_dir, fail=fail)
    turns = row.get("messages_fixed")
    if not isinstance(turns, list) or not turns:
        raise fail("messages_fixed", f"expected a non-empty list of user turns, got {_shown(turns)}")
    messages = [_turn(t, j, image, root=root, fail=fail) for j, t in enumerate(turns)]
    texts = {}
    for name in ("category", "source_category"):
        value = row.get(name)
        if value is not None and not isinstance(value, str):
            raise fail(name, f"expected a string, got {_shown(value)}")
        texts[name] = value or ""
    risk = row.get("risk_trajectory")
    risk = [] if risk is None else risk
    if not isinstance(risk, list):
        raise fail("risk_trajectory", f"expected a list of numbers, got {_shown(risk)}")
    for k, x in enumerate(risk):
        if isinstance(x, bool) or not isinstance(x, int | float):
            raise fail(f"risk_trajectory[{k}]", f"expected a number, got {_shown(x)}")
        if not math.isfinite(x):
            raise fail(f"risk_trajectory[{k}]", f"{x} is not a finite number")
    if risk and len(risk) != len(messages):
        raise fail("risk_trajectory", f"{len(risk)} values for {len(messages)} turns (one per turn)")
    return BenchItem(question_id=qid, messages_fixed=messages, image=image,
                     risk_trajectory=[float(x) for x in risk], **texts)


def _turn(t: Any, j: int, image: str | None, *, root: Path | None, fail) -> Message:
    field = f"messages_fixed[{j}]"
    images = [image] if (j == 0 and image) else []
    match t:
        case str():
            text = t
        case dict():
            unknown = sorted(set(t) - set(TURN_FIELDS))
            if unknown:
                raise fail(field, f"unknown key(s) {', '.join(unknown)} (a turn has {', '.join(TURN_FIELDS)})")
            if t.get("role", "user") != "user":
                raise fail(f"{field}.role", f"expected 'user' (the bench holds user turns only), got {t.get('role')!r}")
            text = t.get("content")
            if not isinstance(text, str):
                raise fail(f"{field}.content", f"expected a string, got {_shown(text)}")
            if "images" in t:
                images = t["images"] or []
                if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
                    raise fail(f"{field}.images", f"expected a list of image paths, got {_shown(images)}")
                for i, ref in enumerate(images):
                    _check_image_ref(ref, root, lambda msg, i=i: fail(f"{field}.images[{i}]", msg))
        case _:
            raise fail(field, f"expected a string or a {{role, content}} object, got {_shown(t)}")
    if not text.strip():
        raise fail(field, "the turn is blank")
    if len(text) > MAX_MESSAGE_CHARS:
        raise fail(field, f"{len(text)} characters is over the {MAX_MESSAGE_CHARS}-character limit")
    return Message(role="user", content=text, images=images)


def _image(value: Any, *, qid: str, root: Path | None, image_dir: Path | None, fail) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        _check_image_ref(value, root, lambda msg: fail("image", msg))
        return value
    data = value.get("bytes") if isinstance(value, dict) else None  # a `datasets` Image in Parquet
    if not (data or hasattr(value, "convert")):
        raise fail("image", f"expected a relative image path or an embedded image, got {_shown(value)}")
    if image_dir is None:
        raise fail("image", "an embedded image needs image_dir to be saved into")
    from io import BytesIO

    from PIL import Image, UnidentifiedImageError

    name = re.sub(r"[^A-Za-z0-9_.-]", "_", qid)[:64] + "-" + hashlib.sha1(qid.encode()).hexdigest()[:8]
    image_dir.mkdir(parents=True, exist_ok=True)
    try:
        im = Image.open(BytesIO(data)) if data else value
        im.convert("RGB").save(image_dir / f"{name}.png", format="PNG")
    except (UnidentifiedImageError, OSError) as exc:
        raise fail("image", f"cannot decode the embedded image ({type(exc).__name__})") from None
    return f"{image_dir.name}/{name}.png"


def _check_image_ref(ref: str, root: Path | None, fail) -> None:
    """A ref stays inside ``root`` and names a file PIL can identify (the header only: cheap)."""
    from PIL import Image, UnidentifiedImageError

    if root is None:
        raise fail(f"{ref!r} is a path, but a hub data set has no folder it could be relative to")
    try:
        path = resolve_image(root, ref)
    except ValueError as exc:
        raise fail(str(exc)) from None
    if not path.is_file():
        raise fail(f"image file not found: {path}")
    try:
        with Image.open(path):
            pass
    except (UnidentifiedImageError, OSError) as exc:
        raise fail(f"cannot decode image {path} ({type(exc).__name__})") from None


def _shown(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"
