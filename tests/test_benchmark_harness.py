"""The shared benchmark harness: a tiny bench run end to end, rows saved and plotted, regressions caught."""

import json
import subprocess
import sys
import types

import pytest
import torch

from benchmarks import harness


def _args(tmp_path, **kw):
    ns = dict(quick=True, device="cpu", dtype="fp32", providers=None, modes=None, out=str(tmp_path), no_memory=True,
              compare=None, fail_if_regression=None)  # fmt: skip
    ns.update(kw)
    return types.SimpleNamespace(**ns)


def test_window_partition_bench_runs_and_saves(tmp_path):
    args = _args(tmp_path, providers=["reference", "cpp"], modes=["forward", "full"])
    rows = harness.run("benchmarks.bench_window_partition", args)
    assert {r["provider"] for r in rows} == {"reference", "cpp"}
    assert {r["mode"] for r in rows} == {"forward", "full"}
    for r in rows:
        assert r["median_ms"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["gbps"] > 0 and r["torch"] == torch.__version__ and r["commit"] and r["device_name"]
        assert r["speedup_vs_reference"] is not None
    paths = harness.save(rows, str(tmp_path), "window_partition")
    assert any(p.endswith(".png") for p in paths)
    lines = (tmp_path / "window_partition.jsonl").read_text().splitlines()
    assert len(lines) == len(rows) and json.loads(lines[0])["bench"] == "window_partition"
    harness.save(rows, str(tmp_path), "window_partition")  # appends
    assert len((tmp_path / "window_partition.jsonl").read_text().splitlines()) == 2 * len(rows)
    assert "window_partition" in harness.format_table(rows)


def test_cpu_peak_memory_subprocess_sees_the_reference_intermediates():
    """The reference (pad, roll, permute copy) must show more extra peak memory than the fused cpp gather."""
    import benchmarks.bench_window_partition as b

    case = b.cases(True, "cpu", torch.float32)[0]
    provs = {p.name: p for p in b.providers("cpu")}
    ref = harness.cpu_peak_memory_mb("benchmarks.bench_window_partition", case, provs["reference"], "full", "fp32",
                                     True)  # fmt: skip
    cpp = harness.cpu_peak_memory_mb("benchmarks.bench_window_partition", case, provs["cpp"], "full", "fp32", True)
    assert ref is not None and cpp is not None
    assert ref > cpp, (ref, cpp)


def _row(median, provider="cpp"):
    return {"bench": "b", "case": "c", "provider": provider, "mode": "full", "device_name": "d", "dtype": "fp32",
            "median_ms": median}  # fmt: skip


def test_compare_fails_only_beyond_the_threshold(tmp_path, capsys):
    old = tmp_path / "old.jsonl"
    old.write_text(json.dumps(_row(1.0)) + "\n")
    assert harness.compare([_row(1.05)], str(old), 10.0) == 0
    assert harness.compare([_row(1.25)], str(old), 10.0) == 1
    assert "REGRESSION" in capsys.readouterr().out
    assert harness.compare([_row(1.25)], str(old), None) == 0


def test_cli_compare_exit_code(tmp_path):
    old = tmp_path / "old.jsonl"
    # An impossible baseline: 1 ns medians. The run must fail the 10% regression check.
    base = {"bench": "window_partition", "provider": "cpp", "dtype": "fp32", "median_ms": 1e-6}
    import benchmarks.bench_window_partition as b

    dev = harness.device_name("cpu")
    with open(old, "w") as f:
        for case in b.cases(True, "cpu", torch.float32):
            f.write(json.dumps({**base, "case": case.name, "mode": "forward", "device_name": dev}) + "\n")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_window_partition", "--quick", "--providers", "cpp", "--modes",
         "forward", "--out", str(tmp_path / "new"), "--compare", str(old), "--fail-if-regression", "10"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "REGRESSION" in proc.stdout


@pytest.mark.parametrize("mode", harness.MODES)
def test_make_step_modes_produce_gradients(mode):
    x = torch.randn(3, 4, requires_grad=True)
    prov = harness.Provider("p", lambda x: x * 2)
    step = harness.make_step(prov, (x,), mode)
    step()
    if mode == "forward":
        assert x.grad is None
    else:
        assert x.grad is not None


def test_cpu_timing_interleaves_providers_and_drops_a_failing_one(capsys):
    from benchmarks.harness import time_cpu_interleaved

    order = []

    def step(name):
        return lambda: order.append(name)

    def broken():
        raise RuntimeError("boom")

    times = time_cpu_interleaved({"a": step("a"), "b": step("b"), "c": broken}, warmup=1, reps=3, min_seconds=0)
    assert set(times) == {"a", "b"} and len(times["a"]) == len(times["b"]) == 3
    assert order == ["a", "b"] * 4  # one warm-up round, then three rounds, round-robin
    assert "c failed: RuntimeError: boom" in capsys.readouterr().err


def test_a_bench_that_cannot_run_does_not_stop_the_others(monkeypatch, tmp_path, capsys):
    """A bench that fails (here: its module does not import) is reported as FAILED and sets the exit status; one that
    raises MissingOptionalDependency (a package the GPU machine lacks) is a skip, not a failure; the rest still run
    and benchmarks_status.json says which is which."""
    import json

    import benchmarks.__main__ as cli
    from florence.optional import MissingOptionalDependency

    fake = types.ModuleType("benchmarks.bench_fake_ok")
    fake.NAME = "fake_ok"
    fake.run = lambda args: [{"bench": "fake_ok", "case": "c", "provider": "reference", "mode": "full",
                              "median_ms": 1.0, "p20_ms": 1.0, "p80_ms": 1.0, "dtype": "fp32", "device_name": "cpu",
                              "torch": torch.__version__, "triton": None, "commit": "x"}]  # fmt: skip
    monkeypatch.setitem(sys.modules, "benchmarks.bench_fake_ok", fake)
    needs = types.ModuleType("benchmarks.bench_fake_needs")
    needs.NAME = "fake_needs"

    def run(args):
        raise MissingOptionalDependency("bench_fake_needs: deepspeed is not importable")

    needs.run = run
    monkeypatch.setitem(sys.modules, "benchmarks.bench_fake_needs", needs)
    names = ["benchmarks.bench_missing_package", "benchmarks.bench_fake_needs", "benchmarks.bench_fake_ok"]
    monkeypatch.setattr(cli, "bench_modules", lambda: names)
    status = cli.main(["--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert status == 1 and "benchmarks.bench_missing_package: FAILED: ModuleNotFoundError" in err
    assert "benchmarks.bench_fake_needs: skipped: bench_fake_needs: deepspeed is not importable" in err
    assert (tmp_path / "fake_ok.jsonl").exists()
    report = json.loads((tmp_path / "benchmarks_status.json").read_text())
    assert report["ran"] == ["fake_ok"] and list(report["skipped"]) == ["fake_needs"]
    assert list(report["failed"]) == ["missing_package"]
    monkeypatch.setattr(cli, "bench_modules", lambda: names[1:2])
    assert cli.main(["--out", str(tmp_path)]) == 0  # only a skip: not a failure
