"""``make demo-detect``: ATSS + Dynamic Head fine-tuned from make demo's CoSwin on the built-in digit canvases,
against the same run from random initialisation.

    python -m florence.demos.detection [--init runs/demo] [--config configs/detection.yaml] [--out runs/demo-detect]
                                       [--nproc 2] [--set key=value ...]

Two ``florence.train`` runs of the same config (task "detection", equal steps, same data order and seed), each under
torchrun with ``--nproc`` CPU ranks: "pretrained" (``--init``: make demo's CoSwin under the detector) and "random"
(no init). Each run's folder holds its metrics.jsonl, loss curve, detections.json (COCO results format) and
final_metrics.json; this writes ``<out>/summary.json`` and ``<out>/ap_curves.png`` (held-out AP@[.5:.95] against
step, both runs) and prints the table and, last, two lines: ``detection AP: N ...`` and ``AP50: N ...``.
Exits 1 when a run fails.
"""

from __future__ import annotations

import json
import os
import sys

from florence.demos import parse_demo_args, plot_curves, run_training
from florence_kernels._io import atomic_write_text

RUNS = (("pretrained", True), ("random", False))
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def main(argv=None) -> int:
    args = parse_demo_args(__doc__, "configs/detection.yaml", "runs/demo-detect", argv)
    results = {}
    try:
        for i, (name, init) in enumerate(RUNS):
            results[name] = run_training(name, os.path.join(args.out, name), args.config, list(args.set),
                                         args.init if init else None, args.nproc, 29510 + i, "AP")  # fmt: skip
    except RuntimeError as e:
        print(f"demo-detect: {e}", file=sys.stderr)
        return 1
    plot_curves(results, os.path.join(args.out, "ap_curves.png"), "held-out AP@[.5:.95]",
                "ATSS + DyHead on digit canvases (10 categories)", percent=False)  # fmt: skip
    summary = {k: {m: v[m] for m in ("step", *METRICS, "train_seconds", "wall_seconds")} for k, v in results.items()}
    atomic_write_text(os.path.join(args.out, "summary.json"), json.dumps(summary, indent=1) + "\n")
    print(f"\n{'run':<12}{'steps':>6}" + "".join(f"{m:>7}" for m in METRICS) + f"{'seconds':>9}")
    for name, r in summary.items():
        print(f"{name:<12}{r['step']:>6}" + "".join(f"{r[m]:>7.3f}" for m in METRICS) + f"{r['wall_seconds']:>9.0f}")
    print(f"curves: {os.path.join(args.out, 'ap_curves.png')}")
    pre, rnd = summary["pretrained"], summary["random"]
    print(f"detection AP: {pre['AP']:.3f} on held-out canvases (AP@[.5:.95], COCOeval), fine-tuned from make demo; "
          f"random init {rnd['AP']:.3f} at equal steps")  # fmt: skip
    print(f"AP50: {pre['AP50']:.3f} (random init {rnd['AP50']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
