"""Backend choice: automatic order, explicit requests, FLORENCE_BACKEND, reasons."""

import logging

import pytest
import torch

import florence_kernels as fk
from florence_kernels._dispatch import Backend, Op


def _toy_op():
    return Op(
        "toy",
        {
            "reference": Backend("reference", ("cpu", "cuda")),
            "torch": Backend("torch", ("cpu", "cuda")),
            "cpp": Backend("cpp", ("cpu",), (torch.float32,)),
            "triton": Backend("triton", ("cuda",), (torch.float16,), (8, 0)),
            "cuda": Backend("cuda", ("cuda",), impl_reasons=lambda x: ["too big"] if x.numel() > 10 else []),
        },
    )


def test_automatic_choice_on_cpu_prefers_cpp_then_falls_back_to_torch(caplog):
    op = _toy_op()
    assert op.select([torch.zeros(3)]) == "cpp"
    with caplog.at_level(logging.DEBUG, logger="florence_kernels"):
        assert op.select([torch.zeros(3, dtype=torch.float16)]) == "torch"
    assert "skipping backend cpp" in caplog.text and "dtype torch.float16 not in ['float32']" in caplog.text


def test_explicit_backend_lists_every_reason():
    op = _toy_op()
    with pytest.raises(fk.BackendNotSupportedError) as e:
        op.select([torch.zeros(3, dtype=torch.float64)], backend="cuda")
    msg = str(e.value)
    assert "toy: backend 'cuda' cannot run this input ((3,) float64 on cpu)" in msg
    assert "dtype torch.float64 not in ['float32', 'float16', 'bfloat16']" in msg
    assert "cuda runs on cuda tensors, not cpu" in msg


def test_unknown_backend_is_named():
    with pytest.raises(fk.BackendNotSupportedError, match=r"unknown backend 'fast'.*\['cpp', 'cuda', 'reference'"):
        _toy_op().select([torch.zeros(3)], backend="fast")


def test_environment_variable_forces_a_backend(monkeypatch):
    op = _toy_op()
    monkeypatch.setenv("FLORENCE_BACKEND", "reference")
    assert op.select([torch.zeros(3)]) == "reference"
    monkeypatch.setenv("FLORENCE_BACKEND", "cuda")
    with pytest.raises(fk.BackendNotSupportedError, match="backend 'cuda' cannot run"):
        op.select([torch.zeros(3)])
    # An explicit argument wins over the variable.
    assert op.select([torch.zeros(3)], backend="torch") == "torch"


def test_forced_backend_reaches_the_public_op(monkeypatch):
    """FLORENCE_BACKEND=reference makes window_partition run the literal reference (autograd through pad/roll)."""
    monkeypatch.setenv("FLORENCE_BACKEND", "reference")
    x = torch.randn(1, 14, 14, 4, requires_grad=True)
    out = fk.window_partition(x, 7, 3)
    assert "florence_kernels" not in out.grad_fn.name()  # plain autograd through pad/roll/permute
    monkeypatch.setenv("FLORENCE_BACKEND", "torch")
    out = fk.window_partition(x, 7, 3)
    assert "florence_kernels_window_partition" in out.grad_fn.name()


def test_mixed_devices_are_reported():
    op = _toy_op()
    meta = torch.zeros(3, device="meta")
    reasons = op.backends["torch"].not_supported_reasons([torch.zeros(3), meta])
    assert any("different devices" in r for r in reasons)


def test_registry_lists_every_public_op():
    assert {"window_partition", "window_reverse"} <= set(fk.OPS)
    for op in fk.OPS.values():
        assert set(op.backends) <= set(fk.BACKEND_NAMES)
        assert "reference" in op.backends and "torch" in op.backends


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter switch is for machines without a GPU")
@pytest.mark.parametrize("first", ["triton", "torchvision", "triton.language"])
def test_interpreter_switch_works_whatever_was_imported_first(first):
    """FLORENCE_TRITON_INTERPRET=1 with Triton already imported (directly, or by torchvision) before florence_kernels:
    kernels that call Triton's own @triton.jit helpers (tl.cdiv, ...) still run under the interpreter."""
    pytest.importorskip(first)
    import os
    import subprocess
    import sys

    code = f"""
import {first}
import torch
import florence_kernels as fk
x, off, m, w = torch.randn(1, 4, 6, 6), torch.randn(1, 18, 6, 6), torch.rand(1, 9, 6, 6), torch.randn(4, 4, 3, 3)
a = fk.modulated_deform_conv2d(x, off, m, w, padding=1, backend="triton")
b = fk.modulated_deform_conv2d(x, off, m, w, padding=1, backend="torch")
torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
x, y = torch.randn(2, 4, 5, 5), torch.rand(2, 16)
torch.testing.assert_close(fk.dyrelu(x, y, backend="triton"), fk.dyrelu(x, y, backend="torch"))
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"FLORENCE_TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


_LOOP_KERNEL = """
import florence_kernels  # noqa: F401  (mends the interpreter where the installed Triton needs it)
import torch
import triton
import triton.language as tl


@triton.jit
def row_sum(x_ptr, out_ptr, n):
    acc = tl.zeros((1,), tl.float32)
    for i in range(0, n):  # a runtime bound: Triton < 3.7's interpreter took int() of a 1-element array here
        acc += tl.load(x_ptr + i + tl.arange(0, 1))
    tl.store(out_ptr + tl.arange(0, 1), acc)


def run(n):
    x, out = torch.arange(1.0, n + 1), torch.zeros(1)
    row_sum[(1,)](x, out, n)
    return float(out[0])
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is for machines without a GPU")
@pytest.mark.parametrize("how", ["process", "spawned"])
def test_interpreter_runs_loops_over_runtime_bounds(how, tmp_path):
    """Triton 3.6's interpreter with numpy >= 2.4 failed at every loop over a runtime bound ('only 0-dimensional
    arrays can be converted to Python scalars'); importing florence_kernels mends it, also in processes spawned by
    multiprocessing (which import the kernel's module afresh)."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    (tmp_path / "loop_kernel.py").write_text(_LOOP_KERNEL)
    code = "import loop_kernel; print(loop_kernel.run(5))"
    if how == "spawned":
        code = ("import multiprocessing as mp, loop_kernel\nif __name__ == '__main__':\n"
                "    with mp.get_context('spawn').Pool(1) as p: print(p.apply(loop_kernel.run, (5,)))")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "FLORENCE_TRITON_INTERPRET"} | {"TRITON_INTERPRET": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # florence_kernels, installed or not
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), root, env.get("PYTHONPATH", "")])
    script = tmp_path / "main.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip().endswith("15.0"), proc.stderr[-3000:]


def test_interpreter_fix_applies_only_where_numpy_refuses_and_triton_has_the_bug():
    from florence_kernels import _env

    if not _env._numpy_refuses_1d_int():
        assert _env._fix_interpreter_scalar_index() is False
        return
    pytest.importorskip("triton")
    from triton.runtime import interpreter

    fixed = _env._fix_interpreter_scalar_index()
    wrapper = interpreter._patch_lang_tensor
    assert _env._fix_interpreter_scalar_index() is fixed and interpreter._patch_lang_tensor is wrapper  # idempotent
    buggy = fixed and _env._interpreter_has_scalar_index_bug(wrapper.__wrapped__)
    assert fixed == buggy  # mended exactly where this Triton converts with int(self.handle.data)
    assert _env._interpreter_has_scalar_index_bug(lambda self: int(self.handle.data))  # the < 3.7 form
    assert not _env._interpreter_has_scalar_index_bug(lambda self: int(self.handle.data.squeeze()))  # 3.7+
