"""The flags of `pixtral-mlx serve` and their checks, all made before the (slow) model load.

Imports nothing heavy: `pixtral-mlx serve --help` loads neither MLX nor the web stack.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from pixtral_mlx.cli import DEFAULT_MODEL, add_context_arg, add_system_prompt_arg
from pixtral_mlx.config import DEFAULT_MAX_TOKENS, FAMILY_MAX_EDGE, MAX_EDGE

from .limits import BODY_TIMEOUT, HEADER_TIMEOUT, IMAGE_TIMEOUT, MAX_CONNECTIONS, QUEUE, SHUTDOWN_GRACE

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
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
        help=f"cap the longest image edge in pixels (≤ the model's image size: {MAX_EDGE} for Pixtral-12B, "
        f"{FAMILY_MAX_EDGE} for Mistral3); requests may ask for less with 'max_edge'",
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
        default=QUEUE,
        metavar="N",
        help=f"requests that may wait while one runs; more get HTTP 429 with Retry-After (default {QUEUE})",
    )
    p.add_argument(
        "--image-timeout",
        type=float,
        default=IMAGE_TIMEOUT,
        metavar="SECONDS",
        help=f"time for a whole image download from an http(s) URL (default {IMAGE_TIMEOUT:g})",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=MAX_CONNECTIONS,
        metavar="N",
        help=f"open connections at most; more are answered 503 and closed (default {MAX_CONNECTIONS})",
    )
    p.add_argument(
        "--header-timeout",
        type=float,
        default=HEADER_TIMEOUT,
        metavar="SECONDS",
        help=f"time for a request's headers; slower clients are dropped (default {HEADER_TIMEOUT:g})",
    )
    p.add_argument(
        "--body-timeout",
        type=float,
        default=BODY_TIMEOUT,
        metavar="SECONDS",
        help=f"time for a request's whole body; slower ones get HTTP 408 (default {BODY_TIMEOUT:g})",
    )
    p.add_argument(
        "--shutdown-grace",
        type=float,
        default=SHUTDOWN_GRACE,
        metavar="SECONDS",
        help="on SIGTERM or Ctrl-C, time running requests get to finish before they are stopped "
        f"(default {SHUTDOWN_GRACE:g})",
    )
    add_context_arg(p)
    add_system_prompt_arg(p)
    p.add_argument("--kv-bits", type=int, choices=[4, 8], help="quantize the shared KV cache to 4 or 8 bits")
    p.add_argument("--kv-group-size", type=int, default=64, help="group size of the quantized KV cache (default 64)")
    return p


def check(args: argparse.Namespace) -> None:
    """Every flag, before the (slow) model load; `PixtralError` names the flag."""
    from pixtral_mlx.cli import flag_message
    from pixtral_mlx.config import check_context_length, check_max_edge
    from pixtral_mlx.errors import ConfigError, PixtralError
    from pixtral_mlx.turn import Options

    try:
        check_max_edge(args.max_edge)
        check_context_length(args.context_length)
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
