"""The offline red user agent and blue expert of Stage II (docs/method.md section 3).

They stand in for the red user and blue expert models behind the ``rules`` role spec
(`steerkit.backends.rules`): the red user reads the fields of a red_user@1 request (the template
turn, the turn number, the history) and writes the user turn; the blue expert reads a blue_expert@1
request (the dialogue meta, the turn, the captions) and answers in the student's
``<thinking>...</thinking><answer>...</answer>`` format, so `steerkit.synth.bootstrap` handles
their replies as it does a model's. What each can and cannot do is in its docstring.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from steerkit.clients import Request
from steerkit.heuristics import harm_cues, is_refusal
from steerkit.schema import RISK_CURVE_SCALE
from steerkit.synth.rules_generator import intent_phrase


def _choice(options: tuple[str, ...], key: str) -> str:
    return options[int(hashlib.sha256(key.encode()).hexdigest(), 16) % len(options)]


def rules_red_user(request: Request) -> str:
    """Offline red user: the template turn, fitted to the last answer, deterministically.

    Turn 1 is sent as written. Later turns get a lead-in chosen by a hash of the template: after
    a refusal a reframing ("Let me put it another way"), otherwise an acknowledgement; templates
    that already open with an acknowledgement are sent as they are. It does not read the answer's
    content, so it cannot press on a specific leaked detail the way a model would.
    """
    f = request.fields
    template = str(f["template_turn"]).strip()
    if int(f["turn"]) <= 1:
        return template
    history = str(f.get("history") or "")
    last_answer = history.rpartition("ASSISTANT:")[2]
    if is_refusal(last_answer):
        lead = _choice(("I understand your concern. Let me put it another way:",
                        "Fair enough, but this is for a legitimate purpose.",
                        "I hear you. Then let me rephrase:"), template)
    else:
        lead = _choice(("Thanks, that's helpful.", "Got it, thanks.", "That makes sense."),
                       template)
    if template.lower().startswith(("thanks", "great", "perfect", "ok", "that makes", "interesting",
                                    "right", "you said", "you mentioned", "so,", "putting")):
        return template
    return f"{lead} {template}"


def _risky(user_text: str, meta: dict[str, Any], turn: int) -> bool:
    curve = meta.get("risk_trajectory") or []
    if turn < len(curve):
        lo, hi = meta.get("risk_scale") or RISK_CURVE_SCALE
        return float(curve[turn]) >= (lo + hi) / 2
    return bool(harm_cues(user_text))


def rules_blue_expert(request: Request) -> str:
    """Offline blue expert: a fixed policy in the student format.

    A turn is harmful-looking when its annotated risk level (the script's risk curve, carried in
    the dialogue meta) is in the upper half of the 1..5 scale, or, without an annotation, when the
    user turn carries harm-lexicon words. Harmful-looking turns get a firm, neutral refusal with a
    one-line reason, a safe related alternative and a follow-up offer; the others get a helpful
    templated answer that takes up the user's own words, describes the image from its caption when
    asked about it (or on the first turn), and states the reference answer on a benign task's last
    turn. It has no knowledge: its helpful answers are generic, and a real blue expert (method.md 3:
    the paper used Gemini-3-Pro) is needed for content worth training on.
    """
    f = request.fields
    meta = f.get("meta") or {}
    turn = int(f.get("turn", 0))  # completed turns before this answer
    user_text = request.messages[-1].content
    total = len(meta.get("template_turns") or []) or turn + 1
    if _risky(user_text, meta, turn):
        topic = intent_phrase(meta.get("seed_text") or user_text)
        return ("<thinking>Taken together, the conversation is moving toward how to " + topic + ". "
                "Specific steps would give real help toward harm, so I decline that part and offer "
                "a safe direction instead.</thinking><answer>I can't help with that, because the "
                "specifics could be used to cause real harm. What I can do instead is explain the "
                "general safety considerations around this topic, or point you to official "
                "guidance and support resources. Would that be useful?</answer>")
    captions = [request.captions[r] for m in request.messages for r in m.images
                if request.captions.get(r)]
    words = user_text.split()
    echo = " ".join(words[:40]) + (" ..." if len(words) > 40 else "")
    ref = meta.get("reference")
    if ref and turn + 1 >= total:
        body = f"Putting the details together, the answer is: {ref}."
    elif captions and (turn == 0 or any(w in user_text.lower()
                                        for w in ("image", "picture", "photo", "shown"))):
        seen = re.sub(r"^(?:the )?image shows\s+", "", captions[0].strip(), flags=re.IGNORECASE)
        seen = seen.rstrip(".")
        body = (f"Here is what the image shows: {seen}. Tell me which part you would like "
                "to focus on, and I will go into it in more detail.")
    else:
        body = ("Here is the general picture: it depends on the context, the main factors involved "
                "and how they relate to each other. I am happy to go into more detail on any part "
                "of it.")
    return ("<thinking>The request is safe; I answer it directly and stay with what the user asked."
            f"</thinking><answer>You asked: \"{echo}\" {body}</answer>")
