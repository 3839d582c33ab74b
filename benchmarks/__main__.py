"""Run every benchmark (benchmarks/bench_*.py) on the shared harness and print one table.

python -m benchmarks [--quick] [--device cpu|cuda] [--dtype ...] [--out DIR] [--compare OLD_DIR]
                     [--fail-if-regression PCT] [--only window_partition ...]

A bench whose optional packages (its ``REQUIRES``, names of ``florence.optional.PACKAGES``) are missing, or that
raises ``MissingOptionalDependency``, is skipped with the reason, not failed; any other exception fails it (exit 1)
without stopping the others. ``<out>/benchmarks_status.json`` lists what ran, was skipped (and why) or failed.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import json
import os
import sys

from benchmarks import harness
from florence.optional import MissingOptionalDependency
from florence_kernels._io import atomic_write_text


def bench_modules() -> list[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    return [f"benchmarks.{os.path.basename(p)[:-3]}" for p in sorted(glob.glob(os.path.join(here, "bench_*.py")))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_arguments(parser)
    parser.add_argument("--only", nargs="*", default=None, help="bench names (e.g. window_partition)")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="import every bench and check its optional packages; measure nothing (no GPU needed)",
    )
    args = harness.finish_args(parser.parse_args(argv))
    known = [name.split(".bench_", 1)[1] for name in bench_modules()]
    unknown = sorted(set(args.only or ()) - set(known))
    if unknown:
        parser.error(f"--only: unknown bench {', '.join(unknown)}; known: {', '.join(known)}")
    all_rows, status = [], 0
    report = {"ran": [], "skipped": {}, "failed": {}}
    for name in bench_modules():
        short = name.split(".bench_", 1)[1]
        if args.only and short not in args.only:
            continue
        try:
            mod = importlib.import_module(name)
            reason = harness.missing_requirement(mod)
            if reason is not None:
                raise MissingOptionalDependency(reason)
            if args.dry_run:
                report["ran"].append(short)
                print(f"{name}: would run")
                continue
            # A module with its own run(args) (multi-process benchmarks such as bench_train) measures itself.
            rows = mod.run(args) if hasattr(mod, "run") else harness.run(name, args)
        except MissingOptionalDependency as e:
            print(f"{name}: skipped: {e}", file=sys.stderr)
            report["skipped"][short] = str(e)
            continue
        except Exception as e:  # one bench that fails must not stop the others
            print(f"{name}: FAILED: {type(e).__name__}: {e}", file=sys.stderr)
            report["failed"][short] = f"{type(e).__name__}: {e}"[:1000]
            status = 1
            continue
        report["ran"].append(short)
        all_rows += rows
        paths = harness.save_all(rows, args.out, mod)
        print(f"{mod.NAME}: rows appended to {', '.join(paths)}", file=sys.stderr)
        if args.compare:
            old = os.path.join(args.compare, f"{mod.NAME}.jsonl") if os.path.isdir(args.compare) else args.compare
            if os.path.exists(old):
                status |= harness.compare(rows, old, args.fail_if_regression)
    if all_rows:
        print(harness.format_table(all_rows))
    for short, reason in report["skipped"].items():
        print(f"skipped {short}: {reason}")
    for short, err in report["failed"].items():
        print(f"FAILED {short}: {err}")
    os.makedirs(args.out, exist_ok=True)
    atomic_write_text(os.path.join(args.out, "benchmarks_status.json"), json.dumps(report, indent=1))
    if args.dry_run:
        return status
    return status if all_rows or report["skipped"] else 1


if __name__ == "__main__":
    sys.exit(main())
