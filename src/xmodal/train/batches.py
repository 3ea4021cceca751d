"""Which pairs each rank trains on, and turning index batches into tensors.

Each optimiser step consumes one *global batch* of ``batch_size x accum_steps x world_size``
consecutive pairs of the epoch's shuffled order. Rank r takes the r-th contiguous block of it
and splits it into ``accum_steps`` micro-batches of ``batch_size``: blocks are disjoint and of
equal size, and in rank order they are exactly the batch one process would train on with
``batch_size x accum_steps x world_size``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Dataset

from xmodal.data import ImageTextDataset
from xmodal.data.images import PixelNormaliser, data_loader, decode_crop
from xmodal.distributed import World
from xmodal.processing import MultimodalProcessor


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The shuffled, full batches of one epoch; a function of (seed, epoch) only."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=generator).tolist()
    return [order[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


def rank_micro_batches(
    n: int,
    batch_size: int,
    accum_steps: int,
    world_size: int,
    rank: int,
    seed: int,
    epoch: int,
) -> list[list[int]]:
    """This rank's micro-batches of one epoch in order, ``accum_steps`` per optimiser step."""
    per_rank = batch_size * accum_steps
    micro: list[list[int]] = []
    for step in epoch_batches(n, per_rank * world_size, seed, epoch):
        block = step[rank * per_rank : (rank + 1) * per_rank]
        micro += [block[i : i + batch_size] for i in range(0, per_rank, batch_size)]
    return micro


def sample_views(
    rows: int, views: int, seed: int, rank: int, epoch: int, batch: int
) -> torch.Tensor:
    """Which cached view each of a micro-batch's ``rows`` pairs reads: uniform over ``views``,
    a function of (seed, rank, epoch, micro-batch position in the epoch) only, so a resumed
    run draws the views an uninterrupted one would."""
    key = ((seed * 1_000_003 + rank) * 10_007 + epoch) * 1_000_033 + batch + 17
    generator = torch.Generator().manual_seed(key % 2**63)
    return torch.randint(views, (rows,), generator=generator)


class PairBatches(Dataset):
    """Item i = the i-th batch of a fixed list of index batches, decoded and tokenised.

    Images are decoded as everywhere else (:mod:`xmodal.data.images`); one that cannot be
    decoded is left out of the batch with its caption and listed under ``bad_images`` as
    (dataset index, reason): the trainer, in the main process, records or refuses it. A batch
    whose images all fail holds only ``bad_images``.
    """

    def __init__(
        self,
        dataset: ImageTextDataset,
        batches: list[list[int]],
        processor: MultimodalProcessor,
        image_index: dict[str, int],
        decode_images: bool,
    ):
        self.dataset = dataset
        self.batches = batches
        self.processor = processor
        self.image_index = image_index
        self.decode_images = decode_images
        self.normalise = PixelNormaliser(processor)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        rows = self.batches[i]
        batch: dict = {"bad_images": []}
        if self.decode_images:
            crops, kept = [], []
            for j in rows:
                crop = decode_crop(self.processor, self.dataset[j].image)
                if isinstance(crop, str):
                    batch["bad_images"].append((j, crop))
                else:
                    crops.append(crop)
                    kept.append(j)
            if not kept:
                return batch
            rows = kept
            batch["pixel_values"] = self.normalise(crops)
        examples = [self.dataset[j] for j in rows]
        batch.update(self.processor.process_text([ex.caption for ex in examples]))
        batch["image_index"] = torch.tensor([self.image_index[ex.image_id] for ex in examples])
        return batch


class RankBatches:
    """This rank's micro-batches of a training set, epoch by epoch: which pairs
    (:func:`rank_micro_batches`), decoded and tokenised in ``num_workers`` loader processes,
    each pair with the cached view it reads when there are ``views`` > 1
    (:func:`sample_views`). A function of (seed, rank, epoch, position) only, so a resumed
    run reads what an uninterrupted one would."""

    def __init__(
        self,
        dataset: ImageTextDataset,
        processor: MultimodalProcessor,
        batch_size: int,
        accum_steps: int,
        seed: int,
        num_workers: int = 0,
        decode_images: bool = True,
        views: int = 1,
        world: World | None = None,
    ):
        world = world or World()
        self.dataset, self.processor = dataset, processor
        self.batch_size, self.accum_steps = batch_size, accum_steps
        self.world_size, self.rank, self.seed = world.size, world.rank, seed
        self.num_workers, self.decode_images, self.views = num_workers, decode_images, views
        self.image_index = {iid: i for i, iid in enumerate(dataset.image_ids())}
        self.per_epoch = len(self.micro_batches(0))

    def micro_batches(self, epoch: int) -> list[list[int]]:
        """Dataset rows of this rank's micro-batches of ``epoch``, ``accum_steps`` a step."""
        return rank_micro_batches(
            len(self.dataset),
            self.batch_size,
            self.accum_steps,
            self.world_size,
            self.rank,
            self.seed,
            epoch,
        )

    def epoch(self, epoch: int, start: int = 0) -> Iterator[dict]:
        """The micro-batches of ``epoch`` from position ``start`` on."""
        made = PairBatches(
            self.dataset,
            self.micro_batches(epoch)[start:],
            self.processor,
            self.image_index,
            decode_images=self.decode_images,
        )
        loader = data_loader(made, self.num_workers, self.seed + epoch, batch_size=None)
        for position, batch in enumerate(loader, start):
            if self.views > 1 and "image_index" in batch:
                rows = len(batch["image_index"])
                batch["view"] = sample_views(
                    rows, self.views, self.seed, self.rank, epoch, position
                )
            yield batch
