"""Inverted lists on disk: blocks of added vectors merged into one ``.ivfdata`` file that
FAISS memory-maps at search time (``OnDiskInvertedLists``), and checked reading of index
files (a truncated or corrupted file is an error naming it, never a crash)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import faiss

from xmodal.errors import IndexBuildError

# An on-disk index maps its lists itself (IO_FLAG_MMAP on top of that crashes FAISS 1.15);
# its .ivfdata file is looked for beside the index file, wherever the folder has moved.
READ_FLAGS = faiss.IO_FLAG_ONDISK_SAME_DIR
BLOCK_FLAGS = faiss.IO_FLAG_MMAP  # blocks (in-memory lists written out) are mapped, not read


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def merge_blocks(
    trained: faiss.Index,
    blocks: list[Path],
    lists_file: Path,
    ondisk: frozenset[Path] = frozenset(),
) -> faiss.Index:
    """``trained`` (empty) with the inverted lists of every block index merged into
    ``lists_file`` (on-disk lists); the blocks in ``ondisk`` are on-disk indexes themselves."""
    readers = []
    lists = faiss.InvertedListsPtrVector()
    for block in blocks:
        index = read_index(block, READ_FLAGS if block in ondisk else BLOCK_FLAGS)
        ivf = faiss.extract_index_ivf(index)
        readers.append(index)  # keep the block (and its lists) alive while merging
        lists.push_back(ivf.invlists)
    target = faiss.extract_index_ivf(trained)
    if trained.ntotal != 0:
        raise IndexBuildError("merging needs an empty trained index")
    merged = faiss.OnDiskInvertedLists(target.nlist, target.code_size, str(lists_file))
    total = merged.merge_from_multiple(lists.data(), lists.size(), False)
    target.ntotal = trained.ntotal = total
    target.replace_invlists(merged, True)
    merged.this.disown()
    del readers
    return trained


def read_index(path: Path, flags: int = 0) -> faiss.Index:
    """A FAISS index file; IndexBuildError naming it when it is missing or unreadable."""
    if not path.is_file():
        raise IndexBuildError(f"{path}: index file is missing")
    try:
        return faiss.read_index(str(path), flags)
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise IndexBuildError(
            f"{path}: cannot read the FAISS index (truncated or corrupted: {reason[:160]})"
        ) from None


def check_lists(index: faiss.Index, lists_file: Path) -> None:
    """Every inverted list of a memory-mapped index lies inside ``lists_file`` (a truncated
    file would otherwise crash the process on first access)."""
    ivf = faiss.extract_index_ivf(index)
    ondisk = faiss.downcast_InvertedLists(ivf.invlists)
    if not isinstance(ondisk, faiss.OnDiskInvertedLists):
        return
    try:
        size = lists_file.stat().st_size
    except FileNotFoundError:
        raise IndexBuildError(f"{lists_file}: inverted lists file is missing") from None
    end = 0
    entry = ivf.code_size + 8
    for i in range(ivf.nlist):
        item = ondisk.lists.at(i)
        if item.capacity:
            end = max(end, item.offset + item.capacity * entry)
    if size < end:
        raise IndexBuildError(
            f"{lists_file}: inverted lists file is {size:,} bytes, its lists need {end:,}: "
            "truncated; rebuild the index"
        )
