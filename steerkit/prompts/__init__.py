"""Versioned prompts and rubrics as YAML data, our own words, addressed as ``name@version``.

A prompt file ``<name>.yaml`` holds ``name``, ``version``, ``description``, ``system`` and ``user``
(Jinja templates rendered with StrictUndefined, so a missing field is an error, not a blank) and any
extra data the code needs (strategy lists, rubric levels). Every run records the ids it used and,
beside them, the SHA-256 of each file (`Prompt.sha256`), so an edit without a version bump shows.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

PROMPT_DIR = Path(__file__).parent


@dataclass(frozen=True)
class Prompt:
    name: str
    version: int
    description: str
    system: str
    user: str
    data: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    sha256: str = field(default="", compare=False)  # of the YAML file's bytes

    @property
    def id(self) -> str:
        return f"{self.name}@{self.version}"

    def render(self, **fields: Any) -> tuple[str, str]:
        """(system, user) texts with ``fields`` filled in."""
        return _render(self.system, fields), _render(self.user, fields)


def _render(template: str, fields: dict[str, Any]) -> str:
    return _compiled(template).render(**fields).strip()


@cache
def _compiled(template: str):  # -> jinja2.Template
    """Compile a template once: compiling costs about 10 ms, rendering a compiled one microseconds,
    and judges and tutors render the same template for every turn."""
    import jinja2

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False, autoescape=False)
    # The prompts use none of Jinja's globals (range, dict, namespace, cycler, joiner, lipsum; a
    # StrictUndefined error says so if one ever does): without them each render skips copying them
    # into its context, a third of the cost of rendering the judge's system prompt.
    env.globals.clear()
    return env.from_string(template)


@cache
def load_prompt(ref: str) -> Prompt:
    """Load ``name@version`` (or ``name`` for the file's version) from the package's YAML files."""
    name, _, want = ref.partition("@")
    path = PROMPT_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PROMPT_DIR.glob("*.yaml"))
        raise ValueError(f"no prompt named {name!r}; known prompts: {', '.join(known)}")
    raw = path.read_bytes()
    data = yaml.safe_load(raw.decode("utf-8"))
    missing = {"name", "version", "description", "system", "user"} - set(data)
    if missing:
        raise ValueError(f"{path}: missing fields {sorted(missing)}")
    if want and int(want) != data["version"]:
        raise ValueError(f"{path}: holds version {data['version']}, not {want}; old versions live in git history")
    extra = {k: v for k, v in data.items() if k not in {"name", "version", "description", "system", "user"}}
    return Prompt(data["name"], int(data["version"]), data["description"], data["system"], data["user"], extra,
                  sha256=hashlib.sha256(raw).hexdigest())
