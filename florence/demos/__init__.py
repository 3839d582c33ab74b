"""The demos behind ``make demo-<task>``: each runs ``florence.train`` a few times (the pretrained start beside its
baselines) and prints one headline line last. Shared here: one training run under torchrun and the curve plot."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

from florence_kernels._io import atomic_write


def parse_demo_args(doc: str, config: str, out: str, argv=None) -> argparse.Namespace:
    """The demos' command line: ``--init`` (make demo's run), ``--config``, ``--out`` (created), ``--nproc`` (CPU
    ranks per run), ``--set KEY=VALUE ...`` (overrides for every run); ``doc``'s first paragraph is the help."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--init", default="runs/demo", help="make demo's run (or any pretrained Florence)")
    p.add_argument("--config", default=config)
    p.add_argument("--out", default=out)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    return args


def run_training(name: str, out: str, config: str, overrides: list[str], init: str | None, nproc: int, port: int,
                 curve_key: str) -> dict:  # fmt: skip
    """One ``florence.train`` run under torchrun with ``nproc`` CPU ranks (DeepSpeed's CPU accelerator), output in
    ``out``, no resume; returns its final_metrics.json plus "wall_seconds" and "curve" ([(step, curve_key)] of its
    evaluations). Raises RuntimeError when the run fails (its output is on the terminal)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port),
           "-m", "florence.train", "--config", config,
           "--set", f"output_dir={out}", "resume=false", *overrides]  # fmt: skip
    if init:
        cmd += ["--init", init]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    print(f"--- {name}: {shlex.join(cmd[2:])}", flush=True)
    t0 = time.time()
    if subprocess.run(cmd, env=env).returncode != 0:
        raise RuntimeError(f"run {name} failed (see its output above)")
    with open(os.path.join(out, "final_metrics.json"), encoding="utf-8") as f:
        final = json.load(f)
    final["wall_seconds"] = round(time.time() - t0, 1)
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        final["curve"] = [(r["step"], r[curve_key]) for r in map(json.loads, f) if curve_key in r]
    return final


def plot_curves(results: dict, path: str, ylabel: str, title: str, percent: bool = True) -> None:
    """The runs' evaluation curves (``results[name]["curve"]``) against step, one PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    k = 100 if percent else 1
    for name, r in results.items():
        ax.plot([c[0] for c in r["curve"]], [k * c[1] for c in r["curve"]], "o-", label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, k)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
