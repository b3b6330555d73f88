"""`pypto-serving engine`: the OpenAI-compatible server of one DP replica.

The HTTP server starts first (`/health` 200, `/ready` 503) and the model loads on the engine loop thread; a load
failure exits non-zero with the reason. SIGTERM drains: no new requests (503 + Retry-After), in-flight ones
finish, and the process exits once idle or at `--drain-timeout`; a second SIGTERM/SIGINT exits at once.
`POST /drain` (and `DELETE /drain`, its undo) need the token in `--control-token-file` (engine/control.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from types import FrameType
from typing import Any

import uvicorn

from pypto_serving.engine.async_engine import AsyncEngine
from pypto_serving.engine.control import read_token
from pypto_serving.engine.server import ServerSettings, ServerState, build_app
from pypto_serving.engine.serving_config import OPTIONS, ConfigError, load_serving_config, resolve, split

log = logging.getLogger("pypto_serving.engine")
FORCED_SHUTDOWN_S = 5.0  # after a second signal: how long stopping the engine may take before the process just exits


def parser() -> argparse.ArgumentParser:
    """Flags for every option in serving_config.OPTIONS (unset flags stay out of the namespace)."""
    p = argparse.ArgumentParser(prog="pypto-serving engine", description=__doc__.splitlines()[0],
                                argument_default=argparse.SUPPRESS)
    p.add_argument("--config", metavar="serving.json", help="options file (flags override it)")
    for name, (kind, default, help_, _) in OPTIONS.items():
        flag = "--" + name.replace("_", "-")
        shown = help_ if default is None else f"{help_} (default: {default})"
        if kind is bool:
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, help=shown)
        else:
            p.add_argument(flag, dest=name, type=kind, metavar=name.split("_")[-1].upper(), help=shown)
    return p


def parse_options(argv: list[str]) -> dict[str, Any]:
    """Defaults < --config file < flags."""
    args = vars(parser().parse_args(argv))
    path = args.pop("config", None)
    return resolve(load_serving_config(path) if path else {}, args)


class EngineServer(uvicorn.Server):
    """uvicorn with drain-on-SIGTERM: the first signal drains, a second one exits at once."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self.loop: asyncio.AbstractEventLoop | None = None
        self.signals = 0

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)
        if self.force_exit:  # uvicorn then skips the app's shutdown: still stop the engine, but do not wait long
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.lifespan.shutdown(), FORCED_SHUTDOWN_S)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.signals += 1
        if self.signals > 1 or self.loop is None:
            log.warning("%s: exiting now", signal.Signals(sig).name)
            self.request_exit()
            self.force_exit = self.signals > 1
            if self.loop is not None:
                self.loop.call_soon_threadsafe(self.state.engine.abort_all, "the engine was stopped")
            return
        log.info("%s: draining (at most %.0fs), then exiting", signal.Signals(sig).name,
                 self.state.settings.drain_timeout_s)
        self.loop.call_soon_threadsafe(self.state.drain_and_exit)

    def request_exit(self) -> None:
        if self.state.feed is not None:
            self.state.feed.close()  # uvicorn waits for open responses: end the load streams
        self.should_exit = True


def idle_openmp_threads() -> None:
    """Let OpenMP worker threads sleep when a parallel region ends, unless ``OMP_WAIT_POLICY`` says otherwise.

    libgomp reads the policy once, when torch loads it, so this runs before torch is imported (the rank processes
    inherit it). Spinning workers make decode ~30% faster while the engine has its cores to itself (the ~50M Qwen3
    at 2 threads: 14-16 vs 21-22 ms per batch-1 step), and make every engine ~10x slower when several share the
    cores (4 tiny-model engines at 2 threads each on 2 cores: ~90 vs ~1,200 output tok/s). A pod with dedicated
    cores sets ``OMP_WAIT_POLICY=ACTIVE``."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: list[str]) -> int:
    """Run the engine server until it is stopped; non-zero if the options are bad or the model fails to load."""
    idle_openmp_threads()
    try:
        options = parse_options(argv)
        engine_kwargs, server = split(options)
        from pypto_serving.engine.config import EngineConfig  # no torch here

        config = EngineConfig(**engine_kwargs)
        if server["control_token_file"] is not None:
            read_token(server["control_token_file"])  # fail at start, not at the first drain
    except (ConfigError, ValueError) as exc:
        print(f"pypto-serving engine: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=server["log_level"].upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if config.headless:  # a non-leader node of a replica spanning nodes: its ranks only
        from pypto_serving.engine import node_worker

        return node_worker.main(config, server["host"], server["port"])
    if config.data_parallel_size > 1:
        log.info("DP rank %d of %d (group store at %s:%d)", config.data_parallel_rank, config.data_parallel_size,
                 config.data_parallel_address, config.data_parallel_rpc_port)

    def load_engine() -> Any:
        from pypto_serving.engine.llm_engine import LLMEngine  # torch is imported here, on the loop thread

        return LLMEngine(config)

    engine = AsyncEngine(load_engine)
    settings = ServerSettings(served_model_name=str(config.served_model_name), model=config.model,
                              drain_timeout_s=server["drain_timeout"], max_body_bytes=server["max_body_bytes"],
                              control_token_file=server["control_token_file"])
    app = build_app(engine, settings)
    state: ServerState = app.state.server
    uv_config = uvicorn.Config(app, host=server["host"], port=server["port"], log_level=server["log_level"],
                               access_log=server["access_log"], timeout_graceful_shutdown=5, lifespan="on")
    uv_server = EngineServer(uv_config, state)
    state.request_exit = uv_server.request_exit
    log.info("serving %s as %r on http://%s:%d (model loading in the background)", config.model,
             config.served_model_name, server["host"], server["port"])
    uv_server.run()
    if engine.load_error:
        print(f"pypto-serving engine: the model failed to load: {engine.load_error}", file=sys.stderr)
        return 1
    if not uv_server.started:
        return 1  # uvicorn could not bind; it logged why
    return 0
