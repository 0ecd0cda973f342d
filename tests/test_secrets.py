"""Keys come from the environment, are sent to the server, and reach no file; nothing unpickles.

A notebook-04 evaluation runs through papermill with its student and judge served over HTTP by
`LoopbackServer`s that demand an API key, ``OPENAI_API_KEY`` set to a long random key, wandb
offline, and every file the run leaves behind is scanned for the key (as written and in base64).
"""

from __future__ import annotations

import ast
import base64
import re
import secrets
from pathlib import Path

from steerkit.backends.scripted import named_double

PACKAGE = Path(__file__).resolve().parent.parent / "steerkit"


def _forms(key: str) -> list[bytes]:
    """The key as written and base64-encoded at each of the three byte alignments."""
    raw = key.encode()
    out = [raw]
    for shift in range(3):
        b64 = base64.b64encode(raw[shift:])
        out.append(b64[4 : len(b64) - 4])  # the middle, which does not depend on what surrounds it
    return out


def _leaks(tree: Path, key: str) -> list[str]:
    forms = _forms(key)
    return [str(f) for f in sorted(tree.rglob("*")) if f.is_file() and any(x in f.read_bytes() for x in forms)]


def test_the_scan_finds_a_planted_key(tmp_path):
    key = secrets.token_urlsafe(48)
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "raw.txt").write_text(f"header {key} tail")
    (tmp_path / "a" / "enc.bin").write_bytes(b"x" + base64.b64encode(b"Bearer " + key.encode()))
    (tmp_path / "clean.txt").write_text("nothing here")
    assert _leaks(tmp_path, key) == [str(tmp_path / "a" / "b" / "raw.txt"), str(tmp_path / "a" / "enc.bin")]


def test_api_key_is_used_and_written_nowhere(tmp_path, loopback_server, monkeypatch):
    from steerkit.notebooks import execute

    key = "sk-" + secrets.token_urlsafe(48)
    monkeypatch.setenv("OPENAI_API_KEY", key)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    student = loopback_server(backend=named_double("refuser"), api_key=key)
    judge = loopback_server(backend=named_double("judge"), api_key=key)
    runs = tmp_path / "runs"
    execute("04", {
        "student": f"openai:scripted:refuser@{student.base_url}",
        "judge": f"openai:scripted:judge@{judge.base_url}",
        "n_benign": 2, "n_obfuscated": 2, "n_redteam": 2, "n_items": 4, "max_turns": 2, "max_tokens": 16,
        "n_resamples": 20, "figure_png": False,
    }, runs_root=runs, run_id="keyed")

    # The key was actually used: both servers answered requests that carried it, and refused none.
    for server in (student, judge):
        stats = server.stats()
        assert stats["outcomes"].get("ok", 0) > 0 and "unauthorized" not in stats["outcomes"], stats

    # A client with a reply cache inside the same tree: cached replies are files too.
    from steerkit.evaluate import evaluate, load_bench
    from steerkit.roles import Roles
    from steerkit.runs import open_run

    run_dir = next(runs.glob("*/keyed"))
    bench = next(run_dir.rglob("steer_bench.jsonl"))
    roles = Roles({"student": f"openai:scripted:refuser@{student.base_url}",
                   "judge": f"openai:scripted:judge@{judge.base_url}"}, cache_dir=tmp_path / "reply_cache")
    evaluate(open_run("cached", run_id="keyed-cache", root=runs), load_bench(bench)[:2],
             student=roles.client("student"), judge=roles.client("judge"), root=bench.parent, max_turns=2)
    assert list((tmp_path / "reply_cache").glob("*.jsonl"))

    files = [f for f in tmp_path.rglob("*") if f.is_file()]
    assert any(f.suffix == ".ipynb" for f in files) and any(f.name == "manifest.json" for f in files)
    assert _leaks(tmp_path, key) == []
    assert _leaks(tmp_path, "Bearer " + key) == []


# ---- no loader unpickles -------------------------------------------------------------------------

#: Calls that can run code from a file: pickle and its wrappers. ``torch.load`` is allowed only with
#: ``weights_only=True``; ``np.load`` only without ``allow_pickle=True``. Also flagged: ``eval``/``exec``
#: (model text is data, never code), ``yaml.load`` (``safe_load`` only) and ``shell=True``.
UNSAFE_NAMES = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
UNSAFE_ATTRS = {"read_pickle", "to_pickle", "from_pickle"}


def _unsafe_calls(source: str, where: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            )
            for n in names:
                if n.split(".")[0] in UNSAFE_NAMES:
                    found.append(f"{where}:{node.lineno}: imports {n}")
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
        owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
        kw = {k.arg: k.value for k in node.keywords}
        if isinstance(f, ast.Name) and name in ("eval", "exec"):
            found.append(f"{where}:{node.lineno}: {name}() runs text as code")
        elif name in ("unsafe_load", "full_load") or (name == "load" and owner == "yaml"):
            found.append(f"{where}:{node.lineno}: yaml.{name} (use yaml.safe_load)")
        elif isinstance(kw.get("shell"), ast.Constant) and kw["shell"].value is True:
            found.append(f"{where}:{node.lineno}: shell=True")
        elif name in UNSAFE_ATTRS:
            found.append(f"{where}:{node.lineno}: {name}()")
        elif name == "load" and owner == "torch":
            v = kw.get("weights_only")
            if not (isinstance(v, ast.Constant) and v.value is True):
                found.append(f"{where}:{node.lineno}: torch.load without weights_only=True")
        elif name == "load" and owner in ("np", "numpy"):
            v = kw.get("allow_pickle")
            if v is not None and not (isinstance(v, ast.Constant) and v.value is False):
                found.append(f"{where}:{node.lineno}: np.load with allow_pickle")
    return found


def test_the_unpickling_scan_flags_unsafe_calls():
    bad = (
        "import pickle\nfrom joblib import load\nimport torch, numpy as np, pandas as pd\n"
        "torch.load('m.pt')\ntorch.load('m.pt', weights_only=False)\nnp.load('a.npy', allow_pickle=True)\n"
        "pd.read_pickle('f.pkl')\neval(reply)\nyaml.load(text)\nsubprocess.run(cmd, shell=True)\n"
    )
    good = ("import torch, numpy as np\ntorch.load('m.pt', weights_only=True)\nnp.load('a.npy')\n"
            "model.eval()\nyaml.safe_load(text)\nast.literal_eval(text)\n")
    assert [int(f.split(":")[1]) for f in _unsafe_calls(bad, "bad.py")] == [1, 2, 4, 5, 6, 7, 8, 9, 10]
    assert _unsafe_calls(good, "good.py") == []


def test_no_loader_in_the_package_unpickles_or_runs_text():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        found += _unsafe_calls(path.read_text(encoding="utf-8"), str(path.relative_to(PACKAGE.parent)))
    assert found == []


def test_no_notebook_unpickles():
    import nbformat

    found = []
    for path in sorted((PACKAGE.parent / "notebooks").glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        code = "\n".join(re.sub(r"^[!%].*$", "", c.source, flags=re.MULTILINE)
                         for c in nb.cells if c.cell_type == "code")
        found += _unsafe_calls(code, path.name)
    assert found == []


def test_security_md_names_tests_that_exist():
    repo = PACKAGE.parent
    named = re.findall(r"(tests/test_\w+\.py)::(\w+)", (repo / "SECURITY.md").read_text(encoding="utf-8"))
    assert len(named) >= 20
    for path, name in named:
        defined = {n.name for n in ast.parse((repo / path).read_text()).body if isinstance(n, ast.FunctionDef)}
        assert name in defined, f"SECURITY.md names {path}::{name}, which does not exist"
