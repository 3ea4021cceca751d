"""The ITM stage: after the contrastive steps, the fusion and ITM head train alone on frozen
features, with negatives drawn from the whole training set.

Re-ranking asks the ITM head to pick the right pair among the ITC top candidates of a whole
collection. Trained jointly with the contrastive loss, the head only meets in-batch negatives,
under features that move beneath it. In this stage (``itm_stage`` in a training config) the
towers and projections are frozen: every training caption's and image's features are computed
once (view 0 of a cached image tower), each caption's ``experimental.itm_hard_negatives``
nearest images and each image's nearest captions of other images are found by ITC over the
whole training set, and each step trains on one batch of pairs with

- ``itm``: the binary ITM cross-entropy of each pair, a negative image drawn from its
  caption's nearest and a negative caption drawn from its image's nearest;
- ``reordered``: the order term of :func:`xmodal.train.objective.itm_reordered_loss`: the
  image against its caption and a reordering of it (:mod:`xmodal.data.reorder`);
- ``reordered_images``: the same for the other direction: the caption against its own image
  and the image of a training caption that is a reordering of it ("kiss: woman, man: light
  skin tone, dark skin tone" against the image of "... dark skin tone, light skin tone").

The order terms read ``experimental.itm_reordered_batch`` captions drawn each step from those
that have a reordering, which are often a small share of a dataset.

Every draw is a function of (seed, step), so the stage gives the same weights however the run
was interrupted before it. Features stay in memory: text tokens (N, L, D) float32 and the
image cache's tokens; like the image cache, this is for training sets that fit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from xmodal import losses
from xmodal.data.reorder import reorderings
from xmodal.models.model import CrossModalModel, Features, pad_tokens, select_rows
from xmodal.processing import MultimodalProcessor
from xmodal.train.batches import epoch_batches
from xmodal.train.config import ExperimentalSection, ITMStageSection
from xmodal.train.objective import itm_reordered_loss
from xmodal.train.optim import cosine_schedule, no_decay


@dataclass
class FrozenPairs:
    """The frozen features the stage trains on.

    images: one Features per view, rows = the training images (view 0: as evaluation sees
        them); tokens may be float16 (the image cache's), converted per batch.
    text: rows = the training captions (dataset rows).
    image_of_row: (N,) the image row of each caption.
    reordered: the features of every reordering of every caption (None: no caption has one),
        ``reordered_of_row[r]`` its rows for caption r; ``counterparts[r]``: the caption rows
        whose text is a reordering of caption r (their images show the reordered caption).
    """

    images: list[Features]
    text: Features
    image_of_row: torch.Tensor
    reordered: Features | None
    reordered_of_row: list[list[int]]
    counterparts: list[list[int]]


@torch.no_grad()
def text_features(
    model: CrossModalModel,
    processor: MultimodalProcessor,
    captions: Sequence[str],
    batch_size: int = 256,
) -> Features:
    """Frozen features of ``captions`` (eval mode) on the CPU, tokens padded to the longest."""
    model.eval()
    device = next(model.parameters()).device
    parts = []
    for start in range(0, len(captions), batch_size):
        encoded = processor.process_text(list(captions[start : start + batch_size]))
        parts.append(
            model.text_features(
                encoded["input_ids"].to(device), encoded["attention_mask"].to(device)
            )
        )
    length = max(part.tokens.shape[1] for part in parts)
    parts = [pad_tokens(part, length) for part in parts]
    return Features(
        torch.cat([p.embeds for p in parts]).float().cpu(),
        torch.cat([p.projected for p in parts]).float().cpu(),
        torch.cat([p.tokens for p in parts]).float().cpu(),
        torch.cat([p.mask for p in parts]).cpu(),  # type: ignore[misc]
    )


def frozen_pairs(
    model: CrossModalModel,
    processor: MultimodalProcessor,
    images: list[Features],
    captions: Sequence[str],
    image_of_row: torch.Tensor,
    reorder: bool,
) -> FrozenPairs:
    """The stage's features: ``images`` as given, the captions' (and, with ``reorder``, their
    reorderings') computed here."""
    text = text_features(model, processor, captions)
    options = [reorderings(c) if reorder else [] for c in captions]
    flat = [option for caption_options in options for option in caption_options]
    reordered = text_features(model, processor, flat) if flat else None
    reordered_of_row, start = [], 0
    for caption_options in options:
        reordered_of_row.append(list(range(start, start + len(caption_options))))
        start += len(caption_options)
    row_of_caption: dict[str, int] = {}
    for row, caption in enumerate(captions):
        row_of_caption.setdefault(caption, row)
    counterparts = [
        [row_of_caption[o] for o in caption_options if o in row_of_caption]
        for caption_options in options
    ]
    return FrozenPairs(images, text, image_of_row, reordered, reordered_of_row, counterparts)


def nearest_by_itc(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    image_of_row: torch.Tensor,
    k: int,
    chunk: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each caption's ``k`` most similar images other than its own (N, k), and each image's
    ``k`` most similar captions of other images (I, k), by cosine over the whole set; scored
    ``chunk`` rows at a time (O(chunk x N) memory). ``k`` shrinks to what every row has."""
    images, rows = len(image_embeds), len(text_embeds)
    per_image = torch.bincount(image_of_row, minlength=images)
    k = min(k, images - 1, rows - int(per_image.max()))
    if k < 1:
        raise ValueError("the ITM stage needs at least two training images")
    near_images, near_captions = [], []
    for start in range(0, rows, chunk):
        scores = text_embeds[start : start + chunk] @ image_embeds.t()
        own = image_of_row[start : start + chunk]
        scores[torch.arange(len(scores)), own] = float("-inf")
        near_images.append(scores.topk(k, dim=1).indices)
    for start in range(0, images, chunk):
        scores = image_embeds[start : start + chunk] @ text_embeds.t()
        own = image_of_row[None, :] == torch.arange(start, start + len(scores))[:, None]
        near_captions.append(scores.masked_fill(own, float("-inf")).topk(k, dim=1).indices)
    return torch.cat(near_images), torch.cat(near_captions)


def _rows(features: Features, rows: torch.Tensor, device: torch.device) -> Features:
    """Rows of frozen features on ``device``, as float32 (the image cache's tokens are
    float16)."""
    picked = select_rows(features, rows)
    mask = None if picked.mask is None else picked.mask.to(device)
    return Features(
        picked.embeds.to(device),
        picked.projected.to(device),
        picked.tokens.to(device).float(),
        mask,
    )


class ITMStage:
    """Trains ``model.fusion`` and ``model.itm_head`` on :class:`FrozenPairs` under
    ``section.optim``; nothing else changes. ``hard_negatives`` / ``reordered_batch``: the
    ``experimental.itm_*`` keys. ``log(step, record)`` receives the loss terms every
    ``log_every`` steps."""

    def __init__(
        self,
        model: CrossModalModel,
        pairs: FrozenPairs,
        section: ITMStageSection,
        seed: int,
        autocast: Callable = contextlib.nullcontext,
        *,
        hard_negatives: int = ExperimentalSection.itm_hard_negatives,
        reordered_batch: int = ExperimentalSection.itm_reordered_batch,
    ):
        self.model, self.pairs, self.section, self.seed = model, pairs, section, seed
        self.reordered_batch = reordered_batch
        self.device = next(model.parameters()).device  # the features stay on the CPU
        self.autocast = autocast
        self.near_images, self.near_captions = nearest_by_itc(
            pairs.images[0].embeds, pairs.text.embeds, pairs.image_of_row, hard_negatives
        )
        self.params = [p for module in (model.fusion, model.itm_head) for p in module.parameters()]
        self.listed = torch.tensor(
            [r for r, options in enumerate(pairs.reordered_of_row) if options], dtype=torch.long
        )

    def run(self, log: Callable[[int, dict], None] | None = None, log_every: int = 10) -> dict:
        """All the stage's steps; returns the last step's loss terms."""
        section, optim, model = self.section, self.section.optim, self.model
        model.requires_grad_(False)
        for p in self.params:
            p.requires_grad_(True)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            [
                {"params": [p for n, p in named if not no_decay(n, p)]},
                {"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0},
            ],
            lr=optim.lr,
            weight_decay=optim.weight_decay,
            betas=(0.9, 0.98),
            eps=1e-6,
        )
        total = optim.steps
        schedule = cosine_schedule(optimizer, optim.warmup_steps, total, optim.min_lr_ratio)
        terms: dict = {}
        rows_count = len(self.pairs.text.embeds)
        batch = min(optim.batch_size, rows_count)
        per_epoch = rows_count // batch
        torch.manual_seed(self.seed * 1_000_003 + 17)  # the fusion's dropout
        for step in range(total):
            epoch, position = divmod(step, per_epoch)
            rows = torch.tensor(epoch_batches(rows_count, batch, self.seed + 31, epoch)[position])
            generator = torch.Generator().manual_seed((self.seed * 1_000_003 + step) % 2**62)
            model.eval()
            model.fusion.train()
            model.itm_head.train()
            with self.autocast():
                parts = self.step_terms(rows, generator)
                loss = sum(getattr(section, name) * value for name, value in parts.items())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[union-attr]
            if optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.params, optim.grad_clip)
            optimizer.step()
            schedule.step()
            terms = {
                "loss": float(loss.detach()),
                **{k: float(v.detach()) for k, v in parts.items()},
            }
            if log is not None and ((step + 1) % log_every == 0 or step + 1 == total):
                log(step + 1, {**terms, "lr": schedule.get_last_lr()[0]})
        model.eval()
        return terms

    def step_terms(self, rows: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The stage's loss terms (unweighted) of one batch of caption rows."""
        section, pairs = self.section, self.pairs
        views = len(pairs.images)
        n = len(rows)
        image = pairs.image_of_row[rows]
        pick = torch.randint(0, self.near_images.shape[1], (2, n), generator=generator)
        view = torch.randint(0, views, (2, n), generator=generator)
        terms: dict[str, torch.Tensor] = {}
        if section.itm:
            negative_image = self.near_images[rows, pick[0]]
            negative_caption = self.near_captions[image, pick[1]]
            logits = self._logits(
                torch.cat([image, image, negative_image]),
                torch.cat([view[0], view[0], view[1]]),
                self.pairs.text,
                torch.cat([rows, negative_caption, rows]),
            )
            terms["itm"] = losses.itm_loss(logits[:n], logits[n:])
        if section.reordered or section.reordered_images:
            listed = self._listed_rows(rows, generator)
            listed_image = pairs.image_of_row[listed]
            listed_view = torch.randint(0, views, (2, len(listed)), generator=generator)
            if section.reordered:
                terms["reordered"] = self._reordered_term(
                    listed, listed_image, listed_view[0], generator
                )
            if section.reordered_images:
                terms["reordered_images"] = self._counterpart_term(
                    listed, listed_image, listed_view, generator
                )
        return terms

    def _listed_rows(self, rows: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The rows the order terms read: ``reordered_batch`` drawn from the captions with a
        reordering (all of them when fewer), or (0) those of the step's batch."""
        if not self.reordered_batch:
            return rows
        listed = self.listed
        take = torch.randperm(len(listed), generator=generator)[: self.reordered_batch]
        return listed[take]

    def _reordered_term(self, rows, image, view, generator) -> torch.Tensor:
        """Image against its caption and one reordering of it (rows that have one)."""
        options = self.pairs.reordered_of_row
        keep = [i for i, r in enumerate(rows.tolist()) if options[r]]
        if not keep:
            return self._zero()
        index = torch.tensor(keep)
        chosen = [_draw(options[int(rows[i])], generator) for i in keep]
        own = _rows(self.pairs.text, rows[index], self.device)
        other = _rows(self.pairs.reordered, torch.tensor(chosen), self.device)  # type: ignore[arg-type]
        length = max(own.tokens.shape[1], other.tokens.shape[1])
        own, other = pad_tokens(own, length), pad_tokens(other, length)
        both = Features(
            torch.cat([own.embeds, other.embeds]),
            torch.cat([own.projected, other.projected]),
            torch.cat([own.tokens, other.tokens]),
            torch.cat([own.mask, other.mask]),  # type: ignore[list-item]
        )
        images = self._image_rows(image[index], view[index])
        return itm_reordered_loss(self.model, images, both) / len(keep)

    def _counterpart_term(self, rows, image, view, generator) -> torch.Tensor:
        """Caption against its own image and the image of a caption that reorders it."""
        options = self.pairs.counterparts
        keep = [i for i, r in enumerate(rows.tolist()) if options[r]]
        if not keep:
            return self._zero()
        index = torch.tensor(keep)
        other = self.pairs.image_of_row[
            torch.tensor([_draw(options[int(rows[i])], generator) for i in keep])
        ]
        captions = torch.cat([rows[index], rows[index]])
        logits = self._logits(
            torch.cat([image[index], other]),
            torch.cat([view[0][index], view[1][index]]),
            self.pairs.text,
            captions,
        )
        score = (logits[:, 1] - logits[:, 0]).float()
        k = len(keep)
        return F.softplus(score[k:] - score[:k]).mean()

    def _image_rows(self, image: torch.Tensor, view: torch.Tensor) -> Features:
        """The image features of (image, view) pairs, one row each."""
        parts = [
            _rows(self.pairs.images[v], image[view == v], self.device)
            for v in range(len(self.pairs.images))
        ]
        order = torch.cat([torch.nonzero(view == v).flatten() for v in range(len(parts))])
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order))
        merged = Features(
            torch.cat([p.embeds for p in parts]),
            torch.cat([p.projected for p in parts]),
            torch.cat([p.tokens for p in parts]),
            None,
        )
        return select_rows(merged, inverse.to(self.device))

    def _logits(
        self, image: torch.Tensor, view: torch.Tensor, text: Features, caption: torch.Tensor
    ) -> torch.Tensor:
        """ITM logits (P, 2) of the pairs (image[p] in view[p], caption[p]); each distinct
        image view and caption is projected once."""
        key = image * len(self.pairs.images) + view
        keys, image_index = torch.unique(key, return_inverse=True)
        captions, text_index = torch.unique(caption, return_inverse=True)
        images = self._image_rows(keys // len(self.pairs.images), keys % len(self.pairs.images))
        return self.model.itm_pair_logits(
            images,
            _rows(text, captions, self.device),
            image_index.to(self.device),
            text_index.to(self.device),
        )

    def _zero(self) -> torch.Tensor:
        return torch.zeros((), device=self.device)


def _draw(options: list[int], generator: torch.Generator) -> int:
    return options[int(torch.randint(0, len(options), (1,), generator=generator))]
