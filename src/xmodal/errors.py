"""The errors xmodal raises for problems a user can fix: one family, one base class.

Everything here derives from :class:`XmodalError`. The command line prints such an error as one
line and exits with code 2; the service answers with the status its kind maps to
(``xmodal.serve.app.ERROR_STATUS``: 4xx for a request's input, 500 for the server's own data).
Any other exception is a bug in xmodal (or in a library under it) and keeps its traceback.

Each kind also derives from the built-in exception it refines (``ValueError`` for bad values,
``FileNotFoundError`` for missing files), so ``except ValueError`` keeps working for callers
that used it before the family existed.
"""

from __future__ import annotations


class XmodalError(Exception):
    """Base class of every error a user can act on (bad input, config, model, shards, index)."""


class ConfigError(XmodalError, ValueError):
    """A configuration value is unknown, of the wrong type or out of range."""


class ModelLoadError(XmodalError, ValueError):
    """A model name or directory cannot be turned into a model (unknown name, unsupported
    checkpoint, pickle-only weights, a missing optional library)."""


class MissingFileError(XmodalError, FileNotFoundError):
    """A file or directory the user named does not exist (or is not what it should be)."""


class InputError(XmodalError, ValueError):
    """One input item (an image, a caption, a dataset row) cannot be used."""


class ImageLoadError(InputError):
    """An image could not be read or decoded; the message names the input."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"cannot load image {source}: {reason}")
        self.source = source
        self.reason = reason

    def __reduce__(self):  # picklable across DataLoader workers
        return (type(self), (self.source, self.reason))


class CaptionError(InputError):
    """A caption is empty, whitespace only or not a string."""


class BadRowError(InputError):
    """A dataset row that cannot be used; the message names the file, line and reason."""


class IncompatibleError(XmodalError, ValueError):
    """Embeddings, an index or a model come from different models or preprocessing."""


class ExtractError(XmodalError, ValueError):
    """An extraction run's settings conflict with its output directory or are out of range."""


class IndexBuildError(XmodalError, ValueError):
    """Shards or an index directory cannot be used as asked."""


class ExportError(XmodalError, RuntimeError):
    """A model's towers cannot be exported (to ONNX) or their export does not match PyTorch;
    the message names the tower and the exporter's reason in one line."""


class RecallTargetError(IndexBuildError):
    """The index a build can make reaches less than its target recall (and less than what
    ``--accept-recall`` allows): nothing is written."""


class MissingDependencyError(XmodalError, ImportError):
    """A package a feature needs is not installed or cannot be obtained (an optional Python
    extra, a tower package, npm); the message says what to install."""


class OutputError(XmodalError, OSError):
    """An output file or folder cannot be written (no permission, a full disk, a file where a
    folder should be); the message names the path."""


class IndexDamagedError(IndexBuildError):
    """An index file changed on disk while the index was open (truncated, replaced or
    deleted): searching it could read past the end of a memory-mapped file. ``public`` says
    what happened naming files by their name only (a service may show it)."""

    def __init__(self, message: str, public: str = ""):
        super().__init__(message)
        self.public = public

    def __reduce__(self):
        return (type(self), (str(self), self.public))


class LimitError(InputError):
    """A request asks for more work than a configured limit allows; the message names it."""


class DeadlineError(XmodalError, TimeoutError):
    """Work stopped because it ran past its deadline."""


class CancelledWorkError(XmodalError):
    """Work stopped because whoever asked for it went away (a client that disconnected)."""
