"""The token-level multi-turn rollout engine: the student answers, the tutor grades and asks again.

For every sample (for GRPO: B prompts x K samples, one row each) and every turn: ONE batched
``generate`` over all live trajectories (left padding, image and video pad tokens suppressed,
``top_k=0``, sampling log-probs recorded), then the tutor grades every live answer in one concurrent
`ChatClient.complete_many`, then the tutor's ``new_question`` (or the dataset's static candidate) is
appended as the next user turn with its template tokens masked out (``env_mask`` 0). A trajectory stops
after the last static turn or at ``max_turns``. This is the batched, token-level form of
`steerkit.converse.play`'s turn order (docs/method.md section 4).

The per-turn sampling is one contract, `TurnEngine`, with two engines: `TurnGenerator` (transformers
``generate`` with the KV cache kept; CPU and small GPUs) and `steerkit.rollout_vllm.VLLMTurns` (TRL's
vLLM integration). Both return the same tokens and log-probs per turn, so the trajectories do not
depend on the engine.

The engine knows nothing of TRL: `steerkit.grpo_trainer` adapts it to ``GRPOTrainer``'s ``rollout_func``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from steerkit.clients import ChatClient, run_sync
from steerkit.layout import MAX_TURNS
from steerkit.rollout_generate import TurnGenerator, generation_copy
from steerkit.schema import Message, Verdict
from steerkit.tutor import TUTOR_PROMPT, next_user_turn, tutor_request, tutor_turns


@dataclass
class RolloutSample:
    """One row to roll out: the initial prompt (system + first user turn) and its static candidates.

    Attributes:
        prompt: TRL conversational messages; image blocks may already carry PIL images.
        images: the PIL images of the first user turn (filled into image placeholders).
        static_turns: the dataset's later user turns, u^_2..u^_T.
        id: the dialogue id.
        image_refs: image paths for the tutor (it reads the image files).
        root: folder the image refs resolve against.
        goal: the dialogue's hidden goal, when the data records one (the tutor reads it).
        captions: image ref -> description, for a tutor that cannot see images.
    """

    prompt: list[dict[str, Any]]
    static_turns: list[str]
    images: list[Any] = field(default_factory=list)
    id: str = ""
    image_refs: list[str] = field(default_factory=list)
    root: Path | None = None
    goal: str = ""
    captions: dict[str, str] = field(default_factory=dict)


@dataclass
class Trajectory:
    """One rolled-out multi-turn trajectory, at token level and as text.

    ``completion_ids``, ``env_mask`` and ``logprobs`` have one entry per completion token; student
    tokens carry ``env_mask`` 1 and their sampling log-prob, inserted user-turn tokens carry 0 and 0.0.
    ``ended`` is "static" when the static turns ran out, "max_turns" at the turn limit.
    """

    id: str
    prompt_ids: list[int]
    completion_ids: list[int] = field(default_factory=list)
    env_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    user_turns: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)
    ended: str = ""

    @property
    def turn_scores(self) -> list[dict[str, int] | None]:
        return [dict(v.scores) if v.scored else None for v in self.verdicts]

    def record(self, **extra: Any) -> dict[str, Any]:
        """A JSON-ready record of the text side (for trajectories.jsonl and the notebook)."""
        return {
            "id": self.id, "ended": self.ended, "user_turns": self.user_turns, "answers": self.answers,
            "turn_scores": self.turn_scores,
            "attack_strategies": [v.extra.get("attack_strategy", "") for v in self.verdicts],
            "diagnoses": [v.extra.get("diagnosis", "") for v in self.verdicts],
            "unscored_reasons": [v.unscored_reason for v in self.verdicts],
            "student_tokens": sum(self.env_mask), **extra,
        }


@dataclass
class RolloutConfig:
    """Rollout parameters.

    Attributes:
        max_turns: the turn limit (docs/method.md section 4: 10).
        max_new_tokens: tokens the student may write per turn.
        temperature: sampling temperature (TRL's default 1.0); log-probs are taken at this temperature.
        top_p: nucleus sampling; 1.0 keeps the sampling distribution equal to the trained policy's.
        feedback: use the tutor's new questions (False: the "without feedback dynamics" ablation).
        tutor_prompt: the tutor prompt id.
        reuse_cache: keep the KV cache between turns (`TurnGenerator`); False re-encodes the history
            every turn (the reference path, same tokens and log-probs up to float rounding).
        generation_dtype: sample from a copy of the student in this dtype (e.g. "bfloat16"; LoRA
            merged into the copy); None samples from the student itself. The recorded log-probs are
            then the copy's, which TRL uses only for its vLLM importance-sampling correction.
    """

    max_turns: int = MAX_TURNS
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    feedback: bool = True
    tutor_prompt: str = TUTOR_PROMPT
    reuse_cache: bool = True
    generation_dtype: str | None = None


def _tokenizer(processing_class: Any) -> Any:
    return getattr(processing_class, "tokenizer", processing_class)


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(b.get("text") or "" for b in content if b.get("type") == "text")


def images_of(prompt: list[dict[str, Any]]) -> list[Any]:
    return [b["image"] for m in prompt if isinstance(m["content"], list) for b in m["content"]
            if b.get("type") == "image" and b.get("image") is not None]


class TurnTemplate:
    """The chat template's text around turns, as token ids, learned by rendering a probe dialogue.

    ``closing`` ends an assistant turn (e.g. ``<|im_end|>\\n``); ``user(q)`` is the text of a new
    user turn plus the assistant header, exactly as the template renders it after an assistant turn.
    """

    _PROBE = "@@STEERKIT_ANSWER@@"

    def __init__(self, processing_class: Any) -> None:
        self.tok = _tokenizer(processing_class)
        self.pc = processing_class
        conv = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                {"role": "assistant", "content": self._PROBE}]
        base = self._render(conv, gen=False)
        probe = self._render([*conv, {"role": "user", "content": "@@Q@@"}], gen=True)
        if not probe.startswith(base):
            raise ValueError("the chat template re-renders earlier turns when a user turn is added;"
                             " token-level multi-turn rollouts need a prefix-stable template")
        self.closing = base[base.index(self._PROBE) + len(self._PROBE):]
        self._user_head, _, self._user_tail = probe[len(base):].partition("@@Q@@")

    def _render(self, conv: list[dict[str, Any]], *, gen: bool) -> str:
        return self.pc.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def between_turns(self, user_text: str, *, ended_with: str | None) -> list[int]:
        """Tokens after a student answer up to the next assistant header, given how the answer ended."""
        closing = self.closing
        if ended_with and closing.startswith(ended_with):
            closing = closing[len(ended_with):]
        return self.encode(closing + self._user_head + user_text + self._user_tail)


def _stop_ids(model: Any, tok: Any) -> list[int]:
    ids: list[int] = []
    eos = model.generation_config.eos_token_id
    ids += eos if isinstance(eos, list) else ([eos] if eos is not None else [])
    if tok.eos_token_id is not None:
        ids.append(tok.eos_token_id)
    return sorted(set(ids))


def _encode_prompts(samples: Sequence[RolloutSample], processing_class: Any) -> list[dict[str, Any]]:
    """Per sample: prompt ids and (for VLMs) pixel values and grid, encoded as TRL's trainer does."""
    from trl.data_utils import apply_chat_template, prepare_multimodal_messages

    vision = _tokenizer(processing_class) is not processing_class
    out = []
    for s in samples:
        prompt = s.prompt
        images = list(s.images) or images_of(prompt)
        if vision and images and not images_of(prompt):
            prompt = prepare_multimodal_messages(prompt, images=images)
        text = apply_chat_template({"prompt": prompt}, processing_class)["prompt"]
        if vision:
            enc = processing_class(text=[text], images=[images] if images else None, return_tensors="pt")
            item = {"ids": enc["input_ids"][0].tolist()}
            if images:
                item["images"] = images  # the PIL images, for engines that take them as multimodal input
                item["pixel_values"] = enc["pixel_values"]
                item["image_grid_thw"] = enc["image_grid_thw"]
        else:
            if images:
                raise ValueError(f"sample {s.id!r} has images but the student is a text model;"
                                 " give text students image captions in the prompt instead")
            item = {"ids": list(processing_class(text)["input_ids"])}
        out.append(item)
    return out


class TurnEngine(Protocol):
    """One turn of sampling for every live trajectory.

    ``engine(live, seqs, new, enc)`` returns, per live row, the sampled tokens up to and including the
    stop token and each token's sampling log-prob at the rollout temperature. ``more(n_live)`` says
    whether another turn runs: an engine whose generate call is collective across processes answers
    for all of them, so every process makes the same number of calls.
    """

    def __call__(self, live: list[int], seqs: list[list[int]], new: list[list[int]],
                 enc: list[dict[str, Any]]) -> tuple[list[list[int]], list[list[float]]]: ...

    def more(self, n_live: int) -> bool: ...


async def _grade(tutor: ChatClient, requests: list[Any]) -> list[Verdict]:
    try:
        return await tutor_turns(tutor, requests)
    finally:
        await tutor.backend.aclose()  # each run_sync has its own event loop: close its sessions


def rollout(
    samples: Sequence[RolloutSample],
    *,
    model: Any,
    processing_class: Any,
    tutor: ChatClient,
    config: RolloutConfig | None = None,
    engine: Any = None,
) -> list[Trajectory]:
    """Roll out every sample as one multi-turn trajectory with the tutor in the loop (method.md 4).

    Args:
        samples: the rows (for GRPO, B prompts each repeated K times).
        model: the student (transformers model; a PEFT-wrapped one works).
        processing_class: its processor (VLMs) or tokenizer.
        tutor: the tutor's client; one concurrent `complete_many` per turn.
        config: rollout parameters.
        engine: a `TurnEngine` built for these samples; None samples with ``model`` through
            `TurnGenerator`.

    Returns:
        One `Trajectory` per sample, in order.
    """
    from steerkit.models import vision_pad_token_ids

    cfg = config or RolloutConfig()
    if cfg.temperature <= 0:
        raise ValueError("temperature must be > 0: GRPO samples K different trajectories per prompt")
    tok = _tokenizer(processing_class)
    template = TurnTemplate(processing_class)
    stop = _stop_ids(model, tok)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else stop[0]
    suppress = vision_pad_token_ids(getattr(model, "config", None))
    enc = _encode_prompts(samples, processing_class)
    trajs = [Trajectory(id=s.id, prompt_ids=e["ids"]) for s, e in zip(samples, enc, strict=True)]
    msgs: list[list[Message]] = []
    for s, t in zip(samples, trajs, strict=True):
        first = next(m for m in reversed(s.prompt) if m["role"] == "user")
        t.user_turns.append(_text_of(first["content"]))
        msgs.append([Message(role="user", content=t.user_turns[0], images=list(s.image_refs))])
    generate = engine or TurnGenerator(generation_copy(model, cfg.generation_dtype), pad_id=pad_id,
                                       stop=stop, suppress=suppress, cfg=cfg, reuse_cache=cfg.reuse_cache)
    inserted_since: list[list[int]] = [[] for _ in samples]  # tokens added after each row's last answer
    live = list(range(len(samples)))
    for turn in range(1, cfg.max_turns + 1):
        if not generate.more(len(live)):
            break
        seqs = [trajs[i].prompt_ids + trajs[i].completion_ids for i in live]
        toks, lps = generate(live, seqs, [inserted_since[i] for i in live], [enc[i] for i in live])
        requests, nexts = [], []
        for i, new, lp in zip(live, toks, lps, strict=True):
            t = trajs[i]
            t.completion_ids += new
            t.env_mask += [1] * len(new)
            t.logprobs += lp
            answer = tok.decode(new, skip_special_tokens=True).strip()
            t.answers.append(answer)
            s = samples[i]
            static_next = s.static_turns[turn - 1] if turn - 1 < len(s.static_turns) and turn < cfg.max_turns else None
            nexts.append(static_next)
            requests.append(tutor_request(msgs[i], answer, static_next, goal=s.goal, images=s.image_refs,
                                          root=s.root, captions=s.captions, prompt=cfg.tutor_prompt))
        verdicts = run_sync(_grade(tutor, requests)) if requests else []
        still = []
        for i, v, static_next, new in zip(live, verdicts, nexts, toks, strict=True):
            t = trajs[i]
            t.verdicts.append(v)
            msgs[i].append(Message(role="assistant", content=t.answers[-1]))
            user = next_user_turn(v, static_next, feedback=cfg.feedback)
            if user is None:
                t.ended = "static" if turn - 1 >= len(samples[i].static_turns) else "max_turns"
                continue
            ended_with = tok.decode(new[-1:]) if new and new[-1] in stop else None
            inserted = template.between_turns(user, ended_with=ended_with)
            t.completion_ids += inserted
            inserted_since[i] = inserted
            t.env_mask += [0] * len(inserted)
            t.logprobs += [0.0] * len(inserted)
            t.user_turns.append(user)
            msgs[i].append(Message(role="user", content=user))
            still.append(i)
        live = still
    return trajs

