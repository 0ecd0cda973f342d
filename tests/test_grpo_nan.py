"""Non-finite GRPO updates: their known causes, each shown on the tiny VLM on CPU (docs/multi_gpu.md)."""

from __future__ import annotations

import json
import math
import zlib

import pytest

from steerkit.backends.scripted import ScriptedBackend
from steerkit.clients import ChatClient
from steerkit.grpo import GRPORunConfig, make_trainer
from steerkit.rl_data import rl_rows
from steerkit.smoke_inputs import seed_rl_dialogues

#: how far below its reference the policy is pushed on a token only the tutor's turns contain: past
#: log(float32 max) = 88.7, so exp(ref - cur) overflows
DRIFT = 200.0


@pytest.fixture(scope="module")
def rl_set(tmp_path_factory):
    return seed_rl_dialogues(tmp_path_factory.mktemp("rl"), 2, turns=2, with_images=True)


def answer_hash_tutor():
    """Scores from a hash of the student's answer: the K samples of a group differ, so GRPO updates."""

    def grade(request):
        level = 1 + zlib.crc32(request.messages[-1].content.encode()) % 10
        return json.dumps({"diagnosis": "scripted", "attack_strategy": "persistence", "new_question": "",
                           "scores": {"safety": level, "usefulness": level, "faithfulness": 5}})

    return ChatClient(ScriptedBackend(grade, name="answer-hash"), role="tutor")


def drift_on_inserted_turns(model, token_id: int) -> None:
    """The policy's log-prob of ``token_id`` falls about DRIFT nats below the reference's.

    ``<|im_start|>`` opens every inserted user turn and is never the student's to write, so it sits
    only at env_mask 0 positions: the policy, never trained there, is free to drift there (the runs
    on an H200 that ended in NaN had drifted for about 17 steps at lr 1e-3). A fixed, untrained bias
    on the LM head stands in for that drift; the reference model (loaded afresh) has none.
    """
    import torch

    head = model.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True, dtype=head.weight.dtype)
    biased.weight = head.weight
    with torch.no_grad():
        biased.bias.zero_()
        biased.bias[token_id] = -DRIFT
    biased.bias.requires_grad_(False)
    model.lm_head = biased


def test_a_drifted_policy_at_the_tutors_turns_keeps_a_finite_gradient(tiny_vlm_dir, rl_set, tmp_path):
    """The k3 KL at env_mask 0 positions must not reach the gradient (method.md 4: KL beta > 0)."""
    from steerkit.models import load_student

    model, proc = load_student(tiny_vlm_dir)
    im_start = proc.tokenizer.convert_tokens_to_ids("<|im_start|>")
    drift_on_inserted_turns(model, im_start)
    scripts, root = rl_set
    cfg = GRPORunConfig(prompts_per_step=2, num_generations=2, max_steps=1, max_turns=2, max_new_tokens=6,
                        lora=False, learning_rate=1e-3, beta=0.04)
    trainer = make_trainer(model, proc, rl_rows(scripts, root, vision=True), tutor=answer_hash_tutor(),
                           config=cfg, output_dir=tmp_path / "t")
    assert trainer.ref_model is not None  # beta > 0: a reference model without the drift
    seen = []
    inner = trainer._generate_and_score_completions

    def record(inputs):
        out = inner(inputs)
        seen.append(out)
        return out

    trainer._generate_and_score_completions = record
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()

    (batch,) = seen
    inserted = (batch["tool_mask"] == 0) & (batch["completion_mask"] == 1)
    assert bool((batch["completion_ids"][inserted] == im_start).any())  # the drifted token is in the batch
    assert not bool((batch["completion_ids"][batch["tool_mask"] == 1] == im_start).any())  # never the student's
    log = next(h for h in trainer.state.log_history if "grad_norm" in h)
    assert math.isfinite(log["grad_norm"]) and log["grad_norm"] > 0, log
    assert math.isfinite(log["loss"]) and math.isfinite(log["kl"]), log
    assert trainer.skipped_nonfinite_steps == []  # the guard had nothing to catch
    after = dict(trainer.model.named_parameters())
    assert any(not bool((before[n] == after[n].detach()).all()) for n in before)
    assert all(bool(after[n].detach().isfinite().all()) for n in before)


def test_fully_masked_attention_rows_stay_finite_under_sdpa(tiny_vlm_dir):
    """Left padding leaves query rows with nothing to attend to; SDPA must give them zeros, not NaN,
    or the NaN reaches every real token through the next layer's values (0 x NaN)."""
    import torch
    import torch.nn.functional as F

    from steerkit.models import load_student

    q = torch.randn(1, 1, 3, 8, requires_grad=True)
    k, v = torch.randn(1, 1, 3, 8), torch.randn(1, 1, 3, 8)
    mask = torch.tensor([[False, False, False], [True, True, False], [True, True, True]])[None, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out.sum().backward()
    assert bool(out.isfinite().all()) and bool((out[0, 0, 0] == 0).all()) and bool(q.grad.isfinite().all())

    model, proc = load_student(tiny_vlm_dir)
    assert model.config._attn_implementation == "sdpa"
    ids = proc.tokenizer(["a much longer first prompt to pad against", "short"], padding=True,
                         padding_side="left", return_tensors="pt")
    assert int(ids["attention_mask"].sum()) < ids["attention_mask"].numel()  # there is padding
    out = model(**ids, output_hidden_states=True)
    assert all(bool(h.isfinite().all()) for h in out.hidden_states)  # pad positions included
    out.logits[ids["attention_mask"].bool()].logsumexp(-1).sum().backward()
    assert all(bool(p.grad.isfinite().all()) for p in model.parameters() if p.grad is not None)


def test_the_fused_log_prob_head_gives_finite_entropy_for_near_zero_probabilities():
    """TRL 1.16's GRPO reads log-probs and entropy from its fused head (online logsumexp in float32),
    not from ``entropy_from_logits`` (trl#7221: 0 x log 0 = NaN): tokens whose probability underflows
    to 0, from bf16 logits too, leave entropy and its gradient finite."""
    import torch
    from trl.kernels import ChunkedLogProbFunction

    for dtype in (torch.float32, torch.bfloat16):
        hidden = (torch.randn(4, 16) * 300).to(dtype).requires_grad_(True)  # logits in the thousands
        weight = torch.randn(64, 16, dtype=dtype, requires_grad=True)
        targets = torch.tensor([0, 5, 17, 63])
        logps, entropy, *_ = ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 16, None, 1.0,
                                                          ("entropy",))
        assert bool(logps.isfinite().all()) and bool(entropy.isfinite().all()), dtype
        (logps.sum() + entropy.sum()).backward()
        assert bool(hidden.grad.isfinite().all()) and bool(weight.grad.isfinite().all()), dtype
