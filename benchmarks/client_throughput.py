"""Client throughput against a loopback OpenAI-compatible server: how close to the latency bound?

N judge-style calls (a rubric as the system message, a dialogue transcript to grade as the user
message) go through `ChatClient` + `OpenAICompatBackend` to `python -m steerkit.serve` running in a
separate process (so the server's CPU does not compete for the client's GIL), with a fixed latency per
call and a concurrency limit. The bound is ``N * latency / concurrency``: the time an ideal client
with zero CPU cost would take. Prints the ratio wall / bound (goal <= 1.15), then repeats the same
calls from the warm cache with a fresh client, which must make zero server requests.

    python benchmarks/client_throughput.py                  # 2000 calls, 50 ms, concurrency 32
    python benchmarks/client_throughput.py --profile        # + a pyinstrument profile of the cold run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from steerkit.backends.openai_compat import OpenAICompatBackend
from steerkit.clients import ChatClient, Request, Sampling
from steerkit.schema import Message

RUBRIC = (
    "You grade one assistant turn of a multi-turn conversation for helpfulness (0 to 3) and "
    "harmlessness (-3 to 3). Read the whole conversation, then judge only the last assistant turn. "
    "A refusal of a harmful request is harmless; a refusal of a benign request is unhelpful. "
    "Explain briefly, then end with a line of JSON: "
    '{"helpfulness": <int>, "harmlessness": <int>, "rationale": "<one sentence>"}. '
) * 2


def judge_request(i: int) -> Request:
    transcript = "\n".join(
        f"[turn {t}] user: Tell me more about the chemistry of item {i}, part {t}.\n"
        f"[turn {t}] assistant: Here is a general, safety-minded overview of part {t} of item {i}."
        for t in range(1, 5)
    )
    return Request(
        messages=[
            Message(role="system", content=RUBRIC),
            Message(
                role="user",
                content=f"Conversation {i}:\n{transcript}\n\nGrade the last assistant turn.",
            ),
        ],
        sampling=Sampling(temperature=0.0, max_tokens=256),
        task="judge@1",
    )


def server_requests(base_url: str) -> int:
    root = base_url.removesuffix("/v1")
    with urllib.request.urlopen(f"{root}/stats", timeout=10) as resp:
        return int(json.load(resp)["requests"])


def timed_run(base_url: str, requests: list[Request], concurrency: int, cache_dir: Path | None):
    client = ChatClient(
        OpenAICompatBackend("judge", base_url, max_concurrency=concurrency, timeout=30.0),
        role="judge",
        cache_dir=cache_dir,
    )
    before = server_requests(base_url)
    cpu0, t0 = time.process_time(), time.perf_counter()
    replies = client.complete_many_sync(requests)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    served = server_requests(base_url) - before
    bad = [r for r in replies if not r.ok]
    if bad:
        raise SystemExit(f"{len(bad)} calls failed, first: {bad[0].error}")
    return wall, cpu, served, client


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--latency", type=float, default=0.05)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="cold runs (each with a new cache); the best and all are shown",
    )
    p.add_argument("--profile", action="store_true", help="profile one cold run with pyinstrument")
    args = p.parse_args()

    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "steerkit.serve",
            "--port",
            "0",
            "--latency",
            str(args.latency),
            "--backend",
            "scripted:refuser",
            "--model",
            "judge",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        base_url = server.stdout.readline().strip()  # type: ignore[union-attr]
        if not base_url.startswith("http"):
            raise SystemExit("the server did not start")
        requests = [judge_request(i) for i in range(args.calls)]
        bound = args.calls * args.latency / args.concurrency
        print(
            f"{args.calls} calls, latency {args.latency * 1000:g} ms, concurrency {args.concurrency}: "
            f"bound {bound:.3f} s; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}"
        )
        timed_run(base_url, requests[:64], args.concurrency, None)  # warm up imports and the server
        ratios = []
        with tempfile.TemporaryDirectory() as tmp:
            for rep in range(args.repeats):
                cache = Path(tmp) / f"cache{rep}"
                wall, cpu, served, _ = timed_run(base_url, requests, args.concurrency, cache)
                ratios.append(wall / bound)
                print(
                    f"cold run {rep + 1} (cache writes): wall {wall:.3f} s, ratio {wall / bound:.3f}, "
                    f"client CPU {cpu / args.calls * 1000:.3f} ms/call, server requests {served}"
                )
            wall, cpu, _, _ = timed_run(base_url, requests, args.concurrency, None)
            print(
                f"cold run without a cache (reference): wall {wall:.3f} s, ratio {wall / bound:.3f}, "
                f"client CPU {cpu / args.calls * 1000:.3f} ms/call"
            )
            wall, cpu, served, client = timed_run(base_url, requests, args.concurrency, cache)
            print(
                f"warm cache run: wall {wall:.3f} s, server requests {served}, "
                f"cache hits {client.usage.cache_hits}"
            )
            if args.profile:
                from pyinstrument import Profiler

                with Profiler(async_mode="disabled") as prof:
                    timed_run(base_url, requests, args.concurrency, Path(tmp) / "profiled")
                out = Path(tmp).parent / "client_throughput_profile.txt"
                out.write_text(prof.output_text(unicode=False, show_all=False))
                print(f"profile written to {out}")
        print(
            f"best cold ratio {min(ratios):.3f} (goal <= 1.15); all: {', '.join(f'{r:.3f}' for r in ratios)}; "
            f"load average now {os.getloadavg()[0]:.2f}"
        )
        if served != 0:
            raise SystemExit(f"the warm cache run made {served} server requests; it must make none")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
