"""Input pipeline throughput: one epoch of the built-in digits (curated into shards, images upscaled to 64 px and
128 px) through the DALI loader and the PyTorch loader, training augmentation, batches of 64 at 64 px (the demo's
size) and 128 px; images/s in ``items_per_s``. The dataset is built once under benchmarks/.cache/.

    python -m benchmarks.bench_loader [--quick] [--device cpu|cuda]

On a GPU machine DALI decodes with device "mixed" (nvJPEG) and the batches land on the GPU.
"""

from __future__ import annotations

import functools
import json
import os
import sys

import torch

from benchmarks.harness import Case, Provider, main_for

NAME = "loader"
# curation counts BPE tokens and both loaders tokenize captions (the tokenizer is part of what is timed)
REQUIRES = ("open_clip",)
CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache")


@functools.cache
def dataset(size: int) -> tuple[str, int]:
    """(curated shard folder, samples) of the digits at ``size`` px, built on first use."""
    from florence.data import builtin, curate

    raw, out = os.path.join(CACHE, f"digits{size}"), os.path.join(CACHE, f"digits{size}-shards")
    if not os.path.exists(os.path.join(out, "manifest.json")):
        builtin.build_digits(raw, size=size)
        curate.main(["--input", os.path.join(raw, "train.jsonl"), "--out", out, "--min-size", "8",
                     "--near-dup-threshold", "-1", "--shard-size", "256", "--quiet"])  # fmt: skip
    with open(os.path.join(out, "manifest.json")) as f:
        return out, json.load(f)["samples"]


def cases(quick: bool, device: str, dtype: torch.dtype) -> list[Case]:
    out = []
    for size in (64,) if quick else (64, 128):
        _, n = dataset(size)

        def make_inputs(device, dtype, size=size):
            return size, device

        out.append(Case(f"digits{size}_epoch_b64", {"image": size, "batch": 64, "samples": n}, make_inputs, items=n))
    return out


def _epoch(backend):
    def fn(size, device):
        from florence.data.loader import make_loader

        data_dir, _ = dataset(size)
        kw = {"num_threads": os.cpu_count()} if backend == "dali" else {"num_workers": os.cpu_count()}
        if backend == "dali" and device == "cuda":
            kw["device_id"] = torch.cuda.current_device()
        loader = make_loader(data_dir, 64, size, backend=backend, seed=0, **kw)
        total = torch.zeros(())
        for b in loader:
            total = total + b["images"].float().mean().cpu()
        return total

    return fn


def providers(device: str) -> list[Provider]:
    from florence.data.loader import dali_available

    return [
        Provider("torch", _epoch("torch"), modes=("forward",)),
        Provider("dali", _epoch("dali"), unavailable=lambda dev: dali_available(), modes=("forward",)),
    ]


if __name__ == "__main__":
    sys.exit(main_for("benchmarks.bench_loader"))
