"""Writing results so that a kill never leaves a half-written file, and reading them back.

Atomic writes (a temporary file renamed over the target), append-only JSON-line logs that are the
unit of resume (`ResultLog`), the scrubbing of secrets from anything written, and the rule that a
run directory has one writer in a multi-process launch (`writes_run_files`). `steerkit.runs` builds
run directories and their manifests on top of these.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Environment variables that must never reach a file (their values are scrubbed from manifests).
SECRET_ENV = ("OPENAI_API_KEY", "STEERKIT_API_KEY", "HF_TOKEN", "WANDB_API_KEY")


def atomic_write_text(path: Path, text: str) -> Path:
    """Write through a temporary file and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def scrub_secrets(value: Any) -> Any:
    """Replace the values of secret environment variables anywhere inside ``value``."""
    secrets = [os.environ[k] for k in SECRET_ENV if os.environ.get(k)]
    if not secrets:
        return value
    text = json.dumps(value, default=str)
    for s in secrets:
        text = text.replace(s, "***")
    return json.loads(text)


def writes_run_files() -> bool:
    """False in every process of a distributed launch but the main one (its ``RANK`` is not 0)."""
    return os.environ.get("RANK", "0") == "0"


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a log file as dicts ([] when the file does not exist yet)."""
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()] if path.is_file() else []


class ResultLog:
    """An append-only JSONL file of results keyed by ``key``; the unit of resume.

    Each record is written as one line and flushed; a line cut short by a kill is ignored on reading
    (and rewritten when the item is redone), so a half-written record never reads as valid. Only the
    main process of a distributed launch writes (`writes_run_files`).
    """

    def __init__(self, path: Path, key: str = "id", *, fsync: bool = True) -> None:
        self.path = path
        self.key = key
        self.fsync = fsync
        path.parent.mkdir(parents=True, exist_ok=True)
        self._repair_tail()

    def _repair_tail(self) -> None:
        if not self.path.exists() or not writes_run_files():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            log.warning("%s: dropping a record cut short by a kill (%d bytes)", self.path, len(data) - cut)
            with self.path.open("r+b") as f:
                f.truncate(cut)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if not self.path.exists():
            return
        with self.path.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)

    def done_keys(self) -> set[str]:
        return {str(r[self.key]) for r in self}

    def append(self, record: dict[str, Any]) -> None:
        self.extend([record])

    def extend(self, records: Sequence[dict[str, Any]]) -> None:
        """Append records with one write and one fsync (an fsync can cost milliseconds, more than
        the record); a kill keeps the whole lines written, as with `append`."""
        if not records or not writes_run_files():
            return
        text = "".join(json.dumps(scrub_secrets(r), ensure_ascii=False, default=str) + "\n" for r in records)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            if self.fsync:
                os.fsync(f.fileno())

    def __len__(self) -> int:
        return sum(1 for _ in self)
