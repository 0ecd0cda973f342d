"""The public API in ``steerkit.__all__``: each name resolves lazily to what its module defines."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import steerkit


def test_every_public_name_resolves_to_its_module_object() -> None:
    for name in steerkit.__all__:
        value = getattr(steerkit, name)
        if name != "__version__":
            module = sys.modules[f"steerkit.{steerkit._API[name]}"]
            assert value is getattr(module, name), name
    assert set(steerkit.__all__) <= set(dir(steerkit))


def test_no_public_name_is_a_submodule_name() -> None:
    # importing steerkit.x sets the package attribute x to the module, hiding a lazy name x
    package = Path(steerkit.__file__).parent
    submodules = {p.stem for p in package.glob("*.py")}
    submodules |= {p.name for p in package.iterdir() if p.is_dir()}
    assert not set(steerkit.__all__) & submodules


def test_an_unknown_name_is_an_attribute_error() -> None:
    try:
        steerkit.no_such_name  # noqa: B018
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("steerkit.no_such_name resolved")


def test_import_steerkit_loads_no_submodule() -> None:
    code = "import sys, steerkit; print([m for m in sys.modules if m.startswith('steerkit.')])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
