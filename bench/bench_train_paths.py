"""The quickstart's two hot paths against what they replaced, in the same process.

1. ITM pairs (a training step's ITM term: the batch's pairs plus one hard negative caption per
   image and one hard negative image per caption, 3 x batch pairs, forward and backward
   through the text tower's last layers, the fusion and the ITM head): ``itm_pair_logits``
   (the last fusion layer for the first token only, each caption's keys and values computed
   once) against the reference (every caption copied per pair, the last layer run for every
   token), fp32 and bf16 autocast; the quickstart's model (7 pool levels, 1 fusion layer).
2. The locked image tower over real images (the feature cache, validation, the style-shift
   check): ``image_tower_outputs`` (an inference copy, batch norms folded, channels_last)
   against the plain tower, at the quickstart's 7 pool levels.
3. Re-rank scoring (validation's calibration, ``eval``): ``ImagePairScorer`` on the pairs of
   text->image and image->text queries against their top 16 (each caption run through the
   text tower once, its features kept for the later batches) against the reference (each
   pair's caption run again).
4. The contrastive step's text side (forward and backward through MiniLM's last 4 layers, a
   batch of real captions): ``text_features_by_length`` in 2, 4 and 8 runs of similar length
   (``optim.text_length_groups``) against the batch at once, padded to its longest caption.

    OMP_WAIT_POLICY=PASSIVE python bench/bench_train_paths.py
"""

from __future__ import annotations

import argparse

import torch
from common import add_machine_args, measure, real_captions, real_images, setup_machine

from xmodal.config import ImageTowerConfig
from xmodal.evaluate import runner
from xmodal.models.fusion import CrossAttentionFusion
from xmodal.models.image import EfficientNetLiteTower
from xmodal.models.towers import TowerOutput
from xmodal.presets import load_model


def reference_itm_logits(model, image, text, image_rows, text_rows) -> torch.Tensor:
    """What ``itm_pair_logits`` computed before: captions copied per pair, all tokens fused."""
    fusion = model.fusion
    image_ctx = fusion.image_in(image.tokens)
    tokens = fusion.text_in(text.tokens.index_select(0, text_rows))
    mask = text.mask.index_select(0, text_rows)
    for layer in fusion.layers:
        tokens = layer(tokens, mask, image_ctx, image.mask, image_rows)
    fused = fusion.norm(tokens[:, 0])
    agreement = image.embeds[image_rows] * text.embeds[text_rows]
    return model.itm_head(torch.cat([fused, agreement], dim=-1))


def bench_itm(batch: int, repeats: int) -> None:
    model, processor = load_model("offline-default")
    model.image_tower = EfficientNetLiteTower(
        ImageTowerConfig(name="efficientnet-lite0", pool_levels=7)
    )
    model.image_proj = torch.nn.Sequential(  # the quickstart's image_projection_hidden: 1024
        torch.nn.Linear(model.image_tower.output_dim, 1024),
        torch.nn.GELU(),
        torch.nn.Linear(1024, model.config.embed_dim),
    )
    model.fusion = CrossAttentionFusion(  # the quickstart's fusion: one layer
        model.image_tower.token_dim, model.text_tower.token_dim, model.config.embed_dim, 1, 8
    )
    model.train().image_tower.requires_grad_(False)
    layers = model.text_tower.model.encoder.layer
    model.text_tower.requires_grad_(False)
    for layer in layers[-4:]:  # the quickstart's text_trainable_layers: 4
        layer.requires_grad_(True)
    captions, source = real_captions(batch, "auto")
    tokens = processor.process_text(captions)
    generator = torch.Generator().manual_seed(0)
    grid = torch.randn(batch, 49, model.image_tower.token_dim, generator=generator)
    pooled = torch.randn(batch, model.image_tower.output_dim, generator=generator)
    own = torch.arange(batch)
    image_rows = torch.cat([own, own, torch.randperm(batch, generator=generator)])
    text_rows = torch.cat([own, torch.randperm(batch, generator=generator), own])
    print(f"ITM term: {batch} pairs + {2 * batch} negatives, captions: {source}")

    def step(scorer) -> None:
        text = model.text_features(tokens["input_ids"], tokens["attention_mask"])
        image = model.image_features_from_tower(TowerOutput(pooled=pooled, tokens=grid))
        scorer(model, image, text, image_rows, text_rows).float().sum().backward()

    def current(m, image, text, image_rows, text_rows):
        return m.itm_pair_logits(image, text, image_rows, text_rows)

    for precision in ("fp32", "bf16"):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            before = measure(lambda: step(reference_itm_logits), repeats=repeats)
            after = measure(lambda: step(current), repeats=repeats)
        print(
            f"  {precision}: reference {before.median:.3f} s, itm_pair_logits "
            f"{after.median:.3f} s -> {before.median / after.median:.2f}x (load {after.load:.1f})"
        )


def bench_image_tower(count: int, repeats: int) -> None:
    model, processor = load_model("offline-default")
    model.image_tower = EfficientNetLiteTower(
        ImageTowerConfig(name="efficientnet-lite0", pool_levels=7)
    ).eval()
    images, source = real_images(count, "auto")
    print(f"image tower, 7 pool levels: {count} images ({source})")
    fast = runner.inference_copy

    def plain_copy(tower, widen_kernels):  # the plain tower, as before
        return tower

    def run(copy) -> None:
        runner.inference_copy = copy
        try:
            runner.image_tower_outputs(model, processor, images, num_workers=1)
        finally:
            runner.inference_copy = fast

    before = measure(lambda: run(plain_copy), repeats=repeats)
    after = measure(lambda: run(fast), repeats=repeats)
    print(
        f"  plain tower {count / before.median:.0f} img/s, inference copy "
        f"{count / after.median:.0f} img/s -> {before.median / after.median:.2f}x "
        f"(load {after.load:.1f})"
    )


def reference_pair_scores(scorer: runner.ImagePairScorer, image_idx, text_idx) -> torch.Tensor:
    """What ``ImagePairScorer`` computed before: every pair's caption through the text tower."""
    model = scorer.model
    images, image_rows = torch.unique(image_idx, return_inverse=True)
    image = model.image_features_from_tower(
        TowerOutput(scorer.image_pooled[images], scorer.image_tokens[images].float())
    )
    batch = scorer.processor.process_text([scorer.captions[i] for i in text_idx.tolist()])
    text = model.text_features(batch["input_ids"], batch["attention_mask"])
    logits = model.itm_pair_logits(image, text, image_rows, torch.arange(len(text_idx)))
    return logits[:, 1] - logits[:, 0]


def bench_rerank_scorer(queries: int, k: int, repeats: int) -> None:
    model, processor = load_model("offline-default")
    model.eval()
    captions, source = real_captions(queries, "auto")
    generator = torch.Generator().manual_seed(0)
    pooled = torch.randn(queries, model.image_tower.output_dim, generator=generator)
    tokens = torch.randn(queries, 49, model.image_tower.token_dim, generator=generator).half()
    scorer = runner.ImagePairScorer(model, processor, pooled, tokens, captions)
    candidates = torch.randint(0, queries, (queries, k), generator=generator)
    own = torch.arange(queries)[:, None].expand(queries, k)
    # text->image: each caption against k images; image->text: each image against k captions
    pairs = [(candidates.flatten(), own.flatten()), (own.flatten(), candidates.flatten())]
    print(f"re-rank scoring: {queries} queries x top {k}, both directions, captions: {source}")

    def run(score) -> None:
        with torch.inference_mode():
            for image_idx, text_idx in pairs:
                for start in range(0, len(image_idx), 256):  # rerank_candidates' batch size
                    chunk = slice(start, start + 256)
                    score(image_idx[chunk], text_idx[chunk])

    with torch.inference_mode():
        image_idx, text_idx = pairs[0][0][:256], pairs[0][1][:256]
        gap = scorer(image_idx, text_idx) - reference_pair_scores(scorer, image_idx, text_idx)
        print(f"  max abs difference from the reference: {gap.abs().max():.2e}")
    before = measure(lambda: run(lambda i, t: reference_pair_scores(scorer, i, t)), repeats=repeats)

    def fresh_scorer():  # each run starts with an empty caption cache
        return runner.ImagePairScorer(model, processor, pooled, tokens, captions)

    after = measure(lambda: run(fresh_scorer()), repeats=repeats)
    print(
        f"  reference {before.median:.2f} s, each caption once {after.median:.2f} s -> "
        f"{before.median / after.median:.2f}x (load {after.load:.1f})"
    )


def bench_text_groups(batch: int, repeats: int) -> None:
    model, processor = load_model("offline-default")
    model.train().text_tower.requires_grad_(False)
    for layer in model.text_tower.model.encoder.layer[-4:]:  # text_trainable_layers: 4
        layer.requires_grad_(True)
    captions, source = real_captions(batch, "auto")
    tokens = processor.process_text(captions)
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    real = int(mask.sum())
    print(
        f"text side of a contrastive step: {batch} captions ({source}), padded to "
        f"{ids.shape[1]}: {real / mask.numel():.0%} of the positions are real tokens"
    )

    def step(groups: int) -> None:
        model.text_features_by_length(ids, mask, groups).embeds.sum().backward()

    before = measure(lambda: step(1), repeats=repeats)
    for groups in (2, 4, 8):
        after = measure(lambda g=groups: step(g), repeats=repeats)
        print(
            f"  one run {before.median:.3f} s, {groups} runs by length {after.median:.3f} s -> "
            f"{before.median / after.median:.2f}x (load {after.load:.1f})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_machine_args(parser)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--queries", type=int, default=256, help="re-rank queries")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--only",
        choices=("itm", "tower", "rerank", "text"),
        help="run one of the four benchmarks",
    )
    args = parser.parse_args()
    setup_machine(args)
    if args.only in (None, "itm"):
        bench_itm(args.batch, args.repeats)
    if args.only in (None, "tower"):
        bench_image_tower(args.images, args.repeats)
    if args.only in (None, "rerank"):
        bench_rerank_scorer(args.queries, 16, args.repeats)
    if args.only in (None, "text"):
        bench_text_groups(args.batch, args.repeats)


if __name__ == "__main__":
    main()
