"""GPU smoke measurements on a randomly initialised model of Qwen2.5-VL-3B's shape (nothing downloaded).

Subcommands (each writes one JSON file; ``scripts/gpu_smoke.sh`` runs them in the right environments):

    build     --out DIR [--tiny]                    the model folder: tokenizer, processor, random weights
    sft       --model DIR --backend hf|unsloth      SFT step time and peak GPU memory (LoRA, images)
    generate  --model DIR --engine hf|vllm          rollout throughput (batched sampling, fixed lengths)
    report    DIR                                   the table and the ratios (Unsloth/HF, vLLM/HF)
    dry-run   --out DIR                             all of the above on the tiny model, on CPU

The model has Qwen2.5-VL-3B-Instruct's published shape (36 layers, hidden 2048, 16 heads, 2 KV heads,
MLP 11008, vocabulary 151,936, tied embeddings; a 32-block vision tower of width 1280), random weights,
and the workbench's own small tokenizer (`steerkit.tiny_vlm.build_tiny_vlm`): speed and memory depend on
the shape, not the weights. Rollouts sample token ids with end-of-sequence ignored, so both engines
produce exactly the same number of tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

#: Qwen2.5-VL-3B-Instruct's config.json (text and vision shapes), written out here.
QWEN25_VL_3B_TEXT = {
    "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
    "num_attention_heads": 16, "num_key_value_heads": 2, "max_position_embeddings": 128000, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
}
QWEN25_VL_3B_VISION = {
    "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 2048,
    "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31], "hidden_act": "silu", "in_chans": 3,
}
#: Image bounds for the smoke data: a 448x448 photo is 256 visual tokens after the 2x2 merge.
MIN_PIXELS, MAX_PIXELS = 56 * 56, 448 * 448


def build(out: Path, tiny: bool) -> Path:
    """The tiny VLM's tokenizer and processor, with the 3B shape's random weights unless ``tiny``."""
    from steerkit.models import load_processor, processor_without_video_class
    from steerkit.tiny_vlm import build_tiny_vlm

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
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.generation_config.eos_token_id = small.text_config.eos_token_id
    model.generation_config.pad_token_id = small.text_config.pad_token_id
    for stale in out.glob("model*.safetensors*"):
        stale.unlink()
    model.save_pretrained(out, safe_serialization=True)
    proc = load_processor(out)
    big_images = Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    processor_without_video_class("Qwen2_5_VLProcessor")(
        image_processor=big_images, tokenizer=proc.tokenizer, chat_template=proc.chat_template
    ).save_pretrained(out)
    (out / "gpu_smoke.json").write_text(json.dumps({"shape": "Qwen2.5-VL-3B", "parameters": model.num_parameters()}))
    return out


def smoke_data(folder: Path, n: int, side: int) -> Path:
    """``n`` three-turn dialogues with a ``side`` x ``side`` photo-like image in the first turn."""
    import numpy as np
    from PIL import Image

    from steerkit.schema import Dialogue, Message, write_jsonl

    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    answer = " ".join(["The picture shows a street with cars, a shop front and people walking."] * 6)
    for i in range(n):
        ref = f"images/{i}.png"
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(folder / ref)
        msgs = [Message(role="user", content="What is in this picture?", images=[ref])]
        for t in range(3):
            msgs.append(Message(role="assistant", content=f"<thinking>turn {t}</thinking><answer>{answer}</answer>"))
            if t < 2:
                msgs.append(Message(role="user", content="Tell me more about it, in detail."))
        rows.append(Dialogue(id=f"smoke-{i}", messages=msgs))
    write_jsonl(rows, folder / "steer_sft.jsonl")
    return folder


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure_sft(model: Path, backend: str, steps: int, per_device: int, side: int) -> dict:
    """Median optimizer-step time after one warm-up step, peak GPU memory, tokens/s (LoRA r=16)."""
    if backend == "unsloth":
        import unsloth  # noqa: F401  (before trl and transformers)
    import torch
    from transformers import TrainerCallback

    from steerkit.sft import SFTRecipe, build_trainer

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.durations: list[float] = []

        def on_step_begin(self, args, state, control, **kw):
            _sync()
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            _sync()
            self.durations.append(time.perf_counter() - self.t)

    work = Path(tempfile.mkdtemp(prefix=f"sft-{backend}-"))
    data = smoke_data(work / "data", n=per_device * (steps + 1), side=side)
    recipe = SFTRecipe(student=str(model), data=str(data), backend=backend, finetune="lora", max_steps=steps + 1,
                       batch_size=per_device, per_device_batch_size=per_device, learning_rate=1e-5,
                       max_length=None, logging_steps=1, save_steps=10**9, report_to="none",
                       runs_root=str(work / "runs"), run_id=backend)
    run_dir = work / "runs" / backend
    run_dir.mkdir(parents=True)
    trainer, info = build_trainer(recipe, run_dir)
    timer = StepTimer()
    trainer.add_callback(timer)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    step_s = statistics.median(timer.durations[1:]) if len(timer.durations) > 1 else timer.durations[0]
    tokens = trainer.state.log_history[-2].get("num_tokens") if len(trainer.state.log_history) > 1 else None
    return {
        "kind": "sft", "backend": backend, "steps": steps, "per_device_batch": per_device, "image_side": side,
        "step_s": step_s, "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "tokens_per_step": (tokens / len(timer.durations)) if tokens else None,
        "gradient_checkpointing": info["gradient_checkpointing"], "bf16": info["bf16"],
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }


def _prompts(model: Path, batch: int, prompt_len: int) -> list[list[int]]:
    import numpy as np

    from steerkit.models import load_processor

    vocab = len(load_processor(model).tokenizer)
    rng = np.random.default_rng(0)
    return rng.integers(16, vocab, (batch, prompt_len)).tolist()  # above the special tokens


def measure_generate(model: Path, engine: str, batch: int, prompt_len: int, new_tokens: int) -> dict:
    """Sampling throughput for ``batch`` prompts of ``prompt_len`` tokens, ``new_tokens`` each."""
    prompts = _prompts(model, batch, prompt_len)
    if engine == "vllm":
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        llm = LLM(model=str(model), dtype="bfloat16", skip_tokenizer_init=True, seed=0,
                  gpu_memory_utilization=0.5, max_model_len=prompt_len + new_tokens + 16,
                  limit_mm_per_prompt={"image": 0, "video": 0})
        params = SamplingParams(temperature=1.0, max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True,
                                detokenize=False)
        token_prompts = [TokensPrompt(prompt_token_ids=p) for p in prompts]
        llm.generate(token_prompts[:2], SamplingParams(max_tokens=8, detokenize=False))  # warm-up
        t = time.perf_counter()
        outs = llm.generate(token_prompts, params)
        seconds = time.perf_counter() - t
        produced = sum(len(o.outputs[0].token_ids) for o in outs)
    else:
        import torch

        from steerkit.models import load_student, vision_pad_token_ids

        net, _ = load_student(model, backend="hf")
        ids = torch.tensor(prompts, device=net.device)
        kw = {"do_sample": True, "temperature": 1.0, "top_k": 0, "suppress_tokens": vision_pad_token_ids(net.config),
              "pad_token_id": net.generation_config.pad_token_id}
        with torch.no_grad():
            net.generate(ids[:2], attention_mask=torch.ones_like(ids[:2]), max_new_tokens=8, **kw)  # warm-up
            _sync()
            t = time.perf_counter()
            out = net.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, **kw)
            _sync()
        seconds = time.perf_counter() - t
        produced = (out.shape[1] - prompt_len) * batch
    return {"kind": "generate", "engine": engine, "batch": batch, "prompt_len": prompt_len,
            "new_tokens": new_tokens, "seconds": seconds, "tokens_per_s": produced / seconds}


def report(folder: Path) -> str:
    """A table of the measurements in ``folder`` and the ratios between backends."""
    rows = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}
    lines = []
    for name, r in rows.items():
        if r["kind"] == "sft":
            peak = f"{r['peak_gib']:.1f} GiB" if r["peak_gib"] is not None else "n/a"
            lines.append(f"{name:14s} SFT step {r['step_s']:.3f} s, peak {peak} (batch {r['per_device_batch']})")
        else:
            lines.append(f"{name:14s} rollout {r['tokens_per_s']:.0f} tokens/s (batch {r['batch']} x {r['new_tokens']})")
    hf, un = rows.get("sft_hf"), rows.get("sft_unsloth")
    if hf and un:
        lines.append(f"Unsloth vs HF SFT: {hf['step_s'] / un['step_s']:.2f}x faster steps, "
                     f"{(un['peak_gib'] or 0) / (hf['peak_gib'] or 1):.2f}x the peak memory")
    else:
        lines.append("Unsloth vs HF SFT: not measured (" + ("no Unsloth result" if hf else "no HF result") + ")")
    g_hf, g_v = rows.get("generate_hf"), rows.get("generate_vllm")
    if g_hf and g_v:
        lines.append(f"vLLM vs HF generate: {g_v['tokens_per_s'] / g_hf['tokens_per_s']:.2f}x the tokens/s")
    else:
        lines.append("vLLM vs HF generate: not measured (" + ("no vLLM result" if g_hf else "no HF result") + ")")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], prog="scripts/gpu_smoke.py")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write the model folder")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--tiny", action="store_true", help="the tiny test VLM instead of the 3B shape")
    s = sub.add_parser("sft", help="SFT step time and peak memory")
    s.add_argument("--model", type=Path, required=True)
    s.add_argument("--backend", choices=["hf", "unsloth"], required=True)
    s.add_argument("--steps", type=int, default=4)
    s.add_argument("--per-device-batch", type=int, default=4)
    s.add_argument("--image-side", type=int, default=448)
    s.add_argument("--json", type=Path, required=True)
    g = sub.add_parser("generate", help="rollout throughput")
    g.add_argument("--model", type=Path, required=True)
    g.add_argument("--engine", choices=["hf", "vllm"], required=True)
    g.add_argument("--batch", type=int, default=64)
    g.add_argument("--prompt-len", type=int, default=512)
    g.add_argument("--new-tokens", type=int, default=256)
    g.add_argument("--json", type=Path, required=True)
    r = sub.add_parser("report", help="print the table and ratios")
    r.add_argument("folder", type=Path)
    d = sub.add_parser("dry-run", help="every HF step on the tiny model on CPU (checks the script itself)")
    d.add_argument("--out", type=Path, required=True)
    ns = parser.parse_args(argv)

    match ns.cmd:
        case "build":
            print(build(ns.out, ns.tiny))
        case "sft":
            result = measure_sft(ns.model, ns.backend, ns.steps, ns.per_device_batch, ns.image_side)
            ns.json.write_text(json.dumps(result, indent=1))
            print(json.dumps(result))
        case "generate":
            result = measure_generate(ns.model, ns.engine, ns.batch, ns.prompt_len, ns.new_tokens)
            ns.json.write_text(json.dumps(result, indent=1))
            print(json.dumps(result))
        case "report":
            print(report(ns.folder))
        case "dry-run":
            ns.out.mkdir(parents=True, exist_ok=True)
            model = build(ns.out / "model", tiny=True)
            sft = measure_sft(model, "hf", steps=2, per_device=2, side=56)
            (ns.out / "sft_hf.json").write_text(json.dumps(sft))
            gen = measure_generate(model, "hf", batch=4, prompt_len=16, new_tokens=8)
            (ns.out / "generate_hf.json").write_text(json.dumps(gen))
            print(report(ns.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
