"""Where a long stage is: steps, rollouts or judged turns, with the rate and the time left.

A stage reports through `Progress` (or `progress_callback` for a transformers/TRL trainer). Each
report appends one JSON line to ``progress.jsonl`` in the stage's run directory (at most one line
every `MIN_INTERVAL` seconds, and always the last), and, in an interactive notebook, moves a
tqdm bar. ``steerkit run`` executes notebooks with papermill, whose kernel output nobody sees while
it runs, so `ProgressTail` reads those lines from the run directories and prints one updating line
per stage on the terminal.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Self, TextIO

from steerkit.files import writes_run_files
from steerkit.layout import PROGRESS_FILE

#: Trainer log values a progress line carries (SFT's loss; GRPO's loss and mean reward).
SHOWN_LOGS = ("loss", "reward")
MIN_INTERVAL = 2.0  # seconds between two lines of one task in the progress file
#: Set (to "0") by `steerkit.notebooks.execute`: a papermill kernel shows no bar, the terminal does.
BAR_ENV = "STEERKIT_PROGRESS_BAR"


class Progress:
    """One task's progress: ``done`` of ``total`` units, written to ``<run_dir>/progress.jsonl``.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> with Progress(d, "judge", total=4, unit="turns", bar=False) as p:
        ...     p.advance(4)
        >>> json.loads((d / PROGRESS_FILE).read_text().splitlines()[-1])["done"]
        4
    """

    def __init__(self, run_dir: str | Path | None, task: str, *, total: int | None = None,
                 unit: str = "steps", bar: bool | None = None, min_interval: float = MIN_INTERVAL) -> None:
        self.path = Path(run_dir) / PROGRESS_FILE if run_dir is not None else None
        self.task, self.total, self.unit, self.done = task, total, unit, 0
        self.base = 0  # units done before this process started (a resumed run); not in the rate
        self.extra: dict[str, Any] = {}  # the latest extra values (a loss, for example)
        self.min_interval = min_interval
        self.start = time.monotonic()
        self._last_write = float("-inf")
        self._bar = _notebook_bar(task, total, unit) if (bar if bar is not None else _interactive()) else None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def advance(self, n: int = 1, **extra: Any) -> None:
        self.update(self.done + n, **extra)

    def update(self, done: int, *, total: int | None = None, **extra: Any) -> None:
        """Set the count (and the total, once known); write a line when due."""
        if total is not None:
            self.total = total
            if self._bar is not None:
                self._bar.total = total
        if self._bar is not None:
            self._bar.update(done - self.done)
        self.done = done
        self.extra.update(extra)
        finished = self.total is not None and done >= self.total
        if finished or time.monotonic() - self._last_write >= self.min_interval:
            self._write({})

    def close(self) -> None:
        self._write({"closed": True})
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def record(self, **extra: Any) -> dict[str, Any]:
        """The current state: counts, rate per second and the seconds left (None when unknown)."""
        elapsed = time.monotonic() - self.start
        rate = (self.done - self.base) / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if (rate > 0 and self.total is not None) else None
        return {"task": self.task, "done": self.done, "total": self.total, "unit": self.unit,
                "elapsed_s": round(elapsed, 1), "rate": round(rate, 4),
                "left_s": None if left is None else round(max(left, 0.0), 1), "time": time.time(),
                **self.extra, **extra}

    def _write(self, extra: dict[str, Any]) -> None:
        self._last_write = time.monotonic()
        if self.path is None or not writes_run_files():  # one writer in a multi-process launch
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:  # one short append: a kill loses one line at most
            f.write(json.dumps(self.record(**extra)) + "\n")


def progress_callback(run_dir: str | Path | None, task: str):  # -> transformers.TrainerCallback
    """A trainer callback reporting optimizer steps (of ``state.max_steps``) with the last loss
    (and, for GRPO, the mean reward) the trainer logged."""
    from transformers import TrainerCallback

    class ProgressCallback(TrainerCallback):
        def __init__(self) -> None:
            self.progress: Progress | None = None
            self.logged: dict[str, float] = {}

        def on_train_begin(self, args, state, control, **kw):
            self.progress = Progress(run_dir, task, total=state.max_steps or None, unit="steps")
            self.progress.done = self.progress.base = state.global_step  # a resumed run goes on

        def on_log(self, args, state, control, logs=None, **kw):
            self.logged.update({k: float(v) for k, v in (logs or {}).items()
                                if k in SHOWN_LOGS and isinstance(v, int | float)})

        def on_step_end(self, args, state, control, **kw):
            if self.progress is not None:
                self.progress.update(state.global_step, total=state.max_steps or None, **self.logged)

        def on_train_end(self, args, state, control, **kw):
            if self.progress is not None:
                self.progress.close()

    return ProgressCallback()


def _interactive() -> bool:
    """In a Jupyter kernel that a person watches (papermill's kernels get ``BAR_ENV=0``)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return os.environ.get(BAR_ENV, "1") != "0" and type(shell).__name__ == "ZMQInteractiveShell"


def _notebook_bar(task: str, total: int | None, unit: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=task, unit=f" {unit}", dynamic_ncols=True)


# ---- the terminal side ------------------------------------------------------------------------


def describe(rec: dict[str, Any]) -> str:
    """One line for a progress record.

    >>> describe({"task": "SFT", "done": 40, "total": 120, "unit": "steps", "rate": 0.5, "left_s": 160.0,
    ...           "loss": 1.23456})
    'SFT: 40/120 steps (33%), 0.50 steps/s, 2:40 left, loss 1.235'
    """
    total = rec.get("total")
    head = f"{rec['task']}: {rec['done']}" + (f"/{total}" if total else "") + f" {rec['unit']}"
    parts = [head + (f" ({100 * rec['done'] / total:.0f}%)" if total else "")]
    rate = rec.get("rate") or 0.0
    parts.append(f"{rate:.2f} {rec['unit']}/s" if rate >= 0.1 or rate == 0 else f"{60 * rate:.2f} {rec['unit']}/min")
    if rec.get("left_s") is not None:
        parts.append(f"{_clock(rec['left_s'])} left")
    parts += [f"{k} {v:.4g}" for k, v in rec.items() if k in SHOWN_LOGS and isinstance(v, int | float)]
    return ", ".join(parts)


def _clock(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class ProgressTail:
    """Follow ``<runs_root>/*/<run_id>/progress.jsonl`` while a stage runs; print each new state.

    On a terminal the line is rewritten in place; elsewhere (a log file, a test) each state is a
    new line. Used as a context manager around `steerkit.notebooks.execute`.
    """

    def __init__(self, runs_root: Path, run_id: str, label: str, *, out: TextIO | None = None,
                 interval: float = 1.0, enabled: bool = True) -> None:
        self.runs_root, self.run_id, self.label, self.enabled = Path(runs_root), run_id, label, enabled
        self.out = out if out is not None else sys.stderr
        self.interval = interval
        self._offsets: dict[Path, int] = {}
        self._done: dict[str, int] = {}  # the last count shown per task
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"progress-{run_id}", daemon=True)
        self._shown = ""

    def __enter__(self) -> Self:
        if not self.enabled:
            return self
        for f in self._files():  # a resumed stage: show only what it writes from now on
            self._offsets[f] = f.stat().st_size
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.enabled:
            return
        self._stop.set()
        self._thread.join()
        self.poll()
        if self._shown and self._tty():
            self.out.write("\n")
            self.out.flush()

    def _files(self) -> list[Path]:
        # the stage's run directory, and the rows inside it (stage 04 evaluates each model in a folder of its own)
        own = self.runs_root.glob(f"*/{self.run_id}/{PROGRESS_FILE}")
        return sorted({*own, *self.runs_root.glob(f"*/{self.run_id}/*/{PROGRESS_FILE}")})

    def _where(self, f: Path) -> str:
        """The label of a progress file: the stage's, with the row's folder name for a row's file."""
        return self.label if f.parent.name == self.run_id else f"{self.label} {f.parent.name}"

    def _tty(self) -> bool:
        return hasattr(self.out, "isatty") and self.out.isatty()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def poll(self) -> list[dict[str, Any]]:
        """Read new lines and show the latest state of each task; returns the new records."""
        new: list[dict[str, Any]] = []
        where: list[str] = []
        for f in self._files():
            with f.open("rb") as fh:
                fh.seek(self._offsets.get(f, 0))
                data = fh.read()
            complete = data[: data.rfind(b"\n") + 1]  # a line being written waits for the next poll
            self._offsets[f] = self._offsets.get(f, 0) + len(complete)
            for line in complete.splitlines():
                try:
                    new.append(json.loads(line))
                except ValueError:
                    continue
                where.append(self._where(f))
        for rec, label in zip(new, where, strict=True):
            key = f"{label}/{rec['task']}"
            if rec.get("closed") and self._done.get(key) == rec["done"]:
                continue  # the closing line repeats the last state shown
            self._done[key] = rec["done"]
            self._show(f"[{label}] {describe(rec)}")
        return new

    def _show(self, text: str) -> None:
        if self._tty():
            self.out.write("\r\033[K" + text)
        else:
            self.out.write(text + "\n")
        self.out.flush()
        self._shown = text
