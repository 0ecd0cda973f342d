"""A dress rehearsal of a served run: loopback servers where a recipe names served models.

`RehearsalServers` starts one `steerkit.serve.LoopbackServer` per distinct ``openai:<model>@<url>``
endpoint that a recipe (``configs/pipeline_<profile>.yaml``) names, serving that model name with a
`steerkit.backends.readback.RehearsalBackend` (the project's prompts answered from the messages
alone, with seeded flawed replies), so roles that share a server in the recipe share one here.
`RehearsalServers.sets` gives the ``--set`` overrides that point the recipe at the loopback ports,
model names unchanged::

    with RehearsalServers(load_recipe("full"), seed=0) as served:
        main(["run", "--profile", "full", *[f"--set={s}" for s in served.sets()], ...])
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, Self

from steerkit.backends.readback import RehearsalBackend

_OPENAI = re.compile(r"^openai:(?P<model>.+)@(?P<url>[^@#?]+)(?P<options>\?[^#]*)?(?P<key>#.*)?$")


def _recipe_values(recipe: Mapping[str, Any]) -> list[tuple[str, str, Any]]:
    """(scope, name, value) of each value ``--set`` can change: ``endpoints`` and each stage's."""
    out = [("endpoints", name, value) for name, value in (recipe.get("endpoints") or {}).items()]
    for key, params in (recipe.get("stages") or {}).items():
        out += [(key, name, value) for name, value in params.items()]
    return out


def served_endpoints(recipe: Mapping[str, Any]) -> dict[str, str]:
    """URL -> served model name for every ``openai:`` role spec in a recipe (its ``endpoints`` and
    stages). A URL named with two models is an error: one server serves one model (as vLLM does)."""
    out: dict[str, str] = {}
    for scope, name, value in _recipe_values(recipe):
        m = _OPENAI.match(value) if isinstance(value, str) else None
        if m is None:
            continue
        if out.setdefault(m["url"], m["model"]) != m["model"]:
            raise ValueError(
                f"{scope}.{name}: {m['url']} serves {out[m['url']]!r}, not"
                f" {m['model']!r}; one server serves one model"
            )
    return out


def overrides(recipe: Mapping[str, Any], replace: Mapping[str, str]) -> list[str]:
    """``<scope>.<param>=<value>`` for every recipe string value holding a key of ``replace``, with
    each such key replaced by its value (URLs by loopback URLs, model paths by local folders)."""
    sets = []
    for scope, name, value in _recipe_values(recipe):
        if isinstance(value, str) and any(old in value for old in replace):
            new = value
            for old, to in replace.items():
                new = new.replace(old, to)
            sets.append(f"{scope}.{name}={json.dumps(new)}")
    return sets


class RehearsalServers:
    """One `LoopbackServer` with a `RehearsalBackend` per endpoint of a recipe (a context manager).

    Args:
        recipe: a loaded recipe (`steerkit.pipeline.load_recipe`).
        seed: seeds the flaws and the server's faults.
        flaws: reply flaws and their rates (see `RehearsalBackend`).
        per_endpoint: recipe URL -> options for that endpoint's server alone (e.g. ``refuse`` and
            ``model``, to serve the grader as a reasoning model that rejects ``max_tokens``).
        server_options: passed to every `LoopbackServer` (``faults``, ``retry_after``, ...).
    """

    def __init__(
        self,
        recipe: Mapping[str, Any],
        *,
        seed: int = 0,
        flaws: Mapping[str, float] | None = None,
        per_endpoint: Mapping[str, Mapping[str, Any]] | None = None,
        **server_options: Any,
    ) -> None:
        self.recipe = recipe
        self.endpoints = served_endpoints(recipe)
        if not self.endpoints:
            raise ValueError("the recipe names no openai:<model>@<url> role to serve")
        self.seed, self.flaws, self.options = seed, dict(flaws or {}), server_options
        self.per_endpoint = {k: dict(v) for k, v in (per_endpoint or {}).items()}
        if stray := sorted(set(self.per_endpoint) - set(self.endpoints)):
            raise ValueError(f"per_endpoint: {', '.join(stray)} is no endpoint of the recipe")
        self.servers: dict[str, Any] = {}

    def start(self) -> Self:
        from steerkit.serve import LoopbackServer

        try:
            for i, (url, model) in enumerate(self.endpoints.items()):
                backend = RehearsalBackend(model, seed=self.seed + i, flaws=self.flaws)
                options = {"model": model, "seed": self.seed + i, **self.options}
                self.servers[url] = LoopbackServer(
                    backend, **{**options, **self.per_endpoint.get(url, {})}
                ).start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def urls(self) -> dict[str, str]:
        """Recipe URL -> the loopback URL serving it."""
        return {url: server.base_url for url, server in self.servers.items()}

    def sets(self, paths: Mapping[str, str] | None = None) -> list[str]:
        """``--set`` values pointing the recipe's roles at the loopback servers (and ``paths``,
        e.g. a model folder the recipe names, at local ones)."""
        return overrides(self.recipe, {**self.urls(), **(paths or {})})

    def counts(self) -> dict[str, dict[str, Any]]:
        """Per recipe URL: requests by prompt, flawed replies, re-asked verdicts, and the server's own
        counters."""
        return {
            url: {
                "prompts": dict(s.backend.counts),
                "flawed": dict(s.backend.flawed),
                "reasked": s.backend.reasked,
                "server": s.stats(),
            }
            for url, s in self.servers.items()
        }
