"""Every error the service can meet, as an HTTP status and a one-line detail naming no path.

:data:`ERROR_STATUS` gives each :class:`~xmodal.errors.XmodalError` class its status (a test
walks every subclass through :func:`error_response`). A detail never names a server path: an
indexed image is named by its public id, a damaged index by its folder's name, and any other
absolute path left in a message is cut to its last part.
"""

from __future__ import annotations

import re

from xmodal.errors import (
    BadRowError,
    CancelledWorkError,
    CaptionError,
    ConfigError,
    DeadlineError,
    ExportError,
    ExtractError,
    ImageLoadError,
    IncompatibleError,
    IndexBuildError,
    IndexDamagedError,
    InputError,
    LimitError,
    MissingDependencyError,
    MissingFileError,
    ModelLoadError,
    OutputError,
    RecallTargetError,
    XmodalError,
)
from xmodal.search import IndexedImageError
from xmodal.serve.public import PublicNames

CLIENT_CLOSED = 499  # nginx's code for a client that went away before the answer

# The status of each kind of error, most specific first (the first that matches is used).
ERROR_STATUS: tuple[tuple[type[XmodalError], int], ...] = (
    (ImageLoadError, 400),  # an upload that is not an image
    (LimitError, 422),  # a request over one of the server's limits
    (CaptionError, 422),  # a caption without text
    (BadRowError, 422),
    (InputError, 422),  # re-ranking the wrong pair of modalities, a bad parameter
    (IncompatibleError, 409),
    (MissingFileError, 404),
    (DeadlineError, 503),  # past the request's deadline: the work stopped
    (CancelledWorkError, CLIENT_CLOSED),
    (IndexDamagedError, 503),  # an index file changed on disk under the server
    (IndexedImageError, 500),  # see error_response: 404 when gone
    (RecallTargetError, 500),  # an index build refused (not met while serving)
    (IndexBuildError, 503),  # an index the server cannot read (any more)
    (ConfigError, 500),
    (ModelLoadError, 500),
    (ExtractError, 500),
    (ExportError, 500),
    (MissingDependencyError, 500),
    (OutputError, 500),
    (XmodalError, 500),
)
# an absolute path (POSIX or Windows) up to its last part
_PATH = re.compile(r"(?<![\w.:/])(?:/|[A-Za-z]:\\)(?:[^\s'\"(),:;/\\]+[/\\])*([^\s'\"(),:;/\\]*)")


def without_paths(text: str) -> str:
    """``text`` with every absolute path cut to its last part (``/srv/idx/ids.parquet`` ->
    ``ids.parquet``)."""
    return _PATH.sub(lambda match: match.group(1) or "<path>", text)


def status_of(err: XmodalError) -> int:
    return next(code for kind, code in ERROR_STATUS if isinstance(err, kind))


def error_response(err: XmodalError, names: PublicNames) -> tuple[int, str]:
    """Status and one-line detail of an error; an indexed image is named by its public id,
    never by where it lives on the server."""
    if isinstance(err, IndexedImageError):
        shown = names.public_id(err.position)
        detail = str(err) if names.expose else f"image {shown!r} {err.reason}"
        return (404 if err.gone else 500), detail
    if isinstance(err, IndexDamagedError):
        return 503, str(err) if names.expose else (err.public or without_paths(str(err)))
    detail = str(err) if names.expose else without_paths(str(err))
    if isinstance(err, IndexBuildError):
        detail = f"the index cannot be read: {detail}"
    return status_of(err), detail
