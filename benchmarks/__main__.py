"""Run every benchmark (benchmarks/bench_*.py) on the shared harness and print one table.

python -m benchmarks [--quick] [--device cpu|cuda] [--dtype ...] [--out DIR] [--compare OLD_DIR]
                     [--fail-if-regression PCT] [--only window_partition ...]
"""

from __future__ import annotations

import argparse
import glob
import importlib
import os
import sys

from benchmarks import harness


def bench_modules() -> list[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    return [f"benchmarks.{os.path.basename(p)[:-3]}" for p in sorted(glob.glob(os.path.join(here, "bench_*.py")))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_arguments(parser)
    parser.add_argument("--only", nargs="*", default=None, help="bench names (e.g. window_partition)")
    args = harness.finish_args(parser.parse_args(argv))
    all_rows, status = [], 0
    for name in bench_modules():
        try:
            mod = importlib.import_module(name)
            if args.only and mod.NAME not in args.only:
                continue
            # A module with its own run(args) (multi-process benchmarks such as bench_train) measures itself.
            rows = mod.run(args) if hasattr(mod, "run") else harness.run(name, args)
        except Exception as e:  # one bench that cannot run here (a missing package) must not stop the others
            print(f"{name}: failed, skipped: {type(e).__name__}: {e}", file=sys.stderr)
            status = 1
            continue
        all_rows += rows
        paths = harness.save_all(rows, args.out, mod)
        print(f"{mod.NAME}: rows appended to {', '.join(paths)}", file=sys.stderr)
        if args.compare:
            old = os.path.join(args.compare, f"{mod.NAME}.jsonl") if os.path.isdir(args.compare) else args.compare
            if os.path.exists(old):
                status |= harness.compare(rows, old, args.fail_if_regression)
    print(harness.format_table(all_rows))
    return status if all_rows else 1


if __name__ == "__main__":
    sys.exit(main())
