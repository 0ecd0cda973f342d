"""Shared fixtures. Everything runs offline on CPU; heavy models are built once per test run."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-gpu", action="store_true", help="run tests that need an NVIDIA GPU")
    parser.addoption("--run-api", action="store_true", help="run tests that call a hosted API")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for marker, flag in (("gpu", "--run-gpu"), ("api", "--run-api")):
        if not config.getoption(flag):
            skip = pytest.mark.skip(reason=f"needs {flag} (see tests/QUARANTINE.md)")
            for item in items:
                if marker in item.keywords:
                    item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory: pytest.TempPathFactory):
    """A tiny Qwen2.5-VL (model, tokenizer, processor) built in code and saved; reload it from here."""
    from steerkit.tiny_vlm import build_tiny_vlm

    return build_tiny_vlm(tmp_path_factory.mktemp("tiny_vlm"))


@pytest.fixture(scope="session")
def smollm2_dir():
    """The embedded SmolLM2-135M-Instruct, re-materialised once into the git-ignored cache."""
    from steerkit.smollm2 import smollm2_path

    return smollm2_path()


@pytest.fixture
def loopback_server():
    """Start `steerkit.serve.LoopbackServer` on 127.0.0.1; yields a factory taking server options."""
    from steerkit.serve import LoopbackServer

    servers: list[LoopbackServer] = []

    def start(**options):
        server = LoopbackServer(**options)
        server.start()
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.stop()


@pytest.fixture(scope="module")
def tiny(tiny_vlm_dir):
    """The tiny VLM and its processor, loaded once per test module."""
    from steerkit.models import load_student

    return load_student(tiny_vlm_dir)


@pytest.fixture(scope="module")
def rl_set(tmp_path_factory: pytest.TempPathFactory):
    """Four seed-built STEER-RL scripts of three turns with packaged photos: (scripts, root)."""
    from steerkit.smoke_inputs import seed_rl_dialogues

    return seed_rl_dialogues(tmp_path_factory.mktemp("rl"), 4, turns=3, with_images=True)


@pytest.fixture
def kill_when_holding():
    """A function that SIGKILLs a training run once its log says ``holding`` (its ``hold_at`` step is
    on disk), then waits for the uninterrupted run started beside it; neither is left running."""

    def kill(proc: subprocess.Popen, out: Path, *, beside: tuple[subprocess.Popen, Path], seconds: float,
             finish_seconds: float) -> None:
        try:
            deadline = time.monotonic() + seconds
            while "holding" not in out.read_text():
                assert proc.poll() is None and time.monotonic() < deadline, out.read_text()[-3000:]
                time.sleep(0.01)
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=30) == -signal.SIGKILL
            assert beside[0].wait(timeout=finish_seconds) == 0, beside[1].read_text()[-3000:]
        finally:
            for p in (proc, beside[0]):
                if p.poll() is None:
                    p.kill()

    return kill
