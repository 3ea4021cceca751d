"""More captions per training emoji, from offline package data.

Each training image keeps its name as its first caption and gains, as further rows with the
same ``image_id``: its short names from ``emoji-datasource-google`` (``thumbsup`` ->
"thumbsup", ``flag-eg`` -> "flag eg"), its CLDR label and its keywords (CLDR annotations and
community tags) from ``emojibase-data`` (``en/data.json``). A skin-tone variant's extra
captions end with its tone, as its name does. Only training rows are enriched: validation and
test keep one caption, the name, so their figures stay comparable.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

from xmodal.errors import InputError

KEYWORDS_PACKAGE = "emojibase-data@17.0.0"
KEYWORDS_TARBALL = "emojibase-data-17.0.0.tgz"
KEYWORDS_JSON = "package/en/data.json"
MAX_TAGS = 12


def read_keywords_tar(path: Path) -> dict[str, dict]:
    """emojibase ``en/data.json`` of a tarball as hexcode (upper case) -> entry (with label and
    tags); skin-tone variants map to their own entries."""
    try:
        with tarfile.open(path, mode="r:*") as tar:
            member = tar.extractfile(KEYWORDS_JSON)
            data = json.loads(member.read().decode("utf-8")) if member else None
    except KeyError:
        data = None
    except (tarfile.TarError, OSError, EOFError, ValueError) as err:
        raise InputError(f"{path}: not a readable emojibase-data tarball ({err})") from None
    if not isinstance(data, list):
        raise InputError(f"{path}: not an emojibase-data tarball (no {KEYWORDS_JSON} list)")
    index: dict[str, dict] = {}
    for entry in data:
        if not isinstance(entry, dict) or "hexcode" not in entry:
            continue
        index[str(entry["hexcode"]).upper()] = entry
        for skin in entry.get("skins") or ():
            if isinstance(skin, dict) and "hexcode" in skin:
                index[str(skin["hexcode"]).upper()] = {"tags": entry.get("tags"), **skin}
    return index


def _lookup(keywords: dict[str, dict], entry: dict) -> dict | None:
    """The emojibase entry of an emoji-datasource entry: by code point sequence, its
    non-qualified form, or the sequence without variation selectors."""
    codes = [entry.get("unified"), entry.get("non_qualified")]
    codes.append(str(entry.get("unified") or "").replace("-FE0F", ""))
    for code in codes:
        if code and str(code).upper() in keywords:
            return keywords[str(code).upper()]
    return None


def _readable(short_name: str) -> str | None:
    text = " ".join(short_name.replace("_", " ").replace("-", " ").split()).lower()
    return text if any(c.isalpha() for c in text) else None


def extra_captions(entry: dict, keywords: dict[str, dict] | None) -> list[str]:
    """Further captions of a base emoji (not its name): short names, CLDR label, keywords."""
    found: list[str] = []
    for short in entry.get("short_names") or [entry.get("short_name")]:
        if isinstance(short, str) and (text := _readable(short)):
            found.append(text)
    match = _lookup(keywords, entry) if keywords else None
    if match:
        label = str(match.get("label") or "").strip().lower()
        if label:
            found.append(label)
        tags = [str(t).strip().lower() for t in match.get("tags") or () if str(t).strip()]
        if tags:
            found.append(", ".join(tags[:MAX_TAGS]))
    return found


def enrich_rows(rows: list[dict], extras: dict[str, list[str]]) -> list[dict]:
    """Each row, then one row per new caption of its image (``extras``: base name -> captions;
    a skin-tone variant's captions get its tone, the part of its caption after the name)."""
    out: list[dict] = []
    for row in rows:
        out.append(row)
        seen = {row["caption"].lower()}
        suffix = row["caption"][len(row["name"]) :] if row["caption"] != row["name"] else ""
        for caption in extras.get(row["name"], ()):
            text = caption + suffix
            if text.lower() in seen:
                continue
            seen.add(text.lower())
            out.append({**row, "caption": text})
    return out
