"""Dataset -> items to embed; images decoded in DataLoader workers, captions batched by length."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from xmodal.data.datasets import ImageTextDataset, TarMember
from xmodal.processing import ImageLoadError, MultimodalProcessor


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


def location(ref: str | TarMember) -> str:
    """Where an image lives: an absolute path, or a JSON object for a member of a tar shard."""
    if isinstance(ref, TarMember):
        member = {"tar": ref.tar_path, "name": ref.name, "offset": ref.offset, "size": ref.size}
        return json.dumps(member, sort_keys=True)
    return os.path.abspath(ref)


def image_ref(loc: str) -> str | TarMember:
    """Inverse of :func:`location`."""
    if loc.startswith("{"):
        member = json.loads(loc)
        return TarMember(member["tar"], member["name"], member["offset"], member["size"])
    return loc


def default_workers() -> int:
    """Decode workers: a third of the cores (at least 1 on a multi-core machine, at most 4)."""
    cores = os.cpu_count() or 1
    return 0 if cores < 2 else max(1, min(4, cores // 3))


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


class DecodedImages(Dataset):
    """Decode and transform images; a failure yields its reason (a str) instead of raising."""

    def __init__(self, items: Sequence[Item], processor: MultimodalProcessor):
        self.items = items
        self.processor = processor

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, position: int) -> tuple[int, torch.Tensor | str]:
        try:
            return position, self.processor.process_image(self.items[position].ref)
        except ImageLoadError as err:
            return position, err.reason


@dataclass
class ImageBatch:
    positions: list[int]  # item positions of the rows of pixel_values
    pixel_values: torch.Tensor | None
    failures: list[tuple[int, str]]  # (item position, reason)


def collate_images(samples: list[tuple[int, torch.Tensor | str]]) -> ImageBatch:
    good = [(pos, px) for pos, px in samples if isinstance(px, torch.Tensor)]
    failures = [(pos, px) for pos, px in samples if isinstance(px, str)]
    pixels = torch.stack([px for _, px in good]) if good else None
    return ImageBatch([pos for pos, _ in good], pixels, failures)


def image_loader(
    items: Sequence[Item],
    processor: MultimodalProcessor,
    batches: list[list[int]],
    workers: int,
) -> DataLoader:
    """Batches of decoded images, in the order of ``batches`` (lists of item positions)."""
    return DataLoader(
        DecodedImages(items, processor),
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=collate_images,
        worker_init_fn=_worker_init if workers else None,
        prefetch_factor=4 if workers else None,
    )


@dataclass
class TextBatch:
    positions: list[int]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


def token_lengths(captions: Sequence[str], processor: MultimodalProcessor) -> list[int]:
    cfg = processor.config
    encoded = processor.tokenizer(list(captions), truncation=True, max_length=cfg.max_length)
    return [len(ids) for ids in encoded["input_ids"]]


def text_batches(
    items: Sequence[Item],
    positions: Sequence[int],
    processor: MultimodalProcessor,
    batch_size: int,
) -> Iterator[TextBatch]:
    """Captions at ``positions``, sorted by token length into batches (little padding)."""
    captions = [items[p].source for p in positions]
    lengths = token_lengths(captions, processor)
    order = sorted(range(len(captions)), key=lambda i: (lengths[i], i))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        encoded = processor.process_text([captions[i] for i in chunk])
        yield TextBatch(
            [positions[i] for i in chunk], encoded["input_ids"], encoded["attention_mask"]
        )


def items_fingerprint(items: Sequence[Item]) -> str:
    """Hash of the ids and sources: a re-run must see the same items in the same order."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(f"{item.id}\x00{item.source}\x01".encode())
    return digest.hexdigest()[:16]
