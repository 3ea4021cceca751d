"""xmodal extract with inputs and outputs given as URLs (fsspec): memory://, file:// and a local
S3-compatible server (moto) give the rows of the local run; WebDataset tar shards are listed
as a stream; resuming works on the URL output; writes there are atomic."""

from __future__ import annotations

import io
import json
import tarfile
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_extract import make_image_folder, save_tiny_model, tiny_processor

from xmodal import storage
from xmodal.atomic import atomic_path, atomic_write_text
from xmodal.cli import main
from xmodal.data.datasets import SkippedRowsWarning, load_dataset
from xmodal.errors import BadRowError, MissingFileError
from xmodal.extract import extract, load_manifest, read_pair_shards

SHARD = 4
KEYS_PER_TAR = 5
S3_EXTRA = "pip install 'xmodal[s3,dev]': s3fs and moto[server]"


# -- data made by the tests -----------------------------------------------------------------------
def png_bytes(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (40 + seed, 56, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_webdataset(folder: Path) -> list[Path]:
    """Two img2dataset-style shards: ``{key}.png`` + ``{key}.txt`` + ``{key}.json``; in shard 1
    one image that is no image (decoding fails) and one image without its caption."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for s in range(2):
        path = folder / f"shard-{s:03d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(KEYS_PER_TAR):
                key = f"{s:03d}{i:04d}"
                image = b"not an image at all" if (s, i) == (1, 2) else png_bytes(5 * s + i)
                add_member(tar, f"{key}.png", image)
                if (s, i) != (1, 4):  # no caption: the row is left out (skip_bad)
                    add_member(tar, f"{key}.txt", f"picture {key} of a thing".encode())
                meta = {"key": key, "url": f"https://example.com/{key}.png"}
                add_member(tar, f"{key}.json", json.dumps(meta).encode())
        shards.append(path)
    return shards


def upload(folder: Path, url: str) -> str:
    """Copy every file under ``folder`` to the URL folder ``url``; returns ``url``."""
    fs, root = fsspec.core.url_to_fs(url)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        fs.pipe_file(f"{root}/{path.relative_to(folder).as_posix()}", path.read_bytes())
    return url


# -- outputs compared -----------------------------------------------------------------------------
def output_files(out: str | Path) -> dict[str, bytes]:
    """Every file of an output folder (local or URL) by name."""
    fs, root = fsspec.core.url_to_fs(str(out))
    return {p.rsplit("/", 1)[-1]: fs.cat_file(p) for p in fs.find(root)}


def tables(out: str | Path, roots: dict[str, str]) -> dict[str, dict]:
    """Each Parquet shard's columns, with the data's roots (``roots``: root -> marker) replaced
    in every string, so that two runs on one dataset stored in two places compare equal."""

    def neutral(value):
        if isinstance(value, str):
            for root, marker in roots.items():
                value = value.replace(root, marker)
        return value

    found = {}
    for name, data in output_files(out).items():
        if name.endswith(".parquet"):
            columns = pq.read_table(pa.BufferReader(data)).to_pydict()
            found[name] = {k: [neutral(v) for v in col] for k, col in columns.items()}
    return found


def logs(out: str | Path, roots: dict[str, str]) -> dict[str, list]:
    """``errors.jsonl`` and ``skipped.jsonl`` records, roots replaced."""
    files = output_files(out)
    found = {}
    for name in ("errors.jsonl", "skipped.jsonl"):
        text = files.get(name, b"").decode()
        for root, marker in roots.items():
            text = text.replace(json.dumps(root)[1:-1], marker)
        found[name] = [json.loads(line) for line in text.splitlines()]
    return found


def same_rows(out: str | Path, local: Path, roots: dict[str, str]) -> None:
    """``out`` holds the shards (every column, every value) and logs of the local run."""
    got, expected = tables(out, roots), tables(local, roots)
    assert sorted(got) == sorted(expected) and got
    for name in expected:
        assert got[name] == expected[name], name
    assert logs(out, roots) == logs(local, roots)
    manifest, plain = load_manifest(out), load_manifest(local)
    for modality, record in plain["modalities"].items():
        ours = manifest["modalities"][modality]
        assert [s["rows"] for s in ours["shards"]] == [s["rows"] for s in record["shards"]]
        assert [s["failed"] for s in ours["shards"]] == [s["failed"] for s in record["shards"]]
        assert ours["complete"] and ours["items"] == record["items"]  # (the hash holds sources)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, minilm_tokenizer, minilm_path) -> dict:
    root = tmp_path_factory.mktemp("urls")
    processor = tiny_processor(minilm_tokenizer, minilm_path)
    model = save_tiny_model(root / "model", processor)
    folder = make_image_folder(root / "folder")
    make_webdataset(root / "wds")
    return {"root": root, "model": model, "folder": folder, "wds": root / "wds"}


@pytest.fixture()
def memory():
    """A fresh memory:// folder, emptied afterwards (the store is one per process)."""
    url = f"memory://xmodal-{uuid.uuid4().hex[:8]}"
    yield url
    fs, root = fsspec.core.url_to_fs(url)
    if fs.exists(root):
        fs.rm(root, recursive=True)


def run(setup: dict, data, out, **kwargs) -> dict:
    options = {"shard_size": SHARD, "workers": 0, "progress": False, **kwargs}
    return extract(setup["model"], data, out, **options)


# -- the tests ------------------------------------------------------------------------------------
def test_a_jsonl_dataset_in_memory_gives_the_local_rows(setup, memory, tmp_path) -> None:
    """Metadata, images and output on memory://: every shard value and log record of the local
    run (an image that cannot be decoded included), with one decode worker process."""
    local = tmp_path / "local"
    run(setup, setup["folder"] / "captions.jsonl", local, workers=1)
    data = upload(setup["folder"], f"{memory}/data")
    out = f"{memory}/out"
    manifest = run(setup, f"{data}/captions.jsonl", out, workers=1)
    assert manifest["data"] == f"{data}/captions.jsonl"
    roots = {str(setup["folder"]): "DATA", data: "DATA"}
    same_rows(out, local, roots)
    errors = logs(out, roots)["errors.jsonl"]
    assert [(e["id"], e["source"]) for e in errors] == [("broken", "DATA/broken.png")]
    assert sorted(output_files(out)) == sorted(output_files(local))  # no temporary left


def test_file_urls_give_the_local_rows(setup, tmp_path) -> None:
    """file:// in and out (fsspec's local file system): the local run's rows."""
    local = tmp_path / "local"
    run(setup, setup["folder"], local)
    out = tmp_path / "through-urls"
    run(setup, f"file://{setup['folder']}", f"file://{out}")
    same_rows(out, local, {f"file://{setup['folder']}": "DATA", str(setup["folder"]): "DATA"})


def test_webdataset_shards_by_brace_pattern(setup, memory, tmp_path) -> None:
    """Tar shards named by a brace pattern on memory://: the rows of the local folder of
    shards; the image that is no image is in errors.jsonl, the key without a caption in
    skipped.jsonl, as for local shards."""
    local = tmp_path / "local"
    with pytest.warns(SkippedRowsWarning, match=r"skipped 1 of 10 rows in wds"):
        run(setup, setup["wds"], local, skip_bad=True)
    shards = upload(setup["wds"], f"{memory}/wds")
    out = f"{memory}/out"
    with pytest.warns(SkippedRowsWarning, match=r"skipped 1 of 10 rows in memory://"):
        run(setup, f"{shards}/shard-{{000..001}}.tar", out, skip_bad=True)
    roots = {str(setup["wds"]): "WDS", shards: "WDS"}
    same_rows(out, local, roots)
    found = logs(out, roots)
    assert [e["id"] for e in found["errors.jsonl"]] == ["0010002"]
    assert found["skipped.jsonl"] == [
        {"row": "shard-001.tar:0010004", "reason": "no .txt caption member"}
    ]
    images = tables(out, roots)["images-00000.parquet"]
    assert json.loads(images["location"][0])["tar"] == "WDS/shard-000.tar"
    with pytest.raises(BadRowError, match=r"shard-001\.tar:0010004: no \.txt caption member"):
        run(setup, f"{shards}/shard-{{000..001}}.tar", f"{memory}/strict")
    with pytest.raises(MissingFileError, match=r"shard-002\.tar"):
        load_dataset(f"{shards}/shard-{{000..002}}.tar")


class NoSeek(io.RawIOBase):
    """A file object that can only be read forward, as a network stream."""

    def __init__(self, inner):
        self.inner = inner

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.inner.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seekable(self) -> bool:
        return False

    def seek(self, *args):
        raise io.UnsupportedOperation("seek")


def test_a_tar_at_a_url_is_listed_as_a_stream(setup, memory, monkeypatch) -> None:
    """Listing a shard at a URL only reads it forward (tarfile's stream mode: no seek, nothing
    downloaded first); each image is then read alone, by its offset."""
    shards = upload(setup["wds"], f"{memory}/wds")
    real = storage.open_input
    opened = []

    def forward_only(location):
        opened.append(str(location))
        inner = real(location)

        class Stream:
            def __enter__(self):
                return NoSeek(inner.__enter__())

            def __exit__(self, *exc):
                return inner.__exit__(*exc)

        return Stream()

    monkeypatch.setattr(storage, "open_input", forward_only)
    dataset = load_dataset(f"{shards}/shard-000.tar")
    assert opened == [f"{shards}/shard-000.tar"]
    local = load_dataset(setup["wds"] / "shard-000.tar")
    assert dataset.captions() == local.captions() and len(dataset) == KEYS_PER_TAR
    assert [ex.image.read_bytes() for ex in dataset] == [ex.image.read_bytes() for ex in local]


def test_a_parquet_dataset_at_a_url(setup, memory, tmp_path) -> None:
    """Parquet metadata (the JSONL's columns), local and on memory://: the JSONL run's rows."""
    from_jsonl = tmp_path / "jsonl"
    run(setup, setup["folder"] / "captions.jsonl", from_jsonl, modality="texts")
    lines = (setup["folder"] / "captions.jsonl").read_text().splitlines()
    table = pa.Table.from_pylist([json.loads(line) for line in lines])
    pq.write_table(table, setup["root"] / "folder-copy.parquet")
    data = upload(setup["folder"], f"{memory}/data")
    fs, root = fsspec.core.url_to_fs(data)
    fs.pipe_file(f"{root}/captions.parquet", (setup["root"] / "folder-copy.parquet").read_bytes())
    out = f"{memory}/out"
    run(setup, f"{data}/captions.parquet", out, modality="texts")
    same_rows(out, from_jsonl, {})
    dataset = load_dataset(f"{data}/captions.parquet")
    assert dataset.examples[0].origin == "captions.parquet:1"
    assert dataset.examples[0].image == f"{data}/img0.png"


def test_pairs_with_urls(setup, memory, tmp_path) -> None:
    """--what pairs (with fused vectors) reads and writes URLs too."""
    local = tmp_path / "local"
    run(setup, setup["folder"] / "captions.jsonl", local, modality="pairs", fused=True)
    data = upload(setup["folder"], f"{memory}/data")
    out = f"{memory}/pairs"
    run(setup, f"{data}/captions.jsonl", out, modality="pairs", fused=True)
    same_rows(out, local, {str(setup["folder"]): "DATA", data: "DATA"})
    remote, plain = (read_pair_shards(o, load_manifest(o)) for o in (out, local))
    np.testing.assert_array_equal(remote.fused, plain.fused)
    assert remote.columns["caption"] == plain.columns["caption"]
    assert len(remote) == 20  # 21 rows, one of the broken image


class Killed(Exception):
    pass


def test_resume_on_a_memory_output(setup, memory, tmp_path) -> None:
    """A run killed after its first shard, and the temporary a killed upload left: the re-run
    removes the temporary, writes only the other shards, and ends with the whole run's rows."""
    whole = tmp_path / "whole"
    run(setup, setup["folder"], whole, modality="images")
    data = upload(setup["folder"], f"{memory}/data")
    out = f"{memory}/out"

    def kill_after_first(modality: str, k: int) -> None:
        raise Killed

    with pytest.raises(Killed):
        run(setup, data, out, modality="images", on_shard=kill_after_first)
    manifest = load_manifest(out)
    assert [s["index"] for s in manifest["modalities"]["images"]["shards"]] == [0]
    fs, root = fsspec.core.url_to_fs(out)
    fs.pipe_file(f"{root}/.images-00001.parquet.0123abcd.tmp", b"half a shard")
    written = []
    run(setup, data, out, modality="images", on_shard=lambda m, k: written.append(k))
    assert written == [1, 2]
    assert not [p for p in fs.find(root) if p.endswith(".tmp")]
    same_rows(out, whole, {str(setup["folder"]): "DATA", data: "DATA"})


def test_writes_on_a_url_are_atomic(memory) -> None:
    """What fails while being written leaves nothing under the name; a finished write replaces
    the old object whole."""
    target = f"{memory}/out/file.bin"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed while writing")
    assert not storage.exists(target)
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"new but unfinished")
        raise RuntimeError("killed while writing")
    assert storage.read_bytes(target) == b"old"
    atomic_write_text(target, "new")
    assert storage.read_bytes(target) == b"new"
    assert storage.glob(f"{memory}/out", "*") == [target]


def test_the_cli_takes_urls(setup, memory, capsys) -> None:
    data = upload(setup["folder"], f"{memory}/data")
    out = f"{memory}/cli"
    args = ["extract", "--model", str(setup["model"]), "--data", data, "--out", out]
    assert main([*args, "--shard-size", "8", "--workers", "0", "--what", "texts"]) == 0
    assert f"wrote {out}/manifest.json" in capsys.readouterr().out
    assert load_manifest(out)["modalities"]["texts"]["complete"]


def test_storage_names_and_patterns() -> None:
    assert storage.expand_braces("s3://b/x-{000..002}.tar") == [
        "s3://b/x-000.tar",
        "s3://b/x-001.tar",
        "s3://b/x-002.tar",
    ]
    assert storage.expand_braces("{a,b}/{8..10}") == ["a/8", "a/9", "a/10", "b/8", "b/9", "b/10"]
    assert storage.join("s3://bucket/out/", "images-00000.parquet") == (
        "s3://bucket/out/images-00000.parquet"
    )
    assert storage.join("out", "x") == Path("out/x")
    assert storage.resolve_in("gs://b/data", "../img/1.png") == "gs://b/img/1.png"
    assert storage.resolve_in("gs://b/data", "s3://c/1.png") == "s3://c/1.png"
    assert not storage.is_url("data/x.jsonl") and not storage.is_url(Path("s3://x"))
    assert storage.local_path("file:///tmp/x") == Path("/tmp/x")


def test_a_missing_protocol_package_is_one_line() -> None:
    with pytest.raises(Exception, match=r"nosuchproto://x") as err:
        load_dataset("nosuchproto://x/data.jsonl")
    assert "\n" not in str(err.value)


@pytest.fixture()
def s3(monkeypatch):
    """A local S3-compatible server (moto) with one bucket; s3fs pointed at it."""
    pytest.importorskip("s3fs", reason=f"s3fs is not installed ({S3_EXTRA})")
    server_module = pytest.importorskip(
        "moto.server", reason=f"moto[server] is not installed ({S3_EXTRA})"
    )
    import s3fs

    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {
        "endpoint_url": f"http://{host}:{port}",
        "key": "test",
        "secret": "test",
        "client_kwargs": {"region_name": "eu-west-1"},
    }
    monkeypatch.setitem(fsspec.config.conf, "s3", options)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir("xmodal-test")
    yield "s3://xmodal-test"
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def test_webdataset_shards_on_a_local_s3_server(setup, s3, tmp_path) -> None:
    """img2dataset's layout on S3 (moto's server, through s3fs): shards listed as a stream,
    images read by ranged requests, the output written as whole objects and resumed."""
    local = tmp_path / "local"
    with pytest.warns(SkippedRowsWarning):
        run(setup, setup["wds"], local, skip_bad=True, workers=1)
    shards = upload(setup["wds"], f"{s3}/wds")
    out = f"{s3}/features"
    pattern = f"{shards}/shard-{{000..001}}.tar"

    def kill_after_first(modality: str, k: int) -> None:
        raise Killed

    with pytest.raises(Killed), pytest.warns(SkippedRowsWarning):
        run(setup, pattern, out, skip_bad=True, workers=1, on_shard=kill_after_first)
    with pytest.warns(SkippedRowsWarning):
        run(setup, pattern, out, skip_bad=True, workers=1)
    same_rows(out, local, {str(setup["wds"]): "WDS", shards: "WDS"})
    assert sorted(output_files(out)) == sorted(output_files(local))  # no temporary object


@pytest.mark.parametrize("captions", ["captions.jsonl", "captions.csv", "captions.txt"])
def test_each_line_format_reads_the_same_rows_from_a_url(captions, tmp_path, memory) -> None:
    """JSONL, CSV and the folder's tab-separated list at a URL: the local rows, images as URLs;
    a row whose image is not there is refused as locally, naming the URL it looked for."""
    folder = make_image_folder(tmp_path / "data", broken=False)
    lines = [json.loads(line) for line in (folder / "captions.jsonl").read_text().splitlines()]
    if captions == "captions.csv":
        rows = [
            "image,caption,image_id",
            *(f"{r['image']},{r['caption']},{r['image_id']}" for r in lines),
        ]
    else:
        rows = [f"{r['image']}\t{r['caption']}" for r in lines]
    if captions != "captions.jsonl":
        (folder / "captions.jsonl").unlink()
        (folder / captions).write_text("\n".join(rows) + "\n")
    data = upload(folder, f"{memory}/data")
    local, remote = load_dataset(folder), load_dataset(data)
    assert remote.captions() == local.captions() and len(remote) == 2 * 10
    assert [ex.image for ex in remote] == [ex.image.replace(str(folder), data) for ex in local]
    fs, root = fsspec.core.url_to_fs(data)
    fs.rm(f"{root}/img3.png")
    with pytest.raises(
        BadRowError, match=rf"image 'img3.png' not found \(resolved {data}/img3\.png\)"
    ):
        load_dataset(data)


def test_a_local_brace_pattern_names_local_shards(setup) -> None:
    pattern = str(setup["wds"] / "shard-{000..001}.tar")
    with pytest.warns(SkippedRowsWarning):
        shards = load_dataset(pattern, skip_bad=True)
    with pytest.warns(SkippedRowsWarning):
        folder = load_dataset(setup["wds"], skip_bad=True)
    assert shards.captions() == folder.captions() and shards.source == pattern


def test_urls_in_a_local_files_image_column(tmp_path, memory) -> None:
    """A local JSONL may name its images by URL: found ones are kept, a missing one is a bad
    row; http(s) URLs (no listing to check them against) are checked when decoded."""
    fs, root = fsspec.core.url_to_fs(memory)
    fs.pipe_file(f"{root}/a.png", png_bytes(1))
    rows = [
        {"image": f"{memory}/a.png", "caption": "found"},
        {"image": f"{memory}/gone.png", "caption": "missing"},
        {"image": "https://example.com/c.png", "caption": "unchecked"},
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.warns(SkippedRowsWarning):
        dataset = load_dataset(path, skip_bad=True)
    assert [ex.image for ex in dataset] == [f"{memory}/a.png", "https://example.com/c.png"]
    assert [str(row) for row in dataset.skipped] == [
        f"data.jsonl:2: image '{memory}/gone.png' not found (resolved {memory}/gone.png)"
    ]
