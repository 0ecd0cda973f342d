"""The bad-input corpus (tests/bad_inputs/): every file gets a clear error naming file, line, field."""

from __future__ import annotations

import json
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
        ("verdict_off_scale.jsonl", Verdict, r"verdict_off_scale\.jsonl:1: .*scores\.helpfulness: 7 is off the 0\.\.3 scale"),
        ("verdict_nan.jsonl", Verdict, r"verdict_nan\.jsonl:1: field scores\.helpfulness"),
        ("corrupt.parquet", Dialogue, r"corrupt\.parquet: not a readable Parquet file"),
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
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


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
