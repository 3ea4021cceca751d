"""Which model and preprocessing produced a set of embeddings, and refusing mixtures of them."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xmodal.errors import IncompatibleError
from xmodal.models.aligned import HF_PREFIX
from xmodal.models.model import CONFIG_NAME, WEIGHTS_NAME


@dataclass(frozen=True)
class ModelIdentity:
    """model_id: a directory path or a preset name; the hashes decide compatibility."""

    model_id: str
    weights_hash: str
    processor_hash: str

    def to_dict(self) -> dict[str, str]:
        return {"id": self.model_id, "weights_hash": self.weights_hash}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> ModelIdentity:
        """The identity stored in a manifest or an index description."""
        model = record.get("model") or {}
        return cls(str(model.get("id")), str(model.get("weights_hash")), record["processor_hash"])


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def state_dict_sha256(model: nn.Module) -> str:
    """Hex SHA-256 over every state_dict tensor's name, dtype, shape and bytes (sorted by name)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def identify(model: nn.Module, processor: Any, ref: str | Path) -> ModelIdentity:
    """A directory's identity is its weights file's hash; a preset's, a hash of its tensors.

    ``hf:<folder>`` is that folder, so both spellings of a transformers checkpoint agree.
    """
    path = Path(str(ref).removeprefix(HF_PREFIX))
    if (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file():
        return ModelIdentity(
            str(path.resolve()), file_sha256(path / WEIGHTS_NAME), processor.config_hash
        )
    return ModelIdentity(str(ref), state_dict_sha256(model), processor.config_hash)


def check_compatible(expected: ModelIdentity, actual: ModelIdentity, context: str) -> None:
    """Raise IncompatibleError naming both hashes when the weights or processor differ.

    ``context`` describes the two sides, e.g. ``"index /x vs model /m"``.
    """
    problems = []
    if expected.weights_hash != actual.weights_hash:
        problems.append(
            f"model weights hash {expected.weights_hash[:16]} ({expected.model_id}) != "
            f"{actual.weights_hash[:16]} ({actual.model_id})"
        )
    if expected.processor_hash != actual.processor_hash:
        problems.append(f"processor hash {expected.processor_hash} != {actual.processor_hash}")
    if problems:
        raise IncompatibleError(
            f"{context}: embeddings from different models cannot be mixed: " + "; ".join(problems)
        )
