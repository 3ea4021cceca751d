"""Which pairs each rank trains on, and turning index batches into tensors.

Each optimiser step consumes one *global batch* of ``batch_size x accum_steps x world_size``
consecutive pairs of the epoch's shuffled order. Rank r takes the r-th contiguous block of it
and splits it into ``accum_steps`` micro-batches of ``batch_size``: blocks are disjoint and of
equal size, and in rank order they are exactly the batch one process would train on with
``batch_size x accum_steps x world_size``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from xmodal.data import Example, ImageTextDataset
from xmodal.data.images import PixelNormaliser, decode_crop
from xmodal.data.reorder import pick_reordering
from xmodal.processing import MultimodalProcessor


@dataclass(frozen=True)
class Neighbours:
    """What neighbour-mined batches draw from: ``share`` of each batch is filled with pairs
    whose image is one of the ``near_images`` of a pair drawn at random (the other pairs)."""

    image_of_row: list[int]  # dataset row -> image position
    near_images: torch.Tensor  # (images, k): each image's k nearest other images
    rows_of_image: list[list[int]]  # image position -> its dataset rows
    share: float


def nearest_images(
    features: torch.Tensor, k: int, dims: int = 256, chunk: int = 4096
) -> torch.Tensor:
    """(N, k) positions of each row's ``k`` nearest other rows of ``features`` (N, D) by cosine
    after standardising every dimension (feature levels of different scales count alike).

    Over ``dims`` dimensions the standardised features go through a seeded random projection
    first (cosines kept approximately), and rows are scored ``chunk`` at a time, so a large
    collection costs O(N^2 x dims) time and O(chunk x N) memory.
    """
    x = features.float()
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
    if x.shape[1] > dims:
        generator = torch.Generator().manual_seed(0)
        x = x @ torch.randn(x.shape[1], dims, generator=generator)
    x = F.normalize(x, dim=1)
    k = min(k, len(x) - 1)
    out = []
    for start in range(0, len(x), chunk):
        scores = x[start : start + chunk] @ x.t()
        own = torch.arange(start, start + len(scores))
        scores[torch.arange(len(scores)), own] = float("-inf")
        out.append(scores.topk(k, dim=1).indices)
    return torch.cat(out)


def epoch_batches(
    n: int, batch_size: int, seed: int, epoch: int, neighbours: Neighbours | None = None
) -> list[list[int]]:
    """The shuffled, full batches of one epoch; a function of (seed, epoch) only.

    With ``neighbours``, each batch takes its first ``batch_size x (1 - share)`` rows from the
    shuffled order (the anchors) and fills the rest with one pair per anchor in turn, whose
    image is drawn from the anchor image's nearest images: look-alikes the losses must tell
    apart in the same batch (hard negatives for the contrastive and the ITM terms). An epoch
    keeps its number of batches; no row appears twice in a batch.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=generator).tolist()
    if neighbours is None or neighbours.share == 0:
        return [order[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
    mined = min(batch_size - 1, round(batch_size * neighbours.share))
    anchors = batch_size - mined
    count = n // batch_size
    near = neighbours.near_images.tolist()
    picks = torch.rand(count, mined, 2, generator=generator).tolist()
    batches = []
    for b in range(count):
        batch = order[b * anchors : (b + 1) * anchors]
        taken = set(batch)
        for i in range(mined):
            candidates = near[neighbours.image_of_row[batch[i % anchors]]]
            first, row_pick = picks[b][i]
            start = int(first * len(candidates))
            row = None
            for image in candidates[start:] + candidates[:start]:
                rows = neighbours.rows_of_image[image]
                row = rows[int(row_pick * len(rows))]
                if row not in taken:
                    break
                row = None
            if row is None:  # the anchor's look-alikes are all in the batch: any other row
                row = next(r for r in reversed(order) if r not in taken)
            batch.append(row)
            taken.add(row)
        batches.append(batch)
    return batches


def rank_micro_batches(
    n: int,
    batch_size: int,
    accum_steps: int,
    world_size: int,
    rank: int,
    seed: int,
    epoch: int,
    neighbours: Neighbours | None = None,
) -> list[list[int]]:
    """This rank's micro-batches of one epoch in order, ``accum_steps`` per optimiser step."""
    per_rank = batch_size * accum_steps
    micro: list[list[int]] = []
    for step in epoch_batches(n, per_rank * world_size, seed, epoch, neighbours):
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

    ``reorder_key`` (for the ITM term ``loss.itm_reordered``): the batch rows whose caption has
    a reordering (:mod:`xmodal.data.reorder`) go under ``reordered_rows`` (S,), and
    ``reordered_input_ids`` / ``reordered_attention_mask`` (2S, L) tokenise those rows' own
    captions followed by one reordering of each; which reordering
    depends on (key, ``first`` + batch position, dataset index) only, so a resumed run that
    starts its loader at batch ``first`` draws what an uninterrupted one would.
    """

    def __init__(
        self,
        dataset: ImageTextDataset,
        batches: list[list[int]],
        processor: MultimodalProcessor,
        image_index: dict[str, int],
        decode_images: bool,
        reorder_key: int | None = None,
        first: int = 0,
    ):
        self.dataset = dataset
        self.batches = batches
        self.processor = processor
        self.image_index = image_index
        self.decode_images = decode_images
        self.normalise = PixelNormaliser(processor)
        self.reorder_key = reorder_key
        self.first = first

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
        if self.reorder_key is not None:
            self._add_reordered(batch, examples, rows, self.first + i)
        return batch

    def _add_reordered(
        self, batch: dict, examples: list[Example], rows: list[int], position: int
    ) -> None:
        own, reordered, kept = [], [], []
        for row, (example, j) in enumerate(zip(examples, rows, strict=True)):
            key = (self.reorder_key * 1_000_003 + position) * 1_000_033 + j  # type: ignore[operator]
            caption = pick_reordering(example.caption, key)
            if caption is not None:
                own.append(example.caption)
                reordered.append(caption)
                kept.append(row)
        batch["reordered_rows"] = torch.tensor(kept, dtype=torch.long)
        if kept:  # one tokenizer call: the rows' own captions, then their reorderings
            text = self.processor.process_text(own + reordered)
            batch["reordered_input_ids"] = text["input_ids"]
            batch["reordered_attention_mask"] = text["attention_mask"]
