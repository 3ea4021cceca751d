"""Synthetic clustered 512-d embeddings written as ``xmodal extract`` shards (float16 Parquet).

Points lie around ``clusters`` random unit centres, spread along a ``intrinsic``-dimensional
subspace (shared by all clusters) plus small isotropic noise, then L2-normalised: like real
image embeddings, nearest neighbours are meaningful (low intrinsic dimension), unlike uniform
noise on the sphere. Shard ``k`` depends only on (seed, k): generating is resumable and
memory stays at one shard.

    python bench/synthetic_shards.py --out /work/scratch/index/10m --count 10000000
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from tqdm import tqdm

from xmodal.shards import now, save_manifest, shard_name, shard_rows, write_shard

IDENTITY = {"id": "synthetic", "weights_hash": "5" * 64}
PROCESSOR_HASH = "synthetic"


class Generator:
    """The distribution: centres and the shared subspace, fixed by ``seed``."""

    def __init__(
        self,
        dim: int = 512,
        clusters: int = 1000,
        intrinsic: int = 32,
        spread: float = 0.6,
        noise: float = 0.15,
        seed: int = 0,
    ):
        rng = np.random.default_rng(seed)
        centres = rng.standard_normal((clusters, dim), dtype=np.float32)
        self.centres = centres / np.linalg.norm(centres, axis=1, keepdims=True)
        basis = rng.standard_normal((intrinsic, dim), dtype=np.float32)
        self.basis = basis * (spread / math.sqrt(dim * intrinsic))  # spread norm ~ spread
        self.dim, self.noise, self.seed = dim, noise, seed

    def sample(self, count: int, stream: int) -> np.ndarray:
        """``count`` unit vectors from the random stream ``stream`` (float32)."""
        rng = np.random.default_rng([self.seed, stream])
        owner = rng.integers(0, len(self.centres), count)
        z = rng.standard_normal((count, len(self.basis)), dtype=np.float32)
        data = z @ self.basis
        data += self.centres[owner]
        data += rng.standard_normal((count, self.dim), dtype=np.float32) * (
            self.noise / math.sqrt(self.dim)
        )
        data /= np.linalg.norm(data, axis=1, keepdims=True)
        return data

    def queries(self, count: int) -> np.ndarray:
        """Held-out queries: the same distribution, a stream no shard uses."""
        return self.sample(count, 1_000_000_007)


def write_shards(
    out: Path, count: int, generator: Generator, shard_size: int, dtype: str = "float16"
) -> Path:
    """Shards + manifest of ``count`` vectors (existing complete shards are kept)."""
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    num = math.ceil(count / shard_size)
    for k in tqdm(range(num), desc="writing shards", unit="shard"):
        rows = min(shard_size, count - k * shard_size)
        path = out / shard_name("images", k)
        if shard_rows(path) != rows:
            vectors = generator.sample(rows, k)
            ids = [f"v{k * shard_size + i}" for i in range(rows)]
            sources = [f"/data/synthetic/{i}.jpg" for i in ids]
            write_shard(path, ids, sources, vectors, dtype, {"location": sources})
        entries.append({"index": k, "file": path.name, "rows": rows, "failed": 0})
    manifest = {
        "format": "xmodal.embeddings/1",
        "model": IDENTITY,
        "processor_hash": PROCESSOR_HASH,
        "dim": generator.dim,
        "dtype": dtype,
        "normalised": True,
        "shard_size": shard_size,
        "data": "/data/synthetic",
        "created": now(),
        "modalities": {"images": {"items": count, "num_shards": num, "shards": entries}},
    }
    save_manifest(out, manifest)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--intrinsic", type=int, default=32, help="dimension of the spread")
    parser.add_argument("--spread", type=float, default=0.6)
    parser.add_argument("--noise", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=0)


def generator_from(args: argparse.Namespace) -> Generator:
    return Generator(args.dim, args.clusters, args.intrinsic, args.spread, args.noise, args.seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--shard-size", type=int, default=100_000)
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    add_arguments(parser)
    args = parser.parse_args()
    write_shards(args.out, args.count, generator_from(args), args.shard_size, args.dtype)


if __name__ == "__main__":
    main()
