"""The researcher's own seeds: local JSONL/CSV files and hub data sets (docs/data.md).

A local seed file is read strictly: the first bad line stops the load with a `RecordError` naming
file, line and field, since the researcher can fix their own file. One seed per JSONL line (or CSV
row, with a header)::

    {"id": "mine-001", "text": "How do I ...", "harmful": true, "image": "photos/a.png",
     "category": "weapons", "license": "CC-BY-4.0", "source": "my-set", "reference": null}

``text`` may be spelled ``prompt`` or ``query``; only ``text`` is required, with ``harmful`` given per
record or for the whole file. An image path is relative to the file's folder and is copied into the
run's ``images/`` folder, so the run directory holds everything it uses.

A hub seed set is named by a string, ``hub:<dataset>:<split>:<text column>``, with options after a
``?`` (``harmful=false``, ``license=MIT``, ``category=<column>``, ``image=<column>``,
``config=<name>``, ``limit=<n>``). It is loaded with `datasets.load_dataset` (a local data-set folder
or a ``.jsonl``/``.csv``/``.parquet`` file works the same way, offline); with the hub switched off
(``HF_HUB_OFFLINE=1``) a set that is not in the local cache fails with an error that says so. A hub
set cannot be edited by its user, so its bad rows (blank text, unreadable image) are skipped and
counted in the run manifest; a missing column is an error.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from steerkit.schema import RecordError, Seed, resolve_image
from steerkit.synth.seeds import SkipLog, _add, image_readable

SEED_FIELDS = ("id", "text", "prompt", "query", "image", "harmful", "category", "license", "source",
               "reference")
TEXT_FIELDS = ("text", "prompt", "query")
HUB_OPTIONS = ("harmful", "license", "category", "image", "config", "limit")
_TRUE, _FALSE = {"true", "1", "yes"}, {"false", "0", "no"}


class HubUnavailable(RuntimeError):
    """A hub data set that cannot be loaded here (offline and not cached, unknown, or unreadable)."""


# ---- local files --------------------------------------------------------------------------------


def load_local_seeds(path: str | Path, *, source: str | None = None, harmful: bool | None = None,
                     license: str = "unknown", image_dir: Path | None = None) -> list[Seed]:
    """Seeds from a JSONL or CSV file, strictly (see the module docstring).

    Args:
        path: the ``.jsonl`` or ``.csv`` file.
        source: the seeds' source name (default: the file's stem).
        harmful: for records that do not say; None makes ``harmful`` required in every record.
        license: for records that do not say.
        image_dir: where images are copied (refs ``<image_dir.name>/<file>``); None keeps the refs
            as they are, relative to the file's folder.

    Raises:
        RecordError: the first bad line, naming file, line and field.
    """
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"{path}: seed file not found")
    source = source or path.stem
    out: list[Seed] = []
    first_line: dict[str, int] = {}
    for lineno, rec in _records(path):
        where = f"{path}:{lineno}"
        seed = _seed(rec, where=where, n=lineno, source=source, harmful=harmful, license=license,
                     root=path.parent, image_dir=image_dir)
        if seed.id in first_line:
            raise RecordError(f"{where}: field id: {seed.id!r} repeats line {first_line[seed.id]}")
        first_line[seed.id] = lineno
        out.append(seed)
    return out


def _records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        lineno = data[: exc.start].count(b"\n") + 1
        raise RecordError(f"{path}:{lineno}: not UTF-8 (byte {data[exc.start]:#x})") from None
    match path.suffix.lower():
        case ".csv":
            reader = csv.reader(io.StringIO(text, newline=""))
            header: list[str] | None = None
            out = []
            line_start = 1
            for row in reader:
                lineno, line_start = line_start, reader.line_num + 1
                if not any(cell.strip() for cell in row):
                    continue
                if header is None:
                    header = [h.strip() for h in row]
                    continue
                if len(row) != len(header):
                    raise RecordError(f"{path}:{lineno}: {len(row)} columns, the header has {len(header)}"
                                      f" ({', '.join(header)})")
                out.append((lineno, dict(zip(header, row, strict=True))))
            return out
        case ".jsonl" | ".json":
            out = []
            for lineno, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise RecordError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
                except RecursionError:
                    raise RecordError(f"{where}: invalid JSON (nested too deeply)") from None
                if not isinstance(rec, dict):
                    raise RecordError(f"{where}: expected a JSON object, got {type(rec).__name__}")
                out.append((lineno, rec))
            return out
        case _:
            raise RecordError(f"{path}: unknown seed file format {path.suffix!r}; use .jsonl or .csv")


def _seed(rec: dict[str, Any], *, where: str, n: int, source: str, harmful: bool | None, license: str,
          root: Path, image_dir: Path | None) -> Seed:
    def fail(field: str, msg: str) -> RecordError:
        return RecordError(f"{where}: field {field}: {msg}")

    unknown = sorted(set(rec) - set(SEED_FIELDS))
    if unknown:
        raise fail(unknown[0], f"unknown field (allowed: {', '.join(SEED_FIELDS)})")
    given = [k for k in TEXT_FIELDS if rec.get(k) not in (None, "")]
    if len(given) > 1:
        raise fail(given[1], f"a seed has one text; this record also has {given[0]!r}")
    name = (given or [k for k in TEXT_FIELDS if k in rec] or ["text"])[0]
    text = rec.get(name)
    if not isinstance(text, str) or not text.strip():
        raise fail(name, "missing or blank (every seed needs a text: text, prompt or query)")
    for key in ("id", "image", "category", "license", "source", "reference"):
        if rec.get(key) is not None and not isinstance(rec[key], str):
            raise fail(key, f"expected a string, got {type(rec[key]).__name__} {rec[key]!r}")
    h = rec.get("harmful")
    if isinstance(h, str) and h.strip():
        if h.strip().lower() not in _TRUE | _FALSE:
            raise fail("harmful", f"expected true or false, got {h!r}")
        h = h.strip().lower() in _TRUE
    elif h in (None, ""):
        h = harmful
    if not isinstance(h, bool):
        raise fail("harmful", "not given: set it in every record or for the whole file (harmful=)"
                   if h is None else f"expected true or false, got {h!r}")
    image = rec.get("image") or None
    if image:
        try:
            file = resolve_image(root, image)
        except ValueError as exc:
            raise fail("image", str(exc)) from None
        why = image_readable(file)
        if why:
            raise fail("image", f"{why}: {file}")
        if image_dir is not None:
            image = _copy_image(file, image_dir, source)
    fields = {"id": rec.get("id") or f"{source}-{n:05d}", "text": text.strip(), "image": image,
              "harmful": h, "source": rec.get("source") or source,
              "category": rec.get("category") or "uncategorised",
              "license": rec.get("license") or license, "reference": rec.get("reference") or None}
    try:
        return Seed(**fields)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise RecordError(f"{where}: {exc}") from None


def _copy_image(file: Path, image_dir: Path, source: str) -> str:
    """Copy a seed's image into the run (named by its content, so a rerun reuses it); its ref."""
    digest = hashlib.sha256(file.read_bytes()).hexdigest()[:16]
    target = image_dir / f"{source}-{digest}{file.suffix.lower()}"
    if not target.exists():
        image_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, target)
    return f"{image_dir.name}/{target.name}"


# ---- hub data sets --------------------------------------------------------------------------------


def offline() -> bool:
    """Whether the hub is switched off for this process (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``)."""
    import os

    return any(os.environ.get(k, "").strip().lower() in {"1", "true", "yes", "on"}
               for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def load_hub_dataset(name: str, *, split: str, config: str | None = None):  # -> datasets.Dataset
    """`datasets.load_dataset` for a hub name, a local data-set folder or a local data file.

    A local ``.jsonl``/``.json``/``.csv``/``.parquet`` file is read with the matching builder, as a
    hub set of that format is. Any failure becomes a `HubUnavailable` naming the set (and saying so
    when the hub is switched off).
    """
    import datasets

    path = Path(name)
    builders = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
    try:
        if path.is_file() and path.suffix in builders:
            return datasets.load_dataset(builders[path.suffix], data_files={split: str(path)}, split=split)
        return datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # noqa: BLE001  (datasets raises many unrelated types)
        cause = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
        if offline() and not path.exists():
            raise HubUnavailable(
                f"hub data set {name!r} (split {split!r}) cannot be loaded: the hub is switched off"
                f" (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set) and it is not in the local cache;"
                f" load it once online, or give a local file or folder ({cause})") from None
        raise HubUnavailable(f"data set {name!r} (split {split!r}) cannot be loaded ({cause})") from None


def parse_hub_spec(spec: str) -> dict[str, Any]:
    """``hub:<dataset>:<split>:<text column>[?option=value&...]`` as `load_hub_seeds` arguments.

    Example:
        >>> parse_hub_spec("hub:walledai/AdvBench:train:prompt?license=MIT&limit=50")  # doctest: +NORMALIZE_WHITESPACE
        {'name': 'walledai/AdvBench', 'split': 'train', 'text_field': 'prompt', 'harmful': True, 'license': 'MIT',
         'limit': 50}
    """
    body, _, query = spec.partition("?")
    parts = body.split(":")
    if parts[0] != "hub" or len(parts) != 4 or not all(p.strip() for p in parts[1:]):
        raise ValueError(f"hub seed set {spec!r}: write hub:<dataset>:<split>:<text column>"
                         f"[?{'&'.join(f'{o}=...' for o in HUB_OPTIONS)}]")
    out: dict[str, Any] = {"name": parts[1], "split": parts[2], "text_field": parts[3], "harmful": True,
                           "license": "unknown (see the data set's card)"}
    for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)):
        match key:
            case "harmful":
                if value.lower() not in _TRUE | _FALSE:
                    raise ValueError(f"hub seed set {spec!r}: harmful={value!r}; use true or false")
                out["harmful"] = value.lower() in _TRUE
            case "limit":
                if not value.isdigit():
                    raise ValueError(f"hub seed set {spec!r}: limit={value!r}; use a whole number")
                out["limit"] = int(value)
            case "license" | "config":
                out[key] = value
            case "category" | "image":
                out[f"{key}_field"] = value
            case _:
                raise ValueError(f"hub seed set {spec!r}: unknown option {key!r}; options: {', '.join(HUB_OPTIONS)}")
    return out


def load_hub_seeds(name: str, *, split: str = "train", harmful: bool, license: str,
                   text_field: str = "text", category_field: str | None = None,
                   image_field: str | None = None, config: str | None = None, limit: int | None = None,
                   image_dir: Path | None = None, skips: SkipLog | None = None) -> list[Seed]:
    """Seeds from a hub data set (or a local folder or file `datasets` reads the same way).

    Rows with a blank text or an unreadable image are skipped and counted in ``skips``; a column
    the set does not have is an error. PIL images in ``image_field`` are saved into ``image_dir``
    (refs ``<image_dir.name>/<id>.png``).
    """
    skips = skips if skips is not None else SkipLog()
    ds = load_hub_dataset(name, split=split, config=config)
    for label, column in (("text column", text_field), ("category", category_field), ("image", image_field)):
        if column is not None and column not in ds.column_names:
            raise HubUnavailable(f"data set {name!r} (split {split!r}) has no {label} {column!r};"
                                 f" its columns are {', '.join(ds.column_names)}")
    if image_field and image_dir is None:
        raise ValueError("load_hub_seeds: image_field needs image_dir to save the images into")
    source = Path(name).stem if Path(name).exists() else name
    out: list[Seed] = []
    seen: set[str] = set()
    for i, row in enumerate(ds):
        if limit is not None and len(out) >= limit:
            break
        where = f"{name}[{split}] row {i}"
        sid = f"{source.replace('/', '-')}-{i:05d}"
        image = None
        if image_field and row.get(image_field) is not None:
            try:
                image_dir.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
                row[image_field].convert("RGB").save(image_dir / f"{sid}.png", format="PNG")  # type: ignore[operator]
                image = f"{image_dir.name}/{sid}.png"  # type: ignore[union-attr]
            except (AttributeError, OSError) as exc:
                skips.skip(source, f"unreadable image ({type(exc).__name__})", where)
                continue
        _add(out, seen, skips, where, id=sid, text=str(row.get(text_field) or "").strip(), image=image,
             harmful=harmful, source=source,
             category=str(row.get(category_field) or "uncategorised") if category_field else "uncategorised",
             license=license, meta={"hub": name, "split": split})
    return out


def load_seed_sets(seed_files: list[str], hub_seeds: list[str | dict[str, Any]], *, image_dir: Path,
                   skips: SkipLog) -> list[Seed]:
    """Every seed the researcher brought: local files (strict) and hub sets (specs or argument dicts)."""
    out: list[Seed] = []
    for f in seed_files:
        out += load_local_seeds(f, image_dir=image_dir)
    for spec in hub_seeds:
        kwargs = parse_hub_spec(spec) if isinstance(spec, str) else dict(spec)
        out += load_hub_seeds(**kwargs, image_dir=image_dir, skips=skips)
    repeated = sorted(i for i, n in Counter(s.id for s in out).items() if n > 1)
    if repeated:
        raise RecordError(f"seed ids repeat across seed sets: {', '.join(repeated[:5])}; give each file its own ids")
    return out
