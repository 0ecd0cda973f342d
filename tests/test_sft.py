"""Stage II SFT: data rows, the assistant-only loss mask, training, resume, DDP and the recipes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from steerkit.layout import CHECKPOINT
from steerkit.runs import REPO_ROOT
from steerkit.schema import Dialogue, Message, RecordError, write_jsonl
from steerkit.sft import STAGE, SFTRecipe, run_sft
from steerkit.sft_data import captioned, read_dialogues, sft_rows, turns_past_max_length
from steerkit.sft_trainer import build_trainer, training_log

CAPTIONS = {"images/red.png": "a red square", "images/blue.png": "a blue rectangle"}


def make_dialogues(folder: Path, n: int = 6) -> Path:
    """``n`` two-turn dialogues, some with an image in the first or the second user turn."""
    from PIL import Image

    (folder / "images").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (56, 56), (200, 30, 30)).save(folder / "images/red.png")
    Image.new("RGB", (84, 56), (30, 30, 200)).save(folder / "images/blue.png")
    rows = []
    for i in range(n):
        rows.append(Dialogue(id=f"d{i}", messages=[
            Message(role="system", content="a system prompt the data came with"),
            Message(role="user", content=f"What is in picture {i}?", images=["images/red.png"] if i % 2 == 0 else []),
            Message(role="assistant", content=f"<thinking>look {i}</thinking><answer>A colour {i}.</answer>"),
            Message(role="user", content="And this one?", images=["images/blue.png"] if i % 3 == 0 else []),
            Message(role="assistant",
                    content=f"<thinking>risky</thinking><answer>I can't help with that {i}.</answer>"),
        ]))
    write_jsonl(rows, folder / "steer_sft.jsonl")
    (folder / "captions.json").write_text(json.dumps(CAPTIONS))
    return folder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dialogues(tmp_path_factory.mktemp("steer_sft"))


def tiny_recipe(tiny_vlm_dir: Path, data_dir: Path, root: Path, **kw) -> SFTRecipe:
    base = {"student": str(tiny_vlm_dir), "data": str(data_dir), "finetune": "full", "max_steps": 4,
            "batch_size": 2, "per_device_batch_size": 2, "learning_rate": 1e-3, "max_length": None,
            "logging_steps": 1, "save_steps": 2, "runs_root": str(root)}
    return SFTRecipe(**{**base, **kw})


def masked_in_spans(batch, tokenizer) -> list[list[str]]:
    """Per row, the decoded runs of consecutive tokens that carry loss."""
    out = []
    for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True):
        spans, cur = [], []
        for tok, lab in zip(ids.tolist(), labels.tolist(), strict=True):
            if lab != -100:
                cur.append(tok)
            elif cur:
                spans.append(cur)
                cur = []
        if cur:
            spans.append(cur)
        out.append([tokenizer.decode(s) for s in spans])
    return out


def assistant_texts(data_dir: Path) -> list[list[str]]:
    return [[m.content for m in d.messages if m.role == "assistant"]
            for _, d in read_dialogues(data_dir / "steer_sft.jsonl")]


# ---- rows ------------------------------------------------------------------------------------------


def test_text_rows_put_captions_before_the_turn_and_the_student_system_prompt_first(data_dir: Path) -> None:
    dialogues = read_dialogues(data_dir / "steer_sft.jsonl")
    rows = sft_rows(dialogues, data_dir / "steer_sft.jsonl", vision=False, system="SYS", captions=CAPTIONS)
    first = rows[0]["messages"]
    assert [m["role"] for m in first] == ["system", "user", "assistant", "user", "assistant"]
    assert first[0]["content"] == "SYS"  # replaces the data's own system prompt
    assert first[1]["content"] == "[Image: a red square]\nWhat is in picture 0?"
    assert first[3]["content"] == "[Image: a blue rectangle]\nAnd this one?"
    assert rows[1]["messages"][1]["content"] == "What is in picture 1?"
    assert "images" not in rows[0]


def test_vision_rows_keep_image_placeholders_in_order(data_dir: Path) -> None:
    path = data_dir / "steer_sft.jsonl"
    rows = sft_rows(read_dialogues(path), path, vision=True, system=None)
    assert rows[0]["images"] == [str(data_dir / "images/red.png"), str(data_dir / "images/blue.png")]
    assert rows[0]["messages"][0]["content"][0]["text"] == "a system prompt the data came with"
    assert rows[0]["messages"][3]["content"][0] == {"type": "image"}
    assert rows[1]["images"] == []


def test_missing_caption_names_file_line_and_field(data_dir: Path) -> None:
    path = data_dir / "steer_sft.jsonl"
    with pytest.raises(RecordError, match=r"steer_sft.jsonl:1: field messages\[1\].images\[0\]: no caption"):
        sft_rows(read_dialogues(path), path, vision=False, system=None, captions={})


def test_record_captions_are_used_when_no_file_names_the_image() -> None:
    m = Message(role="user", content="Hi", images=["x.png", "y.png"])
    assert captioned(m, {"x.png": "one", "y.png": "two"}, where="f:1", index=1) == "[Image: one]\n[Image: two]\nHi"


def test_a_dialogue_ending_on_a_user_turn_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    d = Dialogue(id="x", messages=[Message(role="user", content="a"), Message(role="assistant", content="b"),
                                   Message(role="user", content="c")])
    write_jsonl([d], path)
    with pytest.raises(RecordError, match=r"d.jsonl:1: field messages: the last message must be the assistant's"):
        read_dialogues(path)


def test_offline_sft_data_and_held_out_first_turns(tmp_path: Path) -> None:
    from steerkit.converse import student_system_prompt
    from steerkit.sft_data import first_turn_requests
    from steerkit.smoke_inputs import offline_sft_data

    data = offline_sft_data(tmp_path, run_id="data", n_benign=4, n_harmful=4)
    assert read_dialogues(data / "steer_sft.jsonl")
    requests = first_turn_requests(data, n=3, max_tokens=16)
    assert requests and all(r.messages[0].content == student_system_prompt() for r in requests)
    assert all([m.role for m in r.messages] == ["system", "user"] for r in requests)
    assert all(set(m.images) <= set(r.captions) for r in requests for m in r.messages)
    assert requests[0].sampling.max_tokens == 16


# ---- recipes ---------------------------------------------------------------------------------------


def test_defaults_are_the_paper_values() -> None:
    r = SFTRecipe()
    assert (r.learning_rate, r.num_train_epochs, r.optim, r.weight_decay, r.batch_size, r.max_length) == (
        1e-5, 2, "adamw_torch", 0.01, 16, 32768)  # method.md 3
    assert (r.finetune, r.freeze_vision, r.bf16) == ("full", True, "auto")


def test_recipe_files_load_and_unknown_fields_fail(tmp_path: Path) -> None:
    paper = SFTRecipe.from_yaml(REPO_ROOT / "configs/sft_paper_3b.yaml")
    assert (paper.learning_rate, paper.num_train_epochs, paper.batch_size, paper.max_length) == (1e-5, 2, 16, 32768)
    smoke = SFTRecipe.from_yaml(REPO_ROOT / "configs/sft_smoke_cpu.yaml", data="x")
    assert (smoke.student, smoke.finetune, smoke.data) == ("smollm2", "lora", "x")
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rat: 1.0\n")
    with pytest.raises(ValueError, match="unknown recipe field"):
        SFTRecipe.from_yaml(bad)


def test_unsloth_without_unsloth_is_a_clear_error(tiny_vlm_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    from steerkit.models import StudentUnavailable

    with pytest.raises(StudentUnavailable, match="environment-unsloth.yml"):
        build_trainer(tiny_recipe(tiny_vlm_dir, data_dir, tmp_path, backend="unsloth", finetune="lora"), tmp_path)


# ---- the loss mask ---------------------------------------------------------------------------------


def test_loss_mask_is_exactly_the_assistant_turns_on_a_vlm_with_images(
    tiny_vlm_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    trainer, info = build_trainer(tiny_recipe(tiny_vlm_dir, data_dir, tmp_path), tmp_path)
    assert info["vision"] and info["data"]["images"] == 5
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert batch["pixel_values"].shape[0] > 0  # the images went in
    spans = masked_in_spans(batch, trainer.processing_class.tokenizer)
    # TRL's Qwen2.5-VL training template puts the newline after <|im_end|> inside the generation span
    assert spans == [[t + "<|im_end|>\n" for t in texts] for texts in assistant_texts(data_dir)[:4]]


def test_loss_mask_is_exactly_the_assistant_turns_on_smollm2_with_captions(
    smollm2_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    recipe = SFTRecipe(student=str(smollm2_dir), data=str(data_dir), finetune="lora", max_length=512,
                       runs_root=str(tmp_path))
    trainer, info = build_trainer(recipe, tmp_path)
    assert not info["vision"] and info["captions_source"].endswith("captions.json")
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    spans = masked_in_spans(batch, trainer.processing_class)
    assert spans == [[t + "<|im_end|>" for t in texts] for texts in assistant_texts(data_dir)[:3]]
    prompt = trainer.processing_class.decode(batch["input_ids"][0])
    assert "[Image: a red square]\nWhat is in picture 0?" in prompt
    assert "Think" in prompt or "think" in prompt  # the student system prompt, not the data's
    assert "a system prompt the data came with" not in prompt


@pytest.mark.parametrize("model", ["smollm2", "tiny_vlm"])
def test_turns_cut_by_max_length_are_counted_as_the_trainer_cuts_them(
    model: str, smollm2_dir: Path, tiny_vlm_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    """The count in the manifest equals the assistant turns whose loss tokens the trainer no longer sees."""
    student = smollm2_dir if model == "smollm2" else tiny_vlm_dir
    full, info = build_trainer(tiny_recipe(student, data_dir, tmp_path / "full", finetune="lora"), tmp_path / "full")
    assert info["max_length_cut"] == {"assistant_turns": 12, "assistant_turns_cut": 0, "dialogues_cut": 0}
    rows = [full.train_dataset[i] for i in range(len(full.train_dataset))]
    lengths = sorted(len(r["input_ids"]) for r in rows) if "input_ids" in rows[0] else None
    tok = full.processing_class if model == "smollm2" else full.processing_class.tokenizer
    if lengths is None:  # vision rows are tokenised by the collator
        lengths = sorted(int(m.sum()) for m in full.data_collator(rows)["attention_mask"])
    limit = lengths[len(lengths) // 2] - 3  # cuts the second answer of the longer half of the rows
    trainer, info = build_trainer(tiny_recipe(student, data_dir, tmp_path / "cut", finetune="lora", max_length=limit),
                                  tmp_path / "cut")
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    end = "<|im_end|>\n" if model == "tiny_vlm" else "<|im_end|>"
    seen = masked_in_spans(batch, tok)
    lost = sum(t + end not in spans
               for spans, texts in zip(seen, assistant_texts(data_dir), strict=True) for t in texts)
    assert lost > 0
    assert info["max_length_cut"]["assistant_turns_cut"] == lost
    assert info["max_length_cut"]["dialogues_cut"] == sum(
        any(t + end not in spans for t in texts) for spans, texts in zip(seen, assistant_texts(data_dir), strict=True))


def test_no_max_length_cuts_nothing(smollm2_dir: Path, data_dir: Path) -> None:
    from transformers import AutoTokenizer

    rows = sft_rows(read_dialogues(data_dir / "steer_sft.jsonl"), data_dir / "steer_sft.jsonl", vision=False,
                    system="SYS", captions=CAPTIONS)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert turns_past_max_length(rows, tok, None, vision=False)["assistant_turns_cut"] == 0
    assert turns_past_max_length(rows, tok, 8, vision=False) == {
        "assistant_turns": 12, "assistant_turns_cut": 12, "dialogues_cut": 6}


# ---- training ----------------------------------------------------------------------------------------


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_full_finetuning_changes_the_language_model_and_not_the_frozen_vision_tower(
    tiny_vlm_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    run_dir = run_sft(tiny_recipe(tiny_vlm_dir, data_dir, tmp_path, run_id="full", max_steps=3))
    before, after = _weights(tiny_vlm_dir), _weights(run_dir / CHECKPOINT)
    changed = {k for k in before if not (before[k] == after[k]).all()}
    assert any(k.startswith("model.layers.") for k in changed)  # the language model (saved names)
    assert not any(k.startswith("visual.") for k in changed)
    log = training_log(run_dir)
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(r["loss"] > 0 and r["learning_rate"] > 0 and r["tokens_per_s"] > 0 for r in log)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stage"] == STAGE and manifest["status"] == "finished"
    assert manifest["parameters"] == tiny_recipe(tiny_vlm_dir, data_dir, tmp_path, max_steps=3).parameters()
    assert manifest["training"]["vision_params_frozen"] > 0
    assert manifest["summary"]["global_step"] == 3


def test_lora_is_merged_into_a_plain_checkpoint(tiny_vlm_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    run_dir = run_sft(tiny_recipe(tiny_vlm_dir, data_dir, tmp_path, run_id="lora", finetune="lora", max_steps=2,
                                  save_steps=10))
    before, after = _weights(tiny_vlm_dir), _weights(run_dir / CHECKPOINT)
    assert set(before) == set(after)  # no adapter keys left: loadable as the base architecture
    changed = {k for k in before if not (before[k] == after[k]).all()}
    assert changed and all(k.startswith("model.layers.") and k.endswith(
        ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")) for k in changed)


def test_a_run_shorter_than_logging_steps_logs_its_last_step(tiny_vlm_dir: Path, data_dir: Path,
                                                            tmp_path: Path) -> None:
    """Two epochs of 6 dialogues in batches of 4 are 4 steps, fewer than logging_steps 10: the last
    step's loss is logged all the same (notebook 02 plots and checks it)."""
    run_dir = run_sft(tiny_recipe(tiny_vlm_dir, data_dir, tmp_path, run_id="short", max_steps=-1,
                                  num_train_epochs=2, batch_size=4, per_device_batch_size=4,
                                  logging_steps=10, save_steps=100))
    logged = training_log(run_dir)
    assert [r["step"] for r in logged] == [4] and logged[0]["loss"] > 0


@pytest.mark.slow
def test_killed_training_resumes_to_the_same_step_count_and_a_loadable_checkpoint(
    tiny_vlm_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    from transformers import TrainerCallback

    from steerkit.backends.hf_local import HFLocalBackend
    from steerkit.clients import Request, Sampling

    class Kill(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.global_step == 2:
                raise KeyboardInterrupt("killed after the step-2 checkpoint")

    recipe = tiny_recipe(tiny_vlm_dir, data_dir, tmp_path, run_id="resume")
    with pytest.raises(KeyboardInterrupt):
        run_sft(recipe, callbacks=[Kill()])
    run_dir = tmp_path / STAGE / "resume"
    assert not (run_dir / CHECKPOINT).exists()
    assert [r["step"] for r in training_log(run_dir)] == [1, 2]

    run_sft(recipe)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["resumed_from"].endswith("checkpoint-2") and len(manifest["resumed_at"]) == 1
    assert manifest["summary"]["global_step"] == 4
    assert [r["step"] for r in training_log(run_dir)] == [1, 2, 3, 4]

    uninterrupted = run_sft(tiny_recipe(tiny_vlm_dir, data_dir, tmp_path, run_id="straight"))
    resumed_losses = [r["loss"] for r in training_log(run_dir)]
    straight_losses = [r["loss"] for r in training_log(uninterrupted)]
    assert resumed_losses == pytest.approx(straight_losses, rel=1e-4)

    backend = HFLocalBackend.from_pretrained(run_dir / CHECKPOINT)
    (reply,) = backend.generate_sync([Request([Message(role="user", content="Hello")],
                                              sampling=Sampling(max_tokens=4))])
    assert reply.ok and reply.completion_tokens > 0


def test_resume_takes_the_newest_complete_checkpoint_and_removes_half_written_ones(tmp_path: Path) -> None:
    from transformers.trainer_utils import get_last_checkpoint

    from steerkit.checkpoints import last_complete_checkpoint
    from steerkit.layout import TRAINER_STATE

    def checkpoint(step: int, state: str | None) -> Path:
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"weights")
        if state is not None:
            (folder / TRAINER_STATE).write_text(state)
        return folder

    checkpoint(2, json.dumps({"global_step": 2, "log_history": []}))
    complete = checkpoint(4, json.dumps({"global_step": 4, "log_history": []}))
    partial = [checkpoint(6, None),  # killed before the state was written
               checkpoint(8, '{"global_step": 8, "log_hi'),  # killed while it was written
               checkpoint(10, json.dumps({"global_step": 8}))]  # a state from another step
    (tmp_path / "checkpoint-12").write_text("not a folder")
    assert get_last_checkpoint(str(tmp_path)) == str(partial[-1])  # the trainer's own pick
    assert last_complete_checkpoint(tmp_path) == complete
    assert all(f.is_dir() for f in partial)  # looking removes nothing
    assert last_complete_checkpoint(tmp_path, remove_partial=True) == complete
    assert sorted(f.name for f in tmp_path.iterdir()) == ["checkpoint-12", "checkpoint-2", "checkpoint-4"]
    assert last_complete_checkpoint(tmp_path / "absent") is None


def test_a_finished_run_is_not_trained_again(tiny_vlm_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    recipe = tiny_recipe(tiny_vlm_dir, data_dir, tmp_path, run_id="twice", max_steps=1)
    run_dir = run_sft(recipe)
    stamp = (run_dir / CHECKPOINT / "model.safetensors").stat().st_mtime_ns
    assert run_sft(recipe) == run_dir
    assert (run_dir / CHECKPOINT / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="other parameters"):
        run_sft(tiny_recipe(tiny_vlm_dir, data_dir, tmp_path, run_id="twice", max_steps=2))


@pytest.mark.slow
def test_two_process_ddp_launch_from_the_command_line(tiny_vlm_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    """``accelerate launch --multi_gpu --num_processes 2`` on a CPU-only machine: DDP over gloo.

    (``accelerate launch --cpu --num_processes 2`` starts one process unless MPI is configured.)
    """
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "steerkit.sft", "--config", str(REPO_ROOT / "configs/sft_smoke_cpu.yaml"),
           "--set", f"student={tiny_vlm_dir}", "--set", f"data={data_dir}", "--set", "finetune=full",
           "--set", "max_length=null", "--set", f"runs_root={tmp_path}", "--set", "run_id=ddp", "--set", "max_steps=2"]
    env = {**os.environ, "CI": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, env=env, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / STAGE / "ddp" / "manifest.json").read_text())
    assert manifest["training"]["processes"] == 2
    assert manifest["training"]["gradient_accumulation_steps"] == 1  # 2 per device x 2 processes = batch 4
    assert manifest["summary"]["global_step"] == 2
    assert (tmp_path / STAGE / "ddp" / CHECKPOINT / "config.json").is_file()


# ---- the GPU smoke script and the GPU lane ----------------------------------------------------------

SMOKE = REPO_ROOT / "scripts" / "gpu_smoke.py"


def smoke(*args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    """Run scripts/gpu_smoke.py with steerkit from this checkout."""
    return subprocess.run([sys.executable, str(SMOKE), *args], check=False, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})


@pytest.mark.gpu
def test_sft_on_gpu_uses_bf16_and_activation_checkpointing(tiny_vlm_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    from steerkit.models import load_student

    run_dir = run_sft(tiny_recipe(tiny_vlm_dir, data_dir, tmp_path, run_id="gpu", max_steps=2))
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["training"]["bf16"] is True and manifest["training"]["gradient_checkpointing"] is True
    assert manifest["summary"]["global_step"] == 2
    model, _ = load_student(run_dir / CHECKPOINT)
    assert model.device.type == "cuda"


@pytest.mark.gpu
def test_unsloth_sft_step_on_gpu(tiny_vlm_dir: Path, tmp_path: Path) -> None:
    """Unsloth's LoRA and response-only collator train a step (run in its own process: Unsloth must be
    imported before transformers)."""
    import importlib.util

    if importlib.util.find_spec("unsloth") is None:
        pytest.skip("Unsloth is not installed here (environment-unsloth.yml)")
    proc = smoke("phase", "sft_unsloth", "--model", str(tiny_vlm_dir), "--work", str(tmp_path), "--tiny", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("GPU_SMOKE "))
    result = json.loads(line.removeprefix("GPU_SMOKE "))
    assert result["status"] == "ok" and result["step_s"] > 0, result
