"""An in-process transformers chat model: one batched ``generate`` per chunk of requests.

Generation on CPU is memory-bandwidth bound, so a batch of 32 costs little more than one prompt
(SmolLM2: 14 tokens/s at batch 1, 152 at batch 32): every call renders all requests with the chat
template, pads them on the left and generates them together. Requests with different sampling
parameters are generated in separate groups. Vision models see the images; text-only models read
``[Image: caption]`` (from ``Request.captions``) where an image was.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any

from steerkit.clients import Reply, Request, Sampling

log = logging.getLogger(__name__)

#: Requests generated together; SmolLM2 on 2 CPU cores still gains from 8 to 32 (STACK.md).
DEFAULT_MAX_BATCH = 32


class HFLocalBackend:
    """A loaded transformers model behind `steerkit.clients.ChatClient` (``batched=True``).

    Args:
        model: a causal LM or image-text-to-text model (also a PEFT-wrapped one).
        processor: its processor (vision models) or tokenizer (text models).
        name: stable model name for cache keys, e.g. ``"hf:/runs/sft/ckpt"``; required because the
            weights of an object in memory can change.
        max_batch: requests per ``generate`` call.
        generation_dtype: generate with a copy of the weights in this dtype (``"bfloat16"`` on CPU is
            1.5-2x faster with the same text); call `sync_weights` after training the model.

    Example::

        backend = HFLocalBackend.smollm2(generation_dtype="bfloat16")
        reply = ChatClient(backend).complete_sync(Request([Message(role="user", content="Hi")]))
    """

    batched = True
    max_concurrency = 1

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        name: str,
        max_batch: int = DEFAULT_MAX_BATCH,
        generation_dtype: str | None = None,
    ) -> None:
        from steerkit.models import is_real_processor, is_vision_model, vision_pad_token_ids

        if not name:
            raise ValueError("HFLocalBackend: give the model a stable name (name='hf:<path>'); it keys the reply cache")
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch}: must be at least 1")
        self.model = name
        self.max_batch = max_batch
        self.net = model
        self.processor = processor
        self.vision = is_vision_model(model.config)
        if self.vision and not is_real_processor(processor):
            raise ValueError(
                f"{name}: a vision model needs its processor, got {type(processor).__name__};"
                " load it with steerkit.models.load_processor"
            )
        self.tokenizer = processor.tokenizer if self.vision else processor
        self.suppress_ids = vision_pad_token_ids(model.config) if self.vision else []
        self.stop_ids = self._stop_ids()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[0]
        self.generation_dtype = generation_dtype
        self._gen_net: Any = None
        if generation_dtype is not None:
            self._gen_net = self._make_generation_copy(generation_dtype)
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        *,
        name: str | None = None,
        dtype: str | None = None,
        device: str | None = None,
        **kwargs: Any,
    ) -> HFLocalBackend:
        """Load a checkpoint folder (or ``"smollm2"``) with transformers and serve it."""
        from steerkit.models import load_student
        from steerkit.smollm2 import SMOLLM2

        model, processor = load_student(path, backend="hf", dtype=dtype, device=device)
        if name is None:
            name = SMOLLM2 if str(path) == SMOLLM2 else f"hf:{Path(path).expanduser().resolve()}"
            if kwargs.get("generation_dtype"):  # other weights, other text: other cache keys
                name += f"+{kwargs['generation_dtype']}"
        return cls(model, processor, name=name, **kwargs)

    @classmethod
    def smollm2(cls, **kwargs: Any) -> HFLocalBackend:
        """The embedded SmolLM2-135M-Instruct (materialised on first use)."""
        from steerkit.smollm2 import SMOLLM2

        return cls.from_pretrained(SMOLLM2, **kwargs)

    # --- weights ---------------------------------------------------------------------------------

    def _make_generation_copy(self, dtype: str) -> Any:
        from steerkit.models import generation_copy, torch_dtype

        if self.net.dtype == torch_dtype(dtype):
            return None
        return generation_copy(self.net, dtype)

    def sync_weights(self) -> None:
        """Refresh the generation copy from the (trained) model; a no-op without one."""
        if self._gen_net is not None:
            from steerkit.models import copy_weights

            with self._lock:
                copy_weights(self.net, self._gen_net)

    def _stop_ids(self) -> list[int]:
        ids: list[int] = []
        eos = self.tokenizer.eos_token_id
        for i in [eos, *([] if self.net.generation_config.eos_token_id is None else
                         _as_list(self.net.generation_config.eos_token_id))]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
        for tok in ("<|im_end|>", "<|endoftext|>"):
            i = self.tokenizer.convert_tokens_to_ids(tok)
            if isinstance(i, int) and i != self.tokenizer.unk_token_id and i not in ids:
                ids.append(i)
        if not ids:
            raise ValueError(f"{self.model}: the tokenizer has no end-of-sequence token")
        return ids

    # --- the Backend protocol ----------------------------------------------------------------------

    async def generate(self, requests: list[Request]) -> list[Reply]:
        """Replies in request order; runs in a worker thread so the event loop keeps serving others."""
        if not requests:
            return []
        return await asyncio.to_thread(self.generate_sync, requests)

    async def aclose(self) -> None:
        return None

    def generate_sync(self, requests: list[Request]) -> list[Reply]:
        """Generate replies for ``requests``: grouped by sampling, chunked by ``max_batch``."""
        out: list[Reply | None] = [None] * len(requests)
        groups: dict[Sampling, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            groups[req.sampling].append(i)
        with self._lock:
            for sampling, idx in groups.items():
                prepared: list[tuple[int, str, list[Path]]] = []
                for i in idx:
                    try:
                        text, paths = self.render(requests[i])
                    except ValueError as exc:  # an image ref outside the data root, a template error
                        out[i] = self._error(exc)
                        continue
                    prepared.append((i, text, paths))
                prepared.sort(key=lambda p: len(p[1]))  # similar lengths together: less padding
                for start in range(0, len(prepared), self.max_batch):
                    # images are opened chunk by chunk: a large evaluation never holds them all
                    chunk = []
                    for i, text, paths in prepared[start : start + self.max_batch]:
                        try:
                            chunk.append((i, text, [_open_rgb(p) for p in paths]))
                        except OSError as exc:  # a missing or unreadable image fails only its request
                            out[i] = self._error(exc)
                    if chunk:
                        for (i, _, _), reply in zip(chunk, self._generate_chunk(chunk, sampling), strict=True):
                            out[i] = reply
        return out  # type: ignore[return-value]

    def _error(self, exc: Exception) -> Reply:
        return Reply(text="", finish="error", model=self.model, error=f"{type(exc).__name__}: {exc}")

    # --- rendering -------------------------------------------------------------------------------

    def render(self, request: Request) -> tuple[str, list[Path]]:
        """The prompt text (chat template, generation prompt added) and the image files it shows.

        Vision models get an image placeholder per image, before the message's text; text-only
        models read ``[Image: caption]`` (``[Image]`` without a caption) and get no image files.
        """
        paths = request.image_paths()
        messages: list[dict[str, Any]] = []
        for m in request.messages:
            if self.vision:
                content = [{"type": "image"} for _ in m.images] + [{"type": "text", "text": m.content}]
                messages.append({"role": m.role, "content": content})
            else:
                notes = [f"[Image: {request.captions[ref]}]" if request.captions.get(ref) else "[Image]"
                         for ref in m.images]
                messages.append({"role": m.role, "content": "\n".join([*notes, m.content]) if notes else m.content})
        templater = self.processor if self.vision else self.tokenizer
        text = templater.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text, (paths if self.vision else [])

    # --- generation ------------------------------------------------------------------------------

    def _generate_chunk(self, chunk: list[tuple[int, str, list[Any]]], sampling: Sampling) -> list[Reply]:
        import torch

        net = self._gen_net if self._gen_net is not None else self.net
        texts = [c[1] for c in chunk]
        images = [im for c in chunk for im in c[2]]
        try:
            if self.vision:
                enc = self.processor(text=texts, images=images or None, padding=True, padding_side="left",
                                     return_tensors="pt")
            else:
                enc = self.tokenizer(texts, padding=True, padding_side="left", add_special_tokens=False,
                                     return_tensors="pt")
            enc = enc.to(net.device)
            if "pixel_values" in enc and net.dtype != enc["pixel_values"].dtype:
                enc["pixel_values"] = enc["pixel_values"].to(net.dtype)
            greedy = sampling.temperature <= 0
            kwargs: dict[str, Any] = {
                "max_new_tokens": sampling.max_tokens,
                "do_sample": not greedy,
                "eos_token_id": self.stop_ids,
                "pad_token_id": self.pad_id,
            }
            if not greedy:
                # top_k=0: transformers would otherwise default to 50, skewing sampling
                kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
            if self.suppress_ids:
                kwargs["suppress_tokens"] = self.suppress_ids
            was_training = net.training  # a model shared with a trainer: no dropout while generating
            net.eval()
            try:
                with torch.random.fork_rng(devices=_cuda_devices(net)):
                    if sampling.seed is not None:
                        torch.manual_seed(sampling.seed)
                    with torch.inference_mode():
                        seqs = net.generate(**enc, **kwargs)
            finally:
                net.train(was_training)
        except (RuntimeError, ValueError) as exc:  # e.g. out of memory, a prompt longer than the context
            log.exception("%s: generation failed for %d requests", self.model, len(chunk))
            return [self._error(exc) for _ in chunk]
        prompt_len = enc["input_ids"].shape[1]
        prompt_counts = enc["attention_mask"].sum(dim=1).tolist()
        replies = []
        for row, n_prompt in zip(seqs[:, prompt_len:].tolist(), prompt_counts, strict=True):
            stop_at = next((k for k, t in enumerate(row) if t in self.stop_ids), None)
            body = row if stop_at is None else row[:stop_at]
            replies.append(
                Reply(
                    text=self.tokenizer.decode(body, skip_special_tokens=True),
                    finish="length" if stop_at is None else "stop",
                    model=self.model,
                    prompt_tokens=int(n_prompt),
                    completion_tokens=len(body) + (stop_at is not None),
                )
            )
        return replies


def _open_rgb(path: Path) -> Any:
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def _as_list(x: int | list[int]) -> list[int]:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _cuda_devices(net: Any) -> list[int]:
    dev = getattr(net, "device", None)
    return [dev.index or 0] if dev is not None and dev.type == "cuda" else []
