"""A tiny, randomly initialised Qwen2.5-VL built in code: the VLM of tests and benchmarks.

Real code paths with no hub download: the same model class, processor and chat template as a real
Qwen2.5-VL, at 0.42M parameters, so a training step or a rollout runs in seconds on a CPU.
"""

from __future__ import annotations

import os
from pathlib import Path

from steerkit.models import processor_without_video_class
from steerkit.smollm2 import package_dir

#: Qwen2.5-VL's special tokens, in Qwen's order; the tiny VLM gives them the first ids.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)



def build_tiny_vlm(path: str | os.PathLike[str], *, seed: int = 0, vocab_size: int = 2048) -> Path:
    """Build a tiny, randomly initialised Qwen2.5-VL (0.42M parameters) and save it to ``path``.

    Real code paths, no hub: a byte-level BPE tokenizer trained on Python's bundled documentation
    text plus Qwen's special tokens, Qwen's chat template exactly as trl ships it (TRL recognises
    templates by their text), the PIL image processor with small pixel bounds (at most 16 patches of
    28 px), and a 2-layer text / 2-block vision model. Deterministic for a given ``seed``.

    Returns:
        ``path``, holding the model, tokenizer, processor and chat template.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    out = Path(path)
    corpus = (package_dir("pydoc_data") / "topics.py").read_text(encoding="utf-8")[:300_000]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(QWEN_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus.splitlines(), trainer=trainer)
    template = (package_dir("trl") / "chat_templates" / "qwen2_5_vl.jinja").read_text(encoding="utf-8")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=template,
        model_max_length=4096,
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    image_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)
    processor = processor_without_video_class("Qwen2_5_VLProcessor")(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=template
    )
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            # head_dim 16: the three M-RoPE sections (time, height, width) sum to head_dim / 2
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
            "bos_token_id": None,
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 64,
            "fullatt_block_indexes": [1],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.bos_token_id = None
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out
