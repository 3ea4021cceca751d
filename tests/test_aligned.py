"""Aligned dual encoders (CLIP, SigLIP, ChineseCLIP, VisionTextDualEncoder) loaded as xmodal
models: the same embeddings, logit scales and pixels as transformers, saved and reloaded offline,
evaluated, extracted, exported to ONNX and fine-tuned."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from aligned_fixtures import save_chinese_clip, save_clip, save_dual_encoder, save_siglip
from conftest import write_colour_dataset
from PIL import Image

import xmodal
from xmodal.cli import main
from xmodal.errors import IncompatibleError
from xmodal.models.model import CrossModalModel

CAPTIONS = ["a photo of a cat", "a woman in a space suit", "a cup of coffee", "the dog"]
KINDS = ("clip", "siglip", "chinese_clip", "dual_encoder")


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    """Three real photos of different shapes (512x512, 451x300, 600x400)."""
    from skimage import data

    return [Image.fromarray(f()) for f in (data.astronaut, data.chelsea, data.coffee)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, minilm_path) -> dict[str, Path]:
    """A saved tiny random checkpoint of each supported kind, with processor and tokenizer."""
    root = tmp_path_factory.mktemp("aligned")
    return {
        "clip": save_clip(root / "clip"),
        "siglip": save_siglip(root / "siglip", minilm_path),
        "chinese_clip": save_chinese_clip(root / "chinese_clip", minilm_path),
        "dual_encoder": save_dual_encoder(root / "dual_encoder", minilm_path),
    }


def reference(directory: Path, photos, captions) -> dict[str, torch.Tensor]:
    """What transformers itself computes: its processor's pixels and normalised features."""
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(str(directory)).eval()
    # The PIL backend (the one without torchvision); torchvision's resizes differently.
    image_processor = AutoImageProcessor.from_pretrained(str(directory), backend="pil")
    pixels = image_processor(photos, return_tensors="pt")
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    if model.config.model_type == "siglip":  # as SigLIP is used: fixed length, no mask
        text = tokenizer(captions, padding="max_length", truncation=True, return_tensors="pt")
        text = {"input_ids": text["input_ids"]}
    else:
        text = tokenizer(captions, padding=True, truncation=True, return_tensors="pt")
        text = {k: v for k, v in text.items() if k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        image = model.get_image_features(pixel_values=pixels["pixel_values"]).pooler_output
        text_features = model.get_text_features(**text).pooler_output
    return {
        "model": model,
        "pixels": pixels["pixel_values"],
        "image": F.normalize(image, dim=-1),
        "text": F.normalize(text_features, dim=-1),
        "input_ids": text["input_ids"],
    }


def embed(model: CrossModalModel, processor, photos, captions) -> tuple[torch.Tensor, ...]:
    pixels = processor.process_images(photos)
    batch = processor.process_text(captions)
    with torch.no_grad():
        image = model.encode_image(pixels)
        text = model.encode_text(batch["input_ids"], batch["attention_mask"])
    return pixels, image, text


def min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a, b, dim=-1).min())


@pytest.mark.parametrize("kind", KINDS)
def test_embeddings_scales_and_pixels_equal_transformers(kind, checkpoints, photos) -> None:
    ref = reference(checkpoints[kind], photos, CAPTIONS)
    model, processor = xmodal.load_model(checkpoints[kind])
    pixels, image, text = embed(model, processor, photos, CAPTIONS)
    # The checkpoint's own preprocessing: the same pixels (PIL resize, int() of the long side).
    torch.testing.assert_close(pixels, ref["pixels"], atol=1e-6, rtol=0)
    assert min_cosine(image, ref["image"]) >= 0.99999
    assert min_cosine(text, ref["text"]) >= 0.99999
    assert image.shape == ref["image"].shape and text.shape == ref["text"].shape
    hf = ref["model"]
    if kind == "siglip":
        assert processor.config.padding == "max_length" and processor.config.max_length == 16
        assert torch.equal(processor.process_text(CAPTIONS)["input_ids"], ref["input_ids"])
        assert model.siglip_logit_scale.item() == pytest.approx(hf.logit_scale.item())
        assert model.siglip_logit_bias.item() == pytest.approx(hf.logit_bias.item())
        assert model.config.projection == "none"
    else:
        assert model.clip_scale().item() == pytest.approx(hf.logit_scale.exp().item())
        assert model.image_proj.bias is None and model.text_proj.bias is None
    assert model.has_itm and model.config.fusion.kind == "cross"  # new fusion on top


@pytest.mark.parametrize("kind", ("clip", "siglip", "chinese_clip"))
def test_save_and_reload_offline_is_exact(kind, checkpoints, photos, tmp_path) -> None:
    model, processor = xmodal.load_model(checkpoints[kind])
    model.save_pretrained(tmp_path / "saved", processor)
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["library"] == "xmodal"
    assert saved["model"]["image"]["hf_config"]["hidden_size"] == 32  # architecture inside
    assert not list((tmp_path / "saved").rglob("*.bin"))
    loaded, loaded_processor = xmodal.load_model(tmp_path / "saved")
    for before, after in zip(
        embed(model, processor, photos, CAPTIONS),
        embed(loaded, loaded_processor, photos, CAPTIONS),
        strict=True,
    ):
        assert torch.equal(before, after)
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def test_half_precision_checkpoint_loads_as_float32(checkpoints, photos, tmp_path) -> None:
    """A checkpoint saved in fp16 (config.json ``dtype: float16``, as many on the hub are):
    transformers would build its towers in fp16 next to xmodal's float32 projections."""
    import shutil

    from transformers import CLIPModel

    half = tmp_path / "clip-fp16"
    CLIPModel.from_pretrained(str(checkpoints["clip"])).half().save_pretrained(str(half))
    for file in checkpoints["clip"].iterdir():
        if not (half / file.name).exists():
            shutil.copy(file, half / file.name)
    assert json.loads((half / "config.json").read_text())["dtype"] == "float16"
    model, processor = xmodal.load_model(half)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    hf = CLIPModel.from_pretrained(str(half), dtype=torch.float32).eval()
    _, image, text = embed(model, processor, photos, CAPTIONS)
    batch = processor.process_text(CAPTIONS)
    with torch.no_grad():
        pixels = processor.process_images(photos)
        ref_image = F.normalize(hf.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        ref_text = F.normalize(hf.get_text_features(**batch).pooler_output, dim=-1)
    assert min_cosine(image, ref_image) >= 0.99999 and min_cosine(text, ref_text) >= 0.99999
    model.save_pretrained(tmp_path / "saved", processor)
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())["model"]
    assert saved["image"]["hf_config"]["dtype"] == saved["text"]["hf_config"]["dtype"] == "float32"


@pytest.mark.parametrize("kind", ("clip", "siglip"))
def test_identity_is_the_same_for_every_spelling_and_load(kind, checkpoints, tmp_path) -> None:
    """Extract then serve must agree: a folder with or without ``hf:``, loaded twice, and a
    saved ``fusion: none`` copy reloaded."""
    from xmodal.models.identity import check_compatible, identify

    folder = checkpoints[kind]
    identities = []
    for ref in (str(folder), f"hf:{folder}", f"hf:{folder}"):
        model, processor = xmodal.load_model(ref)
        identities.append(identify(model, processor, ref))
    assert len({(i.weights_hash, i.processor_hash) for i in identities}) == 1
    assert identities[1].model_id == str(folder.resolve())
    model, processor = xmodal.load_model(folder, fusion="none")
    model.save_pretrained(tmp_path / "dual", processor)
    saved = [identify(*xmodal.load_model(tmp_path / "dual"), tmp_path / "dual") for _ in "ab"]
    check_compatible(saved[0], saved[1], "extract vs serve")
    assert saved[0].processor_hash == identities[0].processor_hash


def test_siglip_text_tower_ignores_the_mask_but_fusion_reads_it(checkpoints) -> None:
    """SigLIP's text tower sees the fixed-length padding (as trained); the mask it returns
    still marks the real tokens, so the fusion on top attends to those only."""
    model, processor = xmodal.load_model(checkpoints["siglip"])
    batch = processor.process_text(CAPTIONS)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape[1] == 16 and not bool(mask.all())
    with torch.no_grad():
        text = model.text_features(ids, mask)
        unmasked = model.text_features(ids, torch.ones_like(mask))
        image = model.image_features(torch.zeros(len(CAPTIONS), 3, 32, 32))
        fused = model.fuse(image, text)
        fused_unmasked = model.fuse(image, unmasked)
    assert torch.equal(text.embeds, unmasked.embeds) and torch.equal(text.mask, mask)
    assert not torch.allclose(fused, fused_unmasked)


def test_siglip_text_head_of_another_width_under_cross_fusion() -> None:
    """SigLIP's text head may project the hidden states (width 48 here) to another width (32):
    the fusion reads the hidden states, the shared space the head's output."""
    from aligned_fixtures import TEXT, VISION
    from transformers import SiglipConfig, SiglipModel

    from xmodal.models.aligned import from_hf_model

    torch.manual_seed(0)
    text_config = {**TEXT, "hidden_size": 48, "projection_size": 32, "vocab_size": 100}
    config = SiglipConfig(text_config=text_config, vision_config=dict(VISION))
    hf = SiglipModel(config).eval()
    model = from_hf_model(hf, fusion="cross", source="siglip")
    ids = torch.randint(1, 100, (2, 16))
    with torch.no_grad():
        out = model(torch.zeros(2, 3, 32, 32), ids, torch.ones_like(ids))
        expected = F.normalize(hf.get_text_features(input_ids=ids).pooler_output, dim=-1)
    assert out.text.tokens.shape == (2, 16, 48) and out.text_embeds.shape == (2, 32)
    assert out.itm_logits.shape == (2, 2)
    assert min_cosine(out.text_embeds, expected) >= 0.99999


def test_pure_dual_encoder_has_no_fusion(checkpoints, photos, tmp_path) -> None:
    model, processor = xmodal.load_model(checkpoints["clip"], fusion="none")
    assert model.fusion is None and model.itm_head is None and not model.has_itm
    assert not any(k.startswith(("fusion.", "itm_head.")) for k in model.state_dict())
    batch = processor(images=photos, text=CAPTIONS[:3])
    with torch.no_grad():
        out = model(**batch)
    assert out.itm_logits is None and out.fused_embeds is None
    expected = model.clip_scale().detach() * (out.text_embeds @ out.image_embeds.t())
    torch.testing.assert_close(out.logits_per_text, expected)
    with pytest.raises(IncompatibleError, match="fusion: none"):
        model.itm_logits(out.image, out.text)
    model.save_pretrained(tmp_path / "dual", processor)
    loaded, _ = xmodal.load_model(tmp_path / "dual")
    assert loaded.fusion is None and loaded.config.fusion.kind == "none"


def test_eval_cli_on_a_clip_folder(checkpoints, tmp_path, capsys) -> None:
    data = write_colour_dataset(tmp_path / "data", n=8)
    out = tmp_path / "report.json"
    argv = ["eval", "--model", str(checkpoints["clip"]), "--data", data, "--out", str(out)]
    assert main([*argv, "--rerank-k", "3", "--workers", "0"]) == 0
    report = json.loads(out.read_text())
    assert report["n_images"] == 8 and report["retrieval_itm_rerank"]["k"] == 3

    from xmodal.data import load_dataset
    from xmodal.evaluate.retrieval import retrieval_metrics

    model, processor = xmodal.load_model(checkpoints["clip"])
    dataset = load_dataset(data)
    _, image, text = embed(
        model, processor, [ex.image for ex in dataset.unique_images()], dataset.captions()
    )
    expected = retrieval_metrics(image, text, dataset.text_to_image())
    for key in ("t2i_R@1", "t2i_R@5", "i2t_R@1"):
        assert report["retrieval_itc"][key] == pytest.approx(expected[key])

    dual = tmp_path / "dual"
    model, processor = xmodal.load_model(checkpoints["clip"], fusion="none")
    model.save_pretrained(dual, processor)
    argv = ["eval", "--model", str(dual), "--data", data, "--out", str(tmp_path / "r2.json")]
    assert main([*argv, "--workers", "0"]) == 0
    report2 = json.loads((tmp_path / "r2.json").read_text())
    assert "retrieval_itm_rerank" not in report2
    assert "fusion: none" in report2["retrieval_itm_rerank_skipped"]
    assert report2["retrieval_itc"] == report["retrieval_itc"]  # same alignment, no fusion
    assert "ITM re-rank skipped" in capsys.readouterr().out


def test_extract_cli_on_a_siglip_folder(checkpoints, photos, tmp_path) -> None:
    from xmodal.extract import read_shard

    folder = tmp_path / "photos"
    folder.mkdir()
    rows = []
    for i, photo in enumerate(photos):
        photo.save(folder / f"p{i}.png")
        rows.append({"image": f"p{i}.png", "caption": CAPTIONS[i], "image_id": f"p{i}"})
    (folder / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "emb"
    argv = ["extract", "--model", str(checkpoints["siglip"]), "--data", str(folder)]
    assert main([*argv, "--out", str(out), "--workers", "0", "--device", "cpu"]) == 0
    images = read_shard(next(out.glob("images-*.parquet")))
    texts = read_shard(next(out.glob("texts-*.parquet")))
    ref = reference(checkpoints["siglip"], photos, CAPTIONS[:3])
    assert min_cosine(torch.from_numpy(images.embeddings), ref["image"]) >= 0.9999
    assert min_cosine(torch.from_numpy(texts.embeddings), ref["text"]) >= 0.9999


@pytest.mark.parametrize("kind", ("clip", "siglip", "dual_encoder"))
def test_onnx_export_parity(kind, checkpoints, photos, tmp_path) -> None:
    from xmodal.export.onnx import export_onnx
    from xmodal.export.ort import OnnxTowers, parity
    from xmodal.extract.mapper import EmbeddingMapper, MapperOptions

    model, processor = xmodal.load_model(checkpoints[kind])
    if kind == "clip":  # through the CLI, which prints the parity it checked
        argv = ["export-onnx", "--model", str(checkpoints[kind]), "--out", str(tmp_path / "onnx")]
        assert main(argv) == 0
    else:
        export_onnx(model, processor, tmp_path / "onnx")
    towers = OnnxTowers(tmp_path / "onnx")
    pixels = processor.process_images(photos)
    scores = parity(model, processor, towers, pixel_values=pixels, captions=CAPTIONS)
    assert min(scores.values()) >= 0.99999, scores
    ref = reference(checkpoints[kind], photos, CAPTIONS)
    batch = processor.process_text(CAPTIONS)
    for options in (
        MapperOptions(backend="onnx", onnx_dir=str(tmp_path / "onnx")),
        MapperOptions(backend="torch"),  # the inference copy of the towers
    ):
        mapper = EmbeddingMapper(model, options)
        assert min_cosine(torch.from_numpy(mapper.images(pixels)), ref["image"]) >= 0.99999
        text = mapper.texts(batch["input_ids"], batch["attention_mask"])
        assert min_cosine(torch.from_numpy(text), ref["text"]) >= 0.99999


def train_config(tmp_path: Path, name: str, **model):
    from xmodal.train import TrainConfig
    from xmodal.train.config import DataSection, LossSection, ModelSection, OptimSection

    data = write_colour_dataset(tmp_path / "data", n=12)
    return TrainConfig(
        data=DataSection(train=data, val=data, num_workers=0),
        model=ModelSection(name=name, **model),
        loss=LossSection(infonce=1.0, itm=1.0),
        optim=OptimSection(steps=3, batch_size=6, lr=1e-2, tower_lr=1e-3, warmup_steps=1),
        out_dir=str(tmp_path / "run"),
        device="cpu",
        precision="fp32",
        eval_every=0,
        save_every=0,
        log_every=1,
    )


def image_embeddings(model, processor, dataset) -> torch.Tensor:
    return embed(model, processor, [ex.image for ex in dataset.unique_images()], ["x"])[1]


def test_fine_tune_starts_from_the_alignment_and_reloads(checkpoints, photos, tmp_path) -> None:
    from xmodal.data import load_dataset
    from xmodal.evaluate.runner import evaluate_model, zeroshot_report
    from xmodal.train import Trainer

    config = train_config(
        tmp_path, str(checkpoints["clip"]), lock_image=True, text_trainable_layers=1
    )
    trainer = Trainer(config)
    ref = reference(checkpoints["clip"], photos, CAPTIONS)
    model = trainer.model
    _, image, text = embed(model, trainer.processor, photos, CAPTIONS)
    assert min_cosine(image, ref["image"]) >= 0.99999 and min_cosine(text, ref["text"]) >= 0.99999
    # The report before the first step is the source model's.
    source, source_processor = xmodal.load_model(checkpoints["clip"])
    dataset = load_dataset(config.data.val)
    before = evaluate_model(model, trainer.processor, dataset, rerank_k=0, num_workers=0)
    direct = evaluate_model(source, source_processor, dataset, rerank_k=0, num_workers=0)
    assert before["retrieval_itc"] == direct["retrieval_itc"]
    labels = [ex.caption.split()[1] for ex in dataset.unique_images()]  # the colour
    zeroshot = [
        zeroshot_report(m, p, image_embeddings(m, p, dataset), dataset.unique_images(), labels)
        for m, p in ((model, trainer.processor), (source, source_processor))
    ]
    assert zeroshot[0] == zeroshot[1] and zeroshot[0]["top1"] > 0
    # Locked image tower; only the last text layer of the CLIP text encoder trains.
    assert not any(p.requires_grad for p in model.image_tower.parameters())
    trainable = {n for n, p in model.text_tower.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("model.encoder.layers.1.") for n in trainable)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    lr_of = {id(p): g["lr"] for g in trainer.optimizer.param_groups for p in g["params"]}
    assert lr_of[id(model.text_proj.weight)] == config.optim.tower_lr  # pretrained projection
    assert lr_of[id(model.itm_head.weight)] == config.optim.lr  # new layer

    result = trainer.train()
    after = model.state_dict()
    assert torch.equal(
        after["image_tower.model.embeddings.patch_embedding.weight"],
        frozen["image_tower.model.embeddings.patch_embedding.weight"],
    )
    assert not torch.equal(after["logit_scale"], frozen["logit_scale"])  # learned
    assert not torch.equal(after["text_proj.weight"], frozen["text_proj.weight"])
    key = "text_tower.model.encoder.layers.1.mlp.fc1.weight"
    assert not torch.equal(after[key], frozen[key])
    key = "text_tower.model.encoder.layers.0.mlp.fc1.weight"
    assert torch.equal(after[key], frozen[key])
    reloaded, processor = xmodal.load_model(result.model_dir)
    for a, b in zip(
        embed(model.eval(), trainer.processor, photos, CAPTIONS),
        embed(reloaded, processor, photos, CAPTIONS),
        strict=True,
    ):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert reloaded.logit_scale.item() == pytest.approx(model.logit_scale.item())


def test_fine_tune_pure_dual_encoder_turns_itm_off(checkpoints, tmp_path, capsys) -> None:
    from xmodal.train import Trainer

    config = train_config(tmp_path, str(checkpoints["dual_encoder"]), fusion="none")
    trainer = Trainer(config)
    assert trainer.model.fusion is None and config.loss.itm == 0.0
    assert "ITM loss terms are off" in capsys.readouterr().out
    result = trainer.train()
    log = [json.loads(x) for x in (Path(config.out_dir) / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in log if "loss" in r]) == 3 and "itm" not in log[-1]
    reloaded, _ = xmodal.load_model(result.model_dir)
    assert reloaded.fusion is None


def test_bert_text_tower_layers_found_for_trainable_layers(checkpoints, tmp_path) -> None:
    from xmodal.train import Trainer

    config = train_config(tmp_path, str(checkpoints["chinese_clip"]), text_trainable_layers=1)
    model = Trainer(config).model
    trainable = {n for n, p in model.text_tower.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("model.encoder.layer.1.") for n in trainable)


def test_processor_matches_hf_resize_rounding(photos) -> None:
    """``floor`` keeps int() of the long side as transformers does; ``round`` (xmodal) differs
    on chelsea (451x300 -> 336 vs 337 px at a 224 shorter side)."""
    from xmodal.config import ProcessorConfig
    from xmodal.processing import ImageTransform

    chelsea = photos[1]
    floor = ImageTransform(ProcessorConfig(resize_rounding="floor", reducing_gap=None))
    rounded = ImageTransform(ProcessorConfig(resize_size=224))
    assert floor.config.resize_size == 256
    floor.config.resize_size = 224
    crop_floor = np.asarray(floor.resize_crop(chelsea), dtype=np.int16)
    crop_round = np.asarray(rounded.resize_crop(chelsea), dtype=np.int16)
    assert crop_floor.shape == crop_round.shape == (224, 224, 3)
    assert np.abs(crop_floor - crop_round).max() > 0


def test_train_cli_yaml_fine_tunes_an_hf_prefixed_siglip(checkpoints, photos, tmp_path) -> None:
    """``xmodal train`` with ``model.name: hf:<folder>`` and ``fusion: none`` in the YAML."""
    import yaml

    data = write_colour_dataset(tmp_path / "data", n=12)
    config = {
        "data": {"train": data, "num_workers": 0},
        "model": {"name": f"hf:{checkpoints['siglip']}", "fusion": "none", "lock_image": True},
        "loss": {"infonce": 0.0, "siglip": 1.0, "itm": 0.0},
        "optim": {"steps": 3, "batch_size": 6, "lr": 1e-2, "warmup_steps": 1},
        "out_dir": str(tmp_path / "run"),
        "device": "cpu",
        "precision": "fp32",
        "eval_every": 0,
        "save_every": 0,
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(path)]) == 0
    trained, processor = xmodal.load_model(tmp_path / "run" / "model")
    source, _ = xmodal.load_model(checkpoints["siglip"])
    assert trained.fusion is None and processor.config.padding == "max_length"
    # The SigLIP scale and bias were learned from the source's values, not from fresh ones.
    assert trained.siglip_logit_bias.item() != source.siglip_logit_bias.item()
    assert abs(trained.siglip_logit_bias.item() - source.siglip_logit_bias.item()) < 0.1
    ref = reference(checkpoints["siglip"], photos, CAPTIONS)
    _, image, _ = embed(trained, processor, photos, CAPTIONS)
    assert min_cosine(image, ref["image"]) >= 0.99999  # locked image tower, no projection
