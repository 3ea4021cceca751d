"""``xmodal extract``: dataset -> embedding shards; resumable shard by shard.

Under torchrun each rank embeds its own shards (:mod:`xmodal.extract.ranks`); rank 0 writes the
manifest.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from xmodal import distributed
from xmodal.atomic import make_dir
from xmodal.data.datasets import ImageTextDataset, load_dataset
from xmodal.data.images import ImageBatch, ThreadedImageBatches, image_loader
from xmodal.data.refs import location
from xmodal.data.skipped import save_skipped
from xmodal.distributed import World
from xmodal.errors import ExtractError
from xmodal.extract.background import OrderedWriter, run_ahead
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
    pairs_record,
    plan_pairs,
    write_pair_shard,
)
from xmodal.extract.plan import (
    DecodePlan,
    explicit_plan,
    local_cores,
    plan_decoding,
    take_turns,
)
from xmodal.extract.ranks import (
    fold_errors,
    fold_shards,
    load_parts,
    new_part,
    rank_shards,
    remove_parts,
    save_part,
)
from xmodal.extract.reader import (
    Item,
    TextBatch,
    image_items,
    items_fingerprint,
    text_batches,
    text_items,
)
from xmodal.extract.writer import (
    DTYPES,
    MANIFEST_FORMAT,
    MODALITIES,
    complete_shards,
    load_errors,
    load_manifest,
    modality_record,
    now,
    remove_stale_temporaries,
    save_errors,
    save_manifest,
    shard_name,
    shard_table,
    write_table_atomic,
)
from xmodal.models.identity import ModelIdentity, check_compatible, identify
from xmodal.presets import load_model
from xmodal.processing import MultimodalProcessor

ShardHook = Callable[[str, int], None]
log = logging.getLogger(__name__)


def _shard_entry(k: int, file: str, buffer: Any, rows: int) -> dict[str, Any]:
    """Shard ``k``'s manifest entry: its file, item range, rows written and items failed."""
    return {
        "index": k,
        "file": file,
        "start": buffer.start,
        "end": buffer.end,
        "rows": rows,
        "failed": len(buffer.failures),
    }


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
    modalities = _check_options(modality, shard_size, dtype, batch_size, workers)
    if fused and PAIRS not in modalities:
        raise ExtractError("fused vectors are written for pairs only (--what pairs --fused)")
    with distributed.process_group("gloo") as world:  # only CPU objects cross ranks
        net, processor = load_model(model)
        check_fused(net.has_itm, fused and PAIRS in modalities)
        identity = identify(net, processor, model)
        dataset = load_dataset(data, data_format, skip_bad)
        out = Path(out)
        mapper = EmbeddingMapper(net, options, processor)
        manifest = _open_manifest(out, identity, mapper.dim, dtype, shard_size, data)
        items = {modality: _items(modality, dataset) for modality in modalities}
        for modality in modalities:
            if modality == PAIRS:
                weight = filter_weight(net) if net.has_itm else None
                pairs_record(manifest, items[modality], fused, net.has_itm, out, weight)
            else:
                _modality_record(manifest, modality, items[modality], out, data)
        done, errors = _resume_state(out, manifest, world)
        manifest["skipped_rows"] = len(dataset.skipped)
        if world.is_main:
            save_skipped(out, dataset.skipped)
        run = _Run(
            out, manifest, processor, mapper, errors, batch_size, workers, progress, on_shard
        )
        run.world = world
        run.fused = fused
        with model_threads(mapper, local_cores()):
            for modality in modalities:
                run.embed(modality, items[modality], set(done[modality]))
        if world.distributed:
            return _merge_ranks(out, manifest, run)
        save_manifest(out, manifest)
        return manifest


def _items(modality: str, dataset: ImageTextDataset) -> list[Item] | list[PairItem]:
    """What one modality embeds: unique images, every caption, or every row as a pair."""
    if modality == "images":
        return image_items(dataset)
    return pair_items(dataset) if modality == PAIRS else text_items(dataset)


def _resume_state(
    out: Path, manifest: dict[str, Any], world: World
) -> tuple[dict[str, dict[int, dict[str, Any]]], list[dict[str, Any]]]:
    """The finished shards per modality (including those a killed distributed run recorded in part
    files) and their error records. Once every rank has read them, rank 0 removes stale
    temporaries and writes the folded state, before any rank writes a shard."""
    parts = load_parts(out)
    fold_shards(manifest, parts)
    done = {
        modality: complete_shards(out, record)
        for modality, record in manifest["modalities"].items()
    }
    for modality, record in manifest["modalities"].items():
        record["shards"] = [done[modality][k] for k in sorted(done[modality])]
    keep = {e["file"] for d in done.values() for e in d.values()}
    errors = load_errors(out, keep)
    if parts:
        errors = fold_errors(errors, parts, keep)
    distributed.barrier()
    if world.is_main:
        make_dir(out)
        remove_stale_temporaries(out)
        if parts:
            save_errors(out, errors)
            save_manifest(out, manifest)
            remove_parts(out)
    distributed.barrier()
    return done, errors


def _merge_ranks(out: Path, manifest: dict[str, Any], run: _Run) -> dict[str, Any]:
    """Rank 0 folds every rank's shards and errors into the one manifest and error log; every
    rank returns that manifest."""
    parts = distributed.gather_objects(run.part)
    if run.world.is_main:
        fold_shards(manifest, parts)
        save_errors(out, fold_errors(run.errors, parts))
        save_manifest(out, manifest)
        remove_parts(out)
    distributed.barrier()
    return manifest if run.world.is_main else load_manifest(out)


def _check_options(
    modality: str, shard_size: int, dtype: str, batch_size: int, workers: int | None
) -> tuple[str, ...]:
    if modality not in (*MODALITIES, "both", PAIRS):
        raise ExtractError(f"modality must be images, texts, both or pairs, got {modality!r}")
    if dtype not in DTYPES:
        raise ExtractError(f"dtype must be float16 or float32, got {dtype!r}")
    for name, value in (("shard_size", shard_size), ("batch_size", batch_size)):
        if value < 1:
            raise ExtractError(f"{name} must be >= 1, got {value}")
    if workers is not None and workers < 0:
        raise ExtractError(f"workers must be >= 0, got {workers}")
    return MODALITIES if modality == "both" else (modality,)


def _open_manifest(
    out: Path, identity: ModelIdentity, dim: int, dtype: str, shard_size: int, data: str | Path
) -> dict[str, Any]:
    """The existing manifest (checked against this run) or a fresh one."""
    manifest = load_manifest(out)
    if manifest is None:
        return {
            "format": MANIFEST_FORMAT,
            "model": identity.to_dict(),
            "processor_hash": identity.processor_hash,
            "dim": dim,
            "dtype": dtype,
            "normalised": True,
            "shard_size": shard_size,
            "data": str(Path(data).resolve()),
            "created": now(),
            "modalities": {},
            "total_rows": 0,
        }
    previous = ModelIdentity.from_record(manifest)
    check_compatible(previous, identity, f"{out} holds embeddings of another model; not extracting")
    for key, value in (("dim", dim), ("dtype", dtype), ("shard_size", shard_size)):
        if manifest[key] != value:
            raise ExtractError(
                f"{out} was extracted with {key}={manifest[key]}, this run asks for {value}: "
                "use the same setting or a new --out directory"
            )
    return manifest


def _modality_record(
    manifest: dict[str, Any], modality: str, items: Sequence[Item], out: Path, data: str | Path
) -> None:
    modality_record(manifest, modality, len(items), items_fingerprint(items), out, str(data))


@dataclass
class _Embedded:
    """A batch embedded already (the timed first batch of the images)."""

    batch: ImageBatch
    embeddings: np.ndarray | None


def _lagged(
    stream: Iterator, start: Callable[[Any], Pending | None]
) -> Iterator[tuple[Any, np.ndarray | None, float]]:
    """(batch, embeddings, seconds waited for the batch) for each batch of ``stream``. Batch
    i + 1 is fetched and started before the embeddings of batch i are collected, so the host
    prepares the next batch while a GPU works (on a CPU, ``start`` returns finished work)."""
    previous: tuple[Any, Pending | None] | None = None
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
        if isinstance(batch, _Embedded):
            previous = (batch.batch, _Ready(batch.embeddings))
            continue
        previous = (batch, start(batch))


class _Ready:
    def __init__(self, values: np.ndarray | None):
        self.values = values

    def result(self) -> np.ndarray | None:
        return self.values


@dataclass
class _ShardBuffer:
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


class _Run:
    """Embeds the pending shards of one modality after another, writing each when it is complete."""

    def __init__(
        self,
        out: Path,
        manifest: dict[str, Any],
        processor: MultimodalProcessor,
        mapper: EmbeddingMapper,
        errors: list[dict[str, Any]],
        batch_size: int,
        workers: int | None,
        progress: bool,
        on_shard: ShardHook | None,
    ):
        self.out, self.manifest, self.processor, self.mapper = out, manifest, processor, mapper
        self.errors, self.batch_size, self.workers = errors, batch_size, workers
        self.progress, self.on_shard = progress, on_shard
        self.size = manifest["shard_size"]
        self.world = World()
        self.part = new_part()  # this rank's finished shards and errors (distributed runs)
        self.fused = False  # pairs: write the fused vectors too

    def _bounds(self, k: int, count: int) -> tuple[int, int]:
        return k * self.size, min(count, (k + 1) * self.size)

    def embed(self, modality: str, items: Sequence[Item], done: set[int]) -> None:
        num_shards = self.manifest["modalities"][modality]["num_shards"]
        pending = [k for k in range(num_shards) if k not in done]
        pending = rank_shards(pending, self.world.rank, self.world.size)
        total = sum(end - start for start, end in (self._bounds(k, len(items)) for k in pending))
        unit = {"images": "img", "texts": "txt", PAIRS: "pair"}[modality]
        quiet = not self.progress or not self.world.is_main
        with tqdm(total=total, desc=modality, unit=unit, disable=quiet) as bar:
            if modality == "images":
                self._images(items, pending, bar)
            elif modality == PAIRS:
                self._pairs(items, pending, bar)
            else:
                self._texts(items, pending, bar)

    def _images(self, items: Sequence[Item], pending: list[int], bar: tqdm) -> None:
        batches: list[list[int]] = []
        left: dict[int, int] = {}
        for k in pending:
            start, end = self._bounds(k, len(items))
            for b in range(start, end, self.batch_size):
                batches.append(list(range(b, min(end, b + self.batch_size))))
                left[k] = left.get(k, 0) + 1
        if not batches:
            return
        buffers: dict[int, _ShardBuffer] = {}
        refs = [item.ref for item in items]
        stream, plan = self._image_stream(refs, batches)
        waited = 0.0  # seconds the model spent waiting for decoded batches
        started = time.perf_counter()
        with OrderedWriter() as writer, model_threads(self.mapper, plan.model_threads):
            for batch, embeddings, wait in _lagged(stream, self._start_images):
                waited += wait
                k = (batch.positions or [p for p, _ in batch.failures])[0] // self.size
                buffer = buffers.setdefault(
                    k, _ShardBuffer(*self._bounds(k, len(items)), self.mapper.dim)
                )
                if embeddings is not None:
                    buffer.put(batch.positions, embeddings)
                buffer.failures.extend(batch.failures)
                bar.update(len(batch.positions) + len(batch.failures))
                bar.set_postfix(
                    data_wait=f"{waited / (time.perf_counter() - started):.0%}", refresh=False
                )
                left[k] -= 1
                if not left[k]:
                    writer.submit(self._finish("images", k, items, buffers.pop(k)))

    def _start_images(self, batch: ImageBatch) -> Pending | None:
        if batch.pixel_values is None:
            return None
        return self.mapper.start_images(batch.pixel_values)

    def _image_stream(
        self, refs: list, batches: list[list[int]]
    ) -> tuple[Iterator[ImageBatch], DecodePlan]:
        """Decoded batches, and how the cores are split. With ``workers`` left to ``extract()``,
        the first batch is decoded on one core and embedded, timed, and the plan for the rest
        follows from those costs (:func:`xmodal.extract.plan.plan_decoding`)."""
        channels_last = self.mapper.channels_last
        accelerated = self.mapper.device.type == "cuda"
        cores = local_cores()
        if self.workers is not None:
            plan = explicit_plan(self.workers, cores, accelerated)
            return self._decoder(refs, batches, plan), plan
        before = time.perf_counter()
        first = next(
            iter(ThreadedImageBatches(refs, self.processor, batches[:1], 0, channels_last))
        )
        decode_s = (time.perf_counter() - before) / len(batches[0])
        model_s = None
        if first.pixel_values is not None:
            before = time.perf_counter()
            pending = self.mapper.start_images(first.pixel_values)
            embeddings = pending.result()
            model_s = (time.perf_counter() - before) / len(first.positions)
        plan = plan_decoding(cores, accelerated, decode_s, model_s)
        log.info("extract: %s -> %s", plan.reason, plan)

        def stream() -> Iterator[ImageBatch]:
            yield _Embedded(first, None if first.pixel_values is None else embeddings)
            yield from self._decoder(refs, batches[1:], plan)

        return stream(), plan

    def _decoder(self, refs: list, batches: list[list[int]], plan: DecodePlan):
        channels_last = self.mapper.channels_last
        if plan.workers:
            pin = self.mapper.device.type == "cuda"
            return iter(
                image_loader(refs, self.processor, batches, plan.workers, channels_last, pin)
            )
        ahead = 0 if plan.take_turns else 1
        return iter(
            ThreadedImageBatches(refs, self.processor, batches, plan.threads, channels_last, ahead)
        )

    def _texts(self, items: Sequence[Item], pending: list[int], bar: tqdm) -> None:
        def tokenised() -> Iterator[tuple[int, list[TextBatch]]]:
            for k in pending:
                start, end = self._bounds(k, len(items))
                positions = range(start, end)
                yield k, list(text_batches(items, positions, self.processor, self.batch_size))

        # The next shard is tokenised in a thread while this one is embedded; on a CPU model
        # with few cores, between two shards instead (on all cores: the fast tokenizers' own
        # threads), as images are decoded there (:func:`xmodal.extract.plan.take_turns`).
        turns = take_turns(local_cores(), self.mapper.device.type == "cuda")
        ahead = 0 if turns else 1
        with OrderedWriter() as writer:
            for k, batches in run_ahead(tokenised(), ahead=ahead, name="xmodal-tokenise"):
                buffer = _ShardBuffer(*self._bounds(k, len(items)), self.mapper.dim)
                for batch, embeddings, _ in _lagged(iter(batches), self._start_texts):
                    buffer.put(batch.positions, embeddings)
                    bar.update(len(batch.positions))
                writer.submit(self._finish("texts", k, items, buffer))

    def _start_texts(self, batch: TextBatch) -> Pending:
        return self.mapper.start_texts(batch.input_ids, batch.attention_mask)

    def _finish(
        self, modality: str, k: int, items: Sequence[Item], buffer: _ShardBuffer
    ) -> Callable[[], None]:
        """Shard k's table and records, built here, in the model's thread between two batches;
        the returned job writes the shard, then the error log, then the manifest (in that order,
        for resuming) in the background writer's thread, one shard after another in their order.
        Building them there would hold the GIL the model's thread needs between its calls."""
        file = shard_name(modality, k)
        rows = [buffer.start + i for i in np.flatnonzero(buffer.ok)]
        chosen = [items[p] for p in rows]
        if modality == "images":
            extra = {"location": [location(item.ref) for item in chosen]}
        else:
            extra = {"image_id": [item.image_id for item in chosen]}
        table = shard_table(
            self.out / file,
            [item.id for item in chosen],
            [item.source for item in chosen],
            buffer.rows[buffer.ok],
            self.manifest["dtype"],
            extra,
        )
        failures = [
            {
                "modality": modality,
                "shard": file,
                "id": items[position].id,
                "source": items[position].source,
                "reason": reason,
            }
            for position, reason in sorted(buffer.failures)
        ]
        entry = _shard_entry(k, file, buffer, len(rows))

        def write() -> None:
            write_table_atomic(self.out / file, table)
            self._record_shard(modality, k, entry, failures)

        return write

    def _pairs(self, items: Sequence[PairItem], pending: list[int], bar: tqdm) -> None:
        """Score the pending shards' pairs: images decoded in the workers, captions bucketed by
        length within a shard, then both towers, the fusion and the ITM head per batch."""
        bounds = [(k, *self._bounds(k, len(items))) for k in pending]
        plan = plan_pairs(items, bounds, self.processor, self.batch_size)
        buffers = {
            k: PairBuffer(start, end, self.mapper.dim, self.fused) for k, start, end in bounds
        }
        for k, refused in plan.refused.items():
            buffers[k].failures.extend(refused)
            bar.update(len(refused))
        for k in [k for k in pending if not plan.batches_left.get(k)]:
            self._finish_pairs(k, items, buffers.pop(k))  # nothing usable in this shard
        if not plan.batches:
            return
        refs = [item.ref for item in items]
        accelerated = self.mapper.device.type == "cuda"
        if self.workers is None:  # costs unmeasured: a decode thread ahead (or GPU workers)
            decoding = plan_decoding(local_cores(), accelerated)
        else:
            decoding = explicit_plan(self.workers, local_cores(), accelerated)
        loader = self._decoder(refs, plan.batches, decoding)
        with model_threads(self.mapper, decoding.model_threads):
            self._score_pairs(items, plan, buffers, loader, bar)

    def _score_pairs(
        self,
        items: Sequence[PairItem],
        plan: Any,
        buffers: dict[int, PairBuffer],
        loader: Iterator[ImageBatch],
        bar: tqdm,
    ) -> None:
        for k, batch in zip(plan.shard_of_batch, loader, strict=True):
            buffer = buffers[k]
            if batch.pixel_values is not None:
                rows = plan.token_row[np.asarray(batch.positions, dtype=np.int64)]
                input_ids, attention_mask = plan.tokens.batch(rows)
                scores = mapper_pairs(
                    self.mapper, batch.pixel_values, input_ids, attention_mask, self.fused
                )
                buffer.put(batch.positions, scores)
            buffer.failures.extend((p, f"image: {reason}") for p, reason in batch.failures)
            bar.update(len(batch.positions) + len(batch.failures))
            plan.batches_left[k] -= 1
            if not plan.batches_left[k]:
                self._finish_pairs(k, items, buffers.pop(k))

    def _finish_pairs(self, k: int, items: Sequence[PairItem], buffer: PairBuffer) -> None:
        """Write pairs shard k, then the error log and the manifest, as :meth:`_finish` does."""
        file = shard_name(PAIRS, k)
        record = self.manifest["modalities"][PAIRS]
        rows = write_pair_shard(
            self.out / file, items, buffer, record["scores"], self.manifest["dtype"]
        )
        failures = [
            {
                "modality": PAIRS,
                "shard": file,
                "id": items[position].id,
                "source": items[position].source,
                "caption": items[position].caption,
                "row": items[position].row,
                "reason": reason,
            }
            for position, reason in sorted(buffer.failures)
        ]
        entry = _shard_entry(k, file, buffer, rows)
        self._record_shard(PAIRS, k, entry, failures)

    def _record_shard(
        self, kind: str, k: int, entry: dict[str, Any], failures: list[dict[str, Any]]
    ) -> None:
        """Record a written shard: this rank's part file (torchrun), else errors + manifest."""
        if self.world.distributed:  # rank 0 writes the manifest once all ranks are done
            self.part["shards"][kind].append(entry)
            self.part["errors"] += failures
            save_part(self.out, self.world.rank, self.part)
        else:
            self.errors += failures
            save_errors(self.out, self.errors)
            record = self.manifest["modalities"][kind]
            record["shards"] = sorted([*record["shards"], entry], key=lambda e: e["index"])
            save_manifest(self.out, self.manifest)
        if self.on_shard is not None:
            self.on_shard(kind, k)
