"""Both turn engines behind `steerkit.rollout.TurnEngine` give the trainer the same rows.

No machine running these tests has vLLM, so the vLLM engine runs against its exact interface: TRL
1.16's own ``VLLMGeneration.generate`` and ``sync_weights`` (the real code) drive `ContractLLM`, an object
with ``vllm.LLM.generate(prompts, sampling_params, use_tqdm=...)``'s signature that answers with
``RequestOutput`` / ``CompletionOutput`` / ``Logprob`` objects carrying vLLM's field names, sampling with
the real tiny VLM so the log-probs are real. ``ContractSamplingParams`` takes exactly the keywords vLLM's
``SamplingParams`` has for what TRL sets and rejects any other.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steerkit.grpo import GRPORunConfig, make_trainer
from steerkit.rl_data import rl_rows
from steerkit.rollout import RolloutConfig, RolloutSample, rollout
from steerkit.rollout_vllm import SUPPRESS_BIAS, VLLMTurns

# ---- vLLM's types, field for field (vllm/outputs.py, vllm/logprobs.py, vllm/sampling_params.py) ----


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None
    prompt_logprobs: Any
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int | None = None


@dataclass(kw_only=True)
class ContractSamplingParams:
    """The `vllm.SamplingParams` keywords TRL's colocate path sets (unknown ones raise, as in vLLM)."""

    n: int = 1
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    structured_outputs: Any = None


class ContractLLM:
    """``vllm.LLM``'s generate and weight-loading surface over a copy of a transformers VLM."""

    def __init__(self, model: Any, processor: Any) -> None:
        from steerkit.rollout import _stop_ids

        self.model, self.proc = copy.deepcopy(model).eval(), processor
        self.stop = _stop_ids(model, processor.tokenizer)
        self.calls: list[int] = []  # prompts per generate call
        self.loaded = 0
        runner = type("Runner", (), {"model": self})()
        self.llm_engine = type("Engine", (), {"model_executor": type("Exec", (), {
            "driver_worker": type("Worker", (), {"model_runner": runner})()})()})()

    def load_weights(self, weights: list[tuple[str, Any]]) -> None:  # model_runner.model.load_weights
        params = dict(self.model.named_parameters())
        for name, tensor in weights:
            params[name].data.copy_(tensor)
            self.loaded += 1

    def reset_prefix_cache(self) -> bool:
        return True

    def generate(self, prompts: list[dict[str, Any]], sampling_params: ContractSamplingParams | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        import torch

        from steerkit.rollout import RolloutConfig
        from steerkit.rollout_generate import TurnGenerator

        sp = sampling_params
        assert sp.n == 1 and sp.logprobs == 0 and sp.top_k == 0 and not use_tqdm
        self.calls.append(len(prompts))
        suppress = sorted(i for i, b in (sp.logit_bias or {}).items() if b <= SUPPRESS_BIAS)
        enc = []
        for p in prompts:
            assert set(p) <= {"prompt_token_ids", "multi_modal_data"}
            image = (p.get("multi_modal_data") or {}).get("image")
            images = image if isinstance(image, list) else ([image] if image is not None else [])
            enc.append(dict(self.proc.image_processor(images=images, return_tensors="pt")) if images else {})
        cfg = RolloutConfig(temperature=sp.temperature, top_p=sp.top_p, max_new_tokens=sp.max_tokens)
        sampler = TurnGenerator(self.model, pad_id=self.proc.tokenizer.pad_token_id, stop=self.stop,
                                suppress=suppress, cfg=cfg, reuse_cache=False)
        seqs = [list(p["prompt_token_ids"]) for p in prompts]
        with torch.no_grad():
            toks, lps = sampler(list(range(len(seqs))), seqs, [[] for _ in seqs], enc)
        out = []
        for k, (ids, t, lp) in enumerate(zip(seqs, toks, lps, strict=True)):
            done = bool(t) and t[-1] in self.stop
            per_token = [{tok: Logprob(logprob=v, rank=None, decoded_token=self.proc.tokenizer.decode([tok]))}
                         for tok, v in zip(t, lp, strict=True)]
            out.append(RequestOutput(
                request_id=str(k), prompt=None, prompt_token_ids=ids, prompt_logprobs=None, finished=True,
                outputs=[CompletionOutput(index=0, text=self.proc.tokenizer.decode(t, skip_special_tokens=True),
                                          token_ids=t, cumulative_logprob=sum(lp), logprobs=per_token,
                                          finish_reason="stop" if done else "length",
                                          stop_reason=None)],
            ))
        return out


def contract_vllm_generation(model: Any, processor: Any, accelerator: Any, *, temperature: float = 1.0,
                             max_completion_length: int, monkeypatch: Any) -> Any:
    """TRL's real ``VLLMGeneration`` in colocate mode, its ``llm`` a `ContractLLM` (what __init__ would set)."""
    from trl.distributed import DistributedBackend
    from trl.generation import vllm_generation as vg_module

    monkeypatch.setattr(vg_module, "SamplingParams", ContractSamplingParams, raising=False)
    vg = object.__new__(vg_module.VLLMGeneration)
    vg.__dict__.update(
        model=model, accelerator=accelerator, _dist=DistributedBackend(accelerator), processing_class=processor,
        mode="colocate", structured_outputs_regex=None, tensor_parallel_size=1, enable_sleep_mode=False,
        repetition_penalty=1.0, temperature=temperature, top_p=1.0, top_k=0, min_p=0.0,
        max_completion_length=max_completion_length, logprobs=0, generation_kwargs={}, _weight_metadata=None,
        llm=ContractLLM(model, processor),
    )
    return vg


class ContractVLLMClient:
    """TRL 1.16 ``VLLMClient``'s ``image_features`` and ``generate`` (the server side of ``trl vllm-serve``).

    Features are opaque to the trainer except ``mm_placeholders``, which TRL re-points at the image
    tokens of each prompt; this double keeps the images in them to sample with `ContractLLM`.
    """

    def __init__(self, llm: ContractLLM) -> None:
        self.llm = llm
        self.requests: list[dict[str, Any]] = []

    def image_features(self, images: list[list | None], max_concurrent_requests: int = 64) -> list[dict | None]:
        return [{"mm_placeholders": {"image": [{"offset": 0, "length": 1}] * len(imgs)}, "images": imgs}
                if imgs else None for imgs in images]

    def generate(self, prompts: list[list[int]], features: list[dict | None] | None = None, n: int = 1,
                 repetition_penalty: float = 1.0, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 min_p: float = 0.0, max_tokens: int = 16, logprobs: int | None = 0,
                 structured_outputs_regex: str | None = None, generation_kwargs: dict | None = None) -> dict:
        self.requests.append({"features": features, "generation_kwargs": generation_kwargs})
        image_id = self.llm.proc.image_token_id
        rows = []
        for k, ids in enumerate(prompts):
            f = features[k] if features else None
            if f is not None:  # TRL placed one run of image tokens per image, at this prompt's own offsets
                runs = f["mm_placeholders"]["image"]
                assert len(runs) == len(f["images"])
                assert all(set(ids[r["offset"]:r["offset"] + r["length"]]) == {image_id} for r in runs)
            row = {"prompt_token_ids": ids}
            if f is not None:
                row["multi_modal_data"] = {"image": f["images"]}
            rows.append(row)
        sp = ContractSamplingParams(n=n, repetition_penalty=repetition_penalty, temperature=temperature,
                                    top_p=top_p, top_k=top_k, min_p=min_p, max_tokens=max_tokens, logprobs=logprobs,
                                    **(generation_kwargs or {}))
        outs = self.llm.generate(rows, sampling_params=sp, use_tqdm=False)
        comps = [o.outputs[0] for o in outs]
        return {"prompt_ids": [o.prompt_token_ids for o in outs], "completion_ids": [c.token_ids for c in comps],
                "logprobs": [[[lp[t].logprob] for t, lp in zip(c.token_ids, c.logprobs, strict=True)]
                             for c in comps],
                "logprob_token_ids": [[[t] for t in c.token_ids] for c in comps]}


# ---- fixtures ---------------------------------------------------------------------------------


def samples_from(rows, k):
    return [RolloutSample(prompt=r["prompt"], static_turns=r["static_turns"], images=r.get("images", []),
                          id=r["id"], image_refs=r["image_refs"], root=Path("/"), goal=r["goal"])
            for r in rows for _ in range(k)]


def rules_tutor():
    from steerkit.roles import Roles

    return Roles({"tutor": "rules"}).client("tutor")


def varied_tutor():
    """Alternates a full breach and an ideal answer call by call, so every GRPO group has reward spread."""
    import itertools
    import json

    from steerkit.backends.scripted import ScriptedBackend
    from steerkit.clients import ChatClient

    calls = itertools.count()

    def grade(request):
        level = (1, 10)[next(calls) % 2]
        return json.dumps({"diagnosis": "scripted", "attack_strategy": "persistence", "new_question": "",
                           "scores": {"safety": level, "usefulness": level, "faithfulness": 5}})

    return ChatClient(ScriptedBackend(grade, name="alternating"), role="tutor")


def engine_over(model, proc, vg):
    from steerkit.models import vision_pad_token_ids
    from steerkit.rollout import _stop_ids

    return VLLMTurns(vg, num_processes=1, stop=_stop_ids(model, proc.tokenizer),
                     suppress=vision_pad_token_ids(model.config))


# ---- tests ------------------------------------------------------------------------------------


def test_both_engines_give_the_same_rows_on_the_tiny_vlm(tiny, rl_set, monkeypatch):
    """Same seed, same sampler: the vLLM path (TRL's generate, vLLM's types) loses and adds nothing."""
    import torch
    from accelerate import Accelerator

    model, proc = tiny
    scripts, root = rl_set
    samples = samples_from(rl_rows(scripts[:2], root, vision=True), k=2)
    cfg = RolloutConfig(max_turns=3, max_new_tokens=10, feedback=False, reuse_cache=False)
    torch.manual_seed(3)
    by_generate = rollout(samples, model=model, processing_class=proc, tutor=rules_tutor(), config=cfg)
    vg = contract_vllm_generation(model, proc, Accelerator(cpu=True), max_completion_length=10,
                                  monkeypatch=monkeypatch)
    engine = engine_over(model, proc, vg)
    torch.manual_seed(3)
    by_vllm = rollout(samples, model=model, processing_class=proc, tutor=rules_tutor(), config=cfg, engine=engine)

    image_pad = model.config.image_token_id
    assert vg.generation_kwargs["logit_bias"][image_pad] == SUPPRESS_BIAS  # pads biased out of vLLM sampling
    assert vg.llm.calls == [4, 4, 4]  # one generate per turn over all live trajectories
    for g, v in zip(by_generate, by_vllm, strict=True):
        assert v.prompt_ids == g.prompt_ids and image_pad in v.prompt_ids
        assert v.completion_ids == g.completion_ids and v.env_mask == g.env_mask
        assert len(v.logprobs) == len(v.completion_ids)
        assert max(abs(a - b) for a, b in zip(v.logprobs, g.logprobs, strict=True)) < 1e-6
        assert v.user_turns == g.user_turns and v.ended == g.ended
        assert all(lp == 0.0 for lp, m in zip(v.logprobs, v.env_mask, strict=True) if m == 0)


def test_server_mode_sends_images_as_features_placed_on_each_prompt(tiny, rl_set, monkeypatch):
    """TRL's server branch (gather, image features placed on the prompt's image tokens, broadcast) carries
    the multi-turn prompts, and the rows equal the colocate engine's."""
    import torch
    from accelerate import Accelerator

    model, proc = tiny
    scripts, root = rl_set
    samples = samples_from(rl_rows(scripts[:2], root, vision=True), k=2)
    cfg = RolloutConfig(max_turns=3, max_new_tokens=10, feedback=False, reuse_cache=False)
    vg = contract_vllm_generation(model, proc, Accelerator(cpu=True), max_completion_length=10,
                                  monkeypatch=monkeypatch)
    torch.manual_seed(5)
    colocated = rollout(samples, model=model, processing_class=proc, tutor=rules_tutor(), config=cfg,
                        engine=engine_over(model, proc, vg))
    vg.mode, vg.vllm_client = "server", ContractVLLMClient(vg.llm)
    torch.manual_seed(5)
    served = rollout(samples, model=model, processing_class=proc, tutor=rules_tutor(), config=cfg,
                     engine=engine_over(model, proc, vg))
    client = vg.vllm_client
    assert len(client.requests) == 3 and all(len(r["features"]) == 4 for r in client.requests)
    assert client.requests[0]["generation_kwargs"]["logit_bias"][model.config.image_token_id] == SUPPRESS_BIAS
    for c, s in zip(colocated, served, strict=True):
        assert (s.prompt_ids, s.completion_ids, s.env_mask) == (c.prompt_ids, c.completion_ids, c.env_mask)
        assert max(abs(a - b) for a, b in zip(s.logprobs, c.logprobs, strict=True)) < 1e-6


def test_a_collective_call_is_padded_to_the_widest_process(monkeypatch):
    """Server mode: every process sends as many prompts as the busiest one and keeps only its own answers."""
    import accelerate.utils

    class RecordingGeneration:
        mode, tensor_parallel_size, generation_kwargs = "server", 1, {}

        def __init__(self):
            self.calls = []

        def generate(self, prompts, images, num_generations, profiler=None):
            self.calls.append((prompts, images, num_generations))
            ids = [[7, 8, 2] if p[-1] == 1 else [9, 9, 9, 9] for p in prompts]
            return prompts, ids, [[[-0.5]] * len(i) for i in ids], None

    vg = RecordingGeneration()
    engine = VLLMTurns(vg, num_processes=2, stop=[2], suppress=[])
    counts = iter([[2, 3], [0, 1], [0, 0]])  # this process's live count, then the other's
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda obj: next(counts))
    assert engine.more(2)
    toks, lps = engine([0, 1], [[5, 1], [6, 0]], [[], []], [{}, {"images": ["img"]}])
    assert toks == [[7, 8, 2], [9, 9, 9, 9]] and lps[0] == [-0.5] * 3
    prompts, images, n = vg.calls[-1]
    assert len(prompts) == 3 and prompts[2] == [5, 1] and images == [None, ["img"], None] and n == 1
    assert engine.more(0)  # the other process still has a trajectory: this one still calls, padded
    assert engine([], [], [], []) == ([], []) and len(vg.calls[-1][0]) == 1
    assert not engine.more(0)


def test_a_grpo_step_through_the_vllm_engine(tiny_vlm_dir, rl_set, tmp_path, monkeypatch):
    """use_vllm selects the vLLM engine; TRL syncs the weights into it, keeps its sampling log-probs for
    the importance-sampling correction, and the same reward and logging code runs."""
    import json
    import math

    from steerkit.models import load_student

    model, proc = load_student(tiny_vlm_dir)
    scripts, root = rl_set
    rows = rl_rows(scripts[:2], root, vision=True)
    cfg = GRPORunConfig(prompts_per_step=2, num_generations=2, max_steps=2, max_turns=2, max_new_tokens=8,
                        lora=False, learning_rate=1e-3, beta=0.001)
    trainer = make_trainer(model, proc, rows, tutor=varied_tutor(), config=cfg, output_dir=tmp_path / "t",
                           run_dir=tmp_path)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # What GRPOTrainer.__init__ does with use_vllm=True, minus building vllm.LLM (not installed here).
    trainer.args.use_vllm = trainer.use_vllm = True
    trainer.vllm_mode = "colocate"
    trainer._last_loaded_step = -1
    trainer.vllm_generation = contract_vllm_generation(
        trainer.model, proc, trainer.accelerator, temperature=trainer.temperature,
        max_completion_length=trainer.max_completion_length, monkeypatch=monkeypatch)
    llm = trainer.vllm_generation.llm
    assert trainer.vllm_importance_sampling_correction
    trainer.train()

    n_params = len(list(trainer.model.parameters()))
    assert llm.loaded == 2 * n_params  # TRL pushed every weight before each step's rollout
    assert len(llm.calls) >= 2 and all(c == 4 for c in llm.calls)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) and h["grad_norm"] > 0 for h in logs)
    after = dict(trainer.model.named_parameters())
    assert any(not (before[n] == after[n].detach()).all() for n in before)  # the update moved the weights
    # vLLM's sampling log-probs met the trainer's own (synced weights; the sampler leaves the image pads
    # out, the trainer's forward does not, and batching differs: about 1e-4 apart on this model)
    gaps = [h[k] for h in logs for k in h if k.startswith("sampling/sampling_logp_difference")]
    assert gaps and max(gaps) < 1e-3, logs
    assert all(0.99 < h["sampling/importance_sampling_ratio/mean"] < 1.01 for h in logs)
    metrics = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(m["n"] == 4 for m in metrics)
    assert (tmp_path / "trajectories.jsonl").read_text().count("\n") == 8
