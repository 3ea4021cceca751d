"""The service's settings: a typed config validated like the others (``xmodal.config``)."""

from __future__ import annotations

import dataclasses
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
    max_upload_bytes: int = _setting(10 * 1024 * 1024, "largest image upload; larger -> 413")
    # a 300 kB PNG can declare 89 M pixels: far more time and memory to decode than its size
    max_image_pixels: int = _setting(
        40_000_000, "most pixels per uploaded image, read from its header; more -> 413"
    )
    max_text_chars: int = _setting(1000, "longest caption in characters; longer -> 422")
    max_batch: int = _setting(32, "most captions or images per /embed request; more -> 422")
    max_k: int = _setting(100, "largest k a search may ask for; larger -> 422")
    default_k: int = _setting(10, "k of a search that does not give one")
    max_refine: int = _setting(
        1000, "largest exact re-ranking shortlist (refine) a search may ask for; larger -> 422"
    )
    max_concurrency: int = _setting(4, "requests computing at once (model calls are serialised)")

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
    return from_dict(ServeSettings, values, "serve")
