"""Reordered captions: a caption's comma-separated list with two neighbouring items swapped.

Where the order of a list in a caption carries meaning ("kiss: woman, man: light skin tone,
dark skin tone" names the people and then their tones from left to right), the caption with
two items swapped describes another picture with the same words. A contrastive text embedding
barely tells the two apart (it pools the words), so such a caption is the hardest negative
there is for the ITM head, which reads the tokens in order and the image's grid (NegCLIP,
Yuksekgonul et al. 2023, trains on swapped captions for the same reason).

Clauses are delimited by ``:`` or ``;``; within a clause, items by commas. A caption without
two different neighbouring items has no reordering. Only use this where your captions' lists
are ordered: in "apples, pears" the swap means the same thing and would teach the head noise.
"""

from __future__ import annotations

import re

_CLAUSE = re.compile(r"([:;])")

__all__ = ["reorderings"]


def reorderings(caption: str) -> list[str]:
    """Every distinct caption made by swapping two neighbouring items of one comma-separated
    list of ``caption`` (other than ``caption`` itself), in order of position."""
    parts = _CLAUSE.split(caption)  # clauses at even positions, their delimiters between
    found: list[str] = []
    for c in range(0, len(parts), 2):
        items = parts[c].split(",")
        if len(items) < 2:
            continue
        for i in range(len(items) - 1):
            left, right = items[i], items[i + 1]
            if left.strip() == right.strip() or not left.strip() or not right.strip():
                continue
            swapped = list(items)
            # each item keeps the whitespace of the slot it moves into: "a, b" -> "b, a"
            swapped[i] = _in_slot(right, left)
            swapped[i + 1] = _in_slot(left, right)
            text = "".join([*parts[:c], ",".join(swapped), *parts[c + 1 :]])
            if text != caption and text not in found:
                found.append(text)
    return found


def _in_slot(item: str, slot: str) -> str:
    """``item``'s words with ``slot``'s leading and trailing whitespace."""
    lead = slot[: len(slot) - len(slot.lstrip())]
    trail = slot[len(slot.rstrip()) :]
    return lead + item.strip() + trail
