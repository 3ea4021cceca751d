"""``xmodal extract``: dataset -> embedding shards; resumable shard by shard.

Each modality is one strategy (images, texts, pairs) with the same parts: its reader (the
items, and their batches for the pending shards), its call of the mapper (the model) per batch,
and its shard table and error fields for the writer. :class:`xmodal.extract.pipeline.ShardRun`
drives every strategy through the same pipeline (:mod:`xmodal.extract.pipeline`). Under
torchrun each rank embeds its own shards (:mod:`xmodal.extract.ranks`); rank 0 writes the
manifest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xmodal import distributed, storage
from xmodal.data.datasets import load_dataset
from xmodal.data.images import ImageBatch, ThreadedImageBatches, image_loader
from xmodal.data.refs import location
from xmodal.data.skipped import save_skipped
from xmodal.distributed import World
from xmodal.errors import ExtractError
from xmodal.extract.background import run_ahead
from xmodal.extract.mapper import (
    EmbeddingMapper,
    MapperOptions,
    Pending,
    filter_weight,
    mapper_pairs,
)
from xmodal.extract.pairs import (
    PAIRS,
    PairBuffer,
    PairItem,
    check_fused,
    pair_items,
    pair_table,
    pairs_record,
    plan_pairs,
)
from xmodal.extract.pipeline import (
    AlreadyEmbedded,
    Batches,
    Bounds,
    Computed,
    ExtractSettings,
    ModalityStrategy,
    ShardRun,
    Tools,
    batches_per_shard,
    model_threads,
)
from xmodal.extract.plan import DecodePlan, explicit_plan, local_cores, plan_decoding, take_turns
from xmodal.extract.reader import Item, TextBatch, image_items, text_batches, text_items
from xmodal.extract.writer import ShardHook, ShardLog, open_manifest, resume_state
from xmodal.models.identity import identify
from xmodal.models.model import CrossModalModel
from xmodal.presets import load_model
from xmodal.processing import MultimodalProcessor
from xmodal.shards import DTYPES, MODALITIES
from xmodal.storage import Location

log = logging.getLogger(__name__)


def extract(
    model: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    modality: str = "both",
    shard_size: int = 10_000,
    dtype: str = "float32",
    batch_size: int = 64,
    workers: int | None = None,
    skip_bad: bool = False,
    data_format: str | None = None,
    progress: bool = True,
    on_shard: ShardHook | None = None,
    options: MapperOptions | None = None,
    fused: bool = False,
) -> dict[str, Any]:
    """Embed the unique images and/or the captions of ``data`` into Parquet shards in ``out``;
    ``modality="pairs"`` scores every row as an (image, caption) pair instead (similarity, ITM
    probability and, with ``fused``, the fused vector: :mod:`xmodal.extract.pairs`).

    Shard k holds items [k * shard_size, (k + 1) * shard_size); finished shards are skipped on
    a re-run, so an interrupted run resumes where it stopped. Returns the manifest. Under
    torchrun, shard k is embedded by rank k % world size. ``options`` picks the device,
    precision, backend (torch or ONNX Runtime) and torch.compile (default: fp32 torch on CPU).

    ``workers``: decode worker processes; None lets the first batch's measured costs decide
    (:mod:`xmodal.extract.plan`). Shards are written by a background thread, in order, and
    ``on_shard(modality, k)`` is called there once shard k and the manifest are on disk; an
    exception it raises stops the writing and is raised here.
    """
    modalities = check_options(modality, shard_size, dtype, batch_size, workers, fused)
    settings = ExtractSettings(batch_size, workers, dtype, shard_size, fused)
    with distributed.process_group("gloo") as world:  # only CPU objects cross ranks
        job = open_extraction(
            model,
            data,
            out,
            modalities,
            settings,
            lambda net, processor: EmbeddingMapper(net, options, processor),
            data_format,
            skip_bad,
            world,
            on_shard,
        )
        run = ShardRun(job.out, job.tools, job.shards, progress, world)
        with model_threads(job.tools.embedder, local_cores()):
            for strategy, chosen in zip(job.strategies, job.items, strict=True):
                run.embed(strategy, chosen, set(job.done[strategy.name]))
        return job.shards.close()


def check_options(
    modality: str,
    shard_size: int,
    dtype: str,
    batch_size: int,
    workers: int | None,
    fused: bool,
) -> tuple[str, ...]:
    """The modalities ``modality`` names, once the settings are checked."""
    if modality not in (*MODALITIES, "both", PAIRS):
        raise ExtractError(f"modality must be images, texts, both or pairs, got {modality!r}")
    if dtype not in DTYPES:
        raise ExtractError(f"dtype must be float16 or float32, got {dtype!r}")
    for name, value in (("shard_size", shard_size), ("batch_size", batch_size)):
        if value < 1:
            raise ExtractError(f"{name} must be >= 1, got {value}")
    if workers is not None and workers < 0:
        raise ExtractError(f"workers must be >= 0, got {workers}")
    if fused and modality != PAIRS:
        raise ExtractError("fused vectors are written for pairs only (--what pairs --fused)")
    return MODALITIES if modality == "both" else (modality,)


@dataclass
class Extraction:
    """A run opened: its tools, each modality's strategy and items, the shards finished already
    (by modality) and the log that records the others."""

    out: Location
    tools: Tools
    strategies: list[ModalityStrategy]
    items: list[Sequence[Any]]
    done: dict[str, dict[int, dict[str, Any]]]
    shards: ShardLog


def open_extraction(
    model: str | Path,
    data: str | Path,
    out: str | Path,
    modalities: Sequence[str],
    settings: ExtractSettings,
    mapper: Callable[[CrossModalModel, MultimodalProcessor], EmbeddingMapper | None],
    data_format: str | None,
    skip_bad: bool,
    world: World,
    on_shard: ShardHook | None,
) -> Extraction:
    """Load the model and the dataset, make the run's mapper (None: embed elsewhere), open (or
    resume) the manifest in ``out`` and plan every modality's shards: what :func:`extract` does
    before embedding, shared by the Ray engine's driver."""
    net, processor = load_model(model)
    check_fused(net.has_itm, settings.fused)
    identity = identify(net, processor, model)
    dataset = load_dataset(data, data_format, skip_bad)
    out = out if storage.is_url(out) else Path(out)
    weight = filter_weight(net) if net.has_itm else None
    tools = settings.tools(processor, mapper(net, processor), net.has_itm, weight)
    dim = net.config.embed_dim
    manifest = open_manifest(out, identity, dim, settings.dtype, settings.shard_size, data)
    strategies = [STRATEGIES[name](tools) for name in modalities]
    items = [strategy.items(dataset) for strategy in strategies]
    for strategy, chosen in zip(strategies, items, strict=True):
        strategy.add_record(manifest, chosen, out, data)
    done, errors = resume_state(out, manifest, world)
    manifest["skipped_rows"] = len(dataset.skipped)
    if world.is_main:
        save_skipped(out, dataset.skipped)
    shards = ShardLog(out, manifest, errors, world, on_shard)
    return Extraction(out, tools, strategies, items, done, shards)


def _image_decoder(
    tools: Tools, refs: list, batches: list[list[int]], plan: DecodePlan
) -> Iterator[ImageBatch]:
    """The decoded image batches: by the tools' decoder when they have one (the Ray engine's
    tasks; its tools say ``workers=0``, so the model keeps the cores), else in worker
    processes, or in threads as ``plan`` says."""
    if tools.decoder is not None:
        return tools.decoder(refs, batches)
    channels_last = tools.embedder.channels_last
    if plan.workers:
        loader = image_loader(
            refs, tools.processor, batches, plan.workers, channels_last, tools.accelerated
        )
        return iter(loader)
    ahead = 0 if plan.take_turns else 1
    return iter(
        ThreadedImageBatches(refs, tools.processor, batches, plan.threads, channels_last, ahead)
    )


# -- one strategy per modality ---------------------------------------------------------------------


class _Images(ModalityStrategy):
    """Unique images, decoded in worker processes or threads as the measured costs plan."""

    name, unit = "images", "img"
    items = staticmethod(image_items)
    plan: DecodePlan | None = None  # decoding, once planned

    def batches(self, items: Sequence[Item], bounds: Bounds) -> Batches:
        batches, count = batches_per_shard(bounds, self.tools.batch_size)
        refs = [item.ref for item in items]
        return Batches(count, lambda: self._stream(refs, batches), self._start)

    def _start(self, batch: ImageBatch) -> Pending | None:
        if batch.pixel_values is None:
            return None
        return self.tools.embedder.start_images(batch.pixel_values)

    def failures(self, batch: ImageBatch) -> list[tuple[int, str]]:
        return batch.failures

    def extra_columns(self, chosen: list[Item]) -> dict[str, list[Any]]:
        return {"location": [location(item.ref) for item in chosen]}

    def _stream(
        self, refs: list, batches: list[list[int]]
    ) -> tuple[Iterator[ImageBatch | AlreadyEmbedded], int]:
        """Decoded batches, and the model's threads. With ``workers`` left to ``extract()``,
        the first batch is decoded on one core and embedded, timed, and the plan for the rest
        follows from those costs (:func:`xmodal.extract.plan.plan_decoding`); this strategy
        keeps it for the next shards it embeds (a Ray actor's)."""
        tools = self.tools
        cores = local_cores()
        if tools.workers is not None:
            self.plan = explicit_plan(tools.workers, cores, tools.accelerated)
        if self.plan is not None:
            return _image_decoder(tools, refs, batches, self.plan), self.plan.model_threads
        before = time.perf_counter()
        first = next(
            iter(
                ThreadedImageBatches(
                    refs, tools.processor, batches[:1], 0, tools.embedder.channels_last
                )
            )
        )
        decode_s = (time.perf_counter() - before) / len(batches[0])
        model_s = embeddings = None
        if first.pixel_values is not None:
            before = time.perf_counter()
            embeddings = tools.embedder.start_images(first.pixel_values).result()
            model_s = (time.perf_counter() - before) / len(first.positions)
        plan = self.plan = plan_decoding(cores, tools.accelerated, decode_s, model_s)
        log.info("extract: %s -> %s", plan.reason, plan)

        def stream() -> Iterator[ImageBatch | AlreadyEmbedded]:
            yield AlreadyEmbedded(first, embeddings)
            yield from _image_decoder(tools, refs, batches[1:], plan)

        return stream(), plan.model_threads


class _Texts(ModalityStrategy):
    """Every caption; a shard's captions are tokenised together and batched by length."""

    name, unit = "texts", "txt"
    items = staticmethod(text_items)

    def batches(self, items: Sequence[Item], bounds: Bounds) -> Batches:
        _, count = batches_per_shard(bounds, self.tools.batch_size)
        return Batches(count, lambda: self._stream(items, bounds), self._start)

    def _start(self, batch: TextBatch) -> Pending:
        return self.tools.embedder.start_texts(batch.input_ids, batch.attention_mask)

    def extra_columns(self, chosen: list[Item]) -> dict[str, list[Any]]:
        return {"image_id": [item.image_id for item in chosen]}

    def _stream(self, items: Sequence[Item], bounds: Bounds) -> tuple[Iterator[TextBatch], int]:
        tools = self.tools

        def tokenised() -> Iterator[list[TextBatch]]:
            for _, start, end in bounds:
                positions = range(start, end)
                yield list(text_batches(items, positions, tools.processor, tools.batch_size))

        # The next shard is tokenised in a thread while this one is embedded; on a CPU model
        # with few cores, between two shards instead (on all cores: the fast tokenizers' own
        # threads), as images are decoded there (:func:`xmodal.extract.plan.take_turns`).
        ahead = 0 if take_turns(local_cores(), tools.accelerated) else 1

        def stream() -> Iterator[TextBatch]:
            for shard in run_ahead(tokenised(), ahead=ahead, name="xmodal-tokenise"):
                yield from shard

        return stream(), local_cores()


class _Pairs(ModalityStrategy):
    """Every row as an (image, caption) pair: images decoded in the workers, captions bucketed
    by length within a shard, then both towers, the fusion and the ITM head per batch."""

    name, unit = PAIRS, "pair"
    items = staticmethod(pair_items)

    def add_record(
        self, manifest: dict[str, Any], items: Sequence[PairItem], out: Location, data
    ) -> None:
        tools = self.tools
        pairs_record(manifest, items, tools.fused, tools.has_itm, out, tools.filter_weight)

    def buffer(self, start: int, end: int) -> PairBuffer:
        return PairBuffer(start, end, self.tools.embedder.dim, self.tools.fused)

    def batches(self, items: Sequence[PairItem], bounds: Bounds) -> Batches:
        tools = self.tools
        plan = plan_pairs(items, bounds, tools.processor, tools.batch_size)
        refs = [item.ref for item in items]

        def stream() -> tuple[Iterator[ImageBatch], int]:
            if tools.workers is None:  # costs unmeasured: a decode thread ahead (or GPU workers)
                decoding = plan_decoding(local_cores(), tools.accelerated)
            else:
                decoding = explicit_plan(tools.workers, local_cores(), tools.accelerated)
            return _image_decoder(tools, refs, plan.batches, decoding), decoding.model_threads

        def start(batch: ImageBatch) -> Computed | None:
            if batch.pixel_values is None:
                return None
            rows = plan.token_row[np.asarray(batch.positions, dtype=np.int64)]
            input_ids, attention_mask = plan.tokens.batch(rows)
            return Computed(
                mapper_pairs(
                    tools.embedder, batch.pixel_values, input_ids, attention_mask, tools.fused
                )
            )

        return Batches(plan.batches_left, stream, start, plan.refused)

    def failures(self, batch: ImageBatch) -> list[tuple[int, str]]:
        return [(p, f"image: {reason}") for p, reason in batch.failures]

    def table(
        self, path: Location, items: Sequence[PairItem], buffer: PairBuffer, record: dict[str, Any]
    ) -> Any:
        return pair_table(items, buffer, record["scores"], self.tools.dtype)

    def error_fields(self, item: PairItem) -> dict[str, Any]:
        return {"caption": item.caption, "row": item.row}


STRATEGIES: dict[str, Callable[[Tools], ModalityStrategy]] = {
    "images": _Images,
    "texts": _Texts,
    PAIRS: _Pairs,
}
