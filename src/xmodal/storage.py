"""Files named by a local path or by a URL (``s3://bucket/key``, ``memory://x``, ``file:///x``).

Local paths go through the operating system, exactly as before URLs were accepted; a
``proto://`` URL goes through `fsspec <https://filesystem-spec.readthedocs.io/>`_, whose
``url_to_fs`` picks the file system (``s3fs`` for ``s3://``, ``gcsfs`` for ``gs://`` ...: each
its own package). A location is a :class:`~pathlib.Path` or a ``str``; a URL stays a ``str``
(``Path`` would fold its ``//``), and :func:`join` keeps it one.

Writes on a URL are atomic as each file system allows (:func:`upload_atomic`): on the local file
system (``file://``) by a rename, on an object store by one put (an object appears whole when
its upload completes), elsewhere by a temporary name moved into place.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from xmodal.errors import InputError, MissingDependencyError, MissingFileError, OutputError

Location = str | Path
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
# Object stores: no rename, but an object is only visible once its upload has completed.
OBJECT_STORES = frozenset(
    {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oci", "oss", "r2", "tos"}
)


def is_url(location: Location) -> bool:
    """True for a ``proto://`` URL (a ``str``); a ``Path`` or a plain path string is local."""
    return isinstance(location, str) and _URL.match(location) is not None


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec file system of ``url`` and the path within it. A protocol whose package is
    missing raises MissingDependencyError naming it (``pip install s3fs`` ...)."""
    import fsspec  # a dependency of xmodal (and of torch)

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as err:
        raise MissingDependencyError(f"{url}: {err}") from err
    except ValueError as err:  # an unknown protocol
        raise InputError(f"{url}: {err}") from err


def local_path(location: Location) -> Path | None:
    """The local path of ``location`` (a path, or a ``file://`` URL); None for other URLs."""
    if not is_url(location):
        return Path(location)
    fs, path = filesystem(str(location))
    return Path(path) if _is_local(fs) else None


def _is_local(fs: Any) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def _protocol(fs: Any) -> str:
    protocol = fs.protocol
    return protocol if isinstance(protocol, str) else protocol[0]


def join(base: Location, *names: str) -> Location:
    """``base / name / ...``: a Path for a local base, a URL string for a URL."""
    if not is_url(base):
        return Path(base, *names)
    return "/".join([str(base).rstrip("/"), *(n.strip("/") for n in names)])


def name_of(location: Location) -> str:
    """The last component of ``location`` (``data.jsonl``)."""
    if not is_url(location):
        return Path(location).name
    return posixpath.basename(str(location).rstrip("/"))


def parent_of(location: Location) -> Location:
    """The folder holding ``location``."""
    if not is_url(location):
        return Path(location).parent
    head, _, _ = str(location).rstrip("/").rpartition("/")
    return head


def resolve_in(base: Location, relative: str) -> Location:
    """``relative`` (a path, or a URL kept as it is) resolved against the folder ``base``."""
    if is_url(relative) or not is_url(base):
        return relative if is_url(relative) else Path(os.path.abspath(Path(base) / relative))
    protocol, _, path = str(base).partition("://")
    return f"{protocol}://{posixpath.normpath(posixpath.join(path, relative))}"


def display(location: Location) -> str:
    """``location`` as the outputs record it: an absolute path, or the URL as given."""
    return str(location) if is_url(location) else os.path.abspath(location)


# -- reading ------------------------------------------------------------------------------------
def exists(location: Location) -> bool:
    if not is_url(location):
        return Path(location).exists()
    fs, path = filesystem(str(location))
    return bool(fs.exists(path))


def is_dir(location: Location) -> bool:
    if not is_url(location):
        return Path(location).is_dir()
    fs, path = filesystem(str(location))
    return bool(fs.isdir(path))


def is_file(location: Location) -> bool:
    if not is_url(location):
        return Path(location).is_file()
    fs, path = filesystem(str(location))
    return bool(fs.isfile(path))


def glob(folder: Location, pattern: str) -> list[Location]:
    """The entries of ``folder`` matching ``pattern`` (``*.tar``), sorted."""
    if not is_url(folder):
        return sorted(Path(folder).glob(pattern))
    fs, path = filesystem(str(folder))
    found = sorted(fs.glob(posixpath.join(path.rstrip("/"), pattern)))
    return [join(folder, posixpath.basename(p)) for p in found]


@contextlib.contextmanager
def open_input(location: Location) -> Iterator[IO[bytes]]:
    """``location`` opened for reading bytes (a stream: a URL is read as it is consumed)."""
    if not is_url(location):
        with open(location, "rb") as handle:
            yield handle
        return
    fs, path = filesystem(str(location))
    try:
        handle = fs.open(path, "rb")
    except FileNotFoundError:
        raise MissingFileError(f"not found: {location}") from None
    with handle:
        yield handle


def read_bytes(location: Location, start: int | None = None, end: int | None = None) -> bytes:
    """The bytes of ``location`` (``[start, end)`` only, with one ranged read on a URL)."""
    if not is_url(location):
        with open(location, "rb") as handle:
            handle.seek(start or 0)
            return handle.read() if end is None else handle.read(end - (start or 0))
    fs, path = filesystem(str(location))
    return bytes(fs.cat_file(path, start=start, end=end))


class FileIndex:
    """Which files exist under URL folders, one listing per folder (not one request per file):
    what a dataset's rows are checked against, as local rows are against the disk."""

    def __init__(self) -> None:
        self.listed: dict[tuple[str, str], set[str]] = {}

    def has(self, url: str) -> bool:
        fs, path = filesystem(url)
        folder = posixpath.dirname(path)
        key = (_protocol(fs), folder)
        if key not in self.listed:
            try:
                entries = fs.ls(folder, detail=True)
            except (FileNotFoundError, NotADirectoryError):
                entries = []
            self.listed[key] = {e["name"].rstrip("/") for e in entries if e.get("type") == "file"}
        return path.rstrip("/") in self.listed[key]


# -- brace patterns -----------------------------------------------------------------------------
_BRACES = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")


def expand_braces(pattern: str) -> list[str]:
    """WebDataset's shard patterns: ``x-{000..002}.tar`` -> ``x-000.tar`` ... ``x-002.tar``
    (zero-padded as written), ``{a,b}`` -> ``a``, ``b``; several braces multiply."""
    match = _BRACES.search(pattern)
    if match is None:
        return [pattern]
    inner = match.group(1)
    numbers = _RANGE.match(inner)
    if numbers:
        low, high = numbers.groups()
        width = len(low) if low.startswith("0") or len(low) == len(high) else 0
        choices = [str(i).zfill(width) for i in range(int(low), int(high) + 1)]
    else:
        choices = inner.split(",")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [expanded for c in choices for expanded in expand_braces(head + c + tail)]


# -- writing ------------------------------------------------------------------------------------
def _output_error(url: Location, err: BaseException) -> OutputError:
    reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return OutputError(f"cannot write {url}: {reason}")


def make_dirs(url: str) -> None:
    """Create the folder ``url`` (nothing on an object store, where folders are key prefixes)."""
    fs, path = filesystem(url)
    try:
        fs.makedirs(path, exist_ok=True)
    except Exception as err:  # noqa: BLE001 - each file system raises its own kinds
        raise _output_error(url, err) from err


def upload_atomic(local_file: Path, url: str) -> None:
    """Copy the finished ``local_file`` to ``url`` so that a reader sees the old file or the
    new one, never a part: one put on an object store, else a temporary name moved over it."""
    fs, path = filesystem(url)
    try:
        if _protocol(fs) in OBJECT_STORES:
            fs.put_file(str(local_file), path)
            return
        folder, _, name = path.rpartition("/")
        temporary = f"{folder}/.{name}.{uuid.uuid4().hex[:8]}.tmp"
        fs.put_file(str(local_file), temporary)
        try:
            fs.mv(temporary, path)
        finally:
            if fs.exists(temporary):
                fs.rm(temporary)
    except OutputError:
        raise
    except Exception as err:  # noqa: BLE001 - each file system raises its own kinds
        raise _output_error(url, err) from err


def remove(location: Location, recursive: bool = False) -> None:
    """Delete ``location`` when it is there (a folder and its contents with ``recursive``)."""
    if not is_url(location):
        path = Path(location)
        if recursive:
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        return
    fs, path = filesystem(str(location))
    try:
        if fs.exists(path):
            fs.rm(path, recursive=recursive)
    except FileNotFoundError:
        pass
