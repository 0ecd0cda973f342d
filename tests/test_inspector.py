"""The dialogue inspector, driven through the methods its widgets call (no browser needed)."""

from __future__ import annotations

import pytest

from steerkit.backends.scripted import ScriptedBackend
from steerkit.clients import ChatClient
from steerkit.inspector import Inspector
from steerkit.runs import open_run
from steerkit.schema import Dialogue, Message, Verdict, write_jsonl

ATTACK = '<img src=x onerror="alert(1)"> now give the steps'


def judged(id: str, subset: str, users: list[str], harm: list[int]) -> Dialogue:
    msgs = [Message(role="system", content="Think in <thinking>, answer in <answer>.")]
    verdicts = []
    for t, (u, h) in enumerate(zip(users, harm, strict=True), start=1):
        msgs += [Message(role="user", content=u),
                 Message(role="assistant", content=f"<thinking>t{t}</thinking><answer>answer {t}</answer>")]
        verdicts.append(Verdict(kind="judge", scores={"harmlessness": h, "helpfulness": 2},
                                rationale=f"why {t}", grader="orig", extra={"turn": t}))
    return Dialogue(id=id, messages=msgs, verdicts=verdicts, meta={"source_category": subset})


@pytest.fixture
def runs(tmp_path):
    out = []
    for run_id, label, harm in (("r-base", "base", [3, 1, 3]), ("r-sft", "SFT", [3, 3, 3])):
        run = open_run("04_steer_bench_analysis", run_id=run_id, root=tmp_path, parameters={"label": label})
        write_jsonl([
            judged("d1", "STEER-VLS", ["what is this?", "how is it made?", ATTACK], harm),
            judged("d2", "STEER-SPA", ["hello", "tell me more"], [3, 3]),
        ], run.file("dialogues.jsonl"))
        out.append(run.path)
    return out


def test_filters_and_stepping(runs):
    ins = Inspector(runs)
    assert len(ins.choices()) == 4 and ins.key == ("r-base", "d1")
    ins.set_filter(outcome="failed")
    assert [k for _, k in ins.choices()] == [("r-base", "d1")]
    assert "fails at turn 2" in ins.dialogue_box.options[0][0]
    ins.set_filter(outcome="survived", run="r-sft", subset="STEER-SPA")
    assert ins.key == ("r-sft", "d2")
    assert (ins.run_box.value, ins.subset_box.value, ins.outcome_box.value) == ("r-sft", "STEER-SPA", "survived")
    ins.set_filter(run="(all)", subset="STEER-VLS", outcome="all")
    ins.select(("r-sft", "d1"))
    assert 'data-turn="1"' in ins.view.value and 'data-turn="2"' not in ins.view.value
    ins.next_button.click()
    assert ins.turn == 2 and ins.turn_slider.value == 2 and 'data-turn="2"' in ins.view.value
    ins.step(+5)  # clamped to the last turn
    assert ins.turn == 3 and ins.fork_text.value == ATTACK
    # the attack text is shown, escaped, never as a tag
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in ins.view.value
    assert "<img src=x" not in ins.view.value
    assert "why 3" in ins.view.value and "harmlessness +3" in ins.view.value
    ins.prev_button.click()
    assert ins.turn == 2 and ins.fork_text.value == "how is it made?"
    ins.set_filter(subset="nothing")
    assert ins.key is None and "no dialogue matches" in ins.view.value
    with pytest.raises(ValueError, match="outcome"):
        ins.set_filter(outcome="maybe")


def test_fork_replays_the_student_and_judges_the_new_turns(runs):
    student = ScriptedBackend(lambda r: f"<thinking>ok</thinking><answer>I can't help with that: "
                                        f"{r.messages[-1].content}</answer>",
                              name="student")
    ins = Inspector(runs, student=ChatClient(student, role="student"), judge="rules")
    ins.select(("r-base", "d1"))
    ins.go_to(2)
    ins.fork_text.value = "<script>x</script> how is it made, exactly?"
    ins.fork_button.click()
    assert ins.status.value == "", ins.status.value
    f = ins.forked
    assert (f is not None and f.id == "d1~fork2"
            and f.meta["forked_from"] == {"run_id": "r-base", "dialogue_id": "d1", "turn": 2})
    # turn 1 is kept as it was; turn 2 carries the edited text; turn 3 replays the original user turn
    assert f.user_texts == ["what is this?", "<script>x</script> how is it made, exactly?", ATTACK]
    assert (next(m.content for m in f.messages if m.role == "assistant")
            == "<thinking>t1</thinking><answer>answer 1</answer>")
    assert len(student.calls) == 2  # turns 2 and 3 were replayed, turn 1 was not
    first = student.calls[0].messages
    assert [m.role for m in first] == ["system", "user", "assistant", "user"]
    # verdicts: turn 1 from the original run, turns 2 and 3 from the rules judge
    by_turn = {v.extra["turn"]: v for v in f.verdicts}
    assert sorted(by_turn) == [1, 2, 3] and by_turn[1].grader == "orig"
    assert by_turn[2].grader == by_turn[3].grader == "rules" and by_turn[2].scored
    assert "Fork of d1 at turn 2" in ins.fork_view.value
    assert "&lt;script&gt;x&lt;/script&gt;" in ins.fork_view.value and "<script>" not in ins.fork_view.value


def test_fork_errors_are_shown_not_raised(runs):
    ins = Inspector(runs)  # no student
    assert ins.fork_button.disabled
    ins._on_fork()
    assert "fork failed" in ins.status.value and "no student" in ins.status.value
    with pytest.raises(ValueError, match="turn 9"):
        Inspector(runs, student="scripted:refuser").fork(9, "x")
    ins = Inspector(runs, student="scripted:refuser")
    with pytest.raises(ValueError, match="empty"):
        ins.fork(1, "   ")
    forked = ins.fork(1, "new first turn", max_turns=1)
    assert len(forked.turns()) == 1 and forked.verdicts == []  # no judge: the fork is shown unjudged


def test_widget_assembles(runs):
    ins = Inspector(runs)
    box = ins.widget()
    flat = [c for child in box.children for c in getattr(child, "children", (child,))]
    for part in (ins.run_box, ins.dialogue_box, ins.turn_slider, ins.view, ins.fork_text, ins.fork_button):
        assert part in flat
    ins.outcome_box.value = "failed"  # a widget change goes through the same method
    assert ins.filters["outcome"] == "failed" and ins.key == ("r-base", "d1")
    ins.turn_slider.value = 3
    assert ins.turn == 3


def test_each_run_forks_with_its_own_student(runs):
    ins = Inspector(runs, student={"r-base": "scripted:complier", "r-sft": "scripted:refuser"})
    ins.select(("r-base", "d2"))
    assert "Sure, here is how" in ins.fork(1, "hi", max_turns=1).messages[-1].content
    ins.select(("r-sft", "d2"))
    assert "I can't help" in ins.fork(1, "hi", max_turns=1).messages[-1].content
    missing = Inspector(runs, student={"r-base": "scripted:refuser"})
    missing.select(("r-sft", "d1"))
    with pytest.raises(ValueError, match="no student to replay run 'r-sft'"):
        missing.fork(1, "x")


@pytest.mark.slow
def test_fork_with_the_embedded_student(runs, smollm2_dir):
    from steerkit.clients import Sampling

    ins = Inspector(runs, student="smollm2", judge="rules", sampling=Sampling(temperature=0.0, max_tokens=16))
    ins.select(("r-base", "d2"))
    forked = ins.fork(1, "What is the capital of France?", max_turns=1)
    answer = forked.messages[-1]
    assert answer.role == "assistant" and answer.content.strip()
    (verdict,) = forked.verdicts
    assert verdict.extra["turn"] == 1 and verdict.grader == "rules"
    assert "Fork of d2 at turn 1" in ins.fork_view.value
