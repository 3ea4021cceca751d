"""``index.json``: what an index folder holds (kind, parameters, model identity, files)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from xmodal.config import load_json_config
from xmodal.errors import IndexBuildError

INDEX_JSON = "index.json"
INDEX_FORMAT = "xmodal.index/1"


def read_info(directory: str | Path) -> dict[str, Any] | None:
    """The description of the index in ``directory`` (None when there is none)."""
    path = Path(directory) / INDEX_JSON
    if not path.is_file():
        return None
    info = load_json_config(path, "index description", IndexBuildError, INDEX_FORMAT)
    if "modality" not in info and "what" in info:  # written before the key was renamed
        info["modality"] = info.pop("what")
    return info
