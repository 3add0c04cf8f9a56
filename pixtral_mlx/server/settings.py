"""What one server is set up with: the model's names, who may call it, where images may come from, its bounds."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pixtral_mlx.fetch import FetchPolicy
from pixtral_mlx.images import MAX_REQUEST_PIXELS
from pixtral_mlx.turn import Options

from .limits import BODY_TIMEOUT, IMAGE_TIMEOUT, MAX_BODY_BYTES


@dataclass
class Settings:
    model_id: str
    aliases: tuple[str, ...] = ()  # other names a request may use for the model (the --model argument)
    api_key: str | None = None
    allowed_origins: list[str] = field(default_factory=list)
    local_dirs: list[Path] = field(default_factory=list)  # resolved folders local images may come from
    max_edge: int | None = None  # default and upper bound of a request's max_edge
    defaults: Options = field(default_factory=Options)
    image_timeout: float = IMAGE_TIMEOUT
    max_body: int = MAX_BODY_BYTES
    context_length: int = 0
    body_timeout: float = BODY_TIMEOUT
    allowed_hosts: list[str] = field(default_factory=list)  # more names for this server in `Host` ('*': any)
    listen_host: str | None = None  # --host; None: judged by the address each connection came to
    fetch_policy: FetchPolicy = FetchPolicy.server()  # public addresses only (--allow-private-urls, ...)
    max_request_pixels: int | None = MAX_REQUEST_PIXELS  # decoded pixels of all a request's images (None: no limit)
