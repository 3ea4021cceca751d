"""HTTP search service: ``create_app`` builds the FastAPI app, ``serve`` runs it with uvicorn."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from xmodal.serve.settings import ServeSettings

if TYPE_CHECKING:
    from xmodal.serve.app import create_app

__all__ = ["ServeSettings", "create_app", "serve"]


def __getattr__(name: str) -> Any:
    if name == "create_app":  # FastAPI is imported only when an app is built
        from xmodal.serve.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def serve(
    index_dir: str | Path | list[str | Path],
    model: str | Path,
    settings: ServeSettings | None = None,
) -> None:
    """Load the index (one folder, a sharded index or several folders searched as one) and the
    model, check they belong together, and serve until stopped."""
    from xmodal.search import open_searcher
    from xmodal.serve.app import create_app
    from xmodal.serve.server import run

    settings = settings or ServeSettings()
    run(create_app(open_searcher(index_dir, model), settings), settings)
