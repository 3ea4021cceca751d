"""``xmodal extract --engine ray``: the same shards, manifest, error log and resume as the plain
run, with the model in a pool of Ray actors (one per GPU, or one per node on CPUs).

The driver plans the shards exactly as :func:`xmodal.extract.runner.extract` does (same items,
same shard boundaries, same resume state) and sends each pending shard's items to an actor. An
actor loads the model once and embeds a whole shard with the plain runner's own code (decoding,
batching, the decode plan, the mapper), returning the shard's arrays instead of writing them.
The driver alone writes: each shard atomically with the plain runner's writer, in shard order,
then the error log and the manifest after each shard, so a killed driver resumes as a killed
plain run does, and a shard is written once however often its task ran.

Decoding (images and pairs) runs where the plain run's does, inside each actor, or with
``decode_tasks`` as Ray CPU tasks, one a batch (:class:`TaskDecoder`): the plain run's decoding
and normalising, fed to the actor's model through the object store, ``decode_tasks`` batches in
flight per actor, so decoding scales over the cluster's CPUs apart from the towers' GPUs.

Fault tolerance: an actor that dies (killed, out of memory, its node removed) is restarted by
Ray (``max_restarts``) and the calls it had queued are retried (``max_task_retries``); a shard
whose task still fails that way is sent again, to any actor, up to :data:`SHARD_ATTEMPTS` times.
A decode task whose worker dies is run again by Ray (:data:`DECODE_RETRIES`). Memory stays
bounded: at most ``2 * actors`` shards are in flight or waiting to be written, and at most
``decode_tasks`` decoded batches per actor.

``ray`` is an optional extra (``pip install 'xmodal[ray]'``), imported only when this engine
runs. The model must be readable at the same path on every node, the data at the same paths
or at URLs every node can reach (fsspec: ``xmodal.storage``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from tqdm import tqdm

from xmodal.data.images import ImageBatch, ThreadedImageBatches
from xmodal.distributed import World
from xmodal.errors import ExtractError, MissingDependencyError, XmodalError
from xmodal.extract.mapper import EmbeddingMapper, MapperOptions, filter_weight
from xmodal.extract.pipeline import (
    ExtractSettings,
    ModalityStrategy,
    ShardBuffer,
    ShardRun,
    model_threads,
)
from xmodal.extract.plan import local_cores
from xmodal.extract.runner import STRATEGIES, check_options, open_extraction
from xmodal.extract.writer import ShardHook
from xmodal.presets import load_model
from xmodal.processing import MultimodalProcessor

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'xmodal[ray]'"
SHARD_ATTEMPTS = 3  # times the driver sends one shard (each with Ray's own retries)
ACTOR_RESTARTS = 4  # times Ray restarts a dead actor
TASK_RETRIES = 2  # times Ray retries a call whose actor died
WAIT_WARNING_S = 120  # a warning when no shard finishes for this long
IN_FLIGHT_PER_ACTOR = 2  # shards queued per actor: the next one waits while one runs
DECODE_RETRIES = 3  # times Ray runs a decode task again when its worker dies
DECODE_TASK_CPUS = 1  # what a decode task reserves


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
    nodes: list[dict[str, float]],
    options: MapperOptions,
    actors: int | None,
    decode_tasks: int = 0,
) -> ActorSpec:
    """The pool for a cluster whose alive nodes have the resources ``nodes``: one actor per GPU
    when the model may run on one and there are GPUs, each with its share of its node's cores
    (the fewest CPUs per GPU of any node; it decodes for its GPU), or one core when Ray tasks
    decode (``decode_tasks``: the other cores are theirs); else one actor per node, which uses
    all of the node's cores (a CPU model's fastest split). ``actors`` overrides the count."""
    if actors is not None and actors < 1:
        raise ExtractError(f"ray actors must be >= 1, got {actors}")
    if decode_tasks < 0:
        raise ExtractError(f"ray decode tasks must be >= 0, got {decode_tasks}")
    gpus = sum(int(n.get("GPU", 0)) for n in nodes)
    wants_gpu = options.device == "auto" or options.device.startswith("cuda")
    if wants_gpu and gpus and decode_tasks:
        return ActorSpec(actors or gpus, 1, 1, 1)
    if wants_gpu and gpus:
        shares = [int(n.get("CPU", 0)) // int(n["GPU"]) for n in nodes if n.get("GPU", 0) >= 1]
        cores = max(1, min(shares))
        return ActorSpec(actors or gpus, cores, 1, cores)
    if options.device.startswith("cuda"):
        raise ExtractError(f"--device {options.device}: the Ray cluster has no GPU")
    return ActorSpec(actors or max(1, len(nodes)), 1, 0)


def decode_batch(
    processor: MultimodalProcessor, images: Sequence[Any], channels_last: bool
) -> ImageBatch:
    """``images`` decoded, cropped and normalised into one batch (positions: their indices):
    the plain run's decoding (:class:`ThreadedImageBatches`), in a Ray task's thread."""
    (batch,) = ThreadedImageBatches(images, processor, [range(len(images))], 0, channels_last)
    return batch


class TaskDecoder:
    """An :data:`xmodal.extract.pipeline.ImageDecoder` whose batches are decoded by Ray tasks
    (:func:`decode_batch`, one a batch, :data:`DECODE_TASK_CPUS` each, run again when their
    worker dies), ``ahead`` in flight, collected in order: this consumer holds the batch it
    works on and at most ``ahead`` more, decoded or being decoded."""

    def __init__(
        self, ray: Any, processor: MultimodalProcessor, mapper: EmbeddingMapper, ahead: int
    ):
        self.ray = ray
        self.processor = ray.put(MultimodalProcessor(processor.config))  # no tokenizer to ship
        self.task = ray.remote(decode_batch).options(
            num_cpus=DECODE_TASK_CPUS, max_retries=DECODE_RETRIES
        )
        self.channels_last = mapper.channels_last
        self.pin = mapper.device.type == "cuda"  # as the plain run's loader for a GPU
        self.ahead = max(1, ahead)

    def __call__(self, refs: Sequence[Any], batches: list[list[int]]) -> Iterator[ImageBatch]:
        waiting = iter(batches)
        flight: deque[tuple[list[int], Any]] = deque()

        def submit(positions: list[int]) -> None:
            images = [refs[p] for p in positions]
            flight.append((positions, self.task.remote(self.processor, images, self.channels_last)))

        for positions in islice(waiting, self.ahead):
            submit(positions)
        while flight:
            positions, ref = flight.popleft()
            following = next(waiting, None)
            if following is not None:  # keep ``ahead`` in flight while this one is collected
                submit(following)
            local = self.ray.get(ref)
            del ref  # its object is freed once collected
            batch = ImageBatch(
                [positions[i] for i in local.positions],
                local.pixel_values,
                [(positions[i], reason) for i, reason in local.failures],
            )
            yield batch.pin_memory() if self.pin and batch.pixel_values is not None else batch


class MapperActor:
    """A Ray actor holding one copy of the model; :meth:`shard` embeds one shard with the plain
    run's strategy for its modality (one per run's settings, kept: an image strategy keeps the
    decoding it planned on its first shard). With ``decode_tasks``, images are decoded by Ray
    tasks (:class:`TaskDecoder`) and the model keeps the actor's cores. A user's error in
    loading the model here (say, ``onnx_dir`` missing on this node) is raised by each call,
    where the driver gets it as itself; raised here, Ray would only report the actor dead, with
    the traceback as text."""

    def __init__(
        self,
        model: str,
        options: MapperOptions | None,
        cores: int | None = None,
        decode_tasks: int = 0,
    ):
        self.decode_tasks = decode_tasks
        if cores:  # this actor's share of the node: local_cores() divides by LOCAL_WORLD_SIZE
            os.environ["LOCAL_WORLD_SIZE"] = str(max(1, (os.cpu_count() or 1) // cores))
        self.strategies: dict[tuple[ExtractSettings, str], ModalityStrategy] = {}
        self.failed: XmodalError | None = None
        try:
            net, self.processor = load_model(model)
            self.mapper = EmbeddingMapper(net, options, self.processor)
        except XmodalError as err:
            self.failed = err

    def shard(
        self, settings: ExtractSettings, modality: str, items: Sequence[Any], start: int
    ) -> ShardBuffer:
        """Embed ``items``, a whole shard whose first item is item ``start`` of the run, as
        shard 0 of their own; the buffer returned holds the run's positions."""
        if self.failed is not None:
            raise self.failed
        strategy = self.strategies.get((settings, modality))
        if strategy is None:
            model = self.mapper.model
            weight = filter_weight(model) if model.has_itm else None
            tools = settings.tools(self.processor, self.mapper, model.has_itm, weight)
            if self.decode_tasks:
                import ray

                decoder = TaskDecoder(ray, self.processor, self.mapper, self.decode_tasks)
                tools = dataclasses.replace(tools, workers=0, decoder=decoder)
            strategy = self.strategies[settings, modality] = STRATEGIES[modality](tools)
        with model_threads(self.mapper, local_cores()):
            ((_, buffer),) = strategy.embedded(items, [0])
        buffer.start += start
        buffer.end += start
        buffer.failures = [(p + start, reason) for p, reason in buffer.failures]
        return buffer

    def pid(self) -> int:
        """This actor's process id."""
        return os.getpid()


class MapperPool:
    """Mapper actors for ``model`` on a Ray cluster, started once for one or more runs (a
    context manager). ``address``: an existing cluster; default: the one this process joined,
    else one started here (and stopped by :meth:`close`). ``actors``: see :func:`actor_spec`;
    ``decode_tasks``: batches each actor has decoded ahead by Ray tasks (0: it decodes them)."""

    def __init__(
        self,
        model: str | Path,
        options: MapperOptions | None = None,
        *,
        address: str | None = None,
        actors: int | None = None,
        decode_tasks: int = 0,
    ):
        self.ray = import_ray()
        self.model = str(model)
        self.decode_tasks = decode_tasks
        self.options = options or MapperOptions()
        self.options.validate()
        self.started = _join(self.ray, address)
        self.actors: list[Any] = []
        try:
            nodes = [n["Resources"] for n in self.ray.nodes() if n.get("Alive")]
            spec = actor_spec(nodes, self.options, actors, decode_tasks)
            remote = self.ray.remote(MapperActor).options(
                num_cpus=spec.num_cpus,
                num_gpus=spec.num_gpus,
                max_restarts=ACTOR_RESTARTS,
                max_task_retries=TASK_RETRIES,
                scheduling_strategy="SPREAD",
            )
            self.actors = [
                remote.remote(self.model, self.options, spec.cores, decode_tasks)
                for _ in range(spec.count)
            ]
        except BaseException:
            self.close()
            raise
        log.info("extract --engine ray: %s, %d decode tasks an actor", spec, decode_tasks)

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
    decode_tasks: int = 0,
    pool: MapperPool | None = None,
) -> dict[str, Any]:
    """:func:`xmodal.extract.runner.extract` on a Ray cluster: the same arguments and output,
    plus ``address``, ``actors`` and ``decode_tasks`` for the :class:`MapperPool` started for
    this run, or a ``pool`` of ``model``'s actors started already (left open)."""
    import_ray()
    if pool is not None and pool.model != str(model):
        raise ExtractError(f"the Ray pool holds the model {pool.model}, not {model}")
    if workers is not None and (decode_tasks or (pool is not None and pool.decode_tasks)):
        raise ExtractError("--workers and --ray-decode-tasks: images are decoded in one place")
    modalities = check_options(modality, shard_size, dtype, batch_size, workers, fused)
    options = options or MapperOptions()
    options.validate()
    settings = ExtractSettings(batch_size, workers, dtype, shard_size, fused)
    world = World()
    # The actors hold the model; here the strategies only plan, and write what they return.
    job = open_extraction(
        model,
        data,
        out,
        modalities,
        settings,
        lambda net, processor: None,
        data_format,
        skip_bad,
        world,
        on_shard,
    )
    run = ShardRun(job.out, job.tools, job.shards, progress, world)
    pending = [run.pending(s, set(job.done[s.name])) for s in job.strategies]
    if any(pending):
        own = pool is None
        if pool is None:
            pool = MapperPool(
                model, options, address=address, actors=actors, decode_tasks=decode_tasks
            )
        try:
            for strategy, chosen, shards in zip(job.strategies, job.items, pending, strict=True):
                _embed(pool, settings, run, strategy, chosen, shards)
        finally:
            if own:
                pool.close()
    return job.shards.close()


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
    settings: ExtractSettings,
    run: ShardRun,
    strategy: ModalityStrategy,
    items: Sequence[Any],
    pending: list[int],
) -> None:
    """Send the pending shards to the actors, at most ``IN_FLIGHT_PER_ACTOR`` each, and write
    each finished shard once, in shard order, keeping at most ``IN_FLIGHT_PER_ACTOR * actors``
    shards in flight or waiting to be written."""
    ray = pool.ray
    from ray.exceptions import RayActorError, WorkerCrashedError

    actors = pool.actors
    limit = IN_FLIGHT_PER_ACTOR * len(actors)
    todo = deque(pending)
    order = deque(pending)
    flight: dict[Any, tuple[int, int]] = {}  # ref -> (shard, actor)
    load = [0] * len(actors)
    attempts = dict.fromkeys(pending, 0)
    finished: dict[int, ShardBuffer] = {}
    bounds = run.tools.bounds(pending, len(items))
    total = sum(end - start for _, start, end in bounds)
    quiet = not run.progress

    def submit(k: int) -> None:
        a = min(range(len(actors)), key=load.__getitem__)
        start, end = run.tools.shard_range(k, len(items))
        attempts[k] += 1
        ref = actors[a].shard.remote(settings, strategy.name, list(items[start:end]), start)
        flight[ref] = (k, a)
        load[a] += 1

    with tqdm(total=total, desc=strategy.name, unit=strategy.unit, disable=quiet) as bar:
        while order:
            while todo and len(flight) + len(finished) < limit:
                submit(todo.popleft())
            while order and order[0] in finished:
                k = order.popleft()
                buffer = finished.pop(k)
                _write(run, strategy, k, items, buffer)
                bar.update(buffer.end - buffer.start)
            if not order or not flight:
                continue
            ready, _ = ray.wait(list(flight), num_returns=1, timeout=WAIT_WARNING_S)
            if not ready:
                log.warning(
                    "%s: no shard finished in %d s; are the actors placed? (`ray status`)",
                    strategy.name,
                    WAIT_WARNING_S,
                )
                continue
            ref = ready[0]
            k, a = flight.pop(ref)
            load[a] -= 1
            try:
                finished[k] = _result(ray, ref)
            except (RayActorError, WorkerCrashedError) as exc:
                if attempts[k] >= SHARD_ATTEMPTS:
                    raise ExtractError(
                        f"{strategy.name} shard {k}: its Ray task failed {attempts[k]} times: {exc}"
                    ) from exc
                log.warning(
                    "%s shard %d: Ray task lost (%s); sending it again",
                    strategy.name,
                    k,
                    type(exc).__name__,
                )
                todo.appendleft(k)


def _result(ray: Any, ref: Any) -> Any:
    """``ray.get(ref)``; an error of the user's (an :class:`XmodalError`) that the task raised
    is raised here as itself, not wrapped in Ray's error with the actor's traceback."""
    from ray.exceptions import RayTaskError

    try:
        return ray.get(ref)
    except RayTaskError as exc:
        if isinstance(exc.cause, XmodalError):
            raise exc.cause from None
        raise


def _write(
    run: ShardRun, strategy: ModalityStrategy, k: int, items: Sequence[Any], buffer: ShardBuffer
) -> None:
    """Write shard k, then record it (error log, manifest) as the plain run does."""
    run.shard_job(strategy, k, items, buffer)()
