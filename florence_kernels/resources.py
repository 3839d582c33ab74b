"""Static resource budget of every kernel: registers per thread, stack (spill) bytes, shared memory per block and the
occupancy bound they leave, read off the compiled binaries without a GPU.

- Triton: every configuration of :func:`florence_kernels.triton_aot.all_specs`, compiled for sm_80 and sm_90
  (``triton_aot`` adds these columns to its rows); registers and stack from ``cuobjdump --dump-resource-usage`` of
  the cubin (the cuobjdump Triton ships), shared memory from Triton's metadata (it allocates it dynamically, so the
  cubin shows only the static part).
- CUDA C++: every kernel of the built extension (``florence_kernels/_C*.so``), per architecture it was built for;
  threads per block from the launchers in csrc/ (:data:`CUDA_BLOCK_THREADS`).

A Triton kernel makes no calls, so a stack frame is register spills; a CUDA kernel of ours neither (checked here:
any stack counts). The occupancy bound is what the register file, shared memory and the thread/block limits allow
on one SM (the rules of CUDA's cuda_occupancy.h: registers allocated per warp in units of 256 from four 16K
sub-partitions, one KB of shared memory reserved per block); real occupancy can only be lower. Limits from the
CUDA C++ Programming Guide's table of compute capabilities (8.0 and 9.0: 64K registers, 2048 threads, 32 blocks
and 64 warps per SM; shared memory per SM 164 KB and 228 KB).

    python -m florence_kernels.resources --out benchmarks/results/resources-<date>   # table (.md) and rows (.json)

Exceptions: ``resource_exceptions.json`` lists, per Triton version (its ptxas decides the registers), the
configurations allowed to spill, each with the bytes measured and the reason; ``tests/test_triton_aot.py`` fails on
any other spill, on a listed one that spills more than listed, and on shared memory over the per-block limit.
``--list-spills REASON`` writes the spills of this run into that file for this Triton version (a ratchet: review
the diff; a kernel fixed later is simply dropped from the list).
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import re
import subprocess
import sys
import tempfile

# per SM: (registers, threads, blocks, warps, shared memory bytes) for compute capability 8.0 and 9.0
SM_LIMITS = {80: (65536, 2048, 32, 64, 164 * 1024), 90: (65536, 2048, 32, 64, 228 * 1024)}

# Threads per block of each CUDA kernel of the extension, by the name's stem (csrc/*/…_cuda.cu launchers).
CUDA_BLOCK_THREADS = {
    "columns_kernel": 256,  # deform_conv_cuda.cu: kThreads
    "input_grad_kernel": 256,
    "offset_mask_grad_kernel": 256,
    "partition_kernel": 32 * 8,  # window_partition_cuda.cu: dim3(kLanes, kTokensPerBlock)
    "reverse_kernel": 32 * 8,
}

EXCEPTIONS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "resource_exceptions.json")


def allowed_spills(triton_version: str | None = None) -> dict[tuple[str, str], tuple[int, str]] | None:
    """(kernel configuration as named in triton_aot's rows, "sm_NN") -> (stack bytes measured, reason): the
    configurations allowed to spill under this Triton (its ptxas decides), from resource_exceptions.json. None when
    that file has no list for this Triton version (major.minor): nothing was measured with it."""
    if triton_version is None:
        import triton

        triton_version = triton.__version__
    key = ".".join(triton_version.split(".")[:2])
    with open(EXCEPTIONS_PATH) as f:
        doc = json.load(f)
    entries = doc.get("triton", {}).get(key)
    if entries is None:
        return None
    return {(e["kernel"], e["arch"]): (e["stack_bytes"], e["reason"]) for e in entries}


def cuobjdump() -> str:
    """Path of a cuobjdump: Triton's (it ships one with ptxas), else CUDA_HOME's or the PATH's."""
    try:
        import triton

        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.path.exists(path):
            return path
    except ImportError:
        pass
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "cuobjdump")):
            return os.path.join(home, "bin", "cuobjdump")
    return "cuobjdump"


_FUNC = re.compile(r"^\s*Function (\S+):\s*$")
_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_ARCH = re.compile(r"^arch = (sm_\d+)")


def parse_resource_usage(text: str) -> list[dict]:
    """Rows {arch, function, registers, stack_bytes, static_shared_bytes, local_bytes} of cuobjdump's
    ``--dump-resource-usage`` output (arch None for a bare cubin without a fatbin header)."""
    rows, arch, func = [], None, None
    for line in text.splitlines():
        if m := _ARCH.match(line.strip()):
            arch = m.group(1)
        elif m := _FUNC.match(line):
            func = m.group(1)
        elif func and (m := _USAGE.search(line)):
            reg, stack, shared, local = map(int, m.groups())
            rows.append({"arch": arch, "function": func, "registers": reg, "stack_bytes": stack,
                         "static_shared_bytes": shared, "local_bytes": local})  # fmt: skip
            func = None
    return rows


def cubin_usage(cubin: bytes) -> dict:
    """{registers, stack_bytes, static_shared_bytes, local_bytes} of a one-kernel cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout  # fmt: skip
    rows = parse_resource_usage(out)
    if len(rows) != 1:
        raise RuntimeError(f"cubin: expected one kernel in cuobjdump's resource usage, got {len(rows)}:\n{out}")
    return {k: v for k, v in rows[0].items() if k not in ("arch", "function")}


def occupancy(arch: int, registers: int, threads_per_block: int, shared_bytes: int) -> dict:
    """Blocks and warps per SM that registers, shared memory and the thread/block limits allow; the limiter named."""
    regs_sm, threads_sm, blocks_sm, warps_sm, smem_sm = SM_LIMITS[arch]
    warps = -(-threads_per_block // 32)
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    # the register file is 4 sub-partitions of 16K: warps fit per sub-partition (cuda_occupancy.h)
    by = {
        "registers": ((regs_sm // 4) // regs_per_warp * 4) // warps,
        "threads": threads_sm // (warps * 32),
        "blocks": blocks_sm,
        "shared": smem_sm // (shared_bytes + 1024) if shared_bytes else blocks_sm,
    }
    blocks = min(by.values())
    limiter = min(by, key=lambda k: (by[k], k != "registers"))
    return {"blocks_per_sm": blocks, "occupancy": round(blocks * warps / warps_sm, 3), "limited_by": limiter}


def triton_row_resources(compiled, arch: int, num_warps: int) -> dict:
    """The resource columns of one compiled Triton kernel (``triton.compile``'s result)."""
    usage = cubin_usage(compiled.asm["cubin"])
    shared = int(compiled.metadata.shared)
    return usage | {"shared_bytes": shared} | occupancy(arch, usage["registers"], num_warps * 32, shared)


def extension_path() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    paths = sorted(glob.glob(os.path.join(here, f"_C.cpython-{sys.version_info.major}{sys.version_info.minor}*.so")))
    return paths[0] if paths else None


def cuda_rows(path: str | None = None) -> list[dict]:
    """One row per CUDA kernel and architecture of the built extension (empty when it was built without CUDA)."""
    path = path or extension_path()
    if path is None:
        return []
    out = subprocess.run([cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True)
    if out.returncode != 0:  # a CPU-only build has no device code: cuobjdump says so and fails
        return []
    usage = parse_resource_usage(out.stdout)
    names = sorted({r["function"] for r in usage})
    try:
        filt = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
        plain = filt.stdout.splitlines() if filt.returncode == 0 else names
    except FileNotFoundError:  # binutils not installed
        plain = names
    demangled = dict(zip(names, plain if len(plain) == len(names) else names, strict=True))
    rows = []
    for r in usage:
        stem = next((k for k in CUDA_BLOCK_THREADS if k in r["function"]), None)
        plain = demangled[r["function"]].replace("(anonymous namespace)::", "")  # void ns::name<T>(args)
        name = plain.split("(")[0].removeprefix("void ").rsplit("::", 1)[-1]
        if plain == r["function"] and stem:  # no c++filt: the stem and the mangled template argument
            name = f"{stem}[{r['function'].split(stem, 1)[1][:24]}]"
        arch = int(r["arch"][3:]) if r["arch"] else 90
        threads = CUDA_BLOCK_THREADS.get(stem, 256)
        shared = r["static_shared_bytes"]
        row = {"kernel": name, "kind": "cuda", "arch": r["arch"], "num_warps": threads // 32} | r
        row.pop("function")
        row["arch"] = r["arch"]
        rows.append(row | {"shared_bytes": shared} | occupancy(arch, r["registers"], threads, shared))
    return rows


def check(rows: list[dict], allowed: dict | None = None) -> list[str]:
    """Problems: a spill (stack) not in ``allowed`` (:func:`allowed_spills`) or above its listed bytes, shared memory
    over the per-block limit."""
    from .triton_aot import SHARED_MEMORY_LIMIT

    allowed = allowed or {}
    problems = []
    for r in rows:
        if "resource_error" in r or "registers" not in r:
            problems.append(f"{r['arch']} {r['kernel']}: no resource usage ({r.get('resource_error', 'not read')})")
            continue
        arch = int(str(r["arch"]).removeprefix("sm_"))
        limit = SHARED_MEMORY_LIMIT.get(arch, 48 * 1024)
        if r.get("shared_bytes", 0) > limit:
            problems.append(f"{r['arch']} {r['kernel']}: shared memory {r['shared_bytes']} B > {limit} B per block")
        stack = r.get("stack_bytes", 0)
        listed, _ = allowed.get((r["kernel"], r["arch"]), (0, ""))
        if stack > listed:
            what = f"listed {listed} B" if listed else "not listed in florence_kernels/resource_exceptions.json"
            problems.append(f"{r['arch']} {r['kernel']}: {stack} B stack (register spills), {what}")
    return problems


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, ""]
    for arch, kind in sorted({(r["arch"], r.get("kind", "triton")) for r in rows}):
        sel = [r for r in rows if r["arch"] == arch and r.get("kind", "triton") == kind]
        spills = [r for r in sel if r.get("stack_bytes", 0)]
        occ = sorted(r["occupancy"] for r in sel)
        shared = max(r["shared_bytes"] for r in sel)
        most = max((r["stack_bytes"] for r in sel), default=0)
        median = occ[len(occ) // 2]
        lines.append(f"- {arch} {kind}: {len(sel)} kernels; {len(spills)} spill (stack > 0, at most {most} B); "
                     f"occupancy bound median {median:.3f}, min {occ[0]:.3f}; max shared {shared} B")  # fmt: skip
    cols = ["arch", "kind", "kernel", "warps", "registers", "stack (spill) B", "shared B", "blocks/SM", "occupancy",
            "limited by"]  # fmt: skip
    lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in sorted(rows, key=lambda r: (r["arch"], r.get("kind", "triton"), r["kernel"])):
        cells = [r["arch"], r.get("kind", "triton"), r["kernel"], r["num_warps"], r["registers"], r["stack_bytes"],
                 r["shared_bytes"], r["blocks_per_sm"], f"{r['occupancy']:.2f}", r["limited_by"]]  # fmt: skip
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="path stem: writes <out>.md and <out>.json (atomically)")
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--list-spills",
        metavar="REASON",
        default=None,
        help="record this run's Triton spills in resource_exceptions.json with REASON",
    )
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("resources: unset TRITON_INTERPRET / FLORENCE_TRITON_INTERPRET: interpreted kernels cannot be compiled")
        return 2
    import torch

    from ._io import atomic_write_text
    from .triton_aot import compile_all

    rows = [r | {"kind": "triton"} for r in compile_all(args.arch, jobs=args.jobs)]
    failed = [r for r in rows if not r["ok"]]
    rows = [r for r in rows if r["ok"]] + cuda_rows()
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = None
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    commit = os.environ.get("FLORENCE_COMMIT") or git.stdout.strip() or "unknown"
    date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    header = (f"# Kernel resource budget ({date}, commit {commit}, python {sys.version.split()[0]}, torch "
              f"{torch.__version__}, triton {tv}, cuobjdump of the compiled cubins; no GPU needed)")  # fmt: skip
    if args.list_spills:
        with open(EXCEPTIONS_PATH) as f:
            doc = json.load(f)
        spills = [{"kernel": r["kernel"], "arch": r["arch"], "stack_bytes": r["stack_bytes"], "num_warps":
                   r["num_warps"], "registers": r["registers"], "reason": args.list_spills}
                  for r in rows if r["kind"] == "triton" and r["stack_bytes"]]  # fmt: skip
        key = ".".join(tv.split(".")[:2])
        kept = [e for e in doc["triton"].get(key, []) if e["arch"] not in {f"sm_{a}" for a in args.arch}]
        doc["triton"][key] = sorted(kept + spills, key=lambda e: (e["arch"], e["kernel"]))
        atomic_write_text(EXCEPTIONS_PATH, json.dumps(doc, indent=1) + "\n")
    allowed = allowed_spills(tv) if tv else {}
    problems = check(rows, allowed) + [f"{r['arch']} {r['kernel']}: {r['error']}" for r in failed]
    text = markdown([r for r in rows if "registers" in r], header)
    if problems:
        text += "\n## Problems\n\n" + "\n".join(f"- {p}" for p in problems) + "\n"
    atomic_write_text(args.out + ".md", text)
    meta = {"date": date, "commit": commit, "python": sys.version.split()[0], "torch": torch.__version__, "triton": tv}
    atomic_write_text(args.out + ".json", json.dumps({"meta": meta, "rows": rows, "problems": problems}, indent=1))
    print(text.split("\n| arch")[0])
    print(f"{len(rows)} kernels, {len(problems)} problems; written {args.out}.md and {args.out}.json")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
