"""Decoding a dataset's images in DataLoader workers: the one image path of ``eval``, ``train``
and ``extract``.

A worker decodes, resizes and crops each image to uint8 pixels; a batch is normalised in one
vectorised pass in the collate function. An image that cannot be decoded never raises inside a
worker (where the exception would lose its type and come back as a traceback): it comes back as
its reason, and the caller decides (skip and record it, or raise :func:`image_error` naming the
file and the dataset row in the main process).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from xmodal.data.datasets import Example, ImageTextDataset
from xmodal.errors import ImageLoadError, InputError
from xmodal.processing import ImageInput, MultimodalProcessor


def worker_init(_: int) -> None:
    """Each decode worker runs single-threaded torch: the model needs the cores."""
    torch.set_num_threads(1)


def data_loader(dataset: Dataset, workers: int, seed: int = 0, **options: Any) -> DataLoader:
    """A DataLoader with xmodal's worker settings: single-threaded workers and a generator of
    its own (so iterating it leaves the global RNG untouched)."""
    return DataLoader(
        dataset,
        num_workers=workers,
        worker_init_fn=worker_init if workers else None,
        generator=torch.Generator().manual_seed(seed),
        **options,
    )


ImageChange = Callable[[str, Image.Image], Image.Image]
"""A seeded change of a decoded image, ``change(key, image)`` (:mod:`xmodal.data.augment`)."""


def decode_crop(
    processor: MultimodalProcessor,
    image: ImageInput,
    change: ImageChange | None = None,
    key: str = "",
) -> torch.Tensor | str:
    """Decode, resize and crop ``image`` to uint8 (S, S, 3); its reason (a str) on failure.
    ``change(key, image)`` is applied to the decoded image first (an augmentation)."""
    try:
        decoded = processor.load_image(image)
        if change is not None:
            decoded = change(key, decoded)
        crop = processor.image_transform.resize_crop(decoded)
        return torch.from_numpy(np.array(crop))  # a writable copy
    except ImageLoadError as err:
        return err.reason


class PixelNormaliser:
    """Stacks uint8 crops and normalises them in one vectorised pass: the values of
    ``processor.process_image`` (to float rounding) for a fraction of the per-image cost.
    ``channels_last`` keeps the crops' pixel-major layout (a straight copy, and what conv towers
    run on) instead of transposing to planes."""

    def __init__(self, processor: MultimodalProcessor, channels_last: bool = False):
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        std = torch.tensor(processor.config.std, dtype=torch.float32).view(1, 3, 1, 1)
        mean = torch.tensor(processor.config.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.scale = 1.0 / (255.0 * std)
        self.shift = -mean / std

    def __call__(self, crops: Sequence[torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack(list(crops))  # (B, S, S, 3) uint8
        shape = (stacked.shape[0], 3, *stacked.shape[1:3])
        pixels = torch.empty(shape, memory_format=self.memory_format)
        pixels.copy_(stacked.permute(0, 3, 1, 2))  # cast (and transpose) in one pass
        return pixels.mul_(self.scale).add_(self.shift)


class DecodedImages(Dataset):
    """Item i = (i, uint8 crop) of ``images[i]``, or (i, reason) when it cannot be decoded;
    with ``change``, the crop of ``change(keys[i], decoded image)``."""

    def __init__(
        self,
        images: Sequence[ImageInput],
        processor: MultimodalProcessor,
        change: ImageChange | None = None,
        keys: Sequence[str] | None = None,
    ):
        self.images = images
        self.processor = processor
        self.change = change
        self.keys = keys

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, position: int) -> tuple[int, torch.Tensor | str]:
        key = self.keys[position] if self.keys is not None else str(position)
        return position, decode_crop(self.processor, self.images[position], self.change, key)


@dataclass
class ImageBatch:
    positions: list[int]  # positions (in the image list) of the rows of pixel_values
    pixel_values: torch.Tensor | None  # None when no image of the batch could be decoded
    failures: list[tuple[int, str]]  # (position, reason)

    def pin_memory(self) -> ImageBatch:
        """The batch with its pixels in page-locked memory (DataLoader ``pin_memory``), so the
        copy to a GPU runs asynchronously."""
        pixels = None if self.pixel_values is None else self.pixel_values.pin_memory()
        return ImageBatch(self.positions, pixels, self.failures)


class ImageCollator:
    """Collates :class:`DecodedImages` items into an :class:`ImageBatch`."""

    def __init__(self, processor: MultimodalProcessor, channels_last: bool = False):
        self.normalise = PixelNormaliser(processor, channels_last)

    def __call__(self, samples: list[tuple[int, torch.Tensor | str]]) -> ImageBatch:
        good = [(pos, px) for pos, px in samples if isinstance(px, torch.Tensor)]
        failures = [(pos, px) for pos, px in samples if isinstance(px, str)]
        pixels = self.normalise([px for _, px in good]) if good else None
        return ImageBatch([pos for pos, _ in good], pixels, failures)


def image_loader(
    images: Sequence[ImageInput],
    processor: MultimodalProcessor,
    batches: list[list[int]],
    workers: int,
    channels_last: bool = False,
    pin_memory: bool = False,
    change: ImageChange | None = None,
    keys: Sequence[str] | None = None,
) -> DataLoader:
    """Decoded batches (:class:`ImageBatch`) of ``images``, in the order of ``batches`` (lists
    of positions); ``channels_last`` for conv towers (see :class:`PixelNormaliser`);
    ``pin_memory`` for a model on a GPU; ``change(keys[i], image)`` alters each decoded image
    (default key: its position)."""
    return data_loader(
        DecodedImages(images, processor, change, keys),
        workers,
        batch_sampler=batches,
        collate_fn=ImageCollator(processor, channels_last),
        prefetch_factor=4 if workers else None,
        pin_memory=pin_memory,
    )


def image_error(example: Example, reason: str) -> ImageLoadError:
    """The error for an undecodable image of a dataset: names the file and its (first) row."""
    where = f" (dataset row {example.origin})" if example.origin else ""
    return ImageLoadError(f"{example.image}{where}", reason)


def failure_record(example: Example, reason: str) -> dict[str, str]:
    """One undecodable image as recorded in a report or an ``errors.jsonl`` line."""
    return {
        "image_id": example.image_id,
        "source": str(example.image),
        "row": example.origin,
        "reason": reason,
    }


def drop_failed_images(
    dataset: ImageTextDataset, failures: dict[int, str], skip_bad: bool
) -> tuple[ImageTextDataset, list[dict[str, str]]]:
    """``dataset`` less the images that failed to decode (``failures``: position in
    ``dataset.unique_images()`` -> reason) and every row of them, with their records.

    Without ``skip_bad`` the first failure raises :func:`image_error`; when no image is left,
    :class:`InputError`.
    """
    if not failures:
        return dataset, []
    unique = dataset.unique_images()
    if not skip_bad:
        position = min(failures)
        raise image_error(unique[position], failures[position])
    records = [failure_record(unique[p], failures[p]) for p in sorted(failures)]
    kept = dataset.without_images(record["image_id"] for record in records)
    if not len(kept):
        first = records[0]
        raise InputError(
            f"no image of {dataset.source or 'the dataset'} could be decoded "
            f"(first: {first['source']}: {first['reason']})"
        )
    return kept, records


class ThreadedImageBatches:
    """Decoded batches (:class:`ImageBatch`) of ``images`` in the order of ``batches``, decoded
    by ``threads`` threads of this process, up to ``ahead`` batches ahead of the consumer.

    For a model on few CPU cores this beats worker processes (docs/performance.md): Pillow
    releases the GIL while it decodes and resizes, each thread normalises its images straight
    into the batch tensor (numpy, also without the GIL), and no batch crosses a process
    boundary. ``threads=0`` decodes each batch in the consumer's thread when it is asked for;
    ``ahead=0`` decodes each batch with all ``threads`` when it is asked for, so decoding and
    the model take turns on the cores instead of competing for them (on few cores a model's
    parallel ops wait for any thread a decoder delays). Pixels equal :class:`ImageCollator`'s
    (the same float32 operations).
    """

    def __init__(
        self,
        images: Sequence[ImageInput],
        processor: MultimodalProcessor,
        batches: Sequence[Sequence[int]],
        threads: int,
        channels_last: bool = False,
        ahead: int = 1,
    ):
        self.images, self.processor, self.batches = images, processor, batches
        self.threads, self.ahead = max(0, threads), max(0, ahead)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        cfg = processor.config
        std = np.asarray(cfg.std, dtype=np.float32)
        mean = np.asarray(cfg.mean, dtype=np.float32)
        # The values of PixelNormaliser: x * (1 / (255 std)) + (-mean / std), in float32.
        self.scale = (1.0 / (255.0 * torch.from_numpy(std))).numpy().reshape(3, 1, 1)
        self.shift = (-torch.from_numpy(mean) / torch.from_numpy(std)).numpy().reshape(3, 1, 1)

    def __len__(self) -> int:
        return len(self.batches)

    def _decode_rows(self, pixels: np.ndarray, rows: Sequence[tuple[int, int]]) -> list:
        """Decode ``(row, position)`` pairs into ``pixels[row]``; returns the failures."""
        failures = []
        for row, position in rows:
            crop = decode_crop(self.processor, self.images[position])
            if isinstance(crop, str):
                failures.append((row, position, crop))
                continue
            planes = crop.numpy().transpose(2, 0, 1)
            np.multiply(planes, self.scale, out=pixels[row], casting="unsafe")
            np.add(pixels[row], self.shift, out=pixels[row])
        return failures

    def _start(self, pool: ThreadPoolExecutor | None, positions: Sequence[int]):
        size = self.processor.config.image_size
        pixels = torch.empty((len(positions), 3, size, size), memory_format=self.memory_format)
        rows = list(enumerate(positions))
        if pool is None:
            return positions, pixels, [self._decode_rows(pixels.numpy(), rows)]
        # Decoding ahead, a thread per share of the batch; taking turns with the model, smaller
        # shares balance the threads (the model waits for the last one).
        parts = self.threads if self.ahead else 4 * self.threads
        chunks = [rows[i::parts] for i in range(min(parts, len(rows)))]
        jobs = [pool.submit(self._decode_rows, pixels.numpy(), chunk) for chunk in chunks]
        return positions, pixels, jobs

    @staticmethod
    def _finish(positions: Sequence[int], pixels: torch.Tensor, jobs: list) -> ImageBatch:
        failed = [f for job in jobs for f in (job.result() if isinstance(job, Future) else job)]
        if not failed:
            return ImageBatch(list(positions), pixels, [])
        bad = {row for row, _, _ in failed}
        keep = [row for row in range(len(positions)) if row not in bad]
        kept = pixels[keep].contiguous(memory_format=pixels_format(pixels)) if keep else None
        failures = sorted((position, reason) for _, position, reason in failed)
        return ImageBatch([positions[row] for row in keep], kept, failures)

    def __iter__(self) -> Iterator[ImageBatch]:
        if not self.threads:
            for positions in self.batches:
                yield self._finish(*self._start(None, positions))
            return
        with ThreadPoolExecutor(self.threads, thread_name_prefix="xmodal-decode") as pool:
            if not self.ahead:
                for positions in self.batches:
                    yield self._finish(*self._start(pool, positions))
                return
            started = [self._start(pool, b) for b in self.batches[: self.ahead]]
            for index in range(len(self.batches)):
                batch = self._finish(*started.pop(0))
                following = index + self.ahead
                if following < len(self.batches):
                    started.append(self._start(pool, self.batches[following]))
                yield batch


def pixels_format(pixels: torch.Tensor) -> torch.memory_format:
    """channels_last when ``pixels`` (B, 3, H, W) is laid out that way."""
    if pixels.is_contiguous(memory_format=torch.channels_last) and not pixels.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format
