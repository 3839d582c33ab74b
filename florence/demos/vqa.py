"""``make demo-vqa``: METER's co-attention fusion fine-tuned from make demo's two towers on the built-in digit
questions, against the same run from random initialisation and the question-only model.

    python -m florence.demos.vqa [--init runs/demo] [--config configs/vqa.yaml] [--out runs/demo-vqa]
                                 [--nproc 2] [--set key=value ...]

Three ``florence.train`` runs of the same config (task "vqa", same data order and seed), each under torchrun with
``--nproc`` CPU ranks: "pretrained" (``--init``: make demo's CoSwin and text tower under the fusion), "random" (no
init, equal steps) and "question_only" (``vqa.question_only: true``, from make demo's text tower: no image, the
answers the question alone gives). Each run's folder holds its metrics.jsonl, loss curve, predictions.json (VQA's
results format) and final_metrics.json; this writes ``<out>/summary.json`` and ``<out>/accuracy_curves.png``
(held-out VQA accuracy against step, the three runs) and prints the table (overall and per question type) and,
last, one line: ``vqa accuracy: N% ...``. Exits 1 when a run fails.
"""

from __future__ import annotations

import json
import os
import sys

from florence.demos import parse_demo_args, plot_curves, run_training
from florence_kernels._io import atomic_write_text

RUNS = (("pretrained", True, []), ("random", False, []), ("question_only", True, ["vqa.question_only=true"]))
TYPES = ("count", "exist", "position", "relation", "colour")


def main(argv=None) -> int:
    args = parse_demo_args(__doc__, "configs/vqa.yaml", "runs/demo-vqa", argv)
    results = {}
    try:
        for i, (name, init, extra) in enumerate(RUNS):
            results[name] = run_training(name, os.path.join(args.out, name), args.config, [*extra, *args.set],
                                         args.init if init else None, args.nproc, 29520 + i, "accuracy")  # fmt: skip
    except RuntimeError as e:
        print(f"demo-vqa: {e}", file=sys.stderr)
        return 1
    plot_curves(results, os.path.join(args.out, "accuracy_curves.png"), "held-out VQA accuracy (%)",
                "METER on digit questions (5 types)")  # fmt: skip
    keys = ("accuracy", *(f"accuracy_{t}" for t in TYPES))
    summary = {k: {m: v.get(m) for m in ("step", *keys, "train_seconds", "wall_seconds")} for k, v in results.items()}
    atomic_write_text(os.path.join(args.out, "summary.json"), json.dumps(summary, indent=1) + "\n")
    print(f"\n{'run':<15}{'steps':>6}{'overall':>9}" + "".join(f"{t:>10}" for t in TYPES) + f"{'seconds':>9}")
    for name, r in summary.items():
        cells = "".join(f"{100 * r[k]:>9.1f}%" if r[k] is not None else f"{'-':>10}" for k in keys)
        print(f"{name:<15}{r['step']:>6}{cells}{r['wall_seconds']:>9.0f}")
    print(f"curves: {os.path.join(args.out, 'accuracy_curves.png')}")
    pre, rnd, qo = (summary[k]["accuracy"] for k in ("pretrained", "random", "question_only"))
    print(f"vqa accuracy: {100 * pre:.1f}% on held-out questions (VQA accuracy), fine-tuned from make demo; random "
          f"init {100 * rnd:.1f}% at equal steps; question-only {100 * qo:.1f}% "
          f"({100 * (pre - qo):+.1f} points)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
