"""Query an index with a caption or an image; optional ITM re-ranking of the top-k.

Re-ranking orders the top-k by ``logit_scale * score + w * itm_score`` with the model's
calibrated weight ``w`` (``fusion.rerank_weight``, :mod:`xmodal.evaluate.rerank`) or one given
explicitly; at ``w = 0`` (the ITM head did not beat ITC on validation, or the model was never
calibrated) re-ranking is a no-op: results keep their ITC order and ``rerank_note`` says why.
"""

from __future__ import annotations

import contextlib
import heapq
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from xmodal.data.refs import image_ref
from xmodal.errors import ImageLoadError, IncompatibleError, IndexBuildError, InputError
from xmodal.evaluate.rerank import RerankWeight, resolve_rerank_weight
from xmodal.index import SearchIndex, ShardedIndex, open_index
from xmodal.models.identity import ModelIdentity, check_compatible, identify
from xmodal.models.model import CrossModalModel, Features, cat_features
from xmodal.processing import ImageInput, MultimodalProcessor, read_regular_file
from xmodal.runtime import NO_DEADLINE, Deadline

RERANK_CHUNK = 4  # re-ranked candidates per model call: the deadline is checked between chunks
MODEL_CHUNK = 8  # images through the image tower per hold of the model lock


class IndexedImageError(IndexBuildError):
    """An image the index points at cannot be read any more: deleted, moved or changed since
    it was indexed. ``reason`` names no path (a service may show it); the message does."""

    def __init__(self, position: int, item_id: str, location: str, reason: str, gone: bool):
        super().__init__(
            f"indexed image {item_id!r} ({location}) {reason}; re-extract and re-index the data"
        )
        self.position = position
        self.item_id = item_id
        self.location = location
        self.reason = reason
        self.gone = gone

    def __reduce__(self):
        return (
            type(self),
            (self.position, self.item_id, self.location, self.reason, self.gone),
        )


class ModelLock:
    """The lock model calls take, granted by priority, then in arrival order.

    A thread that releases it and asks again queues behind those already waiting
    (``threading.Lock`` lets it cut in), and a short, urgent call (``priority`` 0: a caption
    search) goes before queued chunks of long work (priority 1: re-ranking, uploads), so it waits
    for one chunk at most, never for a whole run of them.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._next_ticket = 0
        self._waiting: list[tuple[int, int]] = []  # (priority, ticket), a heap
        self._held = False

    @contextlib.contextmanager
    def held(self, priority: int = 0) -> Iterator[None]:
        with self._condition:
            entry = (priority, self._next_ticket)
            self._next_ticket += 1
            heapq.heappush(self._waiting, entry)
            while self._held or self._waiting[0] != entry:
                self._condition.wait()
            heapq.heappop(self._waiting)
            self._held = True
        try:
            yield
        finally:
            with self._condition:
                self._held = False
                self._condition.notify_all()


class Searcher:
    """A model, its processor and an index that belong together; model calls are serialised
    (in arrival order).

    ``rerank_weight`` overrides the model's calibrated re-rank weight (None: use the model's).
    Every method takes an optional ``work`` :class:`~xmodal.runtime.Deadline`, checked between
    steps (each image decoded, each model call, each chunk of re-ranking), so that a service
    can stop work past its deadline or for a client that went away.
    """

    def __init__(
        self,
        model: CrossModalModel,
        processor: MultimodalProcessor,
        index: SearchIndex | ShardedIndex,
        identity: ModelIdentity | None = None,
        rerank_weight: float | None = None,
    ):
        expected = index.identity
        if identity is None:  # no weights hash known: check the preprocessing only
            identity = ModelIdentity("model", expected.weights_hash, processor.config_hash)
        check_compatible(
            expected, identity, f"index {index.directory} vs model {identity.model_id}"
        )
        if model.config.embed_dim != index.dim:
            raise IncompatibleError(
                f"model dimension {model.config.embed_dim} != index {index.dim}"
            )
        self.model = model.eval()
        self.processor = processor
        self.index = index
        self.lock = ModelLock()
        self.rerank: RerankWeight = resolve_rerank_weight(
            model.config.fusion.rerank_weight, rerank_weight
        )
        self.itc_scale = float(model.clip_scale().detach())

    @property
    def rerank_note(self) -> str | None:
        """Why re-ranking leaves the ITC order as it is (weight 0), or None when it acts."""
        return self.rerank.note

    # -- features -------------------------------------------------------------------------------
    def text_features(self, texts: list[str], work: Deadline = NO_DEADLINE) -> Features:
        work.check()
        # fast tokenizers are not thread-safe
        with self.lock.held(work.priority), torch.inference_mode():
            work.check()
            batch = self.processor.process_text(texts)
            return self.model.text_features(batch["input_ids"], batch["attention_mask"])

    def image_features(self, images: list[ImageInput], work: Deadline = NO_DEADLINE) -> Features:
        if not images:
            self.processor.process_images(images)  # InputError: no images given
        crops = []
        for image in images:  # decoding needs no lock
            work.check()
            crops.append(self.processor.process_image(image))
        parts = []
        for start in range(0, len(crops), MODEL_CHUNK):  # the lock is held a chunk at a time
            batch = torch.stack(crops[start : start + MODEL_CHUNK])
            with self.lock.held(work.priority), torch.inference_mode():
                work.check()
                parts.append(self.model.image_features(batch))
        return parts[0] if len(parts) == 1 else cat_features(parts)

    def embed_texts(self, texts: list[str], work: Deadline = NO_DEADLINE) -> np.ndarray:
        """(N, D) float32 L2-normalised caption embeddings."""
        return self.text_features(texts, work).embeds.float().numpy()

    def embed_images(self, images: list[ImageInput], work: Deadline = NO_DEADLINE) -> np.ndarray:
        """(N, D) float32 L2-normalised image embeddings; a bad image raises ImageLoadError."""
        return self.image_features(images, work).embeds.float().numpy()

    # -- search ---------------------------------------------------------------------------------
    def search_text(
        self,
        text: str,
        k: int = 10,
        rerank: bool = False,
        work: Deadline = NO_DEADLINE,
        **params: Any,
    ) -> list[dict[str, Any]]:
        """Top-k index entries for a caption, as result dicts (best first)."""
        self._check_rerank(rerank, text_query=True)
        return self._search(self.text_features([text], work), k, rerank, True, params, work)

    def search_image(
        self,
        image: ImageInput,
        k: int = 10,
        rerank: bool = False,
        work: Deadline = NO_DEADLINE,
        **params: Any,
    ) -> list[dict[str, Any]]:
        """Top-k index entries for an image, as result dicts (best first)."""
        self._check_rerank(rerank, text_query=False)
        return self._search(self.image_features([image], work), k, rerank, False, params, work)

    def _check_rerank(self, rerank: bool, text_query: bool) -> None:
        if rerank:
            self.model._require_itm()  # a pure dual encoder cannot re-rank
        if rerank and text_query != (self.index.modality == "images"):
            raise InputError(
                "re-ranking scores (image, caption) pairs: it needs a caption query on an image "
                "index or an image query on a caption index "
                f"(this index holds {self.index.modality})"
            )

    def _search(
        self,
        query: Features,
        k: int,
        rerank: bool,
        text_query: bool,
        params: dict[str, Any],
        work: Deadline = NO_DEADLINE,
    ) -> list[dict[str, Any]]:
        work.check()
        found = self.index.search(
            query.embeds.numpy(),
            k,
            params.get("nprobe"),
            params.get("ef_search"),
            params.get("refine"),
        )[0]
        results = [self._result(position, score) for position, score in found]
        if rerank and found and self.rerank.active:
            itm = self._itm_scores(query, [position for position, _ in found], text_query, work)
            weight = self.rerank.weight
            for result, score in zip(results, itm, strict=True):
                result["itm_score"] = score
                result["rerank_score"] = self.itc_scale * result["score"] + weight * score
            results.sort(key=lambda r: -r["rerank_score"])  # stable: ties keep the ITC order
        for rank, result in enumerate(results, start=1):
            result["rank"] = rank
        return results

    def _result(self, position: int, score: float) -> dict[str, Any]:
        result = {
            "rank": 0,
            "position": position,
            "id": self.index.ids[position],
            "source": self.index.sources[position],
            "score": score,
        }
        if self.index.modality == "texts":
            result["image_id"] = self.index.image_ids[position]
        return result

    def _itm_scores(
        self,
        query: Features,
        positions: list[int],
        text_query: bool,
        work: Deadline = NO_DEADLINE,
    ) -> list[float]:
        """ITM score of the query paired with each indexed item (images loaded from disk), a
        chunk of :data:`RERANK_CHUNK` candidates per model call."""
        scores: list[float] = []
        for start in range(0, len(positions), RERANK_CHUNK):
            chunk = positions[start : start + RERANK_CHUNK]
            repeat = torch.zeros(len(chunk), dtype=torch.long)
            if text_query:
                images = []
                for position in chunk:
                    work.check()
                    images.append(self.indexed_image(position))
                image = self.image_features(images, work)
                text = query.index(repeat)
            else:
                image = query.index(repeat)
                text = self.text_features([self.index.sources[p] for p in chunk], work)
            with self.lock.held(work.priority), torch.inference_mode():
                work.check()
                scores += self.model.itm_score(image, text).float().tolist()
        return scores

    def indexed_image_bytes(self, position: int) -> bytes:
        """The encoded bytes of the indexed image at ``position``, checked to decode as it did
        when indexed; IndexedImageError when its file is gone or no longer an image."""
        return self._read_indexed(position)[0]

    def indexed_image(self, position: int) -> Image.Image:
        """The indexed image at ``position``, decoded (IndexedImageError when it cannot be)."""
        return self._read_indexed(position)[1]

    def read_indexed(self, position: int) -> tuple[bytes, Image.Image]:
        """The indexed image at ``position``: its encoded bytes and the decoded image."""
        return self._read_indexed(position)

    def _read_indexed(self, position: int) -> tuple[bytes, Image.Image]:
        location = self.index.locations[position]
        ref = image_ref(location) if location else None

        def fail(reason: str, gone: bool = False) -> IndexedImageError:
            return IndexedImageError(position, self.index.ids[position], str(ref), reason, gone)

        if ref is None:
            raise fail("has no stored location")
        try:
            data = ref.read_bytes() if not isinstance(ref, str) else read_regular_file(ref)
        except (FileNotFoundError, NotADirectoryError):
            raise fail("is gone (deleted or moved since indexing)", gone=True) from None
        except OSError as err:  # its text names the path: keep it out of the reason
            raise fail(f"cannot be read ({type(err).__name__})") from None
        try:
            return data, self.processor.load_image(data)
        except ImageLoadError as err:  # decoding bytes: the reason names no path
            raise fail(f"cannot be decoded any more: {err.reason}") from None

    def match(
        self, image: ImageInput, caption: str, work: Deadline = NO_DEADLINE
    ) -> dict[str, float]:
        """ITM score, match probability and embedding similarity of one (image, caption) pair."""
        image_features = self.image_features([image], work)
        text_features = self.text_features([caption], work)
        with self.lock.held(work.priority), torch.inference_mode():
            work.check()
            logits = self.model.itm_logits(image_features, text_features)[0].float()
        similarity = float((image_features.embeds @ text_features.embeds.T)[0, 0])
        return {
            "itm_score": float(logits[1] - logits[0]),
            "match_probability": float(torch.softmax(logits, dim=0)[1]),
            "similarity": similarity,
        }


IndexPlace = str | Path | list[str | Path]


def open_searcher(
    index_dir: IndexPlace, model: str | Path, rerank_weight: float | None = None
) -> Searcher:
    """Load an index (a folder, a sharded index or several folders searched as one) and a
    model (directory or preset) and check that they belong together; ``rerank_weight``
    overrides the model's calibrated re-rank weight."""
    from xmodal.models.loading import load_model

    index = open_index(index_dir)
    net, processor = load_model(model)
    return Searcher(net, processor, index, identify(net, processor, model), rerank_weight)


def search(
    index_dir: IndexPlace,
    model: str | Path,
    *,
    text: str | None = None,
    image: ImageInput | None = None,
    k: int = 10,
    rerank: bool = False,
    nprobe: int | None = None,
    ef_search: int | None = None,
    refine: int | None = None,
    rerank_weight: float | None = None,
) -> list[dict[str, Any]]:
    """Top-k results (dicts with rank, index position, id, source, score) for a caption or an
    image; ``refine``: re-rank that many candidates exactly (default: the index's setting);
    ``rerank_weight`` overrides the model's calibrated ITM re-rank weight."""
    if (text is None) == (image is None):
        raise InputError("give exactly one of text= or image=")
    if k < 1:
        raise InputError(f"k must be >= 1, got {k}")
    searcher = open_searcher(index_dir, model, rerank_weight)
    params = {"nprobe": nprobe, "ef_search": ef_search, "refine": refine}
    if text is not None:
        return searcher.search_text(text, k, rerank, **params)
    return searcher.search_image(image, k, rerank, **params)


def format_results(results: list[dict[str, Any]]) -> str:
    """Results as an aligned text table."""
    reranked = any("itm_score" in r for r in results)
    head = f"{'rank':>4}  {'score':>7}  " + (f"{'itm':>7}  " if reranked else "") + "id  source"
    lines = [head]
    for r in results:
        itm = f"{r['itm_score']:7.3f}  " if reranked else ""
        lines.append(f"{r['rank']:>4}  {r['score']:7.4f}  {itm}{r['id']}  {r['source']}")
    return "\n".join(lines)
