"""Reader -> mapper -> writer for any modality.

What a modality's strategy provides (:class:`ModalityStrategy`: its items, their batches, the
mapper call per batch, its shard table and error fields) and the one pipeline that runs every
strategy (:class:`ShardRun`): batches embedded one ahead of their collection, gathered per
shard, each complete shard written by a background thread and recorded by
:class:`xmodal.extract.writer.ShardLog`. The strategies are in :mod:`xmodal.extract.runner`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from xmodal import storage
from xmodal.data.datasets import ImageTextDataset
from xmodal.data.images import ImageBatch
from xmodal.distributed import World
from xmodal.extract.background import OrderedWriter
from xmodal.extract.mapper import EmbeddingMapper, Pending
from xmodal.extract.pairs import PairBuffer
from xmodal.extract.ranks import rank_shards
from xmodal.extract.reader import Item, items_fingerprint
from xmodal.extract.writer import ShardLog, shard_entry
from xmodal.processing import MultimodalProcessor
from xmodal.shards import modality_record, shard_name, shard_table, write_table_atomic
from xmodal.storage import Location


@contextlib.contextmanager
def model_threads(mapper: EmbeddingMapper, count: int) -> Iterator[None]:
    """Run ``mapper``'s model (torch or ONNX Runtime) on ``count`` intra-op threads for the
    duration; torch's count is restored afterwards (ONNX sessions keep theirs until the next
    change)."""
    before = torch.get_num_threads()
    mapper.use_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- what every modality's strategy shares --------------------------------------------------------
Bounds = list[tuple[int, int, int]]  # (k, start, end) of each pending shard


@dataclass(frozen=True)
class ExtractSettings:
    """A run's settings besides the model and the data (what the Ray engine's actors are sent)."""

    batch_size: int
    workers: int | None  # decode worker processes; None: planned from measured costs
    dtype: str
    shard_size: int
    fused: bool  # pairs: write the fused vectors too

    def tools(
        self,
        processor: MultimodalProcessor,
        mapper: EmbeddingMapper | None,
        has_itm: bool,
        filter_weight: float | None = None,
    ) -> Tools:
        """The tools of these settings with the model's ``processor`` and ``mapper``."""
        return Tools(
            processor,
            mapper,
            self.batch_size,
            self.workers,
            self.dtype,
            self.shard_size,
            self.fused,
            has_itm,
            filter_weight,
        )


ImageDecoder = Callable[[Sequence[Any], list[list[int]]], Iterator[ImageBatch]]
"""``decoder(refs, batches)``: the decoded batches (lists of positions in ``refs``), in order."""


@dataclass(frozen=True)
class Tools:
    """The model, its processor and the settings every modality's strategy works with. Without
    a ``mapper`` a strategy only lists, records and writes (the Ray engine's driver)."""

    processor: MultimodalProcessor
    mapper: EmbeddingMapper | None  # None: nothing is embedded here
    batch_size: int
    workers: int | None  # decode worker processes; None: planned from measured costs
    dtype: str
    shard_size: int
    fused: bool  # pairs: write the fused vectors too
    has_itm: bool  # pairs: the model scores them with its ITM head
    filter_weight: float | None = None  # pairs: the ITM weight of the combined score
    decoder: ImageDecoder | None = None  # images decoded elsewhere (Ray tasks); None: here

    @property
    def embedder(self) -> EmbeddingMapper:
        """The mapper, for the strategies' embedding parts (a bug to ask for where none is)."""
        if self.mapper is None:
            raise RuntimeError("these tools only write: they have no mapper to embed with")
        return self.mapper

    def shard_range(self, k: int, count: int) -> tuple[int, int]:
        """Items [start, end) of shard ``k`` of ``count`` items."""
        return k * self.shard_size, min(count, (k + 1) * self.shard_size)

    def bounds(self, shards: Sequence[int], count: int) -> Bounds:
        """(k, start, end) of each of ``shards`` of ``count`` items."""
        return [(k, *self.shard_range(k, count)) for k in shards]

    @property
    def accelerated(self) -> bool:
        return self.embedder.device.type == "cuda"


def batches_per_shard(bounds: Bounds, batch_size: int) -> tuple[list[list[int]], dict[int, int]]:
    """The shards' items cut into batches of ``batch_size`` in order, and each shard's count."""
    batches: list[list[int]] = []
    count: dict[int, int] = {}
    for k, start, end in bounds:
        for b in range(start, end, batch_size):
            batches.append(list(range(b, min(end, b + batch_size))))
            count[k] = count.get(k, 0) + 1
    return batches, count


@dataclass
class Batches:
    """A strategy's reader for the pending shards: how many batches each shard has, how to open
    their stream (and the model's thread count beside it), how the mapper starts embedding one,
    and the items refused before any batch (by shard: position and reason)."""

    count: dict[int, int]
    open: Callable[[], tuple[Iterator[Any], int]]
    start: Callable[[Any], Pending | Computed | None]
    refused: dict[int, list[tuple[int, str]]] = field(default_factory=dict)


@dataclass
class EmbeddingBuffer:
    """Embeddings of one shard's items as they arrive, in any order."""

    start: int
    end: int
    dim: int
    rows: np.ndarray = field(init=False)
    ok: np.ndarray = field(init=False)
    failures: list[tuple[int, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rows = np.zeros((self.end - self.start, self.dim), dtype=np.float32)
        self.ok = np.zeros(self.end - self.start, dtype=bool)

    def put(self, positions: list[int], embeddings: np.ndarray) -> None:
        index = np.asarray(positions) - self.start
        self.rows[index] = embeddings
        self.ok[index] = True


ShardBuffer = EmbeddingBuffer | PairBuffer


class ModalityStrategy:
    """How one modality's items go reader -> mapper -> writer."""

    name: str  # the manifest's key and the shard files' prefix
    unit: str  # the progress bar's unit

    def __init__(self, tools: Tools):
        self.tools = tools

    def items(self, dataset: ImageTextDataset) -> Sequence[Any]:
        """Everything this modality embeds, in shard order."""
        raise NotImplementedError

    def add_record(
        self, manifest: dict[str, Any], items: Sequence[Any], out: Location, data
    ) -> None:
        """Add this modality's record to the manifest, or check the one there holds ``items``."""
        modality_record(manifest, self.name, len(items), items_fingerprint(items), out, str(data))

    def buffer(self, start: int, end: int) -> ShardBuffer:
        return EmbeddingBuffer(start, end, self.tools.embedder.dim)

    def batches(self, items: Sequence[Any], bounds: Bounds) -> Batches:
        """The reader: the batches of the pending shards ``bounds``."""
        raise NotImplementedError

    def failures(self, batch: Any) -> list[tuple[int, str]]:
        """The items of ``batch`` that could not be read: (position, reason)."""
        return []

    def table(
        self, path: Location, items: Sequence[Any], buffer: Any, record: dict[str, Any]
    ) -> Any:
        """The shard's Parquet table (rows: the items embedded); ``record``: the manifest's
        record of this modality."""
        chosen = [items[buffer.start + i] for i in np.flatnonzero(buffer.ok)]
        return shard_table(
            path,
            [item.id for item in chosen],
            [item.source for item in chosen],
            buffer.rows[buffer.ok],
            self.tools.dtype,
            self.extra_columns(chosen),
        )

    def extra_columns(self, chosen: list[Item]) -> dict[str, list[Any]]:
        raise NotImplementedError

    def error_fields(self, item: Any) -> dict[str, Any]:
        """What an error record says of ``item`` besides its id and source."""
        return {}

    def embedded(
        self, items: Sequence[Any], shards: Sequence[int], bar: tqdm | None = None
    ) -> Iterator[tuple[int, ShardBuffer]]:
        """Embed the ``shards`` of ``items``: yields (k, buffer) for each shard once complete,
        first those with nothing to embed, then the rest as their last batch is collected
        (the writer takes them from there; the Ray actors return them). ``bar``: progress."""
        bar = bar if bar is not None else tqdm(disable=True)
        tools = self.tools
        buffers: dict[int, ShardBuffer] = {}

        def buffer_of(k: int) -> ShardBuffer:  # made on a shard's first batch, to bound memory
            if k not in buffers:
                buffers[k] = self.buffer(*tools.shard_range(k, len(items)))
            return buffers[k]

        batches = self.batches(items, tools.bounds(shards, len(items)))
        left = dict(batches.count)
        for k, refused in batches.refused.items():
            if refused:
                buffer_of(k).failures.extend(refused)
                bar.update(len(refused))
        for k in shards:
            if not left.get(k):  # nothing left to embed in this shard
                yield k, buffer_of(k)
        if not any(left.values()):
            return
        stream, threads = batches.open()
        with model_threads(tools.embedder, threads):
            for k in self._gather(stream, batches.start, buffer_of, bar):
                left[k] -= 1
                if not left[k]:
                    yield k, buffers.pop(k)

    def _gather(
        self,
        stream: Iterator[Any],
        start: Callable[[Any], Pending | Computed | None],
        buffer_of: Callable[[int], ShardBuffer],
        bar: tqdm,
    ) -> Iterator[int]:
        """Embed the batches of ``stream`` one ahead, put each batch's results and failures in
        its shard's buffer and yield that shard."""
        waited = 0.0  # seconds the model spent waiting for batches
        started = time.perf_counter()
        for batch, result, wait in embed_one_ahead(stream, start):
            failures = self.failures(batch)
            k = (batch.positions or [p for p, _ in failures])[0] // self.tools.shard_size
            buffer = buffer_of(k)
            if result is not None:
                buffer.put(batch.positions, result)
            buffer.failures.extend(failures)
            waited += wait
            bar.update(len(batch.positions) + len(failures))
            bar.set_postfix(
                data_wait=f"{waited / (time.perf_counter() - started):.0%}", refresh=False
            )
            yield k


# -- the pipeline ---------------------------------------------------------------------------------
@dataclass
class AlreadyEmbedded:
    """A batch embedded already (the timed first batch of the images)."""

    batch: ImageBatch
    embeddings: np.ndarray | None


@dataclass
class Computed:
    """A mapper result computed already, collected like a :class:`Pending` one."""

    values: Any

    def result(self) -> Any:
        return self.values


def embed_one_ahead(
    stream: Iterator, start: Callable[[Any], Pending | Computed | None]
) -> Iterator[tuple[Any, Any, float]]:
    """(batch, embeddings, seconds waited for the batch) for each batch of ``stream``. Batch
    i + 1 is fetched and started before the embeddings of batch i are collected, so the host
    prepares the next batch while a GPU works (on a CPU, ``start`` returns finished work)."""
    previous: tuple[Any, Pending | Computed | None] | None = None
    while True:
        asked = time.perf_counter()
        batch = next(stream, None)
        waited = time.perf_counter() - asked
        if previous is not None:
            done, handle = previous
            yield done, None if handle is None else handle.result(), waited
            waited = 0.0
        if batch is None:
            return
        if isinstance(batch, AlreadyEmbedded):
            previous = (batch.batch, Computed(batch.embeddings))
            continue
        previous = (batch, start(batch))


@dataclass
class ShardRun:
    """Runs each modality's strategy through one pipeline: the pending shards' batches embedded
    one ahead, gathered per shard, each complete shard written by a background thread."""

    out: Location
    tools: Tools
    shards: ShardLog  # records each written shard (errors, manifest or this rank's part)
    progress: bool
    world: World

    def pending(self, strategy: ModalityStrategy, done: set[int]) -> list[int]:
        """The shards of ``strategy``'s modality not in ``done``, in order."""
        num_shards = self.shards.manifest["modalities"][strategy.name]["num_shards"]
        return [k for k in range(num_shards) if k not in done]

    def embed(self, strategy: ModalityStrategy, items: Sequence[Any], done: set[int]) -> None:
        """Embed the shards of ``strategy``'s modality not in ``done`` (under torchrun, this
        rank's)."""
        pending = rank_shards(self.pending(strategy, done), self.world.rank, self.world.size)
        total = sum(end - start for _, start, end in self.tools.bounds(pending, len(items)))
        quiet = not self.progress or not self.world.is_main
        with tqdm(total=total, desc=strategy.name, unit=strategy.unit, disable=quiet) as bar:
            with OrderedWriter() as writer:
                for k, buffer in strategy.embedded(items, pending, bar):
                    writer.submit(self.shard_job(strategy, k, items, buffer))

    def shard_job(
        self, strategy: ModalityStrategy, k: int, items: Sequence[Any], buffer: ShardBuffer
    ) -> Callable[[], None]:
        """Shard k's table and records, built here, in the model's thread between two batches;
        the returned job writes the shard, then records it (error log, then manifest, for
        resuming) in the background writer's thread, one shard after another in their order.
        Building them there would hold the GIL the model's thread needs between its calls."""
        file = shard_name(strategy.name, k)
        record = self.shards.manifest["modalities"][strategy.name]
        table = strategy.table(storage.join(self.out, file), items, buffer, record)
        failures = [
            {
                "modality": strategy.name,
                "shard": file,
                "id": items[position].id,
                "source": items[position].source,
                **strategy.error_fields(items[position]),
                "reason": reason,
            }
            for position, reason in sorted(buffer.failures)
        ]
        failed = len(buffer.failures)
        entry = shard_entry(k, file, buffer.start, buffer.end, table.num_rows, failed)

        def write() -> None:
            write_table_atomic(storage.join(self.out, file), table)
            self.shards.record(strategy.name, k, entry, failures)

        return write
