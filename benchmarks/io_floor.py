"""The I/O floor: the least work a streaming Task Arithmetic can do.

Reads every tensor of the base and each fine-tune once (safetensors' own reader), computes
base + lambda * sum_t (ft_t - base) in float32, streams the bytes into one safetensors file and
fsyncs it (a merge is finished when its output is on disk; mergeflow fsyncs before publishing).
No validation, hashing, planning or progress: a lower bound to compare mergeflow against.

    python benchmarks/io_floor.py OUT.safetensors BASE.safetensors FT1.safetensors [FT2 ...] [--lambda 1.0]
"""

from __future__ import annotations

import argparse
import os

import torch
from safetensors import safe_open

from merging.io.safetensors_format import header_bytes, tensor_bytes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("base")
    parser.add_argument("fine_tunes", nargs="+")
    parser.add_argument("--lambda", dest="lam", type=float, default=1.0)
    args = parser.parse_args()
    base = safe_open(args.base, framework="pt")
    fts = [safe_open(f, framework="pt") for f in args.fine_tunes]
    names = list(base.keys())
    entries = []
    for name in names:
        sl = base.get_slice(name)
        entries.append(
            (
                name,
                getattr(torch, {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}[sl.get_dtype()]),
                tuple(sl.get_shape()),
            )
        )
    header, _ = header_bytes(entries, {"format": "pt"})
    with open(args.out, "wb") as out:
        out.write(header)
        for name in names:
            b = base.get_tensor(name)
            acc = torch.zeros_like(b, dtype=torch.float32)
            for ft in fts:
                acc += ft.get_tensor(name).float() - b.float()
            out.write(tensor_bytes((b.float() + args.lam * acc).to(b.dtype)))
        out.flush()
        os.fsync(out.fileno())


if __name__ == "__main__":
    main()
