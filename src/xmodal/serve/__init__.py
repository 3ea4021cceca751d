"""HTTP search service: ``create_app`` builds the FastAPI app, ``serve`` runs it with uvicorn."""

from xmodal.serve.app import create_app
from xmodal.serve.payloads import ServeSettings

__all__ = ["ServeSettings", "create_app", "serve"]


def serve(index_dir: str, model: str, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Load the index and the model, check they belong together, and serve until stopped."""
    import uvicorn

    from xmodal.search import open_searcher

    searcher = open_searcher(index_dir, model)
    app = create_app(searcher.model, searcher.processor, searcher.index)
    uvicorn.run(app, host=host, port=port, log_level="info")
