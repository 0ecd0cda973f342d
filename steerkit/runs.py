"""Run directories: manifests, atomic writes and resumable result streams.

A run is ``papermill_runs/<stage>/<run_id>/`` holding ``manifest.json`` (parameters, roles, prompt
versions with their content hashes, git commit and dirty flag, package versions, seeds, the SHA-256 of
every input file, each served role's model as its server lists it and its request options, torch,
CUDA, GPUs and driver; see `steerkit.provenance`), data files and logs. Results are
appended one JSON line at a time and flushed, so a killed run resumes from what is on disk.

A run directory has one writer: in a multi-process launch (``accelerate launch``, ``torchrun``) the
manifest and the result logs are written by the main process only (`writes_run_files`); the other
processes read them.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

# The file helpers live in steerkit.files (below the clients); re-exported here for notebooks and tests
from steerkit.files import (  # noqa: F401
    SECRET_ENV,
    ResultLog,
    atomic_write_json,
    atomic_write_text,
    read_records,
    scrub_secrets,
    writes_run_files,
)
from steerkit.layout import MANIFEST_FILE

log = logging.getLogger(__name__)

#: Packages whose versions every manifest records.
TRACKED_PACKAGES = (
    "steerkit", "torch", "transformers", "trl", "peft", "datasets", "accelerate", "aiohttp",
    "papermill", "plotly", "lifelines", "unsloth", "vllm",
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RUNS_ROOT = REPO_ROOT / "papermill_runs"


def git_revision(root: Path = REPO_ROOT) -> dict[str, Any]:
    """The commit and dirty flag of the working tree (None when not a git checkout)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=root, capture_output=True, text=True, check=True,
            ).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def package_versions(names: Iterable[str] = TRACKED_PACKAGES) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def new_run_id(prefix: str = "") -> str:
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%d-%H%M%S")
    return f"{prefix}{stamp}-{os.getpid() % 10000:04d}"


@dataclass
class Run:
    """A run directory; create with `open_run`."""

    path: Path
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.path.name

    def file(self, name: str) -> Path:
        return self.path / name

    def update_manifest(self, **fields: Any) -> None:
        """Merge fields into the manifest and rewrite it atomically (prompt ids get their hashes)."""
        if isinstance(fields.get("prompts"), dict):
            from steerkit.provenance import prompt_digests

            fields["prompt_sha256"] = prompt_digests(fields["prompts"].values())
        self.manifest.update(scrub_secrets(fields))
        if writes_run_files():
            atomic_write_json(self.path / MANIFEST_FILE, self.manifest)

    def results(self, name: str) -> ResultLog:
        return ResultLog(self.path / name)

    def finish(self, **summary: Any) -> None:
        self.update_manifest(
            status="finished", finished_at=_dt.datetime.now(_dt.UTC).isoformat(), summary=summary
        )


def open_run(
    stage: str,
    *,
    run_id: str | None = None,
    root: str | Path | None = None,
    parameters: dict[str, Any] | None = None,
    roles: dict[str, str] | None = None,
    prompts: dict[str, str] | None = None,
    seeds: dict[str, int] | None = None,
    inputs: dict[str, str] | None = None,
) -> Run:
    """Create or reopen ``<root>/<stage>/<run_id>`` and write its manifest (an empty or missing
    ``root``: the repository's ``papermill_runs/``; an empty or missing ``run_id``: a new timestamped id).

    Reopening an existing run (same id) resumes it: the manifest keeps its creation time and records
    each resume, and parameters that differ from the recorded ones are an error, since mixing them
    would make the results meaningless.
    """
    root = Path(root) if root else DEFAULT_RUNS_ROOT  # "" as well as None: a notebook's empty parameter
    path = root / stage / (run_id or new_run_id())
    path.mkdir(parents=True, exist_ok=True)
    mpath = path / MANIFEST_FILE
    params = scrub_secrets(parameters or {})
    if mpath.exists():
        manifest = json.loads(mpath.read_text())
        old = manifest.get("parameters", {})
        changed = sorted(k for k in set(old) | set(params) if old.get(k) != params.get(k))
        if changed:
            raise ValueError(
                f"{mpath}: run {path.name!r} was started with other parameters ({', '.join(changed)});"
                " resume it with the same parameters or choose a new run_id"
            )
        manifest.setdefault("resumed_at", []).append(_dt.datetime.now(_dt.UTC).isoformat())
        manifest["status"] = "running"
        manifest.update(provenance(params, roles, prompts, inputs))  # what this attempt runs with
    else:
        manifest = {
            "stage": stage,
            "run_id": path.name,
            "created_at": _dt.datetime.now(_dt.UTC).isoformat(),
            "status": "running",
            "parameters": params,
            "roles": roles or {},
            "prompts": prompts or {},
            "seeds": seeds or {},
            "inputs": inputs or {},
            "git": git_revision(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            **provenance(params, roles, prompts, inputs),
        }
    run = Run(path=path, manifest=manifest)
    if writes_run_files():
        atomic_write_json(mpath, scrub_secrets(manifest))
    return run


def provenance(
    parameters: dict[str, Any], roles: dict[str, str] | None, prompts: dict[str, str] | None,
    inputs: dict[str, str] | None,
) -> dict[str, Any]:
    """Manifest fields that say what exactly ran (refreshed when a run resumes)."""
    from steerkit.provenance import hardware, imported_packages, input_digests, prompt_digests
    from steerkit.roles import served_roles

    return {
        "packages": {**package_versions(), **imported_packages()},
        "hardware": hardware(),
        "input_sha256": input_digests(inputs or {}, parameters),
        "prompt_sha256": prompt_digests((prompts or {}).values()),
        "served_roles": served_roles(roles or {}, timeout=5.0),
    }


