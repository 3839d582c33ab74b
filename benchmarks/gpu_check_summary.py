"""gpu_check.sh's last step: one summary table of the run, and gpu_check.json (device, date, commit, versions, and per
step its exit code, seconds and what was skipped and why). Exit code: the number of failed steps.

    python benchmarks/gpu_check_summary.py OUT_DIR MODE "build 0 61 150;info 0 3 30;..."
"""

from __future__ import annotations

import collections
import datetime
import json
import os
import platform
import sys
import xml.etree.ElementTree as ET


def parse_steps(text: str) -> list[dict]:
    steps = []
    for item in filter(None, (s.strip() for s in text.split(";"))):
        name, rc, secs, *limit = item.split()
        limit_s = int(limit[0]) if limit and int(limit[0]) > 0 else None  # 0: no limit (not --quick)
        steps.append({"name": name, "exit": int(rc), "seconds": int(secs), "limit_s": limit_s})
    return steps


def junit_summary(path: str) -> dict | None:
    """Counts of a pytest junit XML and its skip reasons (with how many tests each); None when there is none."""
    if not os.path.exists(path):
        return None
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    count = collections.Counter()
    reasons = collections.Counter()
    for s in suites:
        for k in ("tests", "failures", "errors", "skipped"):
            count[k] += int(s.get(k, 0))
        for case in s.iter("testcase"):
            skip = case.find("skipped")
            if skip is not None:
                reasons[(skip.get("message") or "").removeprefix("Skipped: ")[:200]] += 1
    count["passed"] = count["tests"] - count["failures"] - count["errors"] - count["skipped"]
    return dict(count) | {"skip_reasons": dict(reasons.most_common())}


def notes(step: dict, out_dir: str, mode: str) -> str:
    if step["exit"] == 124 and step["limit_s"]:  # gpu_check.sh reports a step stopped at its limit as 124
        return f"stopped at its {step['limit_s']} s limit"
    if step["name"] == "gpu_tests":
        j = step.get("junit")
        if j:
            return f"{j['passed']} passed, {j['failures']} failed, {j['errors']} errors, {j['skipped']} skipped"
        return "collected only (dry run)" if mode == "dry-run" else "no junit report"
    if step["name"] == "benchmarks":
        b = step.get("benches")
        if b:
            verb = "would run" if mode == "dry-run" else "ran"
            return f"{verb} {len(b['ran'])}, skipped {len(b['skipped'])}, failed {len(b['failed'])}"
    return ""


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        print(f"gpu_check_summary.py: expected OUT_DIR MODE STEPS, got {len(argv)} argument(s)", file=sys.stderr)
        return 2
    out_dir, mode, steps_text = argv
    steps = parse_steps(steps_text)
    for s in steps:
        if s["name"] == "gpu_tests":
            s["junit"] = junit_summary(os.path.join(out_dir, "gpu_tests.xml"))
        if s["name"] == "benchmarks" and os.path.exists(os.path.join(out_dir, "benchmarks_status.json")):
            with open(os.path.join(out_dir, "benchmarks_status.json")) as f:
                s["benches"] = json.load(f)
        s["notes"] = notes(s, out_dir, mode)
    import torch

    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = None
    doc = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "mode": mode,
           "commit": os.environ.get("FLORENCE_COMMIT"),
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda, "triton": tv,
           "torch_cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST"), "steps": steps}  # fmt: skip
    path = os.path.join(out_dir, "gpu_check.json")
    with open(path + ".tmp", "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(path + ".tmp", path)

    failed = [s for s in steps if s["exit"] != 0]
    total = sum(s["seconds"] for s in steps)
    print(f"\n== gpu_check summary ({mode}; {doc['device'] or 'no GPU'}; commit {doc['commit']}; python "
          f"{doc['python']}, torch {doc['torch']}, triton {tv})")  # fmt: skip
    print(f"{'step':<12}{'exit':>5}{'seconds':>9}{'limit':>7}  notes")
    for s in steps:
        limit = f"{s['limit_s']}" if s["limit_s"] else "-"
        print(f"{s['name']:<12}{s['exit']:>5}{s['seconds']:>9}{limit:>7}  {s['notes']}")
    print(f"{'total':<12}{'':>5}{total:>9}")
    for s in steps:
        for reason, n in (s.get("junit") or {}).get("skip_reasons", {}).items():
            print(f"skipped ({n} tests): {reason}")
        for name, reason in (s.get("benches") or {}).get("skipped", {}).items():
            print(f"skipped bench {name}: {reason}")
        for name, err in (s.get("benches") or {}).get("failed", {}).items():
            print(f"FAILED bench {name}: {err}")
    print(f"== gpu_check done: {len(failed)} failed step(s); results in {out_dir}")
    return len(failed)


if __name__ == "__main__":
    sys.exit(main())
