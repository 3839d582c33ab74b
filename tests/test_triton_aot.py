"""Every Triton kernel, at every launch configuration, compiles for sm_80 and sm_90 (runs on CPU: Triton ships
ptxas). Runs in a subprocess because the test process uses the interpreter, under which kernels cannot compile."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")


# Architectures to compile for: both by default; .ci/run's second environment (the GPU machine's Triton) sets "90", the
# H200's, where every extra architecture would cost a cold compile of every kernel.
ARCHS = os.environ.get("FLORENCE_AOT_ARCHS", "80 90").split()


def _clean_env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["FLORENCE_TRITON_INTERPRET"] = "0"
    return env


@pytest.fixture(scope="module")
def aot_rows(tmp_path_factory):
    """Every configuration compiled for ARCHS once, with its resource columns (registers, stack, shared memory,
    occupancy bound: florence_kernels.resources)."""
    report = tmp_path_factory.mktemp("aot") / "aot.json"
    proc = subprocess.run(
        [sys.executable, "-m", "florence_kernels.triton_aot", "--arch", *ARCHS, "--json", str(report)],
        capture_output=True, text=True, env=_clean_env(), timeout=1200,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(report.read_text())


def test_every_kernel_compiles_for_every_architecture(aot_rows):
    rows = aot_rows
    from florence_kernels.triton_aot import all_specs

    specs = all_specs()
    assert len(rows) == len(ARCHS) * len(specs) > 0
    # both ops' kernels, forward and backward for attention
    names = {r["kernel"].split("[")[0] for r in rows}
    assert {
        "window_gather",
        "_wattn_fwd_kernel",
        "_wattn_bwd_kernel",
        "_lse_rows_kernel",
        "_lse_bwd_rows_kernel",
        "_conv_embed_kernel",
        "_dyrelu_fwd_kernel",
        "_dyrelu_bwd_kernel",
    } <= names
    assert {r["arch"] for r in rows} == {f"sm_{a}" for a in ARCHS}
    assert all(r["ok"] and r["shared_bytes"] <= r["shared_limit"] for r in rows)


def test_resource_budget_no_unlisted_spill(aot_rows):
    """Registers, spills and shared memory of every configuration under this Triton: a spill that
    florence_kernels/resource_exceptions.json does not list (or larger than it lists) fails, as does shared memory
    over the per-block limit; every row has its occupancy bound."""
    import triton

    from florence_kernels.resources import allowed_spills, check

    allowed = allowed_spills(triton.__version__)
    if allowed is None:
        pytest.skip(f"resource_exceptions.json has no list for triton {triton.__version__}: measure it with "
                    "`python -m florence_kernels.resources --out ... --list-spills REASON`")  # fmt: skip
    assert all(0 < r["registers"] <= 255 and 0 < r["occupancy"] <= 1 for r in aot_rows)
    problems = check(aot_rows, allowed)
    assert not problems, "\n".join(problems)
    # the list holds no stale entry: each listed configuration of the compiled architectures still spills
    spilling = {(r["kernel"], r["arch"]) for r in aot_rows if r["stack_bytes"]}
    listed = {key for key in allowed if key[1] in {f"sm_{a}" for a in ARCHS}}
    assert listed <= spilling, sorted(listed - spilling)


def test_occupancy_bound_follows_the_calculator_rules():
    from florence_kernels.resources import occupancy, parse_resource_usage

    # 255 registers x 4 warps: 8 warps fit the register file (32 x 256 registers per warp), 2 blocks
    assert occupancy(90, 255, 128, 0) == {"blocks_per_sm": 2, "occupancy": 0.125, "limited_by": "registers"}
    # 32 registers x 8 warps: the thread limit (2048) and the register file both allow 8 blocks: full occupancy
    assert occupancy(80, 32, 256, 0)["occupancy"] == 1.0
    # 100 KB of shared memory per block (+1 KB reserved): 2 blocks on sm_90 (228 KB), 1 on sm_80 (164 KB)
    assert occupancy(90, 32, 128, 100 * 1024) == {"blocks_per_sm": 2, "occupancy": 0.125, "limited_by": "shared"}
    assert occupancy(80, 32, 128, 100 * 1024)["blocks_per_sm"] == 1
    text = """
arch = sm_90
 Function _k:
  REG:40 STACK:16 SHARED:0 LOCAL:0 CONSTANT[0]:544 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    assert parse_resource_usage(text) == [{"arch": "sm_90", "function": "_k", "registers": 40, "stack_bytes": 16,
                                           "static_shared_bytes": 0, "local_bytes": 0}]  # fmt: skip


def test_aot_check_rejects_what_the_interpreter_forgives(tmp_path):
    """The harness must fail on a kernel the interpreter accepts: tl.dot of 8x8 operands."""
    script = tmp_path / "bad.py"
    script.write_text(
        textwrap.dedent("""
        import triton, triton.language as tl
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        @triton.jit
        def tiny_dot(a_ptr, c_ptr, BLOCK: tl.constexpr):
            i = tl.arange(0, BLOCK)
            a = tl.load(a_ptr + i[:, None] * BLOCK + i[None, :])
            tl.store(c_ptr + i[:, None] * BLOCK + i[None, :], tl.dot(a, a))

        src = ASTSource(fn=tiny_dot, signature={"a_ptr": "*fp16", "c_ptr": "*fp32", "BLOCK": "constexpr"},
                        constexprs={"BLOCK": 8})
        try:
            triton.compile(src, target=GPUTarget("cuda", 90, 32))
        except Exception as e:
            print("rejected:", type(e).__name__)
        else:
            print("accepted")
    """)
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=_clean_env(), timeout=300)
    assert "rejected" in proc.stdout, proc.stdout + proc.stderr


def test_aot_refuses_to_run_under_the_interpreter():
    env = _clean_env()
    env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "florence_kernels.triton_aot"], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 2 and "TRITON_INTERPRET" in proc.stdout


_JIT_KEY_CHECK = """
import json, sys
import torch
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from triton.runtime import jit
import florence_kernels.ops.window_partition as wp
from florence_kernels.triton_aot import all_specs, jit_compile_args

captured = {}
def capture(self, *args, grid, warmup, **kwargs):  # the launch, as the launcher makes it
    captured.update(fn=self, args=args, kwargs=kwargs)
jit.JITFunction.run = capture
wp.window_partition_triton(torch.randn(2, 1, 14, 14, 96), (1, 7, 7), (0, 3, 3))
fn, args, kwargs = captured["fn"], captured["args"], captured["kwargs"]
try:
    jit_hash, compile_args = jit_compile_args(fn, args, kwargs, 90)
except NotImplementedError as e:
    print(json.dumps({"skip": str(e)})); sys.exit(0)
compiled = triton.compile(**compile_args)
cfg = wp.triton_launch_config(96)
spec = next(s for s in all_specs() if s["fn"] is fn and s["constexprs"].get("BLOCK_C") == cfg["BLOCK_C"]
            and s["constexprs"].get("REVERSE") is False and "fp32,i32" in s["name"])
aot = triton.compile(ASTSource(fn=spec["fn"], signature=spec["signature"], constexprs=spec["constexprs"]),
                     target=GPUTarget("cuda", 90, 32), options={"num_warps": spec["num_warps"]})
sig = compile_args["src"].signature
constants = sorted(k for k, v in sig.items() if v == "constexpr" and spec["signature"][k] != "constexpr")
print(json.dumps({"jit": jit_hash, "compiled": compiled.hash, "aot": aot.hash, "constants": constants,
                  "divisible": len([a for a in compile_args["src"].attrs.values() if a])}))
"""


def test_jit_cache_key_rebuilt_on_cpu_and_the_specs_do_not_hit_it():
    """The claim behind 'no pre-filled Triton cache' (README, GPU check): for a real launch (window_partition of a
    (2, 1, 14, 14, 96) tensor, window 1x7x7), compiling with what jit_compile_args rebuilds lands on the JIT's cache
    key, and our ahead-of-time spec for the same configuration does not (the JIT turns the 1-valued T, wt, nT and
    stride_ch into constants and marks arguments divisible by 16)."""
    proc = subprocess.run([sys.executable, "-c", _JIT_KEY_CHECK], capture_output=True, text=True, env=_clean_env(),
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in out:
        pytest.skip(out["skip"])
    assert out["compiled"] == out["jit"]  # triton.compile with the rebuilt arguments fills the JIT's entry
    assert out["aot"] != out["jit"]
    assert out["constants"] == ["T", "nT", "stride_ch", "wt"] and out["divisible"] >= 8
