"""The bad-input corpus (tests/bad_inputs/): every file gets a clear error naming file, line, field."""

from __future__ import annotations

import json
import re
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from steerkit.images import ImageError, load_image
from steerkit.schema import BenchItem, Dialogue, RecordError, Verdict, load_jsonl, load_records

CORPUS = Path(__file__).parent / "bad_inputs"


@pytest.mark.parametrize(
    ("name", "cls", "expect"),
    [
        ("invalid_json.jsonl", Dialogue, r"invalid_json\.jsonl:2: invalid JSON"),
        ("wrong_role_order.jsonl", Dialogue, r"wrong_role_order\.jsonl:2: field messages: messages\[0\]\.role"),
        ("missing_role.jsonl", Dialogue, r"missing_role\.jsonl:1: field messages\.0\.role: Field required"),
        ("unknown_field.jsonl", Dialogue, r"unknown_field\.jsonl:1: field speaker: unknown field"),
        ("missing_image.jsonl", Dialogue, r"missing_image\.jsonl:1: field images\[0\]: image file not found"),
        ("escaping_image_path.jsonl", Dialogue, r"escaping_image_path\.jsonl:1: field images\[0\]: .*escapes"),
        ("not_an_object.jsonl", Dialogue, r"not_an_object\.jsonl:1: expected a JSON object"),
        ("nan_risk.jsonl", BenchItem, r"nan_risk\.jsonl:1: field risk_trajectory: .*finite"),
        ("non_utf8.jsonl", Dialogue, r"non_utf8\.jsonl:2: not UTF-8"),
        ("verdict_off_scale.jsonl", Verdict,
         r"verdict_off_scale\.jsonl:1: .*scores\.helpfulness: 7 is off the 0\.\.3 scale"),
        ("verdict_nan.jsonl", Verdict, r"verdict_nan\.jsonl:1: field scores\.helpfulness"),
        ("corrupt.parquet", Dialogue, r"corrupt\.parquet: not a readable Parquet file"),
        ("deeply_nested.jsonl", Dialogue, r"deeply_nested\.jsonl:1: JSON nested too deeply"),
    ],
)
def test_corpus_file_fails_clearly(name: str, cls: type, expect: str) -> None:
    with pytest.raises(RecordError, match=expect):
        load_records(cls, CORPUS / name)


def test_malformed_parquet_row_names_row_and_field(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": "a", "messages": [{"role": "user", "content": "hi"}]},
            {"id": "b", "messages": [{"role": "assistant", "content": "hi"}]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    with pytest.raises(RecordError, match=r"d\.parquet:2: field messages"):
        load_records(Dialogue, tmp_path / "d.parquet")


def test_one_megabyte_user_turn_is_refused(tmp_path: Path) -> None:
    row = {"id": "big", "messages": [{"role": "user", "content": "x" * 1_048_576}]}
    (tmp_path / "big.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(RecordError, match=r"big\.jsonl:1: field messages\.0\.content: String should have at most"):
        load_jsonl(Dialogue, tmp_path / "big.jsonl")


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels but carries almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def test_images_corrupt_bomb_huge_missing(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="corrupt_image.png: cannot decode image"):
        load_image(CORPUS / "corrupt_image.png")
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(100_000, 100_000))
    with pytest.raises(ImageError, match="bomb.png: refused as a decompression bomb"):
        load_image(bomb)
    wide = tmp_path / "wide.png"  # under PIL's own limit, over ours
    wide.write_bytes(_png_header_only(9_000, 9_000))
    with pytest.raises(ImageError, match="wide.png: 9000x9000 pixels is over the 64000000-pixel limit"):
        load_image(wide)
    big = tmp_path / "big.png"
    Image.new("RGB", (256, 256)).save(big)
    with pytest.raises(ImageError, match="bytes is over the 100-byte limit"):
        load_image(big, max_bytes=100)
    with pytest.raises(ImageError, match="image file not found"):
        load_image(tmp_path / "none.png")
    assert load_image(big).size == (256, 256)


# ---- the published STEER-Bench format (tests/bad_inputs/steer_published/) ------------------------

PUBLISHED = CORPUS / "steer_published"


@pytest.mark.parametrize(
    ("name", "expect"),
    [
        ("escaping_image.jsonl", r":2: field image: image path '\.\./.*' escapes the data root"),
        ("escaping_image.parquet", r":1: field image: image path '\.\./.*' escapes the data root"),
        ("absolute_image.jsonl", r":1: field image: image path '/etc/hostname' escapes"),
        ("missing_image.jsonl", r":1: field image: image file not found"),
        ("undecodable_image.jsonl", r":1: field image: cannot decode image .*not_an_image\.png"),
        ("image_not_a_string.jsonl", r":2: field image: expected a relative image path or an embedded image"),
        ("messages_fixed_a_string.jsonl",
         r":1: field messages_fixed: expected a non-empty list of user turns, got str"),
        ("messages_fixed_missing.jsonl", r":1: field messages_fixed: expected a non-empty list"),
        ("messages_fixed_empty.jsonl", r":1: field messages_fixed: expected a non-empty list"),
        ("turn_not_text.jsonl",
         r":1: field messages_fixed\[1\]: expected a string or a \{role, content\} object, got int"),
        ("turn_object_without_content.jsonl", r":1: field messages_fixed\[1\]\.content: expected a string"),
        ("assistant_turn.jsonl", r":1: field messages_fixed\[1\]\.role: expected 'user'"),
        ("blank_turn.jsonl", r":1: field messages_fixed\[1\]: the turn is blank"),
        ("risk_length_mismatch.jsonl", r":2: field risk_trajectory: 3 values for 2 turns"),
        ("risk_not_numbers.jsonl", r":1: field risk_trajectory\[0\]: expected a number, got str"),
        ("risk_booleans.jsonl", r":1: field risk_trajectory\[0\]: expected a number, got bool"),
        ("risk_nan.jsonl", r":1: field risk_trajectory\[1\]: nan is not a finite number"),
        ("risk_not_a_list.jsonl", r":1: field risk_trajectory: expected a list of numbers, got int"),
        ("question_id_missing.jsonl", r":2: field question_id: missing"),
        ("question_id_not_text.jsonl", r":1: field question_id: expected a non-empty string, got dict"),
        ("question_id_empty.jsonl", r":1: field question_id: expected a non-empty string"),
        ("category_not_text.jsonl", r":1: field category: expected a string, got list"),
        ("not_an_object.jsonl", r":2: expected a JSON object, got list"),
        ("invalid_json_after_extra_field.jsonl", r":2: invalid JSON"),
        ("non_utf8_after_extra_field.jsonl", r":2: not UTF-8"),
        ("too_deep.jsonl", r":2: invalid JSON \(nested too deeply\)"),
    ],
)
def test_published_corpus_file_fails_clearly(name: str, expect: str) -> None:
    """Each file once ended in AttributeError, TypeError, RecursionError, UnicodeDecodeError,
    DatasetGenerationError, or loaded (escaping and missing images, inconsistent records)."""
    from steerkit.synth.splits import load_steer_bench

    with pytest.raises(RecordError, match=re.escape(name) + expect):
        load_steer_bench(PUBLISHED / name)


def test_published_good_file_and_folder_load(tmp_path: Path) -> None:
    from steerkit.synth.splits import load_steer_bench

    items = load_steer_bench(PUBLISHED / "good.jsonl")
    assert [it.question_id for it in items] == ["q1", "q2"]
    assert items[0].image == "images/cup.png" and items[0].messages_fixed[0].images == ["images/cup.png"]
    assert items[0].messages_fixed[1].images == [] and items[0].risk_trajectory == [1.0, 4.0]
    # A data-set folder is read from its split's files by the same strict reader.
    folder = tmp_path / "steer"
    (folder / "data" / "images").mkdir(parents=True)
    (folder / "data" / "test.jsonl").write_text((PUBLISHED / "good.jsonl").read_text())
    with pytest.raises(RecordError, match=r"data/test\.jsonl:1: field image: image file not found"):
        load_steer_bench(folder, split="test")  # refs are relative to the folder, not to data/
    (folder / "images").mkdir()
    (folder / "images" / "cup.png").write_bytes((PUBLISHED / "images" / "cup.png").read_bytes())
    assert load_steer_bench(folder, split="test") == items
    with pytest.raises(RecordError, match=r"no files for split 'train'"):
        load_steer_bench(folder, split="train")


def test_published_hub_name_offline_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    from steerkit.synth.seed_files import HubUnavailable
    from steerkit.synth.splits import load_steer_bench

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(HubUnavailable, match=r"'no-such-org/steer-bench' .* the hub is switched off"):
        load_steer_bench("no-such-org/steer-bench", split="test")


def test_published_parquet_with_embedded_images(tmp_path: Path) -> None:
    """A `datasets` Image column in Parquet holds {bytes, path}: saved into image_dir, or refused clearly."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from steerkit.synth.splits import load_steer_bench

    png = (PUBLISHED / "images" / "cup.png").read_bytes()
    rows = [{"question_id": "a/1", "messages_fixed": ["What is this?"], "image": {"bytes": png, "path": None}},
            {"question_id": "a/2", "messages_fixed": ["And this?"], "image": {"bytes": b"junk", "path": None}}]
    pq.write_table(pa.Table.from_pylist(rows[:1]), tmp_path / "ok.parquet")
    with pytest.raises(RecordError, match=r"ok\.parquet:1: field image: an embedded image needs image_dir"):
        load_steer_bench(tmp_path / "ok.parquet")
    (item,) = load_steer_bench(tmp_path / "ok.parquet", image_dir=tmp_path / "images")
    assert item.image.startswith("images/a_1-") and Image.open(tmp_path / item.image).size == (4, 4)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "bad.parquet")
    with pytest.raises(RecordError, match=r"bad\.parquet:2: field image: cannot decode the embedded image"):
        load_steer_bench(tmp_path / "bad.parquet", image_dir=tmp_path / "images")
