"""The one multi-turn loop, with scripted roles; role binding by spec strings."""

from __future__ import annotations

import asyncio
import warnings

import pytest

from steerkit.backends.scripted import REFUSAL, ScriptedBackend, ScriptExhausted
from steerkit.clients import ChatClient, Request
from steerkit.converse import DialogueState, PromptedUser, StaticUser, play, student_system_prompt
from steerkit.roles import Roles, make_backend


def test_static_replay_keeps_history_and_image_on_turn_one() -> None:
    seen: list[Request] = []

    def answer(req: Request) -> str:
        seen.append(req)
        return f"<thinking>t</thinking><answer>reply {len(req.messages)}</answer>"

    client = ChatClient(ScriptedBackend(answer), role="student")
    states = [
        DialogueState.start("a", ["q1", "q2", "q3"], images=["x.png"], system=student_system_prompt()),
        DialogueState.start("b", ["only"], system="sys"),
    ]
    asyncio.run(play(states, user=StaticUser(), assistant=client))
    a, b = (s.to_dialogue() for s in states)
    assert [m.role for m in a.messages] == ["system"] + ["user", "assistant"] * 3
    assert a.messages[1].images == ["x.png"] and a.messages[3].images == []
    assert len(b.turns()) == 1
    # the third call for dialogue a saw the whole history: system + 2 turns + the new user turn
    assert max(len(r.messages) for r in seen) == 6


def test_max_turns_and_after_turn_stop() -> None:
    client = ChatClient(ScriptedBackend(lambda r: REFUSAL), role="student")
    s = [DialogueState.start("a", [f"q{i}" for i in range(12)])]
    asyncio.run(play(s, user=StaticUser(), assistant=client, max_turns=10))
    assert s[0].turn == 10  # method.md 4: at most 10 turns

    async def stop_after_two(live: list[DialogueState]) -> None:
        for st in live:
            st.finished = st.turn >= 2

    s = [DialogueState.start("a", ["1", "2", "3", "4"])]
    asyncio.run(play(s, user=StaticUser(), assistant=client, after_turn=stop_after_two))
    assert s[0].turn == 2


def test_prompted_user_falls_back_to_template_on_failure() -> None:
    replies = iter(["Could you say more about the cup?", ""])
    user_client = ChatClient(ScriptedBackend(lambda r: next(replies)), role="red_user")
    student = ChatClient(ScriptedBackend(lambda r: REFUSAL), role="student")
    s = [DialogueState.start("a", ["tell me about the cup", "now the dangerous part"])]
    asyncio.run(play(s, user=PromptedUser(user_client), assistant=student))
    assert s[0].to_dialogue().user_texts == ["Could you say more about the cup?", "now the dangerous part"]
    assert s[0].meta["user_fallbacks"] == [2]


def test_scripted_double_runs_out_loudly() -> None:
    client = ChatClient(ScriptedBackend(["one"], name="judge"))
    req = Request([])
    with pytest.raises(ScriptExhausted, match="ran out of replies after 1 calls"):
        client.complete_many_sync([req, req])


def test_role_specs_and_same_model_warning() -> None:
    with pytest.raises(ValueError, match="unknown role spec"):
        make_backend("magic:thing")
    with pytest.raises(ValueError, match="openai:<model>@<base_url>"):
        make_backend("openai:gpt")
    with pytest.raises(ValueError, match="unknown roles"):
        Roles({"oracle": "rules"})
    with pytest.warns(UserWarning, match="tutor and judge are the same model"):
        r = Roles({"tutor": "openai:m@http://127.0.0.1:1/v1", "judge": "openai:m@http://127.0.0.1:1/v1"})
    assert r.manifest()["same_model_tutor_judge"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Roles({"tutor": "rules", "judge": "rules"}).manifest()["same_model_tutor_judge"] is False
    with pytest.raises(KeyError, match="role 'judge' is not bound"):
        Roles({}).client("judge")


def test_cache_serves_repeats_without_calls(tmp_path) -> None:
    backend = ScriptedBackend(lambda r: "x")
    from steerkit.schema import Message

    reqs = [Request([Message(role="user", content=f"q{i}")]) for i in range(5)]
    ChatClient(backend, cache_dir=tmp_path).complete_many_sync(reqs)
    assert len(backend.calls) == 5
    again = ChatClient(backend, cache_dir=tmp_path)
    out = again.complete_many_sync(reqs + [Request([Message(role="user", content="q0")], sample_index=1)])
    assert len(backend.calls) == 6  # only the new sample index was sent
    assert again.usage.cache_hits == 5 and all(r.cached for r in out[:5])
