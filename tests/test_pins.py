"""The environment files pin what pyproject.toml pins, and the Unsloth one stays inside Unsloth's pins."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent

#: Unsloth 2026.10.9's own requirements (from its wheel's METADATA, Requires-Dist).
UNSLOTH_BOUNDS = {
    "trl": SpecifierSet("!=0.19.0,<=1.15.0,>=0.18.2"),
    "transformers": SpecifierSet(
        "!=4.53.0,!=4.54.0,!=4.55.0,!=4.55.1,!=4.57.0,!=4.57.4,!=4.57.5,!=5.0.0,!=5.1.0,<=5.17.0,>=4.52.4"
    ),
    "datasets": SpecifierSet("!=4.0.*,!=4.1.0,!=4.4.*,!=4.5.0,<5.0.0,>=3.4.1"),
    "torch": SpecifierSet("<2.15.0,>=2.4.0"),
    "peft": SpecifierSet("!=0.11.0,>=0.18.0"),
    "accelerate": SpecifierSet(">=0.34.1"),
}
#: What the main stack needs (STACK: TRL 1.15's GRPO crashes on CPU; TRL refuses assistant-only loss
#: for vision data below transformers 5.18).
MAIN_FLOORS = {"trl": Version("1.16"), "transformers": Version("5.18")}
#: GPU-only packages: in environment.yml, never in pyproject.toml (the CPU stack).
GPU_ONLY = {"vllm"}
#: vLLM 0.27-0.32 pin torch 2.13; 0.31 caps transformers below 5.18 and 0.32 below 5.20; TRL 1.16's own
#: extra accepts vllm>=0.22,<=0.31. So 0.30.0 is the newest release that fits the main stack.
VLLM_PIN = Version("0.30.0")
VLLM_FITS = {"torch": SpecifierSet("==2.13.*"), "trl": SpecifierSet(">=1.16,<1.17"),
             "transformers": SpecifierSet(">=5.18")}


def _reqs(lines: list[str]) -> dict[str, Requirement]:
    out = {}
    for line in lines:
        if line.startswith("-"):
            continue
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name not in out, f"{name} pinned twice"
        out[name] = req
    return out


def pyproject() -> dict[str, Requirement]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return _reqs(data["project"]["dependencies"] + data["project"]["optional-dependencies"]["dev"])


def conda_pip(name: str) -> dict[str, Requirement]:
    env = yaml.safe_load((ROOT / name).read_text())
    pips = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pips) == 1, f"{name}: expected one pip section"
    return _reqs(pips[0])


def pinned(req: Requirement) -> Version:
    (spec,) = req.specifier
    assert spec.operator == "==", f"{req} is not an exact pin"
    return Version(spec.version)


def test_main_environment_has_the_pyproject_pins() -> None:
    main, py = conda_pip("environment.yml"), pyproject()
    runtime = _reqs(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    assert set(runtime) <= set(main), f"missing from environment.yml: {sorted(set(runtime) - set(main))}"
    for name, req in main.items():
        if name in GPU_ONLY:
            continue
        assert name in py, f"environment.yml pins {name}, which pyproject.toml does not list"
        assert req.specifier == py[name].specifier, f"{name}: {req} vs pyproject {py[name]}"


def test_gpu_environment_pins_the_vllm_that_fits_the_stack() -> None:
    main, py = conda_pip("environment.yml"), pyproject()
    assert pinned(main["vllm"]) == VLLM_PIN
    assert GPU_ONLY.isdisjoint(py), "the CPU stack (pyproject.toml) must not require vLLM"
    for name, fits in VLLM_FITS.items():
        assert fits.contains(pinned(main[name])), f"vllm {VLLM_PIN} does not fit {main[name]}"


def test_main_stack_is_new_enough() -> None:
    py = pyproject()
    for name, floor in MAIN_FLOORS.items():
        assert pinned(py[name]) >= floor, f"{name} must be >= {floor}"


def test_unsloth_environment_shares_pins_except_its_own() -> None:
    uns, py = conda_pip("environment-unsloth.yml"), pyproject()
    own = {"trl", "transformers", "datasets"}
    for name, req in uns.items():
        if name in py and name not in own:
            assert req.specifier == py[name].specifier, f"{name}: {req} vs pyproject {py[name]}"


@pytest.mark.parametrize("name", sorted(UNSLOTH_BOUNDS))
def test_unsloth_pins_satisfy_unsloth(name: str) -> None:
    uns = conda_pip("environment-unsloth.yml")
    assert UNSLOTH_BOUNDS[name].contains(pinned(uns[name])), f"{uns[name]} outside {UNSLOTH_BOUNDS[name]}"


def test_unsloth_environment_pins_unsloth_and_a_matching_torchvision() -> None:
    uns = conda_pip("environment-unsloth.yml")
    assert pinned(uns["unsloth"]) == Version("2026.10.9")
    assert pinned(uns["unsloth-zoo"]) == pinned(uns["unsloth"])
    # torchvision 0.N pairs with torch 2.(N-15): 0.28 <-> 2.13.
    torch_v, tv = pinned(uns["torch"]), pinned(uns["torchvision"])
    assert (tv.major, tv.minor) == (0, torch_v.minor + 15), f"torchvision {tv} does not match torch {torch_v}"


def test_cpu_environment_has_no_torchvision() -> None:
    """torchvision does not import beside the CPU torch wheel (STACK), so nothing may require it."""
    assert "torchvision" not in pyproject()
    assert "torchvision" not in conda_pip("environment.yml")
