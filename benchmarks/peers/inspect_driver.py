"""inspect_ai driving the loopback judge server: the peer run of ``benchmarks/judge_engine.py``.

Runs in ``benchmarks/.venv-peers`` (inspect-ai, see ``benchmarks/requirements-peers.txt``). Each line
of ``--requests`` (id, messages, temperature, max_tokens, as steerkit built them) becomes one sample;
the task is a plain ``generate()`` through inspect's OpenAI-compatible provider (``openai-api``)
pointed at the server, with ``max_connections`` = the concurrency, and a scorer that reads the judge
verdict (the last JSON object of the reply, both scores on their scales). The eval log is written to
a temporary folder, as an inspect run writes one. Prints one JSON line: wall and CPU seconds of
``eval()``, calls, and verdicts read.

    benchmarks/.venv-peers/bin/python benchmarks/peers/inspect_driver.py \\
        --base-url http://127.0.0.1:8000/v1 --model judge --requests requests.jsonl --concurrency 32
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from verdict import verdict_ok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base-url", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--requests", required=True)
    p.add_argument("--concurrency", type=int, default=32)
    args = p.parse_args()

    from inspect_ai import Task
    from inspect_ai import eval as inspect_eval
    from inspect_ai.dataset import MemoryDataset, Sample
    from inspect_ai.model import ChatMessageSystem, ChatMessageUser, GenerateConfig, get_model
    from inspect_ai.scorer import Score, Target, mean, scorer
    from inspect_ai.solver import TaskState, generate

    rows = [json.loads(line) for line in Path(args.requests).read_text().splitlines()]
    role = {"system": ChatMessageSystem, "user": ChatMessageUser}
    samples = [
        Sample(id=r["id"], input=[role[m["role"]](content=m["content"]) for m in r["messages"]])
        for r in rows
    ]

    @scorer(metrics=[mean()])
    def judge_verdict():
        async def score(state: TaskState, target: Target) -> Score:
            return Score(value=1.0 if verdict_ok(state.output.completion) else 0.0)

        return score

    os.environ["LOOPBACK_API_KEY"] = "unused"
    model = get_model(
        f"openai-api/loopback/{args.model}",
        base_url=args.base_url,
        api_key="unused",
        config=GenerateConfig(
            max_connections=args.concurrency,
            temperature=rows[0]["temperature"],
            max_tokens=rows[0]["max_tokens"],
        ),
        stream=False,
        responses_api=False,
    )
    task = Task(dataset=MemoryDataset(samples), solver=generate(), scorer=judge_verdict())
    with tempfile.TemporaryDirectory() as logs:
        cpu0, t0 = time.process_time(), time.perf_counter()
        (log,) = inspect_eval(
            task, model=model, log_dir=logs, display="none", max_connections=args.concurrency
        )
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        if log.status != "success":
            raise SystemExit(f"inspect eval {log.status}: {log.error}")
        scored = sum(
            1 for s in log.samples or [] for sc in (s.scores or {}).values() if sc.value == 1.0
        )
    print(
        json.dumps(
            {"tool": "inspect_ai", "wall": wall, "cpu": cpu, "calls": len(rows), "scored": scored}
        )
    )


if __name__ == "__main__":
    main()
