"""What the service shows of an index's entries: dataset-relative names, not server paths.

Shards store each image's absolute path (``source``; also its ``id`` when the dataset gave no
``image_id``), and a caption index stores its image's id. Over HTTP those become paths relative
to the folder of the dataset they were extracted from (the ``data`` of the shards' manifest), so
that a client learns nothing of the server's file system. ``xmodal serve --expose-sources``
shows them as stored.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from xmodal.extract.writer import load_manifest
from xmodal.index import SearchIndex


class PublicNames:
    """Per index position: the id, source and image id a client sees; public id -> position."""

    def __init__(self, index: SearchIndex, expose: bool = False):
        self.expose = expose
        if expose:
            self.ids, self.sources = list(index.ids), list(index.sources)
            self.image_ids = list(index.image_ids) if index.modality == "texts" else []
        else:
            roots = dataset_roots(index)
            self.ids = [relative(v, r) for v, r in zip(index.ids, roots, strict=True)]
            self.sources = (
                [relative(v, r) for v, r in zip(index.sources, roots, strict=True)]
                if index.modality == "images"
                else list(index.sources)  # captions
            )
            self.image_ids = (
                [relative(v, r) if v else v for v, r in zip(index.image_ids, roots, strict=True)]
                if index.modality == "texts"
                else []
            )
        self._positions: dict[str, int] = {}
        for position, item_id in enumerate(self.ids):
            self._positions.setdefault(item_id, position)

    def position(self, public_id: str) -> int | None:
        """The index position of the entry shown as ``public_id`` (None when there is none)."""
        return self._positions.get(public_id)

    def result(self, result: dict[str, Any], position: int) -> dict[str, Any]:
        """A search result with its id, source and image id as the client may see them."""
        shown = {**result, "id": self.ids[position], "source": self.sources[position]}
        if self.image_ids:
            shown["image_id"] = self.image_ids[position]
        return shown

    def model_id(self, model_id: str) -> str:
        """A model directory is shown by its name only (after its prefix: ``hf:/x/clip`` ->
        ``hf:clip``); a preset or hub id as it is."""
        if self.expose:
            return model_id
        if os.path.isabs(model_id):
            return Path(model_id).name
        prefix, colon, rest = model_id.partition(":")
        return f"{prefix}:{Path(rest).name}" if colon and os.path.isabs(rest) else model_id


def relative(value: str, root: str | None) -> str:
    """``value`` relative to ``root`` when it is an absolute path (its file name when no root is
    known); anything else (an image id, a tar member ``shard.tar:name``) as it is."""
    if not os.path.isabs(value):
        return value
    if root is None:
        return Path(value).name
    prefix = root.rstrip(os.sep) + os.sep
    if value.startswith(prefix) and os.sep == "/":  # the common case, without relpath's cost
        return value[len(prefix) :]
    try:
        return Path(os.path.relpath(value, root)).as_posix()
    except ValueError:  # another drive (Windows)
        return Path(value).name


def dataset_roots(index: SearchIndex) -> list[str | None]:
    """Per index position, the folder of the dataset its shard was extracted from.

    Read from the manifests of the shard folders the index was built from. When a manifest is
    gone, or an image lies outside its dataset's folder (a dataset file listing absolute paths
    elsewhere: relative to the dataset, its name would climb the server's folders with ``..``),
    the deepest folder holding all such images stands in for it."""
    roots: list[str | None] = []
    manifests: dict[str, str | None] = {}
    for entry in index.info.get("shards", []):
        directory = entry["dir"]
        if directory not in manifests:
            manifests[directory] = _manifest_root(directory)
        roots += [manifests[directory]] * entry["rows"]
    if len(roots) != index.count:  # an index description without per-shard rows
        roots = [None] * index.count
    missing = [
        p for p, root in enumerate(roots) if root is None or not _inside(_path_of(index, p), root)
    ]
    if missing:
        fallback = _common_folder([_path_of(index, p) for p in missing])
        for position in missing:
            roots[position] = fallback
    return roots


def _manifest_root(directory: str) -> str | None:
    try:
        manifest = load_manifest(directory)
    except (OSError, ValueError):
        return None
    data = (manifest or {}).get("data")
    if not isinstance(data, str) or not os.path.isabs(data):
        return None
    return data if Path(data).is_dir() else str(Path(data).parent)


def _path_of(index: SearchIndex, position: int) -> str | None:
    """The absolute image path an entry names (its source for images, its image id for
    captions), if any."""
    value = index.sources[position] if index.modality == "images" else index.image_ids[position]
    return value if value and os.path.isabs(value) else None


def _inside(path: str | None, root: str) -> bool:
    """Whether ``path`` (when it is one) lies under the folder ``root``."""
    return path is None or path.startswith(root.rstrip(os.sep) + os.sep)


def _common_folder(paths: list[str | None]) -> str | None:
    folders = {os.path.dirname(p) for p in paths if p}
    if not folders:
        return None
    try:
        return os.path.commonpath(sorted(folders))
    except ValueError:  # paths on different drives
        return None
