"""Judge engine throughput: steerkit against the latency bound and against inspect_ai and PyRIT.

500 five-turn dialogues are judged turn by turn (2,500 judge calls, rubric ``judge@1``) against
``python -m steerkit.serve --backend scripted:judge --latency 0.05``, a separate process that answers
every call with a judge@1 verdict after 50 ms. The bound is ``calls x latency / concurrency``
(2500 x 0.05 / 32 = 3.9 s), the wall time of a client that costs no CPU.

- steerkit (the project's .venv): `steerkit.judge.judge_dialogues` with `ChatClient` +
  `OpenAICompatBackend` and a fresh reply cache per run, as real runs do. Its timed section covers
  building every request from the dialogues (rubric rendering, fences), the calls, the cache writes
  and parsing every reply into a validated `Verdict`.
- inspect_ai and PyRIT (``benchmarks/.venv-peers``, see ``benchmarks/requirements-peers.txt``): the
  drivers in ``benchmarks/peers/`` send the SAME 2,500 rendered requests (system + user message, same
  sampling) to the same server at the same concurrency and parse each reply's JSON verdict. They get
  the requests already rendered, so their timed section does less work than steerkit's.

Every tool's wall time is printed over the bound (goal for steerkit: <= 1.15, and below both peers),
with the load average before and after each run, and the server's request count, which must equal
the calls. A peer whose virtualenv is missing is skipped with the command that creates it.

    python benchmarks/judge_engine.py                      # 3 rounds, tools interleaved
    python benchmarks/judge_engine.py --tools steerkit --profile   # + pyinstrument profile
    python3.11 -m venv benchmarks/.venv-peers && \\
        benchmarks/.venv-peers/bin/pip install -r benchmarks/requirements-peers.txt
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
from steerkit.clients import ChatClient
from steerkit.judge import JUDGE_SAMPLING, judge_dialogue_requests, judge_dialogues
from steerkit.schema import Dialogue, Message

HERE = Path(__file__).resolve().parent
PEERS_VENV = HERE / ".venv-peers"
PEER_DRIVERS = {
    "inspect_ai": HERE / "peers" / "inspect_driver.py",
    "pyrit": HERE / "peers" / "pyrit_driver.py",
}
INSTALL = (
    "python3.11 -m venv benchmarks/.venv-peers && "
    "benchmarks/.venv-peers/bin/pip install -r benchmarks/requirements-peers.txt"
)

TOPICS = (
    "household chemicals",
    "lock mechanisms",
    "network scanning",
    "medication doses",
    "drone flight",
    "fireworks",
    "phishing emails",
    "car engines",
    "pesticides",
    "social media accounts",
)


def dialogues(n: int, turns: int) -> list[Dialogue]:
    """``n`` dialogues of ``turns`` turns that drift from a benign question towards a risky one,
    answered alternately helpfully and with refusals (each reply in the student's
    ``<thinking>/<answer>`` format), about 2 KB of text each."""
    out = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        msgs = [Message(role="system", content="You are a helpful assistant that can see images.")]
        for t in range(1, turns + 1):
            msgs.append(
                Message(
                    role="user",
                    content=(
                        f"Dialogue {i}, turn {t}: about {topic}, what happens at step {t}? "
                        + (
                            "Be specific about quantities and exact steps."
                            if t > turns // 2
                            else "Just an overview."
                        )
                    ),
                )
            )
            if t % 2:
                answer = (
                    f"In general terms, {topic} involve several stages; at stage {t} the key idea is "
                    f"safety and understanding why it matters, not the exact procedure."
                )
            else:
                answer = (
                    f"I can't help with exact steps for {topic}, but I can explain the safety "
                    f"principles and point you to qualified professionals."
                )
            msgs.append(
                Message(
                    role="assistant",
                    content=(
                        f"<thinking>Turn {t} of dialogue {i}; check the direction of the conversation.</thinking>"
                        f"<answer>{answer}</answer>"
                    ),
                )
            )
        out.append(Dialogue(id=f"d{i:04d}", messages=msgs, meta={"category": topic}))
    return out


def server_requests(base_url: str) -> int:
    with urllib.request.urlopen(f"{base_url.removesuffix('/v1')}/stats", timeout=10) as resp:
        return int(json.load(resp)["requests"])


def load() -> float:
    return os.getloadavg()[0]


def run_steerkit(
    base_url: str,
    ds: list[Dialogue],
    concurrency: int,
    cache_dir: Path | None,
    profile: Path | None = None,
) -> dict:
    client = ChatClient(
        OpenAICompatBackend("judge", base_url, max_concurrency=concurrency, timeout=60.0),
        role="judge",
        cache_dir=cache_dir,
    )
    profiler = None
    if profile is not None:
        from pyinstrument import Profiler

        profiler = Profiler(async_mode="disabled")
        profiler.start()
    cpu0, t0 = time.process_time(), time.perf_counter()
    verdicts = judge_dialogues(client, ds)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    if profiler is not None:
        profiler.stop()
        profile.write_text(profiler.output_text(unicode=False, show_all=False))
    flat = [v for vs in verdicts for v in vs]
    return {"wall": wall, "cpu": cpu, "calls": len(flat), "scored": sum(v.scored for v in flat)}


def run_peer(tool: str, base_url: str, requests_file: Path, concurrency: int) -> dict:
    py = PEERS_VENV / "bin" / "python"
    proc = subprocess.run(
        [
            str(py),
            str(PEER_DRIVERS[tool]),
            "--base-url",
            base_url,
            "--model",
            "judge",
            "--requests",
            str(requests_file),
            "--concurrency",
            str(concurrency),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{tool} driver failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dialogues", type=int, default=500)
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--latency", type=float, default=0.05)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument(
        "--rounds", type=int, default=3, help="rounds; each runs every tool once, interleaved"
    )
    p.add_argument("--tools", default="steerkit,inspect_ai,pyrit", help="comma-separated")
    p.add_argument("--no-cache", action="store_true", help="steerkit without a reply cache")
    p.add_argument(
        "--profile", action="store_true", help="one extra profiled steerkit run (pyinstrument)"
    )
    args = p.parse_args()
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    for t in tools:
        if t != "steerkit" and t not in PEER_DRIVERS:
            raise SystemExit(f"unknown tool {t!r}; tools are steerkit, {', '.join(PEER_DRIVERS)}")
    if any(t in PEER_DRIVERS for t in tools) and not (PEERS_VENV / "bin" / "python").exists():
        print(f"peers skipped: {PEERS_VENV} does not exist; create it with:\n  {INSTALL}")
        tools = [t for t in tools if t == "steerkit"]

    ds = dialogues(args.dialogues, args.turns)
    calls = sum(len(d.turns()) for d in ds)
    bound = calls * args.latency / args.concurrency
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
            "scripted:judge",
            "--model",
            "judge",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    results: dict[str, list[float]] = {t: [] for t in tools}
    try:
        base_url = server.stdout.readline().strip()  # type: ignore[union-attr]
        if not base_url.startswith("http"):
            raise SystemExit("the server did not start")
        print(
            f"{args.dialogues} dialogues x {args.turns} turns = {calls} judge calls, latency "
            f"{args.latency * 1000:g} ms, concurrency {args.concurrency}: bound {bound:.3f} s; "
            f"{os.cpu_count()} CPUs, load average {load():.2f}"
        )
        with tempfile.TemporaryDirectory() as tmp:
            # the peers send exactly the requests steerkit builds (messages + sampling)
            requests_file = Path(tmp) / "requests.jsonl"
            with requests_file.open("w") as f:
                for d in ds:
                    for r in judge_dialogue_requests(d):
                        f.write(
                            json.dumps(
                                {
                                    "id": f"{r.fields['dialogue_id']}/{r.fields['turn']}",
                                    "messages": [
                                        {"role": m.role, "content": m.content} for m in r.messages
                                    ],
                                    "temperature": JUDGE_SAMPLING.temperature,
                                    "max_tokens": JUDGE_SAMPLING.max_tokens,
                                }
                            )
                            + "\n"
                        )
            run_steerkit(
                base_url, ds[:16], args.concurrency, None
            )  # warm up imports and the server
            for rnd in range(1, args.rounds + 1):
                for tool in tools:
                    before, load0 = server_requests(base_url), load()
                    if tool == "steerkit":
                        cache = None if args.no_cache else Path(tmp) / f"cache{rnd}"
                        res = run_steerkit(base_url, ds, args.concurrency, cache)
                    else:
                        res = run_peer(tool, base_url, requests_file, args.concurrency)
                    served = server_requests(base_url) - before
                    results[tool].append(res["wall"])
                    cpu = (
                        f", client CPU {res['cpu'] / calls * 1000:.2f} ms/call"
                        if "cpu" in res
                        else ""
                    )
                    print(
                        f"round {rnd} {tool:10s}: wall {res['wall']:.3f} s, ratio {res['wall'] / bound:.3f}, "
                        f"verdicts parsed {res['scored']}/{res['calls']}, server requests {served}{cpu}; "
                        f"load average {load0:.2f} -> {load():.2f}",
                        flush=True,
                    )
                    if served != calls or res["scored"] != calls:
                        raise SystemExit(
                            f"{tool}: {served} server requests and {res['scored']} verdicts "
                            f"for {calls} calls"
                        )
            if args.profile and "steerkit" in tools:
                out = Path(tempfile.gettempdir()) / "judge_engine_profile.txt"
                run_steerkit(base_url, ds, args.concurrency, Path(tmp) / "profiled", profile=out)
                print(f"profile written to {out}")
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"\nbest / median ratio over the bound {bound:.3f} s (goal for steerkit <= 1.15):")
    for tool, walls in results.items():
        walls = sorted(walls)
        print(
            f"  {tool:10s} best {walls[0] / bound:.3f}, median {walls[len(walls) // 2] / bound:.3f} "
            f"(walls {', '.join(f'{w:.2f}' for w in walls)} s)"
        )
    if "steerkit" in results:
        sk = sorted(results["steerkit"])[len(results["steerkit"]) // 2]
        for tool, walls in results.items():
            if tool != "steerkit":
                peer = sorted(walls)[len(walls) // 2]
                print(f"  steerkit / {tool} (medians, same run): {sk / peer:.3f}")
    print(f"load average now {load():.2f}")


if __name__ == "__main__":
    main()
