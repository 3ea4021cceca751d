"""``xmodal extract --engine ray``: the same shards, manifest, error log and resume as the plain
run, with the model in a pool of Ray actors (one per GPU, or one per node on CPUs).

The driver plans the shards exactly as :func:`xmodal.extract.runner.extract` does (same items,
same shard boundaries, same resume state) and sends each pending shard's items to an actor. An
actor loads the model once and embeds a whole shard with the plain runner's own code (decoding,
batching, the decode plan, the mapper), returning the shard's arrays instead of writing them.
The driver alone writes: each shard atomically with the plain runner's writer, in shard order,
then the error log and the manifest after each shard, so a killed driver resumes as a killed
plain run does, and a shard is written once however often its task ran.

Fault tolerance: an actor that dies (killed, out of memory, its node removed) is restarted by
Ray (``max_restarts``) and the calls it had queued are retried (``max_task_retries``); a shard
whose task still fails that way is sent again, to any actor, up to :data:`SHARD_ATTEMPTS` times.
Memory stays bounded: at most ``2 * actors`` shards are in flight or waiting to be written.

``ray`` is an optional extra (``pip install 'xmodal[ray]'``), imported only when this engine
runs. The data and the model must be readable at the same paths on every node.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from xmodal.data.datasets import load_dataset
from xmodal.data.images import ImageBatch
from xmodal.data.skipped import save_skipped
from xmodal.distributed import World
from xmodal.errors import ExtractError, MissingDependencyError
from xmodal.extract.mapper import EmbeddingMapper, MapperOptions
from xmodal.extract.pairs import PAIRS, PairBuffer, check_fused, pairs_record
from xmodal.extract.plan import DecodePlan, local_cores
from xmodal.extract.runner import (
    ShardHook,
    _check_options,
    _items,
    _modality_record,
    _open_manifest,
    _resume_state,
    _Run,
    _ShardBuffer,
    model_threads,
)
from xmodal.extract.writer import save_manifest
from xmodal.models.identity import identify
from xmodal.presets import load_model

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'xmodal[ray]'"
SHARD_ATTEMPTS = 3  # times the driver sends one shard (each with Ray's own retries)
ACTOR_RESTARTS = 4  # times Ray restarts a dead actor
TASK_RETRIES = 2  # times Ray retries a call whose actor died
WAIT_WARNING_S = 120  # a warning when no shard finishes for this long
IN_FLIGHT_PER_ACTOR = 2  # shards queued per actor: the next one waits while one runs

Buffer = _ShardBuffer | PairBuffer


def import_ray() -> Any:
    """The ``ray`` module, or a one-line MissingDependencyError saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise MissingDependencyError(f"--engine ray needs Ray ({exc}): {INSTALL_HINT}") from exc
    return ray


@dataclass(frozen=True)
class ActorSpec:
    """How many mapper actors, and what each reserves from the cluster. ``cores``: the host
    cores an actor's decoding and model use (None: all of its node's)."""

    count: int
    num_cpus: float
    num_gpus: float
    cores: int | None = None


def actor_spec(
    nodes: list[dict[str, float]], options: MapperOptions, actors: int | None
) -> ActorSpec:
    """The pool for a cluster whose alive nodes have the resources ``nodes``: one actor per GPU
    when the model may run on one and there are GPUs, each with its share of its node's cores
    (the fewest CPUs per GPU of any node; it decodes for its GPU); else one actor per node,
    which uses all of the node's cores (a CPU model's fastest split). ``actors`` overrides the
    count."""
    if actors is not None and actors < 1:
        raise ExtractError(f"ray actors must be >= 1, got {actors}")
    gpus = sum(int(n.get("GPU", 0)) for n in nodes)
    wants_gpu = options.device == "auto" or options.device.startswith("cuda")
    if wants_gpu and gpus:
        shares = [int(n.get("CPU", 0)) // int(n["GPU"]) for n in nodes if n.get("GPU", 0) >= 1]
        cores = max(1, min(shares))
        return ActorSpec(actors or gpus, cores, 1, cores)
    if options.device.startswith("cuda"):
        raise ExtractError(f"--device {options.device}: the Ray cluster has no GPU")
    return ActorSpec(actors or max(1, len(nodes)), 1, 0)


@dataclass(frozen=True)
class ShardSettings:
    """What one run asks of the actors for each shard (the rest is the pool's model)."""

    batch_size: int
    workers: int | None
    shard_size: int
    dtype: str
    fused: bool


class _ShardRun(_Run):
    """The plain runner's embedding of one shard, keeping the shard's buffer instead of writing
    it (the driver writes). The decode plan measured on the first image shard is kept."""

    def __init__(self, mapper: EmbeddingMapper, processor: Any, settings: ShardSettings):
        manifest = {"shard_size": settings.shard_size, "dtype": settings.dtype, "modalities": {}}
        super().__init__(
            Path("."),
            manifest,
            processor,
            mapper,
            [],
            settings.batch_size,
            settings.workers,
            False,
            None,
        )
        self.fused = settings.fused
        self.plan: DecodePlan | None = None
        self.captured: Buffer | None = None

    def shard(self, modality: str, items: Sequence[Any], start: int) -> Buffer:
        """Embed ``items`` (a whole shard whose first item is at ``start``) as shard 0 of a
        run of their own, then move the buffer to the shard's real positions."""
        self.manifest["modalities"] = {modality: {"num_shards": 1}}
        self.captured = None
        self.embed(modality, items, set())
        buffer = self.captured
        if buffer is None:
            raise ExtractError(f"{modality}: the shard at item {start} produced no result")
        buffer.start += start
        buffer.end += start
        buffer.failures = [(p + start, reason) for p, reason in buffer.failures]
        return buffer

    def _finish(self, modality, k, items, buffer):  # type: ignore[override]
        self.captured = buffer
        return lambda: None

    def _finish_pairs(self, k, items, buffer) -> None:  # type: ignore[override]
        self.captured = buffer

    def _image_stream(
        self, refs: list, batches: list[list[int]]
    ) -> tuple[Iterator[ImageBatch], DecodePlan]:
        if self.plan is not None:
            return self._decoder(refs, batches, self.plan), self.plan
        stream, self.plan = super()._image_stream(refs, batches)
        return stream, self.plan


class MapperActor:
    """A Ray actor holding one copy of the model; :meth:`shard` embeds one shard."""

    def __init__(self, model: str, options: MapperOptions | None, cores: int | None = None):
        if cores:  # this actor's share of the node: local_cores() divides by LOCAL_WORLD_SIZE
            os.environ["LOCAL_WORLD_SIZE"] = str(max(1, (os.cpu_count() or 1) // cores))
        net, self.processor = load_model(model)
        self.mapper = EmbeddingMapper(net, options, self.processor)
        self.runs: dict[ShardSettings, _ShardRun] = {}

    def shard(
        self, settings: ShardSettings, modality: str, items: Sequence[Any], start: int
    ) -> Buffer:
        run = self.runs.get(settings)
        if run is None:
            run = self.runs[settings] = _ShardRun(self.mapper, self.processor, settings)
        with model_threads(self.mapper, local_cores()):
            return run.shard(modality, items, start)

    def pid(self) -> int:
        """This actor's process id."""
        return os.getpid()


class MapperPool:
    """Mapper actors for ``model`` on a Ray cluster, started once for one or more runs (a
    context manager). ``address``: an existing cluster; default: the one this process joined,
    else one started here (and stopped by :meth:`close`). ``actors``: see :func:`actor_spec`."""

    def __init__(
        self,
        model: str | Path,
        options: MapperOptions | None = None,
        *,
        address: str | None = None,
        actors: int | None = None,
    ):
        self.ray = import_ray()
        self.model = str(model)
        self.options = options or MapperOptions()
        self.options.validate()
        self.started = _join(self.ray, address)
        self.actors: list[Any] = []
        try:
            nodes = [n["Resources"] for n in self.ray.nodes() if n.get("Alive")]
            spec = actor_spec(nodes, self.options, actors)
            remote = self.ray.remote(MapperActor).options(
                num_cpus=spec.num_cpus,
                num_gpus=spec.num_gpus,
                max_restarts=ACTOR_RESTARTS,
                max_task_retries=TASK_RETRIES,
                scheduling_strategy="SPREAD",
            )
            self.actors = [
                remote.remote(self.model, self.options, spec.cores) for _ in range(spec.count)
            ]
        except BaseException:
            self.close()
            raise
        log.info("extract --engine ray: %s", spec)

    def close(self) -> None:
        """Stop the actors (and Ray, when this pool started it)."""
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []
        if self.started:
            self.ray.shutdown()
            self.started = False

    def __enter__(self) -> MapperPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def extract_ray(
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
    address: str | None = None,
    actors: int | None = None,
    pool: MapperPool | None = None,
) -> dict[str, Any]:
    """:func:`xmodal.extract.runner.extract` on a Ray cluster: the same arguments and output,
    plus ``address`` and ``actors`` for the :class:`MapperPool` started for this run, or a
    ``pool`` of ``model``'s actors started already (left open)."""
    import_ray()
    if pool is not None and pool.model != str(model):
        raise ExtractError(f"the Ray pool holds the model {pool.model}, not {model}")
    modalities = _check_options(modality, shard_size, dtype, batch_size, workers)
    if fused and PAIRS not in modalities:
        raise ExtractError("fused vectors are written for pairs only (--what pairs --fused)")
    options = options or MapperOptions()
    options.validate()
    net, processor = load_model(model)
    check_fused(net.has_itm, fused and PAIRS in modalities)
    identity = identify(net, processor, model)
    dim, has_itm = net.config.embed_dim, net.has_itm
    del net  # the actors hold the model; the driver only writes
    dataset = load_dataset(data, data_format, skip_bad)
    out = Path(out)
    manifest = _open_manifest(out, identity, dim, dtype, shard_size, data)
    items = {m: _items(m, dataset) for m in modalities}
    for m in modalities:
        if m == PAIRS:
            pairs_record(manifest, items[m], fused, has_itm, out)
        else:
            _modality_record(manifest, m, items[m], out, data)
    done, errors = _resume_state(out, manifest, World())
    manifest["skipped_rows"] = len(dataset.skipped)
    save_skipped(out, dataset.skipped)
    # The plain runner's writer, without a model: it builds and writes the shards, the error
    # log and the manifest, exactly as a plain run does.
    no_model: Any = None
    writer = _Run(
        out, manifest, processor, no_model, errors, batch_size, workers, progress, on_shard
    )
    writer.fused = fused
    pending = {
        m: [k for k in range(manifest["modalities"][m]["num_shards"]) if k not in done[m]]
        for m in modalities
    }
    settings = ShardSettings(batch_size, workers, shard_size, dtype, fused)
    if any(pending.values()):
        own = pool is None
        if pool is None:
            pool = MapperPool(model, options, address=address, actors=actors)
        try:
            for m in modalities:
                _embed(pool, settings, writer, m, items[m], pending[m], progress)
        finally:
            if own:
                pool.close()
    save_manifest(out, manifest)
    return manifest


def _join(ray: Any, address: str | None) -> bool:
    """Connect to the cluster; True when this call started Ray (and so shuts it down)."""
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(include_dashboard=False, log_to_driver=False)
    return True


def _embed(
    pool: MapperPool,
    settings: ShardSettings,
    writer: _Run,
    modality: str,
    items: Sequence[Any],
    pending: list[int],
    progress: bool,
) -> None:
    """Send the pending shards to the actors, at most ``IN_FLIGHT_PER_ACTOR`` each, and write
    each finished shard once, in shard order, keeping at most ``IN_FLIGHT_PER_ACTOR * actors``
    shards in flight or waiting to be written."""
    ray = pool.ray
    from ray.exceptions import RayActorError, WorkerCrashedError

    size = settings.shard_size
    actors = pool.actors
    limit = IN_FLIGHT_PER_ACTOR * len(actors)
    todo = deque(pending)
    order = deque(pending)
    flight: dict[Any, tuple[int, int]] = {}  # ref -> (shard, actor)
    load = [0] * len(actors)
    attempts = dict.fromkeys(pending, 0)
    finished: dict[int, Buffer] = {}
    total = sum(min(len(items), (k + 1) * size) - k * size for k in pending)
    unit = {"images": "img", "texts": "txt", PAIRS: "pair"}[modality]

    def submit(k: int) -> None:
        a = min(range(len(actors)), key=load.__getitem__)
        start, end = k * size, min(len(items), (k + 1) * size)
        attempts[k] += 1
        ref = actors[a].shard.remote(settings, modality, list(items[start:end]), start)
        flight[ref] = (k, a)
        load[a] += 1

    with tqdm(total=total, desc=modality, unit=unit, disable=not progress) as bar:
        while order:
            while todo and len(flight) + len(finished) < limit:
                submit(todo.popleft())
            while order and order[0] in finished:
                k = order.popleft()
                buffer = finished.pop(k)
                _write(writer, modality, k, items, buffer)
                bar.update(buffer.end - buffer.start)
            if not order or not flight:
                continue
            ready, _ = ray.wait(list(flight), num_returns=1, timeout=WAIT_WARNING_S)
            if not ready:
                log.warning(
                    "%s: no shard finished in %d s; are the actors placed? (`ray status`)",
                    modality,
                    WAIT_WARNING_S,
                )
                continue
            ref = ready[0]
            k, a = flight.pop(ref)
            load[a] -= 1
            try:
                finished[k] = ray.get(ref)
            except (RayActorError, WorkerCrashedError) as exc:
                if attempts[k] >= SHARD_ATTEMPTS:
                    raise ExtractError(
                        f"{modality} shard {k}: its Ray task failed {attempts[k]} times: {exc}"
                    ) from exc
                log.warning(
                    "%s shard %d: Ray task lost (%s); sending it again",
                    modality,
                    k,
                    type(exc).__name__,
                )
                todo.appendleft(k)


def _write(writer: _Run, modality: str, k: int, items: Sequence[Any], buffer: Buffer) -> None:
    """Write shard k, its error records and the manifest with the plain runner's writer."""
    if modality == PAIRS:
        writer._finish_pairs(k, items, buffer)  # type: ignore[arg-type]
    else:
        writer._finish(modality, k, items, buffer)()  # type: ignore[arg-type]
