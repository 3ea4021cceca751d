"""Dataset -> items to embed; captions batched by length (images are decoded by
:func:`xmodal.data.images.image_loader`)."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from xmodal.data.datasets import ImageTextDataset, TarMember
from xmodal.processing import MultimodalProcessor, check_caption


@dataclass(frozen=True)
class Item:
    """One thing to embed.

    id: the image id, or the caption's row index as a string.
    source: the ``source`` column (image path / tar member name, or the caption text).
    ref: what gets decoded (a path or TarMember) or tokenised (the caption).
    image_id: the caption's image (texts only).
    """

    id: str
    source: str
    ref: str | TarMember
    image_id: str | None = None


def image_items(dataset: ImageTextDataset) -> list[Item]:
    """Unique images, in first-seen order."""
    return [Item(ex.image_id, str(ex.image), ex.image) for ex in dataset.unique_images()]


def text_items(dataset: ImageTextDataset) -> list[Item]:
    """Every caption; its id is its row index."""
    return [Item(str(i), ex.caption, ex.caption, ex.image_id) for i, ex in enumerate(dataset)]


@dataclass
class TextBatch:
    positions: list[int]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


class TokenizedCaptions:
    """Captions tokenised once (template, truncation and special tokens as the processor does),
    kept as one flat id array; any subset pads to its own longest caption in a few numpy ops."""

    def __init__(self, captions: Sequence[str], processor: MultimodalProcessor):
        cfg = processor.config
        for i, caption in enumerate(captions):
            check_caption(caption, i)
        captions = processor.apply_template(captions)
        tokenizer = processor.tokenizer
        encoded = tokenizer(list(captions), truncation=True, max_length=cfg.max_length)["input_ids"]
        self.lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)
        self.ids = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int64)
        self.pad_id = tokenizer.pad_token_id or 0
        self.left = getattr(tokenizer, "padding_side", "right") == "left"
        # Models trained on fixed-length captions without a mask (SigLIP) see the padding.
        self.fixed = cfg.max_length if cfg.padding == "max_length" else None

    def batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` (len(rows), longest) of the captions ``rows``."""
        lengths = self.lengths[rows]
        width = self.fixed or int(lengths.max())
        steps = np.arange(width)[None, :]
        if self.left:
            steps = steps - (width - lengths)[:, None]
        mask = (steps >= 0) & (steps < lengths[:, None])
        index = np.clip(self.offsets[rows][:, None] + steps, 0, max(len(self.ids) - 1, 0))
        ids = np.where(mask, self.ids[index], self.pad_id)
        return torch.from_numpy(ids), torch.from_numpy(mask.astype(np.int64))


def text_batches(
    items: Sequence[Item],
    positions: Sequence[int],
    processor: MultimodalProcessor,
    batch_size: int,
) -> Iterator[TextBatch]:
    """Captions at ``positions``, sorted by token length into batches padded to their longest
    caption. Padding is masked, so this changes no embedding, only the time taken; a processor
    with ``padding: max_length`` (SigLIP, whose text tower sees the padding) pads to it."""
    tokens = TokenizedCaptions([items[p].source for p in positions], processor)
    order = np.argsort(tokens.lengths, kind="stable")
    where = np.asarray(positions, dtype=np.int64)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        input_ids, attention_mask = tokens.batch(rows)
        yield TextBatch(where[rows].tolist(), input_ids, attention_mask)


def items_fingerprint(items: Sequence[Item]) -> str:
    """Hash of the ids and sources: a re-run must see the same items in the same order."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(f"{item.id}\x00{item.source}\x01".encode())
    return digest.hexdigest()[:16]
