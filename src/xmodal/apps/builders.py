"""Builders turning packaged real data (npm emoji images, Debian Fashion-MNIST) into JSONL."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import tarfile
import tempfile
import typing
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from tqdm import tqdm

from xmodal.apps.emoji_captions import (
    KEYWORDS_PACKAGE,
    KEYWORDS_TARBALL,
    enrich_rows,
    extra_captions,
    read_keywords_tar,
)
from xmodal.atomic import atomic_write_bytes, make_dir
from xmodal.errors import ConfigError, InputError, MissingDependencyError, MissingFileError
from xmodal.processing import open_raster

EMOJI_PACKAGE = "emoji-datasource-google@16.0.0"
EMOJI_TARBALL = "emoji-datasource-google-16.0.0.tgz"
EMOJI_JSON = "package/emoji.json"
EMOJI_IMG_DIR = "package/img/google/64/"
EMOJI_SPLITS = ("train", "val", "test")
SKIN_TONES = {
    "1F3FB": "light skin tone",
    "1F3FC": "medium-light skin tone",
    "1F3FD": "medium skin tone",
    "1F3FE": "medium-dark skin tone",
    "1F3FF": "dark skin tone",
}

FashionMnistSplit = Literal["train", "test"]
"""Splits of the Fashion-MNIST builder (``xmodal data fashion-mnist``)."""


@dataclass(frozen=True)
class Artist:
    """Another artist's drawings of the same emoji: the PNG or SVG files of an npm package's
    folder, named by code point (``1f44d-1f3fd.svg``; ``fe0f`` selectors are ignored when
    matching them to the Google images)."""

    package: str
    tarball: str
    folder: str
    license: str


ARTISTS = {
    "openmoji": Artist(
        "openmoji@17.0.0", "openmoji-17.0.0.tgz", "package/color/svg/", "CC BY-SA 4.0"
    ),
    "emojione": Artist(
        "emojione-assets@4.5.0",
        "emojione-assets-4.5.0.tgz",
        "package/png/64/",
        "EmojiOne free license (attribution; see the package's LICENSE.md)",
    ),
}
# The quickstart trains on no other artist (EmojiOne's drawings did not carry over to OpenMoji's
# and cost in-style R@1; docs/experiments.md) and checks both as unseen artists.
QUICKSTART_ARTISTS: tuple[str, ...] = ()
QUICKSTART_CHECK_ARTISTS: tuple[str, ...] = ("emojione", "openmoji")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
_NPM_TIMEOUT_S = 900


# ---------------------------------------------------------------- file helpers


def _write_jsonl(path: Path, records: Iterable[dict]) -> None:
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write_bytes(path, lines.encode("utf-8"))


def _write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode())


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def sha512_integrity(path: str | Path) -> str:
    """npm-style Subresource Integrity string (``sha512-<base64>``) of a file."""
    digest = hashlib.sha512()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return "sha512-" + base64.b64encode(digest.digest()).decode("ascii")


# ---------------------------------------------------------------- emoji: tarball


def _cached_tarball(cache_dir: Path, name: str = EMOJI_TARBALL) -> tuple[Path, str] | None:
    """The cached tarball and its integrity, if its sidecar matches the file's hash."""
    tarball, sidecar = cache_dir / name, cache_dir / f"{name}.json"
    if not (tarball.is_file() and sidecar.is_file()):
        return None
    try:
        integrity = json.loads(sidecar.read_text(encoding="utf-8"))["integrity"]
    except (ValueError, KeyError, TypeError):
        return None
    return (tarball, integrity) if sha512_integrity(tarball) == integrity else None


def _parse_npm_pack(stdout: str) -> dict:
    """First entry of ``npm pack --json`` output (npm may print notices before the JSON)."""
    start = stdout.find("[")
    try:
        info = json.loads(stdout[start:])[0]
        return {k: info[k] for k in ("id", "filename", "integrity", "shasum", "size")}
    except (ValueError, IndexError, KeyError, TypeError):
        raise MissingDependencyError(
            f"unexpected output from npm pack --json: {stdout[:300]!r}"
        ) from None


def _npm_pack(
    cache_dir: Path,
    package: str = EMOJI_PACKAGE,
    name: str = EMOJI_TARBALL,
    how_to_skip: str = "or pass tarball= (CLI: --from TARBALL) with a downloaded copy",
) -> tuple[Path, str]:
    """Download ``package`` with ``npm pack`` into ``cache_dir`` as ``name`` and verify it."""
    npm = shutil.which("npm")
    if npm is None:
        raise MissingDependencyError(
            f"npm not found on PATH: install Node.js/npm to download {package}, {how_to_skip}"
        )
    make_dir(cache_dir)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".npm-pack-") as tmp:
        cmd = [npm, "pack", package, "--json", "--pack-destination", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_NPM_TIMEOUT_S)
        if proc.returncode != 0:
            raise MissingDependencyError(
                f"npm pack {package} failed ({how_to_skip}): {proc.stderr.strip()[-500:]}"
            )
        info = _parse_npm_pack(proc.stdout)
        downloaded = Path(tmp) / info["filename"]
        actual = sha512_integrity(downloaded)
        if actual != info["integrity"]:
            raise MissingDependencyError(
                f"{downloaded.name}: integrity {actual} != {info['integrity']}"
            )
        os.replace(downloaded, cache_dir / name)
    _write_json(cache_dir / f"{name}.json", info)
    return cache_dir / name, info["integrity"]


def _cache_path(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir) if cache_dir else Path.home() / ".cache" / "xmodal" / "emoji"


def _package_tarball(
    cache_dir: str | Path | None,
    tarball: str | Path | None,
    package: str,
    name: str,
    how_to_skip: str,
) -> tuple[Path, str]:
    """Path and integrity of an npm package's tarball: the given one, the cached one or a fresh
    one from ``npm pack`` (``how_to_skip`` ends the message when npm is missing)."""
    if tarball is not None:
        path = Path(tarball)
        if not path.is_file():
            raise MissingFileError(f"{package.rsplit('@', 1)[0]} tarball not found: {path}")
        return path, sha512_integrity(path)
    cache = _cache_path(cache_dir)
    return _cached_tarball(cache, name) or _npm_pack(cache, package, name, how_to_skip)


def _emoji_tarball(cache_dir: str | Path | None, tarball: str | Path | None) -> tuple[Path, str]:
    """The emoji-datasource-google tarball (given, cached or from ``npm pack``)."""
    return _package_tarball(
        cache_dir,
        tarball,
        EMOJI_PACKAGE,
        EMOJI_TARBALL,
        "or pass tarball= (CLI: --from TARBALL) with a downloaded copy",
    )


def _keywords_tarball(cache_dir: str | Path | None, tarball: str | Path | None) -> tuple[Path, str]:
    """The emojibase-data tarball (given, cached or from ``npm pack``)."""
    return _package_tarball(
        cache_dir,
        tarball,
        KEYWORDS_PACKAGE,
        KEYWORDS_TARBALL,
        "or pass keywords_tarball= (CLI: --keywords-from TARBALL) with a downloaded copy, "
        "or build without rich captions",
    )


def _read_emoji_tar(path: Path) -> tuple[list[dict], dict[str, bytes]]:
    """emoji.json entries and the 64px Google PNGs (file name -> bytes), read in one pass."""
    entries: list[dict] | None = None
    pngs: dict[str, bytes] = {}
    try:
        with tarfile.open(path, mode="r:*") as tar:
            for member in tar:
                wanted = member.name == EMOJI_JSON or (
                    member.name.startswith(EMOJI_IMG_DIR) and member.name.endswith(".png")
                )
                fh = tar.extractfile(member) if wanted and member.isfile() else None
                if fh is None:
                    continue
                if member.name == EMOJI_JSON:
                    entries = json.loads(fh.read().decode("utf-8"))
                else:
                    pngs[member.name[len(EMOJI_IMG_DIR) :]] = fh.read()
    except (tarfile.TarError, OSError, EOFError) as err:
        raise InputError(f"{path}: not a readable tar file ({err})") from None
    if not isinstance(entries, list):
        raise InputError(f"{path}: not an emoji-datasource tarball (no {EMOJI_JSON} list)")
    return entries, pngs


def _artist_tarball(
    name: str, cache_dir: str | Path | None, tarballs: dict[str, str | Path] | None
) -> tuple[Path, str]:
    """An artist package's tarball (given in ``tarballs``, cached or from ``npm pack``)."""
    artist = ARTISTS[name]
    return _package_tarball(
        cache_dir,
        (tarballs or {}).get(name),
        artist.package,
        artist.tarball,
        f"or pass artist_tarballs={{{name!r}: TARBALL}} (CLI: --artist-from {name}=TARBALL) "
        "with a downloaded copy, or build without that artist",
    )


def code_key(file_name: str) -> str:
    """``1F44D-FE0F-1F3FD.svg`` -> ``1f44d-1f3fd``: the key an image is matched by."""
    stem = file_name.rsplit("/", 1)[-1].rsplit(".", 1)[0].lower()
    return "-".join(part for part in stem.split("-") if part != "fe0f")


def _read_artist_tar(path: Path, artist: Artist) -> dict[str, tuple[str, bytes]]:
    """An artist package's drawings: code key -> (file name, bytes)."""
    drawings: dict[str, tuple[str, bytes]] = {}
    try:
        with tarfile.open(path, mode="r:*") as tar:
            for member in tar:
                name = member.name
                if not (name.startswith(artist.folder) and name.endswith((".png", ".svg"))):
                    continue
                if "/" in name[len(artist.folder) :]:  # a sub-folder (alternates)
                    continue
                fh = tar.extractfile(member) if member.isfile() else None
                if fh is not None:
                    drawings[code_key(name)] = (name, fh.read())
    except (tarfile.TarError, OSError, EOFError) as err:
        raise InputError(f"{path}: not a readable tar file ({err})") from None
    if not drawings:
        raise InputError(f"{path}: no PNG or SVG drawings under {artist.folder}")
    return drawings


def _render_drawing(file_name: str, data: bytes, size: int) -> Image.Image:
    """A drawing as an RGB ``size`` x ``size`` image on white (SVG rendered with resvg)."""
    if file_name.endswith(".svg"):
        try:
            import resvg_py
        except ImportError as exc:
            raise MissingDependencyError(
                f"{file_name}: SVG drawings need `pip install resvg-py` (extra xmodal[data])"
            ) from exc
        try:
            data = bytes(
                resvg_py.svg_to_bytes(svg_string=data.decode("utf-8"), width=size, height=size)
            )
        except (ValueError, UnicodeDecodeError) as err:
            raise InputError(f"{file_name}: SVG could not be rendered ({err})") from None
    return _on_white(data, size)


def artist_rows(
    rows: list[dict], artist: str, drawings: dict[str, tuple[str, bytes]], out: Path, size: int
) -> list[dict]:
    """The rows whose emoji the artist drew, pointing at its drawing (written under
    ``images/<artist>/``, the same caption, name and category; ``image_id``
    ``<artist>/<file>``, so it is another image of the same concept)."""
    drawn = []
    for row in rows:
        found = drawings.get(code_key(row["image_id"]))
        if found is None:
            continue
        image_id = f"{artist}/{row['image_id']}"
        atomic_write_bytes(out / "images" / image_id, _png_bytes(_render_drawing(*found, size)))
        drawn.append({**row, "image": f"images/{image_id}", "image_id": image_id})
    return drawn


# ---------------------------------------------------------------- emoji: records


def tone_caption(code: str) -> str:
    """``1F3FB`` -> ``light skin tone``; ``1F3FB-1F3FC`` -> both names, comma separated."""
    tones = [SKIN_TONES[part] for part in code.upper().split("-")]
    return ", ".join(dict.fromkeys(tones))


def _base_name(entry: dict) -> str | None:
    """Lower-case name of an emoji, falling back to its first short name."""
    name = entry.get("name")
    if not name:
        shorts = entry.get("short_names") or [entry.get("short_name")]
        name = shorts[0].replace("_", " ") if shorts and shorts[0] else None
    return name.strip().lower() if name else None


def _emoji_records(entries: list[dict], pngs: dict[str, bytes]) -> tuple[list[dict], Counter]:
    """One record per available Google image (base emoji and skin-tone variants)."""
    records: list[dict] = []
    skipped: Counter = Counter()
    seen: set[str] = set()
    for entry in entries:
        name = _base_name(entry)
        if name is None:
            skipped["no_name"] += 1
            continue
        variants = [(name, entry)]
        for code, variant in (entry.get("skin_variations") or {}).items():
            try:
                variants.append((f"{name}: {tone_caption(code)}", variant))
            except KeyError:
                skipped["unknown_tone"] += 1
        for caption, item in variants:
            reason = _unavailable(item, pngs, seen)
            if reason:
                skipped[reason] += 1
                continue
            seen.add(item["image"])
            records.append(_emoji_record(item["image"], caption, name, entry))
    return records, skipped


def _unavailable(item: dict, pngs: dict[str, bytes], seen: set[str]) -> str | None:
    if not item.get("has_img_google"):
        return "no_google_image"
    if item.get("image") not in pngs:
        return "missing_file"
    return "duplicate_image" if item["image"] in seen else None


def _emoji_record(image: str, caption: str, name: str, entry: dict) -> dict:
    return {
        "image": f"images/{image}",
        "caption": caption,
        "image_id": image,
        "category": entry.get("category"),
        "subcategory": entry.get("subcategory"),
        "name": name,
    }


def split_names(
    names: Iterable[str],
    seed: int,
    val_fraction: float,
    test_fraction: float,
    kinds: Mapping[str, Hashable] | None = None,
) -> dict[str, str]:
    """Assign each unique name to train/val/test with a seeded shuffle.

    The test names are the first of the shuffled order, whatever ``kinds`` says (so the
    held-out names stay those of earlier versions). ``kinds`` (name -> kind, e.g. how many
    skin tones its variants name): the validation names are then drawn kind by kind, each kind
    giving ``val_fraction`` of its names (at least one while it has two or more left), so
    validation holds every kind of name the test does instead of only those a shuffle happened
    to put there; without ``kinds`` they are simply the next in the order."""
    order = sorted(set(names))
    random.Random(seed).shuffle(order)
    n_test = round(len(order) * test_fraction)
    split = {name: "test" for name in order[:n_test]}
    rest = order[n_test:]
    if kinds is None:
        n_val = round(len(order) * val_fraction)
        val = set(rest[:n_val])
    else:
        by_kind: dict[Hashable, list[str]] = {}
        for name in rest:
            by_kind.setdefault(kinds[name], []).append(name)
        total = Counter(kinds[name] for name in order)
        val = set()
        for kind, members in by_kind.items():
            wanted = round(total[kind] * val_fraction)
            if val_fraction > 0 and len(members) >= 2:
                wanted = max(wanted, 1)
            val.update(members[: min(wanted, len(members) - 1)])
    split.update({name: "val" if name in val else "train" for name in rest})
    return split


def tones_named(record: dict) -> int:
    """How many skin tones a record's caption names (``"kiss: woman, man: light skin tone,
    dark skin tone"`` -> 2; a base emoji -> 0)."""
    caption, name = record["caption"], record["name"]
    if caption == name or not caption.startswith(f"{name}: "):
        return 0
    return len(caption[len(name) + 2 :].split(", "))


def name_kinds(records: Iterable[dict]) -> dict[str, int]:
    """Each name's kind for the validation draw: the most skin tones any of its images names."""
    kinds: dict[str, int] = {}
    for record in records:
        kinds[record["name"]] = max(kinds.get(record["name"], 0), tones_named(record))
    return kinds


def _slice_by_name(records: list[dict], limit: int, seed: int) -> list[dict]:
    """At most ``limit`` records (or the first name's, if more), whole names in a seeded order."""
    by_name: dict[str, list[dict]] = {}
    for record in records:
        by_name.setdefault(record["name"], []).append(record)
    order = sorted(by_name)
    random.Random(f"slice-{seed}").shuffle(order)
    kept: list[dict] = []
    for name in order:
        if kept and len(kept) + len(by_name[name]) > limit:
            continue
        kept.extend(by_name[name])
        if len(kept) >= limit:
            break
    return kept


def _on_white(data: bytes, size: int) -> Image.Image:
    """Composite an RGBA PNG on white and resize to ``size`` if needed."""
    with open_raster(data) as img:
        rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, rgba).convert("RGB")
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.LANCZOS)
    return rgb


def _reusable_summary(path: Path, params: dict) -> dict | None:
    """The existing summary if it was built with the same parameters and its files exist."""
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None
    same = all(summary.get(k) == v for k, v in params.items())
    files = all((path.parent / f"{s}.jsonl").is_file() for s in EMOJI_SPLITS)
    artists = summary.get("artists") or {}
    files = files and all((path.parent / f"test.{a}.jsonl").is_file() for a in artists)
    return summary if same and files else None


def build_emoji(
    out_dir: str | Path,
    cache_dir: str | Path | None = None,
    tarball: str | Path | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    size: int = 64,
    force: bool = False,
    limit: int | None = None,
    rich_captions: bool = False,
    keywords_tarball: str | Path | None = None,
    artists: Sequence[str] = (),
    check_artists: Sequence[str] = (),
    artist_tarballs: dict[str, str | Path] | None = None,
) -> dict:
    """Build train/val/test JSONL sets of Google emoji images captioned with their names.

    The tarball of ``emoji-datasource-google@16.0.0`` comes from ``tarball`` or from
    ``npm pack`` (cached in ``cache_dir``). Splits are by base name, so all skin-tone
    variants of an emoji share a split. ``limit``: a slice of at most this many images (but at
    least one whole name), whole names drawn in a seeded order (a quick run or a test).
    ``rich_captions``: training images get further captions (short names, CLDR label and
    keywords from ``emojibase-data``, :mod:`xmodal.apps.emoji_captions`; its tarball from
    ``keywords_tarball`` or ``npm pack``, cached and integrity-checked); val and test keep the
    name alone. ``artists`` (:data:`ARTISTS`): the training names as those artists drew them
    are added to the training split (more drawings of each concept); ``check_artists``: only
    their drawings of the test names, for a check on an artist never trained on. Every
    artist's test names go to ``test.<artist>.jsonl``. Artist packages come from
    ``artist_tarballs`` (name -> tarball) or ``npm pack`` (cached, integrity-checked).
    Returns the summary also written to summary.json.
    """
    unknown = sorted((set(artists) | set(check_artists)) - set(ARTISTS))
    if unknown:
        raise ConfigError(f"unknown emoji artist(s) {unknown}; known: {sorted(ARTISTS)}")
    if set(artists) & set(check_artists):
        raise ConfigError("an artist trained on cannot also be the check's unseen artist")
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
        raise ConfigError("need 0 <= val_fraction, test_fraction and their sum < 1")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be a positive number of images, got {limit}")
    out = Path(out_dir)
    params = {
        "seed": seed,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "val_kinds": "skin tones named",  # validation drawn per kind (earlier builds: none)
        "size": size,
        "limit": limit,
        "rich_captions": rich_captions,
        "trained_artists": list(artists),
        "check_artists": list(check_artists),
    }
    if not force and (summary := _reusable_summary(out / "summary.json", params)):
        return summary
    path, integrity = _emoji_tarball(cache_dir, tarball)
    entries, pngs = _read_emoji_tar(path)
    records, skipped = _emoji_records(entries, pngs)
    if not records:
        raise InputError(f"{path}: no usable emoji images found under {EMOJI_IMG_DIR}")
    if limit is not None:
        records = _slice_by_name(records, limit, seed)
    assignment = split_names(
        (r["name"] for r in records), seed, val_fraction, test_fraction, name_kinds(records)
    )
    for record in tqdm(records, desc="emoji images", unit="img"):
        image = _on_white(pngs[record["image_id"]], size)
        atomic_write_bytes(out / record["image"], _png_bytes(image))
    splits = {s: [r for r in records if assignment[r["name"]] == s] for s in EMOJI_SPLITS}
    artist_summary: dict = {}
    for artist in [*artists, *check_artists]:
        artist_path, artist_integrity = _artist_tarball(artist, cache_dir, artist_tarballs)
        drawings = _read_artist_tar(artist_path, ARTISTS[artist])
        test_rows = artist_rows(splits["test"], artist, drawings, out, size)
        _write_jsonl(out / f"test.{artist}.jsonl", test_rows)
        train_rows = []
        if artist in artists:
            train_rows = artist_rows(splits["train"], artist, drawings, out, size)
            splits["train"] = splits["train"] + train_rows
        artist_summary[artist] = {
            "package": ARTISTS[artist].package,
            "license": ARTISTS[artist].license,
            "integrity": artist_integrity,
            "train_images": len(train_rows),
            "test_images": len(test_rows),
        }
    keywords_source: dict = {}
    if rich_captions:
        keywords_path, keywords_integrity = _keywords_tarball(cache_dir, keywords_tarball)
        keywords = read_keywords_tar(keywords_path)
        extras = {
            name: extra_captions(entry, keywords)
            for entry in entries
            if (name := _base_name(entry)) is not None
        }
        splits["train"] = enrich_rows(splits["train"], extras)
        keywords_source = {
            "keywords_package": KEYWORDS_PACKAGE,
            "keywords_integrity": keywords_integrity,
        }
    for split, rows in splits.items():
        _write_jsonl(out / f"{split}.jsonl", rows)
    summary = {
        "package": EMOJI_PACKAGE,
        "tarball": path.name,
        "integrity": integrity,
        **params,
        "images": len(records),
        "names": len(assignment),
        "entries": len(entries),
        "splits": {
            s: {
                "images": len({x["image_id"] for x in r}),
                "names": len({x["name"] for x in r}),
                "captions": len(r),
            }
            for s, r in splits.items()
        },
        "skipped": dict(skipped),
        "artists": artist_summary,
        **keywords_source,
    }
    _write_json(out / "summary.json", summary)
    return summary


# ---------------------------------------------------------------- Fashion-MNIST


def _read_idx(path: Path, magic: int, header: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """Payload (uint8) and dimensions of a gzipped IDX file after checking its magic."""
    data = gzip.decompress(path.read_bytes())
    if len(data) < header:
        raise InputError(f"{path}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=header // 4))
    if dims[0] != magic:
        raise InputError(f"{path}: bad IDX magic number {dims[0]} (expected {magic})")
    payload = np.frombuffer(data, dtype=np.uint8, offset=header)
    if payload.size != int(np.prod(dims[1:])):
        raise InputError(f"{path}: expected {int(np.prod(dims[1:]))} bytes, got {payload.size}")
    return payload, dims[1:]


def read_fashion_mnist(
    source_dir: str | Path = FASHION_MNIST_DIR, split: FashionMnistSplit = "test"
) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) of a Fashion-MNIST split."""
    if split not in typing.get_args(FashionMnistSplit):
        raise ConfigError(f"unknown Fashion-MNIST split {split!r}; expected 'train' or 'test'")
    prefix = "t10k" if split == "test" else "train"
    source = Path(source_dir)
    files = source / f"{prefix}-images-idx3-ubyte.gz", source / f"{prefix}-labels-idx1-ubyte.gz"
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise MissingFileError(
            f"Fashion-MNIST files not found: {', '.join(missing)}; install the Debian package "
            "(apt-get install dataset-fashion-mnist) or pass source_dir="
        )
    pixels, (n, rows, cols) = _read_idx(files[0], 2051, 16)
    labels, (n_labels,) = _read_idx(files[1], 2049, 8)
    if n != n_labels:
        raise InputError(f"{source}: {n} images but {n_labels} labels")
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise InputError(f"{files[1]}: label {labels.max()} out of range")
    return pixels.reshape(n, rows, cols), labels


def build_fashion_mnist(
    out_dir: str | Path,
    source_dir: str | Path = FASHION_MNIST_DIR,
    split: str = "test",
    limit: int | None = None,
) -> dict:
    """Write Fashion-MNIST images as grey PNGs plus ``<split>.jsonl`` with class captions."""
    images, labels = read_fashion_mnist(source_dir, split)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    out = Path(out_dir)
    rows = []
    for i, (pixels, label) in enumerate(
        tqdm(zip(images, labels, strict=True), total=len(labels), desc="fashion-mnist")
    ):
        image_id = f"{split}_{i}"
        name = FASHION_MNIST_CLASSES[int(label)]
        atomic_write_bytes(out / "images" / f"{image_id}.png", _png_bytes(Image.fromarray(pixels)))
        row = {"image": f"images/{image_id}.png", "caption": f"a photo of a {name}"}
        rows.append({**row, "label": name, "image_id": image_id})
    _write_jsonl(out / f"{split}.jsonl", rows)
    counts = Counter(r["label"] for r in rows)
    return {
        "split": split,
        "source": str(source_dir),
        "images": len(rows),
        "jsonl": str(out / f"{split}.jsonl"),
        "classes": {name: counts.get(name, 0) for name in FASHION_MNIST_CLASSES},
    }
