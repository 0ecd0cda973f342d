"""Evaluate checkpoints through OpenAI-compatible servers that serve them (``vllm serve <run>/checkpoint``).

Replaying a whole bench (docs/method.md section 6: 3,227 dialogues x up to 10 turns) with an in-process
``generate`` is slow; a serving engine batches the concurrent requests `steerkit.evaluate` already
sends. `served_students` maps each evaluation row whose checkpoint has a server to an ``openai:`` student
on that server, naming the model exactly as the server's ``GET /v1/models`` reports it, and returns
what `steerkit.evaluate.evaluate` records under ``evaluation.served`` in the manifest (checkpoint, URL,
served model id), so a table row says which weights answered.

The mapping (notebook 04's ``served`` parameter) is keyed by a row name (``base`` or a model run's folder
name), a model run directory or its ``checkpoint`` folder; the value is the server's API root
(``http://host:8000/v1``; a URL without ``/v1`` gets it). Written as a dict, or as a string
``key=url,key=url``.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def parse_served(value: str | Mapping[str, str] | None) -> dict[str, str]:
    """The ``served`` parameter as a dict key -> API root."""
    if not value:
        return {}
    if isinstance(value, Mapping):
        pairs = [(str(k), str(v)) for k, v in value.items()]
    else:
        pairs = []
        for part in (p.strip() for p in str(value).split(",") if p.strip()):
            key, sep, url = part.partition("=")
            if not sep or not key.strip() or not url.strip():
                raise ValueError(f"served: {part!r} is not <checkpoint or row>=<server URL>")
            pairs.append((key.strip(), url.strip()))
    return {k: api_root(v) for k, v in pairs}


def api_root(url: str) -> str:
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"served: {url!r} is not an http(s) URL")
    return url if url.endswith("/v1") else f"{url}/v1"


def served_model_id(url: str, *, api_key_env: str = "OPENAI_API_KEY", timeout: float = 30.0) -> str:
    """The one model a server serves, as its ``GET /v1/models`` names it."""
    req = urllib.request.Request(f"{api_root(url)}/models")
    key = os.environ.get(api_key_env)
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            data = json.loads(resp.read())
    except (urllib.error.URLError, OSError) as exc:
        raise ConnectionError(f"served: {url}/models did not answer ({exc}); is the server up?") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"served: {url}/models answered something that is not JSON") from exc
    ids = [m.get("id") for m in data.get("data", []) if isinstance(m, dict)] if isinstance(data, dict) else []
    if len(ids) != 1 or not ids[0]:
        raise ValueError(f"served: {url}/models lists {ids or 'no model'}; serve exactly one checkpoint"
                         " per server so the evaluated row names its weights")
    return str(ids[0])


def _checkpoint_of(spec: str) -> Path | None:
    return Path(spec[3:]).resolve() if spec.startswith("hf:") else None


def served_students(students: Mapping[str, str], served: str | Mapping[str, str] | None,
                    ) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """Rows name -> student spec, with served rows turned into ``openai:<served id>@<url>`` students.

    Returns the new specs and, per served row, ``{"checkpoint", "url", "model"}`` for the manifest. A key
    that matches no row is an error (a typo would otherwise evaluate the checkpoint in process).
    """
    wanted = parse_served(served)
    specs, info = dict(students), {}
    for key, url in wanted.items():
        path = Path(key).resolve() if ("/" in key or Path(key).exists()) else None
        rows = [name for name, spec in students.items()
                if name == key
                or (path is not None and _checkpoint_of(spec) in (path, (path / "checkpoint").resolve()))]
        if not rows:
            raise ValueError(f"served: {key!r} matches no evaluated row; rows are {', '.join(students)} (a row"
                             " name, a model run directory or its checkpoint folder)")
        model = served_model_id(url)
        for name in rows:
            ckpt = _checkpoint_of(students[name])
            specs[name] = f"openai:{model}@{url}"
            info[name] = {"checkpoint": str(ckpt) if ckpt else students[name], "url": url, "model": model}
    return specs, info
