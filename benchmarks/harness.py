"""Shared benchmark harness (Liger / xFormers style).

A bench module defines ``NAME``, ``cases(quick, device, dtype)`` and ``providers(device)``. The harness times every
(case, provider, mode) with modes forward / backward / full:

* GPU: ``triton.testing.do_bench`` (median with 20th/80th percentiles), peak memory from the CUDA allocator.
* CPU: a wall-clock loop after warm-up, summarised with pytest-benchmark's ``Stats`` (median, IQR, stddev) plus
  20th/80th percentiles; peak memory of mode ``full`` as the extra peak RSS of a fresh subprocess
  (``--no-memory`` skips it).

Rows (device name, torch/triton versions, git commit in every row) are appended to ``<out>/<NAME>.jsonl`` and
``.csv``, a PNG plot of speed-ups over the reference is drawn from the rows of the run, and
``--compare OLD.jsonl --fail-if-regression PCT`` exits 1 if any median got slower by more than PCT percent.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import gc
import importlib
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results", "local")
MODES = ("forward", "backward", "full")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Case:
    """One shape. ``make_inputs(device, dtype)`` returns the tensors a provider takes (leaf tensors that
    require grad get their .grad reset between runs). ``bytes_moved(mode)`` / ``flops(mode)`` feed GB/s and
    TFLOP/s (None where not meaningful)."""

    name: str
    params: dict
    make_inputs: Callable[[str, torch.dtype], tuple]
    bytes_moved: Callable[[str], float] | None = None
    flops: Callable[[str], float] | None = None
    items: int | None = None  # samples per call (e.g. images per training step): adds items_per_s to each row


@dataclass
class Provider:
    name: str
    fn: Callable  # fn(*inputs) -> output tensor
    unavailable: Callable[[str], str | None] = field(default=lambda device: None)  # reason or None
    modes: tuple[str, ...] = MODES
    skip_case: Callable[[Case], str | None] = field(default=lambda case: None)  # reason this case does not apply


# --- environment facts in every row ---------------------------------------------------------------------------


def git_commit() -> str:
    """FLORENCE_COMMIT when set (the GPU machine gets a working tree without .git), else git's HEAD."""
    if os.environ.get("FLORENCE_COMMIT"):
        return os.environ["FLORENCE_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            # Results that this very run appends to do not make the code dirty.
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def environment(device: str) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
    }


# --- running one measurement ----------------------------------------------------------------------------------


def _leaves(inputs):
    return [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]


def make_step(provider: Provider, inputs: tuple, mode: str) -> Callable[[], None]:
    """The callable timed for a mode: forward; backward of a forward done once; or both."""
    leaves = _leaves(inputs)

    def reset():
        for t in leaves:
            t.grad = None

    if mode == "forward":
        return lambda: provider.fn(*inputs)
    out = provider.fn(*inputs)
    grad = torch.randn_like(out)
    if mode == "backward":

        def backward():
            reset()
            out.backward(grad, retain_graph=True)

        return backward

    def full():
        reset()
        provider.fn(*inputs).backward(grad)

    return full


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


SLOW_ROUND_S = 2.0  # a warm-up round slower than this ends the warm-up
MIN_ROUNDS, MAX_GROUP_S = 5, 120.0  # at least 5 timed rounds; stop after 2 minutes once there are 5


def time_cpu_interleaved(steps: dict, warmup: int, reps: int, min_seconds: float) -> dict[str, list[float]]:
    """Round-robin: each round runs every provider's step once, so drift (clock, other load, allocator state) hits
    all providers alike and per-round ratios pair up. A provider that raises is dropped and reported."""
    times = {n: [] for n in steps}
    live = dict(steps)

    def one(name, record):
        try:
            t0 = time.perf_counter()
            live[name]()
            if record:
                times[name].append(time.perf_counter() - t0)
        except Exception as e:
            print(f"  {name} failed: {type(e).__name__}: {e}", file=sys.stderr)
            del live[name]
            del times[name]

    for _ in range(warmup):
        t0 = time.perf_counter()
        for name in list(live):
            one(name, False)
        if time.perf_counter() - t0 > SLOW_ROUND_S:  # seconds-long steps: one warm-up round is enough
            break
    start = time.perf_counter()
    t_end = start + min_seconds * max(1, len(live))
    rounds = 0
    while live and (rounds < reps or time.perf_counter() < t_end) and rounds < 20 * reps:
        if rounds >= MIN_ROUNDS and time.perf_counter() - start > MAX_GROUP_S:
            break  # huge cases (N x N references at N = 16k): enough rounds for a median within the time budget
        for name in list(live):
            one(name, True)
        rounds += 1
    return times


def summarise_cpu(times: list[float]) -> dict:
    from pytest_benchmark.stats import Stats

    stats = Stats()
    for t in times:
        stats.update(t)
    deciles = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return {
        "median_ms": stats.median * 1e3,
        "p20_ms": deciles[1] * 1e3,
        "p80_ms": deciles[7] * 1e3,
        "iqr_ms": stats.iqr * 1e3,
        "stddev_ms": stats.stddev * 1e3,
        "rounds": stats.rounds,
    }


def time_gpu(step, grad_to_none) -> dict:
    from triton.testing import do_bench

    med, p20, p80 = do_bench(step, grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8])
    return {"median_ms": med, "p20_ms": p20, "p80_ms": p80}


def gpu_peak_memory_mb(step) -> float:
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def cpu_peak_memory_child(
    bench_module: str, case_name: str, provider_name: str, mode: str, dtype: str, quick: bool
) -> dict:
    """Runs in a fresh process: inputs made and one warm-up step (lazy inits, caches), then the peak RSS of one
    more step above the RSS just before it. Linux resets the peak (VmHWM) on writing 5 to /proc/self/clear_refs."""
    mod = __import__(bench_module, fromlist=["cases"])
    case = next(c for c in mod.cases(quick, "cpu", DTYPES[dtype]) if c.name == case_name)
    provider = next(p for p in mod.providers("cpu") if p.name == provider_name)
    inputs = case.make_inputs("cpu", DTYPES[dtype])
    step = make_step(provider, inputs, mode)
    step()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_mb("VmRSS")
    step()
    return {"peak_mem_mb": max(_status_mb("VmHWM") - before, 0.0)}


def cpu_peak_memory_mb(bench_module, case, provider, mode, dtype, quick) -> float | None:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.harness",
        "--memory-child",
        bench_module,
        case.name,
        provider.name,
        mode,
        dtype,
    ] + (["--quick"] if quick else [])
    # Large blocks go straight to mmap and back to the OS on free, so RSS follows live memory and the warm-up's
    # freed blocks cannot hide the measured step's allocations.
    env = {**os.environ, "PYTHONPATH": ROOT, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800, env=env)
    if proc.returncode != 0:
        print(f"  memory child failed for {case.name}/{provider.name}: {proc.stderr.strip()[-300:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_mem_mb"]


# --- the run ----------------------------------------------------------------------------------------------------


def run(bench_module: str, args) -> list[dict]:
    from tqdm import tqdm

    mod = __import__(bench_module, fromlist=["cases"])
    device = args.device
    dtype = DTYPES[args.dtype]
    env = environment(device)
    cases = mod.cases(args.quick, device, dtype)
    providers = [p for p in mod.providers(device) if not args.providers or p.name in args.providers]
    modes = args.modes or MODES
    rows = []
    skipped = {}
    groups = [(c, m) for c in cases for m in modes]
    for case, mode in tqdm(groups, desc=mod.NAME, unit="case", disable=not sys.stderr.isatty()):
        steps = {}  # provider name -> (provider, step, inputs)
        for provider in providers:
            if mode not in provider.modes:
                continue
            reason = provider.unavailable(device) or provider.skip_case(case)
            if reason:
                skipped[provider.name] = reason
                continue
            inputs = case.make_inputs(device, dtype)
            try:
                steps[provider.name] = (provider, make_step(provider, inputs, mode), inputs)
            except Exception as e:  # a provider that breaks is reported, the run goes on
                print(f"  {provider.name} failed on {case.name}/{mode}: {type(e).__name__}: {e}", file=sys.stderr)
        if device == "cuda":
            timings = {}
            for name, (_, step, inputs) in list(steps.items()):
                try:
                    timings[name] = time_gpu(step, _leaves(inputs))
                    timings[name]["peak_mem_mb"] = gpu_peak_memory_mb(step)
                except Exception as e:
                    print(f"  {name} failed on {case.name}/{mode}: {type(e).__name__}: {e}", file=sys.stderr)
                    del steps[name]
                    torch.cuda.empty_cache()
        else:
            warm, reps, min_s = (2, 5, 0.2) if args.quick else (3, 15, 1.0)
            times = time_cpu_interleaved({n: st for n, (_, st, _) in steps.items()}, warm, reps, min_s)
            timings = {n: summarise_cpu(t) for n, t in times.items()}
            if "reference" in times:  # side by side: the median of per-round ratios, robust to drift
                for n, t in times.items():
                    k = min(len(t), len(times["reference"]))
                    ratios = [r / x for r, x in zip(times["reference"][:k], t[:k], strict=True)]
                    timings[n]["speedup_vs_reference_paired"] = statistics.median(ratios)
            for n in timings:
                peak = None
                if mode == "full" and not args.no_memory:
                    peak = cpu_peak_memory_mb(bench_module, case, steps[n][0], mode, args.dtype, args.quick)
                timings[n]["peak_mem_mb"] = peak
        for name, timing in timings.items():
            row = {
                "bench": mod.NAME,
                "case": case.name,
                **{f"param_{k}": v for k, v in case.params.items()},
                "provider": name,
                "mode": mode,
                "dtype": args.dtype,
                **timing,
            }
            seconds = timing["median_ms"] / 1e3
            if case.bytes_moved:
                row["gbps"] = case.bytes_moved(mode) / seconds / 1e9
            if case.flops:
                row["tflops"] = case.flops(mode) / seconds / 1e12
            if case.items:
                row["items_per_s"] = case.items / seconds
            row.update(env)
            rows.append(row)
        del steps
    for name, reason in skipped.items():
        print(f"  skipped provider {name}: {reason}", file=sys.stderr)
    _add_speedups(rows)
    return rows


def _add_speedups(rows):
    """Ratio of medians; on CPU the median of paired per-round ratios where the rounds were interleaved."""
    ref = {(r["case"], r["mode"]): r["median_ms"] for r in rows if r["provider"] == "reference"}
    for r in rows:
        base = ref.get((r["case"], r["mode"]))
        paired = r.pop("speedup_vs_reference_paired", None)
        r["speedup_vs_reference"] = paired if paired is not None else (base / r["median_ms"] if base else None)


def format_table(rows) -> str:
    head = (
        f"{'bench':<18} {'case':<28} {'mode':<8} {'provider':<15} {'median ms':>10} {'p20-p80 ms':>17} "
        f"{'x ref':>6} {'GB/s':>7} {'peak MB':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        gbps = f"{r['gbps']:.1f}" if r.get("gbps") is not None else ""
        sp = f"{r['speedup_vs_reference']:.2f}" if r.get("speedup_vs_reference") else ""
        mem = f"{r['peak_mem_mb']:.0f}" if r.get("peak_mem_mb") is not None else ""
        lines.append(
            f"{r['bench']:<18} {r['case']:<28} {r['mode']:<8} {r['provider']:<15} {r['median_ms']:>10.3f} "
            f"{r['p20_ms']:>8.3f}-{r['p80_ms']:<8.3f} {sp:>6} {gbps:>7} {mem:>8}"
        )
    return "\n".join(lines)


def save(rows, out_dir: str, name: str) -> list[str]:
    """Append rows to <out>/<name>.jsonl and .csv (one write per row), then draw <out>/<name>.png atomically."""
    from florence_kernels._io import append_line

    os.makedirs(out_dir, exist_ok=True)
    jsonl = os.path.join(out_dir, f"{name}.jsonl")
    for r in rows:
        append_line(jsonl, json.dumps(r, sort_keys=True))
    csv_path = os.path.join(out_dir, f"{name}.csv")
    fields = sorted({k for r in rows for k in r})
    write_header = not os.path.exists(csv_path)
    if not write_header:
        with open(csv_path) as f:
            old_fields = next(csv.reader(f), [])
        if old_fields != fields:  # columns changed: start a new file beside the old one
            csv_path = os.path.join(out_dir, f"{name}-{rows[0]['commit']}-{int(time.time())}.csv") if rows else csv_path
            write_header = True
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    if write_header:
        writer.writeheader()
    for r in rows:
        writer.writerow(r)
    with open(csv_path, "a") as f:
        f.write(buf.getvalue())
    paths = [jsonl, csv_path]
    png = os.path.join(out_dir, f"{name}.png")
    if rows and plot(rows, png):
        paths.append(png)
    return paths


def save_all(rows, out_dir: str, mod) -> list[str]:
    """save(), then the bench module's own plots (``extra_plots(rows, out_dir) -> paths``) where it has any."""
    paths = save(rows, out_dir, mod.NAME)
    if rows and hasattr(mod, "extra_plots"):
        paths += mod.extra_plots(rows, out_dir)
    return paths


def plot(rows, path: str) -> bool:
    """Bars of speed-up over the reference, one group per (case, mode), one bar per provider."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    groups = list(dict.fromkeys((r["case"], r["mode"]) for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    value = {(r["case"], r["mode"], r["provider"]): r.get("speedup_vs_reference") for r in rows}
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups) * max(1, len(providers)) / 3), 4.5))
    width = 0.8 / max(1, len(providers))
    for i, p in enumerate(providers):
        ys = [value.get((c, m, p)) or 0 for c, m in groups]
        ax.bar([g + i * width for g in range(len(groups))], ys, width, label=p)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
    ax.set_xticklabels([f"{c}\n{m}" for c, m in groups], fontsize=7)
    ax.set_ylabel("speed-up over reference (higher is better)")
    r0 = rows[0]
    ax.set_title(
        f"{r0['bench']} ({r0['dtype']}) on {r0['device_name']}\n"
        f"torch {r0['torch']}, triton {r0['triton']}, commit {r0['commit']}",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def compare(rows, old_path: str, fail_pct: float | None) -> int:
    """Median of each (case, provider, mode, device, dtype) against the newest matching row of OLD."""
    old = {}
    with open(old_path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                old[(r["bench"], r["case"], r["provider"], r["mode"], r["device_name"], r["dtype"])] = r
    worst = 0.0
    print(f"\ncompared with {old_path}:")
    for r in rows:
        o = old.get((r["bench"], r["case"], r["provider"], r["mode"], r["device_name"], r["dtype"]))
        if o is None:
            continue
        change = (r["median_ms"] / o["median_ms"] - 1) * 100
        worst = max(worst, change)
        flag = "  REGRESSION" if fail_pct is not None and change > fail_pct else ""
        print(
            f"  {r['case']:<28} {r['mode']:<8} {r['provider']:<15} {o['median_ms']:.3f} -> {r['median_ms']:.3f} ms "
            f"({change:+.1f}%){flag}"
        )
    if fail_pct is not None and worst > fail_pct:
        print(f"slowest change {worst:+.1f}% exceeds --fail-if-regression {fail_pct}%")
        return 1
    return 0


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--quick", action="store_true", help="small shapes, few repetitions")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default bf16 on GPU, fp32 on CPU")
    parser.add_argument("--providers", nargs="*", default=None, help="only these providers")
    parser.add_argument("--modes", nargs="*", default=None, choices=MODES)
    parser.add_argument("--out", default=DEFAULT_OUT, help="folder for .jsonl/.csv/.png (appended)")
    parser.add_argument("--no-memory", action="store_true", help="skip CPU peak-memory subprocesses")
    parser.add_argument("--compare", default=None, metavar="OLD.jsonl")
    parser.add_argument("--fail-if-regression", type=float, default=None, metavar="PCT")


def finish_args(args):
    if args.dtype is None:
        args.dtype = "bf16" if args.device == "cuda" else "fp32"
    return args


def missing_requirement(mod) -> str | None:
    """Why the bench module ``mod`` cannot run here: the first of its ``REQUIRES`` (optional packages, see
    ``florence.optional``) that is missing, else None."""
    from florence.optional import missing

    return next(filter(None, map(missing, getattr(mod, "REQUIRES", ()))), None)


def main_for(bench_module: str, argv=None) -> int:
    parser = argparse.ArgumentParser(description=f"benchmark {bench_module}")
    add_arguments(parser)
    args = finish_args(parser.parse_args(argv))
    reason = missing_requirement(importlib.import_module(bench_module))
    if reason is not None:
        print(f"{bench_module}: skipped: {reason}")
        return 0
    rows = run(bench_module, args)
    print(format_table(rows))
    mod = sys.modules[bench_module]
    paths = save_all(rows, args.out, mod)
    print("rows appended to " + ", ".join(paths))
    if args.compare:
        return compare(rows, args.compare, args.fail_if_regression)
    return 0 if rows else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-child":
        _, _, module, case_name, provider_name, mode, dtype, *rest = sys.argv
        print(json.dumps(cpu_peak_memory_child(module, case_name, provider_name, mode, dtype, "--quick" in rest)))
    else:
        print(__doc__)


def self_measured_main(bench_module: str, argv=None, extra_arguments=None, ok=None) -> int:
    """The command line of a bench that measures itself (its own ``run(args) -> rows``, e.g. multi-process runs):
    the harness's arguments plus ``extra_arguments(parser)``, a skip (exit 0) when a required package is missing,
    rows saved and printed; exit 1 when there are no rows or ``ok(rows)`` is false."""
    import importlib

    mod = importlib.import_module(bench_module)
    p = argparse.ArgumentParser(description=mod.__doc__.split("\n\n")[0])
    add_arguments(p)
    if extra_arguments is not None:
        extra_arguments(p)
    args = finish_args(p.parse_args(argv))
    reason = missing_requirement(mod)
    if reason is not None:
        print(f"{bench_module}: skipped: {reason}")
        return 0
    rows = mod.run(args)
    print(", ".join(save_all(rows, args.out, mod)), file=sys.stderr)
    print(format_table(rows))
    return 0 if rows and (ok is None or ok(rows)) else 1
