"""The vLLM turn engine: each turn of the tutor rollout sampled through TRL 1.16's vLLM integration.

With ``GRPOConfig(use_vllm=True)`` TRL builds ``trainer.vllm_generation`` (colocate: an in-process
``vllm.LLM``; server: a client of ``trl vllm-serve``) and, because a ``rollout_func`` is set, pushes the
trained weights into it whenever the global step changed, before calling the rollout. `VLLMTurns`
then follows `steerkit.rollout.TurnEngine`: per turn it sends every live trajectory's whole token
sequence (prompt, answers, inserted tutor turns) with its first-turn images as vLLM multimodal input
through ``vllm_generation.generate(prompts, images, num_generations=1)`` and keeps vLLM's sampling
log-probs, which TRL's importance-sampling correction compares with the trainer's own.

In server mode (and colocate with tensor parallelism) that call is collective: every process must
make it the same number of times with the same number of prompts, or the gather hangs and the
slices are wrong. So each turn the processes first agree on the largest live count, and a process
with fewer live trajectories pads its call with a copy of one of its rows and drops those answers.

Nothing here imports vLLM: TRL does. The engine is tested against TRL's own ``VLLMGeneration.generate``
driving an object with ``vllm.LLM.generate``'s signature and output types (tests/test_rollout_engines.py);
no machine running these tests has vLLM, so the path is tested by contract only (docs/vllm.md).
"""

from __future__ import annotations

from typing import Any

#: vLLM clamps a logit bias to [-100, 100]; -100 removes a token from sampling in practice.
SUPPRESS_BIAS = -100.0


class VLLMTurns:
    """A `steerkit.rollout.TurnEngine` over TRL's ``VLLMGeneration``.

    Args:
        vllm_generation: ``trainer.vllm_generation`` (TRL 1.16 ``trl.generation.VLLMGeneration``).
        num_processes: the world size (``trainer.accelerator.num_processes``).
        stop: token ids that end an answer (the model's end-of-turn and eos ids).
        suppress: token ids never to sample (a VLM's image and video placeholders).
    """

    def __init__(self, vllm_generation: Any, *, num_processes: int, stop: list[int],
                 suppress: list[int]) -> None:
        self.vg = vllm_generation
        self.stop, self.cut = set(stop), set(stop) | set(suppress)
        tp = int(getattr(vllm_generation, "tensor_parallel_size", 1) or 1)
        self.collective = num_processes > 1 and (vllm_generation.mode == "server" or tp > 1)
        self.width = 0  # the largest live count over all processes, agreed in `more`
        self.filler: tuple[list[int], list[Any] | None] | None = None
        if suppress:
            # A sampled <|image_pad|> breaks the trainer's next forward pass; vLLM has no suppress list,
            # so bias them out. Biases the user set in generation_kwargs win.
            bias = {i: SUPPRESS_BIAS for i in suppress}
            kwargs = dict(vllm_generation.generation_kwargs or {})
            kwargs["logit_bias"] = {**bias, **(kwargs.get("logit_bias") or {})}
            vllm_generation.generation_kwargs = kwargs

    def more(self, n_live: int) -> bool:
        if not self.collective:
            self.width = n_live
            return n_live > 0
        from accelerate.utils import gather_object

        self.width = max(gather_object([n_live]))
        return self.width > 0

    def __call__(self, live: list[int], seqs: list[list[int]], new: list[list[int]],
                 enc: list[dict[str, Any]]) -> tuple[list[list[int]], list[list[float]]]:
        images = [e.get("images") or None for e in enc]
        if seqs and self.filler is None:
            self.filler = (seqs[0], images[0])
        prompts, imgs = list(seqs), list(images)
        if self.collective and len(prompts) < self.width:
            if self.filler is None:
                raise RuntimeError("vLLM server rollout: this process has no trajectory to pad its call with")
            pad = self.width - len(prompts)
            prompts += [self.filler[0]] * pad
            imgs += [self.filler[1]] * pad
        if not prompts:
            return [], []
        _, completion_ids, logprobs, _ = self.vg.generate(
            prompts=prompts, images=imgs if any(i is not None for i in imgs) else None, num_generations=1,
        )
        if logprobs is None:
            raise RuntimeError("vLLM returned no sampling log-probs: TRL's VLLMGeneration must be built with"
                               " logprobs=0 (GRPOTrainer does), and a server needs --logprobs-mode"
                               " processed_logprobs")
        toks, lps = [], []
        for ids, lp in zip(completion_ids[: len(seqs)], logprobs[: len(seqs)], strict=True):
            ids = list(ids)
            end = next((j + (t in self.stop) for j, t in enumerate(ids) if t in self.cut),
                       len(ids))
            toks.append(ids[:end])
            # logprobs=0: one entry per token, the sampled token's; NaN comes back as None
            lps.append([float("nan") if p[0] is None else float(p[0]) for p in lp[:end]])
        return toks, lps


def vllm_engine(trainer: Any, model: Any) -> VLLMTurns:
    """The vLLM engine for ``trainer`` (``GRPOConfig(use_vllm=True)``), stopping where ``model`` stops."""
    from steerkit.models import vision_pad_token_ids
    from steerkit.rollout import _stop_ids, _tokenizer

    vg = getattr(trainer, "vllm_generation", None)
    if vg is None:
        raise RuntimeError("use_vllm is set but the trainer has no vllm_generation: TRL builds it in"
                           " GRPOTrainer.__init__ when vLLM is installed (pip install vllm==0.30.0)")
    return VLLMTurns(vg, num_processes=int(trainer.accelerator.num_processes),
                     stop=_stop_ids(model, _tokenizer(trainer.processing_class)),
                     suppress=vision_pad_token_ids(getattr(model, "config", None)))
