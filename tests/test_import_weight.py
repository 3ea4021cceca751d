"""Embedding from Python needs only the base install: pyarrow and faiss (the ``index`` extra)
are imported by the modules that write Parquet shards or FAISS indexes, and nowhere else.

Each check runs in a fresh interpreter where importing pyarrow or faiss fails, as it does on a
base install.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_extract import save_tiny_model, tiny_processor

SRC = Path(__file__).resolve().parents[1] / "src"

BLOCK = textwrap.dedent(
    """
    import importlib.abc
    import json
    import sys

    BLOCKED = set(sys.argv[1:]) or {"pyarrow", "faiss"}

    class NotInstalled(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, NotInstalled())
    """
)


def run_blocked(code: str, *blocked: str) -> subprocess.CompletedProcess:
    """Run ``code`` where importing ``blocked`` (default: pyarrow and faiss) fails."""
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run(
        [sys.executable, "-c", BLOCK + textwrap.dedent(code), *blocked],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_embedding_from_python_works_without_pyarrow_and_faiss(
    tmp_path, minilm_tokenizer, minilm_path
):
    model_dir = save_tiny_model(tmp_path / "model", tiny_processor(minilm_tokenizer, minilm_path))
    proc = run_blocked(
        f"""
        import numpy as np
        import torch

        import xmodal
        import xmodal.extract
        from xmodal.extract.mapper import EmbeddingMapper, MapperOptions
        from xmodal.models import CrossModalModel
        from xmodal.processing import MultimodalProcessor

        model = CrossModalModel.from_pretrained({str(model_dir)!r})
        processor = MultimodalProcessor.from_pretrained({str(model_dir)!r})
        mapper = EmbeddingMapper(model, MapperOptions(device="cpu", backend="torch"))
        batch = processor.process_text(["a red square", "two dogs"])
        texts = mapper.texts(batch["input_ids"], batch["attention_mask"])
        images = mapper.images(processor.process_images([np.zeros((40, 50, 3), np.uint8)]))
        print(json.dumps({{
            "texts": list(texts.shape),
            "images": list(images.shape),
            "norms": np.linalg.norm(texts, axis=1).round(4).tolist(),
            "loaded": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED),
            "writer_loaded": bool({{"xmodal.extract.writer", "xmodal.shards"}} & set(sys.modules)),
        }}))
        """
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {
        "texts": [2, 32],
        "images": [1, 32],
        "norms": [1.0, 1.0],
        "loaded": [],
        "writer_loaded": False,
    }


def test_the_parquet_writer_and_index_name_the_extra_to_install():
    proc = run_blocked(
        """
        from xmodal.errors import MissingDependencyError

        found = {}
        for statement in (
            "from xmodal.shards import write_shard",
            "from xmodal.extract.writer import write_shard",
            "from xmodal.extract import extract",
            "import xmodal.index",
            "import xmodal.search",
        ):
            try:
                exec(statement)
            except MissingDependencyError as err:
                found[statement] = [str(err), isinstance(err, ImportError)]
        print(json.dumps(found))
        """
    )
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(found) == 5, found
    for message, is_import_error in found.values():
        assert "pip install 'xmodal[index]'" in message
        assert is_import_error
    assert "pyarrow" in found["from xmodal.shards import write_shard"][0]
    assert "pyarrow" in found["from xmodal.extract.writer import write_shard"][0]


def test_a_command_without_the_extra_prints_one_line(tmp_path):
    proc = run_blocked(
        f"""
        from xmodal.cli import main

        sys.exit(main(["index", "--shards", {str(tmp_path)!r}, "--out", {str(tmp_path / "i")!r}]))
        """
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("xmodal index: error: ") and proc.stderr.count("\n") == 1
    assert "pip install 'xmodal[index]'" in proc.stderr


@pytest.mark.parametrize(
    ("argv", "blocked", "extra"),
    [
        (["serve", "--index", "idx", "--model", "m"], "fastapi", "serve"),
        (["demo"], "skimage", "demo"),
    ],
)
def test_commands_name_the_extra_they_need(argv, blocked, extra):
    proc = run_blocked(f"from xmodal.cli import main\nsys.exit(main({argv!r}))", blocked)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"xmodal {argv[0]}: error: ") and "Traceback" not in proc.stderr
    assert f"pip install 'xmodal[{extra}]'" in last
