"""The `generate` turn engine: one batched transformers ``generate`` per turn, KV cache kept.

This is the engine for CPU and small GPUs (`steerkit.rollout_vllm` is the one for vLLM); both follow
`steerkit.rollout.TurnEngine`.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from steerkit.rollout import RolloutConfig


def _left_padded(rows: list[list[int]], pad_id: int) -> tuple[Any, Any]:
    """Token rows as one left-padded (ids, attention mask) pair of tensors."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask


def generation_copy(model: Any, dtype: str | None) -> Any:
    """The model to sample from: ``model`` itself, or a copy in ``dtype`` with any LoRA merged into it.

    A half-precision copy makes each decoding step cheaper while the trained weights stay in full
    precision (what vLLM-backed GRPO does too). It is taken per rollout, so it follows every update.
    """
    import copy

    import torch

    if dtype is None or getattr(torch, dtype) == model.dtype:
        return model
    clone = copy.deepcopy(model)
    if hasattr(clone, "merge_and_unload"):  # PEFT: one plain model, no adapter hooks while decoding
        clone = clone.merge_and_unload()
    return clone.to(getattr(torch, dtype)).eval()


@functools.cache
def _cache_name() -> str:
    """``generate``'s name for the KV cache (argument and output field): ``cache`` in transformers
    5.2x, ``past_key_values`` in 5.17 (which Unsloth's environment pins)."""
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    return "cache" if "cache" in GenerateDecoderOnlyOutput.__dataclass_fields__ else "past_key_values"


class TurnGenerator:
    """One batched ``generate`` per turn over the live trajectories, keeping the KV cache between turns.

    Turn 1 encodes the prompts (left padding). Later turns feed only what is new since the last
    ``generate``: its final sampled token and the inserted user turn. Rows are re-selected from the
    cache as trajectories end. Tokens a row sampled after its stop token stay in the cache as holes
    with attention mask 0, so positions (the mask's cumulative sum, plus Qwen2.5-VL's stored rope
    deltas) and attended tokens equal those of the dense sequence the trainer scores. With
    ``reuse_cache=False`` every turn re-encodes the whole history instead (the reference path).
    """

    def __init__(self, model: Any, *, pad_id: int, stop: list[int], suppress: list[int], cfg: RolloutConfig,
                 reuse_cache: bool = True) -> None:
        self.model, self.pad_id, self.stop, self.suppress, self.cfg = model, pad_id, stop, suppress, cfg
        self.reuse_cache = reuse_cache
        self.cache: Any = None
        self.ids: Any = None  # the last generate's sequences, (rows, width)
        self.mask: Any = None  # their attention mask, 0 on padding and on tokens sampled after a stop
        self.row_of: dict[int, int] = {}  # sample index -> row in ids / mask / cache

    def more(self, n_live: int) -> bool:
        return n_live > 0

    def __call__(self, live: list[int], seqs: list[list[int]], new: list[list[int]],
                 enc: list[dict[str, Any]]) -> tuple[list[list[int]], list[list[float]]]:
        """Sample one answer per live row; returns new tokens (up to the stop) and their log-probs.

        Args:
            live: sample indices of the live trajectories.
            seqs: each live row's whole token sequence so far (prompt, answers, inserted turns).
            new: each live row's tokens inserted since its last answer (empty on turn 1).
            enc: each live row's encoded prompt (pixel values for VLMs).
        """
        import torch

        if self.reuse_cache and self.cache is not None:
            ids, mask, kwargs = self._continue(live, new)
        else:
            ids, mask, kwargs = self._encode(seqs, enc)
        image_id = getattr(self.model.config, "image_token_id", None)
        if image_id is not None:
            mm = (ids == image_id).long()
            video_id = getattr(self.model.config, "video_token_id", None)
            if video_id is not None:
                mm[ids == video_id] = 2
            kwargs["mm_token_type_ids"] = mm
        cfg, device = self.cfg, self.model.device
        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device),
                **{k: (v.to(device) if hasattr(v, "to") and k != _cache_name() else v) for k, v in kwargs.items()},
                do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0, min_p=None,
                repetition_penalty=None, max_new_tokens=cfg.max_new_tokens, suppress_tokens=self.suppress or None,
                eos_token_id=self.stop, pad_token_id=self.pad_id, return_dict_in_generate=True, output_logits=True,
                use_cache=True,
            )
        width = ids.shape[1]
        sampled = out.sequences[:, width:].cpu()
        # log-prob of each sampled token under the policy at this temperature (what the trainer recomputes)
        logits = torch.stack(out.logits, dim=1).float().cpu() / cfg.temperature
        logps = torch.log_softmax(logits, dim=-1).gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
        toks, lps = [], []
        kept = torch.zeros_like(sampled)
        for i in range(len(live)):
            row = sampled[i].tolist()
            end = next((j + 1 for j, t in enumerate(row) if t in self.stop), len(row))
            toks.append(row[:end])
            lps.append(logps[i, :end].tolist())
            kept[i, :end] = 1
        if self.reuse_cache:
            self.cache = getattr(out, _cache_name())
            self.ids = out.sequences.cpu()
            self.mask = torch.cat([mask, kept], dim=1)
            self.row_of = {s: r for r, s in enumerate(live)}
        return toks, lps

    def _encode(self, seqs: list[list[int]], enc: list[dict[str, Any]]) -> tuple[Any, Any, dict[str, Any]]:
        import torch

        ids, mask = _left_padded(seqs, self.pad_id)
        kwargs: dict[str, Any] = {}
        with_images = [e for e in enc if "pixel_values" in e]
        if with_images:
            kwargs["pixel_values"] = torch.cat([e["pixel_values"] for e in with_images])
            kwargs["image_grid_thw"] = torch.cat([e["image_grid_thw"] for e in with_images])
        return ids, mask, kwargs

    def _continue(self, live: list[int], new: list[list[int]]) -> tuple[Any, Any, dict[str, Any]]:
        """The cached rows of ``live`` plus their new tokens, left-padded as a block after the cache."""
        import torch

        rows = [self.row_of[i] for i in live]
        if rows != list(range(self.ids.shape[0])):
            index = torch.tensor(rows, dtype=torch.long)
            self.cache.batch_select_indices(index.to(self.model.device))
            for module in self.model.modules():  # Qwen2-VL family: per-row 3D rope offsets
                deltas = getattr(module, "rope_deltas", None)
                if isinstance(deltas, torch.Tensor) and deltas.shape[0] == self.ids.shape[0]:
                    module.rope_deltas = deltas[index.to(deltas.device)]
            self.ids, self.mask = self.ids[index], self.mask[index]
        block, block_mask = _left_padded(new, self.pad_id)
        ids = torch.cat([self.ids, block], dim=1)
        mask = torch.cat([self.mask, block_mask], dim=1)
        return ids, mask, {_cache_name(): self.cache}
