"""Tiny random transformers dual encoders saved with a matching image processor and tokenizer
(built offline), for the aligned-model tests and the benches."""

from __future__ import annotations

import json
from pathlib import Path


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what byte-level BPE vocabularies spell)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes), strict=True))


VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 8,
}
TEXT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}
WORDS = ("a", "photo", "of", "the", "cat", "dog", "cup", "coffee", "woman", "space", "suit")


def write_clip_tokenizer(directory: Path) -> None:
    """A byte-level BPE CLIP tokenizer: every byte, a few merges spelling real words."""
    from transformers import CLIPTokenizer

    chars = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(token, len(vocab))
    merges = []
    for word in WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            vocab.setdefault(pieces[0], len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)))
    tokenizer = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"))
    tokenizer.save_pretrained(str(directory))


def save_clip(directory: Path, projection_dim: int = 24) -> Path:
    """A tiny random ``CLIPModel`` + CLIP image processor (shortest edge 40, crop 32)."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    write_clip_tokenizer(directory)
    tokenizer = CLIPTokenizer.from_pretrained(str(directory))
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={
            **TEXT,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 77,
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config=dict(VISION),
        projection_dim=projection_dim,
    )
    CLIPModel(config).save_pretrained(str(directory))
    CLIPImageProcessor(
        size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(str(directory))
    return directory


def save_bert_tokenizer(directory: Path, minilm_path: str, max_length: int = 512) -> int:
    """The bert-base-uncased WordPiece tokenizer of the MiniLM package; returns its size."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path, local_files_only=True)
    tokenizer.model_max_length = max_length  # SigLIP's is its text length (64 in real ones)
    tokenizer.save_pretrained(str(directory))
    return len(tokenizer)


def save_siglip(directory: Path, minilm_path: str) -> Path:
    """A tiny random ``SiglipModel`` (text positions 16) + SigLIP image processor (squash 32)."""
    import torch
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    vocab = save_bert_tokenizer(directory, minilm_path, max_length=16)
    torch.manual_seed(0)
    config = SiglipConfig(
        text_config={
            **TEXT,
            "vocab_size": vocab,
            "max_position_embeddings": 16,
            "bos_token_id": 101,
            "eos_token_id": 102,
            "pad_token_id": 0,
        },
        vision_config=dict(VISION),
    )
    model = SiglipModel(config)
    with torch.no_grad():  # not the init values, so a copy that missed them shows
        model.logit_scale.fill_(2.3)
        model.logit_bias.fill_(-7.5)
    model.save_pretrained(str(directory))
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(str(directory))
    return directory


def save_chinese_clip(directory: Path, minilm_path: str) -> Path:
    """A tiny random ``ChineseCLIPModel`` (BERT text, [CLS]) + its image processor."""
    import torch
    from transformers import ChineseCLIPConfig, ChineseCLIPImageProcessor, ChineseCLIPModel

    vocab = save_bert_tokenizer(directory, minilm_path)
    torch.manual_seed(0)
    config = ChineseCLIPConfig(
        text_config={**TEXT, "vocab_size": vocab, "max_position_embeddings": 64},
        vision_config=dict(VISION),
        projection_dim=24,
    )
    ChineseCLIPModel(config).save_pretrained(str(directory))
    ChineseCLIPImageProcessor(
        size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(str(directory))
    return directory


def save_dual_encoder(directory: Path, minilm_path: str) -> Path:
    """A tiny random ``VisionTextDualEncoderModel``: ViT + BERT, ViT image processor."""
    import torch
    from transformers import (
        BertConfig,
        VisionTextDualEncoderConfig,
        VisionTextDualEncoderModel,
        ViTConfig,
        ViTImageProcessor,
    )

    vocab = save_bert_tokenizer(directory, minilm_path)
    torch.manual_seed(0)
    config = VisionTextDualEncoderConfig.from_vision_text_configs(
        ViTConfig(**VISION),
        BertConfig(**TEXT, vocab_size=vocab, max_position_embeddings=64),
        projection_dim=24,
    )
    VisionTextDualEncoderModel(config).save_pretrained(str(directory))
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(str(directory))
    return directory
