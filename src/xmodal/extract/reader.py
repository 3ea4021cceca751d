"""Dataset -> items to embed; images decoded in DataLoader workers, captions batched by length."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from xmodal.data.datasets import ImageTextDataset, TarMember
from xmodal.processing import ImageLoadError, MultimodalProcessor, check_caption


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


def default_workers(accelerated: bool = False) -> int:
    """Decode workers. On a CPU, a third of this process's cores (at least 1 on a multi-core
    machine, at most 4: the model needs the rest). With a GPU doing the model, decoding is the
    bottleneck: all of this process's cores but one (split between the ranks on this node)."""
    cores = (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if cores < 2:
        return 0
    if accelerated:
        return min(32, cores - 1)
    return max(1, min(4, cores // 3))


def model_threads(workers: int) -> int:
    """Torch threads beside ``workers`` decode workers: the cores the workers leave, unless that
    is under two thirds of them. On few cores decoding is light next to the model (EfficientNet-
    Lite0 at 224 px: ~1.5 ms of decode per ~15 ms of model per image), so sharing the cores beats
    halving the model's threads (measured on 2 cores: docs/performance.md)."""
    cores = (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    left = cores - workers
    return left if 3 * left >= 2 * cores else max(1, cores)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


class DecodedImages(Dataset):
    """Decode, resize and crop images to uint8 (S, S, 3) arrays; a failure yields its reason
    (a str) instead of raising. Normalising waits for the batch (:class:`ImageCollator`)."""

    def __init__(self, items: Sequence[Item], processor: MultimodalProcessor):
        self.items = items
        self.processor = processor

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, position: int) -> tuple[int, torch.Tensor | str]:
        try:
            image = self.processor.load_image(self.items[position].ref)
            crop = self.processor.image_transform.resize_crop(image)
            return position, torch.from_numpy(np.array(crop))  # a writable copy
        except ImageLoadError as err:
            return position, err.reason


@dataclass
class ImageBatch:
    positions: list[int]  # item positions of the rows of pixel_values
    pixel_values: torch.Tensor | None
    failures: list[tuple[int, str]]  # (item position, reason)


class ImageCollator:
    """Stacks a batch of uint8 crops and normalises it in one vectorised pass: the values of
    ``processor.process_image`` (to float rounding) for a fraction of the per-image cost.
    ``channels_last`` keeps the crops' pixel-major layout (a straight copy, and what conv towers
    run on) instead of transposing to planes."""

    def __init__(self, processor: MultimodalProcessor, channels_last: bool = False):
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        std = torch.tensor(processor.config.std, dtype=torch.float32).view(1, 3, 1, 1)
        mean = torch.tensor(processor.config.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.scale = 1.0 / (255.0 * std)
        self.shift = -mean / std

    def __call__(self, samples: list[tuple[int, torch.Tensor | str]]) -> ImageBatch:
        good = [(pos, px) for pos, px in samples if isinstance(px, torch.Tensor)]
        failures = [(pos, px) for pos, px in samples if isinstance(px, str)]
        pixels = None
        if good:
            crops = torch.stack([px for _, px in good])  # (B, S, S, 3) uint8
            shape = (crops.shape[0], 3, *crops.shape[1:3])
            pixels = torch.empty(shape, memory_format=self.memory_format)
            pixels.copy_(crops.permute(0, 3, 1, 2))  # cast (and transpose) in one pass
            pixels.mul_(self.scale).add_(self.shift)
        return ImageBatch([pos for pos, _ in good], pixels, failures)


def image_loader(
    items: Sequence[Item],
    processor: MultimodalProcessor,
    batches: list[list[int]],
    workers: int,
    channels_last: bool = False,
) -> DataLoader:
    """Batches of decoded images, in the order of ``batches`` (lists of item positions);
    ``channels_last`` for conv towers (see :class:`ImageCollator`)."""
    return DataLoader(
        DecodedImages(items, processor),
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=ImageCollator(processor, channels_last),
        worker_init_fn=_worker_init if workers else None,
        prefetch_factor=4 if workers else None,
    )


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
        if cfg.caption_template != "{}":
            captions = [cfg.caption_template.format(c) for c in captions]
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
