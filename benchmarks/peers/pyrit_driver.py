"""PyRIT driving the loopback judge server: the peer run of ``benchmarks/judge_engine.py``.

Runs in ``benchmarks/.venv-peers`` (pyrit 1.1, see ``benchmarks/requirements-peers.txt``), memory in
process (``initialize_pyrit_async("InMemory")``, an in-memory SQLite database; no default
initializers). Each line of ``--requests`` (id, messages, temperature, max_tokens, as steerkit built
them) is one ``PromptSendingAttack``: the user message is the objective sent to an
``OpenAIChatTarget`` pointed at the server, the system message goes first as the prepended
conversation; ``AttackExecutor(max_concurrency=...)`` runs them concurrently. Each reply is checked
for a judge verdict (the last JSON object, both scores on their scales). Prints one JSON line: wall
and CPU seconds of the executor run, calls, and verdicts read.

    benchmarks/.venv-peers/bin/python benchmarks/peers/pyrit_driver.py \\
        --base-url http://127.0.0.1:8000/v1 --model judge --requests requests.jsonl --concurrency 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from verdict import verdict_ok


async def run(args: argparse.Namespace) -> dict:
    from pyrit.executor.attack import AttackExecutor, PromptSendingAttack
    from pyrit.models import Message
    from pyrit.prompt_target import OpenAIChatTarget
    from pyrit.setup import IN_MEMORY, initialize_pyrit_async

    await initialize_pyrit_async(IN_MEMORY, load_defaults=False, silent=True, env_files=[])
    rows = [json.loads(line) for line in Path(args.requests).read_text().splitlines()]
    target = OpenAIChatTarget(
        endpoint=args.base_url,
        api_key="unused",
        model_name=args.model,
        temperature=rows[0]["temperature"],
        max_completion_tokens=rows[0]["max_tokens"],
    )
    attack = PromptSendingAttack(objective_target=target)
    objectives, overrides = [], []
    for r in rows:
        system = [m["content"] for m in r["messages"] if m["role"] == "system"]
        objectives.append(next(m["content"] for m in r["messages"] if m["role"] == "user"))
        overrides.append(
            {"prepended_conversation": [Message.from_system_prompt(system[0])]} if system else {}
        )
    executor = AttackExecutor(max_concurrency=args.concurrency)
    cpu0, t0 = time.process_time(), time.perf_counter()
    result = await executor.execute_attack_async(
        attack=attack, objectives=objectives, field_overrides=overrides
    )
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    texts = [
        r.last_response.converted_value if r.last_response is not None else ""
        for r in result.completed_results
    ]
    return {
        "tool": "pyrit",
        "wall": wall,
        "cpu": cpu,
        "calls": len(rows),
        "completed": len(texts),
        "scored": sum(map(verdict_ok, texts)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base-url", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--requests", required=True)
    p.add_argument("--concurrency", type=int, default=32)
    print(json.dumps(asyncio.run(run(p.parse_args()))))


if __name__ == "__main__":
    main()
