"""Splits: written as JSONL readable by `datasets`, RL disjoint from SFT, bench subsets, the STEER loader."""

from __future__ import annotations

import json

import pytest

from steerkit.schema import (
    BenchItem,
    Dialogue,
    Message,
    RecordError,
    Script,
    load_jsonl,
    write_jsonl,
)
from steerkit.synth import splits as sp


def _dialogue(i: int, users: list[str], curve: list[int]) -> Dialogue:
    msgs = [Message(role="system", content="s")]
    for u in users:
        msgs += [Message(role="user", content=u),
                 Message(role="assistant", content="<thinking>t</thinking><answer>a</answer>")]
    return Dialogue(id=f"d{i}", messages=msgs, kind="obfuscated", strategy="progressive_disclosure",
                    meta={"risk_trajectory": curve, "template_turns": users})


def test_rl_takes_rising_risk_and_shares_nothing_with_sft():
    rising = [_dialogue(i, [f"a{i}", f"b{i}", f"c{i}"], [1, 3, 5]) for i in range(6)]
    flat = [_dialogue(10 + i, [f"x{i}", f"y{i}", f"z{i}"], [1, 1, 1]) for i in range(3)]
    twin = _dialogue(20, ["a0", "b0", "c0"], [1, 1, 1])  # same user texts as a rising one
    sft, rl = sp.split_rl(rising + flat + [twin], share=1.0, min_turns=3, seed=0)
    assert all(sp.rises(d.meta["risk_trajectory"]) for d in rl)
    assert {d.id for d in flat} <= {d.id for d in sft}
    sft_hashes = {sp.user_text_hash(d.user_texts) for d in sft}
    assert not any(sp.user_text_hash(d.user_texts) in sft_hashes for d in rl)
    assert "d0" not in {d.id for d in rl} and len(rl) == 5  # d0 collides with its SFT twin
    sft, rl = sp.split_rl(rising, share=0.5, min_turns=3, seed=0)
    assert len(rl) == 3 and len(sft) == 3


def test_bench_items_and_hold_out():
    scripts = [Script(id=f"s{i}", seed_id=f"x{i}", kind=k, strategy="st", user_turns=["u1", "u2"], risk_curve=[1, 5],
                      images=["images/a.png"] if i % 2 else [], meta={"source": src})
               for i, (k, src) in enumerate([("redteam", "advbench"), ("benign", "templated"),
                                             ("obfuscated", "strongreject"), ("obfuscated", "advbench"),
                                             ("obfuscated", "advbench"), ("benign", "pyrit-benign")])]
    items = [sp.bench_item(s) for s in scripts]
    assert [b.source_category for b in items] == ["STEER-DyS", "STEER-SPA", "STEER-Beaver", "STEER-VLS",
                                                  "STEER-MMSafe", "STEER-SPA"]
    assert items[1].messages_fixed[0].images == ["images/a.png"] and items[1].messages_fixed[1].images == []
    assert items[0].risk_trajectory == [1.0, 5.0] and set(sp.SUBSETS) >= {b.source_category for b in items}
    train, bench = sp.hold_out(scripts, 0.5, seed=0)
    assert {s.kind for s in bench} == {"benign", "obfuscated"} and len(train) + len(bench) == 6
    assert not {s.id for s in train} & {s.id for s in bench}


def test_splits_are_readable_by_datasets_and_schema(tmp_path):
    import datasets

    ds_ = [_dialogue(i, [f"a{i}", f"b{i}"], [1, 5]) for i in range(3)]
    ds_[0] = ds_[0].model_copy(update={"meta": {**ds_[0].meta, "perturbation": {"trigger": "DEBUG_MODE"}}})
    write_jsonl(ds_, tmp_path / sp.SFT_FILE)
    bench = [BenchItem(question_id="q1", messages_fixed=[Message(role="user", content="hi")], category="c",
                       source_category="STEER-SPA", risk_trajectory=[1.0])]
    write_jsonl(bench, tmp_path / sp.BENCH_FILE)
    got = datasets.load_dataset("json", data_files=str(tmp_path / sp.SFT_FILE), split="train")
    assert got.num_rows == 3 and got[0]["messages"][1]["content"] == "a0"
    assert load_jsonl(Dialogue, tmp_path / sp.SFT_FILE) == ds_
    assert sp.load_steer_bench(tmp_path / sp.BENCH_FILE) == bench
    card = sp.dataset_card({"sft": sp.split_counts(ds_), "bench": sp.split_counts(bench)}, run_id="r",
                           provenance={"licenses": {"strongreject: MIT": 2}})
    assert "config_name: sft" in card and "| sft | 3 | 2.00 |" in card and "strongreject: MIT" in card


def test_official_steer_bench_fields_load(tmp_path):
    rows = [{"question_id": "beaver_001", "messages_fixed": ["Look at this.", {"role": "user", "content": "And now?"}],
             "image": None, "category": "weapons", "source_category": "BeaverTails-V",
             "risk_trajectory": [0.1, 0.9], "extra_field": 1}]
    path = tmp_path / "steer_bench_official.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (item,) = sp.load_steer_bench(path)
    assert item.question_id == "beaver_001" and item.user_turns == ["Look at this.", "And now?"]
    assert item.risk_trajectory == [0.1, 0.9] and item.source_category == "BeaverTails-V"
    folder = tmp_path / "steer_hub"
    folder.mkdir()
    (folder / "test.jsonl").write_text(path.read_text())
    assert sp.load_steer_bench(str(folder), split="test") == [item]


def test_strict_bench_file_errors_name_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question_id": "q", "messages_fixed": []}) + "\n")
    with pytest.raises(RecordError, match=r"bad.jsonl:1: field messages_fixed"):
        sp.load_steer_bench(path)
