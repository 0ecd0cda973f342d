"""HTML rendering of dialogues: adversarial text stays text, images embed, scores are coloured."""

from __future__ import annotations

import base64
import io
from html.parser import HTMLParser

from PIL import Image

from steerkit.render import dialogue_html, score_color
from steerkit.schema import Dialogue, Message, Verdict

XSS_USER = '<script>alert("u")</script> look at <img src=x onerror="alert(1)">'
XSS_ANSWER = "<answer><script>document.cookie</script><iframe src=javascript:alert(2)></iframe></answer>"


class Tags(HTMLParser):
    """Every start tag and its attributes, as a browser's parser sees them."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def parse(html_text: str) -> list[tuple[str, dict[str, str | None]]]:
    p = Tags()
    p.feed(html_text)
    return p.tags


def dialogue(images: list[str] | None = None) -> Dialogue:
    return Dialogue(
        id="x<b>1</b>",
        images=images or [],
        messages=[
            Message(role="system", content="sys <s>"),
            Message(role="user", content=XSS_USER, images=images or []),
            Message(role="assistant", content=XSS_ANSWER),
            Message(role="user", content="and then?"),
            Message(role="assistant", content="<answer>No.</answer>"),
        ],
        verdicts=[
            Verdict(kind="judge", scores={"harmlessness": -3, "helpfulness": 0},
                    rationale="gave <script>steps</script>", extra={"turn": 1}),
            Verdict.unscored("judge", "parse_failure", extra={"turn": 2}),
        ],
        meta={"source_category": "STEER-VLS"},
    )


def test_adversarial_text_renders_as_text():
    out = dialogue_html(dialogue())
    tags = parse(out)
    names = [t for t, _ in tags]
    assert "script" not in names and "iframe" not in names
    assert not any(k.startswith("on") for _, attrs in tags for k in attrs)  # no event handler survives
    assert not [a for t, a in tags if t == "img"]  # the fake <img> is text; no real image was given
    assert "&lt;script&gt;alert(&quot;u&quot;)&lt;/script&gt;" in out
    assert "onerror=&quot;alert(1)&quot;" in out
    assert "x&lt;b&gt;1&lt;/b&gt;" in out and "gave &lt;script&gt;steps&lt;/script&gt;" in out


def test_scores_are_coloured_and_unscored_is_shown():
    out = dialogue_html(dialogue())
    assert score_color(-3, -3, 3) in out and "harmlessness -3" in out
    assert "unscored: parse_failure" in out
    assert "harmlessness" not in dialogue_html(dialogue(), scores=False)


def test_stepping_and_highlight():
    out = dialogue_html(dialogue(), upto=1, highlight=1)
    assert 'data-turn="1"' in out and 'data-turn="2"' not in out and "outline" in out


def test_image_thumbnail_embeds_as_data_url(tmp_path):
    Image.new("RGB", (800, 400), (200, 30, 30)).save(tmp_path / "pic.png")
    out = dialogue_html(dialogue(["pic.png"]), root=tmp_path)
    srcs = [a["src"] for t, a in parse(out) if t == "img"]
    assert len(srcs) == 1 and srcs[0].startswith("data:image/png;base64,")
    thumb = Image.open(io.BytesIO(base64.b64decode(srcs[0].split(",", 1)[1])))
    assert max(thumb.size) == 256 and thumb.size == (256, 128)


def test_missing_or_escaping_image_is_a_note(tmp_path):
    out = dialogue_html(dialogue(["nope.png"]), root=tmp_path)
    assert "[image nope.png not available]" in out and not [t for t, _ in parse(out) if t == "img"]
    out = dialogue_html(dialogue(["../../etc/passwd"]), root=tmp_path)
    assert "not available" in out
    (tmp_path / "bad.png").write_bytes(b"not a png")
    assert "not available" in dialogue_html(dialogue(["bad.png"]), root=tmp_path)


def test_records_do_not_render_themselves():
    # the renderer sits above the records it draws (one-way layers): display with dialogue_html
    assert not hasattr(dialogue(), "_repr_html_")
