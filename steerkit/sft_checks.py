"""Stage II's own checks, sound for a few steps on a CPU and for epochs of a paper-scale run.

Notebook 02 calls `training_checks` on the finished run and `opening_logprob` on the student before
and after, and asserts; the logic lives here so that both profiles meet the same checks:

- the run trained every step it planned: ``global_step`` equals what ``max_steps`` or, with
  ``max_steps: -1``, the epochs came to (the trainer's own count, recorded as ``planned_steps``);
- the loss went down on a fixed set of training rows measured before the first and after the last
  step (``probe_loss_before`` / ``_after``): the logged losses cannot say so when a run logs once or
  twice (``logging_steps: 10`` over a handful of steps logs one value, compared with itself);
- the answer form was learned: the log-probability that an answer opens with the STEER-SFT form
  (``<thinking>``) rises on held-out first turns. It moves with any step toward the data, where the
  share of greedy answers that open with it stays 0 until a model is trained well past that.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steerkit.layout import MANIFEST_FILE

log = logging.getLogger(__name__)

#: How every STEER-SFT answer opens (docs/method.md section 2: ``<thinking>`` then ``<answer>``).
ANSWER_OPENING = "<thinking>"


@dataclass(frozen=True)
class Check:
    """One named check of a run: whether it holds, and the figures behind it."""

    name: str
    passed: bool
    detail: str


def training_checks(run_dir: str | Path) -> list[Check]:
    """The checks of a finished SFT run, from its manifest (see the module docstring)."""
    path = Path(run_dir) / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    summary, params = manifest.get("summary") or {}, manifest.get("parameters") or {}
    checks = [Check("finished", manifest.get("status") == "finished", f"{path}: status {manifest.get('status')!r}")]
    done, planned = summary.get("global_step"), summary.get("planned_steps")
    checks.append(Check(
        "every planned step", done is not None and done == planned,
        f"{done} of {planned} optimizer steps (max_steps {params.get('max_steps')},"
        f" epochs {params.get('num_train_epochs')}; trained {summary.get('epochs')} epochs)",
    ))
    before, after = summary.get("probe_loss_before"), summary.get("probe_loss_after")
    if before is None or after is None:
        checks.append(Check("loss went down", False, f"{path}: no probe loss recorded (probe_rows 0?)"))
    else:
        checks.append(Check(
            "loss went down", after < before,
            f"loss on {summary.get('probe_rows')} training rows {before:.4f} -> {after:.4f}",
        ))
    return checks


def failed(checks: list[Check]) -> str:
    """The details of the checks that fail, one per line ('' when all hold)."""
    return "\n".join(f"{c.name}: {c.detail}" for c in checks if not c.passed)


def opening_logprob(model: str | Path, requests: list, opening: str = ANSWER_OPENING) -> list[float]:
    """log p(``opening`` | prompt) under a checkpoint, per request, rendered as the student sees it."""
    import torch

    from steerkit.backends.hf_local import HFLocalBackend, _open_rgb

    backend = HFLocalBackend.from_pretrained(model)
    net = backend.net
    opening_ids = backend.tokenizer(opening, add_special_tokens=False)["input_ids"]
    out = []
    was_training = net.training
    net.eval()
    try:
        for request in requests:
            text, paths = backend.render(request)
            enc: Any
            if backend.vision:
                images = [_open_rgb(p) for p in paths] or None
                enc = backend.processor(text=[text + opening], images=images, return_tensors="pt")
            else:
                enc = backend.tokenizer([text + opening], add_special_tokens=False, return_tensors="pt")
            enc = enc.to(net.device)
            ids = enc["input_ids"][0]
            n = len(opening_ids)
            if ids[-n:].tolist() != list(opening_ids):  # the prompt's last token merged with the opening
                raise ValueError(f"{model}: {opening!r} does not tokenize apart from the prompt")
            with torch.inference_mode():
                logits = net(**enc).logits[0, -n - 1:-1].float()
            logp = torch.log_softmax(logits, dim=-1).gather(1, ids[-n:, None].to(logits.device)).sum()
            out.append(float(logp))
    finally:
        net.train(was_training)
    return out
