"""Dialogues as HTML, turn by turn: image thumbnails, escaped text, coloured scores, the judge's reason.

Model and user text is adversarial (a red-team dialogue may carry ``<script>`` or
``<img onerror=...>``): every string from a record goes through `html.escape` and is shown as text.
Images are embedded as small base64 PNG thumbnails (opened through `steerkit.images.load_image`, so a
corrupt or oversized file shows a note instead of breaking the page).
"""

from __future__ import annotations

import base64
import html
import io
import logging
from pathlib import Path

from steerkit.schema import SCALES, Dialogue, Message, Verdict, resolve_image

log = logging.getLogger(__name__)

THUMBNAIL_PX = 256  # longest side of an embedded image thumbnail
_BOX = "border:1px solid #ddd;border-radius:6px;padding:6px 10px;margin:4px 0;"
_TEXT = "white-space:pre-wrap;word-break:break-word;margin:2px 0;"


def score_color(value: float, lo: float, hi: float) -> str:
    """A colour from red (``lo``) through yellow to green (``hi``), as an HSL string.

    >>> score_color(3, -3, 3), score_color(-3, -3, 3), score_color(0, -3, 3)
    ('hsl(120,65%,40%)', 'hsl(0,65%,40%)', 'hsl(60,65%,40%)')
    """
    share = 0.0 if hi == lo else min(max((value - lo) / (hi - lo), 0.0), 1.0)
    return f"hsl({round(120 * share)},65%,40%)"


def image_thumbnail(path: Path, *, size: int = THUMBNAIL_PX) -> str:
    """A ``data:image/png;base64,...`` URL of the image shrunk to ``size`` pixels on its longest side."""
    from steerkit.images import load_image

    img = load_image(path)
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _image_html(ref: str, root: Path | None) -> str:
    name = html.escape(ref)
    try:
        path = resolve_image(root or Path.cwd(), ref)
        if path.is_file():
            url = image_thumbnail(path)
            return (f'<img src="{url}" alt="{name}" title="{name}" '
                    f'style="max-width:{THUMBNAIL_PX}px;max-height:{THUMBNAIL_PX}px;border-radius:4px">')
    except ValueError as exc:  # outside the data root, or a file that does not open as an image
        log.debug("image %s not shown: %s", ref, exc)
    return f'<span style="color:#888">[image {name} not available]</span>'


def _message_html(m: Message, title: str, root: Path | None, background: str) -> str:
    imgs = "".join(_image_html(ref, root) for ref in m.images)
    return (f'<div style="{_BOX}background:{background}"><b>{html.escape(title)}</b>'
            f'{"<div>" + imgs + "</div>" if imgs else ""}'
            f'<div style="{_TEXT}">{html.escape(m.content)}</div></div>')


def verdict_html(v: Verdict) -> str:
    """Scores as coloured badges with the rationale, or why the verdict is unscored."""
    head = html.escape(f"{v.kind}" + (f" ({v.grader})" if v.grader else ""))
    if not v.scored:
        body = (f'<span style="background:#999;color:white;border-radius:4px;padding:1px 6px">'
                f'unscored: {html.escape(str(v.unscored_reason))}</span>')
    else:
        scale = SCALES[v.kind]
        badges = []
        for k, s in sorted(v.scores.items()):
            lo, hi = scale[k]
            shown = f"{s:+d}" if lo < 0 else f"{s}"
            badges.append(f'<span style="background:{score_color(s, lo, hi)};color:white;border-radius:4px;'
                          f'padding:1px 6px" title="{html.escape(k)} on {lo}..{hi}">{html.escape(k)} {shown}</span>')
        body = " ".join(badges)
    why = f'<div style="{_TEXT}color:#444"><i>{html.escape(v.rationale)}</i></div>' if v.rationale else ""
    return f'<div style="margin:2px 0 2px 12px;font-size:90%"><b>{head}</b> {body}{why}</div>'


def dialogue_html(
    dialogue: Dialogue,
    *,
    scores: bool = True,
    root: str | Path | None = None,
    upto: int | None = None,
    highlight: int | None = None,
    kinds: tuple[str, ...] = ("judge",),
) -> str:
    """The dialogue as HTML, turn by turn.

    Args:
        dialogue: the record.
        scores: show the verdicts of each turn (colour-coded scores and rationale).
        root: the folder image refs resolve against (the data file's folder); default the current one.
        upto: show only turns 1..upto (the inspector's stepping).
        highlight: outline this turn.
        kinds: which verdict kinds to show.

    Returns:
        An HTML fragment in which every text from the record is escaped.
    """
    root = Path(root) if root is not None else None
    meta = dialogue.meta
    tags = [dialogue.kind, dialogue.strategy, meta.get("subset") or meta.get("source_category"), meta.get("category")]
    parts = ['<div class="steerkit-dialogue" style="font-family:sans-serif;font-size:14px;max-width:900px">',
             (f'<div><b>{html.escape(dialogue.id)}</b> '
              f'<span style="color:#666">{html.escape(" · ".join(str(t) for t in tags if t))}</span></div>')]
    if dialogue.system:
        parts.append(f'<details><summary style="color:#666">system prompt</summary>'
                     f'<div style="{_TEXT}color:#666">{html.escape(dialogue.system)}</div></details>')
    shown_in_messages = {ref for m in dialogue.messages for ref in m.images}
    loose = [ref for ref in dialogue.images if ref not in shown_in_messages]
    if loose:
        parts.append("<div>" + "".join(_image_html(ref, root) for ref in loose) + "</div>")
    body = [m for m in dialogue.messages if m.role != "system"]
    turns = {t.index: t for t in dialogue.turns()}
    for i in range(0, len(body), 2):
        n = i // 2 + 1
        if upto is not None and n > upto:
            break
        outline = "outline:2px solid #1f77b4;" if n == highlight else ""
        parts.append(f'<div class="turn" data-turn="{n}" style="margin:6px 0;padding:2px;{outline}">')
        parts.append(_message_html(body[i], f"User · turn {n}", root, "#f4f8ff"))
        if i + 1 < len(body):
            parts.append(_message_html(body[i + 1], f"Assistant · turn {n}", root, "#fafafa"))
        if scores and n in turns:
            parts += [verdict_html(v) for v in turns[n].verdicts if v.kind in kinds]
        parts.append("</div>")
    if scores:
        whole = [v for v in dialogue.verdicts if "turn" not in v.extra and v.kind in kinds]
        parts += [verdict_html(v) for v in whole]
    parts.append("</div>")
    return "".join(parts)
