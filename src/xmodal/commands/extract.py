"""``xmodal extract``: a dataset's images and/or captions to Parquet shards + manifest."""

from __future__ import annotations

import argparse
import typing

from xmodal.choices import ExtractEngine, ExtractModality, ShardDtype
from xmodal.commands import MODEL_HELP
from xmodal.extract.mapper import Backend
from xmodal.runtime import Precision


def add(commands) -> None:
    p = commands.add_parser(
        "extract", help="embed a dataset's images and captions, or score its pairs, into shards"
    )
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--data", required=True, help="dataset path (any format load_dataset reads)")
    p.add_argument("--out", required=True, help="output directory for shards + manifest.json")
    p.add_argument(
        "--modality",
        choices=typing.get_args(ExtractModality),
        default="both",
        help="what to embed; pairs: score every row as an (image, caption) pair "
        "(similarity, ITM probability)",
    )
    p.add_argument(  # the flag's earlier name, still accepted
        "--what", dest="modality", choices=typing.get_args(ExtractModality), help=argparse.SUPPRESS
    )
    p.add_argument(
        "--fused", action="store_true", help="pairs: also write each pair's fused vector"
    )
    p.add_argument("--shard-size", type=int, default=10_000)
    p.add_argument("--dtype", choices=typing.get_args(ShardDtype), default="float32")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=None, help="decode workers (default: auto)")
    p.add_argument("--format", default=None, help="dataset format (default: detected)")
    p.add_argument("--skip-bad", action="store_true", help="skip unusable dataset rows")
    p.add_argument("--device", default="auto", help="auto (GPU if any), cpu, cuda or cuda:N")
    p.add_argument(
        "--precision",
        choices=typing.get_args(Precision),
        default="auto",
        help="autocast: auto = bf16 on CUDA (fp16 without bf16), fp32 on CPUs without AMX",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the towers")
    p.add_argument(
        "--backend",
        choices=typing.get_args(Backend),
        default="auto",
        help="auto: ONNX Runtime on a CPU when installed (towers exported at start), else torch",
    )
    p.add_argument("--onnx-dir", default=None, help="towers from `xmodal export-onnx`")
    p.add_argument(
        "--engine",
        choices=typing.get_args(ExtractEngine),
        default="plain",
        help="plain: this process (or torchrun ranks); ray: the model in a pool of Ray actors, "
        "the same output (pip install 'xmodal[ray]')",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        help="--engine ray: an existing cluster's address (default: start one for this run)",
    )
    p.add_argument(
        "--ray-actors",
        type=int,
        default=None,
        help="--engine ray: mapper actors (default: one per GPU, else one per node)",
    )
    p.add_argument(
        "--ray-decode-tasks",
        type=int,
        default=0,
        help="--engine ray: decode images in Ray CPU tasks, this many batches ahead per actor "
        "(default 0: each actor decodes its own, the faster on one machine)",
    )


def run(args: argparse.Namespace) -> int:
    from xmodal.config import from_dict
    from xmodal.errors import ExtractError
    from xmodal.extract import extract
    from xmodal.extract.mapper import MapperOptions

    run_extract, engine = extract, {}
    if args.engine == "ray":
        from xmodal.extract.ray_engine import extract_ray

        run_extract = extract_ray
        engine = {
            "address": args.ray_address,
            "actors": args.ray_actors,
            "decode_tasks": args.ray_decode_tasks,
        }
    elif args.ray_address or args.ray_actors is not None or args.ray_decode_tasks:
        raise ExtractError("--ray-address, --ray-actors and --ray-decode-tasks need --engine ray")
    manifest = run_extract(
        args.model,
        args.data,
        args.out,
        modality=args.modality,
        shard_size=args.shard_size,
        dtype=args.dtype,
        batch_size=args.batch_size,
        workers=args.workers,
        skip_bad=args.skip_bad,
        data_format=args.format,
        fused=args.fused,
        options=from_dict(
            MapperOptions,
            {
                "device": args.device,
                "precision": args.precision,
                "compile": args.compile,
                "backend": args.backend,
                "onnx_dir": args.onnx_dir,
            },
        ),
        **engine,
    )
    for modality, record in manifest["modalities"].items():
        print(
            f"{modality}: {record['rows']} rows in {len(record['shards'])} shards, "
            f"{record['failed']} failed"
        )
    print(f"wrote {args.out}/manifest.json")
    return 0
