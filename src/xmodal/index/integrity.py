"""The files an open index keeps reading, watched for changes on disk.

A memory-mapped file (inverted lists, stored vectors) truncated in place kills the process with
SIGBUS at the next read of a page past its new end; an ids file replaced under a running server
would name the wrong items. :class:`FileWatch` records each such file's size, inode and
modification time when the index is opened and checks them (one ``stat`` a file) before every
search: any change is an :class:`~xmodal.errors.IndexDamagedError` instead of a crash.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from xmodal.errors import IndexDamagedError


@dataclass(frozen=True)
class FileState:
    size: int
    inode: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> FileState:
        info = os.stat(path)
        return cls(info.st_size, info.st_ino, info.st_mtime_ns)


class FileWatch:
    """Files of one index and their state when it was opened; :meth:`check` raises when
    one of them has changed since."""

    def __init__(self, name: str, paths: list[Path]):
        self.name = name
        self.states = {path: FileState.of(path) for path in paths}

    def check(self) -> None:
        for path, state in self.states.items():
            try:
                now = FileState.of(path)
            except OSError:
                self._fail(path, "is gone")
            if now.size < state.size:
                self._fail(path, f"was truncated ({now.size:,} of {state.size:,} bytes)")
            if now != state:
                self._fail(path, "was replaced or modified")

    def _fail(self, path: Path, what: str) -> None:
        public = (
            f"index {self.name!r} is damaged: its file {path.name} {what} since the index was "
            "opened; rebuild it and restart"
        )
        raise IndexDamagedError(f"{path} {what} since the index was opened", public)
