"""Execute a numbered notebook headlessly with papermill, into a pipeline run directory.

A stage is one numbered notebook (``notebooks/NN_*.ipynb``). Executing it injects parameters after
its ``parameters`` cell, points it at ``<runs_root>`` and a ``run_id``, and keeps the executed copy
beside the stage's run directory::

    papermill_runs/<pipeline_run>/<stage>/<run_id>/        the run directory the notebook opened
    papermill_runs/<pipeline_run>/<stage>/<run_id>.ipynb   the executed notebook (never edited)

The notebook, not this module, names ``<stage>`` (its ``open_run`` call); the run directory is found
by its ``manifest.json`` afterwards, so the two cannot disagree.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steerkit.progress import BAR_ENV
from steerkit.runs import REPO_ROOT

log = logging.getLogger(__name__)

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
#: The kernel every notebook runs on. jupyter_client starts a kernelspec whose command is ``python``
#: with the interpreter running papermill, so the kernel is the current virtual environment's.
KERNEL_NAME = "python3"
#: Parameters through which every numbered notebook is told where to write (see notebooks/README.md).
RUNS_ROOT_PARAMETER = "runs_root"
RUN_ID_PARAMETER = "run_id"
#: Kernel arguments. ipykernel warns at start-up, on stderr, that a kernel on TCP is unencrypted
#: (ipykernel/kernelapp.py, init_sockets); papermill's kernel listens on loopback only and the
#: warning repeated at every stage hid what mattered, so the kernel application logs errors only.
#: Cell output and the code's own logging are not affected.
KERNEL_ARGUMENTS = ["--IPKernelApp.log_level=ERROR"]


class StageError(RuntimeError):
    """A notebook failed; the message names the cell and the executed notebook holding the traceback."""

    kernel_cpu_seconds: float | None = None


@dataclass(frozen=True)
class Execution:
    """What executing one notebook produced."""

    run_dir: Path
    executed_notebook: Path
    seconds: float
    #: CPU time of the kernel (user + system, all its threads): on a shared machine this, unlike the
    #: wall time, does not grow with other people's load.
    kernel_cpu_seconds: float


def notebook_path(stage: str, notebooks_dir: str | Path = NOTEBOOKS_DIR) -> Path:
    """The notebook a stage number names: ``"03"`` -> ``notebooks/03_grpo_tutor_tcsr.ipynb``.

    A path to an existing ``.ipynb`` file is returned as it is.
    """
    as_path = Path(stage)
    if as_path.suffix == ".ipynb" and as_path.is_file():
        return as_path
    matches = sorted(Path(notebooks_dir).glob(f"{stage}_*.ipynb"))
    if len(matches) != 1:
        found = ", ".join(p.name for p in sorted(Path(notebooks_dir).glob("[0-9][0-9]_*.ipynb"))) or "none"
        raise FileNotFoundError(
            f"stage {stage!r}: expected exactly one {notebooks_dir}/{stage}_*.ipynb, found"
            f" {len(matches)} (numbered notebooks there: {found})"
        )
    return matches[0]


def notebook_parameters(path: str | Path) -> dict[str, Any]:
    """The parameters a notebook declares in its ``parameters`` cell: name -> default value.

    Read with `ast` rather than papermill's line parser, which skips any line holding a second ``=``
    (a comment such as ``# keep when score >= 4``) and would let a typo through unnoticed.
    """
    path = Path(path).resolve()
    return dict(_parameters(path, path.stat().st_mtime_ns))


@functools.lru_cache(maxsize=64)
def _parameters(path: Path, mtime_ns: int) -> dict[str, Any]:  # mtime_ns: re-read an edited notebook
    import ast

    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    cell = next((c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])), None)
    if cell is None:
        return {}
    out: dict[str, Any] = {}
    source = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
    for node in ast.parse(source).body:
        targets = (node.targets if isinstance(node, ast.Assign)
                   else [node.target] if isinstance(node, ast.AnnAssign) else [])
        for target in targets:
            if isinstance(target, ast.Name) and node.value is not None:
                try:
                    out[target.id] = ast.literal_eval(node.value)
                except ValueError:
                    out[target.id] = ast.unparse(node.value)
    return out


def check_parameters(path: str | Path, parameters: dict[str, Any]) -> None:
    """Refuse parameters the notebook does not declare (papermill itself only warns, and a typo would
    silently run the defaults)."""
    declared = notebook_parameters(path)
    if not declared:
        raise ValueError(f"{path}: no cell tagged 'parameters'; papermill cannot inject into it")
    unknown = sorted(set(parameters) - set(declared))
    if unknown:
        raise ValueError(
            f"{path}: unknown parameter(s) {', '.join(unknown)}; the notebook declares"
            f" {', '.join(sorted(declared))}"
        )


def find_run_dir(runs_root: Path, run_id: str) -> Path | None:
    """The run directory ``<runs_root>/<stage>/<run_id>`` holding a manifest, if exactly one exists."""
    found = sorted(p.parent for p in Path(runs_root).glob(f"*/{run_id}/manifest.json"))
    if len(found) > 1:
        raise ValueError(
            f"run id {run_id!r} is used by several stages under {runs_root}: "
            + ", ".join(str(p) for p in found)
        )
    return found[0] if found else None


def execute(
    stage: str,
    parameters: dict[str, Any] | None = None,
    *,
    runs_root: str | Path,
    run_id: str,
    notebooks_dir: str | Path = NOTEBOOKS_DIR,
    kernel_name: str = KERNEL_NAME,
    log_output: bool = False,
    env: dict[str, str] | None = None,
) -> Execution:
    """Run one numbered notebook through papermill and return its run directory.

    Args:
        stage: a stage number (``"01"``) or a notebook path.
        parameters: values injected after the ``parameters`` cell; every name must be declared there.
        runs_root: the folder the notebook opens its run under (``papermill_runs/<pipeline_run>``).
        run_id: the run directory's name; reusing it resumes the notebook's own run.
        notebooks_dir: where the numbered notebooks live.
        kernel_name: the Jupyter kernel (``python3`` is the current environment's interpreter).
        log_output: stream cell outputs to the ``papermill`` logger as they arrive.
        env: extra environment variables for the kernel (it inherits this process's environment).

    Raises:
        StageError: a cell raised; the message names the cell and the executed notebook.
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    source = notebook_path(stage, notebooks_dir)
    runs_root = Path(runs_root).resolve()
    params = {**(parameters or {}), RUNS_ROOT_PARAMETER: str(runs_root), RUN_ID_PARAMETER: run_id}
    check_parameters(source, params)
    # Written while it runs (papermill saves after every cell), so a killed stage leaves its partial
    # notebook; moved beside the run directory once the notebook has named it.
    pending = runs_root / source.stem / f"{run_id}.ipynb"
    pending.parent.mkdir(parents=True, exist_ok=True)
    log.info("executing %s -> %s", source.name, pending)
    start = time.monotonic()
    cpu_before = _children_cpu_seconds()
    # The terminal shows progress (steerkit.progress.ProgressTail); the kernel draws no bars.
    env = {**(env or {}), BAR_ENV: "0"}
    saved_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        papermill.execute_notebook(
            str(source),
            str(pending),
            parameters=params,
            kernel_name=kernel_name,
            cwd=os.getcwd(),  # relative paths in parameters mean what they mean to the caller
            progress_bar=False,
            log_output=log_output,
            extra_arguments=list(KERNEL_ARGUMENTS),
        )
    except PapermillExecutionError as e:
        error = StageError(
            f"{source.name}: cell [{e.exec_count}] raised {e.ename}: {e.evalue}; the executed notebook"
            f" with the traceback is {pending}"
        )
        error.kernel_cpu_seconds = _children_cpu_seconds() - cpu_before
        raise error from e
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    seconds = time.monotonic() - start
    kernel_cpu = _children_cpu_seconds() - cpu_before
    run_dir = find_run_dir(runs_root, run_id)
    if run_dir is None:
        raise StageError(
            f"{source.name} finished but opened no run {run_id!r} under {runs_root}: its open_run call"
            f" must use root={RUNS_ROOT_PARAMETER} and run_id={RUN_ID_PARAMETER} (executed notebook: {pending})"
        )
    executed = run_dir.parent / f"{run_id}.ipynb"
    if executed != pending:
        os.replace(pending, executed)
        if not any(pending.parent.iterdir()):
            pending.parent.rmdir()
    log.info("%s finished in %.1f s (kernel CPU %.1f s): %s", source.name, seconds, kernel_cpu, run_dir)
    return Execution(run_dir=run_dir, executed_notebook=executed, seconds=seconds, kernel_cpu_seconds=kernel_cpu)


def _children_cpu_seconds() -> float:
    """CPU seconds of this process's finished children (the kernel, once papermill has reaped it)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
