"""The service's settings: a typed config validated like the others (``xmodal.config``)."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from xmodal.config import from_dict
from xmodal.errors import ConfigError

LogLevel = Literal["critical", "error", "warning", "info", "debug", "trace"]


def _setting(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ServeSettings:
    """Where the server listens, what it shows and the limits every request is checked against.

    ``xmodal serve`` has one option per field (``--max-upload-bytes`` ...), derived from the
    types here (see :func:`add_arguments`).
    """

    host: str = _setting("127.0.0.1", "address to listen on")
    port: int = _setting(8000, "port to listen on")
    log_level: LogLevel = _setting("info", "uvicorn's log level")
    expose_sources: bool = _setting(
        False,
        "show each hit's location as stored in the index (absolute paths on this server); "
        "by default hits name their dataset-relative location",
    )
    # -- access --------------------------------------------------------------------------------
    token: str = _setting(
        "",
        "bearer token every API request must send (Authorization: Bearer TOKEN); also read "
        "from XMODAL_TOKEN; empty: no token",
    )
    allowed_hosts: str = _setting(
        "",
        "comma-separated Host names the server answers (others -> 400; '*' any); default: the "
        "localhost names when bound to a loopback address, any host otherwise",
    )
    cors_origin: str = _setting(
        "", "comma-separated origins allowed to call the API from a browser (CORS); default none"
    )
    # -- work per request ----------------------------------------------------------------------
    max_upload_bytes: int = _setting(10 * 1024 * 1024, "largest image upload; larger -> 413")
    # a 300 kB PNG can declare 89 M pixels: far more time and memory to decode than its size
    max_image_pixels: int = _setting(
        40_000_000, "most pixels per uploaded image, read from its header; more -> 413"
    )
    max_request_pixels: int = _setting(
        16_000_000,
        "most pixels decoded for one request, all its uploaded images together; more -> 422",
    )
    max_text_chars: int = _setting(1000, "longest caption in characters; longer -> 422")
    max_batch: int = _setting(32, "most captions or images per /embed request; more -> 422")
    max_k: int = _setting(100, "largest k a search may ask for; larger -> 422")
    default_k: int = _setting(10, "k of a search that does not give one")
    max_refine: int = _setting(
        1000, "largest exact re-ranking shortlist (refine) a search may ask for; larger -> 422"
    )
    max_rerank: int = _setting(
        16,
        "most results a search may re-rank with the ITM head (rerank with k above it -> 422): "
        "each is an indexed image decoded and a pass of the fusion",
    )
    request_timeout: float = _setting(
        5.0,
        "seconds a request may wait and compute; past it the work stops and the answer is 503",
    )
    max_concurrency: int = _setting(4, "requests computing at once (model calls are serialised)")
    max_heavy_requests: int = _setting(
        2,
        "of those, requests that decode uploads or re-rank; the others (caption searches, "
        "thumbnails) never wait behind them",
    )
    # -- connections ---------------------------------------------------------------------------
    header_timeout: float = _setting(
        10.0, "seconds a client has to send a request's headers (slow clients are closed)"
    )
    body_timeout: float = _setting(30.0, "seconds a client has to send a request's body")
    keepalive_timeout: float = _setting(5.0, "seconds an idle keep-alive connection stays open")
    max_connections: int = _setting(200, "open connections at most; more are answered 503")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """ConfigError naming the setting when a value is out of range."""
        for name, hint in typing.get_type_hints(type(self)).items():
            value = getattr(self, name)
            if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"serve.{name} must be an integer, got {value!r}")
            if hint is int and name != "port" and value < 1:
                raise ConfigError(f"serve.{name} must be >= 1, got {value!r}")
            if hint is bool and not isinstance(value, bool):
                raise ConfigError(f"serve.{name} must be true or false, got {value!r}")
            if hint is float:
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise ConfigError(f"serve.{name} must be a number, got {value!r}")
                if not 0 < value < float("inf"):
                    raise ConfigError(f"serve.{name} must be > 0 seconds, got {value!r}")
            if hint is str and not isinstance(value, str):
                raise ConfigError(f"serve.{name} must be a string, got {value!r}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"serve.port must be in 0..65535, got {self.port!r}")
        if not 1 <= self.default_k <= self.max_k:
            raise ConfigError(
                f"serve.default_k must be in 1..max_k ({self.max_k}), got {self.default_k!r}"
            )
        choices = typing.get_args(LogLevel)
        if self.log_level not in choices:
            raise ConfigError(
                f"serve.log_level must be one of {list(choices)}, got {self.log_level!r}"
            )
        if not self.host:
            raise ConfigError("serve.host must not be empty")
        if self.max_heavy_requests > self.max_concurrency:
            raise ConfigError(
                f"serve.max_heavy_requests ({self.max_heavy_requests}) must be <= "
                f"max_concurrency ({self.max_concurrency})"
            )
        if self.token and (len(self.token) < 16 or not self.token.isprintable()):
            raise ConfigError(
                "serve.token must be at least 16 printable characters "
                "(e.g. python -c 'import secrets; print(secrets.token_urlsafe())')"
            )

    @property
    def hosts(self) -> list[str]:
        """The Host names answered: the setting, else the localhost names on a loopback
        address, else any (``["*"]``)."""
        given = [h.strip() for h in self.allowed_hosts.split(",") if h.strip()]
        if given:
            return given
        return list(LOCAL_NAMES) if is_loopback(self.host) else ["*"]

    @property
    def cors_origins(self) -> list[str]:
        return [o.strip() for o in self.cors_origin.split(",") if o.strip()]


LOCAL_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or name to bind to) is only reachable from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def add_arguments(parser: Any) -> None:
    """One command-line option per setting: its type, default, help and (for a Literal) its
    choices come from :class:`ServeSettings`."""
    hints = typing.get_type_hints(ServeSettings)
    for item in dataclasses.fields(ServeSettings):
        flag = "--" + item.name.replace("_", "-")
        hint, help_text = hints[item.name], item.metadata["help"]
        if hint is bool:
            parser.add_argument(flag, action="store_true", help=help_text)
            continue
        kwargs: dict[str, Any] = {
            "default": item.default,
            "help": f"{help_text} (default {item.default})",
        }
        if typing.get_origin(hint) is Literal:
            kwargs["choices"] = typing.get_args(hint)
        else:
            kwargs["type"] = hint
        parser.add_argument(flag, **kwargs)


def from_arguments(args: Any) -> ServeSettings:
    """The settings given on the command line, validated (ConfigError naming the option)."""
    values = {item.name: getattr(args, item.name) for item in dataclasses.fields(ServeSettings)}
    if not values["token"]:
        values["token"] = os.environ.get(TOKEN_VARIABLE, "")
    return from_dict(ServeSettings, values, "serve")


TOKEN_VARIABLE = "XMODAL_TOKEN"
