"""The extraction pipeline's host side: the decode plan, decode threads, work run ahead and the
ordered background writer (no timings: only choices, values, order and errors)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_extract import make_image_folder, read_all, save_tiny_model, tiny_processor

from xmodal.data.images import DecodedImages, ImageCollator, ThreadedImageBatches
from xmodal.extract import extract, load_manifest
from xmodal.extract.background import OrderedWriter, run_ahead
from xmodal.extract.plan import (
    DecodePlan,
    best_share,
    decode_share,
    explicit_plan,
    local_cores,
    plan_decoding,
    take_turns,
)


# -- the plan ---------------------------------------------------------------------------------
def test_decode_share_and_cap_follow_the_costs():
    # 1 ms of decoding per image against 4 ms of model wall time on 2 cores (8 core-ms)
    assert decode_share(1e-3, 4e-3, 2) == pytest.approx(1 / 9)
    assert best_share(1e-3, 4e-3, 2) == pytest.approx(4 / 4.5)
    assert best_share(0.0, 4e-3, 2) == 1.0
    assert best_share(1e-3, 4e-3, 16) > best_share(1e-3, 4e-3, 2)  # more cores, higher cap


def test_on_two_cores_decode_threads_and_the_model_take_turns_on_every_core():
    # light or heavy decoding alike: one decode thread per core while the model waits, then
    # the model on every core with nothing beside it (m + d / cores, the cap itself)
    for decode_s in (0.6e-3, 4e-3, 8e-3, None):
        model_s = None if decode_s is None else 3.8e-3
        plan = plan_decoding(2, accelerated=False, decode_s=decode_s, model_s=model_s)
        assert plan.workers == 0 and plan.threads == 2 and plan.model_threads == 2
        assert plan.take_turns
    one = plan_decoding(1, accelerated=False, decode_s=4e-3, model_s=3.8e-3)
    assert one == DecodePlan(0, 0, 1, one.reason)  # decoded in the model's own thread


def test_host_work_takes_turns_only_for_a_cpu_model_on_two_cores():
    assert take_turns(2, accelerated=False)
    assert not take_turns(1, accelerated=False)  # nothing to share: the model's own thread
    assert not take_turns(4, accelerated=False)  # host work beside the model on its own cores
    assert not take_turns(2, accelerated=True)  # the host works while the GPU does


def test_light_decoding_on_many_cores_uses_threads_ahead_and_leaves_the_model_every_core():
    light = plan_decoding(16, accelerated=False, decode_s=0.6e-3, model_s=0.5e-3)  # 1.1 cores
    assert light.workers == 0 and light.threads == 2 and light.model_threads == 16
    assert not light.take_turns


def test_heavy_decoding_on_many_cores_gets_worker_processes():
    # 16 cores, big JPEGs: 12 ms of decoding per image against 0.5 ms of model wall time
    plan = plan_decoding(16, accelerated=False, decode_s=12e-3, model_s=0.5e-3)
    need = decode_share(12e-3, 0.5e-3, 16) * 16
    assert plan.workers == int(np.ceil(need)) and plan.threads == 0
    assert plan.model_threads == 16 - plan.workers and not plan.take_turns


def test_a_gpu_model_gets_every_core_but_one_for_decoding():
    assert plan_decoding(16, accelerated=True, decode_s=2e-3, model_s=0.1e-3).workers == 15
    assert plan_decoding(64, accelerated=True).workers == 32
    one = plan_decoding(1, accelerated=True)
    assert one.workers == 0 and one.threads == 1


def test_unmeasured_and_explicit_plans():
    assert plan_decoding(8, accelerated=False) == DecodePlan(
        0, 1, 8, plan_decoding(8, False).reason
    )
    assert plan_decoding(1, accelerated=False).threads == 0
    assert explicit_plan(1, 2, accelerated=False).model_threads == 2  # light decoding: share
    assert explicit_plan(4, 16, accelerated=False).model_threads == 12
    assert explicit_plan(0, 2, accelerated=False) == DecodePlan(0, 0, 2, "workers chosen")


def test_local_cores_are_split_between_the_ranks_of_a_node(monkeypatch):
    from xmodal.extract import plan

    monkeypatch.setattr(plan.os, "cpu_count", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert local_cores() == 4
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert local_cores() == 16


# -- decode threads ---------------------------------------------------------------------------
@pytest.fixture()
def image_refs(tmp_path):
    rng = np.random.default_rng(0)
    refs = []
    for i in range(7):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (40 + 6 * i, 70, 3), dtype=np.uint8)).save(path)
        refs.append(str(path))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    refs.insert(3, str(tmp_path / "bad.png"))
    return refs


@pytest.mark.parametrize(("threads", "ahead"), [(0, 1), (1, 2), (3, 2), (2, 0), (3, 0)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_threaded_batches_equal_the_collated_ones(
    processor, image_refs, threads, ahead, channels_last
):
    batches = [[0, 1, 2], [3, 4, 5], [6, 7]]
    collate = ImageCollator(processor, channels_last)
    decoded = DecodedImages(image_refs, processor)
    want = [collate([decoded[i] for i in b]) for b in batches]
    got = list(
        ThreadedImageBatches(image_refs, processor, batches, threads, channels_last, ahead=ahead)
    )
    assert len(got) == len(want) == 3
    for g, w in zip(got, want, strict=True):
        assert g.positions == w.positions
        assert [p for p, _ in g.failures] == [p for p, _ in w.failures]
        assert [r for _, r in g.failures] == [r for _, r in w.failures]
        assert torch.equal(g.pixel_values, w.pixel_values)  # the same float32 operations
        assert g.pixel_values.is_contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format
        )
    assert got[1].positions == [4, 5] and got[1].failures[0][0] == 3


def test_threaded_batch_of_undecodable_images_only(processor, tmp_path):
    (tmp_path / "a.png").write_bytes(b"no")
    refs = [str(tmp_path / "a.png"), str(tmp_path / "missing.png")]
    (batch,) = ThreadedImageBatches(refs, processor, [[0, 1]], threads=2)
    assert batch.pixel_values is None and batch.positions == []
    assert [p for p, _ in batch.failures] == [0, 1]


# -- run ahead, ordered writer ----------------------------------------------------------------
def test_run_ahead_keeps_order_and_produces_ahead():
    produced = []

    def items():
        for i in range(6):
            produced.append(i)
            yield i

    seen = []
    for item in run_ahead(items(), ahead=2):
        if item == 0:
            deadline = time.monotonic() + 5
            while len(produced) < 3 and time.monotonic() < deadline:
                time.sleep(0.001)
            assert len(produced) == 3  # item 0 taken, items 1 and 2 waiting in their slots
        seen.append(item)
    assert seen == list(range(6))
    assert list(run_ahead(iter(range(4)), ahead=0)) == [0, 1, 2, 3]


def test_run_ahead_raises_the_producers_error_with_its_type():
    def items():
        yield 1
        raise KeyError("bad caption")

    got = []
    with pytest.raises(KeyError, match="bad caption"):
        for item in run_ahead(items()):
            got.append(item)
    assert got == [1]


def test_run_ahead_stops_its_thread_when_the_consumer_leaves():
    before = threading.active_count()
    for item in run_ahead(iter(range(1000)), ahead=1):
        if item == 3:
            break
    assert threading.active_count() == before


def test_ordered_writer_runs_jobs_in_order_and_stops_at_the_first_error():
    done = []
    with OrderedWriter(depth=1) as writer:
        for i in range(5):
            writer.submit(lambda i=i: done.append(i))
    assert done == [0, 1, 2, 3, 4]

    done.clear()

    def fail() -> None:
        raise OSError("disk full")

    writer = OrderedWriter(depth=4)
    writer.submit(lambda: done.append("a"))
    writer.submit(fail)
    writer.submit(lambda: done.append("never"))  # queued behind the failure: dropped
    with pytest.raises(OSError, match="disk full"):
        writer.close()
    assert done == ["a"]


def test_ordered_writer_raises_at_the_next_submit():
    writer = OrderedWriter()
    writer.submit(lambda: 1 / 0)
    deadline = time.monotonic() + 5
    while writer._error is None and time.monotonic() < deadline:
        time.sleep(0.001)
    with pytest.raises(ZeroDivisionError):
        writer.submit(lambda: None)
    writer.close()


# -- extract() with the planned pipeline --------------------------------------------------------
@pytest.mark.parametrize("cores", [2, 4])  # decode threads taking turns / running ahead
def test_automatic_plan_writes_the_rows_of_the_serial_path(
    tmp_path: Path, minilm_tokenizer, minilm_path: str, monkeypatch, cores: int
) -> None:
    from xmodal.extract import runner

    plans = []
    planner = runner.plan_decoding
    monkeypatch.setattr(runner, "local_cores", lambda: cores)
    monkeypatch.setattr(runner, "plan_decoding", lambda *a: plans.append(planner(*a)) or plans[-1])
    aheads = []  # captions: the next shard tokenised ahead in a thread (1) or in turn (0)
    ahead_of = runner.run_ahead
    monkeypatch.setattr(
        runner,
        "run_ahead",
        lambda items, ahead, name: aheads.append(ahead) or ahead_of(items, ahead),
    )
    processor = tiny_processor(minilm_tokenizer, minilm_path)
    model = save_tiny_model(tmp_path / "model", processor)
    data = make_image_folder(tmp_path / "data")
    serial, planned = tmp_path / "serial", tmp_path / "planned"
    options = {"shard_size": 3, "batch_size": 2, "progress": False}
    extract(model, data, serial, workers=0, **options)
    written = []
    extract(model, data, planned, on_shard=lambda m, k: written.append((m, k)), **options)
    assert written == [("images", k) for k in range(4)] + [("texts", k) for k in range(7)]
    for kind in ("images", "texts"):
        a, b = read_all(serial, kind), read_all(planned, kind)
        assert b["ids"] == a["ids"] and b["sources"] == a["sources"]
        np.testing.assert_allclose(b["embeddings"], a["embeddings"], atol=1e-6)
    assert (planned / "errors.jsonl").read_text() == (serial / "errors.jsonl").read_text()
    assert load_manifest(planned)["modalities"] == load_manifest(serial)["modalities"]
    assert [p.take_turns for p in plans] == [cores == 2]
    assert aheads == [0 if cores == 2 else 1] * 2  # the serial run too: it has 0 workers only


def test_shards_dictionary_encode_only_the_strings(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from xmodal.extract.writer import read_shard, write_shard

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((300, 16)).astype(np.float32)
    ids = [f"id{i}" for i in range(300)]
    sources = [f"caption {i % 7}" for i in range(300)]
    for dtype in ("float32", "float16"):
        path = tmp_path / f"{dtype}.parquet"
        write_shard(path, ids, sources, vectors, dtype, {"image_id": ids})
        shard = read_shard(path)
        assert shard.ids == ids and shard.sources == sources and shard.columns == {"image_id": ids}
        np.testing.assert_array_equal(shard.embeddings, vectors.astype(dtype).astype(np.float32))
        group = pq.ParquetFile(path).metadata.row_group(0)
        encodings = {group.column(c).path_in_schema: group.column(c).encodings for c in range(4)}
        assert "RLE_DICTIONARY" in encodings["source"]
        assert "RLE_DICTIONARY" not in encodings["embedding.list.element"]


class Killed(Exception):
    pass


def test_a_failing_shard_hook_stops_the_background_writer(
    tmp_path: Path, minilm_tokenizer, minilm_path: str
) -> None:
    processor = tiny_processor(minilm_tokenizer, minilm_path)
    model = save_tiny_model(tmp_path / "model", processor)
    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "out"

    def kill_at_second(modality: str, k: int) -> None:
        if k == 1:
            raise Killed(modality)

    with pytest.raises(Killed, match="texts"):
        extract(
            model, data, out, modality="texts", shard_size=4, progress=False,
            on_shard=kill_at_second,
        )  # fmt: skip
    record = load_manifest(out)["modalities"]["texts"]
    # shard 1 is on disk (the hook runs after the write), the manifest lists shards 0 and 1,
    # and nothing after the failure was written
    assert [e["index"] for e in record["shards"]] == [0, 1]
    assert sorted(p.name for p in out.glob("texts-*.parquet")) == [
        "texts-00000.parquet",
        "texts-00001.parquet",
    ]
