"""Seeded image changes: training views and the style-shift check (and its report)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import write_colour_dataset
from PIL import Image, ImageDraw

from xmodal.config import ConfigError
from xmodal.data import load_dataset
from xmodal.data.augment import STYLE_SHIFTS, AugmentView, StyleShift, keyed_rng, zoom_out
from xmodal.evaluate.retrieval import retrieval_metrics
from xmodal.evaluate.runner import image_tower_outputs
from xmodal.evaluate.style_shift import format_style_shift, style_shift_report


def _picture() -> Image.Image:
    image = Image.new("RGB", (64, 64), (250, 250, 250))
    draw = ImageDraw.Draw(image)
    draw.ellipse((8, 10, 50, 52), fill=(230, 190, 30), outline=(20, 20, 20), width=3)
    draw.rectangle((36, 4, 60, 20), fill=(200, 30, 60))
    return image


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_augmented_views_are_seeded_and_differ() -> None:
    image = _picture()
    assert AugmentView(0, 0)("a", image) is image  # view 0: as evaluation sees it
    views = [_pixels(AugmentView(0, v)("a", image)) for v in range(1, 6)]
    again = [_pixels(AugmentView(0, v)("a", image.copy())) for v in range(1, 6)]
    for view, repeat in zip(views, again, strict=True):
        assert view.shape == (64, 64, 3)
        assert np.array_equal(view, repeat)  # a function of (seed, view, key)
        assert np.abs(view - _pixels(image)).mean() > 2  # really changed
    for i in range(len(views)):
        for j in range(i + 1, len(views)):
            assert np.abs(views[i] - views[j]).mean() > 2, (i, j)
    other_seed = _pixels(AugmentView(1, 1)("a", image))
    other_key = _pixels(AugmentView(0, 1)("b", image))
    assert not np.array_equal(other_seed, views[0])
    assert not np.array_equal(other_key, views[0])


def test_flip_probability_mirrors() -> None:
    image = _picture()
    plain = AugmentView(3, 2, crop_scale=(1.0, 1.0), jitter=0, hue=0, greyscale=0, blur=0)
    mirrored = AugmentView(
        3, 2, crop_scale=(1.0, 1.0), jitter=0, hue=0, greyscale=0, blur=0, flip=1
    )
    a, b = _pixels(plain("k", image)), _pixels(mirrored("k", image))
    assert np.abs(a[:, ::-1] - b).mean() < 3 < np.abs(a - b).mean()


@pytest.mark.parametrize("style", sorted(STYLE_SHIFTS))
def test_style_shifts_are_deterministic_and_strong(style: str) -> None:
    image = _picture()
    first = _pixels(StyleShift(style, seed=5)("x", image))
    assert first.shape == (64, 64, 3)
    assert np.array_equal(first, _pixels(StyleShift(style, seed=5)("x", image.copy())))
    assert np.abs(first - _pixels(image)).mean() > 3  # a visible change
    if style == "greyscale":
        assert np.array_equal(first[..., 0], first[..., 1])


def test_unknown_style_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown style shift.*known: greyscale"):
        StyleShift("watercolour")


def test_style_shift_report_matches_a_reference(tmp_path, tiny_model_dir) -> None:
    from xmodal.presets import load_model

    model, processor = load_model(tiny_model_dir)
    dataset = load_dataset(write_colour_dataset(tmp_path / "d", n=10, captions_per_image=2))
    styles = ("greyscale", "crop")
    report = style_shift_report(model, processor, dataset, styles=styles, seed=2, num_workers=0)
    assert set(report) >= {"in_style", "t2i_R@1", "i2t_R@1", "t2i_kept", "i2t_kept", "styles"}
    assert list(report["styles"]) == list(styles) and report["n_images"] == 10

    # reference: change each image by hand, embed, and score with retrieval_metrics
    unique = dataset.unique_images()
    with torch.inference_mode():
        batch = processor(text=dataset.captions())
        texts = model.encode_text(batch["input_ids"], batch["attention_mask"])

        def embed(images) -> torch.Tensor:
            return model.encode_image(torch.stack([processor.process_image(i) for i in images]))

        plain = [processor.load_image(ex.image) for ex in unique]
        expected_in = retrieval_metrics(embed(plain), texts, dataset.text_to_image(), ks=(1,))
        for style in styles:
            changed = [
                StyleShift(style, 2)(ex.image_id, im) for ex, im in zip(unique, plain, strict=True)
            ]
            ref = retrieval_metrics(embed(changed), texts, dataset.text_to_image(), ks=(1,))
            got = report["styles"][style]
            assert got["t2i_R@1"] == pytest.approx(ref["t2i_R@1"])
            assert got["i2t_R@1"] == pytest.approx(ref["i2t_R@1"])
    assert report["in_style"]["t2i_R@1"] == pytest.approx(expected_in["t2i_R@1"])
    mean = sum(report["styles"][s]["t2i_R@1"] for s in styles) / 2
    assert report["t2i_R@1"] == pytest.approx(mean)
    if report["in_style"]["t2i_R@1"]:
        kept = 100 * mean / report["in_style"]["t2i_R@1"]
        assert report["t2i_kept"] == pytest.approx(kept, abs=0.051)
    # the in-style tower outputs handed in (as the quickstart and `eval` do): the same report
    images = [ex.image for ex in unique]
    given = image_tower_outputs(model, processor, images, num_workers=0, keep_tokens=False)
    again = style_shift_report(
        model, processor, dataset, styles=styles, seed=2, num_workers=0, in_style=given
    )
    assert again == report
    assert "style shift (2 styles, seed 2)" in format_style_shift(report)
    assert report["groups"] == {}  # neither group fully evaluated


def test_eval_cli_style_shift(tmp_path, tiny_model_dir, capsys) -> None:
    from xmodal.cli import main

    data = write_colour_dataset(tmp_path / "data", n=8)
    out = tmp_path / "report.json"
    argv = ["eval", "--model", tiny_model_dir, "--data", data, "--out", str(out)]
    assert main([*argv, "--rerank-k", "0", "--workers", "0", "--style-shift"]) == 0
    report = json.loads(out.read_text())["style_shift"]
    assert set(report["styles"]) == set(STYLE_SHIFTS) and report["n_images"] == 8
    printed = capsys.readouterr().out
    assert "style shift (10 styles, seed 0)" in printed and "mean of redrawn (3)" in printed
    groups = report["groups"]
    assert groups["redrawn"]["styles"] == ["warp", "flat", "outline"]
    assert len(groups["changed"]["styles"]) == 7
    assert set(groups["changed"]["styles"]) | set(groups["redrawn"]["styles"]) == set(STYLE_SHIFTS)
    for group in groups.values():
        mean = sum(report["styles"][s]["t2i_R@1"] for s in group["styles"]) / len(group["styles"])
        assert group["t2i_R@1"] == pytest.approx(mean)


def test_zoomed_out_views_shrink_the_subject_and_keep_the_other_draws() -> None:
    image = _picture()
    background = np.array([250, 250, 250])
    quiet = {"crop_scale": (1.0, 1.0), "jitter": 0, "greyscale": 0, "blur": 0}

    def subject_area(pixels: np.ndarray) -> int:  # pixels that are not the background
        return int((np.abs(pixels - background).max(axis=-1) > 40).sum())

    full = subject_area(_pixels(image))
    zoomed = [_pixels(AugmentView(0, 1, zoom_out=1.0, **quiet)(k, image)) for k in "abcdef"]
    for key, pixels in zip("abcdef", zoomed, strict=True):
        assert np.array_equal(pixels, _pixels(AugmentView(0, 1, zoom_out=1.0, **quiet)(key, image)))
        assert pixels.shape == (64, 64, 3)
        # drawn at 55-90% of its size: the subject covers 0.55^2 .. 0.9^2 of its area
        assert 0.55**2 * 0.8 < subject_area(pixels) / full < 0.9**2 * 1.1
        border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
        assert (np.abs(border - background).max(axis=-1) <= 40).mean() > 0.5  # canvas colour
    assert len({p.tobytes() for p in zoomed}) == len(zoomed)  # sizes and places vary
    # zooming comes last and draws from its own stream: the rest of the view is unchanged
    for key in "abc":
        rng = keyed_rng("zoom", 0, 1, key)
        rng.random()  # the draw that decided to zoom (always, at zoom_out=1)
        expected = zoom_out(AugmentView(0, 1)(key, image), rng)
        assert np.array_equal(
            _pixels(AugmentView(0, 1, zoom_out=1.0)(key, image)), _pixels(expected)
        )
    assert np.array_equal(  # 0 (the default) draws nothing more
        _pixels(AugmentView(0, 1)("a", image)), _pixels(AugmentView(0, 1, zoom_out=0.0)("a", image))
    )


def test_view_zoom_out_is_validated() -> None:
    from xmodal.config import from_dict
    from xmodal.train.config import ModelSection

    for bad in (-0.1, 1.5):
        with pytest.raises(ConfigError, match=r"model.view_zoom_out must be in \[0, 1\]"):
            from_dict(ModelSection, {"view_zoom_out": bad})
    assert from_dict(ModelSection, {"view_zoom_out": 0.5}).view_zoom_out == 0.5


def test_artist_shift_compares_the_same_names_against_a_reference(tmp_path, tiny_model_dir):
    from xmodal.evaluate.style_shift import artist_shift_report, format_artist_shift
    from xmodal.presets import load_model

    model, processor = load_model(tiny_model_dir)
    dataset = load_dataset(write_colour_dataset(tmp_path / "d", n=12))
    # "another artist": its drawings of 8 of the 12 images, here the images turned greyscale
    drawn_rows = []
    for ex in dataset.unique_images()[:8]:
        image = Image.open(ex.image).convert("L").convert("RGB")
        path = tmp_path / "artist" / ex.image_id
        path.parent.mkdir(exist_ok=True)
        image.save(path)
        drawn_rows.append(
            {"image": str(path), "caption": ex.caption, "image_id": f"x/{ex.image_id}"}
        )
    table = tmp_path / "test.x.jsonl"
    table.write_text("".join(json.dumps(r) + "\n" for r in drawn_rows))
    drawn = load_dataset(table)
    report = artist_shift_report(model, processor, dataset, drawn, num_workers=0)
    assert report["n_images"] == 8

    def reference(rows) -> dict:  # the 8 images alone, scored by hand
        with torch.inference_mode():
            batch = processor(text=[r["caption"] for r in rows])
            texts = model.encode_text(batch["input_ids"], batch["attention_mask"])
            images = torch.stack([processor.process_image(r["image"]) for r in rows])
            return retrieval_metrics(model.encode_image(images), texts, torch.arange(8), ks=(1,))

    originals = [
        {**r, "image": str(tmp_path / "d" / "images" / r["image_id"][2:])} for r in drawn_rows
    ]
    for name, rows in (("in_style", originals), ("drawn", drawn_rows)):
        expected = reference(rows)
        assert report[name]["t2i_R@1"] == pytest.approx(expected["t2i_R@1"])
        assert report[name]["i2t_R@1"] == pytest.approx(expected["i2t_R@1"])
    if report["in_style"]["t2i_R@1"]:
        kept = 100 * report["drawn"]["t2i_R@1"] / report["in_style"]["t2i_R@1"]
        assert report["t2i_kept"] == pytest.approx(kept, abs=0.051)
    assert "another artist (x, never trained on; 8 test images)" in format_artist_shift("x", report)
    # the in-style outputs of the whole dataset handed in: the artist's 8 are picked from them
    images = [ex.image for ex in dataset.unique_images()]
    given = image_tower_outputs(model, processor, images, num_workers=0, keep_tokens=False)
    again = artist_shift_report(model, processor, dataset, drawn, num_workers=0, in_style=given)
    for name in ("in_style", "drawn"):
        assert again[name] == pytest.approx(report[name])
    reordered = type(dataset)(dataset.examples[::-1])  # outputs of another order: rows by id
    given = image_tower_outputs(
        model, processor, [ex.image for ex in reordered.unique_images()], num_workers=0
    )
    again = artist_shift_report(model, processor, reordered, drawn, num_workers=0, in_style=given)
    assert again["in_style"] == pytest.approx(report["in_style"])
    stray = load_dataset(table).examples + [
        type(drawn.examples[0])(drawn_rows[0]["image"], "a lost one", "x/nowhere.png")
    ]
    with pytest.raises(ValueError, match="1 drawn images have no in-style image"):
        artist_shift_report(model, processor, dataset, type(drawn)(stray), num_workers=0)


def test_eval_cli_other_artist(tmp_path, tiny_model_dir, capsys) -> None:
    from xmodal.cli import main

    data = write_colour_dataset(tmp_path / "data", n=6)
    rows = [json.loads(line) for line in open(data, encoding="utf-8")]
    drawn = tmp_path / "data" / "test.ink.jsonl"
    drawn.write_text(
        "".join(json.dumps({**r, "image_id": f"ink/{r['image_id']}"}) + "\n" for r in rows[:4])
    )
    out = tmp_path / "report.json"
    argv = ["eval", "--model", tiny_model_dir, "--data", data, "--out", str(out)]
    assert main([*argv, "--rerank-k", "0", "--workers", "0", "--other-artist", f"ink={drawn}"]) == 0
    check = json.loads(out.read_text())["other_artists"]["ink"]
    # the same images under other ids: the drawn figures equal the in-style ones, all kept
    assert check["n_images"] == 4 and check["drawn"] == check["in_style"]
    assert "another artist (ink, never trained on; 4 test images)" in capsys.readouterr().out
    assert main([*argv, "--rerank-k", "0", "--other-artist", str(drawn)]) == 2
    assert "--other-artist wants NAME=DATA" in capsys.readouterr().err
