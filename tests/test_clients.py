"""ChatClient + OpenAICompatBackend against a real loopback HTTP server (steerkit.serve), no mocks."""

from __future__ import annotations

import asyncio
import doctest
import hashlib
import json
import pickle
import time
import urllib.request
from pathlib import Path

import pytest

from steerkit.backends import openai_compat
from steerkit.backends.openai_compat import OpenAICompatBackend
from steerkit.backends.scripted import ScriptedBackend
from steerkit.clients import ChatClient, Reply, Request, RetryPolicy, Sampling, cache_key, run_sync
from steerkit.roles import Roles, make_backend
from steerkit.schema import Message

FAST = RetryPolicy(max_retries=4, base=0.001, cap=0.01)


def ask(text: str, **kw) -> Request:
    return Request(messages=[Message(role="user", content=text)], **kw)


def client_for(
    server, *, timeout: float = 5.0, concurrency: int = 8, retry=FAST, cache_dir=None, **kw
):
    backend = OpenAICompatBackend(
        server.model, server.base_url, max_concurrency=concurrency, timeout=timeout, **kw
    )
    return ChatClient(backend, role="judge", retry=retry, cache_dir=cache_dir)


def settled(server, deadline: float = 5.0) -> dict:
    """Stats once the server has seen the end of requests the client gave up on (timeouts)."""
    end = time.monotonic() + deadline
    while (stats := server.stats())["in_flight"] and time.monotonic() < end:
        time.sleep(0.02)
    return stats


def png(path: Path, colour: tuple[int, int, int]) -> Path:
    from PIL import Image

    Image.new("RGB", (8, 8), colour).save(path)
    return path


def test_doctests_of_the_http_modules():
    from steerkit import serve

    for module in (openai_compat, serve):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_success_returns_text_usage_and_counts(loopback_server):
    server = loopback_server(
        backend=ScriptedBackend(lambda r: "verdict: " + r.messages[-1].content, name="judge")
    )
    client = client_for(server)
    reply = client.complete_sync(
        ask("grade this", sampling=Sampling(temperature=0.7, max_tokens=64, seed=3))
    )
    assert (reply.text, reply.finish, reply.model, reply.attempts) == (
        "verdict: grade this",
        "stop",
        "scripted:judge",
        1,
    )
    assert reply.prompt_tokens > 0 and reply.completion_tokens > 0  # the server's usage block
    assert client.usage.calls == 1 and client.usage.prompt_tokens == reply.prompt_tokens
    assert server.stats()["outcomes"] == {"ok": 1}


def test_sampling_and_system_messages_reach_the_server(loopback_server):
    seen: list[Request] = []
    backend = ScriptedBackend(lambda r: seen.append(r) or "ok", name="m")
    server = loopback_server(backend=backend)
    req = Request(
        [Message(role="system", content="be brief"), Message(role="user", content="hi")],
        sampling=Sampling(temperature=0.3, max_tokens=17, top_p=0.9, seed=11),
    )
    assert client_for(server).complete_sync(req).ok
    (got,) = seen
    assert [(m.role, m.content) for m in got.messages] == [("system", "be brief"), ("user", "hi")]
    assert got.sampling == Sampling(temperature=0.3, max_tokens=17, top_p=0.9, seed=11)


def test_images_travel_as_base64_parts_and_the_server_sees_their_bytes(loopback_server, tmp_path):
    red = png(tmp_path / "red.png", (255, 0, 0))
    blue = png(tmp_path / "blue.png", (0, 0, 255))

    def describe(r: Request) -> str:
        return json.dumps(
            [[p.suffix, hashlib.sha256(p.read_bytes()).hexdigest()] for p in r.image_paths()]
            + [[m.content for m in r.messages]]
        )

    server = loopback_server(backend=ScriptedBackend(describe, name="vlm"))
    req = Request(
        [
            Message(role="user", content="what is this?", images=["red.png"]),
            Message(role="assistant", content="a red square"),
            Message(role="user", content="and these?", images=["blue.png", "red.png"]),
        ],
        root=tmp_path,
    )
    body = json.loads(openai_compat.chat_body("vlm", req))
    parts = body["messages"][0]["content"]
    assert parts[0]["type"] == "image_url" and parts[0]["image_url"]["url"].startswith(
        "data:image/png;base64,"
    )
    assert parts[-1] == {"type": "text", "text": "what is this?"}
    assert body["messages"][1]["content"] == "a red square"

    reply = client_for(server).complete_sync(req)
    digest = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (red, blue)}
    assert json.loads(reply.text) == [
        [".png", digest[red]],
        [".png", digest[blue]],
        [".png", digest[red]],
        ["what is this?", "a red square", "and these?"],
    ]
    assert server.stats()["images"] == 3


@pytest.mark.parametrize("cached", [False, True])
def test_a_missing_image_fails_that_request_only(loopback_server, tmp_path, cached):
    png(tmp_path / "here.png", (1, 2, 3))
    server = loopback_server()
    requests = [
        Request([Message(role="user", content="a", images=["here.png"])], root=tmp_path),
        Request([Message(role="user", content="b", images=["gone.png"])], root=tmp_path),
        Request([Message(role="user", content="c", images=["../outside.png"])], root=tmp_path),
    ]
    client = client_for(server, cache_dir=tmp_path / "cache" if cached else None)
    ok, missing, outside = client.complete_many_sync(requests)
    assert ok.text == "a"
    assert missing.finish == "error" and "gone.png" in missing.error and missing.attempts == 1
    assert outside.finish == "error" and "escapes the data root" in outside.error
    assert server.stats()["requests"] == 1


def test_server_error_is_retried_until_success(loopback_server):
    calls = []

    def flaky(r: Request) -> str:
        calls.append(r)
        if len(calls) < 3:
            raise RuntimeError("model worker crashed")  # the server answers 500
        return "fine"

    server = loopback_server(backend=ScriptedBackend(flaky, name="m"))
    client = client_for(server)
    reply = client.complete_sync(ask("x"))
    assert (reply.text, reply.attempts) == ("fine", 3)
    assert client.usage.retries == 2 and client.usage.calls == 3
    assert server.stats()["outcomes"] == {"backend_error": 2, "ok": 1}


def test_rate_limits_are_retried_and_retry_after_is_honoured(loopback_server):
    server = loopback_server(faults={"http429": 1.0}, retry_after=0.2)
    client = client_for(server, retry=RetryPolicy(max_retries=2, base=0.001, cap=5.0))
    t0 = time.perf_counter()
    reply = client.complete_sync(ask("x"))
    elapsed = time.perf_counter() - t0
    # two waits of Retry-After (0.2 s); the policy's own backoff would wait at most 0.004 s
    assert 0.4 <= elapsed < 2.0
    assert (
        reply.finish == "error"
        and "gave up after 3 attempts" in reply.error
        and "429" in reply.error
    )
    assert server.stats()["outcomes"] == {"http429": 3}


def test_a_mix_of_rate_limits_and_500s_all_end_ok(loopback_server):
    server = loopback_server(faults={"http429": 0.3, "http500": 0.3}, retry_after=0.01, seed=7)
    client = client_for(server, retry=RetryPolicy(max_retries=12, base=0.001, cap=0.01))
    replies = client.complete_many_sync([ask(f"item {i}") for i in range(40)])
    assert [r.text for r in replies] == [f"item {i}" for i in range(40)]
    outcomes = server.stats()["outcomes"]
    assert outcomes["http429"] > 0 and outcomes["http500"] > 0
    # every attempt reached the server once: a retry follows a fault, or an ok that came too late
    late = outcomes["ok"] - 40
    assert client.usage.retries == outcomes["http429"] + outcomes["http500"] + late


def test_timeouts_are_retried_then_reported(loopback_server):
    server = loopback_server(faults={"timeout": 1.0}, hang=10.0)
    client = client_for(server, timeout=0.3, retry=RetryPolicy(max_retries=1, base=0.001, cap=0.01))
    t0 = time.perf_counter()
    reply = client.complete_sync(ask("x"))
    assert time.perf_counter() - t0 < 3.0  # two 0.3 s timeouts, not the server's 10 s hang
    assert reply.finish == "error" and "timed out after 0.3s" in reply.error
    assert server.stats()["requests"] == 2


@pytest.mark.parametrize(
    ("fault", "words"),
    [
        ("disconnect", "connection failed"),
        ("truncated", "cut short"),
        ("malformed", "malformed response body"),
    ],
)
def test_dropped_connections_and_bad_bodies_are_transient(loopback_server, fault, words):
    server = loopback_server(faults={fault: 1.0})
    client = client_for(server, retry=RetryPolicy(max_retries=2, base=0.001, cap=0.01))
    reply = client.complete_sync(ask("x"))
    assert reply.finish == "error" and words in reply.error and reply.attempts == 3
    assert server.stats()["outcomes"] == {fault: 3}


@pytest.mark.parametrize("fault", ["disconnect", "truncated", "malformed", "timeout"])
def test_each_transient_fault_recovers_on_retry(loopback_server, fault):
    server = loopback_server(faults={fault: 0.5}, hang=10.0, seed=1)
    client = client_for(
        server, timeout=0.5, retry=RetryPolicy(max_retries=10, base=0.001, cap=0.01)
    )
    replies = client.complete_many_sync([ask(f"q{i}") for i in range(12)])
    assert all(r.ok for r in replies) and [r.text for r in replies] == [f"q{i}" for i in range(12)]
    outcomes = settled(server)["outcomes"]
    late = outcomes["ok"] - 12  # answered after the client's timeout (a stall on a loaded machine)
    assert outcomes[fault] > 0 and client.usage.retries == outcomes[fault] + late


class _Finishing:
    """A served model whose every answer ends the same way (``blocked``: the provider filtered it)."""

    batched, max_concurrency = False, 8

    def __init__(self, finish: str, text: str = "") -> None:
        self.model, self.finish, self.text = f"ends-{finish}", finish, text

    async def generate(self, requests: list[Request]) -> list[Reply]:
        return [Reply(text=self.text, finish=self.finish, model=self.model) for _ in requests]

    async def aclose(self) -> None:
        return None


def test_length_finish_is_passed_through(loopback_server):
    server = loopback_server(backend=_Finishing("length", "cut at max_tok"))
    reply = client_for(server).complete_sync(ask("x", sampling=Sampling(max_tokens=3)))
    assert (reply.text, reply.finish, reply.ok) == ("cut at max_tok", "length", True)


def test_blocked_replies_are_data_and_not_retried(loopback_server):
    server = loopback_server(faults={"blocked": 1.0})  # 400 content_filter
    client = client_for(server)
    reply = client.complete_sync(ask("x"))
    assert reply.finish == "blocked" and not reply.ok and "content_filter" in reply.error
    filtered = loopback_server(
        backend=_Finishing("blocked")
    )  # 200 with finish_reason content_filter
    client2 = client_for(filtered)
    reply2 = client2.complete_sync(ask("x"))
    assert (reply2.finish, reply2.attempts) == ("blocked", 1)
    assert client.usage.blocked == client2.usage.blocked == 1 and client.usage.retries == 0
    assert server.stats()["requests"] == filtered.stats()["requests"] == 1


def test_other_client_errors_are_reported_not_retried(loopback_server):
    server = loopback_server()
    backend = OpenAICompatBackend("no-such-model", server.base_url)
    client = ChatClient(backend, retry=FAST)
    reply = client.complete_sync(ask("x"))
    assert (
        reply.finish == "error"
        and reply.error.startswith("HTTP 404")
        and "does not exist" in reply.error
    )
    assert client.usage.errors == 1 and server.stats()["requests"] == 1


def test_concurrency_is_bounded_by_the_backend_limit(loopback_server):
    server = loopback_server(latency=0.05)
    client = client_for(server, concurrency=4)
    t0 = time.perf_counter()
    replies = client.complete_many_sync([ask(f"q{i}") for i in range(40)])
    assert all(r.ok for r in replies)
    stats = server.stats()
    assert stats["max_in_flight"] == 4  # reached, never exceeded
    assert time.perf_counter() - t0 >= 40 * 0.05 / 4


def test_replies_come_back_in_request_order_and_on_reply_sees_each(loopback_server):
    server = loopback_server(latency=0.01)
    seen: dict[int, str] = {}
    replies = run_sync(
        client_for(server).complete_many(
            [ask(f"q{i}") for i in range(30)], on_reply=lambda i, r: seen.__setitem__(i, r.text)
        )
    )
    assert [r.text for r in replies] == [f"q{i}" for i in range(30)]
    assert seen == {i: f"q{i}" for i in range(30)}


def test_one_backend_serves_several_event_loops(loopback_server):
    server = loopback_server()
    client = client_for(server)
    assert client.complete_sync(ask("a")).text == "a"
    assert client.complete_sync(ask("b")).text == "b"  # a fresh loop: a fresh session

    async def inside_a_running_loop() -> str:  # Jupyter's case: run_sync uses a thread
        return client.complete_sync(ask("c")).text

    assert asyncio.run(inside_a_running_loop()) == "c"
    assert client.backend._sessions == {}  # each loop's session was closed


def test_sessions_close_with_their_loop_even_without_aclose(loopback_server, recwarn, caplog):
    import gc

    server = loopback_server()
    client = client_for(server)
    for text in ("a", "b"):  # complete_many, not complete_many_sync: nobody awaits aclose
        assert run_sync(client.complete_many([ask(text)]))[0].text == text
    gc.collect()
    assert not [w for w in recwarn if issubclass(w.category, ResourceWarning)]
    assert "Unclosed" not in caplog.text


def _cache_lines(cache_dir: Path) -> list[dict]:
    return [
        json.loads(line) for f in cache_dir.glob("*.jsonl") for line in f.read_text().splitlines()
    ]


def test_cache_key_covers_image_bytes_sampling_and_sample_index_not_timeouts(
    loopback_server, tmp_path
):
    server = loopback_server()
    cache = tmp_path / "cache"
    image = png(tmp_path / "img.png", (255, 0, 0))

    def req(**kw) -> Request:
        return Request(
            [Message(role="user", content="look", images=["img.png"])], root=tmp_path, **kw
        )

    def served(client: ChatClient, request: Request) -> int:
        before = server.stats()["requests"]
        assert client.complete_sync(request).ok
        return server.stats()["requests"] - before

    client = client_for(server, cache_dir=cache)
    assert served(client, req()) == 1
    assert served(client, req()) == 0
    assert served(client, req(sampling=Sampling(temperature=0.5))) == 1
    assert served(client, req(sampling=Sampling(seed=1))) == 1
    assert served(client, req(sample_index=1)) == 1
    slow = client_for(
        server, cache_dir=cache, timeout=99.0, concurrency=2, retry=RetryPolicy(max_retries=1)
    )
    assert served(slow, req()) == 0  # timeout, concurrency and retries are not part of the key
    time.sleep(0.01)
    png(image, (0, 255, 0))  # same path, new bytes
    assert served(client, req()) == 1
    assert len(_cache_lines(cache)) == 5  # one record per call that reached the server


def test_rerun_is_served_from_the_cache_with_zero_server_calls(loopback_server, tmp_path):
    server = loopback_server(latency=0.01)
    requests = [ask(f"q{i}") for i in range(50)]
    first = client_for(server, cache_dir=tmp_path).complete_many_sync(requests)
    assert server.stats()["requests"] == 50
    again = client_for(server, cache_dir=tmp_path)  # a new process would build a new client
    replies = again.complete_many_sync(requests)
    assert server.stats()["requests"] == 50
    assert [r.text for r in replies] == [r.text for r in first] and all(r.cached for r in replies)
    assert again.usage.cache_hits == 50 and again.usage.calls == 0


def test_failed_calls_are_not_cached(loopback_server, tmp_path):
    server = loopback_server(faults={"http500": 1.0})
    client = client_for(server, cache_dir=tmp_path, retry=RetryPolicy(max_retries=0))
    assert client.complete_sync(ask("x")).finish == "error"
    assert client.complete_sync(ask("x")).finish == "error"
    assert server.stats()["requests"] == 2 and _cache_lines(tmp_path) == []


SECRET = "sk-test-7f3a9c1e5b2d4f6a8c0e"


def test_api_key_is_sent_but_never_stored(loopback_server, tmp_path, monkeypatch):
    server = loopback_server(api_key=SECRET)
    monkeypatch.setenv("STEERKIT_TEST_KEY", SECRET)
    spec = f"openai:{server.model}@{server.base_url}#STEERKIT_TEST_KEY"
    roles = Roles({"judge": spec}, cache_dir=tmp_path / "cache")
    client = roles.client("judge")
    assert client.complete_sync(ask("hello")).text == "hello"  # the server accepted the key
    echoed = client.complete_sync(ask(f"my key is {SECRET}"))  # a model may repeat what it saw
    assert SECRET in echoed.text
    stored = [
        json.dumps(roles.manifest()),
        repr(client.backend),
        repr(vars(client.backend)),
        str(pickle.dumps(client.backend)),
        *(f.read_text() for f in (tmp_path / "cache").rglob("*") if f.is_file()),
    ]
    assert not any(SECRET in s for s in stored)
    monkeypatch.delenv("STEERKIT_TEST_KEY")  # read at call time: without it the server says 401
    reply = client.complete_sync(ask("hello again"))
    assert reply.finish == "error" and reply.error.startswith("HTTP 401")
    assert server.stats()["outcomes"] == {"ok": 2, "unauthorized": 1}
    assert "my key is ***" in next((tmp_path / "cache").glob("*.jsonl")).read_text()


def test_role_specs_build_the_http_backend(loopback_server):
    backend = make_backend("openai:Qwen/Qwen3-VL-32B-Instruct@http://gpu-box:8000/v1/")
    assert isinstance(backend, OpenAICompatBackend)
    assert (backend.model, backend.base_url, backend.api_key_env) == (
        "Qwen/Qwen3-VL-32B-Instruct",
        "http://gpu-box:8000/v1",
        "OPENAI_API_KEY",
    )
    assert make_backend("openai:gpt-4.1@https://api.openai.com/v1#MY_KEY").api_key_env == "MY_KEY"
    for bad in ("openai:@http://x/v1", "openai:model-only", "openai:m@x:8000/v1"):
        with pytest.raises(ValueError):
            make_backend(bad)
    server = loopback_server()
    roles = Roles({"judge": f"openai:{server.model}@{server.base_url}"})
    assert roles.client("judge").complete_sync(ask("via roles")).text == "via roles"
    assert roles.manifest()["usage"]["judge"]["calls"] == 1


def test_cache_key_is_stable_across_backends_with_different_timeouts():
    a = OpenAICompatBackend("m", "http://127.0.0.1:1/v1", timeout=1.0)
    b = OpenAICompatBackend("m", "http://127.0.0.1:1/v1", timeout=60.0, max_concurrency=2)
    r = ask("same")
    assert cache_key(a.model, r) == cache_key(b.model, r)
    assert cache_key("m", r) != cache_key("other", r)


def test_an_unreachable_server_is_a_transient_failure_reported_as_error():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = ChatClient(
        OpenAICompatBackend("m", f"http://127.0.0.1:{port}/v1"),
        retry=RetryPolicy(max_retries=1, base=0.001),
    )
    reply = client.complete_sync(ask("x"))
    assert reply.finish == "error" and "connection failed" in reply.error and reply.attempts == 2


def test_server_endpoints_models_and_stats(loopback_server):
    server = loopback_server(model="judge")
    root = server.base_url.removesuffix("/v1")
    with urllib.request.urlopen(f"{server.base_url}/models") as resp:
        assert json.load(resp)["data"][0]["id"] == "judge"
    client_for(server).complete_sync(ask("x"))
    with urllib.request.urlopen(f"{root}/stats") as resp:
        stats = json.load(resp)
    assert stats["requests"] == 1 and stats["outcomes"] == {"ok": 1} and stats["in_flight"] == 0


class _Gated:
    """A backend whose calls end when the test says so; logs when each call starts."""

    model = "gated"
    batched = False

    def __init__(self, max_concurrency: int, log: list[str]) -> None:
        self.max_concurrency = max_concurrency
        self.log = log
        self.gates: dict[str, asyncio.Future[None]] = {}

    async def generate(self, requests: list[Request]) -> list[Reply]:
        text = requests[0].messages[-1].content
        self.log.append(f"send {text}")
        self.gates[text] = asyncio.get_running_loop().create_future()
        await self.gates[text]
        return [Reply(text=text, model=self.model)]

    async def aclose(self) -> None:
        return None


def test_freed_slots_are_refilled_before_replies_are_processed():
    # Two replies land together: the requests waiting for their slots go out before either reply
    # is processed (on_reply, the cache write), so that processing does not hold back the next calls.
    log: list[str] = []
    backend = _Gated(2, log)
    client = ChatClient(backend)

    async def go() -> list[Reply]:
        run = asyncio.ensure_future(
            client.complete_many(
                [ask(f"q{i}") for i in range(4)], on_reply=lambda i, r: log.append(f"land {r.text}")
            )
        )
        while len(backend.gates) < 2:
            await asyncio.sleep(0)
        backend.gates["q0"].set_result(None)
        backend.gates["q1"].set_result(None)
        while len(backend.gates) < 4:
            await asyncio.sleep(0)
        backend.gates["q2"].set_result(None)
        backend.gates["q3"].set_result(None)
        return await run

    replies = run_sync(go())
    assert [r.text for r in replies] == ["q0", "q1", "q2", "q3"]
    assert log[:4] == ["send q0", "send q1", "send q2", "send q3"], log
    assert sorted(log[4:]) == ["land q0", "land q1", "land q2", "land q3"]


def test_a_scripted_double_can_answer_without_recording():
    from steerkit.backends.scripted import ScriptExhausted

    quiet = ScriptedBackend(["a", "b"], record=False)
    client = ChatClient(quiet)
    assert [r.text for r in client.complete_many_sync([ask("x"), ask("y")])] == ["a", "b"]
    assert quiet.calls == []
    with pytest.raises(ScriptExhausted):
        client.complete_sync(ask("z"))
