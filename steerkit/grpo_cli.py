"""``python -m steerkit.grpo --config RUN.yaml [--set field=value ...]``: a Stage III run from the shell.

The YAML holds `steerkit.grpo.GRPORunConfig` fields. The same command runs under ``accelerate launch``
(DDP, FSDP2 or DeepSpeed ZeRO-3 from ``configs/accelerate/``; docs/multi_gpu.md): each process
rolls out its own share of the prompts with its own tutor calls (``prompts_per_step`` counts all
processes), the gradients are averaged, and only the main process writes the run directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("steerkit.grpo")


def load_run_config(path: str | Path, overrides: dict[str, Any] | None = None) -> Any:
    """A `GRPORunConfig` from a YAML mapping of its fields, then ``overrides``.

    Unknown fields and a file that is not a mapping are errors naming the file and line.
    """
    import yaml

    from steerkit.grpo import GRPORunConfig

    path = Path(path)
    text = path.read_text(encoding="utf-8")
    node = yaml.compose(text)
    if node is not None and not isinstance(node, yaml.MappingNode):
        raise ValueError(f"{path}:{node.start_mark.line + 1}: expected a mapping of GRPORunConfig fields")
    lines = {k.value: k.start_mark.line + 1 for k, _ in (node.value if node is not None else [])}
    values = {**(yaml.safe_load(text) or {}), **(overrides or {})}
    known = {f.name for f in dataclasses.fields(GRPORunConfig)}
    for name in values:
        if name not in known:
            where = f"{path}:{lines[name]}" if name in lines else f"{path} (--set)"
            raise ValueError(f"{where}: unknown field {name!r} (GRPORunConfig fields: {', '.join(sorted(known))})")
    return GRPORunConfig(**values)


def parse_overrides(items: list[str], parser: argparse.ArgumentParser) -> dict[str, Any]:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--set {item!r}: expected FIELD=VALUE")
        out[key] = yaml.safe_load(value)
    return out


def shared_run_id(config: Any) -> Any:
    """Every process of a launch writes into one run directory: the main process names a new one."""
    from accelerate.utils import broadcast_object_list

    from steerkit.distributed import distributed_state
    from steerkit.runs import new_run_id

    state = distributed_state()
    if config.run_id or state.num_processes == 1:
        return config
    ids = [new_run_id("grpo-") if state.is_main_process else None]
    broadcast_object_list(ids)
    return dataclasses.replace(config, run_id=ids[0])


def main(argv: list[str] | None = None) -> Path:
    from steerkit.distributed import distributed_state
    from steerkit.grpo import _cuda, run_grpo

    parser = argparse.ArgumentParser(prog="python -m steerkit.grpo", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="a YAML of GRPORunConfig fields")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a field (VALUE is read as YAML)")
    ns = parser.parse_args(argv)
    config = load_run_config(ns.config, parse_overrides(ns.set, parser))
    state = distributed_state()
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s [{state.process_index}/{state.num_processes}] %(name)s %(message)s")
    sharded = [v for v in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")
               if os.environ.get(v, "").lower() == "true"]
    if sharded and not _cuda():  # the trainer would fall back to plain data parallel without a word
        raise ValueError(f"{', '.join(sharded)}: FSDP and DeepSpeed launches need CUDA GPUs; on CPU use"
                         " configs/accelerate/ddp.yaml")
    if state.num_processes > 1 and not config.rl_data:
        # every process would write the smoke set into the same folder at once
        raise ValueError(f"{ns.config}: a {state.num_processes}-process launch needs rl_data (a STEER-RL file or"
                         " a Stage I run directory); build a smoke set with steerkit.smoke_inputs.seed_rl_dialogues")
    result = run_grpo(shared_run_id(config))
    log.info("run directory: %s", result.run_dir)
    return result.run_dir


if __name__ == "__main__":
    main()
