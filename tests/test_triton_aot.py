"""Every Triton kernel, at every launch configuration, compiles for sm_80 and sm_90 (runs on CPU: Triton ships
ptxas). Runs in a subprocess because the test process uses the interpreter, under which kernels cannot compile."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")


def _clean_env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["FLORENCE_TRITON_INTERPRET"] = "0"
    return env


def test_every_kernel_compiles_for_sm80_and_sm90(tmp_path):
    report = tmp_path / "aot.json"
    proc = subprocess.run(
        [sys.executable, "-m", "florence_kernels.triton_aot", "--arch", "80", "90", "--json", str(report)],
        capture_output=True, text=True, env=_clean_env(), timeout=1200,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = json.loads(report.read_text())
    from florence_kernels.triton_aot import all_specs

    specs = all_specs()
    assert len(rows) == 2 * len(specs) > 0
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
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    assert all(r["ok"] and r["shared_bytes"] <= r["shared_limit"] for r in rows)


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
