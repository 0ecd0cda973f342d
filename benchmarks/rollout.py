"""Multi-turn rollouts: the batched engine against per-dialogue sequential generation. One measured run.

    python benchmarks/rollout.py                                  # SmolLM2 and the tiny VLM, 8 and 32
    python benchmarks/rollout.py --models smollm2 --trajectories 8 --turns 5 --tokens 32
    python benchmarks/rollout.py --engine vllm --modes sequential batched   # GPU, vLLM installed

The same trajectories (RL prompts from packaged seeds, each repeated K times as GRPO does; static
next turns, so every mode plays the same user turns; the offline ``rules`` tutor grades each turn)
are rolled out by:

- ``sequential``: one dialogue at a time, one ``generate`` per turn over the whole history (what a
  per-dialogue loop over a transformers model does);
- ``batched, re-encode``: `steerkit.rollout.rollout` with one ``generate`` per turn over all live
  trajectories, re-encoding every history each turn (``reuse_cache=False``);
- ``batched``: the engine's default, which keeps the KV cache between turns;
- ``batched, bf16 copy``: the same, sampling from a bfloat16 copy of the weights.

``--engine vllm`` runs the ``batched`` mode through the vLLM turn engine instead
(`steerkit.rollout_vllm.VLLMTurns` over TRL's ``VLLMGeneration`` in colocate mode, as GRPO with
``use_vllm=True`` does); ``sequential`` stays transformers ``generate``, so the ratio is vLLM's gain.
It needs vLLM (the GPU environment, environment.yml) and exits with a message where it is missing.

Tokens per second count the student tokens kept in the trajectories (up to each answer's stop
token), so a batched run is not credited for the padding it decodes after a row has stopped. The
ratio is each mode's tokens/s over the sequential mode's, measured in the same run. Last, the
decode-step gain: n x (one decoding step at batch 1) / (one step at batch n), what batching alone
can give the decoding phase on this machine (re-encoding the history adds to the sequential side).
The tiny VLM is random-initialised (it rarely samples its stop token, so its answers run to
``--tokens``) and its first user turn carries a photo.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def samples_for(model_name: str, n: int, turns: int, root: Path) -> list:
    from steerkit.rl_data import rl_rows
    from steerkit.rollout import RolloutSample
    from steerkit.smoke_inputs import seed_rl_dialogues

    vision = model_name != "smollm2"
    k = 4 if n >= 4 else 1
    scripts, data_root = seed_rl_dialogues(root / model_name, max(1, n // k), turns=turns, with_images=vision)
    rows = rl_rows(scripts, data_root, vision=vision)
    return [RolloutSample(prompt=r["prompt"], static_turns=r["static_turns"], images=r.get("images", []),
                          id=r["id"], image_refs=r["image_refs"], root=Path("/"), goal=r["goal"])
            for r in rows for _ in range(k)][:n]


def timed(label: str, samples: list, model, proc, *, turns: int, tokens: int, batched: bool,
          reuse_cache: bool = True, dtype: str | None = None, seed: int = 0, engine=None) -> dict:
    import torch

    from steerkit.roles import Roles
    from steerkit.rollout import RolloutConfig, rollout

    cfg = RolloutConfig(max_turns=turns, max_new_tokens=tokens, feedback=False, reuse_cache=reuse_cache,
                        generation_dtype=dtype)
    tutor = Roles({"tutor": "rules"}).client("tutor")
    torch.manual_seed(seed)
    start = time.perf_counter()
    if batched:
        trajs = rollout(samples, model=model, processing_class=proc, tutor=tutor, config=cfg, engine=engine)
    else:
        trajs = [t for s in samples for t in rollout([s], model=model, processing_class=proc, tutor=tutor, config=cfg)]
    wall = time.perf_counter() - start
    student = sum(sum(t.env_mask) for t in trajs)
    turns_played = sum(len(t.answers) for t in trajs)
    return {"mode": label, "wall_s": round(wall, 3), "student_tokens": student, "turns": turns_played,
            "tokens_per_s": round(student / wall, 2)}


def decode_step_gain(model, n: int, *, context: int = 256, steps: int = 20) -> dict:
    """What batching can give the decoding phase: ``n`` x (one step at batch 1) / (one step at batch ``n``).

    One step is a forward of one new token per row over a KV cache of ``context`` tokens, the work
    of every sampled token; the sequential mode pays it ``n`` times where the batched engine pays it once.
    """
    import torch

    def step_seconds(rows: int) -> float:
        for module in model.modules():  # Qwen2-VL family: 3D-rope offsets kept from the last prefill's rows
            if getattr(module, "rope_deltas", None) is not None:
                module.rope_deltas = None
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(100, 1000, (rows, context), generator=g)
        with torch.no_grad():
            cache = model(input_ids=ids, use_cache=True).cache
            token = ids[:, -1:]
            for _ in range(3):
                model(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1)
            start = time.perf_counter()
            for _ in range(steps):
                model(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1)
        return (time.perf_counter() - start) / steps

    one, many = step_seconds(1), step_seconds(n)
    return {"step_ms_batch_1": round(one * 1e3, 2), f"step_ms_batch_{n}": round(many * 1e3, 2),
            "gain": round(n * one / many, 2)}


def vllm_turns(model, proc, *, tokens: int):
    """The vLLM turn engine over TRL's VLLMGeneration (colocate: an in-process vllm.LLM on the checkpoint)."""
    from accelerate import Accelerator
    from trl.generation import VLLMGeneration

    from steerkit.models import vision_pad_token_ids
    from steerkit.rollout import _stop_ids, _tokenizer
    from steerkit.rollout_vllm import VLLMTurns

    vg = VLLMGeneration(model=model, accelerator=Accelerator(), processing_class=proc, mode="colocate",
                        gpu_memory_utilization=0.5, max_completion_length=tokens, top_k=0, logprobs=0)
    return VLLMTurns(vg, num_processes=1, stop=_stop_ids(model, _tokenizer(proc)),
                     suppress=vision_pad_token_ids(model.config))


def run(model_name: str, n: int, *, turns: int, tokens: int, root: Path, modes: list[str],
        engine: str = "generate") -> list[dict]:
    from steerkit.models import load_student
    from steerkit.tiny_vlm import build_tiny_vlm

    if model_name == "smollm2":
        model, proc = load_student("smollm2")
    else:
        model, proc = load_student(str(build_tiny_vlm(root / "tiny-vlm")))
    model.eval()
    if engine == "vllm" and model.device.type != "cuda":
        model.to("cuda")
    turn_engine = vllm_turns(model, proc, tokens=tokens) if engine == "vllm" else None
    samples = samples_for(model_name, n, turns, root)
    # one short warm-up so the first timed mode does not pay for lazy initialisation
    timed("warm-up", samples[:2], model, proc, turns=1, tokens=4, batched=True, engine=turn_engine)
    plan = {
        "sequential": {"batched": False, "reuse_cache": False},
        "batched, re-encode": {"batched": True, "reuse_cache": False},
        "batched": {"batched": True, "engine": turn_engine},
        "batched, bf16 copy": {"batched": True, "dtype": "bfloat16"},
    }
    rows, base = [], None
    for m in modes:  # sequential first: the others are printed as ratios to it
        r = timed(m, samples, model, proc, turns=turns, tokens=tokens, **plan[m])
        base = r["tokens_per_s"] if m == "sequential" else base
        r.update(model=model_name, trajectories=n, engine="generate" if m == "sequential" else engine,
                 ratio=round(r["tokens_per_s"] / base, 2) if base else None)
        print(f"{model_name:9s} {n:3d} trajectories  {r['mode']:20s} wall {r['wall_s']:8.2f} s"
              f"  {r['student_tokens']:6d} tokens  {r['tokens_per_s']:8.2f} tok/s  x{r['ratio']}", flush=True)
        rows.append(r)
    gain = decode_step_gain(model, n)
    print(f"{model_name:9s} {n:3d} trajectories  decode step: batch 1 {gain['step_ms_batch_1']:.1f} ms, batch {n}"
          f" {gain[f'step_ms_batch_{n}']:.1f} ms: batching gain x{gain['gain']}", flush=True)
    rows.append({"mode": "decode-step gain", "model": model_name, "trajectories": n, **gain})
    return rows


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2", "tiny-vlm"], choices=["smollm2", "tiny-vlm"])
    ap.add_argument("--trajectories", nargs="+", type=int, default=[8, 32])
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=32, help="student tokens per turn (at most)")
    ap.add_argument("--modes", nargs="+", default=["sequential", "batched, re-encode", "batched"],
                    help='also "batched, bf16 copy" (slow on CPUs without bf16 matrix units)')
    ap.add_argument("--engine", choices=["generate", "vllm"], default="generate",
                    help="the turn engine of the batched mode (vllm: GPU with vLLM installed)")
    ap.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = ap.parse_args()
    if args.engine == "vllm":
        if importlib.util.find_spec("vllm") is None:
            sys.exit("--engine vllm needs vLLM, which is not installed here: use the GPU environment"
                     " (conda env create -f environment.yml, which pins vllm==0.30.0)")
        if set(args.modes) - {"sequential", "batched"}:
            ap.error('--engine vllm runs the modes "sequential" and "batched" only')
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads,"
          f" load average {os.getloadavg()[0]:.2f}; {args.turns} turns, <= {args.tokens} tokens a turn")
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for model_name in args.models:
            for n in args.trajectories:
                out += run(model_name, n, turns=args.turns, tokens=args.tokens, root=Path(tmp), modes=args.modes,
                           engine=args.engine)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
