"""Training step throughput and memory under DeepSpeed: images/s and peak memory per rank of florence.train on 2
ranks, ZeRO stage 0 / 2 / 3, gradient cache off / on, activation checkpointing off / on (each a separate
``torchrun`` of a few steps; the first steps are warm-up and left out of the median).

    python -m benchmarks.bench_train [--quick] [--device cpu|cuda] [--out DIR]     (also run by python -m benchmarks)

CPU: florence_cpu_demo at 64 px, global batch 64 (quick: 32), 2 ranks of one thread each, fp32. GPU: florence_tiny
at 224, global batch 128 per GPU pair, bf16 autocast. The built-in digits are curated once under benchmarks/.cache.
Rows: median step ms, items_per_s, peak_mem_mb (the largest rank's peak RSS), speed-up against ZeRO 0 without
gradient cache or checkpointing.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile

from benchmarks import harness

REQUIRES = ("deepspeed", "open_clip")  # florence.train's engine; its data is curated and tokenized

NAME = "train"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = [  # (provider, zero stage, gradient cache chunk per rank (0: off), activation checkpointing)
    ("zero0", 0, 0, False),
    ("zero2", 2, 0, False),
    ("zero3", 3, 0, False),
    ("zero2+gradcache", 2, 8, False),
    ("zero2+ckpt", 2, 0, True),
    ("zero2+gradcache+ckpt", 2, 8, True),
]


def _setup(quick: bool, device: str):
    if device == "cuda":
        return "florence_tiny", 224, 128, 12, "bf16"
    return "florence_cpu_demo", 64, (32 if quick else 64), (6 if quick else 12), "fp32"


def run(args) -> list[dict]:
    from benchmarks.bench_loader import dataset
    from florence.data import builtin

    model, size, batch, steps, precision = _setup(args.quick, args.device)
    shards, _ = dataset(size)
    eval_dir = os.path.join(os.path.dirname(shards), f"digits{size}")
    assert os.path.exists(os.path.join(eval_dir, "train.jsonl")), builtin.__name__
    env = harness.environment(args.device)
    nproc = 2
    rows = []
    for name, stage, chunk, ckpt in VARIANTS[:3] + VARIANTS[3:4] if args.quick else VARIANTS:
        with tempfile.TemporaryDirectory() as out:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                   str(29400 + os.getpid() % 500), "-m", "florence.train", "--set", f"model={model}",
                   f"data.shards={shards}", "data.eval=null", f"data.image_size={size}", "data.loader=torch",
                   "data.num_workers=0", f"batch_size={batch}", f"chunk_size={chunk}", f"precision={precision}",
                   f"zero_stage={stage}", f"activation_checkpointing={str(ckpt).lower()}", f"steps={steps}",
                   "model_overrides.vision.drop_path_rate=0.0", f"output_dir={out}"]  # fmt: skip
            e = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
            if args.device == "cpu":
                e["DS_ACCELERATOR"] = "cpu"
            proc = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=1800)
            if proc.returncode != 0:
                print(f"  {name} failed: {proc.stderr[-2000:]}", file=sys.stderr)
                continue
            lines = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
            final = json.load(open(os.path.join(out, "final_metrics.json")))
        times = [r["step_seconds"] * 1e3 for r in lines if "step_seconds" in r][2:]  # 2 warm-up steps
        med = statistics.median(times)
        row = {"bench": NAME, "case": f"{model}_{size}_b{batch}_x{nproc}ranks", "provider": name, "mode": "full"}
        row |= {"param_model": model, "param_batch": batch, "param_ranks": nproc, "param_zero_stage": stage,
                "param_gradcache_chunk": chunk, "param_activation_checkpointing": ckpt, "dtype": precision}  # fmt: skip
        q = sorted(times)
        row |= {"median_ms": med, "p20_ms": q[len(q) // 5], "p80_ms": q[4 * len(q) // 5],
                "items_per_s": batch / (med / 1e3), "peak_mem_mb": max(final["peak_rss_mb_per_rank"]),
                "peak_mem_mb_per_rank": final["peak_rss_mb_per_rank"]}  # fmt: skip
        rows.append(row | env)
    base = next((r["median_ms"] for r in rows if r["provider"] == "zero0"), None)
    for r in rows:
        r["speedup_vs_reference"] = base / r["median_ms"] if base else None
    return rows


def main(argv=None) -> int:
    return harness.self_measured_main("benchmarks.bench_train", argv)


if __name__ == "__main__":
    sys.exit(main())
