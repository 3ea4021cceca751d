"""One decision per question: device, precision, mapper options, CLI choices, caption template."""

from __future__ import annotations

import argparse
import typing

import numpy as np
import pytest
import torch

from xmodal.choices import (
    ExtractEngine,
    ExtractModality,
    IndexEngine,
    IndexKind,
    Modality,
    PairScore,
    ProbeFeatures,
    ShardDtype,
)
from xmodal.config import ConfigError, ProcessorConfig, from_dict
from xmodal.data.datasets import DatasetFormat, KarpathySplit
from xmodal.extract.mapper import Backend, MapperOptions
from xmodal.extract.reader import TokenizedCaptions
from xmodal.runtime import Precision, pick_autocast, pick_device
from xmodal.train.config import DataSection


def test_device_and_precision_errors_are_config_errors(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("tpu", "cuda:x", "", "CPU"):
        with pytest.raises(ConfigError, match="device must be auto, cpu, cuda or cuda:N"):
            pick_device(name)
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match="CUDA is not available"):
            pick_device(name)
    assert pick_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert pick_device("cuda") == pick_device("auto") == torch.device("cuda", 3)
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"precision must be one of \['auto', 'fp32'"):
        pick_autocast("int8", torch.device("cpu"))


def test_mapper_options_are_a_typed_config() -> None:
    options = from_dict(MapperOptions, {"device": "cpu", "precision": "bf16", "backend": "torch"})
    assert (options.precision, options.backend, options.compile) == ("bf16", "torch", False)
    bad = [
        ({"precision": "fp8"}, "precision must be one of"),
        ({"backend": "tvm"}, "backend must be one of"),
        ({"device": "tpu"}, "device must be"),
        ({"backend": "onnx"}, "onnx_dir"),
        ({"threads": 0}, "threads must be >= 1"),
        ({"compile": "yes"}, "compile must be bool"),
        ({"fast": True}, "unknown key"),
    ]
    for data, message in bad:
        with pytest.raises(ConfigError, match=message):
            from_dict(MapperOptions, data)


def _choices(command: str) -> dict[str, tuple]:
    from xmodal.cli import SUBCOMMANDS

    parser = argparse.ArgumentParser()
    SUBCOMMANDS[command].add(parser.add_subparsers())
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    actions = sub.choices[command]._actions
    return {a.dest: tuple(a.choices) for a in actions if a.choices is not None}


def test_cli_choices_are_the_types_values() -> None:
    args = typing.get_args
    assert _choices("extract") == {
        "modality": args(ExtractModality),
        "dtype": args(ShardDtype),
        "precision": args(Precision),
        "backend": args(Backend),
        "engine": args(ExtractEngine),
    }
    assert _choices("index") == {
        "kind": args(IndexKind),
        "modality": args(Modality),
        "engine": args(IndexEngine),
    }
    assert _choices("eval") == {"format": args(DatasetFormat), "split": args(KarpathySplit)}
    assert args(ExtractModality) == ("images", "texts", "both", "pairs")
    assert _choices("filter") == {"by": args(PairScore)}
    assert _choices("probe") == {"kinds": args(ProbeFeatures)}


def test_extract_cli_refuses_a_bad_device_in_one_line(monkeypatch, capsys) -> None:
    from xmodal.cli import main

    monkeypatch.setattr("xmodal.extract.extract", lambda *a, **k: {"modalities": {}})
    argv = ["extract", "--model", "m", "--data", "d", "--out", "o", "--device", "tpu"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        "xmodal extract: error: device must be auto, cpu, cuda or cuda:N, got 'tpu'"
    )


def test_caption_template_checked_and_applied_once(make_processor) -> None:
    for bad in ("no placeholder", "{} and {}", "{} {x}"):
        with pytest.raises(ConfigError) as processor_error:
            ProcessorConfig(caption_template=bad).validate()
        with pytest.raises(ConfigError) as data_error:
            DataSection(train="x.jsonl", caption_template=bad).validate()
        suffix = str(processor_error.value).removeprefix("processor.caption_template")
        assert str(data_error.value) == "data.caption_template" + suffix
    processor = make_processor(caption_template="an emoji of {}")
    captions = ["a red cat", "thumbs up"]
    assert processor.apply_template(captions) == ["an emoji of a red cat", "an emoji of thumbs up"]
    batch = processor.process_text(captions)
    ids, mask = TokenizedCaptions(captions, processor).batch(np.arange(2))
    assert torch.equal(ids, batch["input_ids"]) and torch.equal(mask, batch["attention_mask"])
    plain = processor.process_text(captions, apply_template=False)["input_ids"]
    assert plain.shape[1] < batch["input_ids"].shape[1]
