"""The extension as setup.py built it, and the CMake build of the same sources (CMakeLists.txt)."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_extension_is_built_with_cuda_when_a_toolkit_exists():
    from florence_kernels._dispatch import extension_build_info

    info = extension_build_info()
    assert info is not None, "florence_kernels._C did not import: run `make install`"
    has_toolkit = os.path.isfile("/usr/local/cuda/bin/nvcc") or os.environ.get("CUDA_HOME")
    if has_toolkit and os.environ.get("FLORENCE_SKIP_CUDA_BUILD") != "1":
        assert info["cuda"], "nvcc exists but the extension was built without CUDA"
        assert info["cuda_arch_list"], info


def test_cuda_kernels_fit_their_resource_budget():
    """Every CUDA kernel of the built extension, for every architecture it was built for: no stack (spills), shared
    memory within the per-block limit, and an occupancy bound (florence_kernels.resources; cuobjdump of the .so)."""
    from florence_kernels._dispatch import extension_build_info
    from florence_kernels.resources import check, cuda_rows

    info = extension_build_info()
    if not info or not info["cuda"]:
        pytest.skip("the extension was built without CUDA: no device code to read")
    rows = cuda_rows()
    entries = str(info["cuda_arch_list"]).replace(";", ",").replace(" ", ",").split(",")
    archs = {"sm_" + a.split("+")[0].replace(".", "") for a in entries if a}  # "9.0+PTX" builds sm_90 too
    assert {r["arch"] for r in rows} == archs, (archs, rows[:2])
    stems = {r["kernel"].split("<")[0] for r in rows}
    assert stems == {"columns_kernel", "input_grad_kernel", "offset_mask_grad_kernel", "partition_kernel",
                     "reverse_kernel"}  # fmt: skip
    assert all(r["occupancy"] > 0 for r in rows)
    problems = check(rows)
    assert not problems, "\n".join(problems)


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
@pytest.mark.parametrize("skip_cuda", ["0", "1"], ids=["with-cuda", "cpu-only"])
def test_cmake_builds_the_same_extension(tmp_path, skip_cuda):
    build = tmp_path / "build"
    env = dict(os.environ)
    env["FLORENCE_SKIP_CUDA_BUILD"] = skip_cuda
    env.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")  # one architecture keeps this test near one minute
    cfg = subprocess.run(
        ["cmake", "-S", ROOT, "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", f"-DPython3_EXECUTABLE={sys.executable}"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert cfg.returncode == 0, cfg.stdout[-3000:] + cfg.stderr[-3000:]
    jobs = str(max(1, min(os.cpu_count() or 1, 2)))
    bld = subprocess.run(["cmake", "--build", str(build), "-j", jobs], capture_output=True, text=True, timeout=1800)
    assert bld.returncode == 0, bld.stdout[-3000:] + bld.stderr[-3000:]
    libs = [p for p in build.iterdir() if p.name.startswith("_C.") and p.suffix == ".so"]
    assert len(libs) == 1, list(build.iterdir())
    # Load it in a fresh process (the op schemas may be registered once per process) and check it against the
    # reference.
    check = textwrap.dedent(f"""
        import importlib.util, torch
        spec = importlib.util.spec_from_file_location("_C", {str(libs[0])!r})
        mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
        info = mod.build_info()
        import florence_kernels.ops.window_partition as wp
        x = torch.randn(2, 3, 9, 10, 6)
        out = torch.ops.florence_kernels_C.window_partition(x, [2, 4, 4], [1, 2, 3])
        assert torch.equal(out, wp.window_partition_reference(x, (2, 4, 4), (1, 2, 3)))
        print("cuda" if info["cuda"] else "cpu", info["cuda_arch_list"])
    """)
    # florence_kernels must not import its own _C here: run from a folder where the package's _C is shadowed.
    env["PYTHONPATH"] = ROOT
    run = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['florence_kernels._C'] = None\n" + check],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    if skip_cuda == "1":
        assert run.stdout.split()[0] == "cpu", run.stdout
    elif os.path.isfile("/usr/local/cuda/bin/nvcc"):
        assert run.stdout.split() == ["cuda", env["TORCH_CUDA_ARCH_LIST"].replace(";", ",")], run.stdout
