"""Where an image of a dataset lives, as one string: a path, or a member of a tar shard.

Extraction stores these strings next to each image embedding; search and the service turn them
back into something :func:`xmodal.processing.load_image` reads.
"""

from __future__ import annotations

import json

from xmodal import storage
from xmodal.data.datasets import TarMember


def location(ref: str | TarMember) -> str:
    """Where an image lives: an absolute path or a URL, or a JSON object for a member of a tar
    shard (whose ``tar`` is one of those)."""
    if isinstance(ref, TarMember):
        member = {"tar": ref.tar_path, "name": ref.name, "offset": ref.offset, "size": ref.size}
        return json.dumps(member, sort_keys=True)
    return storage.display(ref)


def image_ref(loc: str) -> str | TarMember:
    """Inverse of :func:`location`."""
    if loc.startswith("{"):
        member = json.loads(loc)
        return TarMember(member["tar"], member["name"], member["offset"], member["size"])
    return loc
