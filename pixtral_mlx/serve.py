"""`pixtral-mlx serve`: an OpenAI-compatible server (`/v1/chat/completions`, `/v1/models`, `/health`)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
import time
from pathlib import Path

from .cli import DEFAULT_MODEL
from .config import DEFAULT_MAX_TOKENS, MAX_EDGE

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_QUEUE = 16
DEFAULT_IMAGE_TIMEOUT = 10.0
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
        help="web origins allowed to call the API from a browser (CORS), e.g. http://localhost:3000, or '*'",
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
    from .config import check_max_edge
    from .errors import ConfigError, PixtralError
    from .turn import Options

    try:
        check_max_edge(args.max_edge)
        args.defaults = Options(max_tokens=args.max_tokens, kv_bits=args.kv_bits, kv_group_size=args.kv_group_size)
    except PixtralError as e:
        raise ConfigError(flag_message(e)) from None
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be from 0 to 65535, got {args.port}.")
    if args.queue < 1:
        raise ConfigError(f"--queue must be at least 1, got {args.queue}.")
    if not args.image_timeout > 0:
        raise ConfigError(f"--image-timeout must be a positive number of seconds, got {args.image_timeout:g}.")
    if args.api_key is not None and not args.api_key.strip():
        raise ConfigError("--api-key is empty.")
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

    import uvicorn

    import pixtral_mlx

    from .server.app import Settings, create_app
    from .server.engine import Engine

    tic = time.perf_counter()
    engine = Engine(
        lambda: pixtral_mlx.load(args.model, progress=_info),
        queue_size=args.queue,
        kv_bits=args.kv_bits,
        kv_group_size=args.kv_group_size,
    )
    engine.start()
    try:
        while not engine.ready.wait(0.2):  # a timed wait, so Ctrl-C is seen during the load
            pass
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if engine.load_error is not None:
        sock.close()
        if isinstance(engine.load_error, PixtralError):
            _err(str(engine.load_error))
            return 1
        raise engine.load_error
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
    )
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    _info(f"Loaded {name} in {time.perf_counter() - tic:.1f} s")
    _info(f"OpenAI-compatible API at http://{shown}:{port}/v1 (Ctrl-C stops)")
    config = uvicorn.Config(create_app(settings, engine), log_level="info", timeout_graceful_shutdown=3)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shut down cleanly, then re-raised the Ctrl-C: a normal stop
        pass
    finally:
        engine.close()
        sock.close()
    return 0
