"""The package's shape: layers that point one way, no import cycles, modules of one idea.

Every module's imports are read statically (``ast``), function-level imports included: an import
deferred into a function for speed is still a dependency. Imports under ``if TYPE_CHECKING:`` are
not (they name a type for the reader and never run), nor those under ``if __name__ == "__main__":``
(a command-line entry point such as ``python -m steerkit.grpo`` runs on top of every layer). Layers, bottom to top:

1. records and the run-directory contract: what is written, where, and how it is read back;
2. clients and backends: how a role's model is called, students loaded, and the offline stand-ins;
3. the method: the multi-turn loop, the rollout engine, rewards, the tutor, the judge, verdicts,
   metrics (docs/method.md sections 3, 4 and 6);
4. the stages: synthesis, SFT, GRPO, evaluation, and the data each reads;
5. on top: read-back, figures, the inspector, the pipeline, notebooks, the CLI, the loopback server.

A module may import its own layer or any below it, never one above.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "steerkit"

#: Layer of each module, by dotted name below ``steerkit`` (``x.*`` covers the package ``x``).
LAYERS: dict[str, int] = {
    # 1 records and contract
    "layout": 1, "schema": 1, "files": 1, "images": 1, "prompts": 1, "heuristics": 1,
    "paper_reference": 1, "tracking": 1, "progress": 1, "parameters": 1,
    # 2 clients, backends, students
    "clients": 2, "backends": 2, "backends.*": 2, "roles": 2,
    "models": 2, "smollm2": 2, "tiny_vlm": 2, "served": 2,
    "runs": 2, "provenance": 2,  # a manifest records each served role as its server reports it
    "synth.rules_generator": 2,  # the offline generator behind the ``rules`` role spec
    # 3 the method
    "converse": 3, "rollout": 3, "rollout_generate": 3, "rollout_vllm": 3, "rewards": 3,
    "verdicts": 3, "tutor": 3, "judge": 3, "metrics": 3, "stats": 3,
    # 4 the stages
    "synth": 4, "synth.*": 4, "sft": 4, "grpo": 4, "evaluate": 4, "rl_data": 4, "smoke_inputs": 4,
    "distributed": 4, "grpo_cli": 4, "sft_checks": 4, "grpo_config": 4, "grpo_batching": 4,
    "grpo_resume": 4, "grpo_tracking": 4, "grpo_trainer": 4, "sft_data": 4, "sft_trainer": 4,
    "checkpoints": 4,
    # 5 top: read-back, display, orchestration
    "frames": 5, "plots": 5, "training_figures": 5, "render": 5, "inspector": 5, "pipeline": 5, "notebooks": 5,
    "cli": 5,
    "sweep": 5, "studies": 5, "evaluation_run": 5,
    "serve": 5, "serve_wire": 5, "serve_faults": 5, "serve_batching": 5, "serve_cli": 5, "rehearsal": 5,
    "calibration": 5, "harm_calibration": 5, "agreement": 5,
}

#: Upward imports that remain, each with the reason. An entry that no longer occurs fails the
#: test, so the list only shrinks.
KNOWN_UPWARD: set[tuple[str, str]] = set()

#: Modules over the size limit whose split or reason is still to come; same rule as KNOWN_UPWARD.
PENDING_SIZE: set[str] = set()

SIZE_LIMIT = 400  # lines; a longer module says why in a "Size:" line near the top of its docstring


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path  # "" is the package itself
    return out


MODULES = _modules()


def _names_type_checking(test: ast.AST | None) -> bool:
    return isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"


def _names_main(test: ast.AST | None) -> bool:
    return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name)
            and test.left.id == "__name__" and len(test.comparators) == 1
            and isinstance(test.comparators[0], ast.Constant) and test.comparators[0].value == "__main__")


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of ``tree`` except those inside ``if TYPE_CHECKING:`` and ``__main__`` blocks."""
    out, todo = [], [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        for child in ast.iter_child_nodes(node):
            test = getattr(child, "test", None)
            if isinstance(child, ast.If) and (_names_type_checking(test) or _names_main(test)):
                todo.extend(child.orelse)
                continue
            todo.append(child)
    return out


def _imports(name: str, path: Path) -> set[str]:
    """The steerkit modules ``name`` imports anywhere in its body (relative to ``steerkit``)."""
    is_package = path.name == "__init__.py"
    here = ["steerkit", *name.split(".")] if name else ["steerkit"]
    if not is_package:
        here = here[:-1]
    found: set[str] = set()

    def add(dotted: str) -> bool:
        if dotted == "steerkit" or dotted.startswith("steerkit."):
            rel = dotted.removeprefix("steerkit").removeprefix(".")
            if rel in MODULES:
                found.add(rel)
                return True
        return False

    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
            # ``from steerkit import metrics`` imports the module steerkit.metrics, not the package
            modules = [add(f"{base}.{a.name}") for a in node.names]  # every name is looked at
            if not all(modules):
                add(base)
    found.discard(name)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def layer_of(name: str) -> int:
    if name in LAYERS:
        return LAYERS[name]
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        star = ".".join(parts[:i]) + ".*"
        if star in LAYERS:
            return LAYERS[star]
    raise KeyError(name)


def test_every_module_has_a_layer() -> None:
    missing = [n for n in MODULES if n and n not in LAYERS and not _has_star(n)]
    assert not missing, f"add these modules to LAYERS in {Path(__file__).name}: {missing}"


def _has_star(name: str) -> bool:
    try:
        layer_of(name)
    except KeyError:
        return False
    return True


def test_the_package_itself_imports_nothing_at_import_time() -> None:
    # steerkit/__init__.py names the public API and resolves it lazily (importlib), so it sits
    # outside the layers and costs nothing to import
    assert GRAPH[""] == set(), GRAPH[""]


def test_no_lower_layer_imports_an_upper_one() -> None:
    upward = {
        (a, b)
        for a, deps in GRAPH.items() if a
        for b in deps if b and layer_of(b) > layer_of(a)
    }
    new = sorted(upward - KNOWN_UPWARD)
    assert not new, "upward imports (module -> module above it): " + ", ".join(
        f"{a} (layer {layer_of(a)}) -> {b} (layer {layer_of(b)})" for a, b in new
    )
    gone = sorted(KNOWN_UPWARD - upward)
    assert not gone, f"no longer upward, remove from KNOWN_UPWARD: {gone}"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_reader_sees_function_level_and_relative_imports(tmp_path: Path) -> None:
    src = tmp_path / "x.py"
    src.write_text(
        "def f():\n    from steerkit import metrics\n    from .layout import MAX_TURNS\n"
    )
    assert _imports("judge", src) == {"metrics", "layout"}


def test_no_import_cycles() -> None:
    graph = {a: {b for b in deps if b} for a, deps in GRAPH.items() if a}
    assert _cycles(graph) == [], "import cycles between steerkit modules"


def _size_reason(path: Path) -> str | None:
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    for line in doc.splitlines()[:15]:
        if line.strip().startswith("Size:") and len(line.strip()) > len("Size: ") + 10:
            return line.strip()
    return None


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n))
def test_module_size(name: str) -> None:
    path = MODULES[name]
    n = len(path.read_text(encoding="utf-8").splitlines())
    if name in PENDING_SIZE:
        done = n <= SIZE_LIMIT or _size_reason(path) is not None
        assert not done, f"{name} is done: remove it from PENDING_SIZE"
        return
    assert n <= SIZE_LIMIT or _size_reason(path), (
        f"{path.relative_to(PACKAGE.parent)} has {n} lines (limit {SIZE_LIMIT}): split it, or say"
        " why it stays whole in a 'Size: ...' line near the top of its docstring"
    )
