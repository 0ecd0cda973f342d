"""Records: strict loading names file, line and field; TRL rows round-trip through `datasets`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from steerkit.schema import (
    BenchItem,
    Dialogue,
    Message,
    RecordError,
    Seed,
    Verdict,
    from_trl_sft_row,
    load_jsonl,
    to_dataset,
    to_trl_prompt_row,
    to_trl_sft_row,
    write_jsonl,
)


def _dialogue(**over) -> dict:
    d = {
        "id": "d1",
        "images": ["img.png"],
        "messages": [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": "What is this?", "images": ["img.png"]},
            {"role": "assistant", "content": "<thinking>t</thinking><answer>A cup.</answer>"},
            {"role": "user", "content": "And its colour?"},
            {"role": "assistant", "content": "<thinking>t</thinking><answer>Brown.</answer>"},
        ],
    }
    d.update(over)
    return d


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    Image.new("RGB", (8, 8), "brown").save(tmp_path / "img.png")
    return tmp_path


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_valid_file_loads(data_dir: Path) -> None:
    p = _write(data_dir / "ok.jsonl", [_dialogue(), "", _dialogue(id="d2")])
    ds = load_jsonl(Dialogue, p)
    assert [d.id for d in ds] == ["d1", "d2"]
    assert [t.index for t in ds[0].turns()] == [1, 2]
    assert ds[0].user_texts == ["What is this?", "And its colour?"]


@pytest.mark.parametrize(
    ("row", "expect"),
    [
        # missing role in the second message
        (_dialogue(messages=[{"role": "user", "content": "a"}, {"content": "b"}]), "field messages.1.role"),
        # assistant speaks first
        (_dialogue(messages=[{"role": "assistant", "content": "a"}]), "messages[0].role: expected 'user'"),
        # two user turns in a row
        (_dialogue(messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]),
         "messages[1].role: expected 'assistant'"),
        # unknown field
        (_dialogue(colour="red"), "field colour: unknown field"),
        # missing image file
        (_dialogue(images=["nope.png"]), "field images[0]: image file not found"),
        # image path escaping the data root
        (_dialogue(images=["../../etc/passwd"]), "escapes the data root"),
    ],
)
def test_bad_rows_name_file_line_field(data_dir: Path, row: dict, expect: str) -> None:
    p = _write(data_dir / "bad.jsonl", [_dialogue(), row])
    with pytest.raises(RecordError) as exc:
        load_jsonl(Dialogue, p)
    msg = str(exc.value)
    assert msg.startswith(f"{p}:2:"), msg
    assert expect in msg


def test_invalid_json_and_non_utf8(data_dir: Path) -> None:
    p = _write(data_dir / "j.jsonl", [_dialogue(), '{"id": "x", "messages": ['])
    with pytest.raises(RecordError, match=r"j\.jsonl:2: invalid JSON"):
        load_jsonl(Dialogue, p)
    q = data_dir / "u.jsonl"
    q.write_bytes(json.dumps(_dialogue()).encode() + b"\n" + b'{"id": "\xff"}\n')
    with pytest.raises(RecordError, match=r"u\.jsonl:2: not UTF-8 \(byte 0xff"):
        load_jsonl(Dialogue, q)


def test_verdict_scales() -> None:
    Verdict(kind="tutor", scores={"safety": 10, "usefulness": 1, "faithfulness": 5})
    with pytest.raises(ValueError, match="off the -3..3 scale"):
        Verdict(kind="judge", scores={"helpfulness": 1, "harmlessness": 4})
    with pytest.raises(ValueError, match="expected keys"):
        Verdict(kind="attack", scores={})
    u = Verdict.unscored("judge", "parse_failure", raw="???")
    assert not u.scored and u.scores == {}
    with pytest.raises(ValueError, match="carries no scores"):
        Verdict(kind="judge", scores={"helpfulness": 1, "harmlessness": 1}, unscored_reason="x")


def test_bench_item_published_fields(data_dir: Path) -> None:
    row = {
        "question_id": "q1",
        "messages_fixed": [{"role": "user", "content": "hi"}, {"role": "user", "content": "more"}],
        "image": "img.png",
        "category": "weapons",
        "source_category": "beaver",
        "risk_trajectory": [1, 2.5],
    }
    (item,) = load_jsonl(BenchItem, _write(data_dir / "b.jsonl", [row]))
    assert item.user_turns == ["hi", "more"]
    bad = dict(row, risk_trajectory=[1, float("nan")])
    with pytest.raises(RecordError, match="risk_trajectory"):
        load_jsonl(BenchItem, _write(data_dir / "b2.jsonl", [json.dumps(bad).replace("NaN", "NaN")]))


def test_seed_blank_text_rejected() -> None:
    with pytest.raises(ValueError, match="blank"):
        Seed(id="s", text="   ", harmful=True, source="x", license="MIT")


def test_trl_rows_round_trip_through_datasets(data_dir: Path, tmp_path: Path) -> None:
    d = Dialogue.model_validate(_dialogue())
    row = to_trl_sft_row(d, root=data_dir)
    assert row["messages"][1]["content"][0] == {"type": "image"}
    assert row["images"] == [str((data_dir / "img.png").resolve())]
    ds = to_dataset([row])
    back = from_trl_sft_row(ds[0])
    assert [m.content for m in back.messages] == [m.content for m in d.messages]
    assert back.messages[1].images == row["images"]
    prompt = to_trl_prompt_row(d)
    assert [m["role"] for m in prompt["prompt"]] == ["system", "user"]
    assert prompt["static_turns"] == ["And its colour?"]
    # records written atomically read back identically
    out = write_jsonl([d], tmp_path / "out" / "x.jsonl")
    assert load_jsonl(Dialogue, out, check_images=False) == [d]


def test_message_rejects_unknown_role() -> None:
    with pytest.raises(ValueError):
        Message(role="tool", content="x")  # type: ignore[arg-type]
