"""The in-process transformers backend: batched generation on the tiny VLM and the real SmolLM2."""

from __future__ import annotations

from pathlib import Path

import pytest

from steerkit.backends.hf_local import HFLocalBackend
from steerkit.clients import ChatClient, Request, Sampling
from steerkit.schema import Message

PARIS = Request([Message(role="user", content="What is the capital of France?")], sampling=Sampling(max_tokens=24))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    Image.new("RGB", (80, 60), (220, 20, 20)).save(root / "red.png")
    Image.new("RGB", (60, 90), (20, 20, 220)).save(root / "blue.png")
    return root


@pytest.fixture(scope="module")
def tiny(tiny_vlm_dir: Path) -> HFLocalBackend:
    return HFLocalBackend.from_pretrained(tiny_vlm_dir)


@pytest.fixture(scope="module")
def smollm2(smollm2_dir: Path) -> HFLocalBackend:
    return HFLocalBackend.smollm2()


def _ask(text: str, *images: str, root: Path | None = None, max_tokens: int = 8, **sampling) -> Request:
    return Request(
        [Message(role="user", content=text, images=list(images))],
        sampling=Sampling(max_tokens=max_tokens, **sampling),
        root=root,
    )


def _count_generate_calls(backend: HFLocalBackend, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    sizes: list[int] = []
    real = backend.net.generate

    def counted(**kw):
        sizes.append(kw["input_ids"].shape[0])
        return real(**kw)

    monkeypatch.setattr(backend.net, "generate", counted)
    return sizes


# --- the tiny VLM ----------------------------------------------------------------------------------


def test_batch_of_image_requests(tiny: HFLocalBackend, images: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    sizes = _count_generate_calls(tiny, monkeypatch)
    reqs = [
        _ask("What is this?", "red.png", root=images),
        _ask("Compare the two.", "red.png", "blue.png", root=images),
        _ask("No picture here."),
    ]
    replies = tiny.generate_sync(reqs)
    assert sizes == [3]  # one batched generate
    assert all(r.ok and r.model == tiny.model for r in replies)
    assert all(1 <= r.completion_tokens <= 8 for r in replies)
    assert all(r.finish == ("length" if r.completion_tokens == 8 else "stop") for r in replies)
    # prompt tokens are each request's own, unpadded: the image adds its placeholder tokens
    for req, reply in zip(reqs, replies, strict=True):
        text, paths = tiny.render(req)
        imgs = [Image.open(p) for p in paths]
        alone = tiny.processor(text=[text], images=imgs or None, return_tensors="pt")
        assert reply.prompt_tokens == alone["input_ids"].shape[1]
    assert "<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>Compare" in (
        tiny.render(reqs[1])[0]
    )


def test_greedy_is_repeatable_and_seeded_sampling_reproducible(tiny: HFLocalBackend) -> None:
    greedy = [_ask("Hello there"), _ask("Another prompt, longer than the first one")]
    assert [r.text for r in tiny.generate_sync(greedy)] == [r.text for r in tiny.generate_sync(greedy)]
    sampled = [_ask("Hello", temperature=1.0, seed=7, max_tokens=12),
               _ask("Hello", temperature=1.0, seed=7, max_tokens=12)]
    first = [r.text for r in tiny.generate_sync(sampled)]
    assert first == [r.text for r in tiny.generate_sync(sampled)]
    assert first[0] != first[1]  # two rows of one seeded batch are two different samples
    other_seed = [_ask("Hello", temperature=1.0, seed=8, max_tokens=12)] * 2
    assert [r.text for r in tiny.generate_sync(other_seed)] != first


def test_requests_group_by_sampling_and_chunk(
    tiny_vlm_dir: Path, images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = HFLocalBackend.from_pretrained(tiny_vlm_dir, max_batch=2)
    sizes = _count_generate_calls(backend, monkeypatch)
    reqs = [_ask(f"prompt {i}", "red.png", root=images) for i in range(5)]
    reqs += [_ask("hot", temperature=1.0, seed=1), _ask("hot too", temperature=1.0, seed=1)]
    replies = backend.generate_sync(reqs)
    assert sorted(sizes) == [1, 2, 2, 2]  # 5 greedy in chunks of 2, then the 2 sampled together
    assert len(replies) == 7 and all(r.ok for r in replies)
    # replies come back in request order
    solo = backend.generate_sync([reqs[3]])[0]
    assert solo.prompt_tokens == replies[3].prompt_tokens


def test_image_placeholders_are_never_generated(tiny_vlm_dir: Path) -> None:
    import torch

    backend = HFLocalBackend.from_pretrained(tiny_vlm_dir)
    pad = backend.net.config.image_token_id
    assert pad in backend.suppress_ids and backend.net.config.video_token_id in backend.suppress_ids

    def favour_pad(_module, _inputs, logits):
        logits[..., pad] += 100.0
        return logits

    backend.net.lm_head.register_forward_hook(favour_pad)
    enc = backend.tokenizer(["hello"], return_tensors="pt")
    with torch.no_grad():
        assert backend.net(**enc).logits[0, -1].argmax().item() == pad  # unsuppressed, it would be chosen
    for sampling in ({}, {"temperature": 1.0, "seed": 0}):
        (reply,) = backend.generate_sync([_ask("hello", max_tokens=6, **sampling)])
        assert reply.ok and "<|image_pad|>" not in backend.tokenizer.decode(
            backend.tokenizer(reply.text)["input_ids"], skip_special_tokens=False
        )
        assert reply.completion_tokens >= 1


def test_unreadable_image_fails_only_its_request(tiny: HFLocalBackend, images: Path) -> None:
    replies = tiny.generate_sync([
        _ask("gone", "missing.png", root=images),
        _ask("fine", "red.png", root=images),
        _ask("escapes", "../outside.png", root=images),
    ])
    assert replies[0].finish == "error" and "missing.png" in replies[0].error
    assert replies[1].ok
    assert replies[2].finish == "error" and "escapes the data root" in replies[2].error


def test_through_the_chat_client(tiny_vlm_dir: Path, images: Path, tmp_path: Path) -> None:
    from steerkit.roles import make_backend

    backend = make_backend(f"hf:{tiny_vlm_dir}")
    assert backend.model == f"hf:{tiny_vlm_dir.resolve()}"
    client = ChatClient(backend, role="student", cache_dir=tmp_path)
    reqs = [_ask("What is this?", "red.png", root=images), _ask("Hi")]
    first = client.complete_many_sync(reqs)
    again = client.complete_many_sync(reqs)
    assert [r.text for r in first] == [r.text for r in again]
    assert all(r.cached for r in again) and client.usage.cache_hits == 2


def test_a_loaded_model_needs_a_name_and_a_vlm_needs_its_processor(tiny: HFLocalBackend) -> None:
    with pytest.raises(ValueError, match="stable name"):
        HFLocalBackend(tiny.net, tiny.processor, name="")
    with pytest.raises(ValueError, match="needs its processor"):
        HFLocalBackend(tiny.net, tiny.tokenizer, name="hf:tiny")



def test_a_shared_model_generates_from_a_bf16_copy_and_stays_in_training_mode(
    tiny: HFLocalBackend, images: Path
) -> None:
    import torch

    shared = HFLocalBackend(tiny.net, tiny.processor, name="hf:tiny@step0", generation_dtype="bfloat16")
    assert shared.net is tiny.net  # training code and generation share one model
    assert shared._gen_net.dtype == torch.bfloat16 and tiny.net.dtype == torch.float32
    tiny.net.train()
    try:
        replies = shared.generate_sync([_ask("hi"), _ask("What is this?", "red.png", root=images)])
        assert tiny.net.training
    finally:
        tiny.net.eval()
    assert all(r.ok and r.model == "hf:tiny@step0" for r in replies)
    with torch.no_grad():
        tiny.net.lm_head.weight.mul_(-1)  # a training step, crudely
    try:
        shared.sync_weights()
        assert torch.allclose(shared._gen_net.lm_head.weight.float(), tiny.net.lm_head.weight, atol=1e-2)
    finally:
        with torch.no_grad():
            tiny.net.lm_head.weight.mul_(-1)


# --- the real SmolLM2 ------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_answers_a_batch_coherently(smollm2: HFLocalBackend) -> None:
    reqs = [
        PARIS,
        Request([Message(role="user", content="Name three colours of the rainbow.")], sampling=Sampling(max_tokens=32)),
        Request([Message(role="system", content="Answer briefly."),
                 Message(role="user", content="What is the opposite of hot?")], sampling=Sampling(max_tokens=12)),
    ]
    replies = smollm2.generate_sync(reqs)
    assert all(r.ok for r in replies), replies
    assert "Paris" in replies[0].text
    assert sum(c in replies[1].text.lower()
               for c in ("red", "orange", "yellow", "green", "blue", "indigo", "violet")) >= 2
    assert "cold" in replies[2].text.lower()
    assert replies[0].finish == "stop" and "<|im_end|>" not in replies[0].text
    assert replies[0].completion_tokens == len(smollm2.tokenizer(replies[0].text)["input_ids"]) + 1  # + <|im_end|>
    assert replies[1].finish == "length" and replies[1].completion_tokens == 32
    assert smollm2.model == "smollm2"
    # left padding does not change greedy answers: the batch equals one request at a time
    assert [smollm2.generate_sync([r])[0].text for r in reqs[::2]] == [replies[0].text, replies[2].text]


@pytest.mark.slow
def test_smollm2_reads_captions_in_place_of_images(smollm2: HFLocalBackend, images: Path) -> None:
    req = Request(
        [Message(role="user", content="What colour is the object in the picture? Answer with the colour.",
                 images=["red.png", "blue.png"])],
        sampling=Sampling(max_tokens=24),
        root=images,
        captions={"red.png": "a bright red fire truck parked on a street"},
    )
    text, paths = smollm2.render(req)
    assert paths == []
    assert "[Image: a bright red fire truck parked on a street]\n[Image]\nWhat colour" in text
    (reply,) = smollm2.generate_sync([req])
    assert reply.ok and "red" in reply.text.lower()


@pytest.mark.slow
def test_smollm2_bf16_generation_copy_gives_the_same_answer(smollm2: HFLocalBackend) -> None:
    import torch

    fast = HFLocalBackend(smollm2.net, smollm2.tokenizer, name="smollm2+bf16", generation_dtype="bfloat16")
    assert fast._gen_net.dtype == torch.bfloat16 and smollm2.net.dtype == torch.float32
    (reply,) = fast.generate_sync([PARIS])
    assert reply.ok and "Paris" in reply.text


def test_multi_turn_dialogues_generate_one_batch_per_turn(
    tiny: HFLocalBackend, images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from steerkit.clients import run_sync
    from steerkit.converse import DialogueState, StaticUser, play

    sizes = _count_generate_calls(tiny, monkeypatch)
    states = [
        DialogueState.start(f"d{i}", ["What is in the picture?", "Tell me more."], images=["red.png"],
                            system="Be helpful.", root=images)
        for i in range(3)
    ]
    run_sync(play(states, user=StaticUser(), assistant=ChatClient(tiny, role="student"),
                  sampling=Sampling(max_tokens=6)))
    assert sizes == [3, 3]  # every live dialogue of a turn in one generate
    for s in states:
        assert s.turn == 2 and all(r.ok for r in s.replies)
        prompt, paths = tiny.render(Request(s.messages[:-1], root=images))
        assert prompt.count("<|image_pad|>") == 1 and len(paths) == 1  # the image stays in turn one
