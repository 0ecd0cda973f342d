"""How one served role's requests are written: `RequestOptions` per role spec, and the fix for a 400.

Servers differ in what a chat request may carry: OpenAI's reasoning models (gpt-5-nano, o-series)
want ``max_completion_tokens`` instead of ``max_tokens`` and refuse any temperature or top_p but
their defaults. A role spec carries the options after its URL (``?max_tokens_field=...&omit=...``,
see `steerkit.roles`); a refusal names the option that fixes it (docs/full_run.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: Body fields the backend writes itself: an option may rename or drop them, not set them.
SAMPLING_FIELDS = ("temperature", "max_tokens", "top_p", "seed")
_OWN_FIELDS = frozenset({"model", "messages", "max_completion_tokens", "stream", "n", *SAMPLING_FIELDS})
#: The option that makes a server accept a request it refused for this field (the error's ``param``).
_FIXES = {
    "max_tokens": "max_tokens_field=max_completion_tokens",
    "temperature": "omit=temperature",
    "top_p": "omit=top_p",
    "seed": "omit=seed",
}


@dataclass(frozen=True)
class RequestOptions:
    """How one served role's requests are written, for servers that refuse the usual fields.

    Attributes:
        max_tokens_field: the name the token limit goes out under (``max_tokens`` or
            ``max_completion_tokens``, which OpenAI's reasoning models require).
        omit: sampling fields left out of the body (the server's defaults apply), e.g. temperature
            and top_p for a model that accepts only their defaults.
        extra: further body fields sent as they are (``reasoning_effort``, ``chat_template_kwargs``).
    """

    max_tokens_field: str = "max_tokens"
    omit: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_tokens_field not in ("max_tokens", "max_completion_tokens"):
            raise ValueError(
                f"max_tokens_field={self.max_tokens_field!r}: use max_tokens or max_completion_tokens"
            )
        if bad := sorted(set(self.omit) - set(SAMPLING_FIELDS)):
            raise ValueError(f"omit={','.join(bad)}: only {', '.join(SAMPLING_FIELDS)} can be left out")
        if bad := sorted(set(self.extra) & _OWN_FIELDS):
            raise ValueError(
                f"{', '.join(bad)}: written by the backend itself; use max_tokens_field= or omit="
            )

    @classmethod
    def parse(cls, query: str) -> RequestOptions:
        """Options from ``key=value&key=value`` (values read as YAML scalars: 0.5, true, minimal).

        >>> RequestOptions.parse("max_tokens_field=max_completion_tokens&omit=temperature,top_p"
        ...                      "&reasoning_effort=minimal").manifest()  # doctest: +NORMALIZE_WHITESPACE
        {'max_tokens_field': 'max_completion_tokens', 'omit': ['temperature', 'top_p'],
         'extra': {'reasoning_effort': 'minimal'}}
        """
        import yaml

        values: dict[str, Any] = {"extra": {}}
        for item in filter(None, query.split("&")):
            key, sep, raw = item.partition("=")
            if not sep or not key:
                raise ValueError(f"request option {item!r}: write <name>=<value>")
            match key:
                case "max_tokens_field":
                    values[key] = raw
                case "omit":
                    values[key] = tuple(x.strip() for x in raw.split(",") if x.strip())
                case _:
                    values["extra"][key] = yaml.safe_load(raw)
        return cls(**values)

    def manifest(self) -> dict[str, Any]:
        return {"max_tokens_field": self.max_tokens_field, "omit": list(self.omit), "extra": dict(self.extra)}


DEFAULT_OPTIONS = RequestOptions()


def fix_hint(param: str, message: str, options: RequestOptions) -> str:
    """The role-spec option that fixes a 400 refusing ``param`` ('' when none applies or it is set)."""
    named = param or next((f for f in _FIXES if f"'{f}'" in message), "")
    fix = _FIXES.get(named, "")
    if not fix or (named == "max_tokens" and options.max_tokens_field != "max_tokens") or named in options.omit:
        return ""
    return (f" (this server refuses {named!r}: add ?{fix} after the URL of the role spec, as"
            " docs/full_run.md shows)")
