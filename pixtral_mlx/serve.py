"""`pixtral-mlx serve`: an OpenAI-compatible server (`/v1/chat/completions`, `/v1/models`, `/health`)."""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from .cli import DEFAULT_MODEL, add_context_arg
from .config import DEFAULT_MAX_TOKENS, MAX_EDGE

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_QUEUE = 16
DEFAULT_IMAGE_TIMEOUT = 10.0
DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_BODY_TIMEOUT = 60.0
DEFAULT_SHUTDOWN_GRACE = 5.0
ENGINE_STOP_TIMEOUT = 2.0  # seconds for the engine thread to end after the server stopped
API_KEY_ENV = "PIXTRAL_MLX_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pixtral-mlx serve",
        description="Serve Pixtral-12B over an OpenAI-compatible HTTP API: POST /v1/chat/completions (streaming "
        "or not, images as data: or http(s) URLs), GET /v1/models, GET /health. Requests run one at a time, "
        "in order; a chat that resends its history prefills only the new tokens.",
        epilog="Examples:\n  pixtral-mlx serve\n"
        "  pixtral-mlx serve --model ~/models/pixtral-4bit --port 8000 --allow-local-files ~/Pictures\n"
        "  PIXTRAL_MLX_API_KEY=secret pixtral-mlx serve --host 0.0.0.0\n\n"
        "Clients: base URL http://127.0.0.1:8080/v1 (the openai package, Open WebUI, llm, ...).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        "-m",
        default=DEFAULT_MODEL,
        help="MLX folder, mlx-community repo id, or official repo id (converted to 4-bit once). "
        f"Default: {DEFAULT_MODEL}",
    )
    p.add_argument(
        "--served-model-name",
        help="the model id clients see and send (default: the repo id, or the folder's name)",
    )
    p.add_argument(
        "--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST}: this machine only)"
    )
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to listen on (default {DEFAULT_PORT})")
    p.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"require 'Authorization: Bearer KEY' on /v1 (default: ${API_KEY_ENV}, if set)",
    )
    p.add_argument(
        "--allowed-origins",
        nargs="+",
        default=[],
        metavar="ORIGIN",
        help="web origins allowed to call the API from a browser (CORS), e.g. http://localhost:3000, or '*'; "
        "other pages are refused",
    )
    p.add_argument(
        "--allowed-hosts",
        nargs="+",
        default=[],
        metavar="NAME",
        help="more names clients may reach this server by (the Host header; a reverse proxy's name), or '*' for "
        "any; by default only its address (and localhost), so a web page cannot reach it by DNS rebinding",
    )
    p.add_argument(
        "--allow-local-files",
        nargs="+",
        action="extend",
        default=[],
        metavar="DIR",
        help="let requests use local paths and file:// URLs inside these folders (refused otherwise)",
    )
    p.add_argument(
        "--allowed-media-domains",
        nargs="+",
        action="extend",
        default=[],
        metavar="DOMAIN",
        help="fetch image URLs only from these hosts and their subdomains (example.com allows img.example.com)",
    )
    p.add_argument(
        "--allow-private-urls",
        action="store_true",
        help="let image URLs reach loopback and private addresses too (refused by default)",
    )
    p.add_argument(
        "--no-remote-images",
        action="store_true",
        help="refuse http(s) image URLs altogether (data: URLs and --allow-local-files still work)",
    )
    p.add_argument(
        "--max-request-megapixels",
        type=float,
        default=100.0,
        metavar="MP",
        help="decoded pixels of all of a request's images, checked before decoding (default 100; 1024x1024 is 1 MP)",
    )
    p.add_argument(
        "--max-edge",
        type=int,
        help=f"cap the longest image edge in pixels (≤{MAX_EDGE}); requests may ask for less with 'max_edge'",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=DEFAULT_MAX_TOKENS,
        help=f"reply length for requests that set no max_tokens (default {DEFAULT_MAX_TOKENS})",
    )
    p.add_argument(
        "--queue",
        type=int,
        default=DEFAULT_QUEUE,
        metavar="N",
        help=f"requests that may wait while one runs; more get HTTP 429 with Retry-After (default {DEFAULT_QUEUE})",
    )
    p.add_argument(
        "--image-timeout",
        type=float,
        default=DEFAULT_IMAGE_TIMEOUT,
        metavar="SECONDS",
        help=f"time for a whole image download from an http(s) URL (default {DEFAULT_IMAGE_TIMEOUT:g})",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=DEFAULT_MAX_CONNECTIONS,
        metavar="N",
        help=f"open connections at most; more are answered 503 and closed (default {DEFAULT_MAX_CONNECTIONS})",
    )
    p.add_argument(
        "--header-timeout",
        type=float,
        default=DEFAULT_HEADER_TIMEOUT,
        metavar="SECONDS",
        help=f"time for a request's headers; slower clients are dropped (default {DEFAULT_HEADER_TIMEOUT:g})",
    )
    p.add_argument(
        "--body-timeout",
        type=float,
        default=DEFAULT_BODY_TIMEOUT,
        metavar="SECONDS",
        help=f"time for a request's whole body; slower ones get HTTP 408 (default {DEFAULT_BODY_TIMEOUT:g})",
    )
    p.add_argument(
        "--shutdown-grace",
        type=float,
        default=DEFAULT_SHUTDOWN_GRACE,
        metavar="SECONDS",
        help="on SIGTERM or Ctrl-C, time running requests get to finish before they are stopped "
        f"(default {DEFAULT_SHUTDOWN_GRACE:g})",
    )
    add_context_arg(p)
    p.add_argument("--kv-bits", type=int, choices=[4, 8], help="quantize the shared KV cache to 4 or 8 bits")
    p.add_argument("--kv-group-size", type=int, default=64, help="group size of the quantized KV cache (default 64)")
    return p


def _err(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)


def _info(msg: str) -> None:
    print(f"[INFO] {msg}", file=sys.stderr, flush=True)


def _check(args: argparse.Namespace) -> None:
    """Every flag, before the (slow) model load; `PixtralError` names the flag."""
    from .cli import flag_message
    from .config import check_context_length, check_max_edge
    from .errors import ConfigError, PixtralError
    from .turn import Options

    try:
        check_max_edge(args.max_edge)
        check_context_length(args.context_length, 1 << 62)
        args.defaults = Options(max_tokens=args.max_tokens, kv_bits=args.kv_bits, kv_group_size=args.kv_group_size)
    except PixtralError as e:
        raise ConfigError(flag_message(e)) from None
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be from 0 to 65535, got {args.port}.")
    if args.queue < 1:
        raise ConfigError(f"--queue must be at least 1, got {args.queue}.")
    for flag in ("image_timeout", "header_timeout", "body_timeout"):
        if not getattr(args, flag) > 0:
            name = "--" + flag.replace("_", "-")
            raise ConfigError(f"{name} must be a positive number of seconds, got {getattr(args, flag):g}.")
    if not 0 <= args.shutdown_grace <= 3600:
        raise ConfigError(f"--shutdown-grace must be from 0 to 3600 seconds, got {args.shutdown_grace:g}.")
    if args.max_connections < 1:
        raise ConfigError(f"--max-connections must be at least 1, got {args.max_connections}.")
    if args.api_key is not None and not args.api_key.strip():
        raise ConfigError("--api-key is empty.")
    if not (math.isfinite(args.max_request_megapixels) and args.max_request_megapixels > 0):
        raise ConfigError(f"--max-request-megapixels must be a positive number, got {args.max_request_megapixels:g}.")
    if any(not d.strip().strip(".").removeprefix("*.") for d in args.allowed_media_domains):
        raise ConfigError("--allowed-media-domains has an empty domain.")
    folders = []
    for folder in args.allow_local_files:
        path = Path(folder).expanduser()
        if not path.is_dir():
            raise ConfigError(f"--allow-local-files {folder}: no such folder.")
        folders.append(path.resolve())
    args.local_dirs = folders


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound now: a port in use is reported before the model loads."""
    from .errors import ConfigError

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
    from .errors import PixtralError

    try:
        _check(args)
        sock = _bind(args.host, args.port)
    except PixtralError as e:
        _err(str(e))
        return 2
    if not _is_loopback(args.host) and not args.api_key:
        _info(f"WARNING: listening on {args.host} without --api-key: anyone who can reach this port can use it.")

    from .server.engine import Engine

    stops: list[int] = []

    def stop(sig: int, frame: object) -> None:  # until the server takes the signals over: SIGTERM as Ctrl-C
        stops.append(sig)
        raise KeyboardInterrupt

    engine = Engine(lambda: _load(args), queue_size=args.queue, kv_bits=args.kv_bits, kv_group_size=args.kv_group_size)
    code = 1
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, stop)
        engine.start()
        code = _serve(args, engine, sock)
    except KeyboardInterrupt:  # a signal while the model loads: SIGTERM is a normal stop, Ctrl-C an interruption
        if stops[-1:] == [signal.SIGTERM]:
            code = 0
            _info("Stopped (SIGTERM) before the model was loaded.")
        else:
            code = 130
            print("interrupted", file=sys.stderr, flush=True)
    finally:
        sock.close()
        # The engine thread must end before the interpreter does: one still inside MLX (or a model load,
        # which cannot be interrupted) then aborts the process ("terminate called without an active exception").
        if not engine.close(ENGINE_STOP_TIMEOUT if engine.ready.is_set() else 0):
            if engine.ready.is_set():
                _info("The engine did not stop in time; exiting without it.")
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
        return pixtral_mlx.load(args.model, progress=_info, context_length=args.context_length)


def _serve(args: argparse.Namespace, engine: Any, sock: socket.socket) -> int:
    """Wait for the model, then serve until SIGTERM or Ctrl-C; the exit status."""
    from .errors import PixtralError
    from .images import FetchPolicy
    from .server.app import Server, Settings, create_app

    tic = time.perf_counter()
    while not engine.ready.wait(0.2):  # a timed wait, so a signal is seen during the load
        pass
    if engine.load_error is not None:
        if isinstance(engine.load_error, PixtralError):
            _err(str(engine.load_error))
            return 1
        raise engine.load_error
    trained = engine.pixtral.trained_context_length
    if args.context_length is not None and args.context_length > trained:
        _info(
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
    _info(f"Loaded {name} in {time.perf_counter() - tic:.1f} s")
    _info(f"OpenAI-compatible API at http://{shown}:{port}/v1 (Ctrl-C stops)")
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
        _info(f"Stopped ({signal.Signals(server.signal).name}).")
    return 0
