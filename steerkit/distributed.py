"""Multi-process training helpers: this process's place in a launch, the whole weights during a rollout,
and a digest of the weights.

A multi-turn rollout runs as many decoding steps as its longest live dialogue, so two processes run
different numbers of forward passes. Under FSDP2 or DeepSpeed ZeRO-3 every forward pass gathers the
sharded weights with a collective call, and unequal numbers of calls hang the launch. `whole_weights`
gathers them once for the whole rollout (as TRL's own ``unwrap_model_for_generation`` does for
ZeRO-3 generation) and shards them again afterwards: the rollout then holds a full copy on every GPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def whole_weights(model: Any, accelerator: Any) -> Iterator[None]:
    """Inside, the model's forward needs no collective call (DDP and single processes: nothing to do).

    Args:
        model: the trainer's wrapped model (``trainer.model_wrapped``).
        accelerator: the trainer's accelerator.
    """
    from accelerate.utils import DistributedType

    match accelerator.distributed_type:
        case DistributedType.DEEPSPEED:
            from trl.models import unwrap_model_for_generation

            with unwrap_model_for_generation(model, accelerator, gather_deepspeed3_params=True):
                yield
        case DistributedType.FSDP:
            if not getattr(accelerator, "is_fsdp2", False):
                raise ValueError("multi-turn rollouts under FSDP need FSDP2 (configs/accelerate/fsdp2.yaml)")
            with unsharded(model):
                yield
        case _:
            yield


@contextmanager
def unsharded(model: Any) -> Iterator[None]:
    """FSDP2: all-gather every shard once (a collective call: every process enters together), keep the
    weights whole across forward passes, and shard them again on leaving."""
    from torch.distributed.fsdp import FSDPModule

    mods = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in mods:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in mods:
            m.set_reshard_after_forward(True, recurse=False)
            m.reshard()


def gathered(items: list[Any], accelerator: Any) -> list[Any]:
    """Every process's ``items`` in process order (picklable objects); a collective call that every
    process must enter. A single process gets its own list back."""
    if getattr(accelerator, "num_processes", 1) == 1:
        return items
    from accelerate.utils import gather_object

    return gather_object(items)


def summed_over_processes(counts: dict[str, int], accelerator: Any) -> dict[str, int]:
    """Counters (a role's usage, say) summed over every process of a launch; a collective call."""
    parts = gathered([counts], accelerator)
    return {k: sum(p[k] for p in parts) for k in counts}


def weights_digest(model: Any) -> str:
    """sha256 over a model's state dict (names, dtypes, shapes and bytes, in name order)."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def distributed_state():  # -> accelerate.PartialState
    """This process's place in a launch; on a machine without CUDA, DDP over gloo (``cpu=True``: without
    it accelerate sees a torchrun launch on CPU as a single process)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())
