"""The ITM stage (``itm_stage``): the fusion and ITM head train alone on frozen features."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from test_reordered import _list_dataset
from test_train import make_config, read_log
from test_train_defaults import assert_same_weights

from xmodal.config import ConfigError
from xmodal.data import load_dataset
from xmodal.models import CrossModalModel
from xmodal.models.model import Features
from xmodal.train import Trainer
from xmodal.train.config import (
    ExperimentalSection,
    ITMStageSection,
    LossSection,
    StageOptimSection,
)
from xmodal.train.itm_stage import FrozenPairs, ITMStage, frozen_pairs, nearest_by_itc
from xmodal.train.itm_task import ITMStageTask
from xmodal.train.objective import itm_reordered_loss


def _config(tmp_path, tiny_model_dir, name: str, steps: int = 4, **stage):
    lists = tmp_path / "lists"
    data = str(lists / "data.jsonl") if lists.exists() else _list_dataset(lists)
    cfg = make_config(tmp_path, tiny_model_dir, name, steps=steps, batch_size=4)
    cfg.data.train = cfg.data.val = data
    cfg.model.lock_image = True
    cfg.model.overrides = {"fusion.grid_positions": True}
    cfg.loss = LossSection(infonce=1.0, itm=0.0)
    cfg.itm_stage = ITMStageSection(
        **{"reordered": 1.0} | stage, optim=StageOptimSection(steps=6, batch_size=4)
    )
    cfg.experimental.itm_hard_negatives = 3
    cfg.eval_every = cfg.save_every = 2
    return cfg


def _weights(out_dir: str, sub: str = "model") -> dict[str, torch.Tensor]:
    return load_file(str(Path(out_dir) / sub / "model.safetensors"))


def test_the_stage_trains_only_the_fusion_and_head_then_calibrates(
    tmp_path, tiny_model_dir
) -> None:
    cfg = _config(tmp_path, tiny_model_dir, "run", reordered_images=1.0)
    Trainer(cfg).train()
    log = read_log(cfg.out_dir)
    stage = [r for r in log if r.get("stage") == "itm"]
    assert [r["step"] for r in stage] == [5, 6, 7, 8, 9, 10]  # after the 4 contrastive steps
    assert all(r["itm"] > 0 and r["reordered"] > 0 and r["reordered_images"] > 0 for r in stage)
    for record in stage:  # the weighted sum
        total = record["itm"] + record["reordered"] + record["reordered_images"]
        assert record["loss"] == pytest.approx(total, rel=1e-5)
    # validations before the stage report recall but do not calibrate; the one after does
    before = [r for r in log if "val_t2i_R@1" in r and r.get("stage") != "itm"]
    assert before and not any("val_rerank_weight" in r for r in before)
    weight = stage[-1]["val_rerank_weight"]
    assert (
        CrossModalModel.from_pretrained(Path(cfg.out_dir) / "model").config.fusion.rerank_weight
        == weight
    )
    # everything but the fusion and ITM head is the contrastive stage's last checkpoint
    final, contrastive = _weights(cfg.out_dir), _weights(cfg.out_dir, "checkpoints/step-0000004")
    trained = ("fusion.", "itm_head.")
    assert_same_weights(
        {k: v for k, v in final.items() if not k.startswith(trained)},
        {k: v for k, v in contrastive.items() if not k.startswith(trained)},
    )
    changed = [
        k for k in final if k.startswith(trained) and not torch.equal(final[k], contrastive[k])
    ]
    assert any(k.startswith("fusion.") for k in changed) and "itm_head.weight" in changed


def test_a_run_stopped_before_the_stage_resumes_to_the_same_weights(
    tmp_path, tiny_model_dir
) -> None:
    straight = _config(tmp_path, tiny_model_dir, "straight")
    Trainer(straight).train()
    interrupted = _config(tmp_path, tiny_model_dir, "interrupted")
    Trainer(interrupted).train(stop_after=4)  # killed after the contrastive steps
    assert not (Path(interrupted.out_dir) / "model").exists()
    torch.manual_seed(99)
    Trainer(interrupted).train(resume=True)
    assert_same_weights(_weights(straight.out_dir), _weights(interrupted.out_dir))
    steps = [r["step"] for r in read_log(interrupted.out_dir)]
    assert steps == sorted(set(steps)) and steps[-1] == 10  # no duplicated log lines


def test_an_unlocked_image_tower_is_run_once_for_the_stage(tmp_path, tiny_model_dir) -> None:
    cfg = _config(tmp_path, tiny_model_dir, "unlocked")
    cfg.model.lock_image = False
    Trainer(cfg).train()
    final, contrastive = _weights(cfg.out_dir), _weights(cfg.out_dir, "checkpoints/step-0000004")
    image = [k for k in final if k.startswith("image_tower.")]
    assert image and all(torch.equal(final[k], contrastive[k]) for k in image)
    assert any(r.get("stage") == "itm" for r in read_log(cfg.out_dir))


def test_nearest_by_itc_matches_a_brute_force_reference() -> None:
    torch.manual_seed(0)
    images, text = F.normalize(torch.randn(6, 8), dim=1), F.normalize(torch.randn(9, 8), dim=1)
    image_of_row = torch.tensor([0, 0, 1, 2, 3, 3, 3, 4, 5])  # image 3 has three captions
    near_images, near_captions = nearest_by_itc(images, text, image_of_row, k=4, chunk=2)
    assert near_images.shape == (9, 4) and near_captions.shape == (6, 4)
    for row in range(9):
        scores = {i: float(text[row] @ images[i]) for i in range(6) if i != image_of_row[row]}
        assert near_images[row].tolist() == sorted(scores, key=scores.get, reverse=True)[:4]
    for image in range(6):
        scores = {r: float(images[image] @ text[r]) for r in range(9) if image_of_row[r] != image}
        assert near_captions[image].tolist() == sorted(scores, key=scores.get, reverse=True)[:4]
    # k shrinks to what every row has: image 3's captions leave 6 others
    assert nearest_by_itc(images, text, image_of_row, k=50)[1].shape == (6, 5)
    with pytest.raises(ValueError, match="two training images"):
        nearest_by_itc(images[:1], text[:2], torch.tensor([0, 0]), k=3)


def _stage_pairs(make_tiny_config, processor, tmp_path, views: int = 1):
    """A tiny model with grid positions and the frozen features of the list dataset."""
    torch.manual_seed(0)
    config = make_tiny_config()
    config.fusion.grid_positions = True
    model = CrossModalModel(config).eval()
    dataset = load_dataset(_list_dataset(tmp_path))
    pixels = torch.stack([processor.process_image(ex.image) for ex in dataset.examples])
    with torch.no_grad():
        first = model.image_features(pixels)
        images = [first] + [
            model.image_features(pixels + 0.3 * torch.randn_like(pixels)) for _ in range(views - 1)
        ]
    rows = torch.arange(len(dataset))
    pairs = frozen_pairs(model, processor, images, dataset.captions(), rows, reorder=True)
    return model, pairs, dataset


def test_frozen_pairs_find_reorderings_and_the_images_that_show_them(
    make_tiny_config, processor, tmp_path
) -> None:
    model, pairs, dataset = _stage_pairs(make_tiny_config, processor, tmp_path)
    captions = dataset.captions()
    for row, caption in enumerate(captions):
        if caption.startswith("colours:"):  # "colours: red, blue" <-> "colours: blue, red"
            assert len(pairs.reordered_of_row[row]) == 1
            (other,) = pairs.counterparts[row]
            left, right = caption[len("colours: ") :].split(", ")
            assert captions[other] == f"colours: {right}, {left}"
        else:
            assert pairs.reordered_of_row[row] == [] and pairs.counterparts[row] == []
    assert pairs.reordered is not None and len(pairs.reordered.embeds) == 6
    # the order terms' rows: drawn from the listed captions, whatever the step's batch holds
    listed = {r for r, c in enumerate(captions) if c.startswith("colours:")}
    batch = torch.tensor([6, 7, 8])  # no caption with a list
    for draw, expected in ((4, 4), (64, 6)):
        section = ITMStageSection(reordered=1.0, optim=StageOptimSection(steps=1))
        stage = ITMStage(model, pairs, section, 0, hard_negatives=2, reordered_batch=draw)
        rows = stage._listed_rows(batch, torch.Generator())
        assert len(set(rows.tolist())) == expected and set(rows.tolist()) <= listed
    section = ITMStageSection(reordered=1.0, optim=StageOptimSection(steps=1))
    stage = ITMStage(model, pairs, section, 0, hard_negatives=2, reordered_batch=0)
    assert stage._listed_rows(batch, torch.Generator()) is batch


def test_stage_logits_and_terms_match_a_direct_computation(
    make_tiny_config, processor, tmp_path
) -> None:
    model, pairs, _ = _stage_pairs(make_tiny_config, processor, tmp_path, views=2)
    section = ITMStageSection(reordered=1.0, reordered_images=1.0, optim=StageOptimSection(steps=1))
    stage = ITMStage(model, pairs, section, seed=0, hard_negatives=2, reordered_batch=0)
    image, view = torch.tensor([0, 3, 3, 1]), torch.tensor([1, 0, 1, 0])
    caption = torch.tensor([2, 2, 5, 0])
    got = stage._logits(image, view, pairs.text, caption)
    for p in range(4):
        one = pairs.images[int(view[p])]
        want = model.itm_logits(
            Features(
                one.embeds[image[p], None],
                one.projected[image[p], None],
                one.tokens[image[p], None],
            ),
            Features(
                *(
                    f[caption[p], None]
                    for f in (
                        pairs.text.embeds,
                        pairs.text.projected,
                        pairs.text.tokens,
                        pairs.text.mask,
                    )
                )
            ),
        )
        torch.testing.assert_close(got[p : p + 1], want, atol=1e-5, rtol=1e-5)
    # the order term of a batch (reordered_batch 0: its listed rows): each listed row's
    # image, own caption against its reordering
    rows = torch.tensor([0, 1, 6, 7])  # two listed captions, two without a list
    terms = stage.step_terms(rows, torch.Generator().manual_seed(1))
    assert set(terms) == {"itm", "reordered", "reordered_images"}
    own_rows = torch.tensor([0, 1])
    reordered = torch.tensor([pairs.reordered_of_row[0][0], pairs.reordered_of_row[1][0]])
    text = Features(
        *(
            torch.cat([a[own_rows], b[reordered]])
            for a, b in (
                (pairs.text.embeds, pairs.reordered.embeds),
                (pairs.text.projected, pairs.reordered.projected),
                (pairs.text.tokens, pairs.reordered.tokens),
                (pairs.text.mask, pairs.reordered.mask),
            )
        )
    )
    # the row's view is drawn; the reference takes it from the same generator draw
    generator = torch.Generator().manual_seed(1)
    torch.randint(0, 2, (2, 4), generator=generator)  # the ITM negatives' picks
    torch.randint(0, 2, (2, 4), generator=generator)  # and views
    views = torch.randint(0, 2, (2, 4), generator=generator)[0][:2]  # the listed rows' views
    image_rows = stage._image_rows(own_rows, views)
    want = itm_reordered_loss(model, image_rows, text) / 2
    torch.testing.assert_close(terms["reordered"], want, atol=1e-5, rtol=1e-5)


def _order_accuracy(model, pairs: FrozenPairs, stage: ITMStage) -> tuple[float, float]:
    """Share of listed captions scored above their reordering on their image, and of their
    images scored above the image of the reordering."""
    listed = torch.tensor([r for r, c in enumerate(pairs.counterparts) if c])
    other = torch.tensor([pairs.counterparts[int(r)][0] for r in listed])
    view = torch.zeros(len(listed), dtype=torch.long)
    model.eval()
    with torch.no_grad():
        own = stage._logits(listed, view, pairs.text, listed)
        swapped_text = stage._logits(listed, view, pairs.text, other)  # the reordering's text
        swapped_image = stage._logits(other, view, pairs.text, listed)
    score = lambda logits: logits[:, 1] - logits[:, 0]  # noqa: E731
    i2t = (score(own) > score(swapped_text)).float().mean().item()
    t2i = (score(own) > score(swapped_image)).float().mean().item()
    return i2t, t2i


def test_the_stage_teaches_the_head_which_colour_is_on_the_left(
    make_tiny_config, processor, tmp_path
) -> None:
    """Frozen features of two-colour images; the order terms alone (no ITM term) teach the
    fusion to tell "colours: red, blue" from "colours: blue, red" both ways."""
    model, pairs, _ = _stage_pairs(make_tiny_config, processor, tmp_path)
    section = ITMStageSection(
        itm=0.0,
        reordered=1.0,
        reordered_images=1.0,
        optim=StageOptimSection(steps=150, batch_size=9, lr=3e-3, warmup_steps=5),
    )
    stage = ITMStage(model, pairs, section, seed=0, hard_negatives=2)
    before = _order_accuracy(model, pairs, stage)
    records = []
    stage.run(lambda step, terms: records.append(terms), log_every=1)
    after = _order_accuracy(model, pairs, stage)
    assert min(before) < 1.0
    assert after == (1.0, 1.0), (before, after)
    assert records[0]["reordered"] > 0.5 and records[-1]["reordered"] < 0.05


def test_config_checks() -> None:
    with pytest.raises(ConfigError, match="itm_stage.optim.steps must be >= 0"):
        ITMStageSection(optim=StageOptimSection(steps=-1)).validate()
    with pytest.raises(ConfigError, match="itm_stage.optim.batch_size must be positive"):
        ITMStageSection(optim=StageOptimSection(batch_size=0)).validate()
    with pytest.raises(ConfigError, match="itm_reordered_batch must be >= 0"):
        ExperimentalSection(itm_reordered_batch=-1).validate()
    with pytest.raises(ConfigError, match="itm_hard_negatives must be >= 1"):
        ExperimentalSection(itm_hard_negatives=0).validate()
    with pytest.raises(ConfigError, match="weights must be >= 0"):
        ITMStageSection(reordered=-0.5).validate()
    with pytest.raises(ConfigError, match="give itm, reordered or reordered_images"):
        ITMStageSection(itm=0.0, optim=StageOptimSection(steps=5)).validate()
    ITMStageSection(itm=0.0).validate()  # no stage: nothing to weigh


def test_a_model_without_fusion_is_refused(tmp_path, tiny_model_dir) -> None:
    cfg = _config(tmp_path, tiny_model_dir, "none")
    cfg.model.fusion, cfg.model.overrides = "none", {}
    with pytest.raises(ConfigError, match="itm_stage trains the fusion"):
        Trainer(cfg)


def test_the_stage_reads_view_0_of_the_cache(tmp_path, tiny_model_dir) -> None:
    cfg = _config(tmp_path, tiny_model_dir, "views")
    cfg.model.cached_views = 2
    trainer = Trainer(cfg)
    images, train_set = trainer.image_source()
    task = ITMStageTask(trainer.model, trainer.processor, train_set, images, cfg, trainer.precision)
    pairs = task.frozen_pairs()
    assert len(pairs.images) == 1
    assert torch.equal(pairs.images[0].tokens, images.base.tokens)  # view 0: as evaluated
    assert pairs.image_of_row.tolist() == list(range(len(train_set)))
