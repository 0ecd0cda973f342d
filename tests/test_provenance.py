"""Manifests record input hashes, prompt hashes, served model ids, request options, hardware, packages."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from steerkit.prompts import PROMPT_DIR
from steerkit.provenance import imported_modules, input_digests
from steerkit.runs import open_run
from steerkit.verdicts import TUTOR_PROMPT


def test_a_manifest_says_what_exactly_ran(tmp_path: Path, loopback_server) -> None:
    policy = loopback_server(model="Qwen/Qwen3-VL-32B-Instruct")
    grader = loopback_server(model="served-under-another-name")
    data = tmp_path / "01" / "run"
    (data / "images").mkdir(parents=True)
    (data / "cache").mkdir()
    (data / "steer_rl.jsonl").write_text('{"id": 1}\n')
    (data / "images" / "a.png").write_bytes(b"png")
    (data / "cache" / "replies.jsonl").write_text("changes as the run goes\n")
    seeds = tmp_path / "my_seeds.csv"
    seeds.write_text("prompt\nhello\n")
    judge = f"openai:gpt-5-nano@{grader.base_url}?max_tokens_field=max_completion_tokens&omit=temperature"
    run = open_run(
        "04_x", run_id="r", root=tmp_path / "runs", parameters={"seed_files": [str(seeds)], "n": 3},
        roles={"tutor": f"openai:Qwen/Qwen3-VL-32B-Instruct@{policy.base_url}", "judge": judge, "student": "smollm2"},
        prompts={"judge": "judge@1"}, inputs={"synth_run": str(data), "none": "None"},
    )
    m = json.loads((run.path / "manifest.json").read_text())
    sha = lambda b: hashlib.sha256(b).hexdigest()
    digests = m["input_sha256"]["synth_run"]["sha256"]
    assert digests["steer_rl.jsonl"] == sha(b'{"id": 1}\n') and digests["images/"]["files"] == 1
    assert "cache/" not in digests and "none" not in m["input_sha256"]
    assert m["input_sha256"]["seed_files[0]"]["sha256"] == sha(b"prompt\nhello\n")
    assert m["prompt_sha256"] == {"judge@1": sha((PROMPT_DIR / "judge.yaml").read_bytes())}
    served = m["served_roles"]
    assert set(served) == {"tutor", "judge"}
    assert served["tutor"]["server_models"] == ["Qwen/Qwen3-VL-32B-Instruct"] and served["tutor"]["model_listed"]
    assert served["judge"]["server_models"] == ["served-under-another-name"] and not served["judge"]["model_listed"]
    assert served["judge"]["request_options"] == {"max_tokens_field": "max_completion_tokens",
                                                  "omit": ["temperature"], "extra": {}}
    assert m["hardware"]["torch"] and "cuda_available" in m["hardware"]
    for dist in ("transformers", "trl", "aiohttp", "pydantic", "Jinja2", "PyYAML"):
        assert m["packages"][dist], dist
    run.update_manifest(prompts={"tutor": TUTOR_PROMPT})
    assert set(json.loads((run.path / "manifest.json").read_text())["prompt_sha256"]) == {TUTOR_PROMPT}


def test_every_module_steerkit_imports_is_found_and_no_stdlib_one() -> None:
    found = imported_modules()
    assert {"torch", "transformers", "trl", "aiohttp", "yaml", "jinja2"} <= found
    assert not {"json", "asyncio", "steerkit", "__future__"} & found


def test_a_missing_input_is_left_out_and_a_model_folder_is_one_digest(tmp_path: Path) -> None:
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "model.safetensors").write_bytes(b"w")
    (tmp_path / "trainer").mkdir()
    out = input_digests({"sft_run": str(tmp_path), "gone": str(tmp_path / "nope")})
    assert set(out) == {"sft_run"} and set(out["sft_run"]["sha256"]) == {"checkpoint/"}
