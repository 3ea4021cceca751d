"""Atomic file writes: write to a temporary file beside the target, fsync, then rename.

A crash (even ``kill -9``) leaves either the old file or the new one under the final name,
never a half-written file. A target given as a URL (:mod:`xmodal.storage`) is written to a
local temporary file first, then uploaded as one object or moved into place
(:func:`xmodal.storage.upload_atomic`); a ``file://`` URL is its local path. A folder that
cannot be created or written (no permission, a full disk, a file in the way) raises
:class:`~xmodal.errors.OutputError` naming the path; errors raised by the caller's own code
inside the ``with`` block pass through unchanged.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from xmodal import storage
from xmodal.errors import OutputError
from xmodal.storage import Location


def make_dir(path: Location) -> Location:
    """Create ``path`` and its parents (if missing); OutputError naming it when that fails."""
    local = storage.local_path(path)
    if local is None:
        storage.make_dirs(str(path))
        return path
    path = local
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create output folder {path}: {_reason(err)}") from err
    return path


def _reason(err: OSError) -> str:
    return err.strerror or str(err)


# A full disk, a full quota, a file past the file system's size limit, a read-only file system
SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)
_SPACE_WORDS = ("no space left", "disk quota exceeded", "file too large", "read-only file system")


def is_out_of_space(err: BaseException) -> bool:
    """Whether ``err`` (an OSError, or a library's error that wraps one in its text, as
    pyarrow's, FAISS's and safetensors' do) says the output cannot take more bytes."""
    if isinstance(err, OSError) and err.errno in SPACE_ERRNOS:
        return True
    text = str(err).lower()
    return any(word in text for word in _SPACE_WORDS)


def space_reason(err: BaseException) -> str:
    """The few words of an out-of-space error (no traceback, no library prefix)."""
    if isinstance(err, OSError) and err.errno in SPACE_ERRNOS:
        return os.strerror(err.errno)
    text = str(err).lower()
    return next((w for w in _SPACE_WORDS if w in text), "no space left").capitalize()


@contextlib.contextmanager
def atomic_path(path: Location) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.
    For a URL the temporary file is local, and uploaded atomically on success."""
    local = storage.local_path(path)
    if local is None:
        with _remote_target(str(path)) as tmp:
            yield tmp
        return
    path = local
    make_dir(path.parent)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise OutputError(f"cannot write {path}: {_reason(err)}") from err
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            yield tmp
        except Exception as err:  # the caller's write into tmp met a full disk
            if is_out_of_space(err) and not isinstance(err, OutputError):
                raise OutputError(f"cannot write {path}: {space_reason(err)}") from err
            raise
        try:
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except OSError as err:
            raise OutputError(f"cannot write {path}: {_reason(err)}") from err
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def _remote_target(url: str) -> Iterator[Path]:
    """A local temporary file whose contents, once the block succeeds, become ``url``."""
    fd, tmp_name = tempfile.mkstemp(prefix=".xmodal-upload.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        storage.upload_atomic(tmp, url)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Location, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        try:
            tmp.write_bytes(data)
        except OSError as err:
            raise OutputError(f"cannot write {path}: {_reason(err)}") from err


def atomic_write_text(path: Location, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` as a whole."""
    path = Path(path)
    make_dir(path.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as err:
        raise OutputError(f"cannot write {path}: {_reason(err)}") from err
    try:
        try:
            yield tmp
        except Exception as err:
            if is_out_of_space(err) and not isinstance(err, OutputError):
                raise OutputError(f"cannot write {path}: {space_reason(err)}") from err
            raise
        _replace_dir(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _replace_dir(tmp: Path, path: Path) -> None:
    """Move the finished folder ``tmp`` to ``path`` (replacing it) and fsync the parent."""
    try:
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as err:
        raise OutputError(f"cannot write {path}: {_reason(err)}") from err
