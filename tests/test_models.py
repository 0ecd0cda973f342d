"""Student loading, processors, the tiny Qwen2.5-VL and the materialised SmolLM2."""

from __future__ import annotations

import json
import pickle
import shutil
import threading
import time
from pathlib import Path

import pytest

from steerkit import models, smollm2, tiny_vlm


def _image(tmp_path: Path, name: str = "red.png", color=(220, 20, 20), size=(80, 60)) -> Path:
    from PIL import Image

    path = tmp_path / name
    Image.new("RGB", size, color).save(path)
    return path


# --- the tiny VLM ----------------------------------------------------------------------------------


def test_tiny_vlm_saves_a_full_checkpoint_with_trls_qwen_template(tiny_vlm_dir: Path) -> None:
    names = {p.name for p in tiny_vlm_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json",
            "chat_template.jinja"} <= names
    trl_template = (smollm2.package_dir("trl") / "chat_templates" / "qwen2_5_vl.jinja").read_text()
    # TRL swaps in its training template only when it recognises this exact text
    assert (tiny_vlm_dir / "chat_template.jinja").read_text() == trl_template
    # saved under the base name, so a machine with torchvision loads the full processor
    assert json.loads((tiny_vlm_dir / "processor_config.json").read_text())["processor_class"] == "Qwen2_5_VLProcessor"
    config = json.loads((tiny_vlm_dir / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl" and config["text_config"]["hidden_size"] == 64
    assert config["vision_config"]["depth"] == 2


def test_tiny_vlm_is_deterministic(tiny_vlm_dir: Path, tmp_path: Path) -> None:
    start = time.perf_counter()
    again = tiny_vlm.build_tiny_vlm(tmp_path / "again")
    assert time.perf_counter() - start < 30  # about 0.3 s once transformers is imported, on an idle machine
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny_vlm_dir / name).read_bytes(), name
    other = tiny_vlm.build_tiny_vlm(tmp_path / "other", seed=1)
    assert (other / "model.safetensors").read_bytes() != (tiny_vlm_dir / "model.safetensors").read_bytes()


def test_tiny_vlm_reloads_with_a_real_processor_and_runs_an_image(tiny_vlm_dir: Path, tmp_path: Path) -> None:
    import torch

    model, processor = models.load_student(tiny_vlm_dir)
    assert models.is_real_processor(processor)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    tokenizer = processor.tokenizer
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == model.config.image_token_id
    assert len(tokenizer) == model.config.text_config.vocab_size
    from PIL import Image

    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]}]
    text = processor.apply_chat_template(msgs, tokenize=False)
    assert "<|vision_start|><|image_pad|><|vision_end|>What is this?" in text
    enc = processor(text=[text], images=[Image.open(_image(tmp_path))], return_tensors="pt")
    # 80x60 is resized within the pixel bounds to 84x56 -> a 6x4 patch grid, 2x2 merged -> 6 image tokens
    assert enc["image_grid_thw"].tolist() == [[1, 4, 6]]
    assert int((enc["input_ids"] == model.config.image_token_id).sum()) == 6
    out = model(**enc, labels=enc["input_ids"])
    assert out.logits.shape == (1, enc["input_ids"].shape[1], model.config.text_config.vocab_size)
    assert torch.isfinite(out.loss) and out.loss.item() > 0
    out.loss.backward()
    vision_grads = [p.grad for n, p in model.named_parameters() if ".visual." in f".{n}"]
    assert vision_grads and all(g is not None for g in vision_grads)  # the image reached the vision tower


def test_processor_survives_pickle(tiny_vlm_dir: Path) -> None:
    processor = models.load_processor(tiny_vlm_dir)
    clone = pickle.loads(pickle.dumps(processor))
    assert type(clone) is type(processor)
    assert clone.image_processor.to_dict() == processor.image_processor.to_dict()


def test_load_processor_fails_loudly_without_the_image_processor(tiny_vlm_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "no_processor"
    shutil.copytree(tiny_vlm_dir, broken)
    (broken / "processor_config.json").unlink()
    with pytest.raises(models.ProcessorError, match="could not build the image processor"):
        models.load_processor(broken)


def test_is_vision_model(tiny_vlm_dir: Path) -> None:
    assert models.is_vision_model(tiny_vlm_dir)
    assert not models.is_vision_model("smollm2")
    from transformers import AutoConfig

    assert models.is_vision_model(AutoConfig.from_pretrained(tiny_vlm_dir))


def test_missing_checkpoint_names_the_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no config.json"):
        models.load_student(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="use 'hf', 'unsloth' or 'auto'"):
        models.load_student("smollm2", backend="vllm")  # type: ignore[arg-type]


def test_a_lora_checkpoint_loads_on_its_base(tiny_vlm_dir: Path, tmp_path: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    base, processor = models.load_student(tiny_vlm_dir)
    lora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")  # no processor beside it: the base's is used
    assert not (tmp_path / "adapter" / "config.json").exists()
    assert models.is_vision_model(tmp_path / "adapter")
    loaded, loaded_processor = models.load_student(tmp_path / "adapter")
    assert type(loaded).__name__ == "PeftModel" and models.is_real_processor(loaded_processor)
    ids = processor.tokenizer(["hello world"], return_tensors="pt")
    lora.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(**ids).logits, lora(**ids).logits, atol=1e-5)
        with lora.disable_adapter():
            plain = lora(**ids).logits
        assert not torch.allclose(loaded(**ids).logits, plain, atol=1e-3)  # the adapter is in effect
    from steerkit.backends.hf_local import HFLocalBackend
    from steerkit.clients import Request, Sampling
    from steerkit.schema import Message

    backend = HFLocalBackend.from_pretrained(tmp_path / "adapter", generation_dtype="bfloat16")
    assert backend.model == f"hf:{(tmp_path / 'adapter').resolve()}+bfloat16"
    (reply,) = backend.generate_sync([Request([Message(role="user", content="hi")], sampling=Sampling(max_tokens=4))])
    assert reply.ok and reply.completion_tokens >= 1

    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "adapter", moved)
    cfg = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(tmp_path / "gone")}))
    with pytest.raises(FileNotFoundError, match="base_model_name_or_path"):
        models.load_student(moved)


# --- student backends ------------------------------------------------------------------------------


def test_unsloth_unavailable_names_the_environment_file(tiny_vlm_dir: Path) -> None:
    if models.unsloth_available():
        pytest.skip("Unsloth and CUDA are present here")
    with pytest.raises(models.StudentUnavailable, match="environment-unsloth.yml") as err:
        models.load_student(tiny_vlm_dir, backend="unsloth")
    assert "backend='hf'" in str(err.value)


def test_auto_falls_back_to_transformers(tiny_vlm_dir: Path) -> None:
    if models.unsloth_available():
        pytest.skip("Unsloth and CUDA are present here")
    import torch

    model, processor = models.load_student(tiny_vlm_dir, backend="auto")
    assert type(model).__module__.startswith("transformers.")
    assert models.is_real_processor(processor)
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    half, _ = models.load_student(tiny_vlm_dir, dtype="bfloat16")
    assert half.dtype == torch.bfloat16


def test_bf16_copy_and_weight_sync(tiny_vlm_dir: Path) -> None:
    import torch

    model, _ = models.load_student(tiny_vlm_dir)
    copy = models.bf16_copy(model)
    assert copy.dtype == torch.bfloat16 and model.dtype == torch.float32
    name, param = next(iter(model.named_parameters()))
    with torch.no_grad():
        param.add_(1.0)
    copied = dict(copy.named_parameters())[name]
    assert not torch.allclose(copied.float(), param, atol=0.1)
    models.copy_weights(model, copy)
    assert torch.allclose(copied.float(), param, atol=0.05)


# --- materialising SmolLM2 (the locking and renaming, with a fast stand-in writer) -------------------


def test_materialisation_is_atomic_and_runs_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STEERKIT_CACHE", str(tmp_path))
    calls: list[int] = []

    def killed(out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt  # a run killed half way

    monkeypatch.setattr(smollm2, "_materialise_smollm2", killed)
    with pytest.raises(KeyboardInterrupt):
        smollm2.smollm2_path()
    parent = tmp_path / "models"
    assert not (parent / smollm2.SMOLLM2_DIRNAME).exists()
    assert not list(parent.glob(".*-tmp-*")), "the temporary folder was not cleaned up"

    def slow_writer(out: Path) -> None:
        calls.append(1)
        time.sleep(0.2)
        (out / "model.safetensors").write_bytes(b"weights")
        (out / "steerkit.json").write_text(json.dumps({"format": smollm2.SMOLLM2_FORMAT}))

    monkeypatch.setattr(smollm2, "_materialise_smollm2", slow_writer)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(smollm2.smollm2_path())) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [1]
    assert results == [parent / smollm2.SMOLLM2_DIRNAME] * 3
    assert (results[0] / "model.safetensors").read_bytes() == b"weights"


def test_cache_dir_defaults_to_the_git_ignored_repo_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STEERKIT_CACHE", raising=False)
    repo = Path(smollm2.__file__).resolve().parents[1]
    assert smollm2.cache_dir() == repo / ".cache" / "steerkit"
    assert ".cache/" in (repo / ".gitignore").read_text().splitlines()


# --- the real SmolLM2 (tokenizer and config only here; generation is in test_hf_local) ---------------


def test_smollm2_is_a_plain_checkpoint_with_a_training_template(smollm2_dir: Path) -> None:
    from transformers import AutoTokenizer

    start = time.perf_counter()
    assert smollm2.smollm2_path() == smollm2_dir
    assert time.perf_counter() - start < 5  # materialised once, then found (milliseconds)
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tok.chat_template == smollm2.SMOLLM2_TRAINING_TEMPLATE
    conv = [
        {"role": "user", "content": "How do I bake bread?"},
        {"role": "assistant", "content": "Mix flour, water, yeast."},
        {"role": "user", "content": "And then?"},
        {"role": "assistant", "content": "Knead\nand bake."},
    ]
    for messages in (conv, [{"role": "system", "content": "Be brief."}, *conv], conv[:3]):
        for gen in (False, True):
            trained = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            original = tok.apply_chat_template(
                messages, chat_template=smollm2.SMOLLM2_TEMPLATE, tokenize=False, add_generation_prompt=gen
            )
            assert trained == original  # byte-identical
    enc = tok.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    masked = [i for i, m in zip(enc["input_ids"], enc["assistant_masks"], strict=True) if m]
    # the loss covers exactly the assistant turns including their end token
    assert tok.decode(masked) == "Mix flour, water, yeast.<|im_end|>Knead\nand bake.<|im_end|>"
    from trl.chat_template_utils import (
        get_training_chat_template,
        is_chat_template_stop_token_trained,
    )

    assert get_training_chat_template(tok) is None  # TRL takes it as it is for assistant_only_loss
    assert is_chat_template_stop_token_trained(tok)
