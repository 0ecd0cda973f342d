"""Students and their processors: loading a checkpoint with transformers or Unsloth.

- `load_student(path, backend=...)` returns ``(model, processing_class)``; ``"smollm2"`` names the
  embedded SmolLM2-135M-Instruct (`steerkit.smollm2`), anything else is a checkpoint folder.
- `load_processor(path)` builds a vision model's processor even without torchvision (the video
  processor needs it) and fails loudly where `AutoProcessor` would silently return a bare tokenizer.

The tiny test VLM is built by `steerkit.tiny_vlm`. Unsloth is a GPU accelerator that cannot share an
environment with the CPU stack (it pins older trl and transformers): it lives in its own
environment, ``environment-unsloth.yml``, and is imported only when ``backend="unsloth"`` (or
``"auto"`` on a CUDA machine where it is installed) is asked for.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from steerkit.smollm2 import SMOLLM2, smollm2_path

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel

log = logging.getLogger(__name__)

StudentBackend = Literal["hf", "unsloth", "auto"]

UNSLOTH_ENV_FILE = "environment-unsloth.yml"


class StudentUnavailable(RuntimeError):
    """The requested student backend cannot run here; the message says what to install or use."""


class ProcessorError(RuntimeError):
    """A vision model's processor could not be built; training and generation would mishandle images."""


# --- locations -------------------------------------------------------------------------------------


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
