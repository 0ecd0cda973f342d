"""Bind role names to models by spec strings; code asks for a role, a run binds it.

Spec strings (plain primitives, so papermill parameters can carry them):

- ``openai:<model>@<base_url>[?<options>][#<KEY_ENV>]``  any OpenAI-compatible server, e.g.
  ``openai:Qwen/Qwen3-VL-32B-Instruct@http://gpu-box:8000/v1``; the key comes from ``$OPENAI_API_KEY``
  (or the variable named after a ``#``: ``openai:gpt-4.1@https://api.openai.com/v1#MY_KEY``). Request
  options (`steerkit.backends.openai_compat.RequestOptions`) follow a ``?`` as ``name=value`` pairs
  joined by ``&``: ``max_tokens_field=max_completion_tokens``, ``omit=temperature,top_p`` and any
  extra body field, e.g. for OpenAI's reasoning models
  ``openai:gpt-5-nano@https://api.openai.com/v1?max_tokens_field=max_completion_tokens&omit=temperature,top_p&reasoning_effort=minimal``
- ``hf:<path>``     an in-process transformers checkpoint (a run's ``checkpoint/`` folder)
- ``smollm2``       the embedded SmolLM2-135M-Instruct student
- ``rules``         offline heuristics (generator, user agents, tutor, judge, evaluator)
- ``scripted:<name>``  test doubles: refuser, complier, echo, judge (a fixed judge@1 verdict)
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from steerkit.clients import Backend, ChatClient

log = logging.getLogger(__name__)

ROLES = ("generator", "red_user", "blue_expert", "evaluator", "target", "tutor", "judge", "student")


def openai_backend(spec: str):  # -> OpenAICompatBackend
    """The backend of an ``openai:<model>@<base_url>[?<options>][#<KEY_ENV>]`` spec."""
    from steerkit.backends.openai_compat import OpenAICompatBackend, RequestOptions

    target, _, key_env = spec.removeprefix("openai:").partition("#")
    model, sep, address = target.rpartition("@")
    base_url, _, query = address.partition("?")
    if not sep or not model or not base_url:
        raise ValueError(f"role spec {spec!r}: write openai:<model>@<base_url>")
    try:
        options = RequestOptions.parse(query)
    except ValueError as exc:
        raise ValueError(f"role spec {spec!r}: {exc}") from None
    return OpenAICompatBackend(
        model=model, base_url=base_url, api_key_env=key_env or "OPENAI_API_KEY", options=options
    )


def make_backend(spec: str) -> Backend:
    """The backend a spec string names (see the module docstring)."""
    kind, _, rest = spec.partition(":")
    match kind:
        case "openai":
            return openai_backend(spec)
        case "hf":
            from steerkit.backends.hf_local import HFLocalBackend

            if not rest:
                raise ValueError(f"role spec {spec!r}: write hf:<checkpoint path>")
            return HFLocalBackend.from_pretrained(rest)
        case "smollm2":
            from steerkit.backends.hf_local import HFLocalBackend

            return HFLocalBackend.smollm2()
        case "rules":
            from steerkit.backends.rules import RulesBackend

            return RulesBackend()
        case "scripted":
            from steerkit.backends.scripted import named_double

            return named_double(rest)
        case _:
            raise ValueError(
                f"unknown role spec {spec!r}; use openai:<model>@<url>, hf:<path>, smollm2, rules or scripted:<name>"
            )


@dataclass
class Roles:
    """Role name -> spec, and the clients built from them (one client per role, built on demand)."""

    bindings: dict[str, str]
    cache_dir: Path | None = None
    seed: int = 0
    _clients: dict[str, ChatClient] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        unknown = set(self.bindings) - set(ROLES)
        if unknown:
            raise ValueError(f"unknown roles {sorted(unknown)}; roles are {', '.join(ROLES)}")
        if self.same_tutor_and_judge:
            warnings.warn(
                f"tutor and judge are the same model ({self.bindings['tutor']}): evaluation scores"
                " are then graded by the model the student was trained against; recorded in the manifest",
                stacklevel=2,
            )

    @property
    def same_tutor_and_judge(self) -> bool:
        t, j = self.bindings.get("tutor"), self.bindings.get("judge")
        return t is not None and t == j and t != "rules" and not t.startswith("scripted:")

    def client(self, role: str) -> ChatClient:
        if role not in self.bindings:
            raise KeyError(f"role {role!r} is not bound; bind it, e.g. roles={{'{role}': 'rules'}}")
        if role not in self._clients:
            spec = self.bindings[role]
            self._clients[role] = ChatClient(
                make_backend(spec), role=role, spec=spec, cache_dir=self.cache_dir, seed=self.seed
            )
        return self._clients[role]

    def bind(self, role: str, client: ChatClient) -> None:
        """Use an already built client for a role (tests, or a model loaded once and shared)."""
        self._clients[role] = client
        self.bindings[role] = client.spec

    def _request_options(self, role: str, spec: str) -> dict[str, object]:
        """The options a role's requests go out with: its built client's, else parsed from the spec."""
        options = getattr(getattr(self._clients.get(role), "backend", None), "options", None)
        return (options or openai_backend(spec).options).manifest()

    def manifest(self) -> dict[str, object]:
        return {
            "bindings": dict(self.bindings),
            "same_model_tutor_judge": self.same_tutor_and_judge,
            "request_options": {
                r: self._request_options(r, spec)
                for r, spec in self.bindings.items() if spec.startswith("openai:")
            },
            "usage": {r: vars(c.usage) for r, c in self._clients.items()},
        }


def served_roles(bindings: dict[str, str], *, timeout: float = 10.0) -> dict[str, dict[str, object]]:
    """For each ``openai:`` role: model, URL, request options and the model ids its server lists.

    Each server is asked once (``GET <base_url>/models``); one that does not answer is recorded with
    the error, not raised: the run itself reports a server that stays down.
    """
    out: dict[str, dict[str, object]] = {}
    listed: dict[str, list[str] | str] = {}
    for role, spec in bindings.items():
        if not isinstance(spec, str) or not spec.startswith("openai:"):
            continue
        backend = openai_backend(spec)
        if backend.base_url not in listed:
            try:
                listed[backend.base_url] = backend.server_models(timeout)
            except (OSError, ValueError) as exc:  # refused, timed out, HTTP error, not JSON
                listed[backend.base_url] = f"GET {backend.base_url}/models: {type(exc).__name__}: {exc}"
        ids = listed[backend.base_url]
        record: dict[str, object] = {
            "model": backend.model, "base_url": backend.base_url,
            "request_options": backend.options.manifest(),
        }
        if isinstance(ids, str):
            record["server_error"] = ids
        else:
            record.update(server_models=ids, model_listed=backend.model in ids)
        out[role] = record
    return out
