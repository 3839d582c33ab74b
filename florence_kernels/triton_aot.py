"""Compile every Triton kernel, at every configuration its launcher can choose, for real GPU targets.

Runs without a GPU (Triton ships ptxas) and catches what the interpreter forgives: tl.dot operands smaller than
16, non-power-of-two blocks, dtype mismatches, shared memory over the per-block limit.

    python -m florence_kernels.triton_aot --arch 80 90 [--json report.json]

Must run without TRITON_INTERPRET (under the interpreter kernels are not compiled); exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# Usable shared memory per block (bytes): A100 164 KB - 1 KB reserved; H100 228 KB - 1 KB reserved.
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


# The element types the AOT specs compile for, by the names Triton's signatures use.
TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def torch_dtype(name: str):
    """torch dtype of a signature element-type name ("fp32" -> torch.float32)."""
    import torch

    return getattr(torch, TORCH_DTYPES[name])


def kernel_spec(name: str, kernel, constexprs: dict, pointers: dict, num_warps: int, scalars: dict | None = None):
    """One entry for :func:`all_specs`: arguments in ``constexprs`` are compile-time constants, those in ``pointers``
    map to their element type (``"fp32"`` -> ``*fp32``), those in ``scalars`` to their type; the rest are i32."""
    scalars = scalars or {}
    signature = {}
    for arg in kernel.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in pointers:
            signature[arg] = f"*{pointers[arg]}"
        else:
            signature[arg] = scalars.get(arg, "i32")
    return {"name": name, "fn": kernel, "signature": signature, "constexprs": constexprs, "num_warps": num_warps}


def all_specs() -> list[dict]:
    from .ops import contrastive_loss, conv_embed, deform_conv, dyhead, window_attention, window_partition

    return (
        window_partition.triton_aot_specs()
        + window_attention.triton_aot_specs()
        + contrastive_loss.triton_aot_specs()
        + conv_embed.triton_aot_specs()
        + deform_conv.triton_aot_specs()
        + dyhead.triton_aot_specs()
    )


def _compile_one(job: tuple[int, int]) -> dict:
    """Compile spec number i for one architecture (runs in a worker process: specs are rebuilt there), with the
    resource columns of florence_kernels.resources (or ``resource_error`` when cuobjdump cannot read the cubin)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    index, arch = job
    spec = all_specs()[index]
    row = {"kernel": spec["name"], "arch": f"sm_{arch}", "num_warps": spec["num_warps"]}
    t0 = time.perf_counter()
    try:
        src = ASTSource(fn=spec["fn"], signature=spec["signature"], constexprs=spec["constexprs"])
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": spec["num_warps"]})
        shared = int(compiled.metadata.shared)
        limit = SHARED_MEMORY_LIMIT.get(arch, 48 * 1024)
        row.update(ok=shared <= limit, shared_bytes=shared, shared_limit=limit)
        from .resources import triton_row_resources

        try:  # registers, spills, occupancy bound; a compile that worked stays ok if cuobjdump fails
            row.update(triton_row_resources(compiled, arch, spec["num_warps"]))
        except Exception as e:
            row["resource_error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        if shared > limit:
            row["error"] = f"shared memory {shared} B > {limit} B usable per block on sm_{arch}"
    except Exception as e:  # report every failure, not just the first
        row.update(ok=False, error=f"{type(e).__name__}: {e}".splitlines()[0][:500])
    row["seconds"] = round(time.perf_counter() - t0, 3)
    return row


def compile_all(archs: list[int], name_filter: str | None = None, jobs: int = 1) -> list[dict]:
    specs = all_specs()
    work = [
        (i, arch) for i, spec in enumerate(specs) if not name_filter or name_filter in spec["name"] for arch in archs
    ]
    if jobs <= 1:
        return [_compile_one(w) for w in work]
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(_compile_one, work, chunksize=4))


def jit_compile_args(fn, args: tuple, kwargs: dict, arch: int) -> tuple[str, dict]:
    """What Triton's JIT compiles for the launch ``fn[grid](*args, **kwargs)`` on a GPU of compute capability
    ``arch``, rebuilt without a GPU by the JIT's own binder (``create_function_from_signature``, ``_pack_args``):
    (cache hash, ``triton.compile`` keyword arguments). ``triton.compile(**those)`` here writes the cache entry that
    the JIT looks up there (the same key function: source, argument types, specialisation attributes, constants,
    options, target, env vars), where Triton, its ptxas and the kernel's source are the same. Triton internals
    (3.6 to 3.8): raises NotImplementedError where they differ. Ints equal to 1 become constants and pointers /
    ints divisible by 16 are marked, by the values of ``args``: replay the real shapes."""
    import hashlib

    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import get_cache_invalidating_env_vars, make_backend
    from triton.runtime import jit
    from triton.runtime.cache import get_cache_key

    if not hasattr(jit, "create_function_from_signature") or not hasattr(fn, "_pack_args"):
        raise NotImplementedError("this Triton's JIT binder differs from 3.6-3.8's")
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = jit.create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(kwargs)  # as JITFunction.run completes them
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    src = ASTSource(fn, signature, constexprs, attrs)
    key = get_cache_key(src, backend, options, env_vars=get_cache_invalidating_env_vars())
    return hashlib.sha256(key.encode("utf-8")).hexdigest(), {"src": src, "target": target, "options": options.__dict__}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities, e.g. 80 90")
    parser.add_argument("--filter", default=None, help="only kernels whose name contains this")
    parser.add_argument("--json", default=None, help="write the report here (atomically)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("triton_aot: unset TRITON_INTERPRET / FLORENCE_TRITON_INTERPRET: interpreted kernels cannot be compiled")
        return 2
    results = compile_all(args.arch, args.filter, args.jobs)
    failed = [r for r in results if not r["ok"]]
    for r in results:
        status = "ok  " if r["ok"] else "FAIL"
        extra = f"shared={r.get('shared_bytes', '?')}B" if r["ok"] else r["error"]
        print(f"{status} {r['arch']} {r['kernel']} {extra}")
    print(f"{len(results) - len(failed)} compiled, {len(failed)} failed")
    if args.json:
        from ._io import atomic_write_text

        atomic_write_text(args.json, json.dumps(results, indent=1))
    return 1 if failed or not results else 0


if __name__ == "__main__":
    sys.exit(main())
