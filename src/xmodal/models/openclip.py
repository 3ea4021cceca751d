"""OpenCLIP models (``open_clip:ViT-B-32/laion2b_s34b_b79k``, ``open_clip:hf-hub:ID``) as xmodal
models, through the optional ``open_clip`` library (``pip install xmodal[open_clip]``; it needs
torchvision).

OpenCLIP's ViT CLIP models are the OpenAI CLIP architecture: their weights are mapped onto a
transformers ``CLIPModel`` (as transformers' own conversion script does) and loaded from there
(:mod:`xmodal.models.aligned`), so the saved model needs neither open_clip nor torchvision. The
tokenizer is OpenCLIP's BPE vocabulary as a transformers ``CLIPTokenizer``; captions are padded
to the longest of a batch, not to 77 tokens (the same embeddings: the text tower is causal and
pools at the end-of-text token).
"""

from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xmodal.config import ProcessorConfig
from xmodal.errors import ModelLoadError
from xmodal.models.aligned import from_hf_model

INSTALL_HINT = (
    "pip install 'xmodal[open_clip]' (open_clip_torch with a torchvision matching your torch), "
    "or load the checkpoint's transformers version (hf:<hub id>)"
)


def import_open_clip(name: str) -> Any:
    """The open_clip module, or a one-line ModelLoadError naming the model and the install."""
    try:
        import open_clip
    except ImportError as exc:
        raise ModelLoadError(
            f"open_clip:{name} needs the optional open_clip library, which cannot be imported "
            f"({exc}); {INSTALL_HINT}"
        ) from None
    return open_clip


def load_open_clip(name: str, fusion: str = "cross"):
    """Model and processor for ``ARCH/PRETRAINED_TAG``, ``ARCH`` (random) or ``hf-hub:ID``."""
    open_clip = import_open_clip(name)
    if not name:
        raise ModelLoadError("open_clip: needs a model name, e.g. open_clip:ViT-B-32/openai")
    try:
        if name.startswith("hf-hub:"):
            oc_model = open_clip.create_model(name)
        else:
            arch, _, tag = name.partition("/")
            oc_model = open_clip.create_model(arch, pretrained=tag or None)
    except Exception as exc:  # noqa: BLE001 - unknown names, unreachable hub, bad files
        raise ModelLoadError(
            f"open_clip:{name} cannot be created ({type(exc).__name__}: {str(exc)[:200]}); check "
            "the name (open_clip.list_pretrained()) and that its weights can be reached"
        ) from None
    return from_open_clip_model(oc_model.eval(), fusion=fusion, source=f"open_clip:{name}")


def from_open_clip_model(oc_model: nn.Module, fusion: str = "cross", source: str = "open_clip"):
    """A :class:`CrossModalModel` and processor holding an OpenCLIP ViT CLIP model's weights."""
    from xmodal.processing import MultimodalProcessor

    hf_model = to_hf_clip(oc_model, source)
    model = from_hf_model(hf_model, fusion=fusion, source=source)
    context = int(oc_model.positional_embedding.shape[0])
    # create_model() attaches the preprocessing; a model built by hand gets OpenCLIP's default.
    preprocess = getattr(oc_model.visual, "preprocess_cfg", None) or {
        "size": oc_model.visual.image_size
    }
    config = processor_config_from_open_clip(preprocess, source)
    from transformers import CLIPTokenizer

    # The tokenizer lives in memory once loaded (and is saved with the model by save_pretrained):
    # its files are written to a folder that is removed right after loading.
    with tempfile.TemporaryDirectory(prefix="xmodal-openclip-bpe-") as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(Path(tmp))))
    tokenizer.model_max_length = context
    config.tokenizer, config.max_length = source, context
    return model, MultimodalProcessor(config, tokenizer)


def _unsupported(source: str, what: str) -> ModelLoadError:
    return ModelLoadError(
        f"{source}: {what}; xmodal converts OpenCLIP's ViT CLIP models (class-token pooling, "
        "end-of-text text pooling, no layer scale); use the checkpoint's transformers version"
    )


def to_hf_clip(oc_model: nn.Module, source: str = "open_clip") -> nn.Module:
    """A transformers ``CLIPModel`` with the weights of an OpenCLIP ViT ``CLIP`` model."""
    import open_clip
    from open_clip.transformer import VisionTransformer
    from transformers import CLIPConfig, CLIPModel

    visual = getattr(oc_model, "visual", None)
    if type(oc_model) is not open_clip.CLIP or not isinstance(visual, VisionTransformer):
        raise _unsupported(source, f"{type(oc_model).__name__} with a {type(visual).__name__}")
    if getattr(visual, "attn_pool", None) is not None or visual.pool_type != "tok":
        raise _unsupported(source, "its image tower pools by attention or average")
    if visual.final_ln_after_pool or isinstance(visual.ln_pre, nn.Identity):
        raise _unsupported(source, "its image tower's layer norms differ from CLIP's")
    if getattr(oc_model, "text_pool_type", "argmax") != "argmax" or oc_model.attn_mask is None:
        raise _unsupported(source, "its text tower is not causal with end-of-text pooling")
    if not isinstance(oc_model.text_projection, nn.Parameter):
        raise _unsupported(source, "its text projection is not a plain matrix")
    if getattr(oc_model, "logit_bias", None) is not None:
        raise _unsupported(source, "it has a SigLIP logit bias")
    blocks = [*visual.transformer.resblocks, *oc_model.transformer.resblocks]
    for block in blocks:
        if not isinstance(block.ls_1, nn.Identity) or not isinstance(
            block.attn, nn.MultiheadAttention
        ):
            raise _unsupported(source, "its blocks have layer scale or custom attention")
    state = oc_model.state_dict()
    act = "quick_gelu" if type(blocks[0].mlp.gelu).__name__ == "QuickGELU" else "gelu"
    if act == "gelu" and not isinstance(blocks[0].mlp.gelu, nn.GELU):
        raise _unsupported(source, f"activation {type(blocks[0].mlp.gelu).__name__}")
    width, _, patch, _ = state["visual.conv1.weight"].shape
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    text_width = state["token_embedding.weight"].shape[1]
    vision_config = {
        "hidden_size": width,
        "intermediate_size": visual.transformer.resblocks[0].mlp.c_fc.out_features,
        "num_hidden_layers": len(visual.transformer.resblocks),
        "num_attention_heads": visual.transformer.resblocks[0].attn.num_heads,
        "image_size": grid * patch,
        "patch_size": patch,
        "hidden_act": act,
        "layer_norm_eps": visual.ln_pre.eps,
    }
    text_config = {
        "vocab_size": state["token_embedding.weight"].shape[0],
        "hidden_size": text_width,
        "intermediate_size": oc_model.transformer.resblocks[0].mlp.c_fc.out_features,
        "num_hidden_layers": len(oc_model.transformer.resblocks),
        "num_attention_heads": oc_model.transformer.resblocks[0].attn.num_heads,
        "max_position_embeddings": state["positional_embedding"].shape[0],
        "hidden_act": act,
        "layer_norm_eps": oc_model.ln_final.eps,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
    }
    config = CLIPConfig(
        text_config=text_config,
        vision_config=vision_config,
        projection_dim=state["text_projection"].shape[1],
    )
    hf_model = CLIPModel(config).eval()
    missing, unexpected = hf_model.load_state_dict(hf_clip_state(state), strict=False)
    if unexpected or [k for k in missing if not k.endswith("position_ids")]:
        raise _unsupported(source, f"weights do not map ({missing[:3]} {unexpected[:3]})")
    return hf_model


def hf_clip_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP (OpenAI layout) state dict -> transformers ``CLIPModel`` names."""
    out = {
        "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
        "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
        "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        "visual_projection.weight": state["visual.proj"].t(),
        "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
        "text_projection.weight": state["text_projection"].t(),
        "logit_scale": state["logit_scale"].reshape(()),
    }
    for ours, theirs in (
        ("visual.ln_pre", "vision_model.pre_layrnorm"),
        ("visual.ln_post", "vision_model.post_layernorm"),
        ("ln_final", "text_model.final_layer_norm"),
    ):
        for suffix in ("weight", "bias"):
            out[f"{theirs}.{suffix}"] = state[f"{ours}.{suffix}"]
    for prefix, target in (("visual.transformer", "vision_model"), ("transformer", "text_model")):
        index = 0
        while f"{prefix}.resblocks.{index}.ln_1.weight" in state:
            src, dst = f"{prefix}.resblocks.{index}.", f"{target}.encoder.layers.{index}."
            q, k, v = state[src + "attn.in_proj_weight"].chunk(3)
            qb, kb, vb = state[src + "attn.in_proj_bias"].chunk(3)
            for name, weight, bias in (("q_proj", q, qb), ("k_proj", k, kb), ("v_proj", v, vb)):
                out[f"{dst}self_attn.{name}.weight"] = weight
                out[f"{dst}self_attn.{name}.bias"] = bias
            pairs = (
                ("attn.out_proj", "self_attn.out_proj"),
                ("ln_1", "layer_norm1"),
                ("ln_2", "layer_norm2"),
                ("mlp.c_fc", "mlp.fc1"),
                ("mlp.c_proj", "mlp.fc2"),
            )
            for theirs, ours in pairs:
                for suffix in ("weight", "bias"):
                    out[f"{dst}{ours}.{suffix}"] = state[f"{src}{theirs}.{suffix}"]
            index += 1
    return {k: v.detach().clone() for k, v in out.items()}


def processor_config_from_open_clip(cfg: dict[str, Any], source: str = "") -> ProcessorConfig:
    """OpenCLIP's ``preprocess_cfg`` (torchvision resize on PIL images, centre crop)."""
    size = cfg.get("size", 224)
    if isinstance(size, list | tuple):
        if len(set(size)) != 1:
            raise ModelLoadError(f"{source}: non-square input size {size} is not supported")
        size = size[0]
    mode = cfg.get("resize_mode", "shortest")
    if mode not in ("shortest", "squash"):
        raise ModelLoadError(f"{source}: resize mode {mode!r} is not supported")
    interpolation = cfg.get("interpolation", "bicubic")
    if interpolation not in ("bicubic", "bilinear"):
        raise ModelLoadError(f"{source}: interpolation {interpolation!r} is not supported")
    return ProcessorConfig(
        image_size=int(size),
        resize="shorter" if mode == "shortest" else "squash",
        resize_size=int(size) if mode == "shortest" else None,
        interpolation=interpolation,
        mean=tuple(float(v) for v in cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))),
        std=tuple(float(v) for v in cfg.get("std", (0.26862954, 0.26130258, 0.27577711))),
        reducing_gap=None,
        resize_rounding="floor",
    )


def write_clip_tokenizer(directory: Path) -> Path:
    """OpenCLIP's BPE vocabulary (``bpe_simple_vocab_16e6``) as a transformers CLIP tokenizer:
    the same ids (start 49406, end 49407) as OpenCLIP's SimpleTokenizer."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(
        str(directory / "vocab.json"), str(directory / "merges.txt"), pad_token="<|endoftext|>"
    )
    tokenizer.save_pretrained(str(directory))
    return directory
