"""`pixtral-mlx serve`: an OpenAI-compatible server (`/v1/chat/completions`, `/v1/models`, `/health`).

The command's course: check the flags (`flags`) and bind the port, load the model on the engine thread, then
serve until SIGTERM or Ctrl-C, and always end the engine thread before the interpreter ends.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from pixtral_mlx.cli import error, flag_message, info

from .flags import build_parser, check

ENGINE_STOP_TIMEOUT = 2.0  # seconds for the engine thread to end after the server stopped


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound now: a port in use is reported before the model loads."""
    from pixtral_mlx.errors import ConfigError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(f"--host {host}: not an address of this machine ({e.strerror}).") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror or e}).") from None
    sock.set_inheritable(True)
    return sock


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def model_id(model: str) -> str:
    path = Path(model).expanduser()
    return path.resolve().name if path.exists() else model.rstrip("/")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pixtral_mlx.errors import PixtralError

    try:
        check(args)
        sock = _bind(args.host, args.port)
    except PixtralError as e:
        error(str(e))
        return 2
    if not _is_loopback(args.host) and not args.api_key:
        info(f"WARNING: listening on {args.host} without --api-key: anyone who can reach this port can use it.")

    from .engine import Engine

    stops: list[int] = []

    def stop(sig: int, frame: object) -> None:  # until the server takes the signals over: SIGTERM as Ctrl-C
        stops.append(sig)
        raise KeyboardInterrupt

    def unraisable(hook: Any) -> None:  # the KeyboardInterrupt Python drops (see `_serve`) is seen by `stopped`
        if not (stops and isinstance(hook.exc_value, KeyboardInterrupt)):
            sys.__unraisablehook__(hook)

    previous_hook, sys.unraisablehook = sys.unraisablehook, unraisable

    engine = Engine(lambda: _load(args), queue_size=args.queue, kv_bits=args.kv_bits, kv_group_size=args.kv_group_size)
    code = 1
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, stop)
        engine.start()
        code = _serve(args, engine, sock, stopped=lambda: bool(stops))
    except KeyboardInterrupt:  # a signal while the model loads: SIGTERM is a normal stop, Ctrl-C an interruption
        if stops[-1:] == [signal.SIGTERM]:
            code = 0
            info("Stopped (SIGTERM) before the model was loaded.")
        else:
            code = 130
            print("interrupted", file=sys.stderr, flush=True)
    finally:
        sys.unraisablehook = previous_hook
        sock.close()
        # The engine thread must end before the interpreter does: one still inside MLX (or a model load,
        # which cannot be interrupted) then aborts the process ("terminate called without an active exception").
        if not engine.close(ENGINE_STOP_TIMEOUT if engine.ready.is_set() else 0):
            if engine.ready.is_set():
                info("The engine did not stop in time; exiting without it.")
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return code


def _load(args: argparse.Namespace) -> Any:
    """The model (on the engine thread); above the trained window `main` warns, not the library."""
    import warnings

    import pixtral_mlx
    from pixtral_mlx.errors import ContextLengthWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ContextLengthWarning)
        return pixtral_mlx.load(
            args.model,
            progress=info,
            context_length=args.context_length,
            default_system_prompt=not args.no_default_system_prompt,
        )


def _serve(args: argparse.Namespace, engine: Any, sock: socket.socket, stopped: Any = lambda: False) -> int:
    """Wait for the model, then serve until SIGTERM or Ctrl-C; the exit status. `stopped()`: a stop signal came
    before the server took the signals over. Its handler raises KeyboardInterrupt, which Python drops where it lands
    in a weakref callback or a finalizer (an import's module lock, a collected object): checked again on the way."""
    from pixtral_mlx.config import check_model_edge
    from pixtral_mlx.errors import PixtralError
    from pixtral_mlx.fetch import FetchPolicy

    from .app import create_app
    from .http import Server
    from .settings import Settings

    tic = time.perf_counter()
    while not engine.ready.wait(0.2):  # a timed wait, so a signal is seen during the load
        if stopped():
            raise KeyboardInterrupt
    if stopped():
        raise KeyboardInterrupt
    if engine.load_error is not None:
        if isinstance(engine.load_error, PixtralError):
            error(str(engine.load_error))
            return 1
        raise engine.load_error
    try:  # --max-edge was checked against the family's largest image size; now against this model's own
        check_model_edge(args.max_edge, engine.pixtral.encoder.image_size)
    except PixtralError as e:
        error(flag_message(e))
        return 1
    trained = engine.pixtral.trained_context_length
    if args.context_length is not None and args.context_length > trained:
        info(
            f"WARNING: --context-length {args.context_length:,} is above the {trained:,} tokens this model was "
            "trained on; replies past that point may degrade."
        )
    name = args.served_model_name or model_id(args.model)
    settings = Settings(
        model_id=name,
        aliases=(args.model,),
        api_key=args.api_key,
        allowed_origins=args.allowed_origins,
        local_dirs=args.local_dirs,
        max_edge=args.max_edge,
        defaults=args.defaults,
        image_timeout=args.image_timeout,
        context_length=engine.pixtral.context_length,
        body_timeout=args.body_timeout,
        allowed_hosts=args.allowed_hosts,
        listen_host=args.host,
        fetch_policy=FetchPolicy.server(
            remote=not args.no_remote_images,
            allow_private=args.allow_private_urls,
            allowed_domains=tuple(args.allowed_media_domains),
        ),
        max_request_pixels=int(args.max_request_megapixels * 1_000_000),
    )
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    info(f"Loaded {name} in {time.perf_counter() - tic:.1f} s")
    if stopped():
        raise KeyboardInterrupt
    info(f"OpenAI-compatible API at http://{shown}:{port}/v1 (Ctrl-C stops)")
    server = Server(
        create_app(settings, engine),
        engine,
        grace=args.shutdown_grace,
        max_connections=args.max_connections,
        header_timeout=args.header_timeout,
        log_level="info",
    )
    server.run(sockets=[sock])
    if server.signal is not None:
        info(f"Stopped ({signal.Signals(server.signal).name}).")
    return 0
