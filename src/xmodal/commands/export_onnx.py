"""``xmodal export-onnx``: a model's image and text towers to ONNX files + onnx.json."""

from __future__ import annotations

import argparse

from xmodal.commands import MODEL_HELP
from xmodal.errors import MissingDependencyError

ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")


def add(commands) -> None:
    p = commands.add_parser("export-onnx", help="export the image and text towers to ONNX")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--out", required=True, help="output directory for the .onnx files")
    p.add_argument(
        "--no-check", action="store_true", help="skip comparing ONNX Runtime with PyTorch"
    )


def run(args: argparse.Namespace) -> int:
    from xmodal.export.onnx import export_onnx
    from xmodal.export.ort import OnnxTowers, parity
    from xmodal.models.loading import load_model

    model, processor = load_model(args.model)
    try:
        meta = export_onnx(model, processor, args.out, str(args.model))
    except ModuleNotFoundError as err:  # torch.onnx needs the onnx packages
        if err.name is None or err.name.split(".")[0] not in ONNX_PACKAGES:
            raise
        raise MissingDependencyError(f"{err}: pip install 'xmodal[onnx]'") from err
    for name, tower in meta["towers"].items():
        print(f"{name} tower -> {args.out}/{tower['file']}")
    if not args.no_check:
        for name, cosine in parity(model, processor, OnnxTowers(args.out)).items():
            print(f"{name}: lowest cosine ONNX Runtime vs PyTorch {cosine:.6f}")
    print(f"wrote {args.out}/onnx.json")
    return 0
