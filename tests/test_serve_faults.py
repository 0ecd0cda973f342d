"""The loopback server under injected faults: 2,000 calls through ChatClient, nothing lost or doubled."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter

import pytest

from steerkit.backends.openai_compat import OpenAICompatBackend
from steerkit.clients import ChatClient, Reply, Request, RetryPolicy
from steerkit.schema import Message
from steerkit.serve import LoopbackServer
from steerkit.serve_faults import check_faults, draw_fault

#: The production-like mix the client must survive.
FAULT_MIX = {
    "http500": 0.05,
    "http429": 0.02,
    "timeout": 0.01,
    "malformed": 0.01,
    "truncated": 0.01,
}
CALLS = 2000


def ask(text: str) -> Request:
    return Request(messages=[Message(role="user", content=text)])


def settled_stats(server: LoopbackServer, deadline: float = 5.0) -> dict:
    """Stats once the requests the client abandoned (timeouts) have been cancelled server-side."""
    end = time.monotonic() + deadline
    while (stats := server.stats())["in_flight"] and time.monotonic() < end:
        time.sleep(0.02)
    return stats


def test_2000_calls_through_the_fault_mix_end_ok_or_with_a_reason(
    loopback_server, tmp_path, record_property
):
    server = loopback_server(
        latency=0.002, faults=FAULT_MIX, retry_after=0.05, hang=5.0, seed=0, journal=True
    )
    backend = OpenAICompatBackend(server.model, server.base_url, max_concurrency=32, timeout=1.0)
    client = ChatClient(
        backend,
        role="judge",
        retry=RetryPolicy(max_retries=3, base=0.01, cap=0.1),
        cache_dir=tmp_path,
    )
    ids = [f"req-{i:04d}" for i in range(CALLS)]
    landed: Counter[int] = Counter()

    t0 = time.perf_counter()
    replies = client.complete_many_sync(
        [ask(i) for i in ids], on_reply=lambda i, r: landed.update([i])
    )
    wall = time.perf_counter() - t0
    stats = settled_stats(server)

    # none lost, none landed twice, each reply belongs to its own request
    assert len(replies) == CALLS and all(r is not None for r in replies)
    assert landed == Counter(range(CALLS))
    for rid, reply in zip(ids, replies, strict=True):
        assert reply.ok or (reply.finish == "error" and reply.error), (rid, reply)
        assert reply.text == (rid if reply.ok else "")

    # the server's view, by request id: every attempt the client made arrived exactly once, and each
    # request the client holds as ok was answered ok. An answer can also arrive after the client's
    # timeout fired (a stall on a loaded machine): the server then counts an ok the client never
    # saw, and the client retried; such late answers are counted, not hidden.
    per_id: dict[str, Counter[str]] = {}
    for label, outcome in server.journal():
        per_id.setdefault(label, Counter())[outcome] += 1
    assert set(per_id) == set(ids)
    late = 0
    for rid, reply in zip(ids, replies, strict=True):
        assert sum(per_id[rid].values()) == reply.attempts, (rid, per_id[rid], reply.attempts)
        assert per_id[rid]["ok"] >= int(reply.ok), (rid, per_id[rid])
        late += per_id[rid]["ok"] - int(reply.ok)
    assert late <= 0.01 * CALLS

    outcomes = stats["outcomes"]
    made, retried = stats["requests"], client.usage.retries
    failed = [r for r in replies if not r.ok]
    assert made == client.usage.calls == CALLS + retried
    assert retried == sum(outcomes.get(f, 0) for f in FAULT_MIX) + late
    assert outcomes["ok"] == CALLS - len(failed) + late
    # each fault fired about as often as its rate says (binomial, > 4 sigma margins)
    for fault, rate in FAULT_MIX.items():
        expected = rate * made
        assert abs(outcomes.get(fault, 0) - expected) < 4 * (expected**0.5) + 3, (fault, outcomes)
    # only finished answers were cached; a rerun would send exactly the failed ones
    assert len(client.cache) == CALLS - len(failed)

    summary = {
        "calls": CALLS,
        "requests_made": made,
        "retried": retried,
        "failed": len(failed),
        "late_answers": late,
        "wall_s": round(wall, 2),
        "outcomes": outcomes,
    }
    record_property("fault_mix_summary", json.dumps(summary))
    print("fault mix:", json.dumps(summary))
    assert wall < 45


def test_fault_pattern_depends_on_seed_and_body_not_on_arrival_order():
    def fates(bodies: list[bytes], *, seed: int, faults: dict[str, float] = FAULT_MIX,
              seen: Counter[bytes] | None = None) -> list[str | None]:
        seen = Counter() if seen is None else seen  # a server's arrival count of each body
        return [draw_fault(check_faults(faults), seed, seen, b) for b in bodies]

    bodies = [f'{{"n": {i}}}'.encode() for i in range(300)]
    a = fates(bodies, seed=1)
    b = fates(bodies[::-1], seed=1)[::-1]
    c = fates(bodies, seed=2)
    assert a == b and a != c
    assert 10 < sum(f is not None for f in a) < 60  # ~10% of 300
    again: Counter[bytes] = Counter()  # one server, the same 50 bodies arriving twice
    first = fates(bodies[:50], seed=0, faults={"http500": 0.5}, seen=again)
    second = fates(bodies[:50], seed=0, faults={"http500": 0.5}, seen=again)
    assert first != second  # a retried body gets a fresh draw, so retries can succeed


def test_fault_rates_are_validated():
    assert check_faults(None) == {}
    with pytest.raises(ValueError, match="unknown fault 'http503'"):
        check_faults({"http503": 0.1})
    with pytest.raises(ValueError, match="not in"):
        check_faults({"http500": 1.5})
    with pytest.raises(ValueError, match="sum to"):
        check_faults({"http500": 0.6, "timeout": 0.6})


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "example.org", "::"])
def test_only_loopback_hosts_are_accepted(host):
    with pytest.raises(ValueError, match="loopback addresses only"):
        LoopbackServer(host=host)


def _post(url: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"{not json", "invalid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"model": "scripted:echo", "messages": []}', "non-empty list"),
        (
            b'{"model": "scripted:echo", "messages": [{"role": "tool", "content": "x"}]}',
            "messages[0].role",
        ),
        (
            (
                b'{"model": "scripted:echo", "messages": [{"role": "user", "content": '
                b'[{"type": "image_url", "image_url": {"url": "http://elsewhere/cat.png"}}]}]}'
            ),
            "only base64 data URLs",
        ),
        (
            b'{"model": "scripted:echo", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}',
            "sampling",
        ),
        (
            b'{"model": "scripted:echo", "messages": [{"role": "user", "content": "x"}], "stream": true}',
            "non-streamed",
        ),
    ],
)
def test_bad_requests_get_400_with_the_reason(loopback_server, body, words):
    server = loopback_server()
    status, payload = _post(f"{server.base_url}/chat/completions", body)
    assert status == 400 and words in payload["error"]["message"]
    assert server.stats()["outcomes"] == {"bad_request": 1}


def test_stop_cancels_hanging_requests_and_is_idempotent():
    server = LoopbackServer(faults={"timeout": 1.0}, hang=60.0).start()
    client = ChatClient(
        OpenAICompatBackend(server.model, server.base_url, timeout=0.3),
        retry=RetryPolicy(max_retries=0),
    )
    assert client.complete_sync(ask("x")).finish == "error"
    t0 = time.perf_counter()
    server.stop()
    server.stop()
    assert time.perf_counter() - t0 < 5.0
    with pytest.raises(RuntimeError, match="not started"):
        _ = server.base_url


class _BatchedEcho:
    """A local-model stand-in (``batched``): records how many requests each generate call got."""

    model, batched, max_concurrency = "local", True, 1

    def __init__(self) -> None:
        self.batches: list[int] = []

    async def generate(self, requests: list[Request]) -> list[Reply]:
        self.batches.append(len(requests))
        await asyncio.sleep(0.05)  # model time: requests arriving meanwhile form the next batch
        return [Reply(text=r.messages[-1].content.upper(), model=self.model) for r in requests]

    async def aclose(self) -> None:
        return None


def test_concurrent_requests_to_a_batched_backend_share_generate_calls(loopback_server):
    backend = _BatchedEcho()
    server = loopback_server(backend=backend, max_batch=8)
    client = ChatClient(OpenAICompatBackend("local", server.base_url, max_concurrency=16))
    replies = client.complete_many_sync([ask(f"q{i}") for i in range(40)])
    assert [r.text for r in replies] == [f"Q{i}" for i in range(40)]
    assert sum(backend.batches) == 40 and max(backend.batches) == 8 and len(backend.batches) <= 12


def test_command_line_server_serves_until_terminated(monkeypatch):
    monkeypatch.setenv("STEERKIT_SERVE_KEY", "sk-cli-test")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "steerkit.serve",
            "--port",
            "0",
            "--latency",
            "0.01",
            "--model",
            "judge",
            "--fault",
            "http500=0.0",
            "--api-key-env",
            "STEERKIT_SERVE_KEY",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        base_url = proc.stdout.readline().strip()  # type: ignore[union-attr]
        assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/v1")
        client = ChatClient(
            OpenAICompatBackend("judge", base_url, api_key_env="STEERKIT_SERVE_KEY")
        )
        assert client.complete_sync(ask("over the wire")).text == "over the wire"
        keyless = ChatClient(
            OpenAICompatBackend("judge", base_url, api_key_env="STEERKIT_NO_SUCH_KEY")
        )
        assert keyless.complete_sync(ask("x")).error.startswith("HTTP 401")
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0
