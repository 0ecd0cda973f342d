"""Per-role request options against a server that refuses max_tokens and temperature as gpt-5-nano does."""

from __future__ import annotations

import json

import pytest

from steerkit.backends.openai_compat import RequestOptions, chat_body
from steerkit.backends.scripted import named_double
from steerkit.clients import ChatClient, Request, Sampling
from steerkit.judge import judge_dialogues
from steerkit.roles import Roles, make_backend, openai_backend, served_roles
from steerkit.schema import Dialogue, Message

#: The judge spec docs/full_run.md gives for OpenAI's reasoning models (URL swapped for loopback).
REASONING = "?max_tokens_field=max_completion_tokens&omit=temperature,top_p&reasoning_effort=minimal"


def dialogues(n: int = 3) -> list[Dialogue]:
    out = []
    for k in range(n):
        msgs = [Message(role="system", content="Think in <thinking>, answer in <answer>.")]
        for t in range(3):
            msgs += [Message(role="user", content=f"question {k}.{t}"),
                     Message(role="assistant", content=f"<thinking>t</thinking><answer>answer {k}.{t}</answer>")]
        out.append(Dialogue(id=f"d-{k}", messages=msgs))
    return out


def test_options_rename_drop_and_add_body_fields() -> None:
    request = Request([Message(role="user", content="hi")], sampling=Sampling(max_tokens=64, seed=3))
    body = json.loads(chat_body("m", request, RequestOptions.parse(REASONING[1:])))
    assert body == {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 64,
                    "seed": 3, "reasoning_effort": "minimal"}
    assert json.loads(chat_body("m", request))["max_tokens"] == 64  # unconfigured: as before


def test_spec_options_and_key_variable_parse_and_bad_ones_name_the_spec() -> None:
    backend = openai_backend(f"openai:gpt-5-nano@https://api.openai.com/v1{REASONING}#MY_KEY")
    assert (backend.model, backend.base_url, backend.api_key_env) == (
        "gpt-5-nano", "https://api.openai.com/v1", "MY_KEY"
    )
    assert backend.options.manifest() == {"max_tokens_field": "max_completion_tokens", "omit": ["temperature", "top_p"],
                                          "extra": {"reasoning_effort": "minimal"}}
    with pytest.raises(ValueError, match=r"role spec .*omit=temprature: only temperature"):
        make_backend("openai:m@http://h/v1?omit=temprature")
    with pytest.raises(ValueError, match="max_tokens: written by the backend itself"):
        make_backend("openai:m@http://h/v1?max_tokens=5")


def test_a_judge_configured_as_documented_scores_every_turn_where_the_plain_one_is_told_the_fix(
    loopback_server,
) -> None:
    server = loopback_server(backend=named_double("judge"), model="gpt-5-nano",
                             refuse=("max_tokens", "temperature", "top_p"))
    plain = ChatClient(make_backend(f"openai:gpt-5-nano@{server.base_url}"), role="judge")
    verdicts = [v for d in judge_dialogues(plain, dialogues()) for v in d]
    assert len(verdicts) == 9 and not any(v.scored for v in verdicts)
    assert all("add ?max_tokens_field=max_completion_tokens after the URL" in v.extra["detail"] for v in verdicts)
    assert server.stats()["outcomes"] == {"unsupported": 9}  # a 400 is not retried

    half = ChatClient(make_backend(f"openai:gpt-5-nano@{server.base_url}?max_tokens_field=max_completion_tokens"))
    verdicts = [v for d in judge_dialogues(half, dialogues()) for v in d]
    assert all("add ?omit=temperature" in v.extra["detail"] for v in verdicts)

    spec = f"openai:gpt-5-nano@{server.base_url}{REASONING}"
    roles = Roles({"judge": spec})
    verdicts = [v for d in judge_dialogues(roles.client("judge"), dialogues()) for v in d]
    assert len(verdicts) == 9 and all(v.scored for v in verdicts)
    stats = server.stats()
    assert stats["outcomes"]["ok"] == 9
    assert stats["body_fields"]["reasoning_effort"] == 9 and stats["body_fields"]["max_completion_tokens"] == 18
    assert roles.manifest()["request_options"]["judge"]["max_tokens_field"] == "max_completion_tokens"


def test_the_server_accepts_temperature_one_as_reasoning_models_do(loopback_server) -> None:
    server = loopback_server(model="m", refuse=("temperature",))
    client = ChatClient(make_backend(f"openai:m@{server.base_url}"))
    ok = client.complete_sync(Request([Message(role="user", content="x")], sampling=Sampling(temperature=1.0)))
    refused = client.complete_sync(Request([Message(role="user", content="y")], sampling=Sampling(temperature=0.0)))
    assert ok.ok and refused.finish == "error" and "'temperature' does not support 0.0" in refused.error
    with pytest.raises(ValueError, match="the server can refuse"):
        loopback_server(refuse=("seed",))


def test_served_roles_record_the_servers_model_ids_and_options(loopback_server) -> None:
    a = loopback_server(model="Qwen/Qwen3-VL-32B-Instruct")
    b = loopback_server(model="gpt-5-nano")
    record = served_roles({
        "tutor": f"openai:Qwen/Qwen3-VL-32B-Instruct@{a.base_url}",
        "generator": f"openai:Qwen/Qwen3-VL-32B-Instruct@{a.base_url}",
        "judge": f"openai:gpt-5-nano@{b.base_url}{REASONING}",
        "student": "hf:/models/x", "red_user": f"openai:typo@{b.base_url}",
    })
    assert set(record) == {"tutor", "generator", "judge", "red_user"}
    assert record["tutor"]["server_models"] == ["Qwen/Qwen3-VL-32B-Instruct"] and record["tutor"]["model_listed"]
    assert record["judge"]["request_options"]["omit"] == ["temperature", "top_p"]
    assert record["red_user"]["model_listed"] is False
    gone = served_roles({"judge": "openai:m@http://127.0.0.1:9/v1"}, timeout=2)
    assert "GET http://127.0.0.1:9/v1/models" in gone["judge"]["server_error"]


def test_the_tested_options_are_the_ones_docs_full_run_gives() -> None:
    import re

    from steerkit.runs import REPO_ROOT

    docs = (REPO_ROOT / "docs/full_run.md").read_text()
    assert re.findall(r"openai:gpt-5-nano@https://api\.openai\.com/v1(\?[^\"\s]+)", docs) == [REASONING]


def test_the_command_line_server_refuses_as_told() -> None:
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "steerkit.serve", "--port", "0", "--model", "gpt-5-nano",
         "--refuse", "max_tokens", "--refuse", "temperature", "--refuse", "top_p"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        base_url = proc.stdout.readline().strip()  # type: ignore[union-attr]
        ask = Request([Message(role="user", content="over the wire")])
        plain = ChatClient(make_backend(f"openai:gpt-5-nano@{base_url}")).complete_sync(ask)
        assert plain.finish == "error" and "?max_tokens_field=max_completion_tokens" in plain.error
        configured = ChatClient(make_backend(f"openai:gpt-5-nano@{base_url}{REASONING}")).complete_sync(ask)
        assert configured.text == "over the wire"
    finally:
        proc.terminate()
        assert proc.wait(timeout=20) == 0
