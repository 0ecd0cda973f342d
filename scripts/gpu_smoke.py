"""GPU figures for the workbench on randomly initialised models of Qwen2.5-VL-3B's shape, in one run.

    python scripts/gpu_smoke.py run --out DIR [--budget-s 480] [--phases a,b,...]   (GPU box)
    python scripts/gpu_smoke.py run --out DIR --dry-run                              (CPU, tiny sizes)
    python scripts/gpu_smoke.py report DIR

Phases, in this order (docs/gpu.md says what each measures and the goals):
  sft_hf       SFT, LoRA, bf16, TRL + PEFT                         s/step, tokens/s, peak memory
  sft_unsloth  the same data and batch with Unsloth's FastVisionModel (reported unavailable off CUDA)
  sft_full     SFT, full fine-tuning, vision tower frozen, gradient checkpointing (the paper's recipe)
  grpo_lora    GRPO, LoRA at a constant 1e-3 (the settings that logged NaN): grad_norm finiteness
  rollout      the rollout engine's tokens/s at 8, 32 and 64 trajectories
  grpo_full    GRPO, full fine-tuning at the authors' 3B lr 2e-6: rollout and training s/step

Each phase runs in its own process (on a GPU: a clean memory peak, Unsloth's patches kept out of the
others, a crash costs one phase) with a timeout from the time budget, and prints one
``GPU_SMOKE {json}`` line and one readable line as it finishes; ``DIR/results.jsonl`` collects them,
so a run cut short still reports what it finished. ``--dry-run`` runs every phase in this process on
the tiny VLM (`steerkit.tiny_vlm.build_tiny_vlm`) at tiny sizes.

The model has Qwen2.5-VL-3B-Instruct's published config (below), random bf16 weights, the processor's
default image bounds, and the workbench's small tokenizer: speed and memory depend on the shape, not
the weights or the vocabulary's contents.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_phases  # beside this file

#: Qwen2.5-VL-3B-Instruct's config.json, text part (hidden 2048, 36 layers, 16 heads, 2 KV heads).
QWEN25_VL_3B_TEXT = {
    "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
    "num_attention_heads": 16, "num_key_value_heads": 2, "hidden_act": "silu", "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-6, "attention_dropout": 0.0, "sliding_window": 32768, "use_sliding_window": False,
    "max_window_layers": 70, "tie_word_embeddings": True,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
}
#: Its vision tower: 32 blocks of width 1280, window attention with four full-attention blocks.
QWEN25_VL_3B_VISION = {
    "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 2048,
    "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31], "hidden_act": "silu", "in_chans": 3, "tokens_per_second": 2,
}
#: Its preprocessor_config.json's image bounds (the processor's defaults).
MIN_PIXELS, MAX_PIXELS = 3136, 12845056
PHASES = ("sft_hf", "sft_unsloth", "sft_full", "grpo_lora", "rollout", "grpo_full")
#: Seconds each phase may take at most on the GPU box (model load and imports included).
PHASE_CAP_S = {"sft_hf": 60, "sft_unsloth": 100, "sft_full": 60, "grpo_lora": 120, "rollout": 75, "grpo_full": 60}
MARKER = "GPU_SMOKE "
RESULTS = "results.jsonl"
#: The goal for Unsloth against the HF path (same data and batch).
GOAL_SPEEDUP, GOAL_MEMORY_SHARE = 1.5, 0.6


def build(out: Path, tiny: bool) -> Path:
    """The tiny VLM's tokenizer and processor, with the 3B shape's random bf16 weights unless ``tiny``."""
    from steerkit.models import load_processor, processor_without_video_class
    from steerkit.tiny_vlm import build_tiny_vlm

    if (out / "gpu_smoke.json").is_file():
        return out
    build_tiny_vlm(out)
    if tiny:
        (out / "gpu_smoke.json").write_text(json.dumps({"shape": "tiny"}))
        return out
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    small = Qwen2_5_VLConfig.from_pretrained(out)
    ids = {k: getattr(small, k) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                          "vision_end_token_id")}
    text = {**QWEN25_VL_3B_TEXT, "eos_token_id": small.text_config.eos_token_id,
            "pad_token_id": small.text_config.pad_token_id, "bos_token_id": None}
    config = Qwen2_5_VLConfig(text_config=text, vision_config=QWEN25_VL_3B_VISION, tie_word_embeddings=True, **ids)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.generation_config.eos_token_id = small.text_config.eos_token_id
    model.generation_config.pad_token_id = small.text_config.pad_token_id
    for stale in out.glob("model*.safetensors*"):
        stale.unlink()
    model.save_pretrained(out)
    proc = load_processor(out)
    images = Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    processor_without_video_class("Qwen2_5_VLProcessor")(
        image_processor=images, tokenizer=proc.tokenizer, chat_template=proc.chat_template
    ).save_pretrained(out)
    (out / "gpu_smoke.json").write_text(json.dumps({"shape": "Qwen2.5-VL-3B", "parameters": model.num_parameters()}))
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the phases run in other processes: leave them the whole GPU
    return out


def run_phase(name: str, model: Path, work: Path, tiny: bool, deadline: float) -> dict[str, Any]:
    """One phase in this process; its figures, or why it did not run."""
    sizes = gpu_phases.TINY if tiny else gpu_phases.FULL
    shutil.rmtree(work, ignore_errors=True)  # a rerun starts clean
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    try:
        match name:
            case "sft_hf":
                result = gpu_phases.sft(model, work, sizes, backend="hf", finetune="lora")
            case "sft_unsloth":
                result = gpu_phases.sft(model, work, sizes, backend="unsloth", finetune="lora")
            case "sft_full":
                result = gpu_phases.sft(model, work, sizes, backend="hf", finetune="full")
            case "grpo_lora":
                result = gpu_phases.grpo(model, work, sizes, lora=True, deadline=deadline)
            case "grpo_full":
                result = gpu_phases.grpo(model, work, sizes, lora=False, deadline=deadline)
            case "rollout":
                result = gpu_phases.rollout_throughput(model, work, sizes, deadline=deadline)
            case _:
                raise ValueError(f"unknown phase {name!r} (known: {', '.join(PHASES)})")
    except Exception as exc:  # noqa: BLE001  (a failed phase is reported; the others still run)
        traceback.print_exc()
        result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:2000], "peak_gib": gpu_phases.peak_gib()}
    return {"phase": name, **result, "wall_s": round(time.perf_counter() - t0, 1)}


def _gib(r: dict[str, Any]) -> str:
    return "n/a (CPU)" if r.get("peak_gib") is None else f"{r['peak_gib']} GiB"


def readable(r: dict[str, Any]) -> str:
    """One line a person reads for a phase result."""
    name, status = r["phase"], r["status"]
    if name in ("environment", "build"):
        return f"{name}: " + ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("phase", "status"))
    if status != "ok":
        why = r.get("reason") or r.get("error") or ""
        return f"{name}: {status}" + (f" ({why.splitlines()[0][:300]})" if why else "")
    if name.startswith("sft"):
        return (f"{name}: {r['step_s']:.3f} s/step, {r['tokens_per_s']:.0f} tokens/s, peak {_gib(r)} "
                f"(batch {r['batch']} x {r['dialogue_tokens']} tokens, {r['finetune']})")
    if name.startswith("grpo"):
        return (f"{name}: {r['steps_run']} steps, {r['step_s']} s/step = rollout {r['rollout_s']} + train "
                f"{r['train_s']}, peak {_gib(r)}, grad_norm finite {r['grad_norms_finite']}/"
                f"{r['grad_norms_logged']} (max {r['grad_norm_max']}), lr {r['learning_rate']} {r['finetune']}")
    rates = ", ".join(f"{n}: {v['tokens_per_s']:.0f}" if isinstance(v, dict) else f"{n}: {v}"
                      for n, v in r["by_batch"].items())
    return f"{name}: tokens/s by trajectories {rates}; peak {_gib(r)}"


def emit(r: dict[str, Any], out: Path) -> None:
    print(MARKER + json.dumps(r), flush=True)
    print(readable(r), flush=True)
    with (out / RESULTS).open("a") as f:
        f.write(json.dumps(r) + "\n")


def environment() -> dict[str, Any]:
    import importlib.metadata as md

    import torch

    versions = {}
    for pkg in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "unsloth", "unsloth_zoo"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"phase": "environment", "status": "ok", "device": device, "python": sys.version.split()[0], **versions}


def run(out: Path, *, tiny: bool, budget_s: float, phases: list[str], isolate: bool, work: Path | None = None) -> int:
    """Build the model, then every phase within ``budget_s`` seconds; returns how many phases failed.
    ``out`` gets the results only; the model and each phase's files go under ``work`` (default
    ``out/work``)."""
    start = time.time()
    work = work or out / "work"
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS).unlink(missing_ok=True)
    emit(environment(), out)
    t = time.perf_counter()
    model = build(work / "model", tiny)
    emit({"phase": "build", "status": "ok", **json.loads((model / "gpu_smoke.json").read_text()),
          "wall_s": round(time.perf_counter() - t, 1)}, out)
    failed = 0
    for name in phases:
        left = budget_s - (time.time() - start)
        cap = min(PHASE_CAP_S[name] * (10 if tiny else 1), left)  # a dry run's CPU is slower
        if cap < 15:
            r = {"phase": name, "status": "skipped", "reason": f"the {budget_s:.0f} s budget is spent"}
        elif isolate:
            r = _subprocess_phase(name, model, work / name, tiny, cap)
        else:
            r = run_phase(name, model, work / name, tiny, deadline=time.time() + cap)
        failed += r["status"] == "failed"
        emit(r, out)
    print(report(out), flush=True)
    return failed


def _subprocess_phase(name: str, model: Path, work: Path, tiny: bool, cap: float) -> dict[str, Any]:
    """One phase in a child process with a timeout; its result line, or what stopped it."""
    cmd = [sys.executable, __file__, "phase", name, "--model", str(model), "--work", str(work),
           "--deadline", str(time.time() + cap - 5)] + (["--tiny"] if tiny else [])
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=cap,
                              env=os.environ.copy())
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stderr or b"")[-1500:]
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        return {"phase": name, "status": "failed", "error": f"timed out after {cap:.0f} s: {tail}"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARKER)]
    if lines:
        return json.loads(lines[-1][len(MARKER):])
    return {"phase": name, "status": "failed", "error": f"exit {proc.returncode}: {proc.stderr[-1500:]}"}


def report(folder: Path) -> str:
    """The figures in ``folder/results.jsonl`` and the ratios against the goals."""
    rows = {}
    if (folder / RESULTS).is_file():
        for line in (folder / RESULTS).read_text().splitlines():
            r = json.loads(line)
            rows[r["phase"]] = r
    lines = ["== results"] + [readable(r) for name, r in rows.items() if name in PHASES]
    hf, un = rows.get("sft_hf", {}), rows.get("sft_unsloth", {})
    if hf.get("status") == "ok" and un.get("status") == "ok":
        speed = un["tokens_per_s"] / hf["tokens_per_s"]
        memory = un["peak_gib"] / hf["peak_gib"] if un.get("peak_gib") and hf.get("peak_gib") else None
        met = speed >= GOAL_SPEEDUP and memory is not None and memory <= GOAL_MEMORY_SHARE
        lines.append(f"Unsloth vs HF SFT: {speed:.2f}x the tokens/s, "
                     + (f"{memory:.2f}x the peak memory" if memory is not None else "peak memory not measured")
                     + f"; goal >= {GOAL_SPEEDUP}x at <= {GOAL_MEMORY_SHARE:.0%}: {'met' if met else 'not met'}")
    else:
        missing = "HF" if hf.get("status") != "ok" else "Unsloth"
        lines.append(f"Unsloth vs HF SFT: not measured (no {missing} result: "
                     f"{(hf if missing == 'HF' else un).get('status', 'not run')})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/gpu_smoke.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="build the model and run the phases within the budget")
    r.add_argument("--out", type=Path, required=True, help="the results (results.jsonl)")
    r.add_argument("--work", type=Path, default=None, help="the model and the phases' files (default OUT/work;"
                   " the 3B model is 7.5 GB and is reused when it is there)")
    r.add_argument("--dry-run", action="store_true", help="tiny model and sizes, every phase in this process (CPU)")
    r.add_argument("--budget-s", type=float, default=500, help="seconds for the whole run (default 500)")
    r.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    r.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="each phase in its own process (default: on, except with --dry-run)")
    p = sub.add_parser("phase", help="one phase in this process (what `run` starts per phase)")
    p.add_argument("name", choices=PHASES)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--deadline", type=float, default=None, help="epoch seconds by which to finish")
    p.add_argument("--tiny", action="store_true")
    rep = sub.add_parser("report", help="print the results in a run folder")
    rep.add_argument("folder", type=Path)
    ns = parser.parse_args(argv)

    match ns.cmd:
        case "run":
            phases = [x for x in ns.phases.split(",") if x]
            if unknown := sorted(set(phases) - set(PHASES)):
                parser.error(f"--phases: unknown {', '.join(unknown)} (known: {', '.join(PHASES)})")
            isolate = (not ns.dry_run) if ns.isolate is None else ns.isolate
            failed = run(ns.out, tiny=ns.dry_run, budget_s=ns.budget_s, phases=phases, isolate=isolate, work=ns.work)
            return 1 if failed else 0
        case "phase":
            deadline = ns.deadline or time.time() + PHASE_CAP_S[ns.name]
            result = run_phase(ns.name, ns.model, ns.work, ns.tiny, deadline)
            print(MARKER + json.dumps(result), flush=True)
            return 0
        case "report":
            print(report(ns.folder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
