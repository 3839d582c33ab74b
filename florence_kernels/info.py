"""What this installation can run: versions, the GPU, how the extension was built, and per op which backends
are available here and why the others are not.

    python -m florence_kernels.info [--json] [--markdown-table]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch

from . import OPS
from ._dispatch import BACKEND_NAMES, extension_build_info, extension_import_error, triton_version

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def gather_info() -> dict:
    build = extension_build_info()
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "gpu_capability": ".".join(map(str, torch.cuda.get_device_capability(0)))
        if torch.cuda.is_available()
        else None,
        "extension": build if build is not None else {"error": extension_import_error()},
        "ops": {},
    }
    device_types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for name, op in OPS.items():
        rows = {}
        for backend_name, backend in op.backends.items():
            per_device = {}
            for dev in ("cpu", "cuda"):
                reasons = backend.environment_reasons(dev)
                if dev == "cuda" and not torch.cuda.is_available():
                    # Say what would stop it on a GPU machine, beyond the missing GPU.
                    reasons = [r for r in reasons if r != "no CUDA device is available"]
                    reasons.append("no CUDA device is available")
                per_device[dev] = {"available": not reasons, "reasons": reasons}
            rows[backend_name] = {
                "devices": list(backend.devices),
                "dtypes": [DTYPE_NAMES.get(d, str(d)) for d in backend.dtypes],
                "min_compute_capability": backend.min_compute_capability,
                "here": {d: per_device[d] for d in ("cpu", "cuda")},
                "runnable_here": any(per_device[d]["available"] for d in device_types),
            }
        info["ops"][name] = rows
    return info


def markdown_table() -> str:
    """Ops x backends x dtypes, generated from the registry (the README carries this table; a test checks it)."""
    lines = ["| op | " + " | ".join(BACKEND_NAMES) + " |", "|---|" + "---|" * len(BACKEND_NAMES)]
    for name, op in OPS.items():
        cells = []
        for b in BACKEND_NAMES:
            backend = op.backends.get(b)
            if backend is None:
                cells.append("—")
                continue
            devices = "/".join(backend.devices)
            if b == "triton":
                devices += " (cpu: interpreter)"
            dtypes = ", ".join(DTYPE_NAMES.get(d, str(d)) for d in backend.dtypes)
            cc = (
                f", sm_{backend.min_compute_capability[0]}{backend.min_compute_capability[1]}+"
                if (backend.min_compute_capability)
                else ""
            )
            cells.append(f"{devices}: {dtypes}{cc}")
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_info(info: dict) -> str:
    ext = info["extension"]
    out = [
        f"python {info['python']}, torch {info['torch']} (CUDA {info['torch_cuda']}), triton {info['triton']}",
        f"GPU: {info['gpu'] or 'none'}" + (f" (sm_{info['gpu_capability'].replace('.', '')})" if info["gpu"] else ""),
    ]
    if "error" in ext:
        out.append(f"extension florence_kernels._C: NOT AVAILABLE: {ext['error']}")
    else:
        archs = ext["cuda_arch_list"] or "-"
        out.append(
            f"extension florence_kernels._C: built with CUDA {ext['cuda_version']} for {archs}"
            if ext["cuda"]
            else "extension florence_kernels._C: CPU-only build (no CUDA)"
        )
    for op_name, rows in info["ops"].items():
        out.append(f"\n{op_name}:")
        for b, row in rows.items():
            status = "available" if row["runnable_here"] else "not runnable here"
            if b == "cuda" and ext.get("cuda") and not row["runnable_here"]:
                status = f"built ({ext['cuda_arch_list']}), not runnable here"
            out.append(f"  {b:<10} {status:<34} devices={','.join(row['devices'])} dtypes={','.join(row['dtypes'])}")
            for dev in ("cpu", "cuda"):
                if row["here"][dev]["reasons"] and dev in row["devices"] + (["cpu"] if b == "triton" else []):
                    out.append(f"  {'':<10} on {dev}: " + "; ".join(row["here"][dev]["reasons"]))
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="florence_kernels installation report")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--markdown-table", action="store_true", help="print the README's ops x backends table")
    args = parser.parse_args(argv)
    if args.markdown_table:
        print(markdown_table())
    elif args.json:
        print(json.dumps(gather_info(), indent=1))
    else:
        print(format_info(gather_info()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
