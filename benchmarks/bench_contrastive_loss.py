"""UniCL / CLIP contrastive loss, forward and forward + backward, over a sweep of batch sizes: time and peak memory
of the literal N x N reference, open_clip's ClipLoss, the tiled torch backend and the Triton kernels (inf-cl where
installed, on GPU). Also draws memory and time against N (<name>_memory.png).

    python -m benchmarks.bench_contrastive_loss [--quick] [--device cpu|cuda] [--dtype fp32|bf16]
"""

from __future__ import annotations

import os
import sys

import torch

import florence_kernels as fk
from benchmarks.harness import Case, Provider, main_for

NAME = "contrastive_loss"
MODES = ("forward", "full")

CPU_N = [1024, 2048, 4096, 8192, 16384]
GPU_N = [4096, 16384, 32768, 65536, 131072, 262144]


def cases(quick: bool, device: str, dtype: torch.dtype) -> list[Case]:
    D = 256 if device == "cpu" else 512
    sizes = [1024, 2048] if quick else (CPU_N if device == "cpu" else GPU_N)
    out = []
    for N in sizes:

        def make_inputs(device, dtype, N=N, D=D):
            g = torch.Generator(device=device).manual_seed(0)
            u = torch.nn.functional.normalize(torch.randn(N, D, device=device, generator=g), dim=1)
            v = torch.nn.functional.normalize(torch.randn(N, D, device=device, generator=g), dim=1)
            scale = torch.tensor(1 / 0.07, device=device, requires_grad=True)
            return u.to(dtype).requires_grad_(), v.to(dtype).requires_grad_(), scale

        flops = 2.0 * N * N * D  # one pass of s = u v^T
        out.append(Case(f"N{N}_D{D}", {"N": N, "D": D}, make_inputs,
                        flops=lambda mode, f=flops: f * {"forward": 1, "backward": 2, "full": 3}[mode]))  # fmt: skip
    return out


def _backend(name):
    def fn(u, v, scale):
        return fk.contrastive_loss(u, v, scale, backend=name)

    def unavailable(dev):
        if name == "triton" and dev == "cpu":
            return "triton on CPU runs only under the interpreter: no timing meaning"
        return "; ".join(fk.OPS["contrastive_loss"].backends[name].environment_reasons(dev)) or None

    return Provider(name, fn, unavailable, modes=MODES)


def _open_clip(u, v, scale):
    from open_clip.loss import ClipLoss

    return ClipLoss()(u, v, scale)


def _open_clip_unavailable(dev):
    try:
        import open_clip  # noqa: F401
    except ImportError:
        return "open_clip is not installed"
    return None


def _inf_cl(u, v, scale):
    from inf_cl import cal_inf_loss

    labels = torch.arange(u.shape[0], device=u.device)
    return (cal_inf_loss(u, v, scale=scale, labels=labels) + cal_inf_loss(v, u, scale=scale, labels=labels)) / 2


def _inf_cl_unavailable(dev):
    if dev != "cuda":
        return "inf-cl runs on CUDA only"
    try:
        import inf_cl  # noqa: F401
    except ImportError:
        return "inf-cl is not installed (pip install inf-cl)"
    return None


def providers(device: str) -> list[Provider]:
    return [
        _backend("reference"),
        Provider("open_clip", _open_clip, _open_clip_unavailable, modes=MODES),
        _backend("torch"),
        _backend("triton"),
        Provider("inf-cl", _inf_cl, _inf_cl_unavailable, modes=MODES),
    ]


def extra_plots(rows, out_dir: str) -> list[str]:
    """Peak memory and time of forward + backward against N, one line per provider (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = [r for r in rows if r["mode"] == "full"]
    if not full:
        return []
    fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(11, 4.2))
    for p in dict.fromkeys(r["provider"] for r in full):
        pts = sorted((r["param_N"], r.get("peak_mem_mb"), r["median_ms"]) for r in full if r["provider"] == p)
        mem = [(n, m) for n, m, _ in pts if m is not None]
        if mem:
            ax_m.plot(*zip(*mem, strict=True), marker="o", label=p)
        ax_t.plot([n for n, _, _ in pts], [t for _, _, t in pts], marker="o", label=p)
    for ax, ylabel in ((ax_m, "peak memory of forward + backward (MB)"), (ax_t, "forward + backward (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch N")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    r0 = full[0]
    fig.suptitle(f"contrastive loss ({r0['dtype']}, D={r0['param_D']}) on {r0['device_name']}, torch {r0['torch']}, "
                 f"commit {r0['commit']}", fontsize=9)  # fmt: skip
    fig.tight_layout()
    path = os.path.join(out_dir, f"{NAME}_memory.png")
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return [path]


if __name__ == "__main__":
    sys.exit(main_for("benchmarks.bench_contrastive_loss"))
