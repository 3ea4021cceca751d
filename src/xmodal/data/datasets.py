"""Image-text datasets and readers for JSONL, CSV, COCO, Karpathy, folders and tar shards.

Readers only check that image files exist; decoding happens later in the processor.
"""

from __future__ import annotations

import csv
import json
import os
import stat
import tarfile
import typing
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

from xmodal import storage
from xmodal.data.skipped import SkippedRow
from xmodal.errors import (
    BadRowError,
    ConfigError,
    InputError,
    MissingDependencyError,
    MissingFileError,
)
from xmodal.processing import caption_problem
from xmodal.storage import FileIndex, Location, name_of

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
DatasetFormat = Literal[
    "jsonl", "csv", "parquet", "json", "coco", "karpathy", "folder", "tar", "webdataset"
]
"""Dataset readers of :func:`load_dataset` (``webdataset`` is ``tar``)."""
KarpathySplit = Literal["train", "val", "test", "restval"]
KARPATHY_SPLITS = typing.get_args(KarpathySplit)
CAPTION_FILES = ("captions.jsonl", "captions.csv", "captions.txt")
FORMATS = typing.get_args(DatasetFormat)
_RESERVED_COLUMNS = ("image", "caption", "image_id", "label")


def _nonblocking(path: str, flags: int) -> int:
    """An ``open`` opener that does not block on a FIFO (it is refused once open)."""
    return os.open(path, flags | getattr(os, "O_NONBLOCK", 0))


@dataclass(frozen=True)
class TarMember:
    """Lazy reference to one file inside a tar shard; ``read_bytes()`` seeks and reads it
    (one ranged read when the shard is a URL)."""

    tar_path: str
    name: str
    offset: int
    size: int

    def read_bytes(self) -> bytes:
        """Return the member's bytes (a seek and a read, no scan of the tar)."""
        if storage.is_url(self.tar_path):
            data = storage.read_bytes(self.tar_path, self.offset, self.offset + self.size)
            if len(data) != self.size:
                raise OSError(f"{self}: truncated tar member ({len(data)} of {self.size} bytes)")
            return data
        with open(self.tar_path, "rb", opener=_nonblocking) as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                raise OSError(f"{self.tar_path} is not a regular file")
            os.set_blocking(fh.fileno(), True)
            fh.seek(self.offset)
            data = fh.read(self.size)
        if len(data) != self.size:
            raise OSError(f"{self}: truncated tar member ({len(data)} of {self.size} bytes)")
        return data

    def __str__(self) -> str:
        return f"{name_of(self.tar_path)}:{self.name}"


@dataclass(frozen=True)
class Example:
    """One caption of one image."""

    image: str | TarMember
    caption: str
    image_id: str
    label: str | None = None
    origin: str = ""
    extra: dict = field(default_factory=dict)


class SkippedRowsWarning(UserWarning):
    """``skip_bad`` left rows out: their number and the first (all in ``dataset.skipped``)."""


class _Bad(Exception):
    """Internal: reason why one row is unusable."""


# A reader yields (origin, Example) for a good row and (origin, reason) for a bad one.
Row = tuple[str, "Example | str"]


class ImageTextDataset(Dataset):
    """A list of Examples plus the rows the reader left out (``skipped``, with ``skip_bad``)."""

    def __init__(
        self, examples: Iterable[Example], skipped: Iterable[SkippedRow] = (), source: str = ""
    ) -> None:
        self.examples: list[Example] = list(examples)
        self.skipped: list[SkippedRow] = list(skipped)
        self.source = source

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]

    def __repr__(self) -> str:
        return (
            f"ImageTextDataset({self.source!r}, examples={len(self)}, "
            f"images={len(self.image_ids())}, skipped={len(self.skipped)})"
        )

    def image_ids(self) -> list[str]:
        """Unique image ids in first-seen order."""
        return list(dict.fromkeys(ex.image_id for ex in self.examples))

    def captions(self) -> list[str]:
        """All captions, one per example."""
        return [ex.caption for ex in self.examples]

    def labels(self) -> list[str | None]:
        """All labels, one per example."""
        return [ex.label for ex in self.examples]

    def text_to_image(self) -> torch.Tensor:
        """Index into ``image_ids()`` of each example's image (LongTensor, one per example)."""
        index = {image_id: i for i, image_id in enumerate(self.image_ids())}
        return torch.tensor([index[ex.image_id] for ex in self.examples], dtype=torch.long)

    def without_images(self, image_ids: Iterable[str]) -> ImageTextDataset:
        """The same dataset less every row of the given images."""
        drop = set(image_ids)
        kept = [ex for ex in self.examples if ex.image_id not in drop]
        return ImageTextDataset(kept, self.skipped, self.source)

    def unique_images(self) -> list[Example]:
        """First example of each image id, in ``image_ids()`` order."""
        first: dict[str, Example] = {}
        for ex in self.examples:
            first.setdefault(ex.image_id, ex)
        return list(first.values())


# ---------------------------------------------------------------- shared row handling


def _text(value: Any) -> str | None:
    """Optional string column: None/empty -> None, numbers -> str."""
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _caption(value: Any) -> str:
    if value is None:
        raise _Bad("missing caption")
    if not isinstance(value, str):
        raise _Bad(f"caption is not a string ({type(value).__name__})")
    caption = value.strip()
    if not caption:
        raise _Bad("empty caption")
    problem = caption_problem(caption)
    if problem:  # the same rule the processor applies, so a kept row never fails later
        raise _Bad(f"caption {problem}")
    return caption


class Folder:
    """Where a dataset file's relative image paths resolve: a local folder or a URL. Images at
    URLs are checked against one listing per image folder (:class:`xmodal.storage.FileIndex`),
    not one request per image; those at ``http(s)://`` URLs, which have no listing, when they
    are decoded."""

    def __init__(self, location: Location):
        self.location = location if storage.is_url(location) else Path(location)
        self.index = FileIndex()


UNLISTED = ("http://", "https://")


def _image_path(value: Any, base: Folder) -> Path | str:
    """Resolve an image reference (a path, or a URL) against ``base`` and check that the file
    exists."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise _Bad("missing image")
    if not isinstance(value, str):
        raise _Bad(f"image is not a string ({type(value).__name__})")
    if storage.is_url(base.location) or storage.is_url(value.strip()):
        return _image_url(value.strip(), base)
    path = Path(os.path.abspath(base.location / value.strip()))
    try:
        found = path.is_file()
    except OSError as err:  # e.g. a name too long for the file system
        raise _Bad(f"image {value[:200]!r} cannot be looked up ({err.strerror})") from None
    if not found:
        raise _Bad(f"image {value!r} {_missing_file(path)}")
    return path


def _image_url(value: str, base: Folder) -> str:
    """The URL of a row's image (``value`` relative to a URL folder, or a URL), once found."""
    url = str(storage.resolve_in(base.location, value))
    if url.startswith(UNLISTED):
        return url
    try:
        found = base.index.has(url)
    except MissingDependencyError:  # no package for the protocol: not a row's fault
        raise
    except Exception as err:  # noqa: BLE001 - each file system raises its own kinds
        raise _Bad(f"image {value[:200]!r} cannot be looked up ({type(err).__name__})") from None
    if not found:
        raise _Bad(f"image {value!r} not found (resolved {url})")
    return url


def _missing_file(path: Path) -> str:
    """Why an image path is no file: a broken symbolic link, a folder, or nothing there."""
    try:
        if path.is_symlink():
            return f"not found (a symbolic link to a missing {os.readlink(path)}; at {path})"
        if path.is_dir():
            return f"is not a regular file (a folder: {path})"
    except OSError:
        pass
    return f"not found (resolved {path})"


def _record_example(record: dict, base: Folder, origin: str) -> Example:
    """Turn a JSONL/CSV record with image/caption/image_id/label columns into an Example."""
    if "image" not in record:
        raise _Bad("missing 'image' column")
    path = _image_path(record["image"], base)
    caption = _caption(record.get("caption"))
    extra = {k: v for k, v in record.items() if k not in _RESERVED_COLUMNS}
    return Example(
        image=str(path),
        caption=caption,
        image_id=_text(record.get("image_id")) or str(path),
        label=_text(record.get("label")),
        origin=origin,
        extra=extra,
    )


def _collect(rows: Iterable[Row], name: str, skip_bad: bool, source: str) -> ImageTextDataset:
    """Gather rows, raising at the first bad one unless ``skip_bad``."""
    examples: list[Example] = []
    skipped: list[SkippedRow] = []
    for origin, item in rows:
        if isinstance(item, Example):
            examples.append(item)
            continue
        row = SkippedRow(origin, item)
        if not skip_bad:
            raise BadRowError(str(row))
        skipped.append(row)
    if not examples:
        detail = f" (first: {skipped[0]})" if skipped else ""
        raise BadRowError(f"no valid rows in {name}{detail}")
    if skipped:
        total = len(examples) + len(skipped)
        warnings.warn(
            SkippedRowsWarning(
                f"skipped {len(skipped)} of {total} rows in {name} (first: {skipped[0]})"
            ),
            stacklevel=3,
        )
    return ImageTextDataset(examples, skipped, source)


def _decoded_lines(path: Location) -> Iterator[tuple[int, str, str | None]]:
    """Yield (line number, text, decode error) for each physical line, decoding per line."""
    with storage.open_input(path) as fh:
        for number, raw in enumerate(fh, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                yield number, raw.decode("utf-8"), None
            except UnicodeDecodeError as err:
                reason = f"invalid UTF-8 bytes at byte {err.start} of the line"
                yield number, raw.decode("utf-8", errors="replace"), reason


# ---------------------------------------------------------------- line-based readers


def _jsonl_rows(path: Location, base: Folder) -> Iterator[Row]:
    for number, line, error in _decoded_lines(path):
        origin = f"{name_of(path)}:{number}"
        if error:
            yield origin, error
            continue
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            yield origin, f"invalid JSON ({err.msg} at column {err.colno})"
            continue
        except (ValueError, RecursionError) as err:  # huge numbers, deep nesting
            yield origin, f"unreadable JSON ({type(err).__name__}: {str(err)[:100]})"
            continue
        if not isinstance(record, dict):
            yield origin, f"expected a JSON object, got {type(record).__name__}"
            continue
        yield _example_or_reason(record, base, origin)


def _example_or_reason(record: dict, base: Folder, origin: str) -> Row:
    try:
        return origin, _record_example(record, base, origin)
    except _Bad as bad:
        return origin, str(bad)


def _csv_rows(path: Location, base: Folder) -> Iterator[Row]:
    errors: dict[int, str] = {}

    def lines() -> Iterator[str]:
        for number, text, error in _decoded_lines(path):
            if error:
                errors[number] = error
            yield text

    reader = csv.reader(lines())
    header = _csv_header(reader, path)
    last_line = reader.line_num
    while True:
        try:
            fields = next(reader)
            problem = None
        except StopIteration:
            return
        except csv.Error as err:  # e.g. a field over csv.field_size_limit(), a bare CR
            fields, problem = [], f"unreadable CSV ({err})"
        first, last_line = last_line + 1, reader.line_num
        origin = f"{name_of(path)}:{first}"
        bad_lines = [n for n in range(first, last_line + 1) if n in errors]
        if problem:
            yield origin, problem
        elif bad_lines:
            yield f"{name_of(path)}:{bad_lines[0]}", errors[bad_lines[0]]
        elif not any(f.strip() for f in fields):
            continue
        elif len(fields) != len(header):
            yield origin, f"expected {len(header)} fields, got {len(fields)}"
        else:
            record = {k: v for k, v in zip(header, fields, strict=True) if k}
            yield _example_or_reason(record, base, origin)


def _csv_header(reader: Any, path: Location) -> list[str]:
    """Read and validate the header row of a captions CSV."""
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise BadRowError(f"{name_of(path)}: empty CSV file") from None
    except csv.Error as err:
        raise BadRowError(f"{name_of(path)}:1: unreadable CSV header ({err})") from None
    missing = [c for c in ("image", "caption") if c not in header]
    if missing:
        raise BadRowError(f"{name_of(path)}:1: header lacks column(s) {', '.join(missing)}")
    return header


def _parquet_rows(path: Location, base: Folder) -> Iterator[Row]:
    """The rows of a Parquet file (columns as in JSONL: ``image``, ``caption`` ...), read one
    row group after another (a URL is streamed); ``origin``: ``file:row`` from 1."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as err:
        raise MissingDependencyError(
            f"{name_of(path)}: Parquet datasets need pyarrow ({err}): pip install 'xmodal[index]'"
        ) from None
    with storage.open_input(path) as handle:
        try:
            parquet = pq.ParquetFile(handle)
        except (pa.ArrowException, OSError) as err:
            raise BadRowError(f"{name_of(path)}: not a readable Parquet file ({err})") from None
        missing = [c for c in ("image", "caption") if c not in parquet.schema_arrow.names]
        if missing:
            raise BadRowError(f"{name_of(path)}: lacks column(s) {', '.join(missing)}")
        number = 0
        for batch in parquet.iter_batches(batch_size=4096):
            for record in batch.to_pylist():
                number += 1
                yield _example_or_reason(record, base, f"{name_of(path)}:{number}")


def _txt_rows(path: Location, base: Folder) -> Iterator[Row]:
    """``filename<TAB>caption`` per line."""
    for number, line, error in _decoded_lines(path):
        origin = f"{name_of(path)}:{number}"
        if error:
            yield origin, error
            continue
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        if "\t" not in line:
            yield origin, "expected 'filename<TAB>caption'"
            continue
        image, caption = line.split("\t", 1)
        yield _example_or_reason({"image": image, "caption": caption}, base, origin)


# ---------------------------------------------------------------- JSON readers


def _load_json(path: Location) -> Any:
    try:
        return json.loads(storage.read_bytes(path).decode("utf-8-sig"))
    except (ValueError, RecursionError) as err:  # bad UTF-8 or JSON, huge numbers, deep nesting
        raise BadRowError(f"{name_of(path)}: not a valid UTF-8 JSON file ({err})") from None


def _json_kind(data: Any, path: Location) -> str:
    """Tell a COCO captions file from a Karpathy split file."""
    if isinstance(data, dict) and "annotations" in data and "images" in data:
        return "coco"
    images = data.get("images") if isinstance(data, dict) else None
    if isinstance(images, list) and (not images or "sentences" in images[0]):
        return "karpathy"
    raise BadRowError(
        f"{name_of(path)}: unrecognised JSON layout (expected COCO 'annotations'+'images' "
        "or Karpathy 'images[].sentences')"
    )


def _coco_rows(data: dict, path: Location, root: Folder) -> Iterator[Row]:
    files: dict[str, str] = {}
    for image in data.get("images") or []:
        if isinstance(image, dict) and "id" in image and "file_name" in image:
            files[str(image["id"])] = image["file_name"]
    for i, ann in enumerate(data.get("annotations") or []):
        origin = f"{name_of(path)}:annotations[{i}]"
        if not isinstance(ann, dict):
            yield origin, "annotation is not an object"
            continue
        image_id = _text(ann.get("image_id"))
        if image_id is None or image_id not in files:
            yield origin, f"unknown image_id {ann.get('image_id')!r}"
            continue
        yield _coco_example(ann, image_id, files[image_id], root, origin)


def _coco_example(ann: dict, image_id: str, file_name: str, root: Folder, origin: str) -> Row:
    try:
        path = _image_path(file_name, root)
        caption = _caption(ann.get("caption"))
    except _Bad as bad:
        return origin, str(bad)
    extra = {k: v for k, v in ann.items() if k not in ("image_id", "caption")}
    return origin, Example(str(path), caption, image_id, None, origin, extra)


def _karpathy_rows(data: dict, path: Location, root: Folder, split: str | None) -> Iterator[Row]:
    for i, image in enumerate(data.get("images") or []):
        origin = f"{name_of(path)}:images[{i}]"
        if not isinstance(image, dict):
            yield origin, "image entry is not an object"
            continue
        image_split = image.get("split")
        if image_split not in KARPATHY_SPLITS:
            yield origin, f"unknown split {image_split!r}"
            continue
        if split is not None and image_split != split:
            continue
        yield from _karpathy_image_rows(image, root, origin)


def _karpathy_image_rows(image: dict, root: Folder, origin: str) -> Iterator[Row]:
    filename = image.get("filename")
    if not isinstance(filename, str) or not filename:
        yield origin, "missing filename"
        return
    try:
        path = _image_path(os.path.join(image.get("filepath") or "", filename), root)
    except _Bad as bad:
        yield origin, str(bad)
        return
    extra = {"split": image["split"]}
    for j, sentence in enumerate(image.get("sentences") or []):
        row_origin = f"{origin}.sentences[{j}]"
        try:
            raw = sentence.get("raw") if isinstance(sentence, dict) else None
            caption = _caption(raw)
        except _Bad as bad:
            yield row_origin, str(bad)
            continue
        yield row_origin, Example(str(path), caption, str(path), None, row_origin, extra)


# ---------------------------------------------------------------- tar shards


def _member_key(name: str) -> tuple[str, str]:
    """WebDataset convention: key = path up to the first dot of the base name."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{folder}/{stem}" if folder else stem
    return key, ext.lower() if dot else ""


MemberReader = Callable[[tarfile.TarInfo], bytes]


def _tar_rows(shard: Location) -> Iterator[Row]:
    if storage.is_url(shard):
        yield from _streamed_tar_rows(str(shard))
        return
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(shard, mode="r:") as tar:
            for member in tar:
                if member.isfile():
                    key, ext = _member_key(member.name)
                    groups.setdefault(key, {})[ext] = member
            for key, members in groups.items():
                yield _tar_example(lambda m: _read_member(tar, m), shard, key, members)
    except tarfile.TarError as err:
        raise BadRowError(f"{name_of(shard)}: not a readable uncompressed tar ({err})") from None


_TEXT_MEMBERS = ("txt", "json")  # what a listing reads of a shard; images are read when decoded


def _streamed_tar_rows(url: str) -> Iterator[Row]:
    """A tar shard at a URL, read once as a stream (tarfile's ``r|`` mode over the file
    system's file object: nothing is downloaded to disk, no seek): the captions and metadata
    are kept, each image is referenced by its offset (decoding fetches it with a ranged read)."""
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    texts: dict[str, bytes] = {}
    try:
        with storage.open_input(url) as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _member_key(member.name)
                groups.setdefault(key, {})[ext] = member
                if ext in _TEXT_MEMBERS:
                    handle = tar.extractfile(member)
                    texts[member.name] = handle.read() if handle is not None else b""
    except tarfile.TarError as err:
        raise BadRowError(f"{name_of(url)}: not a readable uncompressed tar ({err})") from None
    for key, members in groups.items():
        yield _tar_example(lambda m: texts[m.name], url, key, members)


def _tar_example(
    read: MemberReader, shard: Location, key: str, members: dict[str, tarfile.TarInfo]
) -> Row:
    origin = f"{name_of(shard)}:{key}"
    image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
    if image is None:
        return origin, "no image member (.jpg/.jpeg/.png/.webp)"
    if "txt" not in members:
        return origin, "no .txt caption member"
    try:
        caption = _caption(read(members["txt"]).decode("utf-8"))
        meta = _tar_meta(read, members.get("json"))
    except UnicodeDecodeError as err:
        return origin, f"invalid UTF-8 in caption or metadata ({err.reason})"
    except _Bad as bad:
        return origin, str(bad)
    where = str(shard) if storage.is_url(shard) else str(Path(shard).resolve())
    ref = TarMember(where, image.name, image.offset_data, image.size)
    extra = {k: v for k, v in meta.items() if k not in ("image_id", "label")}
    image_id = _text(meta.get("image_id")) or key
    return origin, Example(ref, caption, image_id, _text(meta.get("label")), origin, extra)


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    fh = tar.extractfile(member)
    if fh is None:
        raise _Bad(f"cannot read member {member.name}")
    return fh.read()


def _tar_meta(read: MemberReader, member: tarfile.TarInfo | None) -> dict:
    if member is None:
        return {}
    try:
        meta = json.loads(read(member).decode("utf-8"))
    except json.JSONDecodeError as err:
        raise _Bad(f"invalid JSON in {member.name} ({err.msg})") from None
    except RecursionError:
        raise _Bad(f"invalid JSON in {member.name} (nested too deeply)") from None
    if not isinstance(meta, dict):
        raise _Bad(f"{member.name} is not a JSON object")
    return meta


# ---------------------------------------------------------------- entry point


SUFFIX_FORMATS = (".jsonl", ".csv", ".parquet", ".json", ".tar")


def detect_format(path: Location) -> str:
    """Guess the dataset format from the path's suffix or directory contents."""
    if storage.is_dir(path):
        if any(storage.is_file(storage.join(path, name)) for name in CAPTION_FILES):
            return "folder"
        if storage.glob(path, "*.tar"):
            return "tar"
        raise InputError(
            f"{path}: directory has no {'/'.join(CAPTION_FILES)} file and no *.tar shards"
        )
    suffix = os.path.splitext(name_of(path))[1].lower()
    if suffix in SUFFIX_FORMATS:
        return suffix[1:]
    raise InputError(f"{path}: cannot detect the dataset format from suffix {suffix!r}")


def _rows(
    path: Location | list[Location], fmt: str, split: str | None, image_root: str | Path | None
) -> Iterable[Row]:
    """Dispatch to the reader for ``fmt`` (a list: the tar shards of a brace pattern)."""
    if isinstance(path, list):
        if fmt != "tar":
            raise ConfigError(f"a {{a..b}} pattern names tar shards, not a {fmt} dataset")
        return (row for shard in path for row in _tar_rows(shard))
    if fmt in ("json", "coco", "karpathy"):
        return _json_rows(path, fmt, split, image_root)
    if split is not None:
        raise ConfigError("split= is only supported for Karpathy JSON files")
    folder = storage.is_dir(path)
    base = Folder(path if folder else storage.parent_of(path))
    if fmt == "jsonl":
        return _jsonl_rows(path, base)
    if fmt == "csv":
        return _csv_rows(path, base)
    if fmt == "parquet":
        return _parquet_rows(path, base)
    if fmt == "folder":
        return _folder_rows(path)
    shards = storage.glob(path, "*.tar") if folder else [path]
    return (row for shard in shards for row in _tar_rows(shard))


def _json_rows(
    path: Location, fmt: str, split: str | None, image_root: str | Path | None
) -> Iterable[Row]:
    data = _load_json(path)
    kind = _json_kind(data, path)
    if fmt != "json" and fmt != kind:
        raise BadRowError(f"{name_of(path)}: looks like a {kind} file, not {fmt}")
    parent = storage.parent_of(path)
    root = Folder(storage.join(parent, str(image_root)) if image_root is not None else parent)
    if kind == "coco":
        if split is not None:
            raise ConfigError("split= is only supported for Karpathy JSON files")
        return _coco_rows(data, path, root)
    return _karpathy_rows(data, path, root, split)


def _folder_rows(folder: Location) -> Iterator[Row]:
    for name in CAPTION_FILES:
        captions = storage.join(folder, name)
        if storage.is_file(captions):
            reader = {"jsonl": _jsonl_rows, "csv": _csv_rows, "txt": _txt_rows}
            return reader[name.rsplit(".", 1)[1]](captions, Folder(folder))
    raise MissingFileError(f"{folder}: no {'/'.join(CAPTION_FILES)} file")


def load_dataset(
    path: str | Path,
    format: str | None = None,
    skip_bad: bool = False,
    *,
    split: str | None = None,
    image_root: str | Path | None = None,
) -> ImageTextDataset:
    """Load an image-text dataset, detecting the format unless ``format`` is given.

    ``path``: a local path, a URL (``s3://bucket/data.jsonl``: :mod:`xmodal.storage`), or tar
    shards as a brace pattern (``s3://bucket/{00000..00099}.tar``). ``split`` filters Karpathy
    files; ``image_root`` (relative to the JSON's folder) locates images of COCO/Karpathy files.
    Bad rows raise BadRowError unless ``skip_bad``.
    """
    pattern = str(path)
    path = dataset_location(path)
    source = pattern if isinstance(path, list) else str(path)
    if not isinstance(path, list) and not storage.exists(path):
        raise MissingFileError(f"dataset not found: {path}")
    fmt = format or ("tar" if isinstance(path, list) else detect_format(path))
    if fmt == "webdataset":
        fmt = "tar"
    if fmt not in FORMATS:
        raise ConfigError(f"unknown dataset format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if split is not None and split not in KARPATHY_SPLITS:
        raise ConfigError(f"unknown split {split!r}; expected one of {', '.join(KARPATHY_SPLITS)}")
    name = source if isinstance(path, list) else name_of(path)
    return _collect(_rows(path, fmt, split, image_root), name, skip_bad, source)


def dataset_location(path: str | Path) -> Location | list[Location]:
    """Where ``load_dataset`` reads: a local Path, a URL, or the shards a brace pattern names
    (a pattern only when no file has that very name; each shard must exist)."""
    if isinstance(path, Path) or not storage.is_url(path):
        local = Path(path)
        if local.exists() or "{" not in str(path):
            return local
    elif "{" not in path:
        return str(path)
    shards: list[Location] = [
        s if storage.is_url(s) else Path(s) for s in storage.expand_braces(str(path))
    ]
    for shard in shards:
        if not storage.is_file(shard):
            raise MissingFileError(f"dataset shard not found: {shard} (of {path})")
    return shards
