"""``python -m steerkit.serve``: the loopback server from a shell, serving until interrupted.

Prints the base URL on the first line (scripts read the port from it); SIGTERM or Ctrl-C stops it.
Options are those of `steerkit.serve.LoopbackServer`; ``--api-key-env`` names the variable holding
the key, so it never appears on the command line.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading

from steerkit.serve import LoopbackServer
from steerkit.serve import __doc__ as serve_doc
from steerkit.serve_wire import REFUSABLE


def _parse_fault(text: str) -> tuple[str, float]:
    name, sep, rate = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--fault {text!r}: write NAME=RATE, e.g. http500=0.05")
    try:
        return name, float(rate)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--fault {text!r}: the rate must be a number") from None


def main(argv: list[str] | None = None) -> None:
    """``python -m steerkit.serve``: serve until interrupted; prints the base URL on the first line."""
    p = argparse.ArgumentParser(prog="python -m steerkit.serve", description=serve_doc.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1", help="a loopback address")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--latency", type=float, default=0.0, help="seconds added to every answer")
    p.add_argument(
        "--backend", default="scripted:echo", help="role spec of the served model (not openai:)"
    )
    p.add_argument("--model", default=None, help="served model name (default: the backend's)")
    p.add_argument(
        "--fault", type=_parse_fault, action="append", default=[], help="NAME=RATE, repeatable"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--retry-after", type=float, default=1.0)
    p.add_argument("--hang", type=float, default=30.0)
    p.add_argument("--api-key-env", default=None, help="require the key held in this variable")
    p.add_argument(
        "--refuse", action="append", default=[], choices=REFUSABLE,
        help="answer a body with this field 400, as OpenAI's reasoning models do; repeatable",
    )
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from steerkit.backends.scripted import ScriptedBackend
    from steerkit.roles import make_backend

    if args.backend.startswith("openai:"):
        p.error("--backend openai:... would proxy another server; serve a local backend")
    backend = make_backend(args.backend)
    if isinstance(backend, ScriptedBackend):
        backend.record = False  # nobody reads its calls here, and it serves until interrupted
    server = LoopbackServer(
        backend,
        latency=args.latency,
        host=args.host,
        port=args.port,
        faults=dict(args.fault),
        seed=args.seed,
        retry_after=args.retry_after,
        hang=args.hang,
        model=args.model,
        api_key=os.environ[args.api_key_env] if args.api_key_env else None,
        refuse=args.refuse,
    ).start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    print(server.base_url, flush=True)  # the first line: scripts read the port from it
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
