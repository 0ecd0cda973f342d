"""What a run manifest records besides its parameters, so that a run can be reproduced and checked.

- `input_digests`: SHA-256 of every input data file (a run directory's files one by one, each
  sub-folder as one digest over its files; reply caches and trainer checkpoints left out);
- `prompt_digests`: the content hash of each prompt id a run used (`steerkit.prompts`);
- `hardware`: torch, CUDA, the GPUs and the NVIDIA driver, when present;
- `imported_packages`: every installed distribution whose modules steerkit imports, with its version.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import logging
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
#: Folders of a run directory that are not inputs: reply caches (rewritten as a run goes) and the
#: trainer's resumable checkpoints (optimizer states; the final model is ``checkpoint/``).
SKIPPED_DIRS = frozenset({"cache", "trainer", "__pycache__"})


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _folder_digest(folder: Path) -> dict[str, Any]:
    """One digest over a folder's files (sorted relative paths and their digests) and their count."""
    h, n = hashlib.sha256(), 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not _skipped(p, folder)):
        h.update(f"{path.relative_to(folder).as_posix()}\0{file_sha256(path)}\n".encode())
        n += 1
    return {"files": n, "sha256": h.hexdigest()}


def _skipped(path: Path, root: Path) -> bool:
    parts = path.relative_to(root).parts
    return any(p in SKIPPED_DIRS or p.startswith(".") for p in parts)


def path_digests(path: Path) -> dict[str, Any] | str | None:
    """A file's digest; a directory's files by name (sub-folders as one digest each); None if absent."""
    if path.is_file():
        return file_sha256(path)
    if not path.is_dir():
        return None
    out: dict[str, Any] = {}
    for child in sorted(path.iterdir()):
        if child.name in SKIPPED_DIRS or child.name.startswith("."):
            continue
        out[child.name + ("/" if child.is_dir() else "")] = (
            _folder_digest(child) if child.is_dir() else file_sha256(child)
        )
    return out


def input_digests(inputs: Mapping[str, Any], parameters: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """SHA-256 of every input: each ``inputs`` path (file or run directory, or a list of them) and
    each parameter whose value names an existing file (a seed file, a recipe, a bench)."""
    out: dict[str, Any] = {}

    def add(name: str, value: Any, *, files_only: bool) -> None:
        for i, item in enumerate(value if isinstance(value, list | tuple) else [value]):
            if not isinstance(item, str) or not item or item == "None" or "\n" in item:
                continue
            path = Path(item).expanduser()
            try:
                if files_only and not path.is_file():
                    continue
                digest = path_digests(path)
            except OSError as exc:  # unreadable: say so rather than fail the run
                digest = f"unreadable: {exc}"
            if digest is not None:
                key = name if not isinstance(value, list | tuple) else f"{name}[{i}]"
                out[key] = {"path": str(path.resolve()), "sha256": digest}

    for name, value in inputs.items():
        add(name, value, files_only=False)
    for name, value in (parameters or {}).items():
        if name not in out:
            add(name, value, files_only=True)
    return out


def prompt_digests(ids: Iterable[str]) -> dict[str, str]:
    """Prompt id -> SHA-256 of its file; ids that name no packaged prompt are left out."""
    from steerkit.prompts import load_prompt

    out = {}
    for ref in ids:
        try:
            out[ref] = load_prompt(str(ref)).sha256
        except (ValueError, OSError):
            continue
    return out


def hardware() -> dict[str, Any]:
    """torch, its CUDA build, the visible GPUs and the NVIDIA driver (what is present)."""
    out: dict[str, Any] = {}
    if find_spec("torch") is not None:
        import torch

        out["torch"] = torch.__version__
        out["cuda_build"] = torch.version.cuda
        out["cuda_available"] = torch.cuda.is_available()
        if out["cuda_available"]:
            out["gpus"] = [
                {"name": torch.cuda.get_device_name(i),
                 "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)}
                for i in range(torch.cuda.device_count())
            ]
            out["cudnn"] = torch.backends.cudnn.version()
    if shutil.which("nvidia-smi"):
        try:
            text = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20, check=True,
            ).stdout
            out["nvidia_driver"] = sorted({line.strip() for line in text.splitlines() if line.strip()})
        except (OSError, subprocess.SubprocessError) as exc:
            out["nvidia_driver"] = f"nvidia-smi failed: {exc}"
    return out


@functools.cache
def imported_modules(package_dir: Path = PACKAGE_DIR) -> frozenset[str]:
    """Top-level names of the third-party modules steerkit's source imports (at any depth)."""
    names: set[str] = set()
    for path in package_dir.rglob("*.py"):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, SyntaxError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return frozenset(n for n in names if n not in sys.stdlib_module_names and n not in ("steerkit", "__future__"))


@functools.cache
def imported_packages() -> dict[str, str | None]:
    """Distribution -> installed version for every module steerkit imports (None: not installed)."""
    by_module = metadata.packages_distributions()
    out: dict[str, str | None] = {}
    for module in sorted(imported_modules()):
        dists = by_module.get(module)
        if not dists:
            out[module] = None
            continue
        for dist in dists:
            try:
                out[dist] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                out[dist] = None
    return out
